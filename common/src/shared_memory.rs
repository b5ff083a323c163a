//! The file behind guest memory that vhost-user backends map: a memfd,
//! on 2 MiB huge pages when asked, sealed at its size so that no process
//! it is handed to can shrink it under the others' mappings (touching a
//! page past the end of a shared file is SIGBUS).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use thiserror::Error;

/// The huge page size of memory made with `hugepages`.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;
/// The kernel's pool of huge pages of that size.
pub const HUGEPAGE_POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

#[derive(Debug, Error)]
pub enum MemfdError {
    #[error("cannot create the memory file (memfd)")]
    Create(#[source] std::io::Error),
    #[error("cannot size the memory file to {0} bytes")]
    Size(u64, #[source] std::io::Error),
    #[error("cannot seal the memory file at its size")]
    Seal(#[source] std::io::Error),
    #[error("{0} bytes is not a whole number of 2 MiB huge pages")]
    NotWholePages(u64),
    #[error("cannot take {pages} huge pages of 2 MiB (see {HUGEPAGE_POOL}/free_hugepages; a cgroup or memory policy may also limit them)")]
    HugePages {
        pages: u64,
        #[source]
        source: std::io::Error,
    },
}

/// A memfd of `size` bytes named `name`. With `hugepages` it is on 2 MiB
/// huge pages (`size` a multiple of them), every one allocated now: the
/// mappings vm-memory makes are MAP_NORESERVE, so a pool that ran dry later
/// would kill whoever first touched a page with SIGBUS. Its size is
/// sealed (no shrinking, no growing, no more seals), as QEMU's
/// `memory-backend-memfd` does by default.
pub fn create(name: &str, size: u64, hugepages: bool) -> Result<File, MemfdError> {
    let name = CString::new(name).map_err(|e| MemfdError::Create(e.into()))?;
    let flags = if hugepages {
        if size % HUGEPAGE_SIZE != 0 {
            return Err(MemfdError::NotWholePages(size));
        }
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
    } else {
        libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING
    };
    // SAFETY: `name` is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemfdError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|e| MemfdError::Size(size, e))?;
    if hugepages {
        let pages = size / HUGEPAGE_SIZE;
        let len = libc::off_t::try_from(size)
            .map_err(|_| MemfdError::Size(size, std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: fallocate (mode 0: allocate) over the whole of a file this
        // function owns; it touches no memory of this process.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
            return Err(MemfdError::HugePages {
                pages,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd this function owns; no memory is
    // passed to the kernel.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(MemfdError::Seal(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// 2 MiB huge pages free and not promised to a mapping (0 without
/// hugetlbfs).
pub fn free_hugepages() -> u64 {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{HUGEPAGE_POOL}/{name}"))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    read("free_hugepages").saturating_sub(read("resv_hugepages"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_come_in_whole_pages() {
        assert!(matches!(
            create("t", 3 << 20, true),
            Err(MemfdError::NotWholePages(_))
        ));
        let file = create("t", 1 << 20, false).expect("memfd");
        assert_eq!(file.metadata().expect("metadata").len(), 1 << 20);
    }

    /// Whoever the file is handed to cannot change its size, nor lift the
    /// seals that stop them.
    #[test]
    fn the_size_is_sealed() {
        let file = create("t", 1 << 20, false).expect("memfd");
        for size in [0, 4096, 2 << 20] {
            let err = file.set_len(size).expect_err("a sealed size");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "to {size}");
        }
        // SAFETY: F_ADD_SEALS on a memfd this test owns.
        let added = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, 0) };
        assert_eq!(added, -1, "F_SEAL_SEAL refuses more seals");
        assert_eq!(file.metadata().expect("metadata").len(), 1 << 20);
    }
}
