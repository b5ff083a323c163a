//! The ACPI Generic Event Device (ACPI0013): how a hardware-reduced ACPI
//! platform tells the guest about events such as the power button. The
//! device raises its interrupt (an irqfd on `GED_IRQ`); the DSDT's `_EVT`
//! method reads the 32-bit event register (which clears it) and notifies
//! the power button device (PNP0C0C) when bit 0 is set.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Event bit: the power button was pressed.
pub const EVENT_POWER_BUTTON: u32 = 1;

/// Raises events; shared by the MMIO device and the control API.
pub struct GedEvents {
    pending: AtomicU32,
    irq: EventFd,
}

impl GedEvents {
    pub fn new(irq: EventFd) -> Arc<Self> {
        Arc::new(GedEvents {
            pending: AtomicU32::new(0),
            irq,
        })
    }

    /// Forgets events the last boot did not read (a reboot).
    pub fn reset(&self) {
        self.pending.store(0, Ordering::Release);
    }

    /// Latches `event` and interrupts the guest.
    pub fn raise(&self, event: u32) -> std::io::Result<()> {
        self.pending.fetch_or(event, Ordering::AcqRel);
        self.irq.write(1)
    }
}

/// The event register on the MMIO bus.
pub struct Ged(pub Arc<GedEvents>);

impl BusDevice for Ged {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 && data.len() == 4 {
            let events = self.0.pending.swap(0, Ordering::AcqRel);
            data.copy_from_slice(&events.to_le_bytes());
        }
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reading_the_register_returns_and_clears_the_events() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = GedEvents::new(irq.try_clone().unwrap());
        let mut ged = Ged(events.clone());
        events.raise(EVENT_POWER_BUTTON).unwrap();
        assert_eq!(irq.read().unwrap(), 1, "the interrupt was raised");
        let mut data = [0u8; 4];
        ged.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), EVENT_POWER_BUTTON);
        ged.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0, "read clears");
    }
}
