//! How a backend process stops: SIGTERM or SIGINT runs its last words
//! (a final flush, say), removes its socket and exits 0.

use std::path::PathBuf;

/// Blocks SIGTERM and SIGINT in the calling thread (threads started later
/// inherit that) and starts a thread that waits for either, then runs
/// `before_exit`, removes `socket` and exits the process with status 0.
pub fn exit_on_stop_signals(
    socket: PathBuf,
    before_exit: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
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
            let _ = std::fs::remove_file(&socket);
            std::process::exit(0);
        })?;
    Ok(())
}
