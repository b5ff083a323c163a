//! Guest memory for the test frontend: one memfd, mapped shared at guest
//! physical address 0, plus a bump allocator for rings and buffers.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

pub type Memory = GuestMemoryMmap<()>;

/// Guest memory shared with the backend through SET_MEM_TABLE.
pub struct GuestMemory {
    /// The mapping (MAP_SHARED of the memfd), at guest-physical 0.
    pub mem: Memory,
    pub size: u64,
    next: u64,
}

impl GuestMemory {
    /// A memfd of `size` bytes, mapped shared.
    pub fn new(size: u64) -> std::io::Result<Self> {
        let name = CString::new("testfront-ram").expect("static name has no NUL");
        // SAFETY: `name` is NUL-terminated and the flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(size)?;
        let len = usize::try_from(size).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            len,
            Some(FileOffset::from_arc(file, 0)),
        )])
        .map_err(std::io::Error::other)?;
        // Page 0 stays unused so that address 0 is never a valid buffer.
        Ok(GuestMemory {
            mem,
            size,
            next: 4096,
        })
    }

    /// Reserves `len` bytes aligned to `align`; returns the guest address.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let start = self.next.next_multiple_of(align);
        let end = start.checked_add(len)?;
        if end > self.size {
            return None;
        }
        self.next = end;
        Some(start)
    }
}
