//! One virtio-blk request: parse a descriptor chain, run it against the
//! disk, write the status byte. Knows nothing of sockets or threads; every
//! malformed request ends in a status (or, with no status byte to write, in
//! an empty completion), never a panic.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::block_writes::WriteClaim;
use crate::config::SERIAL_LEN;
use crate::disk::{AsyncClaim, Disk};

pub const SECTOR_SIZE: u64 = 512;
/// Largest discard or write-zeroes request, in sectors.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Data segments per request the device advertises (VIRTIO_BLK_F_SEG_MAX).
pub const SEG_MAX: u32 = 126;
const HEADER_LEN: u32 = 16;
/// The longest chain taken: SEG_MAX data segments, a header a driver may
/// spread over as many descriptors as it has bytes, and the status byte
/// (VIRTIO 1.x allows any layout; SEG_MAX counts data segments only). A
/// longer chain (empty descriptors in the header, say) gets IOERR.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + HEADER_LEN as usize + 1;
const DISCARD_SEGMENT_LEN: u64 = 16;
const WRITE_ZEROES_UNMAP: u32 = 1;

/// What requests run against.
pub struct BlkTarget {
    pub disk: Arc<dyn Disk>,
    pub readonly: bool,
    pub serial: [u8; SERIAL_LEN],
}

enum Failure {
    IoErr,
    Unsupported,
}

impl Failure {
    fn status(&self) -> u8 {
        match self {
            Failure::IoErr => VIRTIO_BLK_S_IOERR as u8,
            Failure::Unsupported => VIRTIO_BLK_S_UNSUPP as u8,
        }
    }
}

/// A read or write whose transfer the caller runs asynchronously (io_uring),
/// then reports with `finish`.
pub struct PendingIo {
    pub write: bool,
    pub offset: u64,
    /// Guest buffers, as host addresses in this process's mapping.
    pub iovecs: Vec<libc::iovec>,
    pub len: u32,
    status_addr: u64,
    /// A write's blocks, held until it completes (see `BlockWrites`).
    blocks: Option<WriteClaim>,
}

impl PendingIo {
    /// Lets go of the write's blocks before the transfer is done with.
    pub fn release_blocks(&mut self) {
        self.blocks = None;
    }
}

// SAFETY: the iovecs point into guest memory, which stays mapped while a
// transfer may use them: the queue keeps the memory (an Arc) with every
// transfer in flight, and nothing reads the iovecs once it has completed.
// A PendingIo moves between the queue's worker and the thread that stops
// the queue, always under the queue's mutex.
unsafe impl Send for PendingIo {}

#[cfg(test)]
impl PendingIo {
    /// A transfer of `len` bytes at host address `buf` (no status byte).
    pub fn for_test(write: bool, offset: u64, buf: *mut u8, len: u32) -> Self {
        PendingIo {
            write,
            offset,
            iovecs: vec![libc::iovec {
                iov_base: buf.cast(),
                iov_len: len as usize,
            }],
            len,
            status_addr: 0,
            blocks: None,
        }
    }
}

/// Linux's MAX_RW_COUNT: the most one read or write system call moves.
const MAX_ASYNC_TRANSFER: u64 = 0x7fff_f000;
/// Linux's IOV_MAX: the most pieces one readv or writev takes.
const MAX_IOVECS: usize = 1024;

pub enum Parsed<'a> {
    /// The request is complete (status written); the used length.
    Done(u32),
    /// The data transfer is left to the caller.
    Io(PendingIo),
    /// The caller runs it with `SyncRequest::run`.
    Sync(SyncRequest<'a>),
}

/// Room for one chain's descriptors, reused from request to request.
pub struct ChainBuf([Descriptor; MAX_DESCRIPTORS]);

impl ChainBuf {
    pub fn new() -> Self {
        ChainBuf([Descriptor::new(0, 0, 0, 0); MAX_DESCRIPTORS])
    }
}

/// A well-formed chain to run synchronously: its header and its data
/// descriptors.
pub struct SyncRequest<'a> {
    header: Header,
    data: &'a [Descriptor],
    status_addr: u64,
}

impl SyncRequest<'_> {
    /// Whether it may change the disk (a write, discard or write-zeroes):
    /// then it may wait for blocks, which its queue's own writes in flight
    /// must not hold (see `BlockWrites`).
    pub fn changes_disk(&self) -> bool {
        matches!(
            self.header.kind,
            VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES
        )
    }

    /// Runs it and writes its status; returns the used length.
    pub fn run(&self, target: &BlkTarget, mem: &GuestMemoryMmap) -> u32 {
        let (status, written) = match run(target, mem, &self.header, self.data) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(failure) => (failure.status(), 0),
        };
        complete(mem, self.status_addr, status, written)
    }
}

/// Writes the status byte; returns the used length (0 when the status
/// byte is outside guest memory).
fn complete(mem: &GuestMemoryMmap, status_addr: u64, status: u8, written: u32) -> u32 {
    if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
        log::debug!("status byte at {status_addr:#x} is outside guest memory");
        return 0;
    }
    written.saturating_add(1)
}

/// Executes the request made of `descriptors` synchronously; returns the
/// number of bytes written to device-writable buffers (the used length).
#[cfg(test)]
pub fn execute(
    target: &BlkTarget,
    mem: &GuestMemoryMmap,
    descriptors: impl Iterator<Item = Descriptor>,
) -> u32 {
    match parse(target, mem, descriptors, false, &mut ChainBuf::new()) {
        Parsed::Done(used) => used,
        Parsed::Sync(request) => request.run(target, mem),
        // Unreachable with `allow_async` false; complete it as failed.
        Parsed::Io(io) => finish(mem, &io, false),
    }
}

/// Writes the status of an asynchronous transfer; returns the used length.
pub fn finish(mem: &GuestMemoryMmap, io: &PendingIo, ok: bool) -> u32 {
    let status = if ok {
        VIRTIO_BLK_S_OK
    } else {
        VIRTIO_BLK_S_IOERR
    } as u8;
    if mem.write_obj(status, GuestAddress(io.status_addr)).is_err() {
        return 0;
    }
    if ok && !io.write {
        io.len + 1
    } else {
        1
    }
}

/// Parses the request: a malformed one is completed with its status; with
/// `allow_async`, plain reads and writes the disk can take asynchronously
/// are handed back as `Parsed::Io`; the rest as `Parsed::Sync`.
pub fn parse<'a>(
    target: &BlkTarget,
    mem: &GuestMemoryMmap,
    descriptors: impl Iterator<Item = Descriptor>,
    allow_async: bool,
    buf: &'a mut ChainBuf,
) -> Parsed<'a> {
    let descs = &mut buf.0;
    let mut count = 0;
    // Past the limit, only the last descriptor is kept: it holds the
    // status byte the refusal goes to. (The chain iterator ends loops.)
    let mut beyond_limit = None;
    for desc in descriptors {
        if count == MAX_DESCRIPTORS {
            beyond_limit = Some(desc);
        } else {
            descs[count] = desc;
            count += 1;
        }
    }
    let too_many = beyond_limit.is_some();
    if let Some(last) = beyond_limit {
        descs[count - 1] = last;
    }
    let descs = &mut descs[..count];
    // The status byte is the last byte of the last, device-writable descriptor.
    let Some(status_desc) = descs
        .last()
        .copied()
        .filter(|d| d.is_write_only() && d.len() >= 1)
    else {
        log::debug!("request without a status byte dropped");
        return Parsed::Done(0);
    };
    let Some(status_addr) = status_desc
        .addr()
        .0
        .checked_add(u64::from(status_desc.len()) - 1)
    else {
        return Parsed::Done(0);
    };
    let within_limit = |data: &std::ops::Range<usize>| !too_many && data.len() <= SEG_MAX as usize;
    let Some((header, data)) = split_layout(mem, descs).filter(|(_, data)| within_limit(data))
    else {
        return Parsed::Done(complete(mem, status_addr, VIRTIO_BLK_S_IOERR as u8, 0));
    };
    if allow_async {
        if let Some(mut io) = async_transfer(target, mem, &header, &descs[data.clone()]) {
            io.status_addr = status_addr;
            return Parsed::Io(io);
        }
    }
    let descs: &'a [Descriptor] = descs;
    Parsed::Sync(SyncRequest {
        header,
        data: &descs[data],
        status_addr,
    })
}

/// A request's header: its type and first sector (the reserved word
/// between them is ignored).
#[derive(Clone, Copy)]
struct Header {
    kind: u32,
    sector: u64,
}

impl Header {
    fn from_bytes(bytes: &[u8; HEADER_LEN as usize]) -> Self {
        let mut kind = [0u8; 4];
        let mut sector = [0u8; 8];
        kind.copy_from_slice(&bytes[..4]);
        sector.copy_from_slice(&bytes[8..]);
        Header {
            kind: u32::from_le_bytes(kind),
            sector: u64::from_le_bytes(sector),
        }
    }
}

/// A discard or write-zeroes segment.
struct Segment {
    sector: u64,
    count: u32,
    flags: u32,
}

impl Segment {
    fn from_bytes(bytes: &[u8; DISCARD_SEGMENT_LEN as usize]) -> Self {
        let mut sector = [0u8; 8];
        let mut num = [0u8; 4];
        let mut flags = [0u8; 4];
        sector.copy_from_slice(&bytes[..8]);
        num.copy_from_slice(&bytes[8..12]);
        flags.copy_from_slice(&bytes[12..]);
        Segment {
            sector: u64::from_le_bytes(sector),
            count: u32::from_le_bytes(num),
            flags: u32::from_le_bytes(flags),
        }
    }
}

/// Splits a chain into its header and the data between the header and the
/// status byte, whatever the layout (VIRTIO 1.x lets a driver spread the
/// header over several descriptors and share one between the header and
/// data, or data and the status): the header is the first 16 bytes of the
/// chain, in device-readable descriptors, the status the last byte of the
/// last descriptor, and the data what lies between. The descriptors that
/// hold both are trimmed in place to their data, which is `descs[range]`.
/// None when the header is short, unreadable or device-writable, or the
/// chain has one descriptor.
fn split_layout(
    mem: &GuestMemoryMmap,
    descs: &mut [Descriptor],
) -> Option<(Header, std::ops::Range<usize>)> {
    let count = descs.len();
    let last = *descs.last()?;
    if count < 2 {
        return None;
    }
    descs[count - 1] = Descriptor::new(last.addr().0, last.len() - 1, last.flags(), 0);
    let mut bytes = [0u8; HEADER_LEN as usize];
    let mut filled = 0usize;
    let mut start = 0;
    while filled < bytes.len() {
        // The last descriptor is device-writable: the header never reaches it.
        let d = descs[start];
        if d.is_write_only() {
            return None;
        }
        let n = (bytes.len() - filled).min(d.len() as usize);
        mem.read_slice(&mut bytes[filled..filled + n], d.addr())
            .ok()?;
        filled += n;
        if n == d.len() as usize {
            start += 1;
        } else {
            let rest = d.addr().0.checked_add(n as u64)?;
            descs[start] = Descriptor::new(rest, d.len() - n as u32, d.flags(), 0);
        }
    }
    let end = count - usize::from(descs[count - 1].len() == 0);
    Some((Header::from_bytes(&bytes), start..end.max(start)))
}

/// A well-formed IN or OUT the disk can run asynchronously: its iovecs.
/// Anything else (or any doubt) returns None and runs synchronously, where
/// errors get their status.
fn async_transfer(
    target: &BlkTarget,
    mem: &GuestMemoryMmap,
    header: &Header,
    data: &[Descriptor],
) -> Option<PendingIo> {
    let align = target.disk.async_alignment()?;
    if data.is_empty() {
        return None;
    }
    let write = match header.kind {
        VIRTIO_BLK_T_IN => false,
        VIRTIO_BLK_T_OUT if !target.readonly => true,
        _ => return None,
    };
    let mut iovecs = Vec::with_capacity(data.len());
    let mut total = 0u64;
    for d in data {
        if d.is_write_only() == write {
            return None;
        }
        // A buffer may cross from one memory region into the next: one
        // iovec per piece.
        for slice in mem.get_slices(d.addr(), d.len() as usize) {
            let slice = slice.ok()?;
            let base = slice.ptr_guard_mut().as_ptr();
            if base as u64 % align.memory != 0 || slice.len() as u64 % align.offset != 0 {
                return None;
            }
            iovecs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: slice.len(),
            });
        }
        total += u64::from(d.len());
    }
    // One readv or writev takes at most IOV_MAX pieces.
    if iovecs.len() > MAX_IOVECS {
        return None;
    }
    // One readv or writev moves at most MAX_RW_COUNT bytes; a longer
    // request goes through the synchronous path, which loops.
    if total % SECTOR_SIZE != 0 || total > MAX_ASYNC_TRANSFER {
        return None;
    }
    let offset = disk_range(target, header.sector, total).ok()?;
    if offset % align.offset != 0 {
        return None;
    }
    let blocks = if write {
        match target.disk.claim_async_write(offset, total) {
            AsyncClaim::NotNeeded => None,
            AsyncClaim::Held(claim) => Some(claim),
            AsyncClaim::Busy => return None,
        }
    } else {
        None
    };
    Some(PendingIo {
        write,
        offset,
        iovecs,
        len: total as u32,
        status_addr: 0,
        blocks,
    })
}

/// Checks that `len` bytes at sector `sector` lie on the disk; returns the
/// byte offset.
fn disk_range(target: &BlkTarget, sector: u64, len: u64) -> Result<u64, Failure> {
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Failure::IoErr)?;
    let end = offset.checked_add(len).ok_or(Failure::IoErr)?;
    if end > target.disk.size() {
        return Err(Failure::IoErr);
    }
    Ok(offset)
}

fn run(
    target: &BlkTarget,
    mem: &GuestMemoryMmap,
    header: &Header,
    data: &[Descriptor],
) -> Result<u32, Failure> {
    let Header { kind, sector } = *header;
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            if write && target.readonly {
                return Err(Failure::IoErr);
            }
            let mut total = 0u64;
            for d in data {
                // Reads fill device-writable buffers; writes take readable ones.
                if d.is_write_only() == write {
                    return Err(Failure::IoErr);
                }
                total += u64::from(d.len());
            }
            if total % SECTOR_SIZE != 0 {
                return Err(Failure::IoErr);
            }
            let mut offset = disk_range(target, sector, total)?;
            for d in data {
                for slice in mem.get_slices(d.addr(), d.len() as usize) {
                    let slice = slice.map_err(|_| Failure::IoErr)?;
                    let result = if write {
                        target.disk.write_at(offset, &slice)
                    } else {
                        target.disk.read_at(offset, &slice)
                    };
                    result.map_err(|e| {
                        log::warn!("I/O error at byte {offset}: {e}");
                        Failure::IoErr
                    })?;
                    offset += slice.len() as u64;
                }
            }
            // The used length is 32 bits: a read of 4 GiB or more (from
            // overlapping buffers) reports as much as it can.
            Ok(if write {
                0
            } else {
                u32::try_from(total).unwrap_or(u32::MAX - 1)
            })
        }
        VIRTIO_BLK_T_FLUSH => {
            target.disk.flush().map_err(|e| {
                log::warn!("flush failed: {e}");
                Failure::IoErr
            })?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            if data.is_empty() {
                return Err(Failure::IoErr);
            }
            scatter(mem, data, &target.serial)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if target.readonly {
                return Err(Failure::IoErr);
            }
            // Whole segments, however the driver laid them out; one per
            // request (max_discard_seg = 1).
            let len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
            if len == 0 || len % DISCARD_SEGMENT_LEN != 0 {
                return Err(Failure::IoErr);
            }
            if len > DISCARD_SEGMENT_LEN {
                return Err(Failure::Unsupported);
            }
            let mut bytes = [0u8; DISCARD_SEGMENT_LEN as usize];
            gather(mem, data, &mut bytes)?;
            let segment = Segment::from_bytes(&bytes);
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            // Flags first: an unknown flag is unsupported whatever the range.
            let known = if discard { 0 } else { WRITE_ZEROES_UNMAP };
            if segment.flags & !known != 0 {
                return Err(Failure::Unsupported);
            }
            // The limit the config space gives (max_discard_sectors,
            // max_write_zeroes_sectors): one request never holds the queue
            // (and its blocks) for the whole disk.
            if segment.count > MAX_DISCARD_SECTORS {
                return Err(Failure::IoErr);
            }
            let len = u64::from(segment.count) * SECTOR_SIZE;
            let offset = disk_range(target, segment.sector, len)?;
            let result = if discard {
                target.disk.discard(offset, len)
            } else {
                target
                    .disk
                    .write_zeroes(offset, len, segment.flags & WRITE_ZEROES_UNMAP != 0)
            };
            result.map_err(|e| {
                let what = if discard { "discard" } else { "write-zeroes" };
                log::warn!("{what} of {len} bytes at byte {offset} failed: {e}");
                Failure::IoErr
            })?;
            Ok(0)
        }
        _ => Err(Failure::Unsupported),
    }
}

/// Fills `bytes` from the device-readable descriptors `data`, in order
/// (they hold exactly `bytes.len()` bytes).
fn gather(mem: &GuestMemoryMmap, data: &[Descriptor], bytes: &mut [u8]) -> Result<(), Failure> {
    let mut filled = 0;
    for d in data {
        if d.is_write_only() {
            return Err(Failure::IoErr);
        }
        let n = d.len() as usize;
        let piece = bytes.get_mut(filled..filled + n).ok_or(Failure::IoErr)?;
        mem.read_slice(piece, d.addr())
            .map_err(|_| Failure::IoErr)?;
        filled += n;
    }
    Ok(())
}

/// Writes as much of `bytes` as the device-writable descriptors `data`
/// hold, in order; returns how much that is.
fn scatter(mem: &GuestMemoryMmap, data: &[Descriptor], bytes: &[u8]) -> Result<u32, Failure> {
    let mut written = 0;
    for d in data {
        if !d.is_write_only() {
            return Err(Failure::IoErr);
        }
        if written == bytes.len() {
            break;
        }
        let n = (d.len() as usize).min(bytes.len() - written);
        mem.write_slice(&bytes[written..written + n], d.addr())
            .map_err(|_| Failure::IoErr)?;
        written += n;
    }
    Ok(written as u32)
}
