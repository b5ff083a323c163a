//! The VM's state on the host: guest memory, the KVM VM and its vCPUs.

pub mod memory;
pub mod run_control;
pub mod vcpu;
pub mod vm;
