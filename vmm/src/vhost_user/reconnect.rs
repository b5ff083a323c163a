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
    /// Waits for the next connection; an error ends the reconnecting.
    fn next(&self, path: &Path, name: &str) -> io::Result<UnixStream> {
        match self {
            Source::Listener(listener) => listener.accept().map(|(stream, _)| stream),
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
