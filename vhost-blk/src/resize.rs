//! Resizing the disk while a frontend uses it. After the image file has
//! been grown or shrunk in place, SIGHUP makes the backend read its size
//! again. When it changed, the backend serves the new capacity (requests
//! are checked against it, GET_CONFIG reports it) and sends the frontend a
//! CONFIG_CHANGE_MSG on the backend request channel
//! (VHOST_USER_PROTOCOL_F_BACKEND_REQ), so the driver gets a
//! configuration-change interrupt and reads the capacity again.
//!
//! The vhost crate keeps the channel to itself and cannot send that
//! message, so the relay in front of it (`vmm_common::relay`) keeps a copy
//! of the channel as `SET_BACKEND_REQ_FD` passes.

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use vmm_common::relay::{message, send_message, Inspect};

use crate::backend::Device;

const SET_BACKEND_REQ_FD: u32 = 21;
const CONFIG_CHANGE_MSG: u32 = 2;
/// A frontend that does not read its channel holds the sender no longer.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// The current frontend's backend request channel, if it gave one.
#[derive(Default)]
pub struct ConfigChanges {
    channel: Mutex<Option<UnixStream>>,
}

impl ConfigChanges {
    /// The relay's look at each message of one connection: keeps the
    /// channel the frontend sends.
    pub fn watch(self: &std::sync::Arc<Self>) -> Inspect {
        let changes = self.clone();
        Box::new(move |m, _| {
            if m.request == SET_BACKEND_REQ_FD {
                // A message without exactly one descriptor is the vhost
                // crate's to refuse.
                if let [fd] = m.fds {
                    let kept = fd.try_clone().map(UnixStream::from).and_then(|channel| {
                        channel.set_write_timeout(Some(SEND_TIMEOUT))?;
                        Ok(channel)
                    });
                    match kept {
                        Ok(channel) => {
                            log::debug!("the frontend gave a backend request channel");
                            *lock(&changes.channel) = Some(channel);
                        }
                        // Not a socket, or out of descriptors: a resize
                        // cannot be announced on this connection; the
                        // vhost crate still judges the message itself.
                        Err(e) => log::warn!(
                            "cannot keep the frontend's backend request channel ({e}); resizes will not be announced"
                        ),
                    }
                }
            }
            Ok(())
        })
    }

    /// The connection ended: its channel goes with it.
    pub fn forget(&self) {
        lock(&self.channel).take();
    }

    /// Tells the frontend the configuration space changed; false when it
    /// gave no channel to say so on. A channel the frontend closed is
    /// dropped.
    fn send(&self) -> io::Result<bool> {
        // Written outside the lock: a frontend slow to read holds up
        // neither the relay nor the end of its connection.
        let channel = lock(&self.channel)
            .as_ref()
            .map(UnixStream::try_clone)
            .transpose()?;
        let Some(stream) = channel else {
            return Ok(false);
        };
        // No reply asked for: the frontend reads the new capacity with
        // GET_CONFIG, which is the acknowledgement that counts.
        match send_message(&stream, &message(CONFIG_CHANGE_MSG, &[]), &[]) {
            Ok(()) => Ok(true),
            Err(e) => {
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
                ) {
                    self.forget();
                }
                Err(e)
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What SIGHUP does: reads the image's size again and tells the frontend,
/// even when the size did not change (a frontend may have let an earlier
/// message go: QEMU ignores one while the device is not started).
pub fn resize(device: &Device, changes: &ConfigChanges) {
    let disk = &device.target.disk;
    let (old, new) = match disk.refresh_size() {
        Ok(sizes) => sizes,
        Err(e) => {
            log::error!(
                "resize: {}; the disk keeps its size",
                vmm_common::error_chain::render(&e)
            );
            return;
        }
    };
    if old == new {
        log::info!("resize: the image is still {new} bytes");
    } else {
        log::info!("resize: the image went from {old} to {new} bytes");
        // A write checked against the old size and still in flight (or
        // made between the shrink and the signal) grows the file again.
        if let Ok((_, now)) = disk.refresh_size() {
            if now != new {
                log::warn!(
                    "resize: the image is {now} bytes again: writes past the new end grew it back (shrink the guest's use of the disk first)"
                );
            }
        }
    }
    match changes.send() {
        Ok(true) => log::info!("resize: told the frontend"),
        Ok(false) => log::info!(
            "resize: no frontend channel to tell (a frontend that connects later reads the new size)"
        ),
        Err(e) => log::warn!("resize: cannot tell the frontend: {e}"),
    }
}
