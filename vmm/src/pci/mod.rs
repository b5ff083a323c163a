//! PCI: configuration space access and the devices on bus 0.

pub mod config_io;
