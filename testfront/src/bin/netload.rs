//! vhost-netload: drives any vhost-user-net backend socket (our vhost-net,
//! DPDK's vhost PMD) whose host side is the tap `--iface`, with no VM, and
//! prints packets per second and Gbit/s in one direction.
//!
//! Output (stdout), one line, then with `--json` one JSON object:
//!
//! ```text
//! tx 64B: 3000000 frames in 3.00 s, 1000000 pps, 0.51 Gbit/s (4000000 offered)
//! {"direction":"tx","frame_size":64,"seconds":3.0,"frames":3000000,"offered":4000000,"pps":1000000,"gbps":0.512}
//! ```
//! tx counts frames that reached the host (the tap's rx_packets), rx those
//! that arrived in the frontend's rx ring; "offered" is what the sending
//! side handed over.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vhost_test_frontend::netload::{self, Direction, NetLoad};

#[derive(Debug, Parser)]
#[command(name = "vhost-netload", version, about)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The tap on the backend's host side (run inside its namespace).
    #[arg(long, value_name = "NAME")]
    iface: String,
    /// tx (frontend to host) or rx (host to frontend).
    #[arg(long, default_value = "tx")]
    direction: String,
    /// Ethernet frame size, 60 to 1514.
    #[arg(long, default_value = "64")]
    frame_size: usize,
    /// Seconds to run.
    #[arg(long, default_value = "3")]
    time: f64,
    /// Ring size.
    #[arg(long, default_value = "256")]
    queue_size: u16,
    /// Also print the result as one JSON line.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    vmm_common::logging::init();
    let args = Args::parse();
    let direction = match args.direction.as_str() {
        "tx" => Direction::Tx,
        "rx" => Direction::Rx,
        other => {
            eprintln!("error: --direction {other:?}: expected tx or rx");
            return ExitCode::from(2);
        }
    };
    if !(args.time > 0.0 && args.time < 3600.0) {
        eprintln!("error: --time {}: expected 0 to 3600 seconds", args.time);
        return ExitCode::from(2);
    }
    let load = NetLoad {
        direction,
        frame_size: args.frame_size,
        duration: Duration::from_secs_f64(args.time),
        queue_size: args.queue_size,
        iface: args.iface,
    };
    match netload::run(&args.socket, &load) {
        Ok(report) => {
            let pps = report.pps();
            let gbps = report.gbps(load.frame_size);
            println!(
                "{} {}B: {} frames in {:.2} s, {:.0} pps, {:.3} Gbit/s ({} offered)",
                args.direction,
                load.frame_size,
                report.frames,
                report.seconds,
                pps,
                gbps,
                report.offered
            );
            if args.json {
                println!(
                    "{{\"direction\":\"{}\",\"frame_size\":{},\"seconds\":{:.3},\"frames\":{},\"offered\":{},\"pps\":{:.0},\"gbps\":{:.4}}}",
                    args.direction, load.frame_size, report.seconds, report.frames,
                    report.offered, pps, gbps
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", vmm_common::error_chain::render(&e));
            ExitCode::FAILURE
        }
    }
}
