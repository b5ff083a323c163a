//! Guest memory for the test frontend: one memfd, mapped shared at guest
//! physical address 0, plus a bump allocator for rings and buffers.

use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_common::shared_memory::{self, HUGEPAGE_SIZE};

pub type Memory = GuestMemoryMmap<()>;

/// Guest memory shared with the backend through SET_MEM_TABLE.
pub struct GuestMemory {
    /// The mapping (MAP_SHARED of the memfd), at guest-physical 0.
    pub mem: Memory,
    pub size: u64,
    next: u64,
}

impl GuestMemory {
    /// A memfd of `size` bytes, mapped shared. With `hugepages`, on 2 MiB
    /// huge pages (`size` rounded up to a whole one), all taken now.
    pub fn new(size: u64, hugepages: bool) -> std::io::Result<Self> {
        let size = if hugepages {
            size.next_multiple_of(HUGEPAGE_SIZE)
        } else {
            size
        };
        let file = Arc::new(
            shared_memory::create("testfront-ram", size, hugepages)
                .map_err(std::io::Error::other)?,
        );
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
