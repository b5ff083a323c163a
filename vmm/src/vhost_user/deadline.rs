//! A time limit on every exchange with a vhost-user backend. The `vhost`
//! crate waits for a reply as long as it takes, so a backend that accepted
//! the connection and then stopped answering (stopped, deadlocked, or not a
//! vhost-user backend at all) would hold the thread that asked for ever:
//! start-up, a vCPU reading the device's config space, or the main thread
//! resetting devices on reboot, which then ignores SIGTERM too.
//!
//! `arm` starts the clock before an exchange; the guard it returns stops
//! it. One watchdog thread shuts down the socket of every exchange that
//! overruns: the waiting call returns an error at once, the device stops as
//! if its backend had died (and is taken back if the backend comes back),
//! and the log names it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;

/// How long a backend may take to answer. Backends answer in microseconds;
/// the longest legitimate waits are GET_VRING_BASE, which finishes the
/// ring's in-flight requests first, and SET_MEM_TABLE to a backend that
/// pins guest memory (see `MEM_TABLE_PER_GIB`).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// What a memory table adds to the limit per GiB of guest memory, for
/// backends that map it for DMA or fault it all in (SPDK, DPDK with
/// populate).
pub const MEM_TABLE_PER_GIB: Duration = Duration::from_secs(1);

struct Armed {
    id: u64,
    fd: RawFd,
    name: String,
    limit: Duration,
    due: Instant,
    expired: Arc<AtomicBool>,
}

#[derive(Default)]
struct Watchdog {
    armed: Mutex<Vec<Armed>>,
    changed: Condvar,
    next_id: AtomicU64,
}

/// The running exchange's clock: dropping it stops the clock.
pub struct Deadline {
    id: Option<u64>,
    limit: Duration,
    expired: Arc<AtomicBool>,
    /// Keeps the connection, and so the watched fd, open while armed.
    _connection: Frontend,
}

impl Deadline {
    /// Whether the backend overran and its connection was shut down.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
    }

    /// The limit, in whole seconds (for messages).
    pub fn secs(&self) -> u64 {
        self.limit.as_secs()
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let (Some(id), Some(dog)) = (self.id, watchdog()) {
            crate::bus::lock(&dog.armed).retain(|a| a.id != id);
        }
    }
}

/// Starts the clock on an exchange with `connection` for device `name`,
/// to run out after `limit`. Without a watchdog thread (it could not be
/// started) the exchange simply has no limit; that was logged once.
pub fn arm(connection: &Frontend, name: &str, limit: Duration) -> Deadline {
    let expired = Arc::new(AtomicBool::new(false));
    let id = watchdog().map(|dog| {
        let id = dog.next_id.fetch_add(1, Ordering::Relaxed);
        crate::bus::lock(&dog.armed).push(Armed {
            id,
            fd: connection.as_raw_fd(),
            name: name.to_string(),
            limit,
            due: Instant::now() + limit,
            expired: expired.clone(),
        });
        dog.changed.notify_one();
        id
    });
    Deadline {
        id,
        limit,
        expired,
        _connection: connection.clone(),
    }
}

fn watchdog() -> Option<&'static Watchdog> {
    static DOG: OnceLock<Option<&'static Watchdog>> = OnceLock::new();
    *DOG.get_or_init(|| {
        let dog: &'static Watchdog = Box::leak(Box::default());
        match std::thread::Builder::new()
            .name("vhost-user-deadline".into())
            .spawn(move || dog.run())
        {
            Ok(_) => Some(dog),
            Err(e) => {
                log::warn!("cannot start the vhost-user reply watchdog ({e}); backends have no reply timeout");
                None
            }
        }
    })
}

impl Watchdog {
    fn run(&self) {
        let mut armed = crate::bus::lock(&self.armed);
        loop {
            let now = Instant::now();
            armed.retain(|a| {
                if a.due > now {
                    return true;
                }
                log::error!(
                    "{}: the vhost-user backend did not answer within {} s; closing its connection",
                    a.name,
                    a.limit.as_secs()
                );
                a.expired.store(true, Ordering::Release);
                // SAFETY: the fd is open: the `Deadline` that armed this
                // entry holds the connection until it has removed the entry
                // under this lock. Shutting a socket down changes no memory
                // of ours; it wakes the thread blocked on it with an error.
                unsafe { libc::shutdown(a.fd, libc::SHUT_RDWR) };
                false
            });
            armed = match armed.iter().map(|a| a.due).min() {
                None => self
                    .changed
                    .wait(armed)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(due) => {
                    self.changed
                        .wait_timeout(armed, due.saturating_duration_since(now))
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
            };
        }
    }
}
