//! Taking a device's backend back after it dies: a thread per device sleeps
//! until the connection is gone, gets a new one, and hands it to the
//! device, which negotiates again and gives the new backend its rings
//! where the guest left them.
//!
//! A backend that dies again soon after it was taken back (one that
//! crashes on a request it is handed again at each restart), or that fails
//! to set up, makes the next one wait longer, from a quarter of a second up
//! to 8 s, so that a crash loop costs the VMM and the guest little; one
//! that ran for a while is followed at once.
//!
//! Where the new connection comes from depends on who listens: with
//! `server=on` the restarted backend connects to the VMM's socket; when
//! the backend listens (the default), the VMM dials its socket until it is
//! back.

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::deadline::{self, REPLY_TIMEOUT};

/// How often it dials a backend's socket until the backend is back.
const DIAL_INTERVAL: Duration = Duration::from_millis(100);
/// How long it waits after accept(2) failed for want of resources.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// A backend that ran less than this after it was taken makes the next
/// one wait (`Backoff`).
const SHORT_LIFE: Duration = Duration::from_secs(5);
/// The first wait, doubled at each short life up to `LONGEST_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const LONGEST_PAUSE: Duration = Duration::from_secs(8);

/// How long to wait before taking the next backend, from how the last
/// ones fared.
#[derive(Debug, Default)]
struct Backoff {
    pause: Duration,
}

impl Backoff {
    /// The pause before the next backend: none after one that ran for
    /// `SHORT_LIFE` or more; else twice the last pause, from `FIRST_PAUSE`
    /// up to `LONGEST_PAUSE`. `lived`: how long the last backend ran after
    /// it was taken, or `None` if it could not be set up.
    fn next(&mut self, lived: Option<Duration>) -> Duration {
        self.pause = match lived {
            Some(lived) if lived >= SHORT_LIFE => Duration::ZERO,
            _ => (self.pause * 2).clamp(FIRST_PAUSE, LONGEST_PAUSE),
        };
        self.pause
    }
}

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
                    // A backend that connected and died while it waited
                    // (restarted during a pause): nothing to take.
                    Ok((stream, _)) if peer_gone(&stream) => {
                        log::debug!(
                            "{name}: skipped a connection on {} whose backend has gone",
                            path.display()
                        );
                    }
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

/// Whether the other end of `stream` has closed it (a vhost-user backend
/// says nothing before the frontend does, so that is all there is to see).
fn peer_gone(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a descriptor `stream` owns; a timeout of
    // 0 only looks.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready == 1 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
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
/// the next connection from `source` goes to `attach`, after a pause if
/// the last backend did not last (`Backoff`). The device's first backend
/// counts as taken when this is called.
pub fn spawn(
    name: String,
    path: PathBuf,
    source: Source,
    wait_gone: impl Fn() + Send + 'static,
    attach: impl Fn(UnixStream) -> Result<(), String> + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("{name}-reconnect"))
        .spawn(move || {
            let mut taken = Some(Instant::now());
            let mut backoff = Backoff::default();
            loop {
                wait_gone();
                let pause = backoff.next(taken.map(|at| at.elapsed()));
                if !pause.is_zero() {
                    log::info!(
                        "{name}: the last backend did not last; waiting {} ms before taking the next",
                        pause.as_millis()
                    );
                    std::thread::sleep(pause);
                }
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
                taken = match attach(stream) {
                    Ok(()) => Some(Instant::now()),
                    Err(e) => {
                        log::error!("{name}: a backend answered on {} but: {e}", path.display());
                        None
                    }
                };
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each backend that dies young or fails doubles the pause, up to the
    /// longest; one that lasted resets it.
    #[test]
    fn the_pause_grows_while_backends_die_young_and_ends_when_one_lasts() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next(Some(SHORT_LIFE)), Duration::ZERO);
        let young = Some(Duration::from_millis(10));
        assert_eq!(backoff.next(young), FIRST_PAUSE);
        assert_eq!(backoff.next(None), FIRST_PAUSE * 2);
        assert_eq!(backoff.next(young), FIRST_PAUSE * 4);
        for _ in 0..10 {
            backoff.next(None);
        }
        assert_eq!(backoff.next(young), LONGEST_PAUSE);
        assert_eq!(backoff.next(Some(SHORT_LIFE * 2)), Duration::ZERO);
        assert_eq!(backoff.next(young), FIRST_PAUSE);
    }

    /// Connections whose backends died while they waited to be taken are
    /// skipped; a live one behind them is taken.
    #[test]
    fn connections_from_backends_that_have_gone_are_skipped() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backend.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        for _ in 0..2 {
            let mut gone = UnixStream::connect(&path).expect("connect");
            gone.write_all(b"g").expect("write");
        }
        let mut live = UnixStream::connect(&path).expect("connect");
        live.write_all(b"l").expect("write");
        let (taken, seen) = std::sync::mpsc::channel();
        spawn(
            "test".into(),
            path.clone(),
            Source::Listener(listener),
            || {},
            move |mut stream| {
                let mut byte = [0u8];
                let _ = stream.read_exact(&mut byte);
                let _ = taken.send(byte[0]);
                Ok(())
            },
        )
        .expect("spawn");
        assert_eq!(seen.recv_timeout(Duration::from_secs(10)), Ok(b'l'));
        assert!(seen.recv_timeout(FIRST_PAUSE * 4).is_err());
        drop(live);
    }

    /// Backends that connect and are gone at once are taken one after
    /// another with growing pauses between them.
    #[test]
    fn backends_that_die_at_once_are_taken_ever_more_slowly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("backend.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (taken, times) = std::sync::mpsc::channel();
        let start = Instant::now();
        spawn(
            "test".into(),
            path.clone(),
            Source::Listener(listener),
            || {},
            move |_stream| {
                let _ = taken.send(Instant::now());
                Ok(())
            },
        )
        .expect("spawn");
        let _clients: Vec<UnixStream> = (0..3)
            .map(|_| UnixStream::connect(&path).expect("connect"))
            .collect();
        let mut last = start;
        for expected in [FIRST_PAUSE, FIRST_PAUSE * 2, FIRST_PAUSE * 4] {
            let at = times
                .recv_timeout(Duration::from_secs(10))
                .expect("a backend taken");
            assert!(
                at - last >= expected,
                "taken {:?} after the last, expected a pause of {expected:?}",
                at - last
            );
            last = at;
        }
    }

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
