//! What more than one binary of the project needs: logging set-up, the
//! printing of error chains at the top level of a process, how a
//! backend stops on a signal, a backend's accept loop, the memfd behind
//! shared guest memory, and how a backend survives that memory going away.

pub mod avail;
pub mod error_chain;
pub mod logging;
pub mod lost_memory;
pub mod relay;
pub mod ring_watch;
pub mod serve;
pub mod shared_memory;
pub mod socket_path;
pub mod stop;
