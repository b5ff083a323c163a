//! Guest RAM: one memfd, mapped MAP_SHARED, so that vhost-user backends can
//! map the very same pages from the file descriptors they are handed.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_ranges;

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot create the guest memory file (memfd)")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest memory file to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    #[error("cannot map {0} bytes of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error("guest memory of {0} bytes does not fit this host's address space")]
    TooLarge(u64),
    #[error("cannot take {pages} huge pages of 2 MiB for guest memory (were they taken since the start, or does a cgroup or memory policy limit them?)")]
    HugePages {
        pages: u64,
        #[source]
        source: std::io::Error,
    },
}

/// Guest RAM and the file that backs it.
pub struct GuestRam {
    pub memory: GuestMemory,
    /// The memfd behind every region; vhost-user frontends send it to backends.
    #[allow(dead_code)]
    pub file: Arc<File>,
}

/// Creates `size` bytes of guest RAM laid out around the 32-bit hole; with
/// `hugepages`, on 2 MiB huge pages (`size` a multiple of 2 MiB), every one
/// taken now: a mapping of huge pages that ran out later would kill the VMM
/// or a backend with SIGBUS on first touch.
pub fn create_guest_ram(size: u64, hugepages: bool) -> Result<GuestRam, MemoryError> {
    let name = CString::new("guest-ram").expect("static name has no NUL");
    let flags = if hugepages {
        libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
    } else {
        libc::MFD_CLOEXEC
    };
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;
    if hugepages {
        take_hugepages(&file, size)?;
    }

    let ranges = ram_ranges(size);
    let mut file_offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for range in &ranges {
        let len = usize::try_from(range.size).map_err(|_| MemoryError::TooLarge(size))?;
        regions.push((
            GuestAddress(range.guest_addr),
            len,
            Some(FileOffset::from_arc(file.clone(), file_offset)),
        ));
        file_offset += range.size;
    }
    let memory =
        GuestMemoryMmap::from_ranges_with_files(regions).map_err(|e| MemoryError::Map(size, e))?;
    Ok(GuestRam { memory, file })
}

/// Allocates every huge page of a hugetlbfs file of `size` bytes.
fn take_hugepages(file: &File, size: u64) -> Result<(), MemoryError> {
    let pages = size / crate::config::HUGEPAGE_SIZE;
    let len = libc::off_t::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
    // SAFETY: fallocate on a file descriptor this function borrows, with
    // mode 0 (allocate) over the file's own length; it touches no memory
    // of this process.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
        return Err(MemoryError::HugePages {
            pages,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memory_above_the_hole_is_backed_by_the_same_file() {
        let ram = create_guest_ram(3 << 30 | 4 << 20, false).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        ram.memory
            .write_obj(0x1234_5678u32, GuestAddress(1 << 32))
            .unwrap();
        let mut bytes = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.file.read_exact_at(&mut bytes, 3 << 30).unwrap();
        assert_eq!(u32::from_le_bytes(bytes), 0x1234_5678);
        assert!(ram
            .memory
            .read_obj::<u32>(GuestAddress(0xd000_0000))
            .is_err());
    }
}
