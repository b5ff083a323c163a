//! The QMP listener: a thread that accepts clients on the Unix socket
//! and/or the TCP address, one client at a time, and runs each client's
//! commands. Events go to the client that has negotiated capabilities.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use super::commands::{After, Session, VmControl};
use super::framing::{Piece, Splitter};
use super::protocol::{self, QmpError};
use crate::bus::lock;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("--api-socket {0:?}: cannot listen")]
    Unix(PathBuf, #[source] std::io::Error),
    #[error("--api-tcp {0}: cannot listen")]
    Tcp(SocketAddr, #[source] std::io::Error),
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// Writes events (and replies) to the current client.
#[derive(Default)]
pub struct EventSink {
    client: Mutex<Option<Box<dyn Write + Send>>>,
}

impl EventSink {
    /// Sends `event` to the connected, negotiated client, if any.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let message = protocol::event(name, data);
        log::debug!("QMP event {message}");
        let mut client = lock(&self.client);
        if let Some(writer) = client.as_mut() {
            if send(writer.as_mut(), &message).is_err() {
                *client = None;
            }
        }
    }
}

fn send(writer: &mut (dyn Write + Send), value: &Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push_str("\r\n");
    writer.write_all(line.as_bytes())?;
    writer.flush()
}

/// The listening sockets; the Unix socket file is removed on drop.
pub struct ApiServer {
    unix_path: Option<PathBuf>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(path) = &self.unix_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// Accepts one client: a reader and a writer on the same connection.
    fn accept(&self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        match self {
            Listener::Unix(l) => {
                let (stream, _) = l.accept()?;
                Ok((Box::new(stream.try_clone()?), Box::new(stream)))
            }
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept()?;
                log::info!("QMP client from {peer}");
                stream.set_nodelay(true)?;
                Ok((Box::new(stream.try_clone()?), Box::new(stream)))
            }
        }
    }
}

/// Removes a socket file at `path` that no process listens on (one left by
/// a VMM that died). A live socket stays, and binding it fails: a full
/// listen queue counts as live, without waiting for room in it.
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket());
    let stale = || {
        crate::vhost_user::deadline::dial(path, Duration::from_secs(1))
            .is_err_and(|e| e.kind() != ErrorKind::TimedOut)
    };
    if is_socket && stale() {
        let _ = std::fs::remove_file(path);
    }
}

/// Starts listening and serving clients on a thread.
pub fn start(
    unix: Option<&Path>,
    tcp: Option<SocketAddr>,
    vm: Arc<dyn VmControl>,
    sink: Arc<EventSink>,
) -> Result<ApiServer, ApiError> {
    let mut listeners = Vec::new();
    let mut server = ApiServer { unix_path: None };
    if let Some(path) = unix {
        remove_stale_socket(path);
        let listener =
            UnixListener::bind(path).map_err(|e| ApiError::Unix(path.to_path_buf(), e))?;
        server.unix_path = Some(path.to_path_buf());
        listeners.push(Listener::Unix(listener));
    }
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr).map_err(|e| ApiError::Tcp(addr, e))?;
        listeners.push(Listener::Tcp(listener));
    }
    if listeners.is_empty() {
        return Ok(server);
    }
    std::thread::Builder::new()
        .name("qmp".into())
        .spawn(move || accept_loop(&listeners, vm.as_ref(), &sink))
        .map_err(ApiError::Thread)?;
    Ok(server)
}

fn accept_loop(listeners: &[Listener], vm: &dyn VmControl, sink: &EventSink) {
    loop {
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| libc::pollfd {
                fd: l.fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfds for listeners that stay
        // open for the life of this thread.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            log::error!(
                "the QMP listener failed: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        for (listener, pfd) in listeners.iter().zip(&fds) {
            if pfd.revents == 0 {
                continue;
            }
            match listener.accept() {
                Ok((reader, writer)) => serve_client(reader, writer, vm, sink),
                Err(e) => log::warn!("QMP accept failed: {e}"),
            }
        }
    }
}

/// Runs one client until it disconnects or sends something unrecoverable.
fn serve_client(
    mut reader: Box<dyn Read + Send>,
    writer: Box<dyn Write + Send>,
    vm: &dyn VmControl,
    sink: &EventSink,
) {
    let writer: Arc<Mutex<Box<dyn Write + Send>>> = Arc::new(Mutex::new(writer));
    let reply = |value: Value| -> bool {
        let mut w = lock(&writer);
        send(w.as_mut(), &value).is_ok()
    };
    let (major, minor, micro) = version_triple();
    if !reply(protocol::greeting(major, minor, micro)) {
        return;
    }
    let mut session = Session::default();
    let mut splitter = Splitter::default();
    let mut buf = [0u8; 4096];
    let mut subscribed = false;
    'conn: loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for piece in splitter.push(&buf[..n]) {
            let message = match piece {
                Piece::Value(bytes) => match protocol::parse_request(&bytes) {
                    Ok(request) => {
                        let (result, after) = session.execute(&request, vm);
                        let message = match result {
                            Ok(value) => protocol::reply(value, request.id),
                            Err(e) => protocol::error(&e, request.id),
                        };
                        if !subscribed && request.execute == "qmp_capabilities" {
                            // Events flow once capabilities are negotiated.
                            subscribed = true;
                            *lock(&sink.client) = Some(Box::new(SharedWriter(writer.clone())));
                        }
                        if after == After::Quit {
                            log::info!("QMP quit");
                        }
                        message
                    }
                    Err((e, id)) => protocol::error(&e, id),
                },
                Piece::Garbage => protocol::error(
                    &QmpError::generic("JSON parse error, expected a JSON object"),
                    None,
                ),
                Piece::TooLong => {
                    let _ = reply(protocol::error(
                        &QmpError::generic("JSON parse error, message too long"),
                        None,
                    ));
                    break 'conn;
                }
            };
            if !reply(message) {
                break 'conn;
            }
        }
    }
    *lock(&sink.client) = None;
    log::info!("QMP client disconnected");
}

/// The client's writer, shared by replies and events.
struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

fn version_triple() -> (u64, u64, u64) {
    let v = super::commands::version();
    let n = |k: &str| v["qemu"][k].as_u64().unwrap_or(0);
    (n("major"), n("minor"), n("micro"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn only_a_socket_no_one_listens_on_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).expect("bind"));
        remove_stale_socket(&stale);
        assert!(!stale.exists(), "the stale socket is removed");

        let busy = dir.path().join("busy.sock");
        let listener = UnixListener::bind(&busy).expect("bind");
        // SAFETY: listen() on the listener's own socket; no pointers.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let _waiting = UnixStream::connect(&busy).expect("fills the queue");
        remove_stale_socket(&busy);
        assert!(busy.exists(), "a live socket with a full queue stays");

        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").expect("write");
        remove_stale_socket(&plain);
        assert!(plain.exists(), "a file that is not a socket stays");
    }
}
