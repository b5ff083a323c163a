//! What a virtio device model provides to the transport. The vhost-user
//! devices implement it by forwarding to a backend process; tests can put
//! a mock under the transport.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemory;

/// Feature bits the transport itself cares about.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A queue the driver set up, as handed to the device on activation.
pub struct ActiveQueue<'a> {
    pub index: u16,
    pub size: u16,
    /// Guest physical addresses of the descriptor table, avail and used rings.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Signalled by KVM when the guest writes the queue's notify address.
    pub kick: &'a EventFd,
    /// Raises the queue's MSI-X vector; `None` when the driver set no vector.
    pub call: Option<&'a EventFd>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ActivateError(pub String);

/// The ISR status bit of a configuration change.
pub const ISR_CONFIG: u8 = 2;
/// "No MSI-X vector" in the common configuration.
pub const NO_VECTOR: u16 = 0xffff;

/// A device's configuration-change notification (VIRTIO 1.2, 4.1.4.5): the
/// ISR bit, the config generation, and the MSI-X vector the driver chose.
/// Shared by the transport, which owns the registers, and the device model,
/// which tells the driver that its configuration changed from whatever
/// thread saw the change (a NIC's link going down with its backend).
#[derive(Clone)]
pub struct ConfigNotifier(Arc<ConfigState>);

struct ConfigState {
    isr: AtomicU8,
    generation: AtomicU8,
    vector: AtomicU16,
    /// Each MSI-X vector's eventfd (KVM irqfds), by vector number.
    vectors: Vec<EventFd>,
}

impl ConfigNotifier {
    /// `vectors`: the eventfd raising each MSI-X vector.
    pub fn new(vectors: Vec<EventFd>) -> Self {
        ConfigNotifier(Arc::new(ConfigState {
            isr: AtomicU8::new(0),
            generation: AtomicU8::new(0),
            vector: AtomicU16::new(NO_VECTOR),
            vectors,
        }))
    }

    /// The configuration changed: a new generation, the ISR bit, and the
    /// driver's configuration vector if it set one.
    pub fn notify(&self) {
        let state = &self.0;
        state.generation.fetch_add(1, Ordering::AcqRel);
        state.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        let vector = state.vector.load(Ordering::Acquire);
        if let Some(event) = state.vectors.get(usize::from(vector)) {
            if let Err(e) = event.write(1) {
                log::warn!("cannot raise configuration vector {vector}: {e}");
            }
        }
    }

    /// The configuration vector (`msix_config`).
    pub fn vector(&self) -> u16 {
        self.0.vector.load(Ordering::Acquire)
    }

    /// Sets the configuration vector; one the device does not have is
    /// taken as none.
    pub fn set_vector(&self, vector: u16) {
        let vector = if usize::from(vector) < self.0.vectors.len() {
            vector
        } else {
            NO_VECTOR
        };
        self.0.vector.store(vector, Ordering::Release);
    }

    pub fn generation(&self) -> u8 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// Reads the ISR status and clears it, as a driver's read does.
    pub fn take_isr(&self) -> u8 {
        self.0.isr.swap(0, Ordering::AcqRel)
    }

    /// As after a device reset: no vector, ISR clear, a new generation.
    pub fn reset(&self) {
        self.0.vector.store(NO_VECTOR, Ordering::Release);
        self.0.isr.store(0, Ordering::Release);
        self.0.generation.fetch_add(1, Ordering::AcqRel);
    }
}

pub trait VirtioDevice: Send {
    /// Virtio device type (2 = block, 1 = net).
    fn device_type(&self) -> u16;
    /// A short name for logs: "disk0 (/run/disk0.sock)".
    fn name(&self) -> &str;
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Number of queues and their maximum sizes.
    fn queue_max_sizes(&self) -> Vec<u16>;
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start the data path.
    fn activate(
        &mut self,
        mem: &GuestMemory,
        driver_features: u64,
        queues: &[ActiveQueue<'_>],
    ) -> Result<(), ActivateError>;
    /// The device was reset, by its driver or with the platform, whether it
    /// had started or not: stop the data path if it runs, and forget what
    /// the driver set (its configuration-space writes too).
    fn reset(&mut self);
    /// Hands the device the transport's configuration-change notification,
    /// once, before the driver runs (devices whose configuration never
    /// changes on their own ignore it).
    fn set_config_notifier(&mut self, _notifier: ConfigNotifier) {}
    /// A new backend, after the last one was lost.
    fn reconnect(
        &mut self,
        _backend: crate::vhost_user::frontend::NewBackend,
    ) -> Result<(), String> {
        Err("this device cannot take a new backend".into())
    }
}
