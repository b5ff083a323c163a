//! PCI configuration mechanism #1 (ports 0xCF8 address, 0xCFC data) with the
//! host bridge at 00:00.0, plus the reset control register that shares the
//! range at 0xCF9 (byte access).

use std::sync::Arc;

use crate::bus::PioDevice;
use crate::exit::{ExitNotifier, VmExit};

pub const PORT_BASE: u16 = 0xcf8;
pub const PORT_LEN: u16 = 8;

const ENABLE: u32 = 1 << 31;
/// 0xCF9 bit 2: reset the CPU.
const RST_CPU: u8 = 1 << 2;

/// Identification of the host bridge: the PCI-SIG's "generic PCIe host
/// bridge" IDs (Red Hat vendor space), as used by other VMMs' generic buses.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_BRIDGE_HOST: u32 = 0x06_00_00;

pub struct PciConfigIo {
    address: u32,
    exit: Arc<ExitNotifier>,
}

impl PciConfigIo {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        PciConfigIo { address: 0, exit }
    }

    /// Reads a dword of configuration space. Only the host bridge exists.
    fn config_read(&self, bus: u8, device: u8, function: u8, register: u8) -> u32 {
        if bus != 0 || device != 0 || function != 0 {
            return 0xffff_ffff;
        }
        match register {
            0x00 => u32::from(HOST_BRIDGE_DEVICE) << 16 | u32::from(HOST_BRIDGE_VENDOR),
            0x08 => CLASS_BRIDGE_HOST << 8,
            _ => 0,
        }
    }
}

impl PioDevice for PciConfigIo {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            0..=3 if data.len() == 4 && offset == 0 => {
                data.copy_from_slice(&self.address.to_le_bytes());
            }
            4..=7 => {
                if self.address & ENABLE == 0 {
                    data.fill(0xff);
                    return;
                }
                let bus = (self.address >> 16) as u8;
                let device = ((self.address >> 11) & 0x1f) as u8;
                let function = ((self.address >> 8) & 0x7) as u8;
                let register = (self.address & 0xfc) as u8;
                let value = self
                    .config_read(bus, device, function, register)
                    .to_le_bytes();
                let start = usize::from(offset - 4);
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = value.get(start + i).copied().unwrap_or(0xff);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        match (offset, data.len()) {
            (0, 4) => {
                let mut bytes = [0u8; 4];
                bytes.copy_from_slice(data);
                self.address = u32::from_le_bytes(bytes);
            }
            (1, 1) if data[0] & RST_CPU != 0 => self.exit.notify(VmExit::Reset),
            // Writes to the host bridge's configuration space are ignored.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_config(pci: &mut PciConfigIo, bdf_reg: u32) -> u32 {
        pci.write(0, &(ENABLE | bdf_reg).to_le_bytes());
        let mut data = [0u8; 4];
        pci.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn host_bridge_is_the_only_device() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut pci = PciConfigIo::new(exit.clone());
        assert_eq!(read_config(&mut pci, 0), 0x0008_1b36);
        assert_eq!(read_config(&mut pci, 8) >> 8, 0x06_00_00);
        assert_eq!(read_config(&mut pci, 1 << 11), 0xffff_ffff);
        // The address register reads back (how guests detect mechanism #1).
        let mut data = [0u8; 4];
        pci.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), ENABLE | 1 << 11);
        pci.write(1, &[0x6]);
        assert_eq!(exit.reason(), Some(VmExit::Reset));
    }
}
