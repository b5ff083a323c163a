//! The guest physical address map.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA (RAM)
//! 0x0000_0500  GDT, then IDT (64-bit bzImage boot)
//! 0x0000_6000  PVH hvm_start_info, memory map and module list
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  identity page tables (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line
//! 0x000a_0000  legacy hole, reserved in the E820 map
//! 0x000e_0000  ACPI tables: RSDP first (where a legacy search finds it)
//! 0x0010_0000  kernel (1 MiB), initramfs at the top of low RAM
//! 0xc000_0000  32-bit hole for PCI MMIO, IOAPIC, LAPIC, TSS (3 GiB..4 GiB)
//! 0x1_0000_0000 the rest of RAM when there is more than 3 GiB
//! ```

/// The GDT used for the 64-bit bzImage entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// The (empty) IDT used for the 64-bit bzImage entry.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit bzImage entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot identity map; the PDPT and PD follow it.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line and its maximum size.
pub const CMDLINE_START: u64 = 0x2_0000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// End of the low RAM that precedes the legacy VGA/BIOS hole.
pub const LOW_RAM_END: u64 = 0xa_0000;
/// ACPI tables live here: the RSDP at the start, where the legacy search
/// (0xE0000..0xFFFFF) finds it.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where kernels are loaded, and where "high memory" begins for loaders.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// The 32-bit hole for devices starts here: RAM above it moves to 4 GiB.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
pub const MEM_32BIT_GAP_END: u64 = 0x1_0000_0000;
/// 32-bit PCI MMIO window where BARs are placed.
pub const PCI_MMIO32_START: u64 = MEM_32BIT_GAP_START;
pub const PCI_MMIO32_END: u64 = 0xe000_0000;
/// PCI ECAM (memory-mapped configuration space) for bus 0.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
/// The ACPI Generic Event Device's event register (devices::ged).
pub const GED_START: u64 = 0xfeb0_0000;
pub const GED_SIZE: u64 = 0x10;
/// In-kernel IOAPIC and LAPIC.
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS and the identity-map page, at the top of the hole.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;

/// I/O ports of the platform devices.
pub mod ports {
    /// The 16550 UART (COM1) and its IRQ.
    pub const SERIAL_BASE: u16 = 0x3f8;
    pub const SERIAL_LEN: u16 = 8;
    pub const SERIAL_IRQ: u32 = 4;
    /// The ACPI Generic Event Device's interrupt (IOAPIC pin, edge).
    pub const GED_IRQ: u32 = 5;
    /// i8042 command port: 0xFE on it pulses the CPU reset line.
    pub const I8042_COMMAND: u16 = 0x64;
    /// ACPI hardware-reduced sleep control (write SLP_TYP|SLP_EN) and status.
    pub const ACPI_SLEEP_CONTROL: u16 = 0x600;
    pub const ACPI_SLEEP_STATUS: u16 = 0x601;
    /// ACPI reset register (FADT RESET_REG) and the value that resets.
    pub const ACPI_RESET: u16 = 0x602;
    pub const ACPI_RESET_VALUE: u8 = 0x1;
}

/// A contiguous range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    pub guest_addr: u64,
    pub size: u64,
}

/// Splits `memory_bytes` of RAM around the 32-bit hole.
pub fn ram_ranges(memory_bytes: u64) -> Vec<RamRange> {
    if memory_bytes <= MEM_32BIT_GAP_START {
        vec![RamRange {
            guest_addr: 0,
            size: memory_bytes,
        }]
    } else {
        vec![
            RamRange {
                guest_addr: 0,
                size: MEM_32BIT_GAP_START,
            },
            RamRange {
                guest_addr: MEM_32BIT_GAP_END,
                size: memory_bytes - MEM_32BIT_GAP_START,
            },
        ]
    }
}

/// E820 entry types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

/// An entry of the memory map the guest is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// The memory map: all RAM, with the legacy hole 0xA0000..0x100000 (which
/// holds the ACPI tables) and the PCI ECAM window reported as reserved.
pub fn e820_map(memory_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: LOW_RAM_END,
            size: HIGH_RAM_START - LOW_RAM_END,
            kind: E820Type::Reserved,
        },
    ];
    for range in ram_ranges(memory_bytes) {
        let start = range.guest_addr.max(HIGH_RAM_START);
        let end = range.guest_addr + range.size;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Type::Ram,
            });
        }
    }
    // ECAM must be reserved for Linux to trust the MCFG table.
    map.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820Type::Reserved,
    });
    map.sort_by_key(|e| e.addr);
    map
}

/// The end of RAM below 4 GiB (exclusive).
pub fn low_ram_end(memory_bytes: u64) -> u64 {
    memory_bytes.min(MEM_32BIT_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                guest_addr: 0,
                size: 512 << 20
            }]
        );
    }

    #[test]
    fn large_memory_skips_the_hole() {
        let ranges = ram_ranges(5 << 30);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].size + ranges[1].size, 5 << 30);
        assert_eq!(ranges[1].guest_addr, 4 << 30);
    }

    #[test]
    fn e820_reports_everything_but_the_legacy_hole() {
        for size in [64u64 << 20, 3 << 30, 5 << 30, 16 << 30] {
            let ram: u64 = e820_map(size)
                .iter()
                .filter(|e| e.kind == E820Type::Ram)
                .map(|e| e.size)
                .sum();
            assert_eq!(ram, size - (HIGH_RAM_START - LOW_RAM_END));
        }
    }
}
