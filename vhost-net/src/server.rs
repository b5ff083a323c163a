//! Serves one frontend after another on the socket until SIGTERM/SIGINT.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{Device, NetBackend};
use vmm_common::relay::{self, Relay};
use vmm_common::socket_path::OwnSocket;

use vmm_common::serve::ServeError;

/// Serves frontends one after another on one listening socket, so a new
/// frontend can connect (and wait in the backlog) while the last one is
/// being cleaned up. Each frontend talks to the vhost crate's handler
/// through a relay (see `crate::relay` for why). The socket and the relay's
/// private directory go when the backend stops or fails.
pub fn serve(socket: &Path, device: Device) -> Result<(), ServeError> {
    let device = Arc::new(device);
    let serve_err = |e: std::io::Error| ServeError::Serve(socket.to_path_buf(), e.to_string());
    let private = relay::private_dir("vhost-net-").map_err(serve_err)?;
    let private_path = private.path().to_path_buf();
    // A tap this process created goes away with its last queue.
    let bound = vmm_common::stop::exit_on_stop_signals(move || {
        let _ = std::fs::remove_dir_all(&private_path);
    })
    .map_err(ServeError::Signals)?;
    let claim = vmm_common::socket_path::claim(socket)
        .map_err(|e| ServeError::Claim(socket.to_path_buf(), e))?;
    let public = UnixListener::bind(socket).map_err(serve_err)?;
    let own = OwnSocket::bound(socket).map_err(|e| {
        let _ = std::fs::remove_file(socket);
        serve_err(e)
    })?;
    bound.set(own.clone());
    drop(claim);
    let result = serve_frontends(socket, &public, &relay::inner_socket(&private), &device);
    own.remove();
    result
}

fn serve_frontends(
    socket: &Path,
    public: &UnixListener,
    inner_path: &Path,
    device: &Arc<Device>,
) -> Result<(), ServeError> {
    let serve_err = |e: std::io::Error| ServeError::Serve(socket.to_path_buf(), e.to_string());
    let mut listener = Listener::from(relay::bind_inner(inner_path).map_err(serve_err)?);
    vmm_common::lost_memory::install().map_err(serve_err)?;
    loop {
        let backend = NetBackend::new(device.clone());
        let mut daemon = VhostUserDaemon::new(
            "vhost-net".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(format!("{e:?}")))?;
        backend.set_handlers(&daemon.get_epoll_handlers());
        log::info!("waiting for a frontend on {}", socket.display());
        let frontend = match public.accept() {
            Ok((stream, _)) => stream,
            Err(e) => return Err(serve_err(e)),
        };
        let inner = UnixStream::connect(inner_path).map_err(serve_err)?;
        vmm_common::lost_memory::end_on_loss(&frontend).map_err(serve_err)?;
        let offered = backend.protocol_features().bits();
        let relay = Relay::start(
            frontend,
            inner,
            offered,
            crate::relay::protocol_features_first(),
        )
        .map_err(serve_err)?;
        if let Err(e) = daemon.start(&mut listener) {
            // Accepting failed: the socket itself is broken.
            return Err(ServeError::Serve(socket.to_path_buf(), format!("{e:?}")));
        }
        vmm_common::serve::log_connection_end(daemon.wait());
        // Dropping the daemon stops and joins this connection's workers.
        drop(daemon);
        relay.join();
        // Nothing touches the connection's memory any more (the workers
        // are gone with the daemon).
        vmm_common::lost_memory::forget();
        backend.report();
    }
}
