//! What both backends' accept loops share: their error type, and how the
//! end of one frontend's connection is told apart from a failure.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("cannot set up the vhost-user daemon: {0}")]
    Daemon(String),
    #[error("--socket {0:?}: cannot listen")]
    Claim(PathBuf, #[source] crate::socket_path::Unusable),
    #[error("--socket {0:?}: cannot serve: {1}")]
    Serve(PathBuf, String),
    #[error("cannot set up signal handling")]
    Signals(#[source] std::io::Error),
}

/// Logs how a frontend's connection ended (what `VhostUserDaemon::wait`
/// returned): a hang-up at info, anything else at warn. Either way the
/// backend serves the next frontend: a misbehaving one ends its own
/// connection, not the backend.
pub fn log_connection_end(result: Result<(), vhost_user_backend::Error>) {
    match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => log::info!("frontend disconnected"),
        Err(e) => log::warn!("connection ended: {e:?}"),
    }
}
