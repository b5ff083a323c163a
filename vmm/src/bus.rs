//! The port I/O bus: routes a vCPU's IN/OUT exit to the device that owns
//! the port. Unclaimed ports read as all ones and ignore writes, as on a PC.

use std::sync::{Arc, Mutex};

/// A device on the port I/O bus. `offset` is relative to the device's base.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error)]
#[error("I/O ports {base:#x}+{len} overlap another device")]
pub struct Overlap {
    pub base: u16,
    pub len: u16,
}

impl PioBus {
    pub fn insert(
        &mut self,
        base: u16,
        len: u16,
        device: Arc<Mutex<dyn PioDevice>>,
    ) -> Result<(), Overlap> {
        let end = u32::from(base) + u32::from(len);
        if self.ranges.iter().any(|r| {
            u32::from(base) < u32::from(r.base) + u32::from(r.len) && u32::from(r.base) < end
        }) {
            return Err(Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r, port - r.base))
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        match self.find(port) {
            Some((range, offset)) => lock(&range.device).read(offset, data),
            None => {
                log::trace!("read from unclaimed port {port:#x}");
                data.fill(0xff);
            }
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) {
        match self.find(port) {
            Some((range, offset)) => lock(&range.device).write(offset, data),
            None => log::trace!("write {data:x?} to unclaimed port {port:#x}"),
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
    impl PioDevice for Echo {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u16, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_port_and_rejects_overlaps() {
        let mut bus = PioBus::default();
        bus.insert(0x10, 4, Arc::new(Mutex::new(Echo(1)))).unwrap();
        assert!(bus.insert(0x13, 2, Arc::new(Mutex::new(Echo(0)))).is_err());
        let mut data = [0u8; 1];
        bus.read(0x12, &mut data);
        assert_eq!(data, [3]);
        bus.write(0x10, &[7]);
        bus.read(0x10, &mut data);
        assert_eq!(data, [7]);
        bus.read(0x20, &mut data);
        assert_eq!(data, [0xff]);
    }
}
