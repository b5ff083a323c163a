// Register fields are cut out of wider words on purpose.
#![allow(clippy::cast_possible_truncation)]
//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC) and bus-0 discovery.

use crate::port::{inl, outl};
use crate::serial::say;

const ADDRESS: u16 = 0xcf8;
const DATA: u16 = 0xcfc;

/// A function on bus 0.
#[derive(Clone, Copy)]
pub struct Function {
    pub slot: u8,
    pub function: u8,
}

impl Function {
    fn address(&self, offset: u8) -> u32 {
        1 << 31
            | u32::from(self.slot) << 11
            | u32::from(self.function) << 8
            | u32::from(offset & 0xfc)
    }

    pub fn read32(&self, offset: u8) -> u32 {
        outl(ADDRESS, self.address(offset));
        inl(DATA)
    }

    pub fn write32(&self, offset: u8, value: u32) {
        outl(ADDRESS, self.address(offset));
        outl(DATA, value);
    }

    pub fn read8(&self, offset: u8) -> u8 {
        (self.read32(offset) >> ((offset & 3) * 8)) as u8
    }

    /// The address a memory BAR points at (64-bit BARs take two registers).
    pub fn bar_address(&self, bar: u8) -> u64 {
        let offset = 0x10 + bar * 4;
        let low = self.read32(offset);
        if low & 1 != 0 {
            return 0; // an I/O BAR
        }
        let mut addr = u64::from(low & !0xf);
        if (low >> 1) & 3 == 2 {
            addr |= u64::from(self.read32(offset + 4)) << 32;
        }
        addr
    }

    /// Walks the capability list; calls `visit(offset, id)` for each.
    pub fn capabilities(&self, mut visit: impl FnMut(u8, u8)) {
        const STATUS_CAP_LIST: u32 = 1 << 20;
        if self.read32(0x04) & STATUS_CAP_LIST == 0 {
            return;
        }
        let mut offset = self.read8(0x34) & 0xfc;
        // At most 48 capabilities fit; the bound stops a looping list.
        for _ in 0..48 {
            if offset < 0x40 {
                return;
            }
            let header = self.read32(offset);
            visit(offset, header as u8);
            offset = (header >> 8) as u8 & 0xfc;
        }
    }

    /// Moves 64-bit memory BAR `bar` to `addr` the way an OS reassigning
    /// it does: memory decoding off while the two halves change, then on.
    pub fn move_bar64(&self, bar: u8, addr: u64) {
        let offset = 0x10 + bar * 4;
        let command = self.read32(0x04) & 0xffff;
        self.write32(0x04, command & !0x2);
        self.write32(offset, addr as u32);
        self.write32(offset + 4, (addr >> 32) as u32);
        self.write32(0x04, command | 0x2);
    }

    /// Enables memory decoding and bus mastering.
    pub fn enable(&self) {
        let command = self.read32(0x04) & 0xffff;
        self.write32(0x04, command | 0x6);
    }
}

/// Lists bus 0 (function 0 of every slot, all functions of multi-function
/// devices), printing one line per function; calls `found` for each.
pub fn scan(mut found: impl FnMut(Function, u16, u16)) {
    for slot in 0..32u8 {
        for function in 0..8u8 {
            let f = Function { slot, function };
            let id = f.read32(0x00);
            if id & 0xffff == 0xffff {
                if function == 0 {
                    break;
                }
                continue;
            }
            let (vendor, device) = (id as u16, (id >> 16) as u16);
            let class = f.read32(0x08) >> 8;
            say!("pci 00:{slot:02x}.{function} {vendor:04x}:{device:04x} class {class:06x}");
            found(f, vendor, device);
            let multifunction = f.read8(0x0e) & 0x80 != 0;
            if function == 0 && !multifunction {
                break;
            }
        }
    }
}
