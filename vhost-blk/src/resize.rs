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

use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Duration;

use vmm_common::relay::{message, Inspect};

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
                    let channel = UnixStream::from(fd.try_clone()?);
                    channel.set_write_timeout(Some(SEND_TIMEOUT))?;
                    log::debug!("the frontend gave a backend request channel");
                    *lock(&changes.channel) = Some(channel);
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
    /// gave no channel to say so on.
    fn send(&self) -> io::Result<bool> {
        let mut channel = lock(&self.channel);
        let Some(stream) = channel.as_mut() else {
            return Ok(false);
        };
        // No reply asked for: the frontend reads the new capacity with
        // GET_CONFIG, which is the acknowledgement that counts.
        stream.write_all(&message(CONFIG_CHANGE_MSG, &[]))?;
        Ok(true)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What SIGHUP does: reads the image's size again and, if it changed,
/// tells the frontend.
pub fn resize(device: &Device, changes: &ConfigChanges) {
    let (old, new) = match device.target.disk.refresh_size() {
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
        return;
    }
    log::info!("resize: the image went from {old} to {new} bytes");
    match changes.send() {
        Ok(true) => log::info!("resize: told the frontend"),
        Ok(false) => log::info!(
            "resize: no frontend channel to tell (a frontend that connects later reads the new size)"
        ),
        Err(e) => log::warn!("resize: cannot tell the frontend: {e}"),
    }
}
