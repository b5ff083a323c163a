//! The backend's request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): a
//! socket the VMM hands a backend so that it can speak first. The VMM
//! serves one request on it, CONFIG_CHANGE_MSG: the backend's
//! configuration space changed (qemu-storage-daemon sends it when its
//! disk is resized), and the driver gets a configuration-change interrupt.
//!
//! The `vhost` crate's `FrontendReqHandler` reads the channel. It keeps its
//! own copy of the backend's end of the socket, so the channel never reads
//! as closed: a thread serves it until the connection it was set up on
//! hangs up (whoever sees that says so through the channel's `Stop`). The
//! crate waits for the rest of a message that stopped halfway, and for
//! room to send an ack the backend does not read, however long that takes
//! (it retries reads and sends that time out), so `Stop` also shuts the
//! channel's socket down: a thread stuck there then finds it closed.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::{FrontendReqHandler, HandlerResult, VhostUserFrontendReqHandler};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::device::ConfigNotifier;

/// Refused backend requests logged as warnings, per channel.
const REFUSALS_LOGGED: u64 = 10;

/// The device's configuration-change notifier, once its transport exists;
/// shared by the channels of every connection the device has.
pub type NotifierSlot = Arc<Mutex<Option<ConfigNotifier>>>;

/// Configuration changes logged at info level in a minute (per channel);
/// the rest of the minute's go to debug, so a backend that sends them in
/// a loop cannot flood the log.
const CHANGES_LOGGED: u32 = 10;
const CHANGES_WINDOW: Duration = Duration::from_secs(60);

/// What the VMM does with a backend's requests.
pub struct ConfigChanges {
    name: String,
    notifier: NotifierSlot,
    /// When the current minute began, and the changes logged in it.
    logged: Mutex<(Option<Instant>, u32)>,
}

impl ConfigChanges {
    /// The level to log the next change at.
    fn level(&self) -> log::Level {
        let mut logged = crate::bus::lock(&self.logged);
        let now = Instant::now();
        if logged
            .0
            .is_none_or(|since| now.duration_since(since) >= CHANGES_WINDOW)
        {
            *logged = (Some(now), 0);
        }
        logged.1 = logged.1.saturating_add(1);
        match logged.1 {
            n if n <= CHANGES_LOGGED => log::Level::Info,
            n if n == CHANGES_LOGGED + 1 => {
                log::warn!(
                    "{}: {CHANGES_LOGGED} configuration changes from the backend within a minute; \
                     the rest of the minute's are logged at debug level",
                    self.name
                );
                log::Level::Debug
            }
            _ => log::Level::Debug,
        }
    }
}

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        let level = self.level();
        log::log!(level, "{}: the backend's configuration changed", self.name);
        match crate::bus::lock(&self.notifier).as_ref() {
            Some(notifier) => notifier.notify(),
            None => {
                let level = if level == log::Level::Info {
                    log::Level::Warn
                } else {
                    log::Level::Debug
                };
                log::log!(level, "{}: no driver to tell of the change yet", self.name);
            }
        }
        Ok(0)
    }
}

/// One connection's channel, before the backend has its end.
pub struct BackendChannel {
    name: String,
    handler: FrontendReqHandler<ConfigChanges>,
    stop: Stop,
}

/// Ends a channel's thread: its connection is gone.
#[derive(Clone)]
pub struct Stop(Arc<StopState>);

struct StopState {
    /// Readable once stopped.
    stopped: EventFd,
    /// The channel's socket (a duplicate, so that it is still this socket
    /// when the thread has ended and dropped its own).
    socket: OwnedFd,
}

impl Stop {
    pub fn stop(&self) {
        if let Err(e) = self.0.stopped.write(1) {
            log::warn!("cannot stop a backend's request channel: {e}");
        }
        self.shut_down();
    }

    /// Closes the channel both ways, for the backend too: one waiting for
    /// an ack (libvhost-user's CONFIG_CHANGE_MSG) gets EOF rather than
    /// waiting for ever.
    fn shut_down(&self) {
        // SAFETY: shuts down a socket this owns; no memory is involved.
        if unsafe { libc::shutdown(self.0.socket.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
            log::warn!(
                "cannot shut a backend's request channel down: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    fn fd(&self) -> RawFd {
        self.0.stopped.as_raw_fd()
    }

    fn stopped(&self) -> bool {
        ready(&[self.fd()], 0).is_some()
    }
}

impl BackendChannel {
    pub fn new(name: &str, notifier: NotifierSlot, reply_ack: bool) -> vhost::Result<Self> {
        let changes = ConfigChanges {
            name: name.to_string(),
            notifier,
            logged: Mutex::new((None, 0)),
        };
        let failed = |e| vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(e));
        let stopped = EventFd::new(EFD_NONBLOCK).map_err(failed)?;
        let mut handler = FrontendReqHandler::new(Arc::new(changes))?;
        handler.set_reply_ack_flag(reply_ack);
        // SAFETY: the handler's socket, open while `handler` lives here;
        // it is only duplicated.
        let socket = unsafe { BorrowedFd::borrow_raw(handler.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(failed)?;
        Ok(BackendChannel {
            name: name.to_string(),
            handler,
            stop: Stop(Arc::new(StopState { stopped, socket })),
        })
    }

    /// The backend's end, to send with SET_BACKEND_REQ_FD.
    pub fn backend_end(&self) -> std::os::fd::RawFd {
        self.handler.get_tx_raw_fd()
    }

    /// What ends the thread `serve` starts.
    pub fn stopper(&self) -> Stop {
        self.stop.clone()
    }

    /// Serves the channel on a thread of its own until it is stopped (the
    /// connection it belongs to hung up) or the backend breaks the
    /// channel's framing. The thread sleeps until one or the other.
    pub fn serve(self) -> Option<std::thread::JoinHandle<()>> {
        let BackendChannel {
            name,
            mut handler,
            stop,
        } = self;
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-requests"))
            .spawn(move || {
                let fds = [handler.as_raw_fd(), stop.fd()];
                let mut refused = 0u64;
                // However the thread ends, the channel is closed: the copy
                // `Stop` holds would otherwise keep it open.
                let _closing = ShutDownOnDrop(&stop);
                loop {
                    match ready(&fds, -1) {
                        Some(0) => {}
                        // Stopped: the connection is gone.
                        Some(_) => return,
                        None => {
                            log::warn!(
                                "{name}: cannot wait on the backend's request channel ({}); \
                                 its configuration changes are no longer heard",
                                std::io::Error::last_os_error()
                            );
                            return;
                        }
                    }
                    match handler.handle_request() {
                        Ok(_) => {}
                        // A request the VMM does not serve, refused (after
                        // it was read whole, unless its framing was wrong,
                        // which the next read then finds).
                        Err(
                            e @ (vhost::vhost_user::Error::ReqHandlerError(_)
                            | vhost::vhost_user::Error::InvalidMessage),
                        ) => {
                            // A backend that keeps sending them must not
                            // flood the VMM's log.
                            refused += 1;
                            if refused <= REFUSALS_LOGGED {
                                log::warn!("{name}: a backend request refused: {e}");
                            } else {
                                log::debug!("{name}: a backend request refused: {e}");
                            }
                            if refused == REFUSALS_LOGGED {
                                log::warn!(
                                    "{name}: {REFUSALS_LOGGED} backend requests refused; \
                                     more are logged at debug level only"
                                );
                            }
                        }
                        Err(e) => {
                            if !stop.stopped() {
                                log::warn!(
                                    "{name}: the backend's request channel failed ({e}); \
                                     its configuration changes are no longer heard"
                                );
                            }
                            return;
                        }
                    }
                }
            });
        spawned
            .inspect_err(|e| log::warn!("cannot serve the backend's request channel: {e}"))
            .ok()
    }
}

/// Shuts the channel down when dropped.
struct ShutDownOnDrop<'a>(&'a Stop);

impl Drop for ShutDownOnDrop<'_> {
    fn drop(&mut self) {
        self.0.shut_down();
    }
}

/// The index of the first of `fds` with something to read (or hung up)
/// within `millis` (-1: no limit), or None when none is or poll fails.
/// Interrupted waits are retried.
fn ready(fds: &[RawFd], millis: i32) -> Option<usize> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid array of pollfds of the length given;
        // the fds are the handler's socket and the stop eventfd, which the
        // serving thread owns while it polls them.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, millis) };
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if rc <= 0 {
            return None;
        }
        return pfds.iter().position(|p| p.revents != 0);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Write};
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use super::*;

    /// A served channel, its stopper and the backend's end.
    fn served() -> (JoinHandle<()>, Stop, UnixStream) {
        let channel = BackendChannel::new("disk9", Arc::new(Mutex::new(None)), true)
            .expect("a request channel");
        // SAFETY: the backend's end, open while `channel` lives; duplicated.
        let backend = unsafe { BorrowedFd::borrow_raw(channel.backend_end()) }
            .try_clone_to_owned()
            .expect("dup");
        let stop = channel.stopper();
        let thread = channel.serve().expect("the channel's thread");
        (thread, stop, UnixStream::from(backend))
    }

    fn assert_ends_once_stopped(thread: JoinHandle<()>, stop: &Stop) {
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !thread.is_finished(),
            "the thread was not stuck to begin with"
        );
        stop.stop();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(thread.is_finished(), "the thread is still stuck after stop");
    }

    /// A backend that sends part of a message and then nothing holds the
    /// thread in the crate's read, until the channel is stopped.
    #[test]
    fn a_message_that_stops_halfway_holds_the_thread_until_stopped() {
        let (thread, stop, mut backend) = served();
        // Five of the header's twelve bytes.
        backend.write_all(&[2, 0, 0, 0, 1]).expect("write");
        assert_ends_once_stopped(thread, &stop);
    }

    /// A thread that ends on its own (here: a message cut short by the
    /// backend closing its sending side) closes the channel, so a backend
    /// reading it gets EOF rather than waiting for ever.
    #[test]
    fn a_channel_whose_thread_ends_is_closed_for_the_backend() {
        let (thread, _stop, mut backend) = served();
        backend.write_all(&[2, 0, 0, 0, 1]).expect("write");
        backend
            .shutdown(std::net::Shutdown::Write)
            .expect("shutdown");
        thread.join().expect("the channel's thread");
        backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut byte = [0u8];
        let read = std::io::Read::read(&mut backend, &mut byte);
        assert_eq!(read.ok(), Some(0), "the channel is still open");
    }

    /// A backend that says its configuration changed over and over gets
    /// the first few of a minute logged at info level, the rest at debug.
    #[test]
    fn config_changes_in_a_loop_are_logged_at_debug_past_the_first_few() {
        let changes = ConfigChanges {
            name: "disk9".into(),
            notifier: NotifierSlot::default(),
            logged: Mutex::new((None, 0)),
        };
        let levels: Vec<log::Level> = (0..CHANGES_LOGGED + 3).map(|_| changes.level()).collect();
        let shown = CHANGES_LOGGED as usize;
        assert!(levels[..shown].iter().all(|l| *l == log::Level::Info));
        assert!(levels[shown..].iter().all(|l| *l == log::Level::Debug));
        // A new minute shows them again.
        crate::bus::lock(&changes.logged).0 = Instant::now().checked_sub(CHANGES_WINDOW);
        assert_eq!(changes.level(), log::Level::Info);
    }

    /// A backend that sends acked requests and never reads the acks holds
    /// the thread in the crate's send once the socket is full, until the
    /// channel is stopped.
    #[test]
    fn acks_the_backend_never_reads_hold_the_thread_until_stopped() {
        let (thread, stop, mut backend) = served();
        // CONFIG_CHANGE_MSG, version 1, NEED_REPLY, no payload; as many as
        // fit, while the thread answers until its sends fill the socket.
        let mut message = Vec::new();
        for word in [2u32, 0x1 | 0x8, 0] {
            message.extend_from_slice(&word.to_le_bytes());
        }
        backend.set_nonblocking(true).expect("nonblocking");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut quiet_since = None;
        while Instant::now() < deadline {
            match backend.write(&message) {
                // A short write leaves a message halfway: stuck all the same.
                Ok(_) => quiet_since = None,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let since = *quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_millis(300) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        assert_ends_once_stopped(thread, &stop);
    }
}
