//! Host iovecs over guest buffers (and the worker's own buffers), so that
//! frames move between the guest and the tap with one readv/writev and no
//! copy. The only way to build one is from a borrow of the memory it points
//! to, so every iovec stays valid as long as the `IoVecs` lives.

use std::marker::PhantomData;

use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// The most iovecs one readv/writev takes (Linux's UIO_MAXIOV).
pub const MAX_IOVECS: usize = 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IovError {
    #[error("{len} bytes at guest address {addr:#x} are outside guest memory")]
    Outside { addr: u64, len: usize },
    #[error("more than {MAX_IOVECS} buffers in one frame")]
    TooMany,
}

/// The allocation of an `IoVecs`, empty, kept for reuse.
#[derive(Default)]
pub struct IovStorage(Vec<libc::iovec>);

// SAFETY: the vector is always empty (`into_storage` clears it, and only
// `reusing` opens it), so no pointer goes from one thread to another.
unsafe impl Send for IovStorage {}

/// A gather/scatter list whose pointers borrow `'a` memory.
pub struct IoVecs<'a> {
    iov: Vec<libc::iovec>,
    bytes: usize,
    /// How many iovecs guest buffers may take.
    guest_limit: usize,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> IoVecs<'a> {
    pub fn new() -> Self {
        Self::reserving(0)
    }

    /// Keeps `n` iovecs for local buffers: guest buffers take at most
    /// `MAX_IOVECS - n`.
    pub fn reserving(n: usize) -> Self {
        Self::reusing(IovStorage::default(), n)
    }

    /// Like `reserving`, in the allocation of `iov` (emptied): see
    /// `into_storage`.
    pub fn reusing(storage: IovStorage, n: usize) -> Self {
        let IovStorage(iov) = storage;
        IoVecs {
            iov,
            bytes: 0,
            guest_limit: MAX_IOVECS.saturating_sub(n),
            _borrow: PhantomData,
        }
    }

    /// Adds `len` bytes of guest memory at `addr` (one iovec per memory
    /// region the range touches). On error nothing is added.
    pub fn push_guest(
        &mut self,
        mem: &'a GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), IovError> {
        let before = self.iov.len();
        for slice in mem.get_slices(addr, len) {
            let outside = IovError::Outside { addr: addr.0, len };
            let Ok(slice) = slice else {
                self.iov.truncate(before);
                return Err(outside);
            };
            if self.iov.len() >= self.guest_limit {
                self.iov.truncate(before);
                return Err(IovError::TooMany);
            }
            self.iov.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        self.bytes += len;
        Ok(())
    }

    /// Adds a slice of guest memory, already checked to be inside it.
    pub fn push_slice(&mut self, slice: &VolatileSlice<'a, ()>) -> Result<(), IovError> {
        if self.iov.len() >= self.guest_limit {
            return Err(IovError::TooMany);
        }
        self.iov.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
        self.bytes += slice.len();
        Ok(())
    }

    /// Removes every iovec (keeping the allocation).
    pub fn clear(&mut self) {
        self.iov.clear();
        self.bytes = 0;
    }

    /// Gives back the allocation, for `reusing` (no pointer survives).
    pub fn into_storage(self) -> IovStorage {
        let mut iov = self.iov;
        iov.clear();
        IovStorage(iov)
    }

    /// Adds a buffer of this process (the overflow area of a frame).
    pub fn push_local(&mut self, buf: &'a mut [u8]) -> Result<(), IovError> {
        if self.iov.len() >= MAX_IOVECS {
            return Err(IovError::TooMany);
        }
        self.iov.push(libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        });
        self.bytes += buf.len();
        Ok(())
    }

    /// The iovecs, for readv/writev: each points to memory valid for reads
    /// and writes of its length for as long as `self` lives.
    pub fn as_raw(&self) -> &[libc::iovec] {
        &self.iov
    }

    pub fn count(&self) -> usize {
        self.iov.len()
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// Copies `data` into the buffers in order, as a readv would; returns
    /// the bytes copied (for the test tap).
    #[cfg(test)]
    pub fn scatter(&self, data: &[u8]) -> usize {
        let mut done = 0;
        for v in &self.iov {
            let n = v.iov_len.min(data.len() - done);
            // SAFETY: `v` points to `iov_len` writable bytes borrowed for
            // `'a` (guest memory or a local buffer, see the constructors),
            // `n` is at most that, and `data` is a distinct Rust slice.
            unsafe {
                std::ptr::copy_nonoverlapping(data[done..].as_ptr(), v.iov_base.cast::<u8>(), n)
            };
            done += n;
        }
        done
    }

    /// The bytes the buffers hold, in order, as a writev would send them
    /// (for the test tap).
    #[cfg(test)]
    pub fn gather(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.bytes);
        for v in &self.iov {
            // SAFETY: `v` points to `iov_len` readable bytes borrowed for
            // `'a` (see the constructors).
            let part = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            out.extend_from_slice(part);
        }
        out
    }
}

impl Default for IoVecs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_at_region_boundaries_and_bad_ranges_add_nothing() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        mem.write_slice(b"abcdef", GuestAddress(0xffd)).unwrap();
        let mut local = [0u8; 4];
        let mut iov = IoVecs::new();
        iov.push_guest(&mem, GuestAddress(0xffd), 6).unwrap();
        assert_eq!((iov.count(), iov.len()), (2, 6));
        let outside = iov.push_guest(&mem, GuestAddress(0x1ffe), 4);
        assert_eq!(
            outside,
            Err(IovError::Outside {
                addr: 0x1ffe,
                len: 4
            })
        );
        assert_eq!((iov.count(), iov.len()), (2, 6));
        iov.push_local(&mut local).unwrap();
        assert_eq!(iov.gather()[..6], *b"abcdef");
        assert_eq!(iov.scatter(b"0123456789"), 10);
        drop(iov);
        assert_eq!(&local, b"6789");
        let mut back = [0u8; 6];
        mem.read_slice(&mut back, GuestAddress(0xffd)).unwrap();
        assert_eq!(&back, b"012345");
    }

    #[test]
    fn at_most_max_iovecs() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut iov = IoVecs::new();
        for i in 0..MAX_IOVECS as u64 {
            iov.push_guest(&mem, GuestAddress(i * 8), 8).unwrap();
        }
        assert_eq!(
            iov.push_guest(&mem, GuestAddress(0), 8),
            Err(IovError::TooMany)
        );
        let mut local = [0u8; 1];
        assert_eq!(iov.push_local(&mut local), Err(IovError::TooMany));

        let mut iov = IoVecs::reserving(1);
        for i in 0..MAX_IOVECS as u64 - 1 {
            iov.push_guest(&mem, GuestAddress(i * 8), 8).unwrap();
        }
        assert_eq!(
            iov.push_guest(&mem, GuestAddress(0), 8),
            Err(IovError::TooMany)
        );
        iov.push_local(&mut local).unwrap();
        assert_eq!(iov.count(), MAX_IOVECS);
    }
}
