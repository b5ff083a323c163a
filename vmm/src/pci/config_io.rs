//! PCI configuration mechanism #1: ports 0xCF8 (address) and 0xCFC (data),
//! plus the reset control register that shares the range at 0xCF9 (byte
//! accesses).

use std::sync::Arc;

use super::bus::{dword_bytes, ConfigSpace};
use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, VmExit};

pub const PORT_BASE: u16 = 0xcf8;
pub const PORT_LEN: u16 = 8;

const ENABLE: u32 = 1 << 31;
/// 0xCF9 bit 2: reset the CPU.
const RST_CPU: u8 = 1 << 2;

pub struct PciConfigIo {
    address: u32,
    config: ConfigSpace,
    exit: Arc<ExitNotifier>,
}

impl PciConfigIo {
    pub fn new(config: ConfigSpace, exit: Arc<ExitNotifier>) -> Self {
        PciConfigIo {
            address: 0,
            config,
            exit,
        }
    }

    /// As at power-on: no configuration address selected.
    pub fn reset(&mut self) {
        self.address = 0;
    }

    fn target(&self) -> (u8, u8, u8, usize) {
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address & 0xfc) >> 2) as usize;
        (bus, slot, function, reg)
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if self.address & ENABLE != 0 => {
                let (bus, slot, function, reg) = self.target();
                let value = self.config.read(bus, slot, function, reg);
                dword_bytes(value, offset - 4, data);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(data);
                self.address = u32::from_le_bytes(bytes);
            }
            (1, 1) if data[0] & RST_CPU != 0 => self.exit.notify(VmExit::Reset),
            (4..=7, _) if self.address & ENABLE != 0 => {
                let (bus, slot, function, reg) = self.target();
                self.config
                    .write(bus, slot, function, reg, offset - 4, data);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::pci::bus::PciBus;

    fn read_config(pci: &mut PciConfigIo, bdf_reg: u32) -> u32 {
        pci.write(0, &(ENABLE | bdf_reg).to_le_bytes());
        let mut data = [0u8; 4];
        pci.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn host_bridge_answers_and_empty_slots_read_all_ones() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let bus = Arc::new(Mutex::new(PciBus::new(&Arc::default())));
        let mut pci = PciConfigIo::new(ConfigSpace::new(bus), exit.clone());
        assert_eq!(read_config(&mut pci, 0), 0x0008_1b36);
        assert_eq!(read_config(&mut pci, 8) >> 8, 0x06_00_00);
        assert_eq!(read_config(&mut pci, 1 << 11), 0xffff_ffff);
        // The address register reads back (how guests detect mechanism #1).
        let mut data = [0u8; 4];
        pci.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), ENABLE | 1 << 11);
        pci.write(1, &[0x6]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
        // The reset it asks for clears the address, as at power-on.
        pci.reset();
        pci.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0);
    }
}
