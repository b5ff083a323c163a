//! vhost-loadgen: drives any vhost-user-blk backend socket with a fixed
//! workload, with no VM, and prints IOPS, MB/s and latency percentiles.
//!
//! Output (stdout), one line, then with `--json` one JSON object:
//!
//! ```text
//! 4k randread q1 d32: 97290 IOPS, 398.5 MB/s, latency p50 317.0 us, p99 493.3 us, p99.9 2529.5 us, max 5377.5 us
//! {"op":"read","pattern":"rand","size":4096,"queues":1,"depth":32,"seconds":5.003,"ops":486706,"iops":97290,"mbps":398.5,"p50_us":317.0,"p99_us":493.3,"p999_us":2529.5,"max_us":5377.5}
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vhost_test_frontend::load::{self, LoadSpec, Report};

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
    /// Stop each queue after this many requests (before --time if sooner).
    #[arg(long, value_name = "N")]
    requests: Option<u64>,
    /// Guest memory to share with the backend (k/m/g suffix); by default
    /// just what the rings and buffers need.
    #[arg(long, value_name = "SIZE")]
    mem: Option<String>,
    /// Guest memory on 2 MiB huge pages (hugetlbfs), as vhost-user
    /// deployments with DPDK or SPDK run; needs free huge pages
    /// (/proc/sys/vm/nr_hugepages).
    #[arg(long)]
    hugepages: bool,
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

fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (digits, shift) = match t.as_bytes().last()? {
        b'k' => (&t[..t.len() - 1], 10),
        b'm' => (&t[..t.len() - 1], 20),
        b'g' => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn spec(args: &Args) -> Result<LoadSpec, String> {
    let size = parse_size(&args.size)
        .and_then(|s| u32::try_from(s).ok())
        .filter(|&s| s > 0 && s % 512 == 0 && s <= 1 << 24)
        .ok_or_else(|| {
            format!(
                "--size {:?}: expected a multiple of 512 up to 16m",
                args.size
            )
        })?;
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
    if args.requests == Some(0) {
        return Err("--requests 0: expected at least 1".into());
    }
    let mem_size = match &args.mem {
        None => None,
        Some(text) => Some(
            parse_size(text)
                .filter(|&m| m >= 1 << 20 && m % 4096 == 0)
                .ok_or_else(|| format!("--mem {text:?}: expected whole pages, at least 1m"))?,
        ),
    };
    Ok(LoadSpec {
        queues: args.queues,
        depth: args.depth,
        size,
        random,
        write,
        duration: Duration::from_secs_f64(args.time),
        max_requests: args.requests,
        seed: args.seed,
        mem_size,
        hugepages: args.hugepages,
    })
}

fn print_report(args: &Args, spec: &LoadSpec, report: &Report) {
    let [p50, p99, p999, max] = [50.0, 99.0, 99.9, 100.0].map(|p| report.percentile_us(p));
    println!(
        "{} {}{} q{} d{}: {:.0} IOPS, {:.1} MB/s, latency p50 {p50:.1} us, p99 {p99:.1} us, p99.9 {p999:.1} us, max {max:.1} us",
        args.size,
        args.pattern,
        args.op,
        spec.queues,
        spec.depth,
        report.iops(),
        report.mbps(),
    );
    if args.json {
        println!(
            "{{\"op\":\"{}\",\"pattern\":\"{}\",\"size\":{},\"queues\":{},\"depth\":{},\"seconds\":{:.3},\"ops\":{},\"iops\":{:.0},\"mbps\":{:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"p999_us\":{p999:.1},\"max_us\":{max:.1}}}",
            args.op,
            args.pattern,
            spec.size,
            spec.queues,
            spec.depth,
            report.elapsed.as_secs_f64(),
            report.ops,
            report.iops(),
            report.mbps(),
        );
    }
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
            eprintln!(
                "vhost-loadgen: {:5.1} s {ops:10} requests {rate:10.0} IOPS",
                t.as_secs_f64()
            );
            last = ops;
            last_t = t;
        }
    });
    match result {
        Ok(report) => {
            print_report(&args, &spec, &report);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: {}: {}",
                args.socket.display(),
                vmm_common::error_chain::render(&e)
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("64K"), Some(65536));
        assert_eq!(parse_size("1m"), Some(1 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("16mb"), Some(16 << 20));
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn bad_arguments_are_rejected() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["vhost-loadgen", "--socket", "s"];
            argv.extend_from_slice(extra);
            spec(&Args::parse_from(argv))
        };
        assert!(parse(&[]).is_ok());
        assert!(parse(&["--size", "1000"]).is_err());
        assert!(parse(&["--pattern", "zigzag"]).is_err());
        assert!(parse(&["--op", "trim"]).is_err());
        assert!(parse(&["--queues", "0"]).is_err());
        assert!(parse(&["--mem", "100"]).is_err());
        let s = parse(&["--size", "64k", "--mem", "256m", "--requests", "10"]).unwrap();
        assert_eq!(
            (s.size, s.mem_size, s.max_requests),
            (65536, Some(256 << 20), Some(10))
        );
    }
}
