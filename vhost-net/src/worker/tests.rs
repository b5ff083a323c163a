//! The data path against virtio-queue's mock rings and an in-memory tap:
//! frames in both directions, mergeable buffers, and the malformed chains a
//! guest may post, each completed and counted without stopping the queue.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{FrameIo, Pair, RxStop, TxBudget, TxEnd, TxRing};
use crate::features::{NetConfig, MAX_FRAME};
use crate::iovec::IoVecs;

const SIZE: u16 = 16;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const W: u16 = VRING_DESC_F_WRITE as u16;
const MRG: NetConfig = NetConfig {
    hdr_len: 12,
    mrg_rxbuf: true,
};
const ONE_CHAIN: NetConfig = NetConfig {
    hdr_len: 12,
    mrg_rxbuf: false,
};

/// A tap in memory: frames to read, frames written.
#[derive(Default)]
struct MemTap {
    incoming: RefCell<VecDeque<Vec<u8>>>,
    written: RefCell<Vec<Vec<u8>>>,
    /// The next read fails with this errno.
    read_error: RefCell<Option<i32>>,
}

impl MemTap {
    fn push(&self, frame: Vec<u8>) {
        self.incoming.borrow_mut().push_back(frame);
    }
}

impl FrameIo for MemTap {
    fn read_frame(&self, iov: &IoVecs<'_>) -> io::Result<Option<usize>> {
        if let Some(errno) = self.read_error.take() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let Some(frame) = self.incoming.borrow_mut().pop_front() else {
            return Ok(None);
        };
        // Like the kernel: as much as fits, and the frame's whole length.
        iov.scatter(&frame);
        Ok(Some(frame.len()))
    }

    fn write_frame(&self, iov: &IoVecs<'_>) -> io::Result<usize> {
        let data = iov.gather();
        let n = data.len();
        self.written.borrow_mut().push(data);
        Ok(n)
    }
}

/// The driver's side of a split ring in test memory: descriptors at 0,
/// the avail ring at 0x1000, the used ring at 0x2000. (virtio-queue's
/// `MockSplitQueue` lays a 16-entry used ring over the avail ring.)
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    next_desc: u16,
    avail_idx: u16,
    last_used: u16,
}

const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> (Self, Queue) {
        // A fresh ring: zero the indices left by a previous one.
        mem.write_slice(&[0u8; 0x3000], GuestAddress(0)).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        let d = Driver {
            mem,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        };
        (d, q)
    }

    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn write_desc(&self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC + 16 * u64::from(id));
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
        self.mem.write_obj(desc, at).unwrap();
    }

    /// Writes a chain of (addr, len, flags) at the next free slots and
    /// publishes it; returns its head.
    fn add(&mut self, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let id = (head + i as u16) % SIZE;
            let last = i + 1 == bufs.len();
            let flags = if last { flags } else { flags | NEXT };
            self.write_desc(id, addr, len, flags, (id + 1) % SIZE);
        }
        self.next_desc = (head + bufs.len() as u16) % SIZE;
        self.publish(head);
        head
    }

    /// Writes raw descriptors (addr, len, flags, next) at slot `at`.. and
    /// publishes `head`.
    fn add_raw(&mut self, at: u16, descs: &[(u64, u32, u16, u16)], head: u16) {
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            self.write_desc(at + i as u16, addr, len, flags, next);
        }
        self.publish(head);
    }

    /// Used entries (id, len) since the last call.
    fn used(&mut self) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        while self.last_used != idx {
            let at = USED + 4 + 8 * u64::from(self.last_used % SIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// A frame of `len` bytes with recognisable contents.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

/// A header (12 bytes, `num_buffers` unset) followed by `frame`.
fn with_header(frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; 12];
    v[0] = 1; // NEEDS_CSUM, to see that the header passes through
    v.extend_from_slice(frame);
    v
}

#[test]
fn tx_writes_the_header_and_the_frame_in_one_write() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let data = with_header(&frame(60, 7));
    mem.write_slice(&data[..12], GuestAddress(0x10000)).unwrap();
    mem.write_slice(&data[12..], GuestAddress(0x20000)).unwrap();
    let head = d.add(&[(0x10000, 12, 0), (0x20000, 60, 0)]);
    let mut pair = Pair::new(0);
    assert_eq!(pair.tx(&tap, &mut q, &mem, MRG).unwrap(), 1);
    assert_eq!(*tap.written.borrow(), vec![data]);
    assert_eq!(d.used(), [(u32::from(head), 0)]);
    assert_eq!(pair.stats().tx_frames, 1);
}

#[test]
fn malformed_tx_chains_are_completed_empty_and_the_queue_goes_on() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let good = with_header(&frame(60, 1));
    mem.write_slice(&good, GuestAddress(0x10000)).unwrap();
    // Outside guest memory.
    d.add(&[(0x10000, 12, 0), (0x1_0000_0000, 60, 0)]);
    // A device-writable buffer in a tx chain.
    d.add(&[(0x10000, 12, 0), (0x20000, 60, W)]);
    // Longer than a frame can be.
    d.add(&[(0x10000, 12, 0), (0x20000, MAX_FRAME as u32 + 1, 0)]);
    // Empty.
    d.add(&[(0x10000, 0, 0)]);
    // A loop: 10 -> 11 -> 10.
    d.add_raw(10, &[(0x10000, 12, NEXT, 11), (0x20000, 60, NEXT, 10)], 10);
    // A head outside the queue: nothing to complete.
    d.publish(SIZE + 3);
    d.next_desc = 12;
    let head = d.add(&[(0x10000, good.len() as u32, 0)]);
    let mut pair = Pair::new(0);
    assert_eq!(pair.tx(&tap, &mut q, &mem, MRG).unwrap(), 6);
    assert_eq!(*tap.written.borrow(), vec![good]);
    let used = d.used();
    assert_eq!(used.len(), 6);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(used.last(), Some(&(u32::from(head), 0)));
    assert_eq!(pair.stats().bad_chains, 6);
    assert_eq!(pair.stats().tx_frames, 1);
}

#[test]
fn rx_fills_one_chain_per_frame_and_drops_frames_too_large_for_it() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let a = d.add(&[(0x10000, 12, W), (0x20000, 100, W)]);
    let b = d.add(&[(0x30000, 112, W)]);
    tap.push(with_header(&frame(40, 1)));
    tap.push(with_header(&frame(101, 2))); // 113 bytes: fits no chain
    tap.push(with_header(&frame(100, 3)));
    let mut pair = Pair::new(0);
    let out = pair.rx(&tap, &mut q, &mem, ONE_CHAIN).unwrap();
    assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
    assert_eq!(d.used(), [(u32::from(a), 52), (u32::from(b), 112)]);
    let mut hdr = with_header(&[]);
    hdr[10] = 1; // num_buffers
    assert_eq!(d.read(0x10000, 12), hdr);
    assert_eq!(d.read(0x20000, 40), frame(40, 1));
    assert_eq!(d.read(0x30000 + 12, 100), frame(100, 3));
    let s = pair.stats();
    assert_eq!((s.rx_frames, s.rx_dropped), (2, 1));
}

#[test]
fn rx_spreads_a_frame_over_mergeable_buffers() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let heads: Vec<u16> = (0..4u64)
        .map(|i| d.add(&[(0x10000 + i * 0x1000, 64, W)]))
        .collect();
    let data = frame(150, 9);
    tap.push(with_header(&data));
    let mut pair = Pair::new(0);
    let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    assert!(matches!(out.stop, RxStop::TapEmpty), "{out:?}");
    assert_eq!(out.used, 3);
    let ids: Vec<(u32, u32)> = heads[..3]
        .iter()
        .zip([64, 64, 34])
        .map(|(&h, l)| (u32::from(h), l))
        .collect();
    assert_eq!(d.used(), ids);
    let mut got = d.read(0x10000, 64);
    got.extend(d.read(0x11000, 64));
    got.extend(d.read(0x12000, 34));
    assert_eq!(got[10..12], 3u16.to_le_bytes(), "num_buffers");
    assert_eq!(got[12..], data[..]);

    // The fourth buffer is still held: the next frame lands in it.
    tap.push(with_header(&frame(20, 4)));
    let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    assert_eq!(out.used, 1);
    assert_eq!(d.used(), [(u32::from(heads[3]), 32)]);
}

#[test]
fn a_frame_longer_than_the_buffers_waits_for_more_with_mrg_rxbuf() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let first = d.add(&[(0x10000, 64, W)]);
    let data = frame(200, 5);
    tap.push(with_header(&data));
    let mut pair = Pair::new(0);
    let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
    assert!(d.used().is_empty());
    // The guest adds buffers and kicks.
    let more: Vec<u16> = (1..4u64)
        .map(|i| d.add(&[(0x10000 + i * 0x1000, 64, W)]))
        .collect();
    let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    // Every buffer went into the frame.
    assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
    let used = d.used();
    assert_eq!(
        used,
        [
            (u32::from(first), 64),
            (u32::from(more[0]), 64),
            (u32::from(more[1]), 64),
            (u32::from(more[2]), 20)
        ]
    );
    let mut got = Vec::new();
    for (i, len) in [64, 64, 64, 20].into_iter().enumerate() {
        got.extend(d.read(0x10000 + i as u64 * 0x1000, len));
    }
    assert_eq!(got[10..12], 4u16.to_le_bytes());
    assert_eq!(got[12..], data[..]);
}

#[test]
fn malformed_rx_chains_are_completed_empty() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let readable = d.add(&[(0x10000, 64, 0)]);
    let outside = d.add(&[(0x1_0000_0000, 64, W)]);
    let short = d.add(&[(0x10000, 8, W)]);
    let good = d.add(&[(0x20000, 64, W)]);
    tap.push(with_header(&frame(30, 1)));
    let mut pair = Pair::new(0);
    pair.rx(&tap, &mut q, &mem, ONE_CHAIN).unwrap();
    let used = d.used();
    assert_eq!(
        used,
        [
            (u32::from(readable), 0),
            (u32::from(outside), 0),
            (u32::from(short), 0),
            (u32::from(good), 42)
        ]
    );
    assert_eq!(pair.stats().bad_chains, 3);
}

#[test]
fn held_buffers_go_back_to_the_ring_when_it_stops() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    for i in 0..3u64 {
        d.add(&[(0x10000 + i * 0x1000, 2048, W)]);
    }
    let mut pair = Pair::new(0);
    // Nothing to read: the buffers are held (looked ahead), not used.
    let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    assert!(matches!(out.stop, RxStop::TapEmpty), "{out:?}");
    assert_eq!(q.next_avail(), 3);
    assert_eq!(pair.release_rx(&mut q, &mem).unwrap(), 0);
    assert_eq!(q.next_avail(), 0);
    assert!(d.used().is_empty());

    // A malformed chain completed between held ones: they are completed
    // empty rather than given back.
    let (mut d, mut q) = Driver::new(&mem);
    d.add(&[(0x10000, 2048, W)]);
    d.add(&[(0x10000, 2048, 0)]);
    d.add(&[(0x11000, 2048, W)]);
    let mut pair = Pair::new(0);
    pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    assert_eq!(d.used().len(), 1);
    assert_eq!(pair.release_rx(&mut q, &mem).unwrap(), 2);
    assert_eq!(d.used(), [(0, 0), (2, 0)]);
    assert_eq!(q.next_avail(), 3);
}

#[test]
fn a_legacy_header_has_no_num_buffers() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let legacy = NetConfig {
        hdr_len: 10,
        mrg_rxbuf: false,
    };
    mem.write_slice(&[0xee; 64], GuestAddress(0x10000)).unwrap();
    d.add(&[(0x10000, 64, W)]);
    let mut data = vec![0u8; 10];
    data.extend(frame(20, 3));
    tap.push(data.clone());
    let mut pair = Pair::new(0);
    pair.rx(&tap, &mut q, &mem, legacy).unwrap();
    assert_eq!(d.used(), [(0, 30)]);
    assert_eq!(d.read(0x10000, 30), data);
    assert_eq!(d.read(0x10000 + 30, 2), [0xee, 0xee]);
}

#[test]
fn rx_keeps_going_as_the_ring_indices_wrap() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let mut pair = Pair::new(0);
    let mut total = 0;
    for round in 0..10 {
        for i in 0..SIZE as u64 {
            d.add(&[(0x10000 + i * 0x1000, 128, W)]);
        }
        for _ in 0..SIZE {
            tap.push(with_header(&frame(50, round)));
        }
        let out = pair.rx(&tap, &mut q, &mem, ONE_CHAIN).unwrap();
        total += out.used;
    }
    assert_eq!(total, 160);
    assert_eq!(d.used().len(), 160);
}

#[test]
fn indirect_tables_are_followed_both_ways() {
    const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let data = with_header(&frame(40, 2));
    mem.write_slice(&data, GuestAddress(0x20000)).unwrap();
    // A table at 0x8000: header, then frame.
    let table = [
        Descriptor::new(0x20000, 12, NEXT, 1),
        Descriptor::new(0x20000 + 12, 40, 0, 0),
    ];
    for (i, desc) in table.into_iter().enumerate() {
        let at = GuestAddress(0x8000 + 16 * i as u64);
        mem.write_obj(RawDescriptor::from(desc), at).unwrap();
    }
    let head = d.add(&[(0x8000, 32, INDIRECT)]);
    let mut pair = Pair::new(0);
    assert_eq!(pair.tx(&tap, &mut q, &mem, MRG).unwrap(), 1);
    assert_eq!(*tap.written.borrow(), vec![data]);
    assert_eq!(d.used(), [(u32::from(head), 0)]);

    // An rx chain of two writable buffers behind a table at 0x9000.
    let (mut d, mut q) = Driver::new(&mem);
    let table = [
        Descriptor::new(0x30000, 20, W | NEXT, 1),
        Descriptor::new(0x31000, 100, W, 0),
    ];
    for (i, desc) in table.into_iter().enumerate() {
        let at = GuestAddress(0x9000 + 16 * i as u64);
        mem.write_obj(RawDescriptor::from(desc), at).unwrap();
    }
    let head = d.add(&[(0x9000, 32, INDIRECT)]);
    let incoming = with_header(&frame(50, 8));
    tap.push(incoming.clone());
    pair.rx(&tap, &mut q, &mem, ONE_CHAIN).unwrap();
    assert_eq!(d.used(), [(u32::from(head), 62)]);
    let mut got = d.read(0x30000, 20);
    got.extend(d.read(0x31000, 42));
    assert_eq!(got[12..], incoming[12..]);
}

#[test]
fn a_flood_of_frames_that_fit_nowhere_still_ends_the_call() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    d.add(&[(0x10000, 64, W)]);
    for _ in 0..200 {
        tap.push(with_header(&frame(100, 0)));
    }
    let mut pair = Pair::new(0);
    let out = pair.rx(&tap, &mut q, &mem, ONE_CHAIN).unwrap();
    assert!(matches!(out.stop, RxStop::Budget), "{out:?}");
    assert_eq!(pair.stats().rx_dropped, super::rx::BUDGET as u64);
}

#[test]
fn a_frame_larger_than_the_whole_ring_is_dropped_not_waited_for() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let heads: Vec<u16> = (0..u64::from(SIZE))
        .map(|i| d.add(&[(0x10000 + i * 0x100, 20, W)]))
        .collect();
    tap.push(with_header(&frame(400, 1)));
    tap.push(with_header(&frame(8, 2)));
    let mut pair = Pair::new(0);
    let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    assert!(matches!(out.stop, RxStop::TapEmpty), "{out:?}");
    assert_eq!(d.used(), [(u32::from(heads[0]), 20)]);
    assert_eq!(d.read(0x10000 + 12, 8), frame(8, 2));
    assert_eq!(pair.stats().rx_dropped, 1);
}

/// Every byte range a chain starting at `head` may name: its descriptors
/// as the ring holds them (following next links, at most a ring's worth),
/// and every entry of the indirect tables they point to. Ranges outside
/// memory are left out.
fn named_ranges(mem: &GuestMemoryMmap, head: u16, out: &mut Vec<(u64, u64)>) {
    const INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
    let read = |at: u64| -> Option<Descriptor> {
        mem.read_obj::<RawDescriptor>(GuestAddress(at))
            .ok()
            .map(Descriptor::from)
    };
    let mut id = head;
    for _ in 0..SIZE {
        let Some(desc) = (id < SIZE)
            .then(|| read(DESC + 16 * u64::from(id)))
            .flatten()
        else {
            return;
        };
        out.push((desc.addr().0, u64::from(desc.len())));
        if desc.flags() & INDIRECT != 0 {
            for i in 0..u64::from(desc.len() / 16).min(1024) {
                if let Some(entry) = read(desc.addr().0.wrapping_add(16 * i)) {
                    out.push((entry.addr().0, u64::from(entry.len())));
                }
            }
        }
        if desc.flags() & NEXT == 0 {
            return;
        }
        id = desc.next();
    }
}

/// Rx chains made at random, and well-formed ones with one field changed
/// (see `vhost_test_frontend::fuzz`), fed frames of every size with and
/// without mergeable buffers: the worker never fails or panics, and never
/// writes a byte of guest memory that no descriptor or indirect table
/// named.
#[test]
fn random_rx_chains_never_write_outside_what_they_name() {
    use vhost_test_frontend::fuzz::{ChainFuzzer, Target};
    use vhost_test_frontend::virtqueue::Buf;

    const CANARY: u8 = 0x5a;
    const MEM: u64 = 0x40_0000;
    const BUFFERS: u64 = 0x10000;
    for (seed, cfg) in [(1, ONE_CHAIN), (2, MRG)] {
        let mem = memory();
        let (mut d, mut q) = Driver::new(&mem);
        // Everything past the rings starts as canary.
        mem.write_slice(&vec![CANARY; (MEM - 0x3000) as usize], GuestAddress(0x3000))
            .unwrap();
        let tap = MemTap::default();
        let targets = vec![Target {
            addr: BUFFERS,
            spread: 0x4000,
        }];
        let mut fuzz = ChainFuzzer::new(seed, targets, MEM);
        let mut named = Vec::new();
        let mut pair = Pair::new(0);
        let (mut resets, mut delivered, mut bad) = (0, 0, 0);
        for i in 0..3000u64 {
            // A chain still waiting for a frame it can take: the driver
            // resets the ring (the memory stays as it is).
            if q.next_avail() != d.avail_idx {
                (d, q) = Driver::new(&mem);
                pair = Pair::new(0);
                tap.incoming.borrow_mut().clear();
                resets += 1;
            }
            let chain = if fuzz.below(3) == 0 {
                fuzz.random()
            } else {
                let first = BUFFERS + fuzz.below(32) * 0x200;
                let bufs = [
                    Buf {
                        addr: first,
                        len: 12,
                        write: true,
                    },
                    Buf {
                        addr: first + 12,
                        len: [20, 100, 1500, 2000][fuzz.below(4) as usize],
                        write: true,
                    },
                ];
                fuzz.mutated(&bufs)
            };
            let descs: Vec<(u64, u32, u16, u16)> = chain
                .iter()
                .map(|c| (c.addr, c.len, c.flags, c.next))
                .collect();
            d.add_raw(0, &descs, 0);
            named_ranges(&mem, 0, &mut named);
            let len = [14, 60, 100, 1514, 3000][fuzz.below(5) as usize];
            tap.push(with_header(&frame(len, i as u8)));
            let before = pair.stats();
            if let Err(e) = pair.rx(&tap, &mut q, &mem, cfg) {
                panic!("seed {seed} chain {i} {chain:?}: {e:?}");
            }
            let after = pair.stats();
            delivered += after.rx_frames - before.rx_frames;
            bad += after.bad_chains - before.bad_chains;
            d.used();
        }
        let mut may_change = vec![false; MEM as usize];
        may_change[..0x3000].fill(true);
        for &(addr, len) in &named {
            let end = addr.saturating_add(len).min(MEM);
            if addr < end {
                may_change[addr as usize..end as usize].fill(true);
            }
        }
        let after = d.read(0, MEM as usize);
        let strays: Vec<usize> = (0..MEM as usize)
            .filter(|&a| !may_change[a] && after[a] != CANARY)
            .take(8)
            .collect();
        assert!(
            strays.is_empty(),
            "seed {seed}: bytes no descriptor named were written, first at {strays:x?}"
        );
        eprintln!("seed {seed}: {delivered} frames delivered, {bad} bad chains, {resets} resets");
        assert!(
            delivered > 500,
            "seed {seed}: only {delivered} frames delivered"
        );
        assert!(bad > 500, "seed {seed}: only {bad} bad chains");
    }
}

/// Sets the ring's available index more than a ring ahead of the device.
fn break_avail_idx(mem: &GuestMemoryMmap) {
    mem.write_obj(SIZE + 1, GuestAddress(AVAIL + 2)).unwrap();
}

#[test]
fn tx_fails_on_an_available_index_more_than_a_ring_ahead() {
    let mem = memory();
    let (_d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    break_avail_idx(&mem);
    let mut pair = Pair::new(0);
    let result = pair.tx(&tap, &mut q, &mem, MRG);
    assert!(
        matches!(result, Err(virtio_queue::Error::InvalidAvailRingIndex)),
        "{result:?}"
    );
    assert_eq!(q.next_avail(), 0);
    assert!(tap.written.borrow().is_empty());
}

/// What `run` returns, run on another thread: a ring it spins on would
/// otherwise hang the test rather than fail it.
fn within_a_second<T: Send + 'static>(what: &str, run: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(run());
    });
    result
        .recv_timeout(std::time::Duration::from_secs(1))
        .unwrap_or_else(|_| panic!("{what} did not return within 1 s"))
}

#[test]
fn rx_fails_at_once_on_an_available_index_more_than_a_ring_ahead() {
    let out = within_a_second("rx", || {
        let mem = memory();
        let (_d, mut q) = Driver::new(&mem);
        let tap = MemTap::default();
        tap.push(with_header(&frame(60, 1)));
        break_avail_idx(&mem);
        let mut pair = Pair::new(0);
        pair.rx(&tap, &mut q, &mem, MRG).map(|o| o.used)
    });
    assert!(
        matches!(out, Err(virtio_queue::Error::InvalidAvailRingIndex)),
        "{out:?}"
    );
}

/// Moves the avail ring to the last 4 bytes of guest memory with one
/// chain announced: its index reads, its entries do not (a frontend may
/// place a ring so; only its start is checked).
fn avail_ring_at_the_end(mem: &GuestMemoryMmap, q: &mut Queue) {
    let end = mem.last_addr().0 + 1;
    q.set_avail_ring_address(Some((end - 4) as u32), Some(0));
    mem.write_obj(1u16, GuestAddress(end - 2)).unwrap();
}

#[test]
fn tx_fails_on_an_avail_entry_outside_memory() {
    let out = within_a_second("tx", || {
        let mem = memory();
        let (_d, mut q) = Driver::new(&mem);
        avail_ring_at_the_end(&mem, &mut q);
        let tap = MemTap::default();
        let mut pair = Pair::new(0);
        pair.tx(&tap, &mut q, &mem, MRG).map(|_| ())
    });
    assert!(
        matches!(out, Err(virtio_queue::Error::GuestMemory(_))),
        "{out:?}"
    );
}

#[test]
fn rx_fails_on_an_avail_entry_outside_memory_rather_than_spin() {
    let out = within_a_second("rx", || {
        let mem = memory();
        let (_d, mut q) = Driver::new(&mem);
        avail_ring_at_the_end(&mem, &mut q);
        let tap = MemTap::default();
        tap.push(with_header(&frame(60, 1)));
        let mut pair = Pair::new(0);
        pair.rx(&tap, &mut q, &mem, MRG).map(|o| o.used)
    });
    assert!(
        matches!(out, Err(virtio_queue::Error::GuestMemory(_))),
        "{out:?}"
    );
}

#[test]
fn after_a_tap_error_the_guest_is_asked_for_kicks_and_the_next_delivers() {
    for event_idx in [false, true] {
        let mem = memory();
        let (mut d, mut q) = Driver::new(&mem);
        q.set_event_idx(event_idx);
        let tap = MemTap::default();
        let heads: Vec<u16> = (0..2u64)
            .map(|i| d.add(&[(0x10000 + i * 0x1000, 2048, W)]))
            .collect();
        tap.push(with_header(&frame(60, 1)));
        *tap.read_error.borrow_mut() = Some(libc::EIO);
        let mut pair = Pair::new(0);
        let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
        assert!(matches!(out.stop, RxStop::TapError(_)), "{out:?}");
        assert!(d.used().is_empty());
        let flags: u16 = mem.read_obj(GuestAddress(USED)).unwrap();
        assert_eq!(
            flags, 0,
            "event_idx {event_idx}: VRING_USED_F_NO_NOTIFY left set"
        );
        if event_idx {
            let at = USED + 4 + 8 * u64::from(SIZE);
            let avail_event: u16 = mem.read_obj(GuestAddress(at)).unwrap();
            assert_eq!(avail_event, q.next_avail(), "avail_event");
        }
        // The guest kicks: the frame waiting in the tap arrives.
        let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
        assert!(matches!(out.stop, RxStop::TapEmpty), "{out:?}");
        assert_eq!(d.used(), [(u32::from(heads[0]), 72)]);
        assert_eq!(pair.stats().rx_frames, 1);
    }
}

/// A tx ring and the signals sent for it.
struct SignalledRing {
    q: Queue,
    signals: usize,
}

impl TxRing for SignalledRing {
    fn queue(&mut self) -> &mut Queue {
        &mut self.q
    }

    fn signal(&mut self, _mem: &GuestMemoryMmap) {
        self.signals += 1;
    }
}

/// A sender that keeps its tx ring full: each frame the tap takes is
/// replaced by a new one, `refills` times.
struct BusySender<'a> {
    tap: MemTap,
    driver: RefCell<Driver<'a>>,
    refills: std::cell::Cell<usize>,
}

impl BusySender<'_> {
    fn post(&self) {
        self.driver.borrow_mut().add(&[(0x10000, 72, 0)]);
    }
}

impl FrameIo for BusySender<'_> {
    fn read_frame(&self, iov: &IoVecs<'_>) -> io::Result<Option<usize>> {
        self.tap.read_frame(iov)
    }

    fn write_frame(&self, iov: &IoVecs<'_>) -> io::Result<usize> {
        if self.refills.get() > 0 {
            self.refills.set(self.refills.get() - 1);
            self.post();
        }
        self.tap.write_frame(iov)
    }
}

#[test]
fn a_busy_tx_ring_is_left_after_its_budget_and_the_rest_sent_next_time() {
    let mem = memory();
    mem.write_slice(&with_header(&frame(60, 3)), GuestAddress(0x10000))
        .unwrap();
    let (d, q) = Driver::new(&mem);
    let sender = BusySender {
        tap: MemTap::default(),
        driver: RefCell::new(d),
        refills: std::cell::Cell::new(1000),
    };
    for _ in 0..SIZE {
        sender.post();
    }
    let mut ring = SignalledRing { q, signals: 0 };
    let budget = TxBudget {
        chains: 40,
        time: std::time::Duration::from_secs(60),
        poll: std::time::Duration::ZERO,
    };
    let mut pair = Pair::new(0);
    let end = pair.tx_run(&sender, &mut ring, &mem, MRG, budget).unwrap();
    assert_eq!(end, TxEnd::Budget);
    // Budgets are checked between batches (of at most a ring here).
    let sent = pair.stats().tx_frames;
    assert!((40..40 + u64::from(SIZE)).contains(&sent), "{sent} sent");
    assert!(ring.signals > 0, "completions left unsignalled");
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(u64::from(used_idx), sent);
    // A ring's worth is still waiting.
    let avail_idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
    assert_eq!(avail_idx.wrapping_sub(ring.q.next_avail()), SIZE);

    // The sender stops refilling: the next call sends what is left.
    sender.refills.set(0);
    let end = pair.tx_run(&sender, &mut ring, &mem, MRG, budget).unwrap();
    assert_eq!(end, TxEnd::Idle);
    assert_eq!(pair.stats().tx_frames, sent + u64::from(SIZE));
    assert_eq!(ring.q.next_avail(), avail_idx);
    assert_eq!(
        sender.tap.written.borrow().len() as u64,
        sent + u64::from(SIZE)
    );
}

/// A tap that breaks the ring's available index (more than a ring ahead of
/// two chains taken) as it takes the second frame.
struct RingBreakingTap<'a> {
    tap: MemTap,
    mem: &'a GuestMemoryMmap,
}

impl FrameIo for RingBreakingTap<'_> {
    fn read_frame(&self, iov: &IoVecs<'_>) -> io::Result<Option<usize>> {
        self.tap.read_frame(iov)
    }

    fn write_frame(&self, iov: &IoVecs<'_>) -> io::Result<usize> {
        if self.tap.written.borrow().len() == 1 {
            self.mem
                .write_obj(SIZE + 3, GuestAddress(AVAIL + 2))
                .unwrap();
        }
        self.tap.write_frame(iov)
    }
}

/// Chains sent before the ring broke are signalled to the driver, even
/// though the run ends in an error.
#[test]
fn tx_signals_what_it_sent_before_the_ring_broke() {
    let mem = memory();
    mem.write_slice(&with_header(&frame(60, 3)), GuestAddress(0x10000))
        .unwrap();
    let (mut d, q) = Driver::new(&mem);
    d.add(&[(0x10000, 72, 0)]);
    d.add(&[(0x10000, 72, 0)]);
    let tap = RingBreakingTap {
        tap: MemTap::default(),
        mem: &mem,
    };
    let mut ring = SignalledRing { q, signals: 0 };
    let budget = TxBudget {
        chains: 1000,
        time: std::time::Duration::from_secs(60),
        poll: std::time::Duration::from_millis(1),
    };
    let mut pair = Pair::new(0);
    let result = pair.tx_run(&tap, &mut ring, &mem, MRG, budget);
    assert!(
        matches!(result, Err(virtio_queue::Error::InvalidAvailRingIndex)),
        "{result:?}"
    );
    assert_eq!(tap.tap.written.borrow().len(), 2);
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_idx, 2);
    assert!(ring.signals > 0, "the two chains sent were never signalled");
}

#[test]
fn a_frame_larger_than_the_ring_of_two_buffer_chains_is_dropped() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    // Half as many chains as the ring has descriptors: every descriptor
    // is in one.
    let heads: Vec<u16> = (0..u64::from(SIZE / 2))
        .map(|i| {
            d.add(&[
                (0x10000 + i * 0x1000, 12, W),
                (0x10800 + i * 0x1000, 100, W),
            ])
        })
        .collect();
    tap.push(with_header(&frame(2000, 1)));
    tap.push(with_header(&frame(60, 2)));
    let mut pair = Pair::new(0);
    let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    assert!(matches!(out.stop, RxStop::TapEmpty), "{out:?}");
    assert_eq!(d.used(), [(u32::from(heads[0]), 72)]);
    assert_eq!(d.read(0x10800, 60), frame(60, 2));
    let s = pair.stats();
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
}

/// The frame read last in a call's budget may be waiting for buffers (its
/// tail in the overflow area, no longer in the tap): the call asks the
/// guest for a kick rather than end on the budget, which only the tap's
/// readiness would have brought the worker back from.
#[test]
fn a_frame_waiting_for_buffers_at_the_end_of_the_budget_is_not_left_behind() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    let first: Vec<u16> = (0..2u64)
        .map(|i| d.add(&[(0x10000 + i * 0x1000, 64, W)]))
        .collect();
    // Reads the budget counts, each dropped: shorter than a header.
    for _ in 0..super::rx::BUDGET - 1 {
        tap.push(vec![0u8; 4]);
    }
    let data = frame(200, 3);
    tap.push(with_header(&data));
    let mut pair = Pair::new(0);
    let out = pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    assert!(matches!(out.stop, RxStop::NoBuffers), "{out:?}");
    assert!(d.used().is_empty());
    let more: Vec<u16> = (2..4u64)
        .map(|i| d.add(&[(0x10000 + i * 0x1000, 64, W)]))
        .collect();
    pair.rx(&tap, &mut q, &mem, MRG).unwrap();
    let heads: Vec<u32> = d.used().iter().map(|&(head, _)| head).collect();
    let expected: Vec<u32> = first.iter().chain(&more).map(|&h| u32::from(h)).collect();
    assert_eq!(heads, expected);
    let mut got = Vec::new();
    for (i, len) in [64, 64, 64, 20].into_iter().enumerate() {
        got.extend(d.read(0x10000 + i as u64 * 0x1000, len));
    }
    assert_eq!(got[12..], data[..]);
}

/// A guest that keeps offering malformed rx chains cannot keep the worker
/// (and the locks a stopping frontend needs) in one call: after a ring's
/// worth the call ends, and the next one goes on.
#[test]
fn a_ring_of_malformed_rx_chains_ends_the_call() {
    let mem = memory();
    let (mut d, mut q) = Driver::new(&mem);
    let tap = MemTap::default();
    for i in 0..u64::from(SIZE) {
        // Readable, where rx needs writable buffers.
        d.add(&[(0x10000 + i * 0x100, 64, 0)]);
    }
    tap.push(with_header(&frame(30, 1)));
    let mut pair = Pair::new(0);
    let out = pair.rx(&tap, &mut q, &mem, ONE_CHAIN).unwrap();
    assert!(matches!(out.stop, RxStop::Malformed), "{out:?}");
    assert_eq!(pair.stats().bad_chains, u64::from(SIZE));
    assert_eq!(d.used().len(), usize::from(SIZE));
    let good = d.add(&[(0x20000, 64, W)]);
    pair.rx(&tap, &mut q, &mem, ONE_CHAIN).unwrap();
    assert_eq!(d.used(), [(u32::from(good), 42)]);
}
