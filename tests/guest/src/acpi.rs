//! Finding and checking ACPI tables: RSDP, RSDT/XSDT, FADT, DSDT, MADT.
//!
//! Every table is checksummed before use; offsets are from the ACPI 6.x spec.

use core::fmt;

use crate::phys::{self, u32_at, u64_at};
use crate::Fail;

const RSDP_SIGNATURE: [u8; 8] = *b"RSD PTR ";
/// The legacy RSDP search area (BIOS read-only memory, 16-byte aligned).
const SEARCH_START: u64 = 0xe_0000;
const SEARCH_END: u64 = 0x10_0000;
/// Bytes covered by the ACPI 1.0 RSDP checksum.
const RSDP_V1_LEN: u64 = 20;
/// Size of the ACPI 2.0+ RSDP.
const RSDP_V2_LEN: u32 = 36;
/// Size of the common table header (signature, length, ... creator revision).
const HEADER_LEN: u32 = 36;
/// Sanity limit on a table's length field.
const MAX_TABLE_LEN: u32 = 16 << 20;

/// Generic Address Structure address spaces.
pub const SPACE_MEMORY: u8 = 0;
pub const SPACE_IO: u8 = 1;

/// Byte sum of `bytes`; a valid ACPI structure sums to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

/// Where the RSDP was found.
#[derive(Clone, Copy)]
pub enum RsdpSource {
    /// The legacy scan of 0xE0000..0x100000.
    Search,
    /// `hvm_start_info.rsdp_paddr`.
    StartInfo,
}

impl fmt::Display for RsdpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Search => "search",
            Self::StartInfo => "start_info",
        })
    }
}

/// A checked Root System Description Pointer.
pub struct Rsdp {
    pub addr: u64,
    pub source: RsdpSource,
    revision: u8,
    rsdt: u32,
    xsdt: u64,
}

impl Rsdp {
    /// Searches the BIOS area, then falls back to `start_info_rsdp` (if not 0).
    pub fn find(start_info_rsdp: u64) -> Result<Self, Fail> {
        if let Some(rsdp) = Self::search() {
            return Ok(rsdp);
        }
        if start_info_rsdp == 0 {
            return Err(Fail::new("no RSDP"));
        }
        Self::parse(start_info_rsdp, RsdpSource::StartInfo)
            .ok_or(Fail::at("bad RSDP", start_info_rsdp))
    }

    fn search() -> Option<Self> {
        let area = phys::bytes(SEARCH_START, SEARCH_END - SEARCH_START)?;
        area.chunks_exact(16)
            .zip((SEARCH_START..).step_by(16))
            .filter(|(candidate, _)| candidate[..8] == RSDP_SIGNATURE)
            .find_map(|(_, addr)| Self::parse(addr, RsdpSource::Search))
    }

    /// Checks the signature and checksum(s) of the RSDP at `addr`.
    fn parse(addr: u64, source: RsdpSource) -> Option<Self> {
        let v1 = phys::bytes(addr, RSDP_V1_LEN)?;
        if v1[..8] != RSDP_SIGNATURE || checksum(v1) != 0 {
            return None;
        }
        let mut rsdp = Self {
            addr,
            source,
            revision: v1[15],
            rsdt: u32_at(v1, 16),
            xsdt: 0,
        };
        if rsdp.revision >= 2 {
            let v2 = phys::bytes(addr, RSDP_V2_LEN.into())?;
            let len = u32_at(v2, 20);
            if !(RSDP_V2_LEN..=MAX_TABLE_LEN).contains(&len) {
                return None;
            }
            if checksum(phys::bytes(addr, len.into())?) != 0 {
                return None;
            }
            rsdp.xsdt = u64_at(v2, 24);
        }
        Some(rsdp)
    }

    /// Loads the XSDT (revision 2+ with an XSDT address) or else the RSDT.
    pub fn root(&self) -> Result<RootTable, Fail> {
        let (addr, signature, entry_size) = if self.revision >= 2 && self.xsdt != 0 {
            (self.xsdt, *b"XSDT", 8)
        } else {
            (u64::from(self.rsdt), *b"RSDT", 4)
        };
        let table = Table::load(addr)?.expect(signature)?;
        Ok(RootTable { table, entry_size })
    }
}

/// A table whose length and checksum have been checked.
#[derive(Clone, Copy)]
pub struct Table {
    pub addr: u64,
    bytes: &'static [u8],
}

impl Table {
    pub fn load(addr: u64) -> Result<Self, Fail> {
        let header = phys::bytes(addr, HEADER_LEN.into())
            .ok_or(Fail::at("ACPI table outside memory", addr))?;
        let len = u32_at(header, 4);
        if !(HEADER_LEN..=MAX_TABLE_LEN).contains(&len) {
            return Err(Fail::at("bad ACPI table length", addr));
        }
        let bytes =
            phys::bytes(addr, len.into()).ok_or(Fail::at("ACPI table outside memory", addr))?;
        if checksum(bytes) != 0 {
            return Err(Fail::at("bad ACPI table checksum", addr));
        }
        Ok(Self { addr, bytes })
    }

    pub fn signature(&self) -> [u8; 4] {
        [self.bytes[0], self.bytes[1], self.bytes[2], self.bytes[3]]
    }

    fn expect(self, signature: [u8; 4]) -> Result<Self, Fail> {
        if self.signature() == signature {
            Ok(self)
        } else {
            Err(Fail::at("unexpected ACPI table signature", self.addr))
        }
    }
}

/// The RSDT or XSDT: a header followed by 4- or 8-byte table addresses.
pub struct RootTable {
    table: Table,
    entry_size: usize,
}

impl RootTable {
    pub fn entries(&self) -> impl Iterator<Item = u64> + '_ {
        let wide = self.entry_size == 8;
        self.table.bytes[HEADER_LEN as usize..]
            .chunks_exact(self.entry_size)
            .map(move |e| {
                if wide {
                    u64_at(e, 0)
                } else {
                    u64::from(u32_at(e, 0))
                }
            })
    }
}

/// An ACPI Generic Address Structure, reduced to what the guest uses.
pub struct Gas {
    pub space: u8,
    pub address: u64,
}

impl Gas {
    /// The GAS at `off` in `b`, if it is there and its address is not 0.
    fn at(b: &[u8], off: usize) -> Option<Self> {
        let address = u64_at(b.get(off..off + 12)?, 4);
        (address != 0).then(|| Self {
            space: b[off],
            address,
        })
    }
}

/// The Fixed ACPI Description Table ("FACP").
pub struct Fadt(pub Table);

impl Fadt {
    pub const SIGNATURE: [u8; 4] = *b"FACP";
    const DSDT: usize = 40;
    const PM1A_CNT_BLK: usize = 64;
    const FLAGS: usize = 112;
    const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
    const X_DSDT: usize = 140;
    const X_PM1A_CNT_BLK: usize = 172;
    const SLEEP_CONTROL_REG: usize = 244;
    const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    const RESET_REG: usize = 116;
    const RESET_VALUE: usize = 128;

    fn u32_field(&self, off: usize) -> Option<u32> {
        self.0.bytes.get(off..off + 4).map(|b| u32_at(b, 0))
    }

    /// Loads the DSDT: X_DSDT, or DSDT if that is 0.
    pub fn dsdt(&self) -> Result<Table, Fail> {
        let x_dsdt = self
            .0
            .bytes
            .get(Self::X_DSDT..Self::X_DSDT + 8)
            .map_or(0, |b| u64_at(b, 0));
        let addr = match x_dsdt {
            0 => self.u32_field(Self::DSDT).map_or(0, u64::from),
            x => x,
        };
        if addr == 0 {
            return Err(Fail::at("FADT has no DSDT", self.0.addr));
        }
        Table::load(addr)?.expect(*b"DSDT")
    }

    pub fn hw_reduced(&self) -> bool {
        self.u32_field(Self::FLAGS)
            .is_some_and(|f| f & Self::FLAG_HW_REDUCED_ACPI != 0)
    }

    /// RESET_REG and RESET_VALUE, if the FADT says the register is supported.
    pub fn reset_register(&self) -> Option<(Gas, u8)> {
        let supported = self
            .u32_field(Self::FLAGS)
            .is_some_and(|f| f & Self::FLAG_RESET_REG_SUP != 0);
        if !supported {
            return None;
        }
        let value = *self.0.bytes.get(Self::RESET_VALUE)?;
        Some((Gas::at(self.0.bytes, Self::RESET_REG)?, value))
    }

    /// SLEEP_CONTROL_REG (hardware-reduced ACPI), if present.
    pub fn sleep_control(&self) -> Option<Gas> {
        Gas::at(self.0.bytes, Self::SLEEP_CONTROL_REG)
    }

    /// The PM1a control register: X_PM1a_CNT_BLK, else the PM1a_CNT_BLK port.
    pub fn pm1a_control(&self) -> Option<Gas> {
        Gas::at(self.0.bytes, Self::X_PM1A_CNT_BLK).or_else(|| {
            let port = self.u32_field(Self::PM1A_CNT_BLK)?;
            (port != 0).then_some(Gas {
                space: SPACE_IO,
                address: port.into(),
            })
        })
    }
}

/// The Multiple APIC Description Table ("APIC").
pub struct Madt(pub Table);

impl Madt {
    pub const SIGNATURE: [u8; 4] = *b"APIC";
    /// Header plus local APIC address and flags.
    const ENTRIES: usize = 44;
    const TYPE_LOCAL_APIC: u8 = 0;
    const TYPE_LOCAL_X2APIC: u8 = 9;
    const ENABLED: u32 = 1 << 0;

    /// Counts enabled Processor Local APIC and x2APIC entries.
    pub fn enabled_cpus(&self) -> Result<u32, Fail> {
        let mut cpus = 0;
        self.for_each_enabled_apic(|_| cpus += 1)?;
        Ok(cpus)
    }

    /// Calls `f` with the APIC ID of each enabled Processor Local APIC and
    /// x2APIC entry.
    pub fn for_each_enabled_apic(&self, mut f: impl FnMut(u32)) -> Result<(), Fail> {
        let b = self.0.bytes;
        let mut off = Self::ENTRIES;
        while off < b.len() {
            let kind = b[off];
            let len = b.get(off + 1).map_or(0, |&l| usize::from(l));
            let Some(entry) = b.get(off..off + len).filter(|_| len >= 2) else {
                return Err(Fail::at("bad MADT entry", self.0.addr + off as u64));
            };
            let (id, flags) = match kind {
                Self::TYPE_LOCAL_APIC if len >= 8 => (u32::from(entry[3]), u32_at(entry, 4)),
                Self::TYPE_LOCAL_X2APIC if len >= 12 => (u32_at(entry, 4), u32_at(entry, 8)),
                _ => (0, 0),
            };
            if flags & Self::ENABLED != 0 {
                f(id);
            }
            off += len;
        }
        Ok(())
    }
}

/// The S5 (soft off) SLP_TYP for PM1a from the DSDT's `\_S5` package, found
/// by pattern rather than by interpreting AML: `_S5_`, PackageOp, PkgLength,
/// NumElements, then the first element as a Zero/One/Byte constant.
pub fn s5_sleep_type(dsdt: &Table) -> Option<u8> {
    const PACKAGE_OP: u8 = 0x12;
    let b = dsdt.bytes;
    let name = b
        .windows(5)
        .position(|w| w[..4] == *b"_S5_" && w[4] == PACKAGE_OP)?;
    let pkg_length = name + 5;
    let first = pkg_length + 1 + usize::from(*b.get(pkg_length)? >> 6) + 1;
    match *b.get(first)? {
        0x00 => Some(0),                         // ZeroOp
        0x01 => Some(1),                         // OneOp
        0x0a => b.get(first + 1).map(|v| v & 7), // BytePrefix
        _ => None,
    }
}

/// The event register of the DSDT's Generic Event Device (ACPI0013), found
/// by pattern like `s5_sleep_type`: after the `ACPI0013` string, the first
/// SystemMemory OperationRegion with a DWord or QWord constant address.
pub fn ged_event_register(dsdt: &Table) -> Option<u64> {
    const EXT_OP: u8 = 0x5b;
    const OP_REGION_OP: u8 = 0x80;
    const SYSTEM_MEMORY: u8 = 0x00;
    const DWORD_PREFIX: u8 = 0x0c;
    const QWORD_PREFIX: u8 = 0x0e;
    let b = dsdt.bytes;
    let hid = b.windows(8).position(|w| w == b"ACPI0013")?;
    let rest = &b[hid..];
    let region = rest
        .windows(7)
        .position(|w| w[0] == EXT_OP && w[1] == OP_REGION_OP && w[6] == SYSTEM_MEMORY)?;
    let value = &rest[region + 7..];
    match *value.first()? {
        DWORD_PREFIX if value.len() >= 5 => Some(u64::from(u32_at(value, 1))),
        QWORD_PREFIX if value.len() >= 9 => Some(crate::phys::u64_at(value, 1)),
        _ => None,
    }
}
