//! Command line of the vhost-blk backend.

use std::path::PathBuf;

use clap::Parser;

/// Serves a raw disk image as a vhost-user-blk device on a Unix socket.
/// One frontend (VMM) at a time; the next is served after a disconnect.
/// After the image is resized in place, SIGHUP serves the new size and
/// tells the frontend.
#[derive(Debug, Parser)]
#[command(name = "vhost-blk", version, about, long_about = None)]
pub struct Args {
    /// Unix socket to listen on (a stale socket file is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Raw disk image to serve; its size must be a multiple of 512 bytes.
    #[arg(long, value_name = "PATH")]
    pub image: PathBuf,
    /// Serve the image read-only (VIRTIO_BLK_F_RO; writes get IOERR).
    #[arg(long)]
    pub readonly: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Number of request queues (1 to 16), one worker thread each.
    #[arg(long, value_name = "N", default_value = "1")]
    pub num_queues: String,
    /// Maximum size of each queue (a power of two, 4 to 32768).
    #[arg(long, value_name = "N", default_value = "256")]
    pub queue_size: String,
    /// Serial number reported to VIRTIO_BLK_T_GET_ID (at most 20 bytes;
    /// defaults to the image file name, cut to 20 bytes).
    #[arg(long, value_name = "STRING")]
    pub serial: Option<String>,
    /// With --direct (and EVENT_IDX): the longest, in microseconds (0 to
    /// 1000), that a queue with transfers in flight, or that has just
    /// completed some, watches its ring and its completions before it
    /// sleeps, offering its core to any other runnable thread between
    /// looks. The window adapts to how long the queue waits for work, watch
    /// and sleep together: a wait no longer than this doubles it, a longer
    /// one halves it (below 8 us, to none) [default with --direct: 1000; 0
    /// turns watching off]
    #[arg(long, value_name = "US")]
    pub poll_us: Option<String>,
}
