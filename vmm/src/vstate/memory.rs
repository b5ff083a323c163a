//! Guest RAM: one memfd, mapped MAP_SHARED, so that vhost-user backends can
//! map the very same pages from the file descriptors they are handed.

use std::fs::File;
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_common::shared_memory::{self, MemfdError};

use crate::arch::x86_64::layout::ram_ranges;

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot create {0} bytes of guest memory")]
    File(u64, #[source] MemfdError),
    #[error("cannot map {0} bytes of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error("guest memory of {0} bytes does not fit this host's address space")]
    TooLarge(u64),
}

/// Guest RAM and the file that backs it.
pub struct GuestRam {
    pub memory: GuestMemory,
    /// The memfd behind every region; vhost-user frontends send it to backends.
    #[allow(dead_code)]
    pub file: Arc<File>,
}

/// Creates `size` bytes of guest RAM laid out around the 32-bit hole; with
/// `hugepages`, on 2 MiB huge pages (`size` a multiple of 2 MiB), all taken
/// now.
pub fn create_guest_ram(size: u64, hugepages: bool) -> Result<GuestRam, MemoryError> {
    let file = Arc::new(
        shared_memory::create("guest-ram", size, hugepages)
            .map_err(|e| MemoryError::File(size, e))?,
    );

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
