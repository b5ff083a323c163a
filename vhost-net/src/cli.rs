//! Command line of the vhost-net backend.

use std::path::PathBuf;

use clap::Parser;

/// Serves a host tap as a vhost-user-net device on a Unix socket: frames
/// move between the guest's virtqueues and the tap directly. One frontend
/// (VMM) at a time; the next is served after a disconnect.
#[derive(Debug, Parser)]
#[command(name = "vhost-net", version, about, long_about = None)]
pub struct Args {
    /// Unix socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Tap interface to attach to (at most 15 bytes); created if absent.
    #[arg(long, value_name = "NAME")]
    pub tap: String,
    /// Number of virtqueues: two (rx, tx) per queue pair, an even number
    /// from 2 to 32; one worker thread and one tap queue per pair.
    #[arg(long, value_name = "N", default_value = "2")]
    pub num_queues: String,
    /// Maximum size of each queue (a power of two, 1 to 32768).
    #[arg(long, value_name = "N", default_value = "256")]
    pub queue_size: String,
}
