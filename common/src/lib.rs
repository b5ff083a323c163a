//! What more than one binary of the project needs: logging set-up and the
//! printing of error chains at the top level of a process.

pub mod error_chain;
pub mod logging;
