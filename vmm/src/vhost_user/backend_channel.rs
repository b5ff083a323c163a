//! The backend's request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): a
//! socket the VMM hands a backend so that it can speak first. The VMM
//! serves one request on it, CONFIG_CHANGE_MSG: the backend's
//! configuration space changed (qemu-storage-daemon sends it when its
//! disk is resized), and the driver gets a configuration-change interrupt.
//!
//! The `vhost` crate's `FrontendReqHandler` reads the channel. It keeps its
//! own copy of the backend's end of the socket, so the channel never reads
//! as closed: a thread serves it until the connection it was set up on
//! hangs up (whoever sees that says so through the channel's `Stop`), and
//! a message that stops halfway, or an ack the backend does not read,
//! fails after `SOCKET_STALL` rather than holding the thread for ever.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::{FrontendReqHandler, HandlerResult, VhostUserFrontendReqHandler};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::device::ConfigNotifier;

/// How long a read of a message that has begun may wait for the rest, and
/// a send of an ack for room in the socket.
const SOCKET_STALL: Duration = Duration::from_secs(1);
/// Refused backend requests logged as warnings, per channel.
const REFUSALS_LOGGED: u64 = 10;

/// The device's configuration-change notifier, once its transport exists;
/// shared by the channels of every connection the device has.
pub type NotifierSlot = Arc<Mutex<Option<ConfigNotifier>>>;

/// What the VMM does with a backend's requests.
pub struct ConfigChanges {
    name: String,
    notifier: NotifierSlot,
}

impl VhostUserFrontendReqHandler for ConfigChanges {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        log::info!("{}: the backend's configuration changed", self.name);
        match crate::bus::lock(&self.notifier).as_ref() {
            Some(notifier) => notifier.notify(),
            None => log::warn!("{}: no driver to tell of the change yet", self.name),
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

/// Ends a channel's thread: its connection is gone. Readable once stopped.
#[derive(Clone)]
pub struct Stop(Arc<EventFd>);

impl Stop {
    pub fn stop(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("cannot stop a backend's request channel: {e}");
        }
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
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
        };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| {
            vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(e))
        })?;
        let mut handler = FrontendReqHandler::new(Arc::new(changes))?;
        handler.set_reply_ack_flag(reply_ack);
        let stall = libc::timeval {
            tv_sec: SOCKET_STALL.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // Both ways: a backend that sends acked requests and never reads
        // the acks would otherwise hold the thread in a send for ever.
        for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
            // SAFETY: sets a socket option on a socket the handler owns,
            // from a timeval that lives across the call.
            let rc = unsafe {
                libc::setsockopt(
                    handler.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&stall as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(vhost::Error::VhostUserProtocol(
                    vhost::vhost_user::Error::SocketError(std::io::Error::last_os_error()),
                ));
            }
        }
        Ok(BackendChannel {
            name: name.to_string(),
            handler,
            stop: Stop(Arc::new(stop)),
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
    pub fn serve(self) {
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
        if let Err(e) = spawned {
            log::warn!("cannot serve the backend's request channel: {e}");
        }
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
