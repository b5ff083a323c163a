//! PCI bus 0: the host bridge at 00:00.0 and the devices in the other
//! slots, reached through configuration mechanism #1 or ECAM, plus the
//! MMIO windows of their BARs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::config::PciConfiguration;
use super::PciDevice;
use crate::bus::{lock, BusDevice};

pub const SLOTS: usize = 32;

/// The PCI-SIG-registered "generic PCIe host bridge" IDs (Red Hat vendor
/// space), which the guest's generic drivers know.
const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
const HOST_BRIDGE_DEVICE: u16 = 0x0008;
const CLASS_BRIDGE_HOST: u32 = 0x06_00_00;

struct HostBridge {
    config: PciConfiguration,
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize) -> u32 {
        self.config.read(reg)
    }
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write(reg, offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

pub struct PciBus {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("no free PCI slot on bus 0")]
pub struct NoFreeSlot;

impl PciBus {
    pub fn new() -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge {
            config: PciConfiguration::new(
                HOST_BRIDGE_VENDOR,
                HOST_BRIDGE_DEVICE,
                CLASS_BRIDGE_HOST,
                0,
            ),
        })));
        PciBus { slots }
    }

    /// The next free slot number, for a device about to be added.
    pub fn next_slot(&self) -> Result<u8, NoFreeSlot> {
        self.slots
            .iter()
            .position(Option::is_none)
            .map(|slot| slot as u8)
            .ok_or(NoFreeSlot)
    }

    /// Resets every device (platform reset).
    pub fn reset_devices(&self) {
        for device in self.slots.iter().flatten() {
            crate::bus::lock(device).reset();
        }
    }

    pub fn add(&mut self, slot: u8, device: Arc<Mutex<dyn PciDevice>>) {
        self.slots[usize::from(slot)] = Some(device);
    }

    fn device(&self, bus: u8, slot: u8, function: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))?.as_ref()
    }

    pub fn config_read(&self, bus: u8, slot: u8, function: u8, reg: usize) -> u32 {
        match self.device(bus, slot, function) {
            Some(device) => lock(device).config_read(reg),
            None => 0xffff_ffff,
        }
    }

    pub fn config_write(
        &self,
        bus: u8,
        slot: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        if let Some(device) = self.device(bus, slot, function) {
            lock(device).config_write(reg, offset, data);
        }
    }
}

/// Extracts `data.len()` bytes at `offset` from a dword.
pub fn dword_bytes(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = bytes.get(offset as usize + i).copied().unwrap_or(0xff);
    }
}

/// ECAM: 4 KiB of configuration space per function, bus 0 only.
pub struct Ecam {
    bus: Arc<Mutex<PciBus>>,
}

impl Ecam {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        Ecam { bus }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, u64) {
        let bus = (offset >> 20) as u8;
        let slot = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) >> 2) as usize;
        (bus, slot, function, reg, offset & 0x3)
    }
}

impl BusDevice for Ecam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, slot, function, reg, byte) = Self::decode(offset);
        let value = lock(&self.bus).config_read(bus, slot, function, reg);
        dword_bytes(value, byte, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, slot, function, reg, byte) = Self::decode(offset);
        lock(&self.bus).config_write(bus, slot, function, reg, byte, data);
    }
}

/// Accesses that reached the VMM through one device's BARs.
#[derive(Default)]
pub struct BarExitCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

/// A BAR's MMIO window on the bus, forwarding to its device and counting
/// the exits.
pub struct BarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
    counters: Arc<BarExitCounters>,
}

impl BarRegion {
    pub fn new(
        device: Arc<Mutex<dyn PciDevice>>,
        bar: usize,
        counters: Arc<BarExitCounters>,
    ) -> Self {
        BarRegion {
            device,
            bar,
            counters,
        }
    }
}

impl BusDevice for BarRegion {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        lock(&self.device).bar_read(self.bar, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.device).bar_write(self.bar, offset, data);
    }
}
