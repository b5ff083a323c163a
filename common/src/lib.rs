//! What more than one binary of the project needs: logging set-up, the
//! printing of error chains at the top level of a process, and how a
//! backend stops on a signal.

pub mod error_chain;
pub mod logging;
pub mod ring_watch;
pub mod socket_path;
pub mod stop;
