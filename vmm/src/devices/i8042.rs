//! The i8042 keyboard controller, only as far as its "pulse reset line"
//! command (0xFE on port 0x64), a reset path guests use without ACPI.
//! (The other legacy one, 0xCF9, shares ports with PCI configuration.)

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, VmExit};

const CMD_RESET_CPU: u8 = 0xfe;

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
        if value == CMD_RESET_CPU {
            self.exit.notify(VmExit::Reset);
        }
    }
}
