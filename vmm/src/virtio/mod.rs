//! Virtio devices as the guest sees them: the device model trait and the
//! virtio-pci (modern, 1.x) transport.

pub mod device;
pub mod pci;
