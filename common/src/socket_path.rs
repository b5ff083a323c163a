//! Taking a path for a listening Unix socket: a socket file left by a
//! process that died is removed, but a file that is not a socket, and a
//! socket something still listens on, are never touched. Processes that
//! claim paths in one directory take turns (a lock on the directory, held
//! from the check until the caller has bound), so two started at once on
//! one path cannot both find it stale and the second remove the first's
//! live socket.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a claim waits for another process's claim in the same
/// directory (a check and a bind: microseconds).
const TURN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a path cannot be listened on.
#[derive(Debug)]
pub enum Unusable {
    /// Something other than a socket is there (an image, a directory).
    NotASocket,
    /// A process listens on the socket.
    InUse,
    Io(io::Error),
}

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unusable::NotASocket => write!(f, "the path exists and is not a socket"),
            Unusable::InUse => write!(f, "another process listens on it"),
            Unusable::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Unusable {}

/// The right to bind a claimed path: other claims in its directory wait
/// until it is dropped, so keep it until the socket is bound.
#[must_use = "bind while the claim is held"]
pub struct Claim {
    /// The directory, locked (None when it cannot be opened: the claim
    /// then works alone, as it did before there was a lock).
    _turn: Option<File>,
}

/// Makes `path` free for `bind`: nothing there, or a stale socket (no one
/// listens on it), which is removed.
pub fn claim(path: &Path) -> Result<Claim, Unusable> {
    let turn = take_turn(path)?;
    check(path)?;
    Ok(Claim { _turn: turn })
}

/// Locks the directory `path` is in, waiting for another claim there.
fn take_turn(path: &Path) -> Result<Option<File>, Unusable> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let Ok(dir) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)
    else {
        return Ok(None);
    };
    let deadline = Instant::now() + TURN_TIMEOUT;
    let mut logged = false;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(dir));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            // A file system without locks: claim alone.
            return Ok(None);
        }
        if !logged {
            log::info!(
                "{}: another process is claiming a socket path here; waiting up to {TURN_TIMEOUT:?}",
                path.display()
            );
            logged = true;
        }
        if Instant::now() >= deadline {
            return Err(Unusable::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "another process kept its directory locked for 5 s",
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn check(path: &Path) -> Result<(), Unusable> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Unusable::Io(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Unusable::NotASocket);
    }
    match probe(path) {
        Ok(()) => Err(Unusable::InUse),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
            std::fs::remove_file(path).map_err(Unusable::Io)
        }
        // Removed meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // A full listen queue: a live listener that is busy.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(Unusable::InUse),
        Err(e) => Err(Unusable::Io(e)),
    }
}

/// A socket this process bound, known by its file (device and inode), so
/// that removing it at exit removes that socket only: if someone deleted
/// it and another process bound the path since, the other's live socket
/// stays.
#[derive(Clone, Debug)]
pub struct OwnSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnSocket {
    /// Records the socket just bound at `path`.
    pub fn bound(path: &Path) -> io::Result<Self> {
        let meta = std::fs::symlink_metadata(path)?;
        Ok(OwnSocket {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if the path still names it; true if it did.
    /// Claims in its directory wait meanwhile, so none binds the path
    /// between the check and the removal.
    pub fn remove(&self) -> bool {
        let _turn = take_turn(&self.path);
        // Gone already: nothing to do.
        let Ok(meta) = std::fs::symlink_metadata(&self.path) else {
            return false;
        };
        if (meta.dev(), meta.ino()) != (self.dev, self.ino) {
            log::info!(
                "{}: left in place, it is no longer this process's socket",
                self.path.display()
            );
            return false;
        }
        std::fs::remove_file(&self.path).is_ok()
    }
}

/// Connects to the socket at `path` without waiting for room in its
/// listen queue (std's connect would block on a full one).
fn probe(path: &Path) -> io::Result<()> {
    // SAFETY: an all-zero sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (slot, byte) in addr.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; no pointers.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the size passed, and the
    // socket is open for the duration of the call.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn only_stale_sockets_are_removed() {
        let dir = std::env::temp_dir().join(format!("socket-path-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");

        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).expect("bind"));
        assert!(claim(&stale).is_ok());
        assert!(!stale.exists());

        let live = dir.join("live.sock");
        let _listener = UnixListener::bind(&live).expect("bind");
        assert!(matches!(claim(&live), Err(Unusable::InUse)));
        assert!(live.exists());

        // A live listener whose queue is full is refused at once.
        let busy = dir.join("busy.sock");
        let listener = UnixListener::bind(&busy).expect("bind");
        // SAFETY: listen() on the listener's own socket; no pointers.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let _waiting = std::os::unix::net::UnixStream::connect(&busy).expect("fills the queue");
        assert!(matches!(claim(&busy), Err(Unusable::InUse)));
        assert!(busy.exists());

        let image = dir.join("disk.img");
        std::fs::write(&image, b"data").expect("write");
        assert!(matches!(claim(&image), Err(Unusable::NotASocket)));
        assert_eq!(std::fs::read(&image).expect("read"), b"data");

        assert!(claim(&dir.join("absent.sock")).is_ok());
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    /// A socket deleted and bound again by another process is the other's:
    /// only the socket this process bound is removed.
    #[test]
    fn only_the_socket_bound_is_removed() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("own.sock");
        let first = UnixListener::bind(&path).expect("bind");
        let own = OwnSocket::bound(&path).expect("stat");
        std::fs::remove_file(&path).expect("someone deletes it");
        let _second = UnixListener::bind(&path).expect("another process binds the path");
        assert!(!own.remove());
        std::os::unix::net::UnixStream::connect(&path).expect("the second still listens");
        drop(first);
        let again = OwnSocket::bound(&path).expect("stat");
        assert!(again.remove());
        assert!(!path.exists());
        assert!(!again.remove(), "gone already");
    }

    #[test]
    fn two_claims_of_one_stale_path_at_once_leave_one_live_listener() {
        let dir = std::env::temp_dir().join(format!("socket-path-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("raced.sock");
        for round in 0..200 {
            drop(UnixListener::bind(&path).expect("bind the stale socket"));
            let barrier = std::sync::Barrier::new(2);
            let listeners: Vec<Option<UnixListener>> = std::thread::scope(|s| {
                let racers: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            let _claim = claim(&path).ok()?;
                            UnixListener::bind(&path).ok()
                        })
                    })
                    .collect();
                racers
                    .into_iter()
                    .map(|r| r.join().expect("racer"))
                    .collect()
            });
            let bound: Vec<&UnixListener> = listeners.iter().flatten().collect();
            // Two binds means the second removed the first's live socket.
            assert_eq!(
                bound.len(),
                1,
                "round {round}: {} listeners bound",
                bound.len()
            );
            std::os::unix::net::UnixStream::connect(&path).expect("the winner listens");
            let _ = std::fs::remove_file(&path);
        }
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
