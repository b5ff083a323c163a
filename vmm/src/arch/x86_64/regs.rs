//! Initial vCPU state: general and segment registers for the two entry
//! protocols (PVH 32-bit protected mode, Linux 64-bit long mode), the boot
//! GDT and page tables in guest memory, FPU, MSRs and the local APIC.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::vstate::memory::GuestMemory;

#[derive(Debug, Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT or page tables to guest memory")]
    WriteBootTables(#[source] vm_memory::GuestMemoryError),
    #[error("KVM refused the initial {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot build the MSR list")]
    MsrList,
    #[error("KVM did not read or write the APIC base MSR")]
    ApicBase,
}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, %ebx = hvm_start_info.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode, identity map, %rsi = zero page.
    Linux64 { entry: u64 },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Builds a GDT entry from its flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT entry into the segment KVM expects.
fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = (((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000)) as u32;
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base: u64::from(base),
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The GDT of each entry mode: null, code, data, TSS.
fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    match mode {
        EntryMode::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code, selector 0x08
            gdt_entry(0xc093, 0, 0xfffff), // data, selector 0x10
            gdt_entry(0x008b, 0, 0x67),    // 32-bit busy TSS, selector 0x18
        ],
        EntryMode::Linux64 { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, selector 0x08
            gdt_entry(0xc093, 0, 0xfffff), // data, selector 0x10
            gdt_entry(0x008b, 0, 0x67),    // TSS, selector 0x18
        ],
    }
}

/// Writes the GDT, an empty IDT and (for long mode) an identity map of the
/// first 4 GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemory, mode: EntryMode) -> Result<(), RegsError> {
    for (i, entry) in boot_gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::WriteBootTables)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::WriteBootTables)?;
    if let EntryMode::Linux64 { .. } = mode {
        mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
            .map_err(RegsError::WriteBootTables)?;
        let mut pd = vec![0u8; 4 * 4096];
        for gib in 0..4u64 {
            let pd_addr = PDE_START + gib * 0x1000;
            mem.write_obj(pd_addr | 0x3, GuestAddress(PDPTE_START + gib * 8))
                .map_err(RegsError::WriteBootTables)?;
        }
        for (i, chunk) in pd.chunks_exact_mut(8).enumerate() {
            // Present, writable, 2 MiB page.
            let entry = ((i as u64) << 21) | 0x83;
            chunk.copy_from_slice(&entry.to_le_bytes());
        }
        mem.write_slice(&pd, GuestAddress(PDE_START))
            .map_err(RegsError::WriteBootTables)?;
    }
    Ok(())
}

/// Sets the segment and control registers of the boot processor.
pub fn setup_sregs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(|e| RegsError::Kvm("sregs", e))?;
    let gdt = boot_gdt(mode);
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| RegsError::Kvm("sregs", e))
}

/// Sets the general registers of the boot processor.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let regs = match mode {
        EntryMode::Pvh { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        EntryMode::Linux64 { entry } => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(|e| RegsError::Kvm("regs", e))
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| RegsError::Kvm("FPU state", e))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

/// The MSRs a booting vCPU gets, keeping only those KVM lists as supported
/// (setting any other one fails on some hosts).
pub fn boot_msrs(supported: &[u32]) -> Vec<kvm_msr_entry> {
    let wanted = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        // Fast strings.
        (MSR_IA32_MISC_ENABLE, 1),
        // MTRRs enabled, write-back by default.
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 0x6),
    ];
    supported_entries(&wanted, supported)
}

/// The (index, value) pairs whose MSR KVM lists as supported, as entries.
fn supported_entries(wanted: &[(u32, u64)], supported: &[u32]) -> Vec<kvm_msr_entry> {
    wanted
        .iter()
        .filter(|(index, _)| supported.contains(index))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

/// KVM's paravirtual MSRs with persistent effect, at their power-on
/// values: kvmclock, steal time, async page faults and PV EOI off, halt
/// polling allowed. KVM resets them only at an INIT, which the boot vCPU
/// of a reboot in place never gets; left on, KVM would go on writing the
/// last kernel's structures into the next one's memory. (The wall-clock
/// MSRs are one-shot writes of the time to a guest address: not touched.)
const PV_MSRS_AT_RESET: [(u32, u64); 7] = [
    (0x0000_0012, 0), // MSR_KVM_SYSTEM_TIME
    (0x4b56_4d01, 0), // MSR_KVM_SYSTEM_TIME_NEW
    (0x4b56_4d02, 0), // MSR_KVM_ASYNC_PF_EN
    (0x4b56_4d03, 0), // MSR_KVM_STEAL_TIME
    (0x4b56_4d04, 0), // MSR_KVM_PV_EOI_EN
    (0x4b56_4d05, 1), // MSR_KVM_POLL_CONTROL
    (0x4b56_4d06, 0), // MSR_KVM_ASYNC_PF_INT
];

/// Puts KVM's paravirtual MSRs back as at power-on (see
/// `PV_MSRS_AT_RESET`), those KVM lists as supported, one at a time: KVM
/// stops a list at the first it refuses (steal time, on a host without
/// scheduler statistics), and the rest must still be written.
pub fn reset_pv_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), RegsError> {
    for entry in supported_entries(&PV_MSRS_AT_RESET, supported) {
        let msrs = Msrs::from_entries(&[entry]).map_err(|_| RegsError::MsrList)?;
        let written = vcpu
            .set_msrs(&msrs)
            .map_err(|e| RegsError::Kvm("paravirtual MSRs", e))?;
        if written != 1 {
            log::warn!(
                "KVM refused paravirtual MSR {:#x} = {:#x} at reset",
                entry.index,
                entry.data
            );
        }
    }
    Ok(())
}

pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<(), RegsError> {
    let entries = boot_msrs(supported);
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::MsrList)?;
    let written = vcpu
        .set_msrs(&msrs)
        .map_err(|e| RegsError::Kvm("MSRs", e))?;
    if written != entries.len() {
        log::warn!(
            "KVM accepted {written} of {} boot MSRs (stopped at {:#x})",
            entries.len(),
            entries[written].index
        );
    }
    Ok(())
}

const MSR_IA32_APIC_BASE: u32 = 0x1b;

/// The APIC base MSR: the LAPIC's address and its enable and x2APIC bits.
pub fn get_apic_base(vcpu: &VcpuFd) -> Result<u64, RegsError> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_APIC_BASE,
        ..Default::default()
    }])
    .map_err(|_| RegsError::MsrList)?;
    match vcpu.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data),
        Ok(_) => Err(RegsError::ApicBase),
        Err(e) => Err(RegsError::Kvm("APIC base MSR", e)),
    }
}

pub fn set_apic_base(vcpu: &VcpuFd, value: u64) -> Result<(), RegsError> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_APIC_BASE,
        data: value,
        ..Default::default()
    }])
    .map_err(|_| RegsError::MsrList)?;
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        Ok(_) => Err(RegsError::ApicBase),
        Err(e) => Err(RegsError::Kvm("APIC base MSR", e)),
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_klapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_klapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 receives the 8259's ExtINT, LINT1 is the NMI line (as the BIOS leaves them).
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(|e| RegsError::Kvm("LAPIC", e))?;
    let lvt0 = get_klapic_reg(&lapic, APIC_LVT0);
    set_klapic_reg(
        &mut lapic,
        APIC_LVT0,
        set_apic_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_klapic_reg(&lapic, APIC_LVT1);
    set_klapic_reg(
        &mut lapic,
        APIC_LVT1,
        set_apic_delivery_mode(lvt1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&lapic)
        .map_err(|e| RegsError::Kvm("LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.l, code.db, code.type_, code.present), (1, 0, 0xb, 1));
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, 8);
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!((tss.limit, tss.g, tss.type_), (0x67, 0, 0xb));
    }

    /// kvmclock and steal time left on by the last kernel are off after
    /// `reset_pv_msrs`. Needs /dev/kvm.
    #[test]
    fn the_last_kernels_kvmclock_and_steal_time_are_turned_off() {
        use kvm_bindings::Msrs;
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let ram = crate::vstate::memory::create_guest_ram(16 << 20, false).unwrap();
        let vm = crate::vstate::vm::create_vm(&kvm, &ram.memory).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let supported = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let on = supported_entries(
            &[(0x4b56_4d01, 0x1000 | 1), (0x4b56_4d03, 0x2000 | 1)],
            &supported,
        );
        assert!(!on.is_empty(), "KVM lists neither kvmclock nor steal time");
        let mut msrs = Msrs::from_entries(&on).unwrap();
        assert_eq!(vcpu.set_msrs(&msrs).unwrap(), on.len());
        reset_pv_msrs(&vcpu, &supported).unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), on.len());
        for entry in msrs.as_slice() {
            assert_eq!(entry.data, 0, "MSR {:#x} is still on", entry.index);
        }
    }

    #[test]
    fn only_supported_msrs_are_set() {
        let msrs = boot_msrs(&[MSR_LSTAR, MSR_MTRR_DEF_TYPE]);
        assert_eq!(msrs.len(), 2);
        assert!(boot_msrs(&[0x10a]).is_empty());
    }
}
