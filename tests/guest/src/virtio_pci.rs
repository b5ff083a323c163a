// Register fields are cut out of wider words on purpose.
#![allow(clippy::cast_possible_truncation)]
//! The modern virtio-pci transport shared by the drivers: finding the
//! virtio structures in the BARs, register access, feature negotiation and
//! queue setup.

use crate::clock::{Deadline, SECOND};
use crate::pcicfg::Function;
use crate::Fail;

const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_DEVICE: u8 = 4;

pub const STATUS_ACK: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;

pub const F_VERSION_1: u64 = 1 << 32;

pub const DESC_NEXT: u16 = 1;
/// VIRTIO_MSI_NO_VECTOR: a queue or configuration change without MSI-X.
pub const NO_VECTOR: u16 = 0xffff;
pub const DESC_WRITE: u16 = 2;

/// How long a reset may take (a vhost-user device stops its backend's
/// rings first) before it counts as stuck.
const RESET_TIMEOUT: u64 = 30 * SECOND;

pub fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: callers pass device registers from the BARs or scratch RAM,
    // both inside the guest's identity map.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

pub fn wr<T: Copy>(addr: u64, value: T) {
    // SAFETY: as for `rd`.
    unsafe { core::ptr::write_volatile(addr as *mut T, value) }
}

pub struct Device {
    pub common: u64,
    pub notify: u64,
    pub notify_multiplier: u32,
    pub device_cfg: u64,
    pub msix_table: Option<u64>,
    pub msix_cap: u8,
}

/// Finds the virtio structures in the device's BARs.
pub fn locate(f: Function) -> Result<Device, Fail> {
    let mut common = None;
    let mut notify = None;
    let mut device_cfg = None;
    let mut multiplier = 0;
    let mut msix = None;
    f.capabilities(|offset, id| match id {
        CAP_VENDOR => {
            let cfg_type = f.read8(offset + 3);
            let bar = f.read8(offset + 4);
            let at = f.bar_address(bar) + u64::from(f.read32(offset + 8));
            match cfg_type {
                CFG_COMMON if common.is_none() => common = Some(at),
                CFG_NOTIFY if notify.is_none() => {
                    notify = Some(at);
                    multiplier = f.read32(offset + 16);
                }
                CFG_DEVICE if device_cfg.is_none() => device_cfg = Some(at),
                _ => {}
            }
        }
        CAP_MSIX => {
            let table = f.read32(offset + 4);
            let at = f.bar_address((table & 7) as u8) + u64::from(table & !7);
            msix = Some((offset, at));
        }
        _ => {}
    });
    let missing = |what| Fail::new(what);
    let common = common.ok_or(missing("virtio common config not found"))?;
    let notify = notify.ok_or(missing("virtio notify structure not found"))?;
    let device_cfg = device_cfg.ok_or(missing("virtio device config not found"))?;
    for addr in [common, notify, device_cfg] {
        if !(0x1000..crate::phys::MAPPED_END).contains(&addr) {
            return Err(Fail::at("virtio BAR unassigned or above 4 GiB", addr));
        }
    }
    Ok(Device {
        common,
        notify,
        notify_multiplier: multiplier,
        device_cfg,
        msix_table: msix.map(|m| m.1),
        msix_cap: msix.map_or(0, |m| m.0),
    })
}

impl Device {
    /// Resets the device, sets ACKNOWLEDGE and DRIVER, and negotiates
    /// VERSION_1 plus whatever of `supported` the device offers, ending
    /// with FEATURES_OK. Returns the negotiated features.
    pub fn negotiate(&self, supported: u64) -> Result<u64, Fail> {
        let c = self.common;
        wr(c + 0x14, 0u8);
        let deadline = Deadline::after(RESET_TIMEOUT);
        while rd::<u8>(c + 0x14) != 0 {
            if deadline.passed() {
                return Err(Fail::new("virtio device did not reset"));
            }
        }
        wr(c + 0x14, STATUS_ACK);
        wr(c + 0x14, STATUS_ACK | STATUS_DRIVER);
        wr(c, 0u32);
        let mut offered = u64::from(rd::<u32>(c + 4));
        wr(c, 1u32);
        offered |= u64::from(rd::<u32>(c + 4)) << 32;
        if offered & F_VERSION_1 == 0 {
            return Err(Fail::new("virtio device without VERSION_1"));
        }
        let wanted = offered & (F_VERSION_1 | supported);
        wr(c + 0x08, 0u32);
        wr(c + 0x0c, wanted as u32);
        wr(c + 0x08, 1u32);
        wr(c + 0x0c, (wanted >> 32) as u32);
        wr(c + 0x14, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
        if rd::<u8>(c + 0x14) & STATUS_FEATURES_OK == 0 {
            return Err(Fail::new("virtio device refused FEATURES_OK"));
        }
        Ok(wanted)
    }

    /// Sets up queue `index` with `size` entries in the zeroed 4 KiB page
    /// at `ring` (descriptors at 0, available ring at 0x200, used ring at
    /// 0x400), with MSI-X table entry `vector` (or none), and enables it.
    /// Returns the queue's notify address.
    pub fn setup_queue(
        &self,
        index: u16,
        size: u16,
        ring: u64,
        vector: Option<u16>,
    ) -> Result<u64, Fail> {
        let c = self.common;
        wr(c + 0x16, index);
        let max = rd::<u16>(c + 0x18);
        if max == 0 {
            return Err(Fail::new("virtio queue missing"));
        }
        if max < size {
            return Err(Fail::new("virtio queue smaller than the driver needs"));
        }
        wr(c + 0x18, size);
        // SAFETY: the ring page is free RAM reserved for the driver.
        unsafe { core::ptr::write_bytes(ring as *mut u8, 0, 0x1000) };
        for (off, addr) in [(0x20, ring), (0x28, ring + 0x200), (0x30, ring + 0x400)] {
            wr(c + off, addr as u32);
            wr(c + off + 4, (addr >> 32) as u32);
        }
        let vector = vector.unwrap_or(NO_VECTOR);
        wr(c + 0x1a, vector);
        if rd::<u16>(c + 0x1a) != vector {
            return Err(Fail::new("virtio device refused a queue's MSI-X vector"));
        }
        let notify =
            self.notify + u64::from(rd::<u16>(c + 0x1e)) * u64::from(self.notify_multiplier);
        wr(c + 0x1c, 1u16);
        Ok(notify)
    }

    /// The entries in the MSI-X table (0 without MSI-X).
    pub fn msix_entries(&self, f: Function) -> u16 {
        if self.msix_table.is_none() {
            return 0;
        }
        // Message Control (the upper half): table size minus one.
        ((f.read32(self.msix_cap) >> 16) & 0x7ff) as u16 + 1
    }

    /// Points MSI-X table entry `entry` at interrupt `vector` on CPU 0 and
    /// enables MSI-X on the function.
    pub fn route_msix(&self, f: Function, entry: u16, vector: u8) -> Result<(), Fail> {
        let table = self
            .msix_table
            .ok_or(Fail::new("virtio device without MSI-X"))?;
        if entry >= self.msix_entries(f) {
            return Err(Fail::new("virtio device has too few MSI-X entries"));
        }
        let control = f.read32(self.msix_cap);
        let at = table + 16 * u64::from(entry);
        wr(at, 0xfee0_0000u32);
        wr(at + 4, 0u32);
        wr(at + 8, u32::from(vector));
        wr(at + 12, 0u32);
        f.write32(self.msix_cap, control | 1 << 31);
        Ok(())
    }

    /// Has configuration changes signalled on MSI-X table entry `vector`.
    pub fn set_config_vector(&self, vector: u16) -> Result<(), Fail> {
        wr(self.common + 0x10, vector);
        if rd::<u16>(self.common + 0x10) != vector {
            return Err(Fail::new(
                "virtio device refused the configuration MSI-X vector",
            ));
        }
        Ok(())
    }

    pub fn driver_ok(&self) {
        wr(
            self.common + 0x14,
            STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    /// Resets the device so that it no longer touches the rings or buffers.
    pub fn reset(&self) {
        wr(self.common + 0x14, 0u8);
    }
}
