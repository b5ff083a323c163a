//! `server=on`: the VMM listens on the vhost-user socket and waits for the
//! backend to connect (DPDK's `client=1`, OVS-DPDK's `dpdkvhostuserclient`
//! ports). The socket file is removed when the VMM exits.

use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::reconnect;

#[derive(Debug, Error)]
pub enum ListenError {
    #[error("{0:?} already exists and is not a stale socket")]
    PathInUse(PathBuf),
    #[error("{0:?} is a socket another process is listening on")]
    SocketInUse(PathBuf),
    #[error("cannot listen on {0:?}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("waiting for a backend to connect to {0:?} failed")]
    Accept(PathBuf, #[source] std::io::Error),
    #[error("stopped by a signal while waiting for a backend to connect to {0:?}")]
    Interrupted(PathBuf),
}

/// A listening socket whose file is removed on drop (if it is still this
/// socket's).
pub struct ServerSocket {
    path: PathBuf,
    listener: UnixListener,
    own: vmm_common::socket_path::OwnSocket,
}

impl ServerSocket {
    /// Listens on `path`. A socket file left by a process that died is
    /// replaced; anything else at that path is an error.
    pub fn bind(path: &Path) -> Result<Self, ListenError> {
        use vmm_common::socket_path::{claim, Unusable};
        let claim = match claim(path) {
            Ok(claim) => claim,
            Err(Unusable::NotASocket) => return Err(ListenError::PathInUse(path.to_path_buf())),
            Err(Unusable::InUse) => return Err(ListenError::SocketInUse(path.to_path_buf())),
            Err(Unusable::Io(e)) => return Err(ListenError::Bind(path.to_path_buf(), e)),
        };
        let listener =
            UnixListener::bind(path).map_err(|e| ListenError::Bind(path.to_path_buf(), e))?;
        let own = vmm_common::socket_path::OwnSocket::bound(path).map_err(|e| {
            let _ = std::fs::remove_file(path);
            ListenError::Bind(path.to_path_buf(), e)
        })?;
        drop(claim);
        Ok(ServerSocket {
            path: path.to_path_buf(),
            listener,
            own,
        })
    }

    /// Waits for the backend to connect. Returns early with `Interrupted`
    /// when `interrupt` (the stop-signal fd) becomes readable, so Ctrl-C
    /// still works while the VMM waits.
    pub fn accept(&self, interrupt: BorrowedFd<'_>) -> Result<UnixStream, ListenError> {
        log::info!(
            "waiting for a vhost-user backend to connect to {}",
            self.path.display()
        );
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: interrupt.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds whose descriptors
            // stay open for the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(ListenError::Accept(self.path.clone(), e));
            }
            if fds[1].revents != 0 {
                return Err(ListenError::Interrupted(self.path.clone()));
            }
            if fds[0].revents != 0 {
                match self.listener.accept() {
                    Ok((stream, _)) => return Ok(stream),
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ListenError::Accept(self.path.clone(), e)),
                }
            }
        }
    }
}

impl ServerSocket {
    /// Serves backends that connect again, for the life of the process: each
    /// time the device's backend has gone (`wait_gone` returns), the next
    /// connection is handed to `attach`.
    pub fn serve_reconnects(
        &self,
        name: String,
        wait_gone: impl Fn() + Send + 'static,
        attach: impl Fn(UnixStream) -> Result<(), String> + Send + 'static,
    ) -> std::io::Result<()> {
        let source = reconnect::Source::Listener(self.listener.try_clone()?);
        reconnect::spawn(name, self.path.clone(), source, wait_gone, attach)
    }
}

impl Drop for ServerSocket {
    fn drop(&mut self) {
        self.own.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.sock");
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists(), "the stale socket file stays behind");
        let server = ServerSocket::bind(&path).expect("the stale socket is replaced");
        assert!(matches!(
            ServerSocket::bind(&path),
            Err(ListenError::SocketInUse(_))
        ));
        let client = std::thread::spawn({
            let path = path.clone();
            move || UnixStream::connect(path).expect("connect")
        });
        let (r, _w) = std::os::unix::net::UnixStream::pair().expect("pair");
        server.accept(r.as_fd()).expect("accept");
        client.join().expect("client thread");
        drop(server);
        assert!(!path.exists(), "the socket file is removed on drop");

        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(
            ServerSocket::bind(&file),
            Err(ListenError::PathInUse(_))
        ));
    }

    #[test]
    fn a_live_socket_with_a_full_queue_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("busy.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        // SAFETY: listen() on the listener's own socket; no pointers.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let _waiting = UnixStream::connect(&path).expect("fills the queue");
        assert!(matches!(
            ServerSocket::bind(&path),
            Err(ListenError::SocketInUse(_))
        ));
        assert!(path.exists(), "the live socket is left alone");
    }
}
