//! The VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole
//! table, so the legacy PIC/IOAPIC routes that KVM installs by default
//! (GSI 0-23) are kept in it next to the MSI routes devices add.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;

/// IOAPIC pins; MSI GSIs are allocated above them.
const IOAPIC_PINS: u32 = 24;
/// KVM's routing table limit.
const MAX_GSI: u32 = 4096;

#[derive(Debug, Error)]
pub enum MsiError {
    #[error("no free GSI for an MSI vector")]
    OutOfGsis,
    #[error("cannot build the GSI routing table")]
    RoutingTable,
    #[error("KVM refused the GSI routing table")]
    SetRouting(#[source] kvm_ioctls::Error),
    #[error("cannot {0} the irqfd of GSI {1}")]
    Irqfd(&'static str, u32, #[source] kvm_ioctls::Error),
    #[error("cannot create an interrupt eventfd")]
    EventFd(#[source] std::io::Error),
}

struct Table {
    routes: BTreeMap<u32, kvm_irq_routing_entry>,
    next_gsi: u32,
}

/// Shared by every device that raises MSIs.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter {
            vm,
            table: Mutex::new(Table {
                routes: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    pub fn allocate_gsi(&self) -> Result<u32, MsiError> {
        let mut table = lock(&self.table);
        if table.next_gsi >= MAX_GSI {
            return Err(MsiError::OutOfGsis);
        }
        let gsi = table.next_gsi;
        table.next_gsi += 1;
        Ok(gsi)
    }

    /// Routes `gsi` to the MSI message (`address`, `data`).
    pub fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), MsiError> {
        let mut entry = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_MSI,
            ..Default::default()
        };
        entry.u.msi.address_lo = address as u32;
        entry.u.msi.address_hi = (address >> 32) as u32;
        entry.u.msi.data = data;
        let mut table = lock(&self.table);
        // A route KVM refuses is not kept: it would fail every later
        // change to any other route with it.
        let before = table.routes.insert(gsi, entry);
        let committed = self.commit(&table);
        if committed.is_err() {
            match before {
                Some(before) => table.routes.insert(gsi, before),
                None => table.routes.remove(&gsi),
            };
        }
        committed
    }

    fn commit(&self, table: &Table) -> Result<(), MsiError> {
        let mut entries = Vec::with_capacity(40 + table.routes.len());
        for pin in 0..IOAPIC_PINS {
            entries.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
        }
        for pin in 0..16 {
            let (chip, chip_pin) = if pin < 8 {
                (KVM_IRQCHIP_PIC_MASTER, pin)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, pin - 8)
            };
            entries.push(irqchip_route(pin, chip, chip_pin));
        }
        entries.extend(table.routes.values().copied());
        let routing = KvmIrqRouting::from_entries(&entries).map_err(|_| MsiError::RoutingTable)?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(MsiError::SetRouting)
    }
}

/// One MSI vector: a GSI and the eventfd that raises it through an irqfd.
/// While masked, the irqfd is detached: signals accumulate in the eventfd
/// and are delivered when it is attached again (pending bit semantics).
pub struct MsiVector {
    pub gsi: u32,
    pub event: EventFd,
    attached: bool,
    /// The message the GSI is routed to: rewriting the same one skips
    /// KVM's routing table, which is rebuilt whole on every change.
    routed: Option<(u64, u32)>,
}

impl MsiVector {
    pub fn new(router: &GsiRouter) -> Result<Self, MsiError> {
        Ok(MsiVector {
            gsi: router.allocate_gsi()?,
            event: EventFd::new(libc::EFD_NONBLOCK).map_err(MsiError::EventFd)?,
            attached: false,
            routed: None,
        })
    }

    /// Points the vector at a message and attaches or detaches its irqfd.
    pub fn update(
        &mut self,
        router: &GsiRouter,
        message: Option<(u64, u32)>,
    ) -> Result<(), MsiError> {
        match message {
            Some((address, data)) => {
                if self.routed != Some((address, data)) {
                    router.set_msi_route(self.gsi, address, data)?;
                    self.routed = Some((address, data));
                }
                if !self.attached {
                    // A signal that arrived while masked is pending. KVM
                    // injects one for a count it finds when the irqfd is
                    // attached but leaves the count in place, so a later
                    // wake-up would inject it again: the count is taken
                    // first and signalled anew once attached (one delivery,
                    // which takes the count).
                    let pending = self.event.read().is_ok_and(|count| count > 0);
                    if let Err(e) = router.vm.register_irqfd(&self.event, self.gsi) {
                        if pending {
                            // Still pending, for the next attach.
                            let _ = self.event.write(1);
                        }
                        return Err(MsiError::Irqfd("attach", self.gsi, e));
                    }
                    self.attached = true;
                    if pending {
                        self.event.write(1).map_err(MsiError::EventFd)?;
                    }
                }
            }
            None if self.attached => {
                router
                    .vm
                    .unregister_irqfd(&self.event, self.gsi)
                    .map_err(|e| MsiError::Irqfd("detach", self.gsi, e))?;
                self.attached = false;
            }
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_ram;

    /// A route KVM refuses (here a GSI past KVM's table) leaves the table
    /// as it was, so the next route still goes in. Needs /dev/kvm.
    #[test]
    fn a_route_kvm_refuses_is_not_kept() {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let ram = create_guest_ram(16 << 20, false).expect("guest RAM");
        let vm = Arc::new(crate::vstate::vm::create_vm(&kvm, &ram.memory).expect("a VM"));
        let router = GsiRouter::new(vm);
        // KVM_MAX_IRQ_ROUTES is 4096.
        router
            .set_msi_route(1 << 20, 0xfee0_0000, 0x40)
            .expect_err("a GSI past KVM's routing table");
        router
            .set_msi_route(IOAPIC_PINS, 0xfee0_0000, 0x41)
            .expect("a good route after a refused one");
    }
}
