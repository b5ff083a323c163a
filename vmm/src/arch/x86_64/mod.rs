//! x86_64: the guest physical layout, CPUID, register set-up, ACPI tables
//! and the kernel loaders.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod regs;
