//! The hardware-reduced ACPI registers of the FADT: sleep control/status
//! and the reset register. Writing SLP_TYP=S5 with SLP_EN powers off; any
//! other sleep state is refused by waking at once (WAK_STS set), so a guest
//! that waits for the wake does not wait forever.

use std::sync::Arc;

use crate::arch::x86_64::acpi::SLP_TYP_S5;
use crate::arch::x86_64::layout::ports;
use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, VmExit};
use crate::guest_warnings::GuestWarnings;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// The sleep status register's "woken" bit; the guest writes 1 to clear it.
const WAK_STS: u8 = 1 << 7;

/// Covers ports ACPI_SLEEP_CONTROL..=ACPI_RESET.
pub struct AcpiPm {
    exit: Arc<ExitNotifier>,
    warnings: GuestWarnings,
    /// The sleep status register.
    status: u8,
}

pub const PORT_BASE: u16 = ports::ACPI_SLEEP_CONTROL;
pub const PORT_LEN: u16 = ports::ACPI_RESET - ports::ACPI_SLEEP_CONTROL + 1;

impl AcpiPm {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        AcpiPm {
            exit,
            warnings: GuestWarnings::default(),
            status: 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Only the sleep status register reads as anything but 0.
        for (i, byte) in data.iter_mut().enumerate() {
            let port = u64::from(PORT_BASE) + offset + i as u64;
            *byte = if port == u64::from(ports::ACPI_SLEEP_STATUS) {
                self.status
            } else {
                0
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The FADT says byte access; a wider write reaches each port it
        // covers, as on hardware.
        for (i, &value) in data.iter().enumerate() {
            self.write_port(u64::from(PORT_BASE) + offset + i as u64, value);
        }
    }
}

impl AcpiPm {
    /// As at power-on: not woken.
    pub fn reset(&mut self) {
        self.status = 0;
    }

    fn write_port(&mut self, port: u64, value: u8) {
        if port == u64::from(ports::ACPI_SLEEP_CONTROL) {
            let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
            if value & SLP_EN != 0 && slp_typ == SLP_TYP_S5 {
                self.exit.notify(VmExit::PowerOff);
            } else if value & SLP_EN != 0 {
                log::log!(
                    self.warnings.level("ACPI PM"),
                    "guest asked for unsupported sleep state {slp_typ}; it wakes at once"
                );
                self.status |= WAK_STS;
            }
        } else if port == u64::from(ports::ACPI_SLEEP_STATUS) {
            self.status &= !(value & WAK_STS);
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
    fn another_sleep_state_wakes_at_once_until_the_guest_clears_it() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        let status = u64::from(ports::ACPI_SLEEP_STATUS - PORT_BASE);
        let read = |pm: &mut AcpiPm| {
            let mut byte = [0xffu8];
            pm.read(status, &mut byte);
            byte[0]
        };
        assert_eq!(read(&mut pm), 0);
        // S3, as ACPICA's extended sleep writes it, then waits for WAK_STS.
        pm.write(0, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(exit.reason(), None);
        assert_eq!(read(&mut pm), WAK_STS);
        pm.write(status, &[0]);
        assert_eq!(read(&mut pm), WAK_STS, "writing 0 leaves it");
        pm.write(status, &[WAK_STS]);
        assert_eq!(read(&mut pm), 0);
        pm.write(0, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        pm.reset();
        assert_eq!(read(&mut pm), 0, "a reboot clears it");
    }

    #[test]
    fn a_wide_write_reaches_every_port_it_covers() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        // Status (0x601) and reset (0x602) in one 16-bit write.
        pm.write(
            u64::from(ports::ACPI_SLEEP_STATUS - PORT_BASE),
            &[0, ports::ACPI_RESET_VALUE],
        );
        assert_eq!(exit.reason(), Some(VmExit::Reset));
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
