//! vhost-loadgen: drives any vhost-user-blk backend socket with a fixed
//! workload, with no VM, and prints IOPS, MB/s and latency percentiles.
//!
//! Output (stdout), one line, then with `--json` one JSON object:
//!
//! ```text
//! 4k randread q1 d32: 97290 IOPS, 398.5 MB/s, latency p50 317.0 us, p99 493.3 us, p99.9 2529.5 us, max 5377.5 us
//! {"op":"read","pattern":"rand","size":4096,"write_size":0,"queues":1,"depth":32,"seconds":5.003,"ops":486706,"iops":97290,"mbps":398.5,"p50_us":317.0,"p99_us":493.3,"p999_us":2529.5,"max_us":5377.5,"read_iops":97290,"read_p50_us":317.0,"read_p99_us":493.3,"read_p999_us":2529.5,"write_iops":0,"write_p50_us":0.0,"write_p99_us":0.0,"write_p999_us":0.0}
//! ```
//!
//! With `--op mixed`, reads of `--size` and writes of `--write-size` take
//! turns, and the line ends with each direction's rate and latency:
//! `...; reads 23191 IOPS, p50 552.9 us, p99 1308.3 us; writes 23191 IOPS,
//! p50 553.1 us, p99 1308.6 us` (vhost-blk on disk, where a read queued
//! behind a write comes back with it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vhost_test_frontend::load::{self, LoadSpec, Op, Report};

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
    /// read, write, or mixed (reads and writes take turns).
    #[arg(long, default_value = "read")]
    op: String,
    /// With --op mixed: the writes' size (--size is the reads'); by
    /// default --size.
    #[arg(long, value_name = "SIZE")]
    write_size: Option<String>,
    /// Seconds to run, measured.
    #[arg(long, default_value = "5")]
    time: f64,
    /// Seconds to run first, unmeasured (caches, io_uring workers and the
    /// backend's threads settle).
    #[arg(long, default_value = "0", value_name = "SECS")]
    warmup: f64,
    /// Seconds a queue may wait for a completion before the backend
    /// counts as hung and the run fails.
    #[arg(long, default_value = "5", value_name = "SECS")]
    stall_timeout: f64,
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
    /// Microseconds each queue watches its used ring before it sleeps
    /// until the backend's call, giving up the core between looks, as a
    /// polling guest driver would (0 to 1000; by default 0: it sleeps at
    /// once, as Linux's virtio-blk driver does).
    #[arg(long, default_value = "0", value_name = "US")]
    poll_us: u64,
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

/// A request size: a multiple of 512 up to 16 MiB.
fn request_size(option: &str, text: &str) -> Result<u32, String> {
    parse_size(text)
        .and_then(|s| u32::try_from(s).ok())
        .filter(|&s| s > 0 && s % 512 == 0 && s <= 1 << 24)
        .ok_or_else(|| format!("{option} {text:?}: expected a multiple of 512 up to 16m"))
}

fn spec(args: &Args) -> Result<LoadSpec, String> {
    let size = request_size("--size", &args.size)?;
    let random = match args.pattern.as_str() {
        "rand" => true,
        "seq" => false,
        other => return Err(format!("--pattern {other:?}: expected rand or seq")),
    };
    let op = match (args.op.as_str(), &args.write_size) {
        ("read", None) => Op::Read,
        ("write", None) => Op::Write,
        ("mixed", None) => Op::Mixed { write_size: size },
        ("mixed", Some(text)) => Op::Mixed {
            write_size: request_size("--write-size", text)?,
        },
        ("read" | "write", Some(text)) => {
            return Err(format!(
                "--write-size {text:?}: only with --op mixed (--size sets the size)"
            ))
        }
        (other, _) => return Err(format!("--op {other:?}: expected read, write or mixed")),
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
    if !(args.warmup >= 0.0 && args.warmup <= 3600.0) {
        return Err(format!(
            "--warmup {}: expected 0 to 3600 seconds",
            args.warmup
        ));
    }
    if !(args.stall_timeout >= 0.1 && args.stall_timeout <= 3600.0) {
        return Err(format!(
            "--stall-timeout {}: expected 0.1 to 3600 seconds",
            args.stall_timeout
        ));
    }
    if args.requests == Some(0) {
        return Err("--requests 0: expected at least 1".into());
    }
    if args.requests.is_some() && args.warmup > 0.0 {
        return Err(format!(
            "--warmup {} with --requests: the warm-up would take some of the requests; use one",
            args.warmup
        ));
    }
    if args.poll_us > 1000 {
        return Err(format!(
            "--poll-us {}: expected 0 to 1000 microseconds",
            args.poll_us
        ));
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
        op,
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.time),
        stall_timeout: Duration::from_secs_f64(args.stall_timeout),
        max_requests: args.requests,
        seed: args.seed,
        mem_size,
        hugepages: args.hugepages,
        poll: Duration::from_micros(args.poll_us),
    })
}

fn print_report(args: &Args, spec: &LoadSpec, report: &Report) {
    let [p50, p99, p999, max] = [50.0, 99.0, 99.9, 100.0].map(|p| report.percentile_us(p));
    let [r50, r99, r999] = [50.0, 99.0, 99.9].map(|p| report.read_latencies.percentile_us(p));
    let [w50, w99, w999] = [50.0, 99.0, 99.9].map(|p| report.write_latencies.percentile_us(p));
    let (sizes, mix) = match spec.op {
        Op::Mixed { .. } => (
            format!("{}+{}", args.size, args.write_size.as_deref().unwrap_or(&args.size)),
            format!(
                "; reads {:.0} IOPS, p50 {r50:.1} us, p99 {r99:.1} us; writes {:.0} IOPS, p50 {w50:.1} us, p99 {w99:.1} us",
                report.read_iops(),
                report.write_iops(),
            ),
        ),
        Op::Read | Op::Write => (args.size.clone(), String::new()),
    };
    let write_size = match spec.op {
        Op::Mixed { write_size } => write_size,
        Op::Read => 0,
        Op::Write => spec.size,
    };
    println!(
        "{sizes} {}{} q{} d{}: {:.0} IOPS, {:.1} MB/s, latency p50 {p50:.1} us, p99 {p99:.1} us, p99.9 {p999:.1} us, max {max:.1} us{mix}",
        args.pattern,
        args.op,
        spec.queues,
        spec.depth,
        report.iops(),
        report.mbps(),
    );
    if args.json {
        println!(
            "{{\"op\":\"{}\",\"pattern\":\"{}\",\"size\":{},\"write_size\":{write_size},\"queues\":{},\"depth\":{},\"seconds\":{:.3},\"ops\":{},\"iops\":{:.0},\"mbps\":{:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"p999_us\":{p999:.1},\"max_us\":{max:.1},\"read_iops\":{:.0},\"read_p50_us\":{r50:.1},\"read_p99_us\":{r99:.1},\"read_p999_us\":{r999:.1},\"write_iops\":{:.0},\"write_p50_us\":{w50:.1},\"write_p99_us\":{w99:.1},\"write_p999_us\":{w999:.1}}}",
            args.op,
            args.pattern,
            spec.size,
            spec.queues,
            spec.depth,
            report.elapsed.as_secs_f64(),
            report.ops,
            report.iops(),
            report.mbps(),
            report.read_iops(),
            report.write_iops(),
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
        assert!(parse(&["--write-size", "64k"]).is_err());
        assert!(parse(&["--op", "mixed", "--write-size", "1000"]).is_err());
        let s = parse(&["--op", "mixed", "--write-size", "64k"]).unwrap();
        assert_eq!((s.size, s.op), (4096, Op::Mixed { write_size: 65536 }));
        let s = parse(&["--op", "mixed", "--size", "8k"]).unwrap();
        assert_eq!(s.op, Op::Mixed { write_size: 8192 });
        assert!(parse(&["--queues", "0"]).is_err());
        assert!(parse(&["--mem", "100"]).is_err());
        assert!(parse(&["--poll-us", "1001"]).is_err());
        assert_eq!(parse(&[]).unwrap().poll, Duration::ZERO);
        let s = parse(&["--poll-us", "10"]).unwrap();
        assert_eq!(s.poll, Duration::from_micros(10));
        let s = parse(&["--size", "64k", "--mem", "256m", "--requests", "10"]).unwrap();
        assert_eq!(
            (s.size, s.mem_size, s.max_requests),
            (65536, Some(256 << 20), Some(10))
        );
    }
}
