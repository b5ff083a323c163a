//! Serves one frontend after another on the socket until SIGTERM/SIGINT.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_common::relay::{self, Relay};
use vmm_common::socket_path::OwnSocket;

use crate::backend::{BlkBackend, Device};
use crate::resize::{self, ConfigChanges};

/// The signals the backend waits for in threads of its own: blocked in
/// `main` before anything else, so none reaches a thread that does not wait
/// for it (and ends the process by its default action).
pub const STOP_AND_RESIZE: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

use vmm_common::serve::ServeError;

/// Serves frontends one after another on one listening socket, so a new
/// frontend can connect (and wait in the backlog) while the last one is
/// being cleaned up. Each frontend talks to the vhost crate's handler
/// through a relay, which keeps the frontend's backend request channel
/// for `resize` (SIGHUP). The socket and the relay's private directory go
/// when the backend stops or fails. SIGTERM, SIGINT and SIGHUP must be
/// blocked already (`STOP_AND_RESIZE`).
pub fn serve(socket: &Path, device: Device) -> Result<(), ServeError> {
    let device = Arc::new(device);
    let serve_err = |e: std::io::Error| ServeError::Serve(socket.to_path_buf(), e.to_string());
    let private = relay::private_dir("vhost-blk-").map_err(serve_err)?;
    let private_path = private.path().to_path_buf();
    // Data is written with pwrite as requests complete; a final fdatasync
    // makes it durable before the process exits.
    let flushed = device.clone();
    let bound = vmm_common::stop::exit_on_stop_signals(move || {
        if let Err(e) = flushed.target.disk.flush() {
            log::warn!("final flush failed: {e}");
        }
        let _ = std::fs::remove_dir_all(&private_path);
    })
    .map_err(ServeError::Signals)?;
    let changes = Arc::new(ConfigChanges::default());
    let (resized, told) = (device.clone(), changes.clone());
    vmm_common::stop::on_signal(libc::SIGHUP, "resize", move || {
        resize::resize(&resized, &told)
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
    let result = serve_frontends(
        socket,
        &public,
        &relay::inner_socket(&private),
        &device,
        &changes,
    );
    own.remove();
    result
}

fn serve_frontends(
    socket: &Path,
    public: &UnixListener,
    inner_path: &Path,
    device: &Arc<Device>,
    changes: &Arc<ConfigChanges>,
) -> Result<(), ServeError> {
    let serve_err = |e: std::io::Error| ServeError::Serve(socket.to_path_buf(), e.to_string());
    let mut listener = Listener::from(relay::bind_inner(inner_path).map_err(serve_err)?);
    vmm_common::lost_memory::install().map_err(serve_err)?;
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
        let frontend = public.accept().map_err(serve_err)?.0;
        let inner = UnixStream::connect(inner_path).map_err(serve_err)?;
        vmm_common::lost_memory::end_on_loss(&frontend).map_err(serve_err)?;
        let left = backend.clone();
        let relay = Relay::start_with_end(
            frontend,
            inner,
            backend.protocol_features().bits(),
            changes.watch(),
            Box::new(move || left.frontend_left()),
        )
        .map_err(serve_err)?;
        if let Err(e) = daemon.start(&mut listener) {
            // Accepting failed: the socket itself is broken.
            return Err(ServeError::Serve(socket.to_path_buf(), format!("{e:?}")));
        }
        vmm_common::serve::log_connection_end(daemon.wait());
        // The transfers the frontend left in flight finish (uncompleted:
        // see `quiesce`); then dropping the daemon stops and joins the
        // workers.
        backend.quiesce();
        drop(daemon);
        relay.join();
        // Nothing touches the connection's memory any more (the workers
        // are gone with the daemon).
        vmm_common::lost_memory::forget();
        // Only once the relay is done: it may still pass on messages the
        // frontend sent before the end, a channel among them.
        changes.forget();
    }
}
