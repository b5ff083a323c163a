//! The PVH `struct hvm_start_info` and its memory map.

use crate::phys::{self, u32_at, u64_at};
use crate::Fail;

const MAGIC: u32 = 0x336e_c578;
/// Size of `hvm_start_info` up to and including the version 1 fields.
const SIZE: u64 = 56;
/// `struct hvm_memmap_table_entry`: addr u64, size u64, type u32, reserved u32.
const MEMMAP_ENTRY_SIZE: usize = 24;
const MEMMAP_TYPE_RAM: u32 = 1;
/// Longest command line read (the rest is ignored).
const CMDLINE_MAX: u64 = 4096;

/// The fields of `hvm_start_info` the guest uses.
pub struct StartInfo {
    version: u32,
    cmdline_paddr: u64,
    /// Physical address of the RSDP, or 0.
    pub rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
}

impl StartInfo {
    /// Reads and checks the start_info at physical address `addr`.
    pub fn read(addr: u64) -> Result<Self, Fail> {
        let b = phys::bytes(addr, SIZE).ok_or(Fail::at("start_info outside memory", addr))?;
        if u32_at(b, 0) != MAGIC {
            return Err(Fail::at("bad start_info magic", addr));
        }
        Ok(Self {
            version: u32_at(b, 4),
            cmdline_paddr: u64_at(b, 24),
            rsdp_paddr: u64_at(b, 32),
            memmap_paddr: u64_at(b, 40),
            memmap_entries: u32_at(b, 48),
        })
    }

    /// The NUL-terminated command line (empty if there is none).
    pub fn cmdline(&self) -> &'static [u8] {
        let addr = self.cmdline_paddr;
        // Read up to CMDLINE_MAX bytes, less if that would leave the map.
        let len = CMDLINE_MAX.min(phys::MAPPED_END.saturating_sub(addr));
        let b = phys::bytes(addr, len).unwrap_or(&[]);
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        &b[..end]
    }

    /// Total bytes of RAM (type 1) in the memory map, or `None` if there is
    /// no memory map (version 0, or zero entries).
    pub fn ram_bytes(&self) -> Result<Option<u64>, Fail> {
        Ok(self
            .ram_ranges()?
            .map(|ranges| ranges.fold(0u64, |sum, (_, len)| sum.saturating_add(len))))
    }

    /// The RAM (type 1) ranges of the memory map as (start, length), or
    /// `None` if there is no memory map.
    pub fn ram_ranges(&self) -> Result<Option<impl Iterator<Item = (u64, u64)>>, Fail> {
        if self.version == 0 || self.memmap_paddr == 0 || self.memmap_entries == 0 {
            return Ok(None);
        }
        let len = u64::from(self.memmap_entries) * MEMMAP_ENTRY_SIZE as u64;
        let map = phys::bytes(self.memmap_paddr, len)
            .ok_or(Fail::at("memory map outside memory", self.memmap_paddr))?;
        Ok(Some(
            map.chunks_exact(MEMMAP_ENTRY_SIZE)
                .filter(|e| u32_at(e, 16) == MEMMAP_TYPE_RAM)
                .map(|e| (u64_at(e, 0), u64_at(e, 8))),
        ))
    }
}
