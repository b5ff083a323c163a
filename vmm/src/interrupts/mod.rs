//! Interrupt routing: KVM GSI routes for MSI vectors next to the legacy
//! irqchip routes.

pub mod msi;
