//! vhost-loadgen: drives any vhost-user-blk backend socket with a fixed
//! workload and prints IOPS, MB/s and latency percentiles.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vhost_test_frontend::load::{self, LoadSpec};

#[derive(Debug, Parser)]
#[command(name = "vhost-loadgen", version, about)]
struct Args {
    /// The backend's vhost-user socket.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Queues to drive, one thread each.
    #[arg(long, default_value = "1")]
    queues: usize,
    /// Requests in flight per queue.
    #[arg(long, default_value = "32")]
    depth: usize,
    /// Request size: bytes or with a k/m suffix (a multiple of 512).
    #[arg(long, default_value = "4k")]
    size: String,
    /// Offsets: rand or seq.
    #[arg(long, default_value = "rand")]
    pattern: String,
    /// read or write.
    #[arg(long, default_value = "read")]
    op: String,
    /// Seconds to run.
    #[arg(long, default_value = "5")]
    time: f64,
    /// Seed of the random offsets.
    #[arg(long, default_value = "1")]
    seed: u64,
    /// Also print the result as one JSON line.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

fn parse_size(text: &str) -> Option<u32> {
    let t = text.trim().to_ascii_lowercase();
    let (digits, shift) = match t.strip_suffix('k') {
        Some(d) => (d, 10),
        None => match t.strip_suffix('m') {
            Some(d) => (d, 20),
            None => (t.as_str(), 0),
        },
    };
    digits.parse::<u32>().ok()?.checked_mul(1 << shift)
}

fn spec(args: &Args) -> Result<LoadSpec, String> {
    let size =
        parse_size(&args.size).ok_or_else(|| format!("--size {:?}: not a size", args.size))?;
    let random = match args.pattern.as_str() {
        "rand" => true,
        "seq" => false,
        other => return Err(format!("--pattern {other:?}: expected rand or seq")),
    };
    let write = match args.op.as_str() {
        "read" => false,
        "write" => true,
        other => return Err(format!("--op {other:?}: expected read or write")),
    };
    if args.queues == 0 || args.queues > 64 {
        return Err(format!("--queues {}: expected 1 to 64", args.queues));
    }
    if args.depth == 0 || args.depth > 4096 {
        return Err(format!("--depth {}: expected 1 to 4096", args.depth));
    }
    if !(args.time > 0.0 && args.time <= 3600.0) {
        return Err(format!("--time {}: expected 0 to 3600 seconds", args.time));
    }
    Ok(LoadSpec {
        queues: args.queues,
        depth: args.depth,
        size,
        random,
        write,
        duration: Duration::from_secs_f64(args.time),
        seed: args.seed,
    })
}

fn main() -> ExitCode {
    vmm_common::logging::init();
    let args = Args::parse();
    let spec = match spec(&args) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let quiet = args.quiet;
    let mut last = 0u64;
    let mut last_t = Duration::ZERO;
    let result = load::run(&args.socket, spec, |ops, t| {
        if !quiet && t.saturating_sub(last_t) >= Duration::from_secs(1) {
            let rate = (ops - last) as f64 / (t - last_t).as_secs_f64();
            eprintln!("vhost-loadgen: {:5.1}s {rate:10.0} IOPS", t.as_secs_f64());
            last = ops;
            last_t = t;
        }
    });
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!(
                "error: {}: {}",
                args.socket.display(),
                vmm_common::error_chain::render(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    let label = format!(
        "{} {}{} q{} d{}",
        args.size, args.pattern, args.op, args.queues, args.depth
    );
    println!(
        "{label}: {:.0} IOPS, {:.1} MB/s, latency p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
        report.iops(),
        report.mbps(),
        report.percentile_us(50.0),
        report.percentile_us(99.0),
        report.percentile_us(99.9),
        report.percentile_us(100.0)
    );
    if args.json {
        println!(
            "{{\"iops\": {:.0}, \"mbps\": {:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"p999_us\": {:.1}, \"max_us\": {:.1}, \"ops\": {}}}",
            report.iops(),
            report.mbps(),
            report.percentile_us(50.0),
            report.percentile_us(99.0),
            report.percentile_us(99.9),
            report.percentile_us(100.0),
            report.ops
        );
    }
    ExitCode::SUCCESS
}
