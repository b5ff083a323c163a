//! Disks: what the request worker reads and writes. Knows nothing of virtio.
//!
//! `RawFile` serves a raw image with positioned reads and writes straight
//! into guest memory (no copy), O_DIRECT on request (with an aligned bounce
//! buffer for unaligned guest buffers, one read-modify-write at a time),
//! and an advisory lock so two
//! writable backends cannot open the same image. `MemDisk` is for tests.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thiserror::Error;
use vm_memory::VolatileSlice;

/// A guest buffer.
pub type GuestBuf<'a> = VolatileSlice<'a, ()>;

pub trait Disk: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
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
    /// The buffer, length and offset alignment asynchronous I/O needs, or
    /// None when the disk has no asynchronous path.
    fn async_alignment(&self) -> Option<u64> {
        None
    }
}

#[derive(Debug, Error)]
pub enum DiskError {
    #[error("--image {0:?}: cannot open")]
    Open(PathBuf, #[source] io::Error),
    #[error("--image {0:?}: in use by another backend (it is locked)")]
    Locked(PathBuf),
    #[error("--image {0:?}: cannot lock")]
    Lock(PathBuf, #[source] io::Error),
    #[error("--image {0:?}: size {1} is not a multiple of 512 bytes")]
    Size(PathBuf, u64),
}

/// Logical block size for O_DIRECT alignment.
const DIRECT_ALIGN: usize = 4096;

pub struct RawFile {
    file: File,
    size: u64,
    direct: bool,
    /// Held over each read-modify-write of whole blocks: two queues
    /// writing different sectors of one block must not each write back
    /// the block as it was before the other's write.
    read_modify_write: Mutex<()>,
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
        let mode = if readonly {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Locked(path.to_path_buf())
            } else {
                DiskError::Lock(path.to_path_buf(), err)
            });
        }
        let size = file
            .metadata()
            .map_err(|e| DiskError::Open(path.to_path_buf(), e))?
            .len();
        if size % 512 != 0 {
            return Err(DiskError::Size(path.to_path_buf(), size));
        }
        Ok(RawFile {
            file,
            size,
            direct,
            read_modify_write: Mutex::new(()),
        })
    }

    fn aligned(&self, offset: u64, buf: &GuestBuf<'_>) -> bool {
        let addr = buf.ptr_guard().as_ptr() as usize;
        !self.direct
            || (addr % DIRECT_ALIGN == 0
                && buf.len() % DIRECT_ALIGN == 0
                && offset % DIRECT_ALIGN as u64 == 0)
    }

    /// With O_DIRECT, held over each read-modify-write and by discard and
    /// write-zeroes, so that a read-modify-write never writes back a block
    /// as it was before another's change.
    fn block_writes_guard(&self) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.direct.then(|| {
            self.read_modify_write
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        })
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
    fn new(len: usize) -> io::Result<Self> {
        let size = len.next_multiple_of(DIRECT_ALIGN).max(DIRECT_ALIGN);
        let layout = std::alloc::Layout::from_size_align(size, DIRECT_ALIGN)
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

impl Disk for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        if self.aligned(offset, buf) {
            let guard = buf.ptr_guard_mut();
            // SAFETY: the guard keeps the guest buffer of `buf.len()` bytes
            // mapped and writable for the call.
            return unsafe { transfer(fd, Op::Read, guard.as_ptr(), buf.len(), offset) };
        }
        let head = (offset % DIRECT_ALIGN as u64) as usize;
        let mut bounce = Bounce::new(head + buf.len())?;
        let len = bounce.layout.size();
        // SAFETY: the bounce buffer owns `len` writable bytes.
        eof_ok(unsafe { transfer(fd, Op::Read, bounce.ptr, len, offset - head as u64) })?;
        buf.copy_from(&bounce.as_mut_slice()[head..head + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &GuestBuf<'_>) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        if self.aligned(offset, buf) {
            let guard = buf.ptr_guard();
            // SAFETY: the guard keeps the guest buffer of `buf.len()` bytes
            // mapped and readable for the call.
            return unsafe {
                transfer(fd, Op::Write, guard.as_ptr().cast_mut(), buf.len(), offset)
            };
        }
        // Read-modify-write through an aligned buffer (only with O_DIRECT:
        // anything else is aligned), one at a time.
        let _only_one = self.block_writes_guard();
        let head = (offset % DIRECT_ALIGN as u64) as usize;
        let mut bounce = Bounce::new(head + buf.len())?;
        let len = bounce.layout.size();
        let start = offset - head as u64;
        // SAFETY: the bounce buffer owns `len` writable bytes.
        eof_ok(unsafe { transfer(fd, Op::Read, bounce.ptr, len, start) })?;
        buf.copy_to(&mut bounce.as_mut_slice()[head..head + buf.len()]);
        let end = (start + len as u64).min(self.size);
        // SAFETY: the bounce buffer owns at least `end - start` readable bytes.
        unsafe { transfer(fd, Op::Write, bounce.ptr, (end - start) as usize, start) }
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
    fn async_alignment(&self) -> Option<u64> {
        self.direct.then_some(DIRECT_ALIGN as u64)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let _not_during_a_read_modify_write = self.block_writes_guard();
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let _not_during_a_read_modify_write = self.block_writes_guard();
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(mode, offset, len).is_ok() {
            return Ok(());
        }
        // The file system cannot: write zeroes, a chunk at a time.
        let zeroes = Bounce::new(1 << 20)?;
        let chunk = zeroes.layout.size() as u64;
        let fd = self.file.as_raw_fd();
        let mut at = offset;
        while at < offset + len {
            let n = chunk.min(offset + len - at) as usize;
            // SAFETY: `n <= chunk`, the size of the zeroed bounce buffer.
            unsafe { transfer(fd, Op::Write, zeroes.ptr, n, at)? };
            at += n as u64;
        }
        Ok(())
    }
}

/// An in-memory disk for tests.
#[cfg(test)]
pub struct MemDisk {
    pub bytes: Mutex<Vec<u8>>,
}

#[cfg(test)]
impl MemDisk {
    pub fn new(size: usize) -> Self {
        MemDisk {
            bytes: Mutex::new(vec![0; size]),
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

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let first = RawFile::open(&path, false, false).unwrap();
        let err = RawFile::open(&path, false, false).err().unwrap();
        assert!(matches!(err, DiskError::Locked(_)), "{err}");
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
}
