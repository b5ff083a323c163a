//! The i8042 keyboard controller, only as far as its "pulse output lines"
//! commands (0xF0-0xFF on port 0x64) that pulse the reset line (bit 0
//! clear; 0xFE is the usual one), a reset path guests use without ACPI.
//! (The other legacy one, 0xCF9, shares ports with PCI configuration.)

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, VmExit};

/// "Pulse output lines": the low four bits are the lines, 0 for pulsed.
const CMD_PULSE_MASK: u8 = 0xf0;
/// Output line 0 is the CPU reset.
const LINE_RESET: u8 = 1 << 0;

/// Port 0x64, the i8042 command/status register.
pub struct I8042 {
    exit: Arc<ExitNotifier>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // i8042 status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if value & CMD_PULSE_MASK == CMD_PULSE_MASK && value & LINE_RESET == 0 {
            self.exit.notify(VmExit::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulse_of_the_reset_line_resets_and_other_commands_do_not() {
        for (command, resets) in [
            (0xfe, true),
            (0xf0, true),
            (0xfa, true),
            (0xff, false),
            (0xd1, false),
            (0xef, false),
        ] {
            let exit = Arc::new(ExitNotifier::new().unwrap());
            let mut i8042 = I8042::new(exit.clone());
            i8042.write(0, &[command]);
            assert_eq!(
                exit.reason() == Some(VmExit::Reset),
                resets,
                "command {command:#x}"
            );
        }
    }
}
