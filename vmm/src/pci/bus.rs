//! PCI bus 0: the host bridge at 00:00.0 and the devices in the other
//! slots, reached through configuration mechanism #1 or ECAM, plus the
//! MMIO windows of their BARs, which follow the guest when it moves a BAR.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::config::PciConfiguration;
use super::msix::MsixRegion;
use super::{ConfigView, PciDevice};
use crate::bus::{lock, MmioBus, Overlap, SharedBusDevice};
use crate::guest_warnings::GuestWarnings;

const COMMAND_REG: usize = 1;
const COMMAND_MEMORY: u32 = 1 << 1;
const BAR0_REG: usize = 4;

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
    fn reset(&mut self) {
        self.config.reset();
    }
}

pub struct PciBus {
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    /// Each slot's device's `config_view`, taken when it was added.
    views: Vec<Option<ConfigView>>,
    /// Where BAR windows go (weak: the bus holds ECAM, which holds this).
    mmio: Weak<MmioBus>,
    bars: Vec<MappedBar>,
}

/// A 64-bit memory BAR's window on the MMIO bus.
struct MappedBar {
    slot: u8,
    index: usize,
    size: u64,
    window: Arc<dyn SharedBusDevice>,
    /// Where the window is on the bus, if it is; the device has what
    /// follows the BAR (ioeventfds) there too, and nowhere else.
    mapped: Option<u64>,
    /// The low and high registers were last written all ones: the BAR is
    /// being sized, and holds its size mask, not an address.
    sizing: [bool; 2],
    /// Placements the guest got wrong.
    warnings: GuestWarnings,
}

impl MappedBar {
    /// The address the BAR holds, or None while it is being sized.
    fn programmed(&self, device: &mut dyn PciDevice) -> Option<u64> {
        if self.sizing.contains(&true) {
            return None;
        }
        let low = device.config_read(BAR0_REG + self.index) & !0xf;
        let high = device.config_read(BAR0_REG + self.index + 1);
        Some(u64::from(high) << 32 | u64::from(low))
    }

    /// Puts the window at `to`, and has the device follow, unless it would
    /// overlap another range.
    fn place(&mut self, mmio: &MmioBus, device: &mut dyn PciDevice, to: u64) {
        let slot = self.slot;
        let index = self.index;
        if let Err(e) = mmio.insert(to, self.size, self.window.clone()) {
            let who = format!("PCI 00:{slot:02x}.0: BAR{index}");
            log::log!(
                self.warnings.level(&who),
                "{who} at {to:#x} is off the bus until it moves: {e}"
            );
            return;
        }
        self.mapped = Some(to);
        match device.bar_mapped(index, to) {
            Ok(()) => log::info!("PCI 00:{slot:02x}.0: BAR{index} on the bus at {to:#x}"),
            Err(e) => log::error!("PCI 00:{slot:02x}.0: BAR{index} at {to:#x}, but {e}"),
        }
    }

    /// Takes the window off the bus, and what follows it.
    fn remove(&mut self, mmio: &MmioBus, device: &mut dyn PciDevice) {
        let Some(at) = self.mapped.take() else {
            return;
        };
        mmio.remove(at);
        if let Err(e) = device.bar_unmapped(self.index, at) {
            log::error!(
                "PCI 00:{:02x}.0: BAR{} left {at:#x}, but {e}",
                self.slot,
                self.index
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no free PCI slot on bus 0")]
pub struct NoFreeSlot;

impl PciBus {
    pub fn new(mmio: &Arc<MmioBus>) -> Self {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; SLOTS];
        let mut config =
            PciConfiguration::new(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_BRIDGE_HOST, 0);
        config.remember_power_on();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge { config })));
        PciBus {
            slots,
            views: vec![None; SLOTS],
            mmio: Arc::downgrade(mmio),
            bars: Vec::new(),
        }
    }

    /// The next free slot number, for a device about to be added.
    pub fn next_slot(&self) -> Result<u8, NoFreeSlot> {
        self.slots
            .iter()
            .position(Option::is_none)
            .map(|slot| slot as u8)
            .ok_or(NoFreeSlot)
    }

    /// Resets every device (platform reset); with memory decoding off, the
    /// BAR windows leave the bus until the guest turns it on again.
    pub fn reset_devices(&mut self) {
        let devices: Vec<(u8, Arc<Mutex<dyn PciDevice>>)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, device)| Some((slot as u8, device.clone()?)))
            .collect();
        for bar in &mut self.bars {
            bar.sizing = [false; 2];
        }
        for (slot, device) in devices {
            crate::bus::lock(&device).reset();
            self.place_bars(slot, &device);
        }
    }

    pub fn add(&mut self, slot: u8, device: Arc<Mutex<dyn PciDevice>>) {
        self.views[usize::from(slot)] = lock(&device).config_view();
        self.slots[usize::from(slot)] = Some(device);
    }

    /// Puts the window of the 64-bit memory BAR `index` of the device in
    /// `slot`, programmed at `addr`, on the MMIO bus (the device set up
    /// what follows the BAR there when it was made).
    pub fn map_bar(
        &mut self,
        slot: u8,
        index: usize,
        addr: u64,
        size: u64,
        window: Arc<dyn SharedBusDevice>,
    ) -> Result<(), Overlap> {
        let mmio = self.mmio.upgrade().ok_or(Overlap {
            base: addr,
            len: size,
        })?;
        mmio.insert(addr, size, window.clone())?;
        self.bars.push(MappedBar {
            slot,
            index,
            size,
            window,
            mapped: Some(addr),
            sizing: [false; 2],
            warnings: GuestWarnings::default(),
        });
        Ok(())
    }

    /// After a write to the command register or a BAR of the device in
    /// `slot`: its BAR windows are on the MMIO bus where its BARs point
    /// while memory decoding is on, and off it while decoding is off (so a
    /// guest can swap two BARs). A BAR whose low or high half was last
    /// written all ones is being sized, not moved. A window that would overlap another
    /// stays off the bus until a later change makes room.
    fn place_bars(&mut self, slot: u8, device: &Arc<Mutex<dyn PciDevice>>) {
        let Some(mmio) = self.mmio.upgrade() else {
            return;
        };
        let mut changed = false;
        {
            let mut device = lock(device);
            let decoding = device.config_read(COMMAND_REG) & COMMAND_MEMORY != 0;
            for bar in self.bars.iter_mut().filter(|b| b.slot == slot) {
                let wanted = if decoding {
                    match bar.programmed(&mut *device) {
                        Some(addr) => Some(addr),
                        None => continue,
                    }
                } else {
                    None
                };
                if wanted == bar.mapped {
                    continue;
                }
                changed = true;
                bar.remove(&mmio, &mut *device);
                if let Some(to) = wanted {
                    bar.place(&mmio, &mut *device, to);
                }
            }
        }
        if changed {
            self.place_waiting_bars(&mmio);
        }
    }

    /// Puts on the bus the windows that found no room when their device
    /// asked for them.
    fn place_waiting_bars(&mut self, mmio: &MmioBus) {
        for bar in self.bars.iter_mut().filter(|b| b.mapped.is_none()) {
            let Some(Some(device)) = self.slots.get(usize::from(bar.slot)) else {
                continue;
            };
            let mut device = lock(device);
            if device.config_read(COMMAND_REG) & COMMAND_MEMORY == 0 {
                continue;
            }
            if let Some(to) = bar.programmed(&mut *device) {
                bar.place(mmio, &mut *device, to);
            }
        }
    }

    fn device(&self, bus: u8, slot: u8, function: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.slots.get(usize::from(slot))?.clone()
    }

    /// Before a configuration write reaches the device in `slot`: notes
    /// whether it sizes a BAR, told by the value written, not read back (a
    /// BAR's size mask can also be a real address: 0x1_ffff_8000 for 32
    /// KiB).
    fn before_config_write(&mut self, slot: u8, reg: usize, offset: u64, data: &[u8]) {
        let Some(bar_reg) = reg.checked_sub(BAR0_REG).filter(|r| *r < 6) else {
            return;
        };
        // A write the register does not take (an 8-byte ECAM store, a
        // dword at byte 1) leaves it, and whether it is being sized, as
        // it was.
        if offset as usize + data.len() > 4 {
            return;
        }
        let all_ones = offset == 0 && data.len() == 4 && data.iter().all(|&b| b == 0xff);
        for bar in self.bars.iter_mut().filter(|b| b.slot == slot) {
            if let Some(half) = bar_reg.checked_sub(bar.index).filter(|h| *h < 2) {
                bar.sizing[half] = all_ones;
            }
        }
    }
}

/// Whether a write to `reg` may move a BAR window.
fn moves_windows(reg: usize) -> bool {
    reg == COMMAND_REG || (BAR0_REG..BAR0_REG + 6).contains(&reg)
}

/// Configuration accesses to the devices on a bus (mechanism #1 and ECAM
/// share one). A device is locked only once the bus is let go, except to
/// move its BAR windows: one busy device (a backend reconnecting under its
/// lock) holds up writes to itself, not accesses to every device; reads of
/// a device with a `ConfigView` do not wait for it at all.
#[derive(Clone)]
pub struct ConfigSpace {
    bus: Arc<Mutex<PciBus>>,
}

impl ConfigSpace {
    pub fn new(bus: Arc<Mutex<PciBus>>) -> Self {
        ConfigSpace { bus }
    }

    pub fn read(&self, bus: u8, slot: u8, function: u8, reg: usize) -> u32 {
        let (device, view) = {
            let pci = lock(&self.bus);
            let device = pci.device(bus, slot, function);
            let view = device
                .as_ref()
                .and_then(|_| pci.views.get(usize::from(slot)).cloned().flatten());
            (device, view)
        };
        match (device, view) {
            (Some(_), Some(view)) if view.device_reg != Some(reg) => lock(&view.config).read(reg),
            (Some(device), _) => lock(&device).config_read(reg),
            (None, _) => 0xffff_ffff,
        }
    }

    pub fn write(&self, bus: u8, slot: u8, function: u8, reg: usize, offset: u64, data: &[u8]) {
        let device = {
            let mut pci = lock(&self.bus);
            let Some(device) = pci.device(bus, slot, function) else {
                return;
            };
            pci.before_config_write(slot, reg, offset, data);
            device
        };
        lock(&device).config_write(reg, offset, data);
        if moves_windows(reg) {
            lock(&self.bus).place_bars(slot, &device);
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
    config: ConfigSpace,
}

impl Ecam {
    pub fn new(config: ConfigSpace) -> Self {
        Ecam { config }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, u64) {
        let bus = (offset >> 20) as u8;
        let slot = ((offset >> 15) & 0x1f) as u8;
        let function = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) >> 2) as usize;
        (bus, slot, function, reg, offset & 0x3)
    }
}

/// Not behind a lock of its own: it has no state. An access waits for the
/// bus (held briefly, except by a write that moves a device's BAR windows,
/// for as long as that device is busy) and for the device it reaches.
impl SharedBusDevice for Ecam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (bus, slot, function, reg, byte) = Self::decode(offset);
        let value = self.config.read(bus, slot, function, reg);
        dword_bytes(value, byte, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (bus, slot, function, reg, byte) = Self::decode(offset);
        self.config.write(bus, slot, function, reg, byte, data);
    }
}

/// Accesses that reached the VMM through one device's BARs.
#[derive(Default)]
pub struct BarExitCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

/// A BAR's MMIO window on the bus, forwarding to its device and counting
/// the exits. It holds no lock of its own: the MSI-X table and PBA, when
/// the BAR holds them, are served without the device's lock (see
/// `MsixRegion`), the rest under it.
pub struct BarRegion {
    device: Arc<Mutex<dyn PciDevice>>,
    bar: usize,
    counters: Arc<BarExitCounters>,
    msix: Option<MsixRegion>,
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
            msix: None,
        }
    }

    /// The BAR holds the device's MSI-X table and PBA.
    pub fn with_msix(mut self, msix: MsixRegion) -> Self {
        self.msix = Some(msix);
        self
    }
}

impl SharedBusDevice for BarRegion {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        if self.msix.as_ref().is_some_and(|m| m.read(offset, data)) {
            return;
        }
        lock(&self.device).bar_read(self.bar, offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        if self.msix.as_ref().is_some_and(|m| m.write(offset, data)) {
            return;
        }
        lock(&self.device).bar_write(self.bar, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    /// A device with one 64-bit BAR that answers reads with its own byte
    /// and records where it was told its window came (`+`) and left (`-`).
    struct Moving {
        config: Arc<Mutex<PciConfiguration>>,
        byte: u8,
        moves: Vec<(char, u64)>,
    }

    impl PciDevice for Moving {
        fn config_view(&self) -> Option<ConfigView> {
            Some(ConfigView {
                config: self.config.clone(),
                device_reg: None,
            })
        }
        fn config_read(&mut self, reg: usize) -> u32 {
            lock(&self.config).read(reg)
        }
        fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
            lock(&self.config).write(reg, offset, data);
        }
        fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
            data.fill(self.byte);
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
        fn bar_mapped(&mut self, _bar: usize, at: u64) -> Result<(), String> {
            self.moves.push(('+', at));
            Ok(())
        }
        fn bar_unmapped(&mut self, _bar: usize, at: u64) -> Result<(), String> {
            self.moves.push(('-', at));
            Ok(())
        }
        /// Memory decoding off and the BAR where it was made, as at
        /// power-on.
        fn reset(&mut self) {
            let mut config = lock(&self.config);
            config.write(COMMAND_REG, 0, &[0, 0]);
            config.reset_bars();
        }
    }

    const SIZE: u64 = 0x8000;
    const DECODE: u32 = 0x6;

    fn read_at(mmio: &MmioBus, addr: u64) -> u8 {
        let mut data = [0u8];
        mmio.read(addr, &mut data);
        data[0]
    }

    fn write_reg(config: &ConfigSpace, slot: u8, reg: usize, value: u32) {
        config.write(0, slot, 0, reg, 0, &value.to_le_bytes());
    }

    /// A bus with a `Moving` device answering `slot` in each slot from 1,
    /// BAR0 at 0xc000_0000 + (slot - 1) * SIZE.
    fn bus_with(devices: u8) -> (Arc<MmioBus>, ConfigSpace, Vec<Arc<Mutex<Moving>>>) {
        let mmio = Arc::new(MmioBus::default());
        let mut bus = PciBus::new(&mmio);
        let mut all = Vec::new();
        for slot in 1..=devices {
            let addr = 0xc000_0000 + u64::from(slot - 1) * SIZE;
            let mut config = PciConfiguration::new(0x1af4, 0x1042, 0x01_00_00, 2);
            config.add_bar64(0, addr, SIZE).unwrap();
            let device = Arc::new(Mutex::new(Moving {
                config: Arc::new(Mutex::new(config)),
                byte: slot,
                moves: Vec::new(),
            }));
            bus.add(slot, device.clone());
            let window = BarRegion::new(device.clone(), 0, Arc::default());
            bus.map_bar(slot, 0, addr, SIZE, Arc::new(window)).unwrap();
            all.push(device);
        }
        (mmio, ConfigSpace::new(Arc::new(Mutex::new(bus))), all)
    }

    #[test]
    fn a_bar_window_is_where_the_bar_points_while_decoding_is_on() {
        let (mmio, bus, devices) = bus_with(1);
        let device = &devices[0];
        struct Other;
        impl BusDevice for Other {
            fn read(&mut self, _offset: u64, data: &mut [u8]) {
                data.fill(7);
            }
            fn write(&mut self, _offset: u64, _data: &[u8]) {}
        }
        mmio.insert(0xe000_0000, 0x1000, Arc::new(Mutex::new(Other)))
            .unwrap();
        assert_eq!(read_at(&mmio, 0xc000_0000), 1);

        // Moved with decoding off: off the bus until decoding is on.
        write_reg(&bus, 1, COMMAND_REG, 0);
        write_reg(&bus, 1, BAR0_REG, 0xd000_0000);
        write_reg(&bus, 1, BAR0_REG + 1, 0);
        assert_eq!(read_at(&mmio, 0xc000_0000), 0xff);
        assert_eq!(read_at(&mmio, 0xd000_0000), 0xff);
        write_reg(&bus, 1, COMMAND_REG, DECODE);
        assert_eq!(read_at(&mmio, 0xc000_0000), 0xff, "the old place is free");
        assert_eq!(read_at(&mmio, 0xd000_0010), 1);
        assert_eq!(lock(device).moves, [('-', 0xc000_0000), ('+', 0xd000_0000)]);

        // Sized with decoding on: all ones, then the address back.
        write_reg(&bus, 1, BAR0_REG, u32::MAX);
        write_reg(&bus, 1, BAR0_REG, 0xd000_0000);
        write_reg(&bus, 1, BAR0_REG + 1, u32::MAX);
        write_reg(&bus, 1, BAR0_REG + 1, 0);
        assert_eq!(lock(device).moves.len(), 2, "sizing is not a move");
        assert_eq!(read_at(&mmio, 0xd000_0000), 1);

        // A write the register does not take, in the middle of sizing,
        // leaves the BAR being sized: its size mask is not an address.
        write_reg(&bus, 1, BAR0_REG, u32::MAX);
        bus.write(0, 1, 0, BAR0_REG, 0, &[0; 8]);
        bus.write(0, 1, 0, BAR0_REG, 1, &[0; 4]);
        write_reg(&bus, 1, BAR0_REG, 0xd000_0000);
        assert_eq!(
            lock(device).moves.len(),
            2,
            "the size mask taken for an address"
        );
        assert_eq!(read_at(&mmio, 0xd000_0000), 1);

        // Onto another device: off the bus, the other answers.
        write_reg(&bus, 1, BAR0_REG, 0xe000_0000);
        assert_eq!(read_at(&mmio, 0xe000_0000), 7);
        assert_eq!(read_at(&mmio, 0xd000_0000), 0xff);
        assert_eq!(lock(device).moves[2..], [('-', 0xd000_0000)]);

        // A move with decoding on is followed at once, above 4 GiB too.
        write_reg(&bus, 1, BAR0_REG + 1, 0x1);
        assert_eq!(read_at(&mmio, 0x1_e000_0000), 1);
        assert_eq!(lock(device).moves[3..], [('+', 0x1_e000_0000)]);

        // An address that looks like a size mask (the last 32 KiB below
        // 8 GiB) is an address all the same.
        write_reg(&bus, 1, BAR0_REG, 0xffff_8000);
        assert_eq!(read_at(&mmio, 0x1_ffff_8000), 1);
        assert_eq!(
            lock(device).moves[4..],
            [('-', 0x1_e000_0000), ('+', 0x1_ffff_8000)]
        );
    }

    /// A platform reset turns decoding off: the window leaves the bus until
    /// the guest turns decoding on again.
    #[test]
    fn a_reset_takes_the_windows_off_the_bus_until_decoding_is_on() {
        let (mmio, bus, _devices) = bus_with(1);
        write_reg(&bus, 1, COMMAND_REG, DECODE);
        assert_eq!(read_at(&mmio, 0xc000_0000), 1);
        lock(&bus.bus).reset_devices();
        assert_eq!(read_at(&mmio, 0xc000_0000), 0xff);
        write_reg(&bus, 1, COMMAND_REG, DECODE);
        assert_eq!(read_at(&mmio, 0xc000_0000), 1);
    }

    /// A BAR the guest moved, and one it left half-way through sizing, are
    /// back where the VMM put them after a platform reset, and the window
    /// follows once decoding is on.
    #[test]
    fn a_reset_puts_the_bars_back() {
        let (mmio, bus, devices) = bus_with(1);
        write_reg(&bus, 1, COMMAND_REG, DECODE);
        write_reg(&bus, 1, BAR0_REG, 0xd000_0000);
        assert_eq!(read_at(&mmio, 0xd000_0000), 1);
        write_reg(&bus, 1, BAR0_REG + 1, u32::MAX);
        lock(&bus.bus).reset_devices();
        let bar = |reg| lock(&devices[0]).config_read(reg);
        assert_eq!((bar(BAR0_REG), bar(BAR0_REG + 1)), (0xc000_0004, 0));
        write_reg(&bus, 1, COMMAND_REG, DECODE);
        assert_eq!(read_at(&mmio, 0xc000_0000), 1);
        assert_eq!(read_at(&mmio, 0xd000_0000), 0xff);
    }

    #[test]
    fn two_bars_can_swap_places() {
        let (mmio, bus, devices) = bus_with(2);
        for slot in [1, 2] {
            write_reg(&bus, slot, COMMAND_REG, 0);
        }
        write_reg(&bus, 1, BAR0_REG, 0xc000_8000);
        write_reg(&bus, 2, BAR0_REG, 0xc000_0000);
        for slot in [1, 2] {
            write_reg(&bus, slot, COMMAND_REG, DECODE);
        }
        assert_eq!(read_at(&mmio, 0xc000_0000), 2);
        assert_eq!(read_at(&mmio, 0xc000_8000), 1);
        // Each left its place before the other came there.
        assert_eq!(
            lock(&devices[0]).moves,
            [('-', 0xc000_0000), ('+', 0xc000_8000)]
        );
        assert_eq!(
            lock(&devices[1]).moves,
            [('-', 0xc000_8000), ('+', 0xc000_0000)]
        );

        // With decoding on, one moving onto the other waits off the bus
        // until the other makes room.
        write_reg(&bus, 1, BAR0_REG, 0xc000_0000);
        assert_eq!(read_at(&mmio, 0xc000_0000), 2);
        assert_eq!(read_at(&mmio, 0xc000_8000), 0xff);
        write_reg(&bus, 2, BAR0_REG, 0xc001_0000);
        assert_eq!(read_at(&mmio, 0xc000_0000), 1);
        assert_eq!(read_at(&mmio, 0xc001_0000), 2);
    }

    /// While one device is busy (its lock held, as a backend reconnecting
    /// holds it) and a vCPU waits on it, the other devices still answer,
    /// through ECAM as the vCPUs reach it.
    #[test]
    fn a_busy_device_does_not_hold_up_configuration_access_to_the_others() {
        let (_mmio, bus, devices) = bus_with(2);
        let ecam: Arc<dyn SharedBusDevice> = Arc::new(Ecam::new(bus));
        let vendor_and_device = |ecam: &Arc<dyn SharedBusDevice>, slot: u64| {
            let mut data = [0u8; 4];
            ecam.read(slot << 15, &mut data);
            u32::from_le_bytes(data)
        };
        let busy = lock(&devices[0]);
        let waiting = {
            let ecam = ecam.clone();
            std::thread::spawn(move || vendor_and_device(&ecam, 1))
        };
        // Time for the first access to reach the busy device.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (done, answered) = std::sync::mpsc::channel();
        let other = {
            let ecam = ecam.clone();
            std::thread::spawn(move || done.send(vendor_and_device(&ecam, 2)))
        };
        let answer = answered.recv_timeout(std::time::Duration::from_secs(5));
        drop(busy);
        assert_eq!(waiting.join().unwrap(), 0x1042_1af4);
        other.join().unwrap().ok();
        assert_eq!(answer, Ok(0x1042_1af4), "slot 2 waited for the busy slot 1");
    }

    /// A busy device's own configuration registers are read without it,
    /// through ports 0xCF8/0xCFC too (whose lock every vCPU's access
    /// takes): a stalled backend holds up no vCPU reading config space.
    #[test]
    fn a_busy_device_still_answers_configuration_reads() {
        let (_mmio, bus, devices) = bus_with(1);
        let busy = lock(&devices[0]);
        let (done, answered) = std::sync::mpsc::channel();
        let reader = {
            let bus = bus.clone();
            std::thread::spawn(move || done.send(bus.read(0, 1, 0, 0)))
        };
        let answer = answered.recv_timeout(std::time::Duration::from_secs(5));
        drop(busy);
        reader.join().unwrap().ok();
        assert_eq!(
            answer,
            Ok(0x1042_1af4),
            "the read waited for the busy device"
        );
    }
}
