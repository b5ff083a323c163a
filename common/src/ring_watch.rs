//! Watching a virtqueue for new chains for a moment before sleeping. A
//! driver that keeps a ring busy makes the next chains available within
//! microseconds of its last completions; catching them while still awake
//! saves the driver's kick and the worker's wake-up, which cost tens of
//! microseconds each on a busy or nested host.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

/// How a watch waits between two looks at the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Keeps the core: the shortest reaction, for short windows.
    Spin,
    /// Gives the core to any other thread that wants it (sched_yield)
    /// between looks: a long watch then costs a driver or a vCPU on the
    /// same core no more than a turn, and each look also runs the kernel
    /// work queued for this thread (io_uring completions among it).
    Yield,
}

/// Whether the driver makes new chains available on `q`, or `other` says
/// there is other work, within `window` (false at once if the avail ring
/// cannot be read).
pub fn avail_within(
    q: &Queue,
    mem: &GuestMemoryMmap,
    window: Duration,
    pause: Pause,
    mut other: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + window;
    for look in 0u32.. {
        match q.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) if idx.0 != q.next_avail() => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
        if other() {
            return true;
        }
        match pause {
            Pause::Spin => {
                // The clock is read every few rounds only.
                if look % 16 == 15 && Instant::now() >= deadline {
                    return false;
                }
                std::hint::spin_loop();
            }
            Pause::Yield => {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::yield_now();
            }
        }
    }
    false
}
