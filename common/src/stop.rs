//! How a backend process stops: SIGTERM or SIGINT runs its last words
//! (a final flush, say), removes its socket and exits 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Whether the process has bound its socket: a stop removes the socket
/// file only then (before, the path may hold another process's live
/// socket, the one that made this process's claim fail or wait).
#[derive(Clone, Default)]
pub struct SocketBound(Arc<AtomicBool>);

impl SocketBound {
    /// Call once the socket is bound.
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (threads started later
/// inherit that) and starts a thread that waits for either, then runs
/// `before_exit`, removes `socket` (once the returned flag says it is
/// bound) and exits the process with status 0.
pub fn exit_on_stop_signals(
    socket: PathBuf,
    before_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<SocketBound> {
    let bound = SocketBound::default();
    let ours = bound.clone();
    // SAFETY: an all-zero sigset is valid storage for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: blocks the signals in this thread; `set` is initialised and a
    // null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: `set` is initialised and `signal` is a valid out-pointer.
            unsafe { libc::sigwait(&set, &mut signal) };
            log::info!("signal {signal}: stopping");
            before_exit();
            if ours.is_set() {
                let _ = std::fs::remove_file(&socket);
            }
            std::process::exit(0);
        })?;
    Ok(bound)
}
