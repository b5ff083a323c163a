//! The KVM VM: its memory slots, the in-kernel irqchip (PIC, IOAPIC,
//! LAPICs) and PIT, and the host limits the configuration is checked against.

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemory;
use crate::arch::x86_64::layout;

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    #[error("cannot {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
}

/// The most vCPUs whose APIC IDs fit the 8-bit xAPIC field of the MADT
/// (0xFF is the broadcast ID).
pub const MAX_XAPIC_VCPUS: u32 = 254;

/// The largest number of vCPUs: KVM's limit, capped at `MAX_XAPIC_VCPUS`.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    (kvm.get_max_vcpus() as u32).min(MAX_XAPIC_VCPUS)
}

pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::ApiVersion(version));
    }
    for cap in [
        Cap::Irqchip,
        Cap::UserMemory,
        Cap::SetTssAddr,
        Cap::Pit2,
        Cap::PitState2,
        Cap::Ioeventfd,
        Cap::Irqfd,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    Ok(kvm)
}

/// Creates the VM with its platform interrupt controllers and guest memory.
pub fn create_vm(kvm: &Kvm, memory: &GuestMemory) -> Result<VmFd, VmError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("create the VM", e))?;
    vm.set_tss_address(layout::KVM_TSS_START as usize)
        .map_err(|e| VmError::Kvm("set the TSS address", e))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
        .map_err(|e| VmError::Kvm("set the identity map address", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("create the in-kernel irqchip", e))?;
    mask_legacy_pics(&vm)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("create the in-kernel PIT", e))?;

    for (slot, region) in memory.iter().enumerate() {
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `memory`; the
        // caller keeps it mapped while the VM can run: the built VM holds
        // it, and so does every vCPU thread (`VcpuContext::_memory`).
        unsafe { vm.set_user_memory_region(mem_region) }
            .map_err(|e| VmError::Kvm("register guest memory with KVM", e))?;
    }
    Ok(vm)
}

/// Masks both 8259s (firmware leaves them masked too) and moves their
/// vectors clear of the exceptions, to 0x20 and 0x28. KVM makes them
/// unmasked with vector base 0, and the boot CPU's LINT0 takes their
/// output (ExtINT), so the first serial (GSI 4) or GED (GSI 5) interrupt
/// would reach a guest as exception 4 or 5. The tables say there is no
/// 8259 (HW-reduced ACPI, MADT without PCAT_COMPAT), so a guest that
/// believes them never masks it. Linux is not affected (it masks LINT0
/// when it sets its local APIC up), nor is a guest that programs the
/// 8259s (which sets their masks anew).
fn mask_legacy_pics(vm: &VmFd) -> Result<(), VmError> {
    for (chip_id, vector_base) in [
        (KVM_IRQCHIP_PIC_MASTER, 0x20),
        (KVM_IRQCHIP_PIC_SLAVE, 0x28),
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(|e| VmError::Kvm("read the 8259 state", e))?;
        // SAFETY: for the PIC chip ids KVM fills (and reads) the union's
        // `pic` member; every bit pattern is a valid kvm_pic_state.
        let pic = unsafe { &mut chip.chip.pic };
        pic.imr = 0xff;
        pic.irq_base = vector_base;
        vm.set_irqchip(&chip)
            .map_err(|e| VmError::Kvm("mask the 8259s", e))?;
    }
    Ok(())
}

/// The PICs, the IOAPIC and the PIT as KVM created them (the PICs masked:
/// `mask_legacy_pics`). An in-place
/// reboot puts them back, so the next boot finds them at power-on state
/// rather than as the last guest left them (its redirection entries, its
/// masks, a running timer).
pub struct PlatformState {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl PlatformState {
    /// Reads the state of a VM that has not run yet.
    pub fn save(vm: &VmFd) -> Result<Self, VmError> {
        let mut chips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(|e| VmError::Kvm("read the irqchip state", e))?;
            chips.push(chip);
        }
        let pit = vm
            .get_pit2()
            .map_err(|e| VmError::Kvm("read the PIT state", e))?;
        Ok(PlatformState { chips, pit })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), VmError> {
        for chip in &self.chips {
            vm.set_irqchip(chip)
                .map_err(|e| VmError::Kvm("reset the irqchip", e))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| VmError::Kvm("reset the PIT", e))
    }
}
