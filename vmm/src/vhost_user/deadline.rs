//! A time limit on every exchange with a vhost-user backend. The `vhost`
//! crate waits for a reply as long as it takes, so a backend that accepted
//! the connection and then stopped answering (stopped, deadlocked, or not a
//! vhost-user backend at all) would hold the thread that asked for ever:
//! start-up, a vCPU reading the device's config space, or the main thread
//! resetting devices on reboot, which then ignores SIGTERM too.
//!
//! `exchange` runs one request with its own clock. One watchdog thread
//! shuts down the socket of every exchange that overruns: the waiting call
//! returns an error at once, the device stops as if its backend had died
//! (and is taken back if the backend comes back), and the log names it.
//!
//! `dial` gives connecting the same limit: `connect` on a Unix socket waits
//! for as long as the backend leaves its listen queue full.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use thiserror::Error;
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

/// The longest a backend may take over one message: SET_MEM_TABLE for
/// `memory_bytes` of guest memory.
pub fn longest_reply(memory_bytes: u64) -> Duration {
    let gib = u32::try_from(memory_bytes >> 30).unwrap_or(u32::MAX);
    REPLY_TIMEOUT + MEM_TABLE_PER_GIB * gib
}

/// A duration as the log and errors give it: "5 s", "1.5 s", "300 ms".
pub struct Secs(pub Duration);

impl std::fmt::Display for Secs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0;
        if d < Duration::from_secs(1) {
            write!(f, "{} ms", d.as_millis())
        } else if d.subsec_millis() == 0 {
            write!(f, "{} s", d.as_secs())
        } else {
            write!(f, "{:.1} s", d.as_secs_f64())
        }
    }
}

/// A time limit on a run of exchanges (handing a backend its rings,
/// stopping them): each exchange gets its own limit or what is left of the
/// run's, whichever is less, so a backend that answers every message just
/// inside its limit cannot hold the thread for the sum of them all.
pub struct Budget {
    total: Duration,
    due: Instant,
}

impl Budget {
    pub fn new(total: Duration) -> Budget {
        Budget {
            total,
            due: Instant::now() + total,
        }
    }

    /// The limit of the next exchange, whose own is `own`.
    pub fn limit(&self, own: Duration) -> Duration {
        own.min(self.due.saturating_duration_since(Instant::now()))
    }

    /// Whether the run's time is up.
    pub fn spent(&self) -> bool {
        Instant::now() >= self.due
    }

    pub fn total(&self) -> Duration {
        self.total
    }
}

/// The limit of a ring handover as a whole (see `Budget`): the memory
/// table's, plus one reply's for every other message.
pub fn handover_limit(memory_bytes: u64) -> Duration {
    longest_reply(memory_bytes) + REPLY_TIMEOUT
}

/// The limit of stopping a device's rings at a reset, as a whole: two
/// replies' time, as GET_VRING_BASE waits for a ring's requests in flight.
pub const RESET_LIMIT: Duration = Duration::from_secs(2 * REPLY_TIMEOUT.as_secs());

/// The limit of the handshake with a new backend as a whole (owner,
/// features, protocol features, request channel, queue count): two
/// replies' time, as none of it waits on the disk or the guest's memory.
pub const HANDSHAKE_LIMIT: Duration = Duration::from_secs(2 * REPLY_TIMEOUT.as_secs());

/// The longest a thread may wait on one backend over one run of
/// exchanges (a vCPU starting or resetting a device).
pub fn longest_run(memory_bytes: u64) -> Duration {
    handover_limit(memory_bytes).max(RESET_LIMIT)
}

struct Armed {
    id: u64,
    /// The thread waiting for the answer.
    thread: std::thread::ThreadId,
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

/// One exchange with a backend that did not work out.
#[derive(Debug, Error)]
pub enum ExchangeError {
    #[error("no answer to {step} within {}", Secs(*limit))]
    NoReply { step: &'static str, limit: Duration },
    #[error("{step} failed: {source}")]
    Failed {
        step: &'static str,
        source: vhost::Error,
    },
}

impl ExchangeError {
    /// Whether the limit ran out (the connection is then shut down).
    pub fn timed_out(&self) -> bool {
        matches!(self, ExchangeError::NoReply { .. })
    }

    /// Whether the backend answered, in good form, that it would not do
    /// it (a REPLY_ACK of failure, an empty GET_CONFIG reply): the
    /// connection is still in step.
    pub fn refused(&self) -> bool {
        matches!(
            self,
            ExchangeError::Failed {
                source: vhost::Error::VhostUserProtocol(
                    vhost::vhost_user::Error::BackendInternalError
                ),
                ..
            }
        )
    }

    /// Whether the backend went away or fell out of step: no answer in
    /// time, a connection that broke or closed, a reply that was not a
    /// reply. A restarted backend may well do better, unlike one that
    /// refused, or a request the vhost crate itself turned down.
    pub fn backend_lost(&self) -> bool {
        use vhost::vhost_user::Error as E;
        match self {
            ExchangeError::NoReply { .. } => true,
            ExchangeError::Failed {
                source: vhost::Error::VhostUserProtocol(e),
                ..
            } => matches!(
                e,
                E::PartialMessage
                    | E::Disconnected
                    | E::SocketError(_)
                    | E::SocketBroken(_)
                    | E::SocketRetry(_)
                    | E::InvalidMessage
                    | E::OversizedMsg
                    | E::IncorrectFds
            ),
            ExchangeError::Failed { .. } => false,
        }
    }
}

/// Runs `call`, the request `step` (e.g. "GET_FEATURES") of device `name`
/// on `connection`, giving the backend `limit` to answer.
pub fn exchange<T>(
    connection: &mut Frontend,
    name: &str,
    step: &'static str,
    limit: Duration,
    call: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
) -> Result<T, ExchangeError> {
    let deadline = arm(connection, name, limit);
    call(connection).map_err(|source| {
        if deadline.expired() {
            ExchangeError::NoReply { step, limit }
        } else {
            ExchangeError::Failed { step, source }
        }
    })
}

/// How long `dial_at_start` keeps trying a socket that refuses: a backend
/// started just before the VMM has made its socket file but may not listen
/// on it yet (bind, then listen), which a launcher that waits for the file
/// cannot see. A stale socket, whose backend is gone, is refused the
/// whole time and fails after it.
pub const REFUSED_GRACE: Duration = Duration::from_secs(1);
const REFUSED_RETRY: Duration = Duration::from_millis(10);

/// When the start-up grace (`REFUSED_GRACE`) ends: one grace for the
/// whole start, from the first backend dialed, so several stale sockets
/// do not add up while the stop signals wait.
pub fn start_up_grace() -> Instant {
    static ENDS: OnceLock<Instant> = OnceLock::new();
    *ENDS.get_or_init(|| Instant::now() + REFUSED_GRACE)
}

/// `dial` for a VMM starting up: a refused connection is tried again until
/// `grace_ends`, as `REFUSED_GRACE` explains.
pub fn dial_at_start(path: &Path, limit: Duration, grace_ends: Instant) -> io::Result<UnixStream> {
    loop {
        match dial(path, limit) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // Linux refuses a connection to a file or directory too:
                // that is no backend starting up.
                let is_socket = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket());
                if !is_socket {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "the path is not a socket",
                    ));
                }
                if Instant::now() >= grace_ends {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!(
                            "connection refused: nothing listens on the socket (its backend is gone, or did not start within {} of the VMM)",
                            Secs(REFUSED_GRACE)
                        ),
                    ));
                }
                log::debug!("{}: {e}; trying again", path.display());
                std::thread::sleep(REFUSED_RETRY);
            }
            other => return other,
        }
    }
}

/// Connects to the backend listening on `path`, giving it `limit` to make
/// room in its listen queue (a backend that stopped accepting fills it).
pub fn dial(path: &Path, limit: Duration) -> io::Result<UnixStream> {
    let (addr, len) = unix_address(path)?;
    let stream = UnixStream::from(unix_socket()?);
    // A Unix socket's connect waits for room in the listen queue for as
    // long as its send timeout.
    stream.set_write_timeout(Some(limit))?;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un whose first `len` bytes
        // hold the family and the NUL-terminated path; connect only reads it.
        let rc = unsafe { libc::connect(stream.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "its listen queue stayed full for {} s (the backend is not accepting)",
                        limit.as_secs()
                    ),
                ))
            }
            _ => return Err(e),
        }
    }
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// `path` as a socket address, and the length of the part that counts
/// (the family and the NUL-terminated path).
fn unix_address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let name = path.as_os_str().as_bytes();
    if name.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the socket path is longer than {} bytes",
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, &from) in addr.sun_path.iter_mut().zip(name) {
        *to = from as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + name.len() + 1;
    // At most the size of sockaddr_un (checked above).
    Ok((addr, len as libc::socklen_t))
}

/// A fresh Unix stream socket, closed on exec.
fn unix_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the fd it returns is ours alone.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The running exchange's clock: dropping it stops the clock.
struct Deadline {
    id: Option<u64>,
    expired: Arc<AtomicBool>,
    /// Keeps the connection, and so the watched fd, open while armed.
    _connection: Frontend,
}

impl Deadline {
    /// Whether the backend overran and its connection was shut down.
    fn expired(&self) -> bool {
        self.expired.load(Ordering::Acquire)
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
fn arm(connection: &Frontend, name: &str, limit: Duration) -> Deadline {
    let expired = Arc::new(AtomicBool::new(false));
    // Taken before the watchdog's lock: it waits while another thread's
    // exchange on this connection is under way, and that exchange's own
    // deadline must be able to fire meanwhile.
    let fd = connection.as_raw_fd();
    let id = watchdog().map(|dog| {
        let id = dog.next_id.fetch_add(1, Ordering::Relaxed);
        crate::bus::lock(&dog.armed).push(Armed {
            id,
            thread: std::thread::current().id(),
            fd,
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
        expired,
        _connection: connection.clone(),
    }
}

/// Whether `thread` is waiting for a backend's answer (which its limit
/// bounds).
pub fn in_exchange(thread: std::thread::ThreadId) -> bool {
    // Not `watchdog()`: asking must not start the thread.
    DOG.get().copied().flatten().is_some_and(|dog| {
        crate::bus::lock(&dog.armed)
            .iter()
            .any(|a| a.thread == thread)
    })
}

/// Sockets the watchdog shut down and no one has asked about yet.
static CUT_OFF: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// Whether the watchdog shut socket `fd` down since the last call for it
/// (so a hang-up on it was ours, not the backend's).
pub fn take_cut_off(fd: RawFd) -> bool {
    let mut cut = crate::bus::lock(&CUT_OFF);
    let before = cut.len();
    cut.retain(|&c| c != fd);
    cut.len() != before
}

/// Closes the connection on socket `fd` from our side: the backend sees its
/// frontend leave (and drops every ring), and the device's hang-up watcher
/// sees a connection that was cut off rather than one the backend closed.
///
/// # Safety
///
/// `fd` must be an open socket for the duration of the call.
pub unsafe fn cut_off(fd: RawFd) {
    crate::bus::lock(&CUT_OFF).push(fd);
    // SAFETY: the caller keeps `fd` open. Shutting a socket down changes no
    // memory of ours; a thread blocked on it wakes with an error.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// The watchdog, once an exchange started it (None if it could not start).
static DOG: OnceLock<Option<&'static Watchdog>> = OnceLock::new();

fn watchdog() -> Option<&'static Watchdog> {
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
        let mut expired = Vec::new();
        loop {
            let now = Instant::now();
            armed.retain(|a| {
                if a.due > now {
                    return true;
                }
                a.expired.store(true, Ordering::Release);
                // SAFETY: the fd is open: the `Deadline` that armed this
                // entry holds the connection until it has removed the entry
                // under this lock.
                unsafe { cut_off(a.fd) };
                expired.push((a.name.clone(), a.limit));
                false
            });
            if !expired.is_empty() {
                // Logged without the lock: a stderr nobody drains must not
                // hold up every exchange that arms or disarms meanwhile.
                drop(armed);
                for (name, limit) in expired.drain(..) {
                    log::error!(
                        "{name}: the vhost-user backend did not answer within {}; closing its connection",
                        Secs(limit)
                    );
                }
                armed = crate::bus::lock(&self.armed);
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use vhost::VhostBackend;

    const GET_FEATURES: u32 = 1;

    /// A frontend on one end of a socket pair; the other end is the
    /// "backend", which answers GET_FEATURES with `features` after `delay`
    /// (never when None).
    fn frontend_with_backend(delay: Option<Duration>, features: u64) -> Frontend {
        let (ours, mut theirs) = UnixStream::pair().expect("socket pair");
        std::thread::spawn(move || {
            let mut header = [0u8; 12];
            if theirs.read_exact(&mut header).is_err() {
                return;
            }
            let Some(delay) = delay else {
                // Hold the connection without a word until it is shut.
                let _ = theirs.read(&mut header);
                return;
            };
            std::thread::sleep(delay);
            let mut reply = Vec::new();
            reply.extend_from_slice(&GET_FEATURES.to_le_bytes());
            reply.extend_from_slice(&(1u32 | 0x4).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&features.to_le_bytes());
            let _ = theirs.write_all(&reply);
            let _ = theirs.read(&mut header);
        });
        Frontend::from_stream(ours, 1)
    }

    #[test]
    fn a_silent_backend_runs_out_of_time_and_is_cut_off() {
        let mut fe = frontend_with_backend(None, 0);
        let limit = Duration::from_millis(200);
        let result = exchange(&mut fe, "disk9", "GET_FEATURES", limit, |f| {
            f.get_features()
        });
        let e = result.expect_err("a silent backend answered");
        assert!(e.timed_out(), "{e}");
        assert!(!in_exchange(std::thread::current().id()));
        assert_eq!(e.to_string(), "no answer to GET_FEATURES within 200 ms");
        // The connection is shut down: the next request fails at once.
        let next = exchange(&mut fe, "disk9", "GET_FEATURES", REPLY_TIMEOUT, |f| {
            f.get_features()
        });
        assert!(
            matches!(next, Err(ExchangeError::Failed { .. })),
            "{next:?}"
        );
    }

    #[test]
    fn an_answer_within_the_limit_is_taken_and_the_clock_stops() {
        let mut fe = frontend_with_backend(Some(Duration::from_millis(50)), 0x1234);
        let limit = Duration::from_millis(500);
        let features = exchange(&mut fe, "disk9", "GET_FEATURES", limit, |f| {
            assert!(in_exchange(std::thread::current().id()));
            f.get_features()
        })
        .expect("answered in time");
        assert_eq!(features, 0x1234);
        // The finished exchange's clock is gone: nothing shuts the socket
        // down after its limit.
        std::thread::sleep(limit * 2);
        let mut peek = [0u8; 1];
        let fd = fe.as_raw_fd();
        // SAFETY: a non-blocking peek into a local buffer on an fd `fe` owns.
        let n = unsafe {
            libc::recv(
                fd,
                peek.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let err = std::io::Error::last_os_error();
        assert_eq!(n, -1, "the socket was shut down (recv gave {n})");
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}");
    }

    /// A listener that takes one pending connection and no more (backlog 0).
    fn listener_with_no_room(path: &Path) -> OwnedFd {
        let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
        // SAFETY: listen() on a socket fd the listener owns; it takes no
        // pointers.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        OwnedFd::from(listener)
    }

    #[test]
    fn dialing_a_backend_that_accepts_nothing_runs_out_of_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("full.sock");
        let _listener = listener_with_no_room(&path);
        let _first = dial(&path, REPLY_TIMEOUT).expect("the queue has room for one");
        let started = Instant::now();
        let e = dial(&path, Duration::from_millis(300)).expect_err("the queue is full");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("listen queue"), "{e}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(250), "{waited:?}");
        assert!(waited < REPLY_TIMEOUT, "{waited:?}");
    }

    /// A socket file with nothing listening on it yet: bound, not
    /// listening (std's bind does both at once).
    fn bound_socket(path: &Path) -> OwnedFd {
        let fd = unix_socket().expect("socket");
        let (addr, len) = unix_address(path).expect("a short enough path");
        // SAFETY: `addr` holds the family and the NUL-terminated path in
        // its first `len` bytes; bind only reads them.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::addr_of!(addr).cast(), len) };
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        fd
    }

    #[test]
    fn a_backend_that_listens_shortly_after_binding_is_reached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("late.sock");
        let socket = bound_socket(&path);
        let refused = dial(&path, REPLY_TIMEOUT).expect_err("nothing listens yet");
        assert_eq!(
            refused.kind(),
            io::ErrorKind::ConnectionRefused,
            "{refused}"
        );
        let raw = socket.as_raw_fd();
        let listens = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: listen() on the bound socket, kept open by `socket`
            // until the thread is joined; no pointers.
            assert_eq!(unsafe { libc::listen(raw, 1) }, 0);
        });
        let stream = dial_at_start(&path, REPLY_TIMEOUT, Instant::now() + REFUSED_GRACE);
        listens.join().expect("listen thread");
        stream.expect("connected once the backend listened");
        drop(socket);
    }

    #[test]
    fn a_socket_nothing_listens_on_is_refused_after_the_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stale.sock");
        let _socket = bound_socket(&path);
        let started = Instant::now();
        let e = dial_at_start(&path, REPLY_TIMEOUT, started + Duration::from_millis(300))
            .expect_err("nothing listens");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        assert!(
            e.to_string().contains("nothing listens on the socket"),
            "{e}"
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[test]
    fn a_path_that_is_not_a_socket_is_refused_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.img");
        std::fs::write(&file, b"not a socket").expect("write");
        let started = Instant::now();
        let e = dial_at_start(&file, REPLY_TIMEOUT, started + Duration::from_secs(30))
            .expect_err("a file is no socket");
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "it waited out the grace"
        );
    }

    #[test]
    fn a_dialed_connection_has_no_send_limit_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ok.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let stream = dial(&path, Duration::from_millis(300)).expect("connect");
        let (mut theirs, _) = listener.accept().expect("accept");
        assert_eq!(stream.write_timeout().expect("timeout"), None);
        (&stream).write_all(b"ping").expect("write");
        let mut got = [0u8; 4];
        theirs.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"ping");
        let missing = dial(&dir.path().join("none.sock"), REPLY_TIMEOUT).expect_err("no socket");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{missing}");
    }
}
