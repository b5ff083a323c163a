//! The backend's request channel (VHOST_USER_PROTOCOL_F_BACKEND_REQ): a
//! socket the VMM hands a backend so that it can speak first. The VMM
//! serves one request on it, CONFIG_CHANGE_MSG: the backend's
//! configuration space changed (qemu-storage-daemon sends it when its
//! disk is resized), and the driver gets a configuration-change interrupt.
//!
//! The `vhost` crate's `FrontendReqHandler` reads the channel. It keeps its
//! own copy of the backend's end of the socket, so the channel never reads
//! as closed: a thread serves it until the connection it was set up on
//! hangs up, and a message that stops halfway fails after `READ_STALL`
//! rather than holding the thread for ever.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::{FrontendReqHandler, HandlerResult, VhostUserFrontendReqHandler};

use crate::virtio::device::ConfigNotifier;

/// How often a channel's thread checks whether its connection is gone.
const GONE_CHECK: Duration = Duration::from_millis(200);
/// How long a read of a message that has begun may wait for the rest.
const READ_STALL: Duration = Duration::from_secs(1);

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
}

impl BackendChannel {
    pub fn new(name: &str, notifier: NotifierSlot, reply_ack: bool) -> vhost::Result<Self> {
        let changes = ConfigChanges {
            name: name.to_string(),
            notifier,
        };
        let mut handler = FrontendReqHandler::new(Arc::new(changes))?;
        handler.set_reply_ack_flag(reply_ack);
        let stall = libc::timeval {
            tv_sec: READ_STALL.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: sets a socket option on a socket the handler owns, from a
        // timeval that lives across the call.
        let rc = unsafe {
            libc::setsockopt(
                handler.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&stall as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(vhost::Error::VhostUserProtocol(
                vhost::vhost_user::Error::SocketError(std::io::Error::last_os_error()),
            ));
        }
        Ok(BackendChannel {
            name: name.to_string(),
            handler,
        })
    }

    /// The backend's end, to send with SET_BACKEND_REQ_FD.
    pub fn backend_end(&self) -> std::os::fd::RawFd {
        self.handler.get_tx_raw_fd()
    }

    /// Serves the channel on a thread of its own until `gone` (the
    /// connection it belongs to hung up) or the backend breaks the
    /// channel's framing.
    pub fn serve(self, gone: Arc<AtomicBool>) {
        let BackendChannel { name, mut handler } = self;
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-requests"))
            .spawn(move || {
                while !gone.load(Ordering::Acquire) {
                    if !readable(&handler, GONE_CHECK) {
                        continue;
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
                            log::warn!("{name}: a backend request refused: {e}");
                        }
                        Err(e) => {
                            if !gone.load(Ordering::Acquire) {
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

/// Whether the channel has something to read within `timeout`.
fn readable(channel: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: channel.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pfd` is a valid pollfd for a socket the handler owns and
    // keeps open while we hold it.
    let ready = unsafe { libc::poll(&mut pfd, 1, millis) };
    ready > 0 && pfd.revents != 0
}
