//! vhost-blk: a vhost-user-blk backend serving a raw image on a Unix socket.

mod backend;
mod block_writes;
mod cli;
mod config;
mod disk;
mod image_lock;
mod queue_io;
mod request;
mod resize;
mod server;
mod serving;
mod used_order;
mod watch;

#[cfg(test)]
mod tests;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

fn run(args: cli::Args) -> Result<(), Box<dyn std::error::Error>> {
    // Before anything that takes time (the image's lock may be waited
    // for) and before any thread: SIGHUP must not end the process.
    vmm_common::stop::block(&server::STOP_AND_RESIZE)?;
    let config = config::Config::try_from(args)?;
    let disk = disk::RawFile::open(&config.image, config.readonly, config.direct)?;
    let device = backend::Device {
        target: request::BlkTarget {
            disk: Arc::new(disk),
            readonly: config.readonly,
            serial: config.serial,
        },
        num_queues: config.num_queues,
        queue_size: config.queue_size,
        poll: config.poll,
        cores: serving::cores_of_this_process(),
    };
    server::serve(&config.socket, device)?;
    Ok(())
}

fn main() -> ExitCode {
    vmm_common::logging::init();
    match run(cli::Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", vmm_common::error_chain::render(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
