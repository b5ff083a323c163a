//! A minimal vhost-user frontend for testing and loading backends without a
//! VM or KVM: guest memory is a memfd this process maps and hands to the
//! backend, and the split virtqueues are built here, driver side.
//!
//! - `memory`: the memfd guest memory and a bump allocator in it.
//! - `virtqueue`: the driver half of a split ring (EVENT_IDX included).
//! - `connection`: the vhost-user negotiation and ring set-up.
//! - `blk`: virtio-blk requests, one at a time, and raw chains for tests.
//! - `net`: virtio-net frames sent and received, and raw chains for tests.
//! - `pipeline`: up to `depth` virtio-blk requests in flight on one queue.
//! - `malformed`: vhost-user messages no frontend should send.
//! - `fuzz`: random and mutated descriptor chains.
//! - `latency`: request latencies as a histogram of fixed size.
//! - `load`: the engine of the `vhost-loadgen` benchmark.
//! - `netload`: the engine of the `vhost-netload` benchmark (frames through
//!   a net backend and its tap, either way).
//!
//! Dropping a [`BlkClient`] (or a [`Connection`]) closes the socket; a new
//! one can then connect to the same backend.

pub mod blk;
pub mod connection;
pub mod fuzz;
pub mod latency;
pub mod load;
pub mod malformed;
pub mod memory;
pub mod net;
pub mod netload;
pub mod pipeline;
pub mod virtqueue;

pub use blk::{BlkClient, BlkError, Completion};
pub use connection::{Connection, ConnectionError, Options};
pub use net::{NetClient, NetError, NetOptions, Received};
pub use pipeline::{Done, Pipeline, Request};
