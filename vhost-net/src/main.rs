//! vhost-net: a vhost-user-net backend moving frames between a VM's
//! virtqueues and a host tap.

mod backend;
mod cli;
mod config;
mod features;
mod iovec;
mod relay;
mod server;
mod tap;
mod uring;
mod worker;

use std::process::ExitCode;

use clap::Parser;

fn run(args: cli::Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = config::Config::try_from(args)?;
    let taps = tap::Tap::open_queues(&config.tap, config.pairs())?;
    let device = backend::Device {
        taps,
        queue_size: config.queue_size,
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
