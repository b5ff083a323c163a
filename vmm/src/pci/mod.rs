//! PCI: configuration space (ports 0xCF8/0xCFC and ECAM), the devices on
//! bus 0, BAR allocation and MSI-X.

pub mod bus;
pub mod config;
pub mod config_io;
pub mod msix;

/// A function on the PCI bus.
pub trait PciDevice: Send {
    /// Reads the dword at configuration register `reg` (byte offset / 4).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` within configuration register `reg`.
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// An access to one of the device's BARs (`bar` index, offset in it).
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// A platform reset: back to the state the device had at power-on.
    fn reset(&mut self) {}
    /// The guest moved memory BAR `bar` from `from` to `to` (the bus
    /// already routes its accesses there): what the device registered at
    /// the old address (ioeventfds) follows.
    fn move_bar(&mut self, _bar: usize, _from: u64, _to: u64) -> Result<(), String> {
        Ok(())
    }
}
