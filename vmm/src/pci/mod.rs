//! PCI: configuration space (ports 0xCF8/0xCFC and ECAM), the devices on
//! bus 0, BAR allocation and MSI-X.

pub mod bus;
pub mod config;
pub mod config_io;
pub mod msix;

use std::sync::{Arc, Mutex};

/// A device's configuration registers, readable without the device: a
/// device busy with a slow exchange (a vhost-user backend that stalls)
/// holds up no configuration read, which Linux makes with interrupts off
/// and, through ports 0xCF8/0xCFC, with every CPU's accesses serialised.
#[derive(Clone)]
pub struct ConfigView {
    pub config: Arc<Mutex<config::PciConfiguration>>,
    /// A register the device itself answers (a window onto a BAR), if any.
    pub device_reg: Option<usize>,
}

/// A function on the PCI bus.
pub trait PciDevice: Send {
    /// Its configuration registers as a view the bus may read them
    /// through without locking the device; None to be asked each time.
    fn config_view(&self) -> Option<ConfigView> {
        None
    }
    /// Reads the dword at configuration register `reg` (byte offset / 4).
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` within configuration register `reg`.
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// An access to one of the device's BARs (`bar` index, offset in it).
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// A platform reset: back to the state the device had at power-on.
    fn reset(&mut self) {}
    /// The window of memory BAR `bar` came onto the bus at `at`: what the
    /// device keeps outside the bus for it (ioeventfds) is set up there.
    fn bar_mapped(&mut self, _bar: usize, _at: u64) -> Result<(), String> {
        Ok(())
    }
    /// The window left the bus from `at` (decoding off, a move, no room
    /// where the guest put it): what `bar_mapped` set up goes too.
    fn bar_unmapped(&mut self, _bar: usize, _at: u64) -> Result<(), String> {
        Ok(())
    }
}
