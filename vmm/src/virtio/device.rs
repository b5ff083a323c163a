//! What a virtio device model provides to the transport. The vhost-user
//! devices implement it by forwarding to a backend process; tests can put
//! a mock under the transport.

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
    /// The driver reset the device: stop the data path.
    fn reset(&mut self);
    /// A new backend, after the last one was lost.
    fn reconnect(
        &mut self,
        _backend: crate::vhost_user::frontend::NewBackend,
    ) -> Result<(), String> {
        Err("this device cannot take a new backend".into())
    }
}
