//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG (ECAM for
//! bus 0) and a DSDT that describes the PCI host bridge and the serial port.
//!
//! Power-off and reset go through the FADT's sleep control and reset
//! registers, which are I/O ports handled by `devices::acpi_pm`.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{self, ports};
use crate::vstate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"RSVMM ";
const OEM_TABLE_ID: [u8; 8] = *b"RSVMMTBL";
const OEM_REVISION: u32 = 1;

/// SLP_TYP value of the S5 (soft-off) state, as the DSDT's `_S5_` says.
pub const SLP_TYP_S5: u8 = 5;

/// IAPC_BOOT_ARCH: no VGA, no CMOS RTC.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooLarge(u64),
    #[error("cannot write the ACPI tables to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// One table, where it goes and its bytes.
pub struct AcpiTable {
    pub signature: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt(memory_bytes: u64) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);

    // 64-bit MMIO window: from the end of RAM (or 4 GiB) up to 64 GiB past it.
    let mmio64_start = layout::MEM_32BIT_GAP_END
        .max(
            memory_bytes - memory_bytes.min(layout::MEM_32BIT_GAP_START)
                + layout::MEM_32BIT_GAP_END,
        )
        .next_multiple_of(1 << 30);
    let mmio64_end = mmio64_start + (64 << 30) - 1;

    let bus_numbers = aml::AddressSpace::new_bus_number(0x0u16, 0x0u16);
    let config_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0x0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO32_START as u32,
        (layout::PCI_MMIO32_END - 1) as u32,
        None,
    );
    let mmio64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_end,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![
        &bus_numbers,
        &config_ports,
        &io_low,
        &io_high,
        &mmio32,
        &mmio64,
    ]);
    let pci_hid = aml::EISAName::new("PNP0A08");
    let pci_cid = aml::EISAName::new("PNP0A03");
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &pci_hid),
            &aml::Name::new("_CID".into(), &pci_cid),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &pci_crs),
        ],
    )
    .to_aml_bytes(&mut dsdt);

    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_io = aml::IO::new(
        ports::SERIAL_BASE,
        ports::SERIAL_BASE,
        1,
        ports::SERIAL_LEN as u8,
    );
    let com1_irq = aml::Interrupt::new(true, true, false, false, ports::SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &com1_hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut dsdt);

    // The Generic Event Device: its interrupt runs _EVT, which reads the
    // event register and notifies the power button on bit 0.
    let ged_hid = "ACPI0013".to_string();
    let ged_irq = aml::Interrupt::new(true, true, false, false, ports::GED_IRQ);
    let ged_crs = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_addr = layout::GED_START;
    let ged_len = 4u64;
    let ged_region = aml::OpRegion::new(
        "GDST".into(),
        aml::OpRegionSpace::SystemMemory,
        &ged_addr,
        &ged_len,
    );
    let ged_field = aml::Field::new(
        "GDST".into(),
        aml::FieldAccessType::DWord,
        aml::FieldLockRule::NoLock,
        aml::FieldUpdateRule::WriteAsZeroes,
        vec![aml::FieldEntry::Named(*b"GDAT", 32)],
    );
    let events = aml::Local(0);
    let gdat = aml::Path::new("GDAT");
    let read_events = aml::Store::new(&events, &gdat);
    let power_bit = u64::from(crate::devices::ged::EVENT_POWER_BUTTON);
    let masked = aml::And::new(&aml::ZERO, &events, &power_bit);
    let pressed = aml::Equal::new(&masked, &power_bit);
    let button = aml::Path::new("\\_SB_.PWRB");
    let notify_value = 0x80u8;
    let notify = aml::Notify::new(&button, &notify_value);
    let on_power = aml::If::new(&pressed, vec![&notify]);
    let evt = aml::Method::new("_EVT".into(), 1, true, vec![&read_events, &on_power]);
    aml::Device::new(
        "_SB_.GED0".into(),
        vec![
            &aml::Name::new("_HID".into(), &ged_hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &ged_crs),
            &ged_region,
            &ged_field,
            &evt,
        ],
    )
    .to_aml_bytes(&mut dsdt);
    let pwrb_hid = aml::EISAName::new("PNP0C0C");
    aml::Device::new(
        "_SB_.PWRB".into(),
        vec![
            &aml::Name::new("_HID".into(), &pwrb_hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut dsdt);

    // \_S5: SLP_TYP for soft-off, written to the sleep control register.
    let s5_typ = u64::from(SLP_TYP_S5);
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_typ])).to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ports::ACPI_RESET),
    );
    fadt.reset_value = ports::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ports::ACPI_SLEEP_CONTROL),
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(ports::ACPI_SLEEP_STATUS),
    );
    to_bytes(&fadt.finalize())
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_START as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    to_bytes(&madt)
}

/// Builds every table and assigns its guest address, RSDP first at
/// `ACPI_START`. The XSDT lists the FADT and MADT; the FADT points to the DSDT.
pub fn build_tables(cpus: u8, memory_bytes: u64) -> Result<Vec<AcpiTable>, AcpiError> {
    let mut next = layout::ACPI_START;
    let mut place = |len: usize| {
        let addr = next;
        next = (next + len as u64).next_multiple_of(16);
        addr
    };
    let rsdp_addr = place(Rsdp::len());
    let dsdt_bytes = dsdt(memory_bytes);
    let dsdt_addr = place(dsdt_bytes.len());
    let fadt_bytes = fadt(dsdt_addr);
    let fadt_addr = place(fadt_bytes.len());
    let madt_bytes = madt(cpus);
    let madt_addr = place(madt_bytes.len());
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, 0);
    let mcfg_bytes = to_bytes(&mcfg);
    let mcfg_addr = place(mcfg_bytes.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt_bytes = to_bytes(&xsdt);
    let xsdt_addr = place(xsdt_bytes.len());
    let rsdp_bytes = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    if next > layout::ACPI_END {
        return Err(AcpiError::TooLarge(next - layout::ACPI_START));
    }
    let table = |signature: &str, addr, bytes| AcpiTable {
        signature: signature.to_string(),
        addr,
        bytes,
    };
    Ok(vec![
        table("RSDP", rsdp_addr, rsdp_bytes),
        table("DSDT", dsdt_addr, dsdt_bytes),
        table("FACP", fadt_addr, fadt_bytes),
        table("APIC", madt_addr, madt_bytes),
        table("MCFG", mcfg_addr, mcfg_bytes),
        table("XSDT", xsdt_addr, xsdt_bytes),
    ])
}

/// Copies the tables into guest memory.
pub fn write_tables(mem: &GuestMemory, tables: &[AcpiTable]) -> Result<(), AcpiError> {
    for table in tables {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let tables = build_tables(4, 1 << 30).unwrap();
        assert_eq!(tables[0].signature, "RSDP");
        assert_eq!(tables[0].addr, layout::ACPI_START);
        assert!(checksum_ok(&tables[0].bytes[..20]));
        assert!(checksum_ok(&tables[0].bytes));
        for table in &tables[1..] {
            assert_eq!(&table.bytes[..4], table.signature.as_bytes());
            let len = u32::from_le_bytes(table.bytes[4..8].try_into().unwrap());
            assert_eq!(len as usize, table.bytes.len(), "{}", table.signature);
            assert!(checksum_ok(&table.bytes), "{}", table.signature);
        }
    }

    #[test]
    fn madt_lists_one_local_apic_per_cpu() {
        for cpus in [1u8, 4, 64] {
            let madt = madt(cpus);
            let mut offset = 44;
            let mut lapics = 0;
            while offset < madt.len() {
                if madt[offset] == 0 {
                    lapics += 1;
                }
                offset += madt[offset + 1] as usize;
            }
            assert_eq!(lapics, cpus);
        }
    }
}
