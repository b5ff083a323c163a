//! Address buses: route a vCPU's port I/O or MMIO exit to the device that
//! owns the address. Unclaimed addresses read as all ones and ignore
//! writes, as on a PC. Ranges can come and go while vCPUs run (a guest
//! that reprograms a PCI BAR): the bus is locked only to find the device,
//! never while the device handles the access, so a device's handler may
//! change the ranges.

use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. `offset` is relative to the start of the range the
/// device was inserted at. The bus holds it in a `Mutex`, locked for each
/// access.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// What the bus holds: a device that serves accesses through `&self`,
/// doing its own locking, so accesses to different parts of it need not
/// wait for each other (a PCI BAR's window: its MSI-X table does not wait
/// for the device). A `Mutex` of a `BusDevice` is one, locked whole.
pub trait SharedBusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

impl<T: BusDevice + ?Sized> SharedBusDevice for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        lock(self).read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        lock(self).write(offset, data);
    }
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<dyn SharedBusDevice>,
}

/// The port I/O bus (ports are 16-bit but kept as u64 like MMIO).
pub type PioBus = Bus;
/// The MMIO bus (addresses KVM does not handle itself).
pub type MmioBus = Bus;

#[derive(Default)]
pub struct Bus {
    ranges: RwLock<Vec<Range>>,
}

#[derive(Debug, thiserror::Error)]
#[error("addresses {base:#x}+{len:#x} overlap another device")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

/// Whether `base..base + len` overlaps a range other than the one at `skip`.
fn overlaps(ranges: &[Range], base: u64, len: u64, skip: Option<u64>) -> bool {
    let end = base.saturating_add(len);
    ranges
        .iter()
        .filter(|r| Some(r.base) != skip)
        .any(|r| base < r.base.saturating_add(r.len) && r.base < end)
}

impl Bus {
    fn ranges(&self) -> std::sync::RwLockReadGuard<'_, Vec<Range>> {
        self.ranges.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ranges_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Range>> {
        self.ranges.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(
        &self,
        base: u64,
        len: u64,
        device: Arc<dyn SharedBusDevice>,
    ) -> Result<(), Overlap> {
        let mut ranges = self.ranges_mut();
        if len == 0 || base.checked_add(len).is_none() || overlaps(&ranges, base, len, None) {
            return Err(Overlap { base, len });
        }
        ranges.push(Range { base, len, device });
        Ok(())
    }

    /// Takes the range inserted at `base` off the bus.
    pub fn remove(&self, base: u64) -> Option<Arc<dyn SharedBusDevice>> {
        let mut ranges = self.ranges_mut();
        let at = ranges.iter().position(|r| r.base == base)?;
        Some(ranges.swap_remove(at).device)
    }

    /// The device at `addr` and the offset into its range.
    fn find(&self, addr: u64) -> Option<(Arc<dyn SharedBusDevice>, u64)> {
        self.ranges()
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (r.device.clone(), addr - r.base))
    }

    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((device, offset)) => device.read(offset, data),
            None => {
                log::trace!("read from unclaimed address {addr:#x}");
                data.fill(0xff);
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some((device, offset)) => device.write(offset, data),
            None => log::trace!("write {data:x?} to unclaimed address {addr:#x}"),
        }
    }
}

/// Locks a device; a device whose lock was poisoned by a panicking vCPU
/// thread is still usable (its state is plain data).
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_address_and_rejects_overlaps() {
        let bus = Bus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.insert(0x13, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        assert!(bus.insert(0x20, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut data = [0u8; 1];
        bus.read(0x12, &mut data);
        assert_eq!(data, [3]);
        bus.write(0x10, &[7]);
        bus.read(0x10, &mut data);
        assert_eq!(data, [7]);
        bus.read(0x20, &mut data);
        assert_eq!(data, [0xff]);
    }

    #[test]
    fn a_removed_range_frees_its_addresses() {
        let bus = Bus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.remove(0x30).is_none(), "nothing there");
        let echo = bus.remove(0x10).expect("the range at 0x10");
        let mut data = [0u8; 1];
        bus.read(0x10, &mut data);
        assert_eq!(data, [0xff], "the old place is free");
        bus.insert(0x40, 4, echo).unwrap();
        bus.read(0x41, &mut data);
        assert_eq!(data, [2], "the device answers at the new place");
    }
}
