//! Platform devices emulated in the VMM: the console, the power and reset
//! controls, and the ACPI event device (power button). Virtio devices live in vhost-user backends.

pub mod acpi_pm;
pub mod ged;
pub mod i8042;
pub mod serial;
