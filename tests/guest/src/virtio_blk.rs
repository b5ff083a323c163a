// Register fields are cut out of wider words on purpose.
#![allow(clippy::cast_possible_truncation)]
//! A virtio-blk driver for modern virtio-pci devices (1af4:1042): feature
//! negotiation, up to two split virtqueues, MSI-X (configuration changes
//! on their own vector, and each disk's queues on a vector of their own),
//! and a fixed test: identify, read sector 0, write a pattern at sector 8,
//! flush, read it back through the last queue, and report the interrupts
//! that came on the disk's vector and on the others. On request it then
//! waits for the disk to be resized and reads its new last sector.

use core::sync::atomic::{fence, Ordering};

use crate::clock::{Deadline, SECOND};
use crate::irq;
use crate::pcicfg::Function;
use crate::serial::{say, Bytes};
use crate::virtio_pci::{locate, rd, wr, DESC_NEXT, DESC_WRITE};
use crate::Fail;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const QUEUE_SIZE: u16 = 8;
/// Queues driven at most; a disk may offer more.
const MAX_QUEUES: u16 = 2;
/// Per-disk scratch RAM: queue 0's ring page, request header and status,
/// two buffers, queue 1's ring page.
const SCRATCH_BASE: u64 = 0x40_0000;
const SCRATCH_PER_DISK: u64 = 0x5000;
const RING_PAGES: [u64; MAX_QUEUES as usize] = [0, 0x4000];
/// MSI-X table entries: configuration changes on 0, queue N on N + 1 (as
/// Linux has them).
const CONFIG_ENTRY: u16 = 0;
const PATTERN_SECTOR: u64 = 8;
/// How long a request may take before it counts as lost (a restarted
/// backend takes over a request in flight; tests wait 90 s for a line).
const REQUEST_TIMEOUT: u64 = 30 * SECOND;
/// How long a resize is waited for (the test acts on a line of output).
const RESIZE_TIMEOUT: u64 = 60 * SECOND;

/// A split virtqueue in scratch RAM, with one request in flight at a time.
struct Queue {
    index: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify_addr: u64,
    last_used: u16,
    avail_idx: u16,
}

impl Queue {
    /// Submits a chain of (address, length, device-writable) buffers and
    /// waits for its completion.
    fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> Result<(), Fail> {
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let d = self.desc + 16 * i as u64;
            let mut flags = if write { DESC_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_NEXT;
            }
            wr(d, addr);
            wr(d + 8, len);
            wr(d + 12, flags);
            wr(d + 14, (i + 1) as u16);
        }
        wr(
            self.avail + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE),
            0u16,
        );
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        wr(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        wr(self.notify_addr, self.index);
        let deadline = Deadline::after(REQUEST_TIMEOUT);
        while !deadline.passed() {
            let used_idx: u16 = rd(self.used + 2);
            if used_idx != self.last_used {
                self.last_used = used_idx;
                fence(Ordering::SeqCst);
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err(Fail::new("virtio-blk request timed out"))
    }
}

/// One request: header, optional data buffer, status byte. Returns the status.
fn request(
    q: &mut Queue,
    scratch: u64,
    kind: u32,
    sector: u64,
    data: Option<(u64, u32, bool)>,
) -> Result<u8, Fail> {
    let header = scratch + 0x1000;
    let status = header + 0x10;
    wr(header, kind);
    wr(header + 4, 0u32);
    wr(header + 8, sector);
    wr(status, 0xffu8);
    let head = (header, 16, false);
    let tail = (status, 1, true);
    match data {
        Some(buf) => q.submit(&[head, buf, tail])?,
        None => q.submit(&[head, tail])?,
    }
    Ok(rd(status))
}

/// The capacity, read consistently: the generation must not change
/// across the two halves.
fn read_capacity(common: u64, cfg: u64) -> u64 {
    loop {
        let generation = rd::<u8>(common + 0x15);
        let capacity = u64::from(rd::<u32>(cfg)) | u64::from(rd::<u32>(cfg + 4)) << 32;
        if rd::<u8>(common + 0x15) == generation {
            return capacity;
        }
    }
}

/// Waits for the configuration to change (its generation, and with MSI-X
/// the configuration-change interrupt), then reports the new capacity and
/// the first bytes of the new last sector.
fn watch_resize(
    q: &mut Queue,
    scratch: u64,
    common: u64,
    cfg: u64,
    bdf: (u8, u8),
    msix: bool,
) -> Result<(), Fail> {
    let generation = rd::<u8>(common + 0x15);
    // Counted before the announcement: the test acts on the line, and the
    // interrupt may arrive before the next instruction here runs.
    let irqs = irq::config_count();
    say!("blk 00:{:02x}.{} resize watch", bdf.0, bdf.1);
    let deadline = Deadline::after(RESIZE_TIMEOUT);
    while rd::<u8>(common + 0x15) == generation || (msix && irq::config_count() == irqs) {
        if deadline.passed() {
            return Err(Fail::new(if rd::<u8>(common + 0x15) == generation {
                "virtio-blk configuration did not change"
            } else {
                "no configuration change interrupt"
            }));
        }
        core::hint::spin_loop();
    }
    let capacity = read_capacity(common, cfg);
    say!(
        "blk 00:{:02x}.{} config change: capacity {capacity}",
        bdf.0,
        bdf.1
    );
    let buf = scratch + 0x2000;
    poison(buf, 512);
    let last = capacity
        .checked_sub(1)
        .ok_or(Fail::new("virtio-blk resized to nothing"))?;
    if request(q, scratch, T_IN, last, Some((buf, 512, true)))? != S_OK {
        return Err(Fail::new("virtio-blk read of the new last sector failed"));
    }
    let mut hex = [0u8; 32];
    hex_of(buf, &mut hex);
    say!("blk 00:{:02x}.{} last sector {}", bdf.0, bdf.1, Bytes(&hex));
    Ok(())
}

/// The first 16 bytes at `addr`, in hex.
fn hex_of(addr: u64, hex: &mut [u8; 32]) {
    for i in 0..16u64 {
        let b: u8 = rd(addr + i);
        hex[2 * i as usize] = b"0123456789abcdef"[usize::from(b >> 4)];
        hex[2 * i as usize + 1] = b"0123456789abcdef"[usize::from(b & 0xf)];
    }
}

/// Fills `len` bytes at `addr` with a byte no image here starts with.
fn poison(addr: u64, len: u64) {
    for i in 0..len {
        wr(addr + i, 0xeeu8);
    }
}

fn pattern_byte(i: u64, index: u8) -> u8 {
    ((i * 7 + 0x5a) & 0xff) as u8 ^ index
}

/// What a disk test does besides the fixed test.
#[derive(Clone, Copy)]
pub struct Extra {
    /// Stop after the first read until a line arrives on the serial port
    /// (a test restarts the backend meanwhile).
    pub wait: bool,
    /// After the fixed test, wait for a resize (a configuration change)
    /// and read the new last sector.
    pub resize: bool,
}

/// Drives the disk at `f`, found `index`-th, and reports what it saw.
pub fn test_disk(f: Function, index: u8, extra: Extra) -> Result<(), Fail> {
    let bdf = (f.slot, f.function);
    f.enable();
    let dev = locate(f)?;
    let c = dev.common;
    let wanted = dev.negotiate(F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ)?;
    let cfg = dev.device_cfg;
    let ro = wanted & F_RO != 0;
    let queues = if wanted & F_MQ != 0 {
        rd::<u16>(cfg + 34)
    } else {
        1
    };
    if queues == 0 {
        return Err(Fail::new("virtio-blk reports 0 queues"));
    }
    let mut driven = queues.min(MAX_QUEUES);

    let scratch = SCRATCH_BASE + SCRATCH_PER_DISK * u64::from(index);
    let msix = dev.msix_table.is_some();
    if msix {
        // A table too small for a vector per queue drives fewer queues.
        let entries = dev.msix_entries(f);
        if entries < 2 {
            return Err(Fail::new("virtio-blk MSI-X table of one entry"));
        }
        driven = driven.min(entries - 1);
        dev.route_msix(f, CONFIG_ENTRY, irq::CONFIG_VECTOR)?;
        for queue in 0..driven {
            dev.route_msix(f, queue + 1, irq::queue_vector(index))?;
        }
        dev.set_config_vector(CONFIG_ENTRY)?;
    }
    let mut rings: [Option<Queue>; MAX_QUEUES as usize] = [None, None];
    for queue in 0..driven {
        let ring = scratch + RING_PAGES[usize::from(queue)];
        rings[usize::from(queue)] = Some(Queue {
            index: queue,
            desc: ring,
            avail: ring + 0x200,
            used: ring + 0x400,
            notify_addr: dev.setup_queue(queue, QUEUE_SIZE, ring, msix.then_some(queue + 1))?,
            last_used: 0,
            avail_idx: 0,
        });
    }
    dev.driver_ok();
    let [Some(mut q), last] = rings else {
        return Err(Fail::new("virtio-blk queue 0 missing"));
    };
    // The read-back goes through the last queue driven.
    let mut last = last;

    let capacity = u64::from(rd::<u32>(cfg)) | u64::from(rd::<u32>(cfg + 4)) << 32;
    // Interrupts on this disk's vector, and on the other queue vectors
    // (none should come there: only this disk is driven now).
    let vector = irq::queue_vector(index);
    let own_before = irq::count_on(vector);
    let elsewhere_before = irq::count_except(vector);
    let buf = scratch + 0x2000;
    let readback = scratch + 0x3000;

    // A device that says OK and writes nothing leaves the poison, which
    // is no serial.
    poison(buf, 20);
    let mut serial = [0u8; 20];
    match request(&mut q, scratch, T_GET_ID, 0, Some((buf, 20, true)))? {
        S_OK => {
            // SAFETY: `buf` holds the 20 bytes the device wrote.
            unsafe { core::ptr::copy_nonoverlapping(buf as *const u8, serial.as_mut_ptr(), 20) };
            if serial.iter().all(|&b| b == 0xee) {
                return Err(Fail::new("virtio-blk GET_ID said OK and wrote nothing"));
            }
        }
        S_UNSUPP => {}
        _ => return Err(Fail::new("virtio-blk GET_ID failed")),
    }
    let serial_len = serial.iter().position(|&b| b == 0).unwrap_or(20);
    let serial_text: &[u8] = if serial_len == 0 {
        b"-"
    } else {
        &serial[..serial_len]
    };
    say!(
        "blk 00:{:02x}.{} capacity {capacity} size {} ro {} queues {queues} serial {}",
        bdf.0,
        bdf.1,
        capacity * 512,
        u8::from(ro),
        Bytes(serial_text)
    );

    // Whatever an earlier boot left in guest RAM must not pass for data
    // the device read.
    poison(buf, 512);
    if request(&mut q, scratch, T_IN, 0, Some((buf, 512, true)))? != S_OK {
        return Err(Fail::new("virtio-blk read of sector 0 failed"));
    }
    let mut hex = [0u8; 32];
    hex_of(buf, &mut hex);
    say!("blk 00:{:02x}.{} sector0 {}", bdf.0, bdf.1, Bytes(&hex));
    if extra.wait {
        say!("blk 00:{:02x}.{} waiting", bdf.0, bdf.1);
        while !matches!(crate::serial::read_byte(), b'\n' | b'\r') {}
    }

    for i in 0..4096u64 {
        wr(buf + i, pattern_byte(i, index));
    }
    let status = request(
        &mut q,
        scratch,
        T_OUT,
        PATTERN_SECTOR,
        Some((buf, 4096, false)),
    )?;
    if ro {
        if status != S_IOERR {
            return Err(Fail::new(
                "virtio-blk write to a read-only disk was not rejected",
            ));
        }
        say!("blk 00:{:02x}.{} write rejected (ro)", bdf.0, bdf.1);
    } else {
        if status != S_OK {
            return Err(Fail::new("virtio-blk write failed"));
        }
        if wanted & F_FLUSH != 0 {
            if request(&mut q, scratch, T_FLUSH, 0, None)? != S_OK {
                return Err(Fail::new("virtio-blk flush failed"));
            }
            say!("blk 00:{:02x}.{} flush ok", bdf.0, bdf.1);
        }
        // Not the pattern: a read that moves no data cannot match.
        for i in 0..4096u64 {
            wr(readback + i, !pattern_byte(i, index));
        }
        let through = last.as_mut().unwrap_or(&mut q);
        let through_index = through.index;
        if request(
            through,
            scratch,
            T_IN,
            PATTERN_SECTOR,
            Some((readback, 4096, true)),
        )? != S_OK
        {
            return Err(Fail::new("virtio-blk read-back failed"));
        }
        for i in 0..4096u64 {
            if rd::<u8>(readback + i) != pattern_byte(i, index) {
                return Err(Fail::at("virtio-blk read-back mismatch", i));
            }
        }
        say!(
            "blk 00:{:02x}.{} write-read ok on queue {through_index}",
            bdf.0,
            bdf.1
        );
    }
    // Let the last completion's interrupt land before counting.
    let settle = Deadline::after(SECOND);
    while irq::count_on(vector) == own_before && !settle.passed() {
        core::hint::spin_loop();
    }
    // Each counted apart: an interrupt that lands between the two reads
    // must not pass for one on another vector.
    let own = irq::count_on(vector) - own_before;
    let elsewhere = irq::count_except(vector) - elsewhere_before;
    say!(
        "blk 00:{:02x}.{} irqs {own} on vector {vector:#x}, {elsewhere} elsewhere",
        bdf.0,
        bdf.1
    );
    if extra.resize {
        watch_resize(&mut q, scratch, c, dev.device_cfg, bdf, msix)?;
    }
    // Leave the device reset so nothing writes to scratch RAM afterwards.
    dev.reset();
    Ok(())
}
