//! Disks: what the request worker reads and writes. Knows nothing of virtio.
//!
//! `RawFile` serves a raw image with positioned reads and writes straight
//! into guest memory (no copy), O_DIRECT on request (aligned to what the
//! file system asks for; unaligned transfers go through a bounded aligned
//! bounce buffer, read-modify-writes holding their blocks alone), and QEMU's
//! advisory locks (`image_lock`), so no writer opens an image another
//! process uses, nor anyone an image another process writes. `MemDisk` is for
//! tests.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(test)]
use std::sync::Mutex;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::VolatileSlice;

use crate::block_writes::{BlockWrites, WriteClaim};
use crate::image_lock::{self, Conflict, LockError};

/// A guest buffer.
pub type GuestBuf<'a> = VolatileSlice<'a, ()>;

pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads the size again (the image was grown or shrunk in place) and
    /// serves that from now on; returns the sizes before and after. A size
    /// the disk cannot serve is an error, and the old one stays.
    fn refresh_size(&self) -> Result<(u64, u64), DiskError> {
        Ok((self.size(), self.size()))
    }
    /// Fills `buf` from `offset` (the caller checked the range).
    fn read_at(&self, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()>;
    /// Writes `buf` at `offset` (the caller checked the range).
    fn write_at(&self, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// Deallocates the range; it may read back as anything (zeroes here).
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the range read as zeroes, deallocating it when `unmap`.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// The file descriptor for asynchronous reads and writes (io_uring), if
    /// the disk has one.
    fn async_fd(&self) -> Option<i32> {
        None
    }
    /// The transfer size and alignment the disk serves best (bytes, a
    /// power of two): smaller or unaligned writes cost it a
    /// read-modify-write.
    fn preferred_block(&self) -> u64 {
        512
    }
    /// The alignment asynchronous I/O needs, or None when the disk has no
    /// asynchronous path.
    fn async_alignment(&self) -> Option<Alignment> {
        None
    }
    /// Claims the range for an asynchronous write, which holds the claim
    /// until it completes. Never waits: Busy if a read-modify-write holds
    /// or waits for the range (the write then goes the synchronous way,
    /// which completes the queue's transfers before it waits).
    fn claim_async_write(&self, _offset: u64, _len: u64) -> AsyncClaim {
        AsyncClaim::NotNeeded
    }
}

/// A discard only allows the device to free the range: one the file system
/// or device cannot punch holes in is still done. So is one a block device
/// refuses (EINVAL) for not being aligned to its logical blocks, larger
/// than the 512 bytes the image is opened with when it is not O_DIRECT.
fn advisory(punched: io::Result<()>) -> io::Result<()> {
    match punched {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
            log::debug!("discard: {e}; the range stays allocated");
            Ok(())
        }
        other => other,
    }
}

/// The blocks an asynchronous write asked for.
pub enum AsyncClaim {
    /// The disk has no blocks to claim (no O_DIRECT).
    NotNeeded,
    Held(WriteClaim),
    /// Another write has them, or waits for them, alone.
    Busy,
}

/// What an O_DIRECT transfer must be aligned to, in bytes (powers of two):
/// each buffer's address to `memory`, each buffer's length and the file
/// offset to `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alignment {
    pub memory: u64,
    pub offset: u64,
}

impl Alignment {
    /// For a file system that cannot say: a page, which every one takes.
    const FALLBACK: Alignment = Alignment {
        memory: 4096,
        offset: 4096,
    };

    /// What the kernel reports for `file` (statx STATX_DIOALIGN, Linux
    /// 6.1; for a block device on older kernels, its logical block size),
    /// or a page.
    fn of(file: &File) -> Alignment {
        // SAFETY: `statx` is plain old data; all zeroes is a valid value.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: an empty path with AT_EMPTY_PATH names the descriptor
        // itself; the kernel writes at most one `statx` into `stx`.
        let rc = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
            if stx.stx_dio_offset_align == 0 {
                // The file system takes O_DIRECT on this file as buffered
                // I/O (an ext4 file with data journaling, say): any
                // sector-aligned transfer works.
                log::warn!("--direct: the file system does not do O_DIRECT on this file; it buffers its I/O");
                return Alignment {
                    memory: 512,
                    offset: 512,
                };
            }
            let found = Alignment {
                memory: u64::from(stx.stx_dio_mem_align.max(1)),
                offset: u64::from(stx.stx_dio_offset_align),
            };
            if found.memory.is_power_of_two() && found.offset.is_power_of_two() {
                return found;
            }
        }
        let is_block_device = file
            .metadata()
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()));
        if is_block_device {
            let mut block_size: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int into `block_size`.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut block_size) };
            if let Ok(size) = u64::try_from(block_size) {
                if rc == 0 && size.is_power_of_two() {
                    return Alignment {
                        memory: size,
                        offset: size,
                    };
                }
            }
        }
        Alignment::FALLBACK
    }
}

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("--image {0:?}: cannot open")]
    Open(PathBuf, #[source] io::Error),
    #[error("--image {0:?}: locked: {1} (a vhost-blk, QEMU or qemu-storage-daemon)")]
    Locked(PathBuf, Conflict),
    #[error("--image {0:?}: cannot lock")]
    Lock(PathBuf, #[source] io::Error),
    #[error("--image {0:?}: size {1} is not a multiple of 512 bytes")]
    Size(PathBuf, u64),
    #[error("--image {0:?}: size {1} is not a multiple of {2} bytes, the file's O_DIRECT block size (--direct)")]
    DirectSize(PathBuf, u64, u64),
    #[error("--image {0:?}: cannot read its size")]
    ReadSize(PathBuf, #[source] io::Error),
}

/// How long a lock held by someone else is waited for: a backend killed
/// with transfers in flight keeps its image open, and so locked, until the
/// kernel has finished them, a little after the process is gone.
const LOCK_GRACE: Duration = Duration::from_secs(2);
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// Takes the image's locks (see `image_lock`), waiting up to LOCK_GRACE
/// for a holder to let go of them.
fn lock(file: &File, writable: bool, path: &Path) -> Result<(), DiskError> {
    let deadline = Instant::now() + LOCK_GRACE;
    let mut logged = false;
    loop {
        let conflict = match image_lock::lock(file, writable) {
            Ok(()) => return Ok(()),
            Err(LockError::Io(e)) => return Err(DiskError::Lock(path.to_path_buf(), e)),
            Err(LockError::Conflict(conflict)) => conflict,
        };
        if Instant::now() >= deadline {
            return Err(DiskError::Locked(path.to_path_buf(), conflict));
        }
        if !logged {
            log::info!(
                "--image {path:?} is locked; waiting up to {LOCK_GRACE:?} in case its holder is a backend that just died"
            );
            logged = true;
        }
        std::thread::sleep(LOCK_RETRY);
    }
}

/// The end, not the metadata's length: a block device has none.
fn end_of(file: &File) -> io::Result<u64> {
    // Transfers are positioned (pread, pwrite, io_uring), so moving the
    // file's offset here disturbs none of them.
    let mut file = file;
    file.seek(SeekFrom::End(0))
}

/// Whether the disk can serve an image of `size` bytes: whole sectors and,
/// with O_DIRECT, whole blocks (a block past the end could only be written
/// by growing the file).
fn check_size(path: &Path, size: u64, direct: Option<Alignment>) -> Result<(), DiskError> {
    if size % 512 != 0 {
        return Err(DiskError::Size(path.to_path_buf(), size));
    }
    match direct {
        Some(align) if size % align.offset != 0 => Err(DiskError::DirectSize(
            path.to_path_buf(),
            size,
            align.offset,
        )),
        _ => Ok(()),
    }
}

/// The most an unaligned O_DIRECT transfer bounces at a time.
const BOUNCE_WINDOW: u64 = 1 << 20;

pub struct RawFile {
    file: File,
    path: PathBuf,
    /// In bytes; changes only when the image is resized (`refresh_size`).
    size: AtomicU64,
    /// With O_DIRECT, its alignment.
    direct: Option<Alignment>,
    /// With O_DIRECT, the blocks each write holds: a read-modify-write
    /// must not write back a block as it was before another write to it.
    writes: Arc<BlockWrites>,
}

impl RawFile {
    pub fn open(path: &Path, readonly: bool, direct: bool) -> Result<Self, DiskError> {
        let mut options = OpenOptions::new();
        options.read(true).write(!readonly);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options
            .open(path)
            .map_err(|e| DiskError::Open(path.to_path_buf(), e))?;
        lock(&file, !readonly, path)?;
        let size = end_of(&file).map_err(|e| DiskError::Open(path.to_path_buf(), e))?;
        let direct = direct.then(|| Alignment::of(&file));
        if let Some(align) = direct {
            log::debug!(
                "--direct: transfers aligned to {} bytes in the file, {} in memory",
                align.offset,
                align.memory
            );
        }
        check_size(path, size, direct)?;
        Ok(RawFile {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            writes: BlockWrites::new(direct.map_or(SECTOR, |a| a.offset)),
            direct,
        })
    }

    /// Serves O_DIRECT with a coarser alignment than the file system's
    /// (tests of the read-modify-write path).
    #[cfg(test)]
    fn with_alignment(mut self, align: Alignment) -> Self {
        self.direct = Some(align);
        self.writes = BlockWrites::new(align.offset);
        self
    }

    /// The O_DIRECT alignment `offset` and `buf` miss, or None when they
    /// can go to the file as they are.
    fn misaligned(&self, offset: u64, buf: &GuestBuf<'_>) -> Option<Alignment> {
        let align = self.direct?;
        let addr = buf.ptr_guard().as_ptr() as u64;
        let ok = addr % align.memory == 0
            && buf.len() as u64 % align.offset == 0
            && offset % align.offset == 0;
        (!ok).then_some(align)
    }

    /// With O_DIRECT, the blocks of a plain write (see `BlockWrites`).
    fn claim_write(&self, offset: u64, len: u64) -> Option<WriteClaim> {
        self.direct.map(|_| self.writes.write(offset, len))
    }

    /// With O_DIRECT, the blocks of a read-modify-write, a discard or
    /// write-zeroes, alone.
    fn claim_alone(&self, offset: u64, len: u64) -> Option<WriteClaim> {
        self.direct
            .map(|_| self.writes.read_modify_write(offset, len))
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc =
            unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, offset as i64, len as i64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// An aligned heap buffer for O_DIRECT transfers of unaligned guest buffers.
struct Bounce {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Bounce {
    /// At least `len` zeroed bytes, a whole number of `align` blocks, at an
    /// address aligned to `align`.
    fn new(len: usize, align: usize) -> io::Result<Self> {
        let size = len.next_multiple_of(align).max(align);
        let layout = std::alloc::Layout::from_size_align(size, align)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(Bounce { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
}

/// Runs a positioned transfer until `len` bytes moved (a read past the end
/// of the file is an `UnexpectedEof` error).
///
/// # Safety
/// `ptr` must be valid for reads (Op::Write) or writes (Op::Read) of `len`
/// bytes for the whole call.
unsafe fn transfer(fd: i32, op: Op, ptr: *mut u8, len: usize, offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let at = ptr.wrapping_add(done);
        let pos = (offset + done as u64) as i64;
        // SAFETY: `at..at + (len - done)` lies inside the caller's buffer,
        // valid for this access per the function's contract.
        let n = unsafe {
            match op {
                Op::Read => libc::pread64(fd, at.cast(), len - done, pos),
                Op::Write => libc::pwrite64(fd, at.cast_const().cast(), len - done, pos),
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        done += n as usize;
    }
    Ok(())
}

/// A read that may stop at the end of the file (the tail stays zero).
fn eof_ok(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        other => other,
    }
}

/// The bounce buffer's alignment: what both the memory and the file ask.
fn bounce_align(align: Alignment) -> usize {
    align.memory.max(align.offset) as usize
}

/// The bounce buffer an unaligned transfer of `len` bytes at `offset`
/// needs: its first window.
fn window_len(offset: u64, len: usize, align: Alignment) -> usize {
    Windows::new(offset, len, align)
        .next()
        .map_or(0, |w| w.span)
}

/// One step of an unaligned transfer: `len` bytes of the guest buffer from
/// `done` land at `head` in an aligned span of the file of `span` bytes
/// from `start`.
#[derive(Debug, PartialEq)]
struct Window {
    done: usize,
    len: usize,
    start: u64,
    head: usize,
    span: usize,
}

/// Splits an unaligned transfer into spans of whole blocks of at most
/// BOUNCE_WINDOW bytes (or one block, if larger), so a long transfer
/// bounces through a bounded buffer.
struct Windows {
    offset: u64,
    len: usize,
    done: usize,
    block: u64,
    window: u64,
}

impl Windows {
    fn new(offset: u64, len: usize, align: Alignment) -> Self {
        let block = align.offset;
        Windows {
            offset,
            len,
            done: 0,
            block,
            window: BOUNCE_WINDOW.max(block),
        }
    }
}

impl Iterator for Windows {
    type Item = Window;

    fn next(&mut self) -> Option<Window> {
        if self.done >= self.len {
            return None;
        }
        let pos = self.offset + self.done as u64;
        let head = pos % self.block;
        let len = ((self.len - self.done) as u64).min(self.window - head);
        let span = (head + len).next_multiple_of(self.block);
        let w = Window {
            done: self.done,
            len: len as usize,
            start: pos - head,
            head: head as usize,
            span: span as usize,
        };
        self.done += len as usize;
        Some(w)
    }
}

impl Disk for RawFile {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn refresh_size(&self) -> Result<(u64, u64), DiskError> {
        let new = end_of(&self.file).map_err(|e| DiskError::ReadSize(self.path.clone(), e))?;
        check_size(&self.path, new, self.direct)?;
        Ok((self.size.swap(new, Ordering::AcqRel), new))
    }

    fn read_at(&self, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let Some(align) = self.misaligned(offset, buf) else {
            let guard = buf.ptr_guard_mut();
            // SAFETY: the guard keeps the guest buffer of `buf.len()` bytes
            // mapped and writable for the call.
            return unsafe { transfer(fd, Op::Read, guard.as_ptr(), buf.len(), offset) };
        };
        let mut bounce = Bounce::new(window_len(offset, buf.len(), align), bounce_align(align))?;
        for w in Windows::new(offset, buf.len(), align) {
            // What a read that stops at the end of the file leaves is zero,
            // not the last window's bytes.
            bounce.as_mut_slice()[..w.span].fill(0);
            // SAFETY: the bounce buffer owns at least `w.span` writable bytes.
            eof_ok(unsafe { transfer(fd, Op::Read, bounce.ptr, w.span, w.start) })?;
            buf.subslice(w.done, w.len)
                .map_err(io::Error::other)?
                .copy_from(&bounce.as_mut_slice()[w.head..w.head + w.len]);
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let Some(align) = self.misaligned(offset, buf) else {
            let _blocks = self.claim_write(offset, buf.len() as u64);
            let guard = buf.ptr_guard();
            // SAFETY: the guard keeps the guest buffer of `buf.len()` bytes
            // mapped and readable for the call.
            return unsafe {
                transfer(fd, Op::Write, guard.as_ptr().cast_mut(), buf.len(), offset)
            };
        };
        // Blocks the write covers only in part are read first and written
        // back whole, with no other write to them in between.
        let partial = offset % align.offset != 0 || (offset + buf.len() as u64) % align.offset != 0;
        let _blocks = if partial {
            self.claim_alone(offset, buf.len() as u64)
        } else {
            self.claim_write(offset, buf.len() as u64)
        };
        let block = align.offset as usize;
        let mut bounce = Bounce::new(window_len(offset, buf.len(), align), bounce_align(align))?;
        for w in Windows::new(offset, buf.len(), align) {
            if w.head != 0 {
                // SAFETY: the bounce buffer owns at least one block.
                eof_ok(unsafe { transfer(fd, Op::Read, bounce.ptr, block, w.start) })?;
            }
            let end = w.head + w.len;
            if end % block != 0 && (w.head == 0 || end > block) {
                // Its own buffer: `last` is a multiple of the block, not
                // necessarily of the memory alignment.
                let last = end - end % block;
                let mut tail = Bounce::new(block, bounce_align(align))?;
                // SAFETY: the tail buffer owns `block` writable bytes.
                eof_ok(unsafe { transfer(fd, Op::Read, tail.ptr, block, w.start + last as u64) })?;
                bounce.as_mut_slice()[last..last + block].copy_from_slice(tail.as_mut_slice());
            }
            buf.subslice(w.done, w.len)
                .map_err(io::Error::other)?
                .copy_to(&mut bounce.as_mut_slice()[w.head..end]);
            // SAFETY: the bounce buffer owns at least `w.span` readable bytes.
            unsafe { transfer(fd, Op::Write, bounce.ptr, w.span, w.start)? };
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn async_fd(&self) -> Option<i32> {
        Some(self.file.as_raw_fd())
    }

    /// Only O_DIRECT transfers go through io_uring: they wait for the
    /// device, so a queue keeps many in flight. Buffered transfers are page
    /// cache copies, faster inline (measured by scripts/bench-blk.sh).
    fn async_alignment(&self) -> Option<Alignment> {
        self.direct
    }

    fn preferred_block(&self) -> u64 {
        self.direct.map_or(512, |a| a.offset.max(512))
    }

    fn claim_async_write(&self, offset: u64, len: u64) -> AsyncClaim {
        if self.direct.is_none() {
            return AsyncClaim::NotNeeded;
        }
        match self.writes.try_write(offset, len) {
            Some(claim) => AsyncClaim::Held(claim),
            None => AsyncClaim::Busy,
        }
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _blocks = self.claim_alone(offset, len);
        // Only whole O_DIRECT blocks (a block device takes no less); what
        // a discarded range reads back as is unspecified anyway.
        let block = self.direct.map_or(1, |a| a.offset);
        let start = offset.next_multiple_of(block);
        let end = (offset + len) / block * block;
        if start >= end {
            return Ok(());
        }
        let punched = self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            start,
            end - start,
        );
        advisory(punched)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let _blocks = self.claim_alone(offset, len);
        let end = offset + len;
        let Some(align) = self.direct.filter(|a| a.offset > SECTOR) else {
            let buffer_align = self.direct.map_or(4096, bounce_align);
            return self.zero_blocks(offset, end, unmap, buffer_align);
        };
        // The blocks at either end that the range covers in part are read,
        // zeroed in part and written back whole; the rest is whole blocks.
        let block = align.offset;
        let inner_start = offset.next_multiple_of(block);
        let inner_end = end / block * block;
        if inner_start > inner_end {
            return self.zero_within_block(offset, end, align);
        }
        if offset < inner_start {
            self.zero_within_block(offset, inner_start, align)?;
        }
        if inner_end < end {
            self.zero_within_block(inner_end, end, align)?;
        }
        if inner_start < inner_end {
            self.zero_blocks(inner_start, inner_end, unmap, bounce_align(align))?;
        }
        Ok(())
    }
}

/// A sector.
const SECTOR: u64 = 512;

impl RawFile {
    /// Zeroes `start..end`, whole O_DIRECT blocks (or sectors without
    /// O_DIRECT): with fallocate, else by writing zeroes from a buffer
    /// aligned to `buffer_align`. The caller holds the blocks alone.
    fn zero_blocks(
        &self,
        start: u64,
        end: u64,
        unmap: bool,
        buffer_align: usize,
    ) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(mode, start, end - start).is_ok() {
            return Ok(());
        }
        // The file system cannot: write zeroes, a chunk at a time.
        let zeroes = Bounce::new(BOUNCE_WINDOW as usize, buffer_align.max(4096))?;
        let chunk = zeroes.layout.size() as u64;
        let fd = self.file.as_raw_fd();
        let mut at = start;
        while at < end {
            let n = chunk.min(end - at) as usize;
            // SAFETY: `n <= chunk`, the size of the zeroed bounce buffer.
            unsafe { transfer(fd, Op::Write, zeroes.ptr, n, at)? };
            at += n as u64;
        }
        Ok(())
    }

    /// Zeroes `start..end`, which lies in one O_DIRECT block, by a
    /// read-modify-write of the block. The caller holds the block
    /// alone.
    fn zero_within_block(&self, start: u64, end: u64, align: Alignment) -> io::Result<()> {
        let block = align.offset;
        let block_start = start / block * block;
        let mut bounce = Bounce::new(block as usize, bounce_align(align))?;
        let fd = self.file.as_raw_fd();
        // SAFETY: the bounce buffer owns `block` writable bytes.
        eof_ok(unsafe { transfer(fd, Op::Read, bounce.ptr, block as usize, block_start) })?;
        bounce.as_mut_slice()[(start - block_start) as usize..(end - block_start) as usize].fill(0);
        // SAFETY: the bounce buffer owns `block` readable bytes.
        unsafe { transfer(fd, Op::Write, bounce.ptr, block as usize, block_start) }
    }
}

/// An in-memory disk for tests.
#[cfg(test)]
pub struct MemDisk {
    pub bytes: Mutex<Vec<u8>>,
    /// What it tells the parser asynchronous transfers need (it has no
    /// file to run them on: tests look at the transfers it is handed).
    pub async_alignment: Option<Alignment>,
}

#[cfg(test)]
impl MemDisk {
    pub fn new(size: usize) -> Self {
        MemDisk {
            bytes: Mutex::new(vec![0; size]),
            async_alignment: None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn async_alignment(&self) -> Option<Alignment> {
        self.async_alignment
    }
    fn read_at(&self, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()> {
        let bytes = self.lock();
        let start = offset as usize;
        buf.copy_from(&bytes[start..start + buf.len()]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()> {
        let mut bytes = self.lock();
        let start = offset as usize;
        buf.copy_to(&mut bytes[start..start + buf.len()]);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        let mut bytes = self.lock();
        bytes[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A discard the file system cannot punch is done (the range just stays
    /// allocated); any other failure is still one.
    #[test]
    fn a_discard_without_hole_punching_succeeds() {
        let unsupported = io::Error::from_raw_os_error(libc::EOPNOTSUPP);
        assert!(advisory(Err(unsupported)).is_ok());
        let io_error = io::Error::from_raw_os_error(libc::EIO);
        assert!(advisory(Err(io_error)).is_err());
        assert!(advisory(Ok(())).is_ok());
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let first = RawFile::open(&path, false, false).unwrap();
        let err = RawFile::open(&path, false, false).err().unwrap();
        assert!(matches!(err, DiskError::Locked(..)), "{err}");
        assert!(RawFile::open(&path, true, false).is_err());
        drop(first);
        RawFile::open(&path, false, false).unwrap();
    }

    #[test]
    fn sizes_must_be_whole_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd");
        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        assert!(matches!(
            RawFile::open(&path, false, false),
            Err(DiskError::Size(_, 1000))
        ));
    }

    #[test]
    fn a_resized_image_is_served_at_its_new_size_unless_it_cannot_be() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let disk = RawFile::open(&path, false, false).unwrap();
        assert_eq!(disk.refresh_size().unwrap(), (4096, 4096));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(8192).unwrap();
        assert_eq!(disk.refresh_size().unwrap(), (4096, 8192));
        assert_eq!(disk.size(), 8192);
        // Not whole sectors: refused, and the size stays.
        file.set_len(8192 + 100).unwrap();
        assert!(matches!(disk.refresh_size(), Err(DiskError::Size(_, 8292))));
        assert_eq!(disk.size(), 8192);
        file.set_len(1024).unwrap();
        assert_eq!(disk.refresh_size().unwrap(), (8192, 1024));
    }

    /// With O_DIRECT, a size that is not whole blocks is refused.
    #[test]
    fn a_direct_image_resized_to_part_of_a_block_keeps_its_size() {
        let dir = disk_dir();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let disk = coarse(&path);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(8192 + 512).unwrap();
        assert!(matches!(
            disk.refresh_size(),
            Err(DiskError::DirectSize(_, 8704, 4096))
        ));
        assert_eq!(disk.size(), 8192);
        file.set_len(3 * 4096).unwrap();
        assert_eq!(disk.refresh_size().unwrap(), (8192, 3 * 4096));
    }

    /// A directory on the disk the tests build on (tmpfs may lack O_DIRECT).
    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")).unwrap()
    }

    /// The image at `path` with O_DIRECT on 4 KiB blocks, coarser than any
    /// file system here asks: every sector write is a read-modify-write.
    fn coarse(path: &Path) -> RawFile {
        RawFile::open(path, false, true)
            .unwrap()
            .with_alignment(Alignment {
                memory: 4096,
                offset: 4096,
            })
    }

    /// A zeroed image of `blocks` 4 KiB blocks, opened with `coarse`.
    fn zeroed_coarse(blocks: usize) -> (tempfile::TempDir, PathBuf, RawFile) {
        let dir = disk_dir();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; blocks * 4096]).unwrap();
        let disk = coarse(&path);
        (dir, path, disk)
    }

    /// Bytes that differ from block to block and from run to run.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i / 7) as u8 ^ (i >> 12) as u8 ^ seed)
            .collect()
    }

    #[test]
    fn a_long_unaligned_transfer_bounces_in_bounded_windows() {
        let align = Alignment {
            memory: 4096,
            offset: 4096,
        };
        let len = 3 * BOUNCE_WINDOW as usize + 1000;
        let windows: Vec<Window> = Windows::new(4096 * 5 + 512, len, align).collect();
        assert_eq!(windows[0].head, 512);
        assert_eq!(windows[0].start, 4096 * 5);
        let mut done = 0;
        for w in &windows {
            assert_eq!(w.done, done);
            assert!(w.span as u64 <= BOUNCE_WINDOW, "{w:?}");
            assert_eq!(w.span % 4096, 0);
            assert_eq!(w.start % 4096, 0);
            assert!(w.head + w.len <= w.span);
            assert_eq!(w.start + w.head as u64, 4096 * 5 + 512 + done as u64);
            done += w.len;
        }
        assert_eq!(done, len);
        assert_eq!(
            window_len(4096 * 5 + 512, len, align),
            BOUNCE_WINDOW as usize
        );
        assert_eq!(window_len(512, 1024, align), 4096);
    }

    #[test]
    fn unaligned_direct_transfers_change_exactly_their_bytes() {
        let dir = disk_dir();
        let path = dir.path().join("img");
        let size = 3 * BOUNCE_WINDOW as usize;
        let mut model = pattern(size, 0x5a);
        std::fs::write(&path, &model).unwrap();
        let disk = coarse(&path);
        // (file offset, length, guest buffer misalignment)
        let cases = [
            (512, 512, 0),
            (4096 + 1024, 7 * 512, 0),
            (8192, 8192, 512),
            (512, 2 * BOUNCE_WINDOW as usize + 1536, 0),
            (size as u64 - 4096 - 512, 4096, 8),
            (size as u64 - 512, 512, 3),
        ];
        for (n, &(offset, len, skew)) in cases.iter().enumerate() {
            let data = pattern(len, n as u8 + 1);
            let mut guest = vec![0u8; len + 4096 * 2];
            let base = guest.as_ptr().align_offset(4096) + skew;
            guest[base..base + len].copy_from_slice(&data);
            let buf = GuestBuf::from(&mut guest[base..base + len]);
            disk.write_at(offset, &buf).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            assert!(
                std::fs::read(&path).unwrap() == model,
                "write {n}: {len} bytes at {offset}"
            );

            let mut back = vec![0u8; len + 4096 * 2];
            let base = back.as_ptr().align_offset(4096) + skew;
            let buf = GuestBuf::from(&mut back[base..base + len]);
            disk.read_at(offset, &buf).unwrap();
            assert!(
                back[base..base + len] == data[..],
                "read {n}: {len} bytes at {offset}"
            );
        }
    }

    #[test]
    fn sector_writes_from_two_threads_into_shared_blocks_all_land() {
        const BLOCKS: usize = 64;
        let (_dir, path, disk) = zeroed_coarse(BLOCKS);
        // Thread 0 writes the even sectors, thread 1 the odd ones: every
        // write is a read-modify-write of a block the other is writing too.
        std::thread::scope(|s| {
            for parity in 0..2usize {
                let disk = &disk;
                s.spawn(move || {
                    for sector in (parity..BLOCKS * 8).step_by(2) {
                        let mut data = vec![sector as u8 | 1; 512];
                        disk.write_at(sector as u64 * 512, &GuestBuf::from(&mut data[..]))
                            .unwrap();
                    }
                });
            }
        });
        let image = std::fs::read(&path).unwrap();
        for (sector, bytes) in image.chunks(512).enumerate() {
            assert!(
                bytes.iter().all(|&b| b == sector as u8 | 1),
                "sector {sector} lost its write"
            );
        }
    }

    #[test]
    fn a_whole_block_write_is_not_undone_by_a_read_modify_write_of_the_block() {
        const BLOCKS: usize = 256;
        let (_dir, path, disk) = zeroed_coarse(BLOCKS);
        // In each round, thread 0 writes sector 3 of each block (a
        // read-modify-write), thread 1 each whole block, aligned, at once.
        for round in 0..8u8 {
            let (sector_byte, block_byte) = (0xa0 | round, 0xb0 | round);
            std::thread::scope(|s| {
                let disk = &disk;
                s.spawn(move || {
                    let mut data = vec![sector_byte; 512];
                    for block in 0..BLOCKS as u64 {
                        let buf = GuestBuf::from(&mut data[..]);
                        disk.write_at(block * 4096 + 3 * 512, &buf).unwrap();
                    }
                });
                s.spawn(move || {
                    let mut data = vec![0u8; 2 * 4096];
                    let base = data.as_ptr().align_offset(4096);
                    data[base..base + 4096].fill(block_byte);
                    for block in 0..BLOCKS as u64 {
                        let buf = GuestBuf::from(&mut data[base..base + 4096]);
                        disk.write_at(block * 4096, &buf).unwrap();
                    }
                });
            });
            let image = std::fs::read(&path).unwrap();
            for (block, bytes) in image.chunks(4096).enumerate() {
                for (sector, bytes) in bytes.chunks(512).enumerate() {
                    let all = |v: u8| bytes.iter().all(|&b| b == v);
                    let ok = all(block_byte) || (sector == 3 && all(sector_byte));
                    assert!(
                        ok,
                        "round {round}, block {block} sector {sector}: {:#x}",
                        bytes[0]
                    );
                }
            }
        }
    }

    #[test]
    fn zeroes_and_discards_on_coarse_blocks_touch_only_their_range() {
        let dir = disk_dir();
        let path = dir.path().join("img");
        let size = 16 * 4096;
        let mut model = pattern(size, 0x33);
        std::fs::write(&path, &model).unwrap();
        let disk = coarse(&path);
        // (offset, length): inside one block, across a boundary, whole
        // blocks with partial ends.
        for (offset, len) in [(512u64, 1024u64), (1536, 6144), (4096 * 2 + 512, 4096 * 5)] {
            for unmap in [false, true] {
                disk.write_zeroes(offset, len, unmap).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
                assert!(
                    std::fs::read(&path).unwrap() == model,
                    "zeroes at {offset}+{len}"
                );
            }
        }
        // A discard deallocates only the whole blocks in its range.
        std::fs::write(&path, pattern(size, 0x44)).unwrap();
        let before = std::fs::read(&path).unwrap();
        disk.discard(4096 * 9 + 512, 4096 * 3).unwrap();
        let after = std::fs::read(&path).unwrap();
        assert!(
            after[..4096 * 10] == before[..4096 * 10],
            "the partial block before"
        );
        assert!(
            after[4096 * 10..4096 * 12].iter().all(|&b| b == 0),
            "the whole blocks"
        );
        assert!(
            after[4096 * 12..] == before[4096 * 12..],
            "the partial block after"
        );
    }
}
