//! Guest memory for the test frontend: one memfd, mapped shared at guest
//! physical address 0, plus a bump allocator for rings and buffers.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

pub type Memory = GuestMemoryMmap<()>;

/// The huge page size of memory made with `hugepages`.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;

/// Guest memory shared with the backend through SET_MEM_TABLE.
pub struct GuestMemory {
    /// The mapping (MAP_SHARED of the memfd), at guest-physical 0.
    pub mem: Memory,
    pub size: u64,
    next: u64,
}

impl GuestMemory {
    /// A memfd of `size` bytes, mapped shared. With `hugepages`, on 2 MiB
    /// huge pages (`size` rounded up to a whole one), every one taken now:
    /// guest memory that ran out of huge pages later would kill this
    /// process or the backend with SIGBUS.
    pub fn new(size: u64, hugepages: bool) -> std::io::Result<Self> {
        let name = CString::new("testfront-ram").expect("static name has no NUL");
        let (flags, size) = if hugepages {
            let size = size.next_multiple_of(HUGEPAGE_SIZE);
            (
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
                size,
            )
        } else {
            (libc::MFD_CLOEXEC, size)
        };
        // SAFETY: `name` is NUL-terminated and the flags are valid.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = Arc::new(unsafe { File::from_raw_fd(fd) });
        file.set_len(size)?;
        if hugepages {
            let len = libc::off_t::try_from(size).map_err(|_| std::io::ErrorKind::InvalidInput)?;
            // SAFETY: fallocate (mode 0: allocate) over the whole of a file
            // this function owns; it touches no memory of this process.
            if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "cannot take {} huge pages of 2 MiB ({e}); make them free with scripts/hugepages.sh",
                        size / HUGEPAGE_SIZE
                    ),
                ));
            }
        }
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
