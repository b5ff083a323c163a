//! Taking a device's backend back after it dies: a thread per device sleeps
//! until the connection is gone, gets a new one, and hands it to the
//! device, which negotiates again and gives the new backend its rings
//! where the guest left them.
//!
//! Where the new connection comes from depends on who listens: with
//! `server=on` the restarted backend connects to the VMM's socket; when
//! the backend listens (the default), the VMM dials its socket until it is
//! back.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::deadline::{self, REPLY_TIMEOUT};

/// How often it dials a backend's socket until the backend is back.
const DIAL_INTERVAL: Duration = Duration::from_millis(100);
/// How long it waits after a backend it took back failed to set up.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Where a device's next backend connection comes from.
pub enum Source {
    /// The VMM listens (`server=on`): the next backend to connect.
    Listener(UnixListener),
    /// The backend listens: dial its socket until it answers.
    Dial,
}

impl Source {
    /// Waits for the next connection; an error that leaves the socket
    /// unusable ends the reconnecting. Others (out of descriptors or
    /// memory for a while) are waited out.
    fn next(&self, path: &Path, name: &str) -> io::Result<UnixStream> {
        match self {
            Source::Listener(listener) => loop {
                match listener.accept() {
                    Ok((stream, _)) => return Ok(stream),
                    Err(e) if accept_retryable(&e) => {
                        if e.kind() != io::ErrorKind::Interrupted {
                            log::warn!(
                                "{name}: taking a connection on {}: {e}; trying again",
                                path.display()
                            );
                            std::thread::sleep(RETRY_AFTER_FAILURE);
                        }
                    }
                    Err(e) => return Err(e),
                }
            },
            Source::Dial => {
                log::info!(
                    "{name}: dialing {} until the backend is back",
                    path.display()
                );
                loop {
                    match deadline::dial(path, REPLY_TIMEOUT) {
                        Ok(stream) => return Ok(stream),
                        Err(_) => std::thread::sleep(DIAL_INTERVAL),
                    }
                }
            }
        }
    }
}

/// Whether accept(2) may succeed later on the same socket: it failed for
/// want of descriptors or memory, or for the one connection it took.
fn accept_retryable(e: &io::Error) -> bool {
    !matches!(
        e.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

/// Serves a device's reconnections for the life of the process: each time
/// `wait_gone` returns (it sleeps while the device's backend is connected),
/// the next connection from `source` goes to `attach`.
pub fn spawn(
    name: String,
    path: PathBuf,
    source: Source,
    wait_gone: impl Fn() + Send + 'static,
    attach: impl Fn(UnixStream) -> Result<(), String> + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("{name}-reconnect"))
        .spawn(move || loop {
            wait_gone();
            let stream = match source.next(&path, &name) {
                Ok(stream) => stream,
                Err(e) => {
                    log::error!(
                        "{name}: waiting for a backend on {} failed: {e}; it stays stopped",
                        path.display()
                    );
                    return;
                }
            };
            if let Err(e) = attach(stream) {
                log::error!("{name}: a backend answered on {} but: {e}", path.display());
                std::thread::sleep(RETRY_AFTER_FAILURE);
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Running out of descriptors (a backend's rings hold many) is waited
    /// out; a socket that is gone is not.
    #[test]
    fn accept_waits_out_a_lack_of_descriptors_but_not_a_broken_socket() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
            libc::ENOBUFS,
            libc::EINTR,
        ] {
            assert!(
                accept_retryable(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert!(
                !accept_retryable(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
    }
}
