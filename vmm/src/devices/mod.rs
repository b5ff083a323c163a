//! Platform devices emulated in the VMM: the console and the power and
//! reset controls. Virtio devices live in vhost-user backends.

pub mod acpi_pm;
pub mod i8042;
pub mod serial;
