//! Signals of a backend process. How it stops: SIGTERM or SIGINT runs its
//! last words (a final flush, say), removes its socket and exits 0. And a
//! signal it acts on and goes on (vhost-blk's SIGHUP).

use std::sync::{Arc, Mutex};

use crate::socket_path::OwnSocket;

/// The socket a stop removes, once the process has bound it (before, the
/// path may hold another process's live socket, the one that made this
/// process's claim fail or wait).
#[derive(Clone, Default)]
pub struct SocketBound(Arc<Mutex<Option<OwnSocket>>>);

impl SocketBound {
    /// Call once the socket is bound.
    pub fn set(&self, socket: OwnSocket) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(socket);
    }

    fn take(&self) -> Option<OwnSocket> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Blocks `signals` in the calling thread; threads started later inherit
/// the mask. A process that waits for signals in threads of their own
/// (`exit_on_stop_signals`, `on_signal`) blocks every one of them before it
/// starts any thread, so none reaches a thread that does not wait for it
/// (and is not taken by its default action, which ends the process).
pub fn block(signals: &[libc::c_int]) -> std::io::Result<()> {
    let set = signal_set(signals);
    // SAFETY: blocks the signals in this thread; `set` is initialised and a
    // null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: an all-zero sigset is valid storage for sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid storage; an invalid signal number only makes
    // sigaddset fail, which leaves the set as it was.
    unsafe {
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
    }
    set
}

/// Waits for one of the signals in `set` (blocked in this thread).
fn wait_for(set: &libc::sigset_t) -> libc::c_int {
    let mut signal = 0;
    // SAFETY: `set` is initialised and `signal` is a valid out-pointer.
    unsafe { libc::sigwait(set, &mut signal) };
    signal
}

/// Blocks SIGTERM and SIGINT in the calling thread (threads started later
/// inherit that) and starts a thread that waits for either, then runs
/// `before_exit`, removes the socket (once it is set in the returned
/// `SocketBound`, and only if it is still there) and exits the process
/// with status 0.
pub fn exit_on_stop_signals(
    before_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<SocketBound> {
    let bound = SocketBound::default();
    let ours = bound.clone();
    let stops = [libc::SIGTERM, libc::SIGINT];
    block(&stops)?;
    let set = signal_set(&stops);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let signal = wait_for(&set);
            log::info!("signal {signal}: stopping");
            before_exit();
            if let Some(socket) = ours.take() {
                socket.remove();
            }
            std::process::exit(0);
        })?;
    Ok(bound)
}

/// Blocks `signal` in the calling thread and starts a thread (`name`) that
/// runs `handler` each time it arrives.
pub fn on_signal(
    signal: libc::c_int,
    name: &str,
    mut handler: impl FnMut() + Send + 'static,
) -> std::io::Result<()> {
    block(&[signal])?;
    let set = signal_set(&[signal]);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || loop {
            wait_for(&set);
            handler();
        })?;
    Ok(())
}
