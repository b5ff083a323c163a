//! The hardware-reduced ACPI registers of the FADT: sleep control/status
//! and the reset register. Writing SLP_TYP=S5 with SLP_EN powers off.

use std::sync::Arc;

use crate::arch::x86_64::acpi::SLP_TYP_S5;
use crate::arch::x86_64::layout::ports;
use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, VmExit};
use crate::guest_warnings::GuestWarnings;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Covers ports ACPI_SLEEP_CONTROL..=ACPI_RESET.
pub struct AcpiPm {
    exit: Arc<ExitNotifier>,
    warnings: GuestWarnings,
}

pub const PORT_BASE: u16 = ports::ACPI_SLEEP_CONTROL;
pub const PORT_LEN: u16 = ports::ACPI_RESET - ports::ACPI_SLEEP_CONTROL + 1;

impl AcpiPm {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        AcpiPm {
            exit,
            warnings: GuestWarnings::default(),
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: never "woken"; nothing else is readable.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = u64::from(PORT_BASE) + offset;
        if port == u64::from(ports::ACPI_SLEEP_CONTROL) {
            let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if value & SLP_EN != 0 && slp_typ == SLP_TYP_S5 {
                self.exit.notify(VmExit::PowerOff);
            } else if value & SLP_EN != 0 {
                log::log!(
                    self.warnings.level("ACPI PM"),
                    "guest asked for unsupported sleep state {slp_typ}"
                );
            }
        } else if port == u64::from(ports::ACPI_RESET) && value == ports::ACPI_RESET_VALUE {
            self.exit.notify(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(0, &[SLP_TYP_S5 << SLP_TYP_SHIFT]);
        assert_eq!(exit.reason(), None);
        pm.write(0, &[(SLP_TYP_S5 << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(exit.reason(), Some(VmExit::PowerOff));
    }

    #[test]
    fn reset_register_resets() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(
            u64::from(ports::ACPI_RESET - PORT_BASE),
            &[ports::ACPI_RESET_VALUE],
        );
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
