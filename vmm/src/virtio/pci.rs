//! The virtio-pci modern transport (VIRTIO 1.x, no legacy interface).
//!
//! One 64-bit memory BAR holds every structure:
//! ```text
//! 0x0000 common configuration     0x3000 notify (4 bytes per queue)
//! 0x1000 ISR status               0x4000 MSI-X table
//! 0x2000 device configuration     0x5000 MSI-X pending bits
//! ```
//! Each queue's notify address is a KVM ioeventfd, so the guest's kicks go
//! straight to the backend; writes that do reach the VMM there are counted.
//! The PCI_CFG capability opens a 1-4 byte window onto the BAR from
//! configuration space.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActiveQueue, ConfigNotifier, VirtioDevice, NO_VECTOR, VIRTIO_F_VERSION_1};
use crate::guest_warnings::GuestWarnings;
use crate::interrupts::msi::{GsiRouter, MsiError};
use crate::pci::config::{ConfigSpaceError, PciConfiguration};
use crate::pci::msix::{Msix, MsixRegion};
use crate::pci::{ConfigView, PciDevice};
use crate::vstate::memory::GuestMemory;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
/// Where each field of the common configuration starts, and its size
/// (struct virtio_pci_common_cfg).
const COMMON_FIELDS: [(u64, usize); 16] = [
    (0x00, 4), // device_feature_select
    (0x04, 4), // device_feature
    (0x08, 4), // driver_feature_select
    (0x0c, 4), // driver_feature
    (0x10, 2), // config_msix_vector
    (0x12, 2), // num_queues
    (0x14, 1), // device_status
    (0x15, 1), // config_generation
    (0x16, 2), // queue_select
    (0x18, 2), // queue_size
    (0x1a, 2), // queue_msix_vector
    (0x1c, 2), // queue_enable
    (0x1e, 2), // queue_notify_off
    (0x20, 8), // queue_desc
    (0x28, 8), // queue_driver
    (0x30, 8), // queue_device
];
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
const DEVICE_CONFIG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const MSIX_REGION_LEN: u64 = 0x1000;

const VIRTIO_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// The subsystem device ID of every device (see `VirtioPciDevice::new`).
const SUBSYSTEM_ID: u16 = 0x1100;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;
/// VIRTIO_PCI_CAP_PCI_CFG: a window onto the BAR through configuration
/// space, for firmware that cannot map the BAR.
const CFG_PCI: u8 = 5;

const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 64;

/// Accesses to this device that reached the VMM.
#[derive(Default)]
pub struct TransportCounters {
    /// Writes to queue notify addresses that KVM did not absorb.
    pub notify_exits: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot build the configuration space")]
    ConfigSpace(#[from] ConfigSpaceError),
    #[error("cannot set up MSI-X")]
    Msix(#[from] MsiError),
    #[error("cannot create a queue notify eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register the notify address {0:#x} with KVM")]
    IoEvent(u64, #[source] kvm_ioctls::Error),
}

#[derive(Clone, Copy)]
struct QueueState {
    max_size: u16,
    size: u16,
    msix_vector: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        QueueState {
            max_size,
            size: max_size,
            msix_vector: NO_VECTOR,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Why a driver's split ring cannot be handed to a backend, if it
    /// cannot: each part aligned as VIRTIO 1.2 (2.7) requires (descriptor
    /// table 16, available ring 2, used ring 4; a backend refuses
    /// otherwise) and wholly inside guest memory. The rings' event words are
    /// counted whether or not EVENT_IDX is negotiated.
    fn ring_fault(&self, mem: &GuestMemory) -> Option<String> {
        let size = u64::from(self.size);
        let parts = [
            ("descriptor table", self.desc, 16, 16 * size),
            ("available ring", self.avail, 2, 6 + 2 * size),
            ("used ring", self.used, 4, 6 + 8 * size),
        ];
        for (part, addr, align, len) in parts {
            if addr % align != 0 {
                return Some(format!("{part} at {addr:#x} is not {align}-byte aligned"));
            }
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Some(format!(
                    "{part} at {addr:#x} ({len} bytes) is not all in guest memory"
                ));
            }
        }
        None
    }
}

/// The command register as the VMM leaves it at power-on and after a
/// reset, as firmware that assigned the BAR does: memory decoding on (the
/// window answers where the BAR points), bus mastering off until the driver
/// turns it on.
const FIRMWARE_COMMAND: [u8; 2] = [0x02, 0];

pub struct VirtioPciDevice {
    /// Shared with the bus, which reads it without locking the device.
    config: Arc<Mutex<PciConfiguration>>,
    msix_cap_reg: usize,
    /// The first register of the VIRTIO_PCI_CAP_PCI_CFG capability.
    pci_cfg_reg: usize,
    /// Locked alone by the BAR's window for the table and PBA (see
    /// `MsixRegion`); locked after the transport by the transport.
    msix: Arc<Mutex<Msix>>,
    msix_region: MsixRegion,
    /// How many vectors there are, and the eventfd that raises each (the
    /// call fds the rings are given).
    vector_events: Vec<EventFd>,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    queues: Vec<QueueState>,
    kicks: Vec<EventFd>,
    /// For moving the kicks' ioeventfds with the BAR.
    vm: Arc<VmFd>,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    /// `msix_config`, the ISR status and `config_generation`, shared with
    /// the device model.
    config_change: ConfigNotifier,
    status: u8,
    queue_select: u16,
    counters: Arc<TransportCounters>,
    /// Status writes the driver got wrong.
    warnings: GuestWarnings,
}

/// Queue `index`'s notify address with the BAR at `bar_addr`.
fn notify_addr(bar_addr: u64, index: usize) -> u64 {
    bar_addr + NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_MULTIPLIER)
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let len = if extra.is_some() { 20 } else { 16 };
    let mut cap = vec![CAP_VENDOR, 0, len, cfg_type, 0, 0, 0, 0];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(value) = extra {
        cap.extend_from_slice(&value.to_le_bytes());
    }
    cap
}

impl VirtioPciDevice {
    /// The MSI-X table and PBA, for the BAR's window to serve itself.
    pub fn msix_region(&self) -> MsixRegion {
        self.msix_region.clone()
    }

    /// Creates the transport for `device` with BAR 0 at `bar_addr`, and
    /// registers its queues' notify addresses with KVM.
    pub fn new(
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        vm: &Arc<VmFd>,
        router: Arc<GsiRouter>,
        bar_addr: u64,
    ) -> Result<Self, TransportError> {
        let max_sizes = device.queue_max_sizes();
        let device_type = device.device_type();
        // Class codes: mass storage for block, network controller for net.
        let class = match device_type {
            1 => 0x02_00_00,
            2 => 0x01_00_00,
            _ => 0xff_00_00,
        };
        // VIRTIO 1.x 4.1.2.1: a device that is not transitional has a
        // subsystem device ID of 0x40 or more, which keeps legacy drivers
        // (that match on the type there) off it. 0x1100 is QEMU's, which
        // drivers such as virtio-win's list.
        let mut config = PciConfiguration::new(
            VIRTIO_VENDOR,
            VIRTIO_PCI_DEVICE_BASE + device_type,
            class,
            SUBSYSTEM_ID,
        );
        config.add_bar64(0, bar_addr, BAR_SIZE)?;
        config.add_capability(&virtio_cap(CFG_COMMON, COMMON_OFFSET, COMMON_LEN, None))?;
        config.add_capability(&virtio_cap(
            CFG_NOTIFY,
            NOTIFY_OFFSET,
            NOTIFY_LEN,
            Some(NOTIFY_MULTIPLIER),
        ))?;
        config.add_capability(&virtio_cap(CFG_ISR, ISR_OFFSET, 1, None))?;
        config.add_capability(&virtio_cap(
            CFG_DEVICE,
            DEVICE_CONFIG_OFFSET,
            DEVICE_CONFIG_LEN,
            None,
        ))?;
        // bar (the low byte of its second register), offset and length are
        // the driver's; pci_cfg_data, the fifth, is served by the device.
        let pci_cfg_reg = config.add_capability(&virtio_cap(CFG_PCI, 0, 0, Some(0)))? / 4;
        config.write(1, 0, &FIRMWARE_COMMAND);
        config.set_writable(pci_cfg_reg + 1, 0xff);
        config.set_writable(pci_cfg_reg + 2, 0xffff_ffff);
        config.set_writable(pci_cfg_reg + 3, 0xffff_ffff);
        // One vector per queue plus one for configuration changes.
        let msix = Msix::new(router, max_sizes.len() as u16 + 1)?;
        let msix_cap = config.add_capability(&msix.capability(
            0,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        ))?;
        let msix_cap_reg = msix_cap / 4;
        // Message control (upper half of the first dword): enable and mask.
        config.set_writable(msix_cap_reg, 0xc000_0000);
        config.remember_power_on();

        let mut kicks = Vec::with_capacity(max_sizes.len());
        for index in 0..max_sizes.len() {
            let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(TransportError::EventFd)?;
            let addr = notify_addr(bar_addr, index);
            vm.register_ioevent(&kick, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| TransportError::IoEvent(addr, e))?;
            kicks.push(kick);
        }
        let mut vector_events = Vec::with_capacity(usize::from(msix.len()));
        for vector in 0..msix.len() {
            if let Some(event) = msix.vector_event(vector) {
                vector_events.push(event.try_clone().map_err(TransportError::EventFd)?);
            }
        }
        let notifier_events = vector_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let config_change = ConfigNotifier::new(notifier_events);
        let msix = Arc::new(Mutex::new(msix));
        let msix_region = MsixRegion::new(
            msix.clone(),
            MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + MSIX_REGION_LEN,
            MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_REGION_LEN,
        );
        device.set_config_notifier(config_change.clone());
        let device_features = device.features() | VIRTIO_F_VERSION_1;
        Ok(VirtioPciDevice {
            config: Arc::new(Mutex::new(config)),
            msix_cap_reg,
            pci_cfg_reg,
            msix,
            msix_region,
            vector_events,
            mem,
            queues: max_sizes.iter().map(|&m| QueueState::new(m)).collect(),
            kicks,
            vm: vm.clone(),
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_change,
            status: 0,
            queue_select: 0,
            counters: Arc::new(TransportCounters::default()),
            warnings: GuestWarnings::default(),
            device,
        })
    }

    /// Hands a backend that connected again to the device.
    pub fn reconnect_backend(
        &mut self,
        backend: crate::vhost_user::frontend::NewBackend,
    ) -> Result<(), String> {
        self.device.reconnect(backend)
    }

    pub fn counters(&self) -> Arc<TransportCounters> {
        self.counters.clone()
    }

    fn selected(&mut self) -> Option<&mut QueueState> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// The common configuration structure as the driver sees it now,
    /// little-endian, so that a read of any width at any offset (VIRTIO
    /// asks for natural widths; QEMU answers any) gets its bytes.
    fn common_bytes(&mut self) -> [u8; COMMON_LEN as usize] {
        let mut bytes = [0u8; COMMON_LEN as usize];
        for (start, len) in COMMON_FIELDS {
            let value = self.common_read(start).to_le_bytes();
            bytes[start as usize..][..len].copy_from_slice(&value[..len]);
        }
        bytes
    }

    /// The field that starts at `offset` (a 64-bit ring address whole at
    /// its start, its high half 4 bytes on).
    fn common_read(&mut self, offset: u64) -> u64 {
        let queue = self.queues.get(usize::from(self.queue_select)).copied();
        match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => self.device_features & 0xffff_ffff,
                1 => self.device_features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(self.config_change.vector()),
            0x12 => self.queues.len() as u64,
            0x14 => u64::from(self.status),
            0x15 => u64::from(self.config_change.generation()),
            0x16 => u64::from(self.queue_select),
            0x18 => queue.map_or(0, |q| u64::from(q.size)),
            0x1a => queue.map_or(u64::from(NO_VECTOR), |q| u64::from(q.msix_vector)),
            0x1c => queue.map_or(0, |q| u64::from(q.enabled)),
            0x1e => u64::from(self.queue_select),
            // Whole 64-bit fields: a 4-byte read takes the low half.
            0x20 => queue.map_or(0, |q| q.desc),
            0x24 => queue.map_or(0, |q| q.desc >> 32),
            0x28 => queue.map_or(0, |q| q.avail),
            0x2c => queue.map_or(0, |q| q.avail >> 32),
            0x30 => queue.map_or(0, |q| q.used),
            0x34 => queue.map_or(0, |q| q.used >> 32),
            _ => 0,
        }
    }

    /// A write of `width` bytes at `offset` (the driver may write the 64-bit
    /// ring addresses whole or as two 32-bit halves).
    fn common_write(&mut self, offset: u64, value: u64, width: usize) {
        fn set_half(target: &mut u64, high: bool, value: u64) {
            if high {
                *target = (*target & 0xffff_ffff) | (value << 32);
            } else {
                *target = (*target & !0xffff_ffff) | (value & 0xffff_ffff);
            }
        }
        // Queue set-up is only allowed before DRIVER_OK.
        let can_setup = self.status & STATUS_DRIVER_OK == 0;
        let msix_len = self.vector_events.len() as u16;
        match offset {
            0x00 => self.device_feature_select = value as u32,
            0x08 => self.driver_feature_select = value as u32,
            // The features are fixed once the driver set FEATURES_OK.
            0x0c if self.status & STATUS_FEATURES_OK != 0 => {}
            0x0c => match self.driver_feature_select {
                0 => set_half(&mut self.driver_features, false, value),
                1 => set_half(&mut self.driver_features, true, value),
                _ => {}
            },
            0x10 => self.config_change.set_vector(value as u16),
            0x14 => self.set_status(value as u8),
            0x16 => self.queue_select = value as u16,
            0x18 if can_setup => {
                if let Some(q) = self.selected() {
                    let size = value as u16;
                    // Split rings: a power of two no larger than the maximum.
                    if size.is_power_of_two() && size <= q.max_size {
                        q.size = size;
                    }
                }
            }
            // A backend keeps the call eventfd it got at DRIVER_OK.
            0x1a if can_setup => {
                if let Some(q) = self.selected() {
                    let vector = value as u16;
                    q.msix_vector = if vector < msix_len { vector } else { NO_VECTOR };
                }
            }
            0x1c if can_setup => {
                if let Some(q) = self.selected() {
                    q.enabled = value == 1;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if can_setup => {
                if let Some(q) = self.selected() {
                    let high = offset % 8 == 4;
                    let target = match offset & !0x7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if width == 8 && !high {
                        *target = value;
                    } else {
                        set_half(target, high, value);
                    }
                }
            }
            _ => log::debug!(
                "{}: ignored common config write at {offset:#x}",
                self.device.name()
            ),
        }
    }

    fn set_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // Only a reset clears status bits (VIRTIO 1.2, 2.1.2): a driver
        // that clears DRIVER_OK any other way has not stopped the device.
        if status & old != old {
            log::log!(
                self.warnings.level(self.device.name()),
                "{}: the driver cleared status bits {:#x} without a reset; they stay",
                self.device.name(),
                old & !status
            );
        }
        let mut status = status | old;
        if status & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let unknown = self.driver_features & !self.device_features;
            if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                log::log!(
                    self.warnings.level(self.device.name()),
                    "{}: driver features {:#x} refused (unknown {unknown:#x} or no VERSION_1)",
                    self.device.name(),
                    self.driver_features
                );
                status &= !STATUS_FEATURES_OK;
            }
        }
        if status & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            if old & STATUS_NEEDS_RESET != 0 {
                log::log!(
                    self.warnings.level(self.device.name()),
                    "{}: DRIVER_OK on a device that needs a reset; it stays stopped",
                    self.device.name()
                );
                self.status = status & !STATUS_DRIVER_OK;
                return;
            }
            if status & STATUS_FEATURES_OK == 0 {
                log::log!(
                    self.warnings.level(self.device.name()),
                    "{}: DRIVER_OK without accepted features; the device needs a reset",
                    self.device.name()
                );
                self.status = (status & !STATUS_DRIVER_OK) | STATUS_NEEDS_RESET;
                return;
            }
            self.status = status;
            let faults: Vec<String> = self
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.enabled)
                .filter_map(|(index, q)| {
                    Some(format!("queue {index}'s {}", q.ring_fault(&self.mem)?))
                })
                .collect();
            if !faults.is_empty() {
                log::log!(
                    self.warnings.level(self.device.name()),
                    "{}: DRIVER_OK refused: {}; the device needs a reset",
                    self.device.name(),
                    faults.join(", ")
                );
                self.needs_reset();
                return;
            }
            self.activate();
            return;
        }
        self.status = status;
    }

    /// The running device cannot go on until the driver resets it:
    /// NEEDS_RESET, and the configuration-change notification VIRTIO 1.2
    /// (2.1.2) asks of a device that sets it after DRIVER_OK.
    fn needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.config_change.notify();
    }

    fn activate(&mut self) {
        let queues: Vec<ActiveQueue<'_>> = self
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.enabled)
            .map(|(index, q)| ActiveQueue {
                index: index as u16,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: &self.kicks[index],
                call: self.vector_events.get(usize::from(q.msix_vector)),
            })
            .collect();
        log::info!(
            "{}: driver ready with {} queue(s), features {:#x}",
            self.device.name(),
            queues.len(),
            self.driver_features
        );
        if let Err(e) = self
            .device
            .activate(&self.mem, self.driver_features, &queues)
        {
            log::error!("{}: cannot start the device: {e}", self.device.name());
            self.needs_reset();
        }
    }

    /// Registers (`on`) or unregisters each kick's ioeventfd at its notify
    /// address in a BAR window at `base`; says which ones KVM refused.
    fn place_kicks(&self, base: u64, on: bool) -> Result<(), String> {
        let failed: Vec<String> = self
            .kicks
            .iter()
            .enumerate()
            .filter_map(|(index, kick)| {
                let addr = notify_addr(base, index);
                let at = IoEventAddress::Mmio(addr);
                let done = if on {
                    self.vm.register_ioevent(kick, &at, NoDatamatch)
                } else {
                    self.vm.unregister_ioevent(kick, &at, NoDatamatch)
                };
                let e = done.err()?;
                Some(if on {
                    format!("queue {index}'s kicks at {addr:#x} go through the VMM ({e})")
                } else {
                    format!("queue {index}'s notify address {addr:#x} stays ({e})")
                })
            })
            .collect();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// The driver took bus mastering away (Linux does before kexec): the
    /// device may no longer touch guest memory or interrupt, so a running
    /// device stops its rings and needs a reset to run again.
    fn bus_master_cleared(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            log::info!(
                "{}: bus mastering turned off: the device stops until it is reset",
                self.device.name()
            );
            self.device.reset();
            // Said with a configuration interrupt (VIRTIO 1.2, 2.1.2), which
            // waits until bus mastering is back.
            self.needs_reset();
        }
    }

    fn reset(&mut self) {
        // Also before DRIVER_OK: the device forgets what this driver wrote
        // to its configuration space.
        self.device.reset();
        // Interrupts held for this driver (a vector it masked, or MSI-X or
        // bus mastering off: before a kexec) are not the next driver's.
        crate::bus::lock(&self.msix).drop_held();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_change.reset();
        for q in &mut self.queues {
            *q = QueueState::new(q.max_size);
        }
    }
}

impl VirtioPciDevice {
    /// The BAR offset and width the driver set in the PCI_CFG capability,
    /// if they make an access the spec allows: BAR 0, 1, 2 or 4 bytes,
    /// aligned, inside the BAR.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let config = crate::bus::lock(&self.config);
        let bar = config.read(self.pci_cfg_reg + 1) & 0xff;
        let offset = u64::from(config.read(self.pci_cfg_reg + 2));
        let length = config.read(self.pci_cfg_reg + 3);
        let width = match length {
            1 | 2 | 4 => length as usize,
            _ => return None,
        };
        (bar == 0 && offset % width as u64 == 0 && offset + width as u64 <= BAR_SIZE)
            .then_some((offset, width))
    }
}

fn read_le(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

impl PciDevice for VirtioPciDevice {
    /// Every register but PCI_CFG's data, which reaches into the BAR.
    fn config_view(&self) -> Option<ConfigView> {
        Some(ConfigView {
            config: self.config.clone(),
            device_reg: Some(self.pci_cfg_reg + 4),
        })
    }

    fn config_read(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_reg + 4 {
            let mut data = [0u8; 4];
            if let Some((offset, width)) = self.pci_cfg_window() {
                self.bar_read(0, offset, &mut data[..width]);
            }
            return u32::from_le_bytes(data);
        }
        crate::bus::lock(&self.config).read(reg)
    }

    fn reset(&mut self) {
        // The device stops (its backend's rings too), MSI-X is disabled,
        // and the command register and the BARs are as at power-on (a BAR
        // the guest moved, or left holding its size mask, goes back).
        VirtioPciDevice::reset(self);
        // Every register the guest may write as it first found it: MSI-X
        // control (off), the PCI_CFG window, the interrupt line, ...
        {
            let mut config = crate::bus::lock(&self.config);
            config.reset();
            config.write(1, 0, &FIRMWARE_COMMAND);
            config.reset_bars();
        }
        crate::bus::lock(&self.msix).reset();
    }

    /// The kicks' ioeventfds go to the notify addresses in the window, each
    /// on its own: one that cannot leaves its kicks to exit to the VMM,
    /// which forwards them.
    fn bar_mapped(&mut self, _bar: usize, at: u64) -> Result<(), String> {
        self.place_kicks(at, true)
    }

    /// The kicks' ioeventfds leave with the window, so that nothing answers
    /// at its old place (another device's window may come there).
    fn bar_unmapped(&mut self, _bar: usize, at: u64) -> Result<(), String> {
        self.place_kicks(at, false)
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        if reg == self.pci_cfg_reg + 4 {
            // The first `length` bytes of pci_cfg_data go to the BAR (VIRTIO
            // 1.2, 4.1.4.9.1), whatever the width of the write.
            match self.pci_cfg_window() {
                Some((at, width)) if offset == 0 && data.len() >= width => {
                    self.bar_write(0, at, &data[..width]);
                }
                _ => log::debug!(
                    "{}: PCI_CFG write of {} bytes does not match the window",
                    self.device.name(),
                    data.len()
                ),
            }
            return;
        }
        let (was_bus_master, bus_master, value) = {
            let mut config = crate::bus::lock(&self.config);
            let was = config.bus_master();
            config.write(reg, offset, data);
            (was, config.bus_master(), config.read(reg))
        };
        crate::bus::lock(&self.msix).set_bus_master(bus_master);
        if was_bus_master && !bus_master {
            self.bus_master_cleared();
        }
        if reg == self.msix_cap_reg {
            let control = (value >> 16) as u16;
            let mut msix = crate::bus::lock(&self.msix);
            if control & 0x8000 != 0 && !msix.enabled() {
                log::debug!("{}: MSI-X enabled", self.device.name());
            }
            msix.set_control(control);
        }
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => {
                let bytes = self.common_bytes();
                let from = &bytes[(o - COMMON_OFFSET) as usize..];
                let n = data.len().min(from.len());
                data[..n].copy_from_slice(&from[..n]);
                data[n..].fill(0);
            }
            ISR_OFFSET => {
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = self.config_change.take_isr();
                }
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CONFIG_OFFSET, data);
            }
            // The table and PBA; their window serves them itself, but the
            // PCI_CFG window comes here.
            o if self.msix_region.read(o, data) => {}
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o, read_le(data), data.len()),
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CONFIG_OFFSET, data);
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // KVM's ioeventfd should have taken this: count it, pass it on.
                self.counters.notify_exits.fetch_add(1, Ordering::Relaxed);
                let index = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(kick) = self.kicks.get(index) {
                    let _ = kick.write(1);
                }
            }
            o if self.msix_region.write(o, data) => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::vstate::memory::create_guest_ram;

    /// index, size, desc, avail, used, has a call eventfd
    type QueueSeen = (u16, u16, u64, u64, u64, bool);

    #[derive(Default)]
    struct Record {
        activated: Vec<(u64, Vec<QueueSeen>)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
        notifier: Option<ConfigNotifier>,
    }

    struct MockDevice(Arc<Mutex<Record>>);

    impl VirtioDevice for MockDevice {
        fn device_type(&self) -> u16 {
            2
        }
        fn name(&self) -> &str {
            "mock"
        }
        fn features(&self) -> u64 {
            1 << 9 | 1 << 29
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![256, 128]
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: &GuestMemory,
            features: u64,
            queues: &[ActiveQueue<'_>],
        ) -> Result<(), super::super::device::ActivateError> {
            let queues = queues
                .iter()
                .map(|q| (q.index, q.size, q.desc, q.avail, q.used, q.call.is_some()))
                .collect();
            self.0.lock().unwrap().activated.push((features, queues));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn set_config_notifier(&mut self, notifier: ConfigNotifier) {
            self.0.lock().unwrap().notifier = Some(notifier);
        }
    }

    fn write(dev: &mut VirtioPciDevice, offset: u64, value: u64, len: usize) {
        dev.bar_write(0, offset, &value.to_le_bytes()[..len]);
    }

    fn read(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        dev.bar_read(0, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    /// Drives the transport the way a guest driver does, against a mock
    /// device: needs /dev/kvm for the ioeventfds and MSI routes.
    fn mock_transport() -> (VirtioPciDevice, Arc<Mutex<Record>>) {
        let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
        let ram = create_guest_ram(16 << 20, false).unwrap();
        let vm = Arc::new(crate::vstate::vm::create_vm(&kvm, &ram.memory).unwrap());
        let router = Arc::new(GsiRouter::new(vm.clone()));
        let record = Arc::new(Mutex::new(Record::default()));
        let dev = VirtioPciDevice::new(
            Box::new(MockDevice(record.clone())),
            ram.memory.clone(),
            &vm,
            router,
            0xc000_0000,
        )
        .unwrap();
        (dev, record)
    }

    /// The MSI-X table answers through the MMIO bus while a vCPU waits for
    /// the device in another access to the same BAR (the device is held by
    /// a vCPU waiting on its backend).
    #[test]
    fn the_msix_table_answers_while_the_device_is_busy() {
        use crate::bus::MmioBus;
        use crate::pci::bus::{BarExitCounters, BarRegion};
        const AT: u64 = 0xc000_0000;

        let (dev, _record) = mock_transport();
        let msix = dev.msix_region();
        let dev = Arc::new(Mutex::new(dev));
        let mmio = Arc::new(MmioBus::default());
        let window =
            BarRegion::new(dev.clone(), 0, Arc::new(BarExitCounters::default())).with_msix(msix);
        mmio.insert(AT, BAR_SIZE, Arc::new(window)).unwrap();
        let busy = dev.lock().unwrap();
        let waiting = {
            let mmio = mmio.clone();
            std::thread::spawn(move || {
                let mut status = [0u8];
                mmio.read(AT + 0x14, &mut status);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (done, result) = std::sync::mpsc::channel();
        {
            let mmio = mmio.clone();
            std::thread::spawn(move || {
                mmio.write(AT + MSIX_TABLE_OFFSET + 8, &0x41u32.to_le_bytes());
                let mut entry = [0u8; 16];
                mmio.read(AT + MSIX_TABLE_OFFSET, &mut entry);
                let _ = done.send(entry);
            });
        }
        let entry = result
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the table waited for the device");
        assert_eq!(entry[8..12], 0x41u32.to_le_bytes());
        assert_eq!(entry[12], 1, "still masked");
        drop(busy);
        waiting.join().unwrap();
        // The transport sees the same table (the PCI_CFG window's path).
        let mut data = [0u8; 4];
        dev.lock()
            .unwrap()
            .bar_read(0, MSIX_TABLE_OFFSET + 8, &mut data);
        assert_eq!(data, 0x41u32.to_le_bytes());
    }

    #[test]
    fn driver_sequence_activates_and_resets_the_device() {
        let (mut dev, record) = mock_transport();

        // Identity and capabilities.
        assert_eq!(dev.config_read(0), 0x1042_1af4);
        assert_eq!(read(&mut dev, 0x12, 2), 2, "num_queues");

        // Features: the device's plus VERSION_1.
        write(&mut dev, 0x00, 0, 4);
        assert_eq!(read(&mut dev, 0x04, 4), 1 << 9 | 1 << 29);
        write(&mut dev, 0x00, 1, 4);
        assert_eq!(read(&mut dev, 0x04, 4), 1);

        write(&mut dev, 0x14, 1 | 2, 1);
        // An unknown feature is refused at FEATURES_OK.
        write(&mut dev, 0x08, 0, 4);
        write(&mut dev, 0x0c, 1 << 3, 4);
        write(&mut dev, 0x08, 1, 4);
        write(&mut dev, 0x0c, 1, 4);
        write(&mut dev, 0x14, 1 | 2 | 8, 1);
        assert_eq!(read(&mut dev, 0x14, 1) & 8, 0, "FEATURES_OK must not stick");
        write(&mut dev, 0x08, 0, 4);
        write(&mut dev, 0x0c, 1 << 9, 4);
        write(&mut dev, 0x14, 1 | 2 | 8, 1);
        assert_eq!(read(&mut dev, 0x14, 1) & 8, 8);

        // Queue 1: size 64, vector 1, rings, enabled. Queue 0 left off.
        write(&mut dev, 0x16, 1, 2);
        assert_eq!(read(&mut dev, 0x18, 2), 128);
        write(&mut dev, 0x18, 100, 2); // not a power of two: ignored
        assert_eq!(read(&mut dev, 0x18, 2), 128);
        write(&mut dev, 0x18, 64, 2);
        write(&mut dev, 0x1a, 1, 2);
        write(&mut dev, 0x20, 0x10_0000, 4);
        write(&mut dev, 0x24, 0, 4);
        write(&mut dev, 0x28, 0x10_1000, 4);
        write(&mut dev, 0x30, 0x10_2000, 4);
        write(&mut dev, 0x1c, 1, 2);
        // Device config goes to the device.
        assert_eq!(read(&mut dev, DEVICE_CONFIG_OFFSET + 4, 1), 4);
        dev.bar_write(0, DEVICE_CONFIG_OFFSET + 0x20, &[1]);
        write(&mut dev, 0x14, 1 | 2 | 8 | 4, 1);

        {
            let rec = record.lock().unwrap();
            assert_eq!(rec.activated.len(), 1);
            let (features, queues) = &rec.activated[0];
            assert_eq!(*features, 1 << 32 | 1 << 9);
            assert_eq!(
                queues,
                &vec![(1, 64, 0x10_0000, 0x10_1000, 0x10_2000, true)]
            );
            assert_eq!(rec.config_writes, vec![(0x20, vec![1])]);
        }
        // Set-up is frozen after DRIVER_OK.
        write(&mut dev, 0x18, 32, 2);
        assert_eq!(read(&mut dev, 0x18, 2), 64);

        // A notify write that reaches the VMM is counted.
        dev.bar_write(0, NOTIFY_OFFSET + 4, &[1, 0]);
        assert_eq!(dev.counters().notify_exits.load(Ordering::Relaxed), 1);

        write(&mut dev, 0x14, 0, 1);
        assert_eq!(record.lock().unwrap().resets, 1);
        assert_eq!(read(&mut dev, 0x14, 1), 0);
        write(&mut dev, 0x16, 1, 2);
        assert_eq!(read(&mut dev, 0x1c, 2), 0, "reset disables the queues");
    }

    /// A reset before DRIVER_OK reaches the device too, so that it forgets
    /// configuration writes a driver made while setting up.
    #[test]
    fn a_reset_before_driver_ok_reaches_the_device() {
        let (mut dev, record) = mock_transport();
        write(&mut dev, 0x14, 1 | 2, 1);
        dev.bar_write(0, DEVICE_CONFIG_OFFSET + 0x20, &[0]);
        write(&mut dev, 0x14, 0, 1);
        let rec = record.lock().unwrap();
        assert_eq!(rec.config_writes, vec![(0x20, vec![0])]);
        assert_eq!(rec.resets, 1);
        assert!(rec.activated.is_empty());
    }

    /// VIRTIO 1.x lets a driver write the 64-bit ring addresses whole as
    /// well as in 32-bit halves.
    #[test]
    fn ring_addresses_are_taken_whole_or_in_halves() {
        let (mut dev, _) = mock_transport();
        write(&mut dev, 0x16, 0, 2);
        write(&mut dev, 0x20, 0x1_2345_6000, 8);
        assert_eq!(read(&mut dev, 0x20, 8), 0x1_2345_6000);
        assert_eq!(read(&mut dev, 0x20, 4), 0x2345_6000);
        assert_eq!(read(&mut dev, 0x24, 4), 1);
        write(&mut dev, 0x28, 0x2_0000_1000, 8);
        write(&mut dev, 0x2c, 3, 4);
        assert_eq!(read(&mut dev, 0x28, 8), 0x3_0000_1000);
        write(&mut dev, 0x30, 0x4_0000_2000, 8);
        write(&mut dev, 0x30, 0x3000, 4);
        assert_eq!(read(&mut dev, 0x30, 8), 0x4_0000_3000);
    }

    /// Reads of any width at any offset get the structure's bytes, as
    /// QEMU gives them: a byte inside a field, a word across two fields,
    /// a read that runs past the end.
    #[test]
    fn common_config_reads_get_its_bytes_at_any_offset() {
        let (mut dev, _) = mock_transport();
        write(&mut dev, 0x16, 0, 2);
        write(&mut dev, 0x20, 0x1_2345_6000, 8);
        // queue_size (0x18) and queue_msix_vector (0x1a) in one read.
        let size = read(&mut dev, 0x18, 2);
        let vector = read(&mut dev, 0x1a, 2);
        assert_eq!(read(&mut dev, 0x18, 4), size | vector << 16);
        assert_eq!(read(&mut dev, 0x19, 1), size >> 8);
        assert_eq!(read(&mut dev, 0x21, 1), 0x60);
        assert_eq!(read(&mut dev, 0x22, 4), 0x0001_2345);
        // num_queues (0x12) is 2: its high byte alone.
        assert_eq!(read(&mut dev, 0x12, 2), 2);
        assert_eq!(read(&mut dev, 0x13, 1), 0);
        assert_eq!(read(&mut dev, 0x11, 2), 0x0200 | read(&mut dev, 0x11, 1));
        // The last 4 bytes of queue_device, then nothing.
        write(&mut dev, 0x30, 0x4_0000_2000, 8);
        assert_eq!(read(&mut dev, 0x34, 8), 4);
        assert_eq!(read(&mut dev, 0x37, 4), 0);
    }

    /// Status bits clear only on reset, so a driver that drops DRIVER_OK
    /// and then resets still stops the device; DRIVER_OK with refused
    /// features starts nothing.
    #[test]
    fn status_bits_clear_only_on_reset_and_driver_ok_needs_features() {
        let (mut dev, record) = mock_transport();
        write(&mut dev, 0x14, 1 | 2, 1);
        write(&mut dev, 0x08, 1, 4);
        write(&mut dev, 0x0c, 1, 4);
        write(&mut dev, 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(record.lock().unwrap().activated.len(), 1);
        write(&mut dev, 0x14, 1, 1);
        assert_eq!(read(&mut dev, 0x14, 1), 1 | 2 | 8 | 4);
        write(&mut dev, 0x14, 0, 1);
        assert_eq!(record.lock().unwrap().resets, 1);

        // Without VERSION_1 the features are refused, in the same write
        // as DRIVER_OK.
        write(&mut dev, 0x14, 1 | 2, 1);
        write(&mut dev, 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(record.lock().unwrap().activated.len(), 1);
        assert_eq!(read(&mut dev, 0x14, 1), 1 | 2 | STATUS_NEEDS_RESET as u64);
    }

    /// Modern IDs only: device 0x1040 + type, and a subsystem device ID of
    /// 0x40 or more (a legacy driver matching the type there stays away):
    /// QEMU's 1af4:1100.
    #[test]
    fn ids_are_those_of_a_modern_only_device() {
        let (mut dev, _) = mock_transport();
        let ids = dev.config_read(0);
        assert_eq!(ids & 0xffff, u32::from(VIRTIO_VENDOR));
        let device = ids >> 16;
        assert_eq!(device, 0x1040 + u32::from(dev.device.device_type()));
        let subsystem = dev.config_read(11);
        assert_eq!(subsystem, 0x1100 << 16 | u32::from(VIRTIO_VENDOR));
        assert_eq!(dev.config_read(2) & 0xff, 1, "revision");
    }

    /// The kicks' ioeventfds leave with the BAR window, so another
    /// device's can take the address, and come back wherever it goes.
    #[test]
    fn kicks_leave_and_follow_the_bar_window() {
        let (mut dev, _) = mock_transport();
        let base = 0xc000_0000;
        let other = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let at = IoEventAddress::Mmio(notify_addr(base, 0));
        assert!(
            dev.vm.register_ioevent(&other, &at, NoDatamatch).is_err(),
            "the kick holds its notify address"
        );
        dev.bar_unmapped(0, base).unwrap();
        dev.vm.register_ioevent(&other, &at, NoDatamatch).unwrap();
        dev.bar_mapped(0, base + 0x10_0000).unwrap();
        // Back at the first place once the other is gone.
        dev.vm.unregister_ioevent(&other, &at, NoDatamatch).unwrap();
        dev.bar_unmapped(0, base + 0x10_0000).unwrap();
        dev.bar_mapped(0, base).unwrap();
    }

    /// A device that needs a reset starts only after one.
    #[test]
    fn a_device_that_needs_a_reset_does_not_start_without_one() {
        let (mut dev, record) = mock_transport();
        write(&mut dev, 0x14, 1 | 2, 1);
        write(&mut dev, 0x14, 1 | 2 | 4, 1);
        assert_ne!(read(&mut dev, 0x14, 1) & STATUS_NEEDS_RESET as u64, 0);
        write(&mut dev, 0x08, 1, 4);
        write(&mut dev, 0x0c, 1, 4);
        write(&mut dev, 0x14, 1 | 2 | 8, 1);
        write(&mut dev, 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(record.lock().unwrap().activated.len(), 0);
        write(&mut dev, 0x14, 0, 1);
        start_queue_1(&mut dev, 0x10_0000, 0x10_1000, 0x10_2000);
        assert_eq!(record.lock().unwrap().activated.len(), 1);
        assert_eq!(read(&mut dev, 0x14, 1), 1 | 2 | 8 | 4);
    }

    /// The BAR answers at power-on and after a reset alike: memory
    /// decoding on, as firmware leaves it; bus mastering off.
    #[test]
    fn the_command_register_is_the_same_at_power_on_and_after_a_reset() {
        let (mut dev, _record) = mock_transport();
        assert_eq!(dev.config_read(1) & 0xffff, 0x02);
        dev.config_write(1, 0, &[0x06, 0]);
        PciDevice::reset(&mut dev);
        assert_eq!(dev.config_read(1) & 0xffff, 0x02);
    }

    /// BAR 0, moved by the guest or left holding its size mask, is where
    /// the VMM put it after a platform reset.
    #[test]
    fn bar0_is_back_where_the_vmm_put_it_after_a_reset() {
        let (mut dev, _record) = mock_transport();
        assert_eq!((dev.config_read(4), dev.config_read(5)), (0xc000_0004, 0));
        dev.config_write(4, 0, &0xd000_0000u32.to_le_bytes());
        dev.config_write(5, 0, &u32::MAX.to_le_bytes());
        assert_ne!((dev.config_read(4), dev.config_read(5)), (0xc000_0004, 0));
        PciDevice::reset(&mut dev);
        assert_eq!((dev.config_read(4), dev.config_read(5)), (0xc000_0004, 0));
    }

    /// What a driver left in the registers it may write is gone after a
    /// platform reset: a PCI_CFG window left on the ISR (which a later
    /// dump of config space would read, and clear), the interrupt line,
    /// MSI-X enable.
    #[test]
    fn a_reset_clears_what_the_driver_wrote_to_config_space() {
        let (mut dev, _record) = mock_transport();
        let window = dev.pci_cfg_reg;
        let before: Vec<u32> = (0..64).map(|reg| dev.config_read(reg)).collect();
        dev.config_write(window + 1, 0, &[0]);
        dev.config_write(window + 2, 0, &0x1000u32.to_le_bytes());
        dev.config_write(window + 3, 0, &1u32.to_le_bytes());
        dev.config_write(15, 0, &[11]);
        dev.config_write(dev.msix_cap_reg, 3, &[0x80]);
        assert_ne!(dev.config_read(window + 3), before[window + 3]);
        assert_ne!(dev.config_read(15), before[15]);
        assert_ne!(dev.config_read(dev.msix_cap_reg), before[dev.msix_cap_reg]);
        PciDevice::reset(&mut dev);
        let after: Vec<u32> = (0..64)
            .filter(|&reg| reg != window + 4)
            .map(|reg| dev.config_read(reg))
            .collect();
        let before: Vec<u32> = (0..64)
            .filter(|&reg| reg != window + 4)
            .map(|reg| before[reg])
            .collect();
        assert_eq!(after, before);
    }

    /// Taking bus mastering away (Linux does before kexec) stops a running
    /// device: its rings stop and it needs a reset to run again.
    #[test]
    fn clearing_bus_master_stops_the_device_until_a_reset() {
        let (mut dev, record) = mock_transport();
        dev.config_write(1, 0, &[0x06, 0]);
        start_queue_1(&mut dev, 0x10_0000, 0x10_1000, 0x10_2000);
        assert_eq!(record.lock().unwrap().activated.len(), 1);
        // Memory decoding stays on: only bus mastering goes.
        let generation = read(&mut dev, 0x15, 1);
        dev.config_write(1, 0, &[0x02, 0]);
        assert_eq!(record.lock().unwrap().resets, 1);
        assert_ne!(read(&mut dev, 0x14, 1) & STATUS_NEEDS_RESET as u64, 0);
        assert_ne!(
            read(&mut dev, 0x15, 1),
            generation,
            "NEEDS_RESET is said with a configuration change"
        );
        // Turning it back on does not restart the device; a reset does.
        dev.config_write(1, 0, &[0x06, 0]);
        write(&mut dev, 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(record.lock().unwrap().activated.len(), 1);
        write(&mut dev, 0x14, 0, 1);
        start_queue_1(&mut dev, 0x10_0000, 0x10_1000, 0x10_2000);
        assert_eq!(record.lock().unwrap().activated.len(), 2);
    }

    #[test]
    fn driver_features_are_fixed_once_accepted() {
        let (mut dev, record) = mock_transport();
        write(&mut dev, 0x14, 1 | 2, 1);
        write(&mut dev, 0x08, 1, 4);
        write(&mut dev, 0x0c, 1, 4);
        write(&mut dev, 0x14, 1 | 2 | 8, 1);
        // Too late: dropping VERSION_1 after FEATURES_OK changes nothing.
        write(&mut dev, 0x0c, 0, 4);
        write(&mut dev, 0x14, 1 | 2 | 8 | 4, 1);
        let rec = record.lock().unwrap();
        assert_eq!(rec.activated.len(), 1);
        assert_eq!(rec.activated[0].0 >> 32 & 1, 1, "VERSION_1 kept");
    }

    /// Accepts VERSION_1 and sets queue 1 up with rings at `desc`, `avail`
    /// and `used`, then DRIVER_OK.
    fn start_queue_1(dev: &mut VirtioPciDevice, desc: u64, avail: u64, used: u64) {
        write(dev, 0x14, 1 | 2, 1);
        write(dev, 0x08, 1, 4);
        write(dev, 0x0c, 1, 4);
        write(dev, 0x14, 1 | 2 | 8, 1);
        write(dev, 0x16, 1, 2);
        write(dev, 0x18, 64, 2);
        write(dev, 0x1a, 1, 2);
        for (offset, addr) in [(0x20, desc), (0x28, avail), (0x30, used)] {
            write(dev, offset, addr & 0xffff_ffff, 4);
            write(dev, offset + 4, addr >> 32, 4);
        }
        write(dev, 0x1c, 1, 2);
        write(dev, 0x14, 1 | 2 | 8 | 4, 1);
    }

    /// A backend refuses misaligned rings, possibly after it started
    /// others, and cannot reach rings outside guest memory: the transport
    /// asks for a reset instead.
    #[test]
    fn rings_misaligned_or_outside_guest_memory_are_refused_at_driver_ok() {
        for (desc, avail, used) in [
            (0x10_0008, 0x10_1000, 0x10_2000),
            (0x10_0000, 0x10_1001, 0x10_2000),
            (0x10_0000, 0x10_1000, 0x10_2002),
            // 16 MiB of RAM: the used ring's last bytes are past its end.
            (0x10_0000, 0x10_1000, (16 << 20) - 64),
            (0x1_0000_0000, 0x10_1000, 0x10_2000),
        ] {
            let (mut dev, record) = mock_transport();
            start_queue_1(&mut dev, desc, avail, used);
            assert!(
                record.lock().unwrap().activated.is_empty(),
                "rings {desc:#x} {avail:#x} {used:#x} must not start"
            );
            assert_ne!(read(&mut dev, 0x14, 1) & STATUS_NEEDS_RESET as u64, 0);
            write(&mut dev, 0x14, 0, 1);
            assert_eq!(read(&mut dev, 0x14, 1), 0, "a reset clears it");
        }
        let (mut dev, record) = mock_transport();
        start_queue_1(&mut dev, 0x10_0000, 0x10_1002, (16 << 20) - 8 - 8 * 64);
        assert_eq!(record.lock().unwrap().activated.len(), 1);
    }

    /// The backend keeps the call eventfd it was given at DRIVER_OK, so a
    /// queue's vector cannot change after it.
    #[test]
    fn a_queue_vector_is_fixed_once_the_driver_is_ok() {
        let (mut dev, _record) = mock_transport();
        start_queue_1(&mut dev, 0x10_0000, 0x10_1000, 0x10_2000);
        write(&mut dev, 0x16, 1, 2);
        write(&mut dev, 0x1a, 0, 2);
        assert_eq!(read(&mut dev, 0x1a, 2), 1);
    }

    /// Takes what the configuration vector was raised since the last call.
    fn config_signals(dev: &VirtioPciDevice, vector: u16) -> u64 {
        dev.vector_events
            .get(usize::from(vector))
            .expect("vector")
            .read()
            .unwrap_or(0)
    }

    /// A configuration change, from the device model or the transport's
    /// NEEDS_RESET after DRIVER_OK, raises the driver's configuration
    /// vector, sets the ISR's config bit (cleared by its read) and moves
    /// the config generation.
    #[test]
    fn configuration_changes_reach_the_driver() {
        let (mut dev, record) = mock_transport();
        let notifier = record.lock().unwrap().notifier.clone().expect("notifier");
        // MSI-X stays disabled: a raised vector's count waits in its eventfd.
        write(&mut dev, 0x10, 2, 2);
        assert_eq!(read(&mut dev, 0x10, 2), 2);
        let generation = read(&mut dev, 0x15, 1);
        notifier.notify();
        assert_eq!(config_signals(&dev, 2), 1);
        assert_eq!(read(&mut dev, 0x15, 1), (generation + 1) & 0xff);
        assert_eq!(read(&mut dev, 0x1000, 1), 2, "ISR config bit");
        assert_eq!(read(&mut dev, 0x1000, 1), 0, "the ISR read clears it");

        // A vector the device does not have is none: nothing is raised.
        write(&mut dev, 0x10, 3, 2);
        assert_eq!(read(&mut dev, 0x10, 2), u64::from(NO_VECTOR));
        notifier.notify();
        for vector in 0..3 {
            assert_eq!(config_signals(&dev, vector), 0);
        }
        read(&mut dev, 0x1000, 1);

        // Rings the transport refuses at DRIVER_OK: NEEDS_RESET, notified.
        write(&mut dev, 0x10, 2, 2);
        start_queue_1(&mut dev, 0x10_0008, 0x10_1000, 0x10_2000);
        assert_ne!(read(&mut dev, 0x14, 1) & STATUS_NEEDS_RESET as u64, 0);
        assert_eq!(config_signals(&dev, 2), 1, "NEEDS_RESET not notified");
        assert_eq!(read(&mut dev, 0x1000, 1), 2);

        // A reset takes the vector away.
        write(&mut dev, 0x14, 0, 1);
        assert_eq!(read(&mut dev, 0x10, 2), u64::from(NO_VECTOR));
        notifier.notify();
        assert_eq!(config_signals(&dev, 2), 0);

        // A signal held for the driver (MSI-X off) when it resets the
        // device is not the next driver's.
        write(&mut dev, 0x10, 2, 2);
        notifier.notify();
        write(&mut dev, 0x14, 0, 1);
        assert_eq!(config_signals(&dev, 2), 0, "held across a reset");
    }

    /// The PCI_CFG capability: the driver picks BAR 0, an offset and a width,
    /// and pci_cfg_data reads and writes the BAR there.
    #[test]
    fn the_pci_cfg_window_reaches_the_bar() {
        let (mut dev, _record) = mock_transport();
        let mut cap = (dev.config_read(0xd) & 0xff) as usize;
        let mut found = None;
        while cap != 0 {
            let head = dev.config_read(cap / 4);
            if head & 0xff == u32::from(CAP_VENDOR) && (head >> 24) as u8 == CFG_PCI {
                found = Some(cap / 4);
            }
            cap = ((head >> 8) & 0xff) as usize;
        }
        let reg = found.expect("no PCI_CFG capability");
        assert_eq!(dev.config_read(reg) >> 16 & 0xff, 20, "cap_len");
        let window = |dev: &mut VirtioPciDevice, bar: u8, offset: u32, length: u32| {
            dev.config_write(reg + 1, 0, &[bar]);
            dev.config_write(reg + 2, 0, &offset.to_le_bytes());
            dev.config_write(reg + 3, 0, &length.to_le_bytes());
        };
        // num_queues in the common configuration, 2 bytes.
        window(&mut dev, 0, 0x12, 2);
        assert_eq!(dev.config_read(reg + 4), 2);
        // The device configuration, 4 bytes (the mock answers offset + i).
        window(&mut dev, 0, 0x2004, 4);
        assert_eq!(dev.config_read(reg + 4).to_le_bytes(), [4, 5, 6, 7]);
        // Writing device_status through the window.
        window(&mut dev, 0, 0x14, 1);
        dev.config_write(reg + 4, 0, &[1]);
        assert_eq!(read(&mut dev, 0x14, 1), 1);
        // A dword write to a 1-byte window writes its first byte.
        dev.config_write(reg + 4, 0, &[3, 0xff, 0xff, 0xff]);
        assert_eq!(read(&mut dev, 0x14, 1), 3);
        // A write narrower than the window, a misaligned window, another
        // BAR, a width of 3: nothing reaches the BAR.
        window(&mut dev, 0, 0x14, 2);
        dev.config_write(reg + 4, 0, &[7]);
        window(&mut dev, 0, 0x13, 2);
        dev.config_write(reg + 4, 0, &[0, 7]);
        window(&mut dev, 2, 0x14, 1);
        dev.config_write(reg + 4, 0, &[7]);
        assert_eq!(dev.config_read(reg + 4), 0);
        window(&mut dev, 0, 0x14, 3);
        dev.config_write(reg + 4, 0, &[7, 0, 0]);
        assert_eq!(read(&mut dev, 0x14, 1), 3);
    }
}
