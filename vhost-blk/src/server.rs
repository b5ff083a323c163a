//! Serves one frontend after another on the socket until SIGTERM/SIGINT.

use std::path::Path;
use std::sync::Arc;

use thiserror::Error;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlkBackend, Device};

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot set up the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("--socket {0:?}: cannot listen")]
    Claim(
        std::path::PathBuf,
        #[source] vmm_common::socket_path::Unusable,
    ),
    #[error("--socket {0:?}: cannot serve: {1}")]
    Serve(std::path::PathBuf, String),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
}

/// Serves frontends one after another on one listening socket, so a new
/// frontend can connect (and wait in the backlog) while the last one is
/// being cleaned up.
pub fn serve(socket: &Path, device: Device) -> Result<(), ServeError> {
    let device = Arc::new(device);
    // Data is written with pwrite as requests complete; a final fdatasync
    // makes it durable before the process exits.
    let flushed = device.clone();
    let bound = vmm_common::stop::exit_on_stop_signals(socket.to_path_buf(), move || {
        if let Err(e) = flushed.target.disk.flush() {
            log::warn!("final flush failed: {e}");
        }
    })
    .map_err(ServeError::Signals)?;
    let claim = vmm_common::socket_path::claim(socket)
        .map_err(|e| ServeError::Claim(socket.to_path_buf(), e))?;
    let mut listener = Listener::new(socket, false)
        .map_err(|e| ServeError::Serve(socket.to_path_buf(), e.to_string()))?;
    bound.set();
    drop(claim);
    loop {
        let backend = BlkBackend::new(device.clone());
        let mut daemon = VhostUserDaemon::new(
            "vhost-blk".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(format!("{e:?}")))?;
        backend.set_handlers(&daemon.get_epoll_handlers());
        log::info!("waiting for a frontend on {}", socket.display());
        if let Err(e) = daemon.start(&mut listener) {
            // Accepting failed: the socket itself is broken.
            return Err(ServeError::Serve(socket.to_path_buf(), format!("{e:?}")));
        }
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("frontend disconnected"),
            // A misbehaving frontend ends its connection, not the backend.
            Err(e) => log::warn!("connection ended: {e:?}"),
        }
        // The workers finish what the frontend left in flight; then
        // dropping the daemon stops and joins them.
        backend.quiesce();
        drop(daemon);
    }
}
