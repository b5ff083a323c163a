//! The QMP listener: a thread that accepts clients on the Unix socket
//! and/or the TCP address, one client at a time, and runs each client's
//! commands. Events go to the client that has negotiated capabilities.
//! What a client is sent goes through a queue that a thread of its own
//! writes out, so a client that stops reading holds up nothing else.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use thiserror::Error;

use super::commands::{After, Session, VmControl};
use super::framing::{Piece, Splitter};
use super::protocol::{self, QmpError};
use crate::bus::lock;
use vmm_common::socket_path::OwnSocket;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error("--api-socket {0:?}: cannot listen")]
    Unix(PathBuf, #[source] std::io::Error),
    #[error("--api-socket {0:?}: cannot listen")]
    Claim(PathBuf, #[source] vmm_common::socket_path::Unusable),
    #[error("--api-tcp {0}: cannot listen")]
    Tcp(SocketAddr, #[source] std::io::Error),
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// Sends events to the current client.
#[derive(Default)]
pub struct EventSink {
    client: Mutex<Option<Outbox>>,
}

impl EventSink {
    /// Sends `event` to the connected, negotiated client, if any. Never
    /// waits on the client: a client too far behind is disconnected.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let message = protocol::event(name, data);
        log::debug!("QMP event {message}");
        let outbox = lock(&self.client).clone();
        if let Some(outbox) = outbox {
            if !outbox.post_event(&message) {
                let mut client = lock(&self.client);
                if client.as_ref().is_some_and(|c| c.same_client(&outbox)) {
                    *client = None;
                }
            }
        }
    }

    /// Waits up to `limit` for the client to be sent what was queued for
    /// it (the last event before the VMM exits).
    pub fn flush(&self, limit: Duration) {
        let outbox = lock(&self.client).clone();
        if let Some(outbox) = outbox {
            let deadline = Instant::now() + limit;
            while outbox.unsent.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// How long one write to a client may wait for it to read.
const WRITE_GIVE_UP: Duration = Duration::from_secs(10);

/// Messages queued for a client beyond what its socket buffers.
const OUTBOX_LINES: usize = 256;

/// A client's outgoing messages: a bounded queue that a writer thread
/// empties into the socket, so that nothing that sends an event (the
/// main thread, a device's connection watcher) waits on a client that
/// stopped reading.
#[derive(Clone)]
struct Outbox {
    queue: SyncSender<String>,
    conn: Arc<Conn>,
    /// Queued and not yet written (or given up).
    unsent: Arc<AtomicUsize>,
}

impl Outbox {
    fn start(conn: Conn) -> std::io::Result<Self> {
        // A client that reads nothing for this long is gone: its writer
        // thread gives up rather than wait on it forever.
        conn.set_write_timeout(WRITE_GIVE_UP)?;
        let conn = Arc::new(conn);
        let (queue, lines) = sync_channel::<String>(OUTBOX_LINES);
        let unsent = Arc::new(AtomicUsize::new(0));
        let (out, count) = (conn.clone(), unsent.clone());
        std::thread::Builder::new()
            .name("qmp-out".into())
            .spawn(move || write_lines(&out, &lines, &count))?;
        Ok(Outbox {
            queue,
            conn,
            unsent,
        })
    }

    fn line(value: &Value) -> String {
        let mut line = value.to_string();
        line.push_str("\r\n");
        line
    }

    /// Queues a reply, waiting while the queue is full: a client that
    /// does not read its replies is not read from either. False once the
    /// connection is gone.
    fn post_reply(&self, value: &Value) -> bool {
        self.unsent.fetch_add(1, Ordering::AcqRel);
        let sent = self.queue.send(Self::line(value)).is_ok();
        if !sent {
            self.unsent.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// Queues an event without waiting; a client whose queue is full is
    /// disconnected. False when the event was not queued.
    fn post_event(&self, value: &Value) -> bool {
        self.unsent.fetch_add(1, Ordering::AcqRel);
        match self.queue.try_send(Self::line(value)) {
            Ok(()) => true,
            Err(full_or_gone) => {
                self.unsent.fetch_sub(1, Ordering::AcqRel);
                if matches!(full_or_gone, TrySendError::Full(_)) {
                    log::warn!("the QMP client does not read what it is sent; disconnecting it");
                    self.conn.shutdown();
                }
                false
            }
        }
    }

    fn same_client(&self, other: &Outbox) -> bool {
        Arc::ptr_eq(&self.conn, &other.conn)
    }
}

/// Writes queued lines until every sender is gone. After a failed write
/// the connection is shut down (its reader sees the end too) and the rest
/// is dropped.
fn write_lines(conn: &Conn, lines: &Receiver<String>, unsent: &AtomicUsize) {
    let mut failed = false;
    for line in lines {
        if !failed && conn.write_all(line.as_bytes()).is_err() {
            failed = true;
            conn.shutdown();
        }
        unsent.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A client connection.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => (&*s).read(buf),
            Conn::Tcp(s) => (&*s).read(buf),
        }
    }

    fn write_all(&self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => (&*s).write_all(data),
            Conn::Tcp(s) => (&*s).write_all(data),
        }
    }

    fn set_write_timeout(&self, limit: Duration) -> std::io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(Some(limit)),
            Conn::Tcp(s) => s.set_write_timeout(Some(limit)),
        }
    }

    /// Ends the connection both ways, for every clone of it.
    fn shutdown(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(Shutdown::Both),
            Conn::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// The listening sockets; the Unix socket file is removed on drop (if it
/// is still this socket's).
pub struct ApiServer {
    unix: Option<OwnSocket>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(socket) = &self.unix {
            socket.remove();
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

    fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(l) => Ok(Conn::Unix(l.accept()?.0)),
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept()?;
                log::info!("QMP client from {peer}");
                stream.set_nodelay(true)?;
                // Best effort: a client is served without it.
                if let Err(e) = keep_alive(&stream) {
                    log::warn!(
                        "QMP client from {peer}: {e}; it is served without keepalive probes"
                    );
                }
                Ok(Conn::Tcp(stream))
            }
        }
    }
}

/// Has the kernel probe an idle TCP client, so that one whose host went
/// away (or a NAT that forgot it) is found gone within about a minute
/// rather than holding the API, which serves one client at a time, for
/// ever.
fn keep_alive(stream: &TcpStream) -> std::io::Result<()> {
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| -> std::io::Result<()> {
        // SAFETY: setsockopt on the stream's open socket, reading one int
        // from a local that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let options = [
        ("SO_KEEPALIVE", libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        // Probes after 30 s of silence, every 10 s, 3 unanswered: gone.
        ("TCP_KEEPIDLE", libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        ("TCP_KEEPINTVL", libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        ("TCP_KEEPCNT", libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
        // Sent data unacknowledged for a minute: gone too.
        (
            "TCP_USER_TIMEOUT",
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            60_000,
        ),
    ];
    for (option, level, name, value) in options {
        set(level, name, value)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot set {option}: {e}")))?;
    }
    Ok(())
}

/// Starts listening and serving clients on a thread.
/// The API's sockets, bound before the VM is built (a bad path fails the
/// start before any backend is contacted) and served once it is.
pub struct Listening {
    listeners: Vec<Listener>,
    server: ApiServer,
}

/// Binds the API's Unix socket and TCP port. Clients that connect before
/// `serve` wait in the backlog.
pub fn listen(unix: Option<&Path>, tcp: Option<SocketAddr>) -> Result<Listening, ApiError> {
    let mut listeners = Vec::new();
    let mut server = ApiServer { unix: None };
    if let Some(path) = unix {
        // Only a socket file left by a VMM that died is replaced.
        let claim = vmm_common::socket_path::claim(path)
            .map_err(|e| ApiError::Claim(path.to_path_buf(), e))?;
        let listener =
            UnixListener::bind(path).map_err(|e| ApiError::Unix(path.to_path_buf(), e))?;
        let own = OwnSocket::bound(path).map_err(|e| {
            let _ = std::fs::remove_file(path);
            ApiError::Unix(path.to_path_buf(), e)
        })?;
        drop(claim);
        server.unix = Some(own);
        listeners.push(Listener::Unix(listener));
    }
    if let Some(addr) = tcp {
        let listener = TcpListener::bind(addr).map_err(|e| ApiError::Tcp(addr, e))?;
        listeners.push(Listener::Tcp(listener));
    }
    Ok(Listening { listeners, server })
}

impl Listening {
    /// Serves the API for `vm` until the returned server is dropped (with
    /// the process: the thread is not joined).
    pub fn serve(
        self,
        vm: Arc<dyn VmControl>,
        sink: Arc<EventSink>,
    ) -> Result<ApiServer, ApiError> {
        let Listening { listeners, server } = self;
        if listeners.is_empty() {
            return Ok(server);
        }
        std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || accept_loop(&listeners, vm.as_ref(), &sink))
            .map_err(ApiError::Thread)?;
        Ok(server)
    }
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
            // Out of memory for the poll set, say: waited out, as a failed
            // accept is, rather than leave the VM without its API.
            log::warn!(
                "the QMP listener's poll failed: {}; trying again",
                std::io::Error::last_os_error()
            );
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        for (listener, pfd) in listeners.iter().zip(&fds) {
            if pfd.revents == 0 {
                continue;
            }
            match listener.accept() {
                Ok(conn) => serve_client(conn, vm, sink),
                Err(e) => {
                    // Out of descriptors, say: the listener stays ready,
                    // so a pause keeps this from spinning on it.
                    log::warn!("QMP accept failed: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

/// Runs one client until it disconnects or sends something unrecoverable.
fn serve_client(conn: Conn, vm: &dyn VmControl, sink: &EventSink) {
    let outbox = match conn.try_clone().and_then(Outbox::start) {
        Ok(outbox) => outbox,
        Err(e) => {
            log::warn!("cannot serve a QMP client: {e}");
            return;
        }
    };
    let (major, minor, micro) = version_triple();
    if !outbox.post_reply(&protocol::greeting(major, minor, micro)) {
        return;
    }
    let mut session = Session::default();
    let mut splitter = Splitter::default();
    let mut buf = [0u8; 4096];
    let mut subscribed = false;
    'conn: loop {
        let n = match conn.read(&mut buf) {
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
                        let negotiated = result.is_ok() && request.execute == "qmp_capabilities";
                        let message = match result {
                            Ok(value) => protocol::reply(value, request.id),
                            Err(e) => protocol::error(&e, request.id),
                        };
                        let posted = if negotiated && !subscribed {
                            // The reply and the subscription under the
                            // sink's lock, as one step for `emit`: an event
                            // sent once the client may have read the reply
                            // goes to it, queued after the reply. (Set after
                            // the reply was out, an event in between was
                            // lost, though the client was entitled to it.)
                            // Queued without waiting, as events are, since
                            // the lock is held: a client with a full queue
                            // is disconnected.
                            let mut client = lock(&sink.client);
                            let posted = outbox.post_event(&message);
                            if posted {
                                subscribed = true;
                                *client = Some(outbox.clone());
                            }
                            posted
                        } else {
                            outbox.post_reply(&message)
                        };
                        // After the reply is queued, so it goes out
                        // before the event the step sends (the VMM
                        // flushes its clients before it ends).
                        match after {
                            After::Continue => {}
                            After::Quit => {
                                log::info!("QMP quit");
                                vm.quit();
                            }
                            After::Reset => vm.reset(),
                            After::Emit(event) => vm.emit(event, None),
                        }
                        if !posted {
                            break 'conn;
                        }
                        continue;
                    }
                    Err((e, id)) => protocol::error(&e, id),
                },
                Piece::Garbage => protocol::error(
                    &QmpError::generic("JSON parse error, expected a JSON object"),
                    None,
                ),
                Piece::Mismatched => protocol::error(
                    &QmpError::generic("JSON parse error, mismatched brackets"),
                    None,
                ),
                Piece::Unterminated => protocol::error(
                    &QmpError::generic(
                        "JSON parse error, a string left open at the end of the line",
                    ),
                    None,
                ),
                Piece::TooLong => {
                    outbox.post_reply(&protocol::error(
                        &QmpError::generic("JSON parse error, message too long"),
                        None,
                    ));
                    break 'conn;
                }
            };
            if !outbox.post_reply(&message) {
                break 'conn;
            }
        }
    }
    let mut client = lock(&sink.client);
    if client.as_ref().is_some_and(|c| c.same_client(&outbox)) {
        *client = None;
    }
    log::info!("QMP client disconnected");
}

fn version_triple() -> (u64, u64, u64) {
    let v = super::commands::version();
    let n = |k: &str| v["qemu"][k].as_u64().unwrap_or(0);
    (n("major"), n("minor"), n("micro"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option(stream: &TcpStream, level: libc::c_int, name: libc::c_int) -> libc::c_int {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt on an open socket, writing one int into a
        // local whose size is passed.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        value
    }

    /// A TCP client that vanishes (its host gone, a NAT that forgot it)
    /// is probed and found gone, not waited on for ever.
    #[test]
    fn tcp_clients_are_probed_when_idle() {
        let listener = Listener::Tcp(TcpListener::bind("127.0.0.1:0").unwrap());
        let Listener::Tcp(tcp) = &listener else {
            unreachable!()
        };
        let _client = TcpStream::connect(tcp.local_addr().unwrap()).unwrap();
        let Conn::Tcp(stream) = listener.accept().unwrap() else {
            panic!("not a TCP connection")
        };
        assert_eq!(option(&stream, libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 30);
        assert_eq!(option(&stream, libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(
            option(&stream, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
            60_000
        );
    }
}
