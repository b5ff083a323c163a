//! A minimal vhost-user frontend for testing and loading backends without a
//! VM or KVM: guest memory is a memfd this process maps and hands to the
//! backend, and the split virtqueues are built here, driver side.
//!
//! `connection` negotiates and sets the rings up, `virtqueue` is the driver
//! half of a split ring, `blk` speaks virtio-blk on top, and `load` is the
//! engine of the `vhost-loadgen` benchmark.

pub mod blk;
pub mod connection;
pub mod load;
pub mod memory;
pub mod virtqueue;

pub use blk::BlkClient;
pub use connection::{Connection, ConnectionError};
