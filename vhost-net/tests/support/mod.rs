//! What the vhost-net tests share: a network namespace per test (so taps
//! with the same address never share a route, and the machine's own
//! interfaces are left alone), the backend process, killed on drop, and
//! the frames the tests exchange with the host.

pub mod capture;
pub mod frames;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The host side of every test's tap, in the test's namespace.
pub const HOST_IP: [u8; 4] = [192, 0, 2, 1];
/// The made-up guest the tests play.
pub const GUEST_IP: [u8; 4] = [192, 0, 2, 2];
pub const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The binary under test.
pub fn vhost_net_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhost-net")
}

/// A name unique to this process and call, at most 15 bytes.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}{n}", std::process::id());
    assert!(name.len() <= 15, "{name} is too long for an interface");
    name
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} (apt-get install iproute2): {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted on drop (with the taps left in it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        assert!(
            Path::new("/dev/net/tun").exists(),
            "/dev/net/tun is missing: the tests need tap devices (and root)"
        );
        let name = unique_name("vnt");
        run("ip", &["netns", "add", &name]);
        Netns { name }
    }

    /// Runs `cmd args` inside the namespace.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, cmd];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Gives `tap` (made by the backend) the host address 192.0.2.1/24,
    /// without IPv6 (so the host sends no solicitations), and brings it up.
    pub fn configure_tap(&self, tap: &str) {
        let sysctl = format!("net.ipv6.conf.{tap}.disable_ipv6=1");
        self.exec("sysctl", &["-q", "-w", &sysctl]);
        self.exec("ip", &["addr", "add", "192.0.2.1/24", "dev", tap]);
        self.exec("ip", &["link", "set", tap, "up"]);
    }

    /// A counter of `tap` in /sys/class/net/TAP/statistics.
    pub fn tap_stat(&self, tap: &str, stat: &str) -> u64 {
        let path = format!("/sys/class/net/{tap}/statistics/{stat}");
        let out = self.exec("cat", &[&path]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// How many queues are attached to `tap`: the kernel keeps one
    /// /sys/class/net/TAP/queues/tx-N per attached queue.
    pub fn tap_queues(&self, tap: &str) -> usize {
        let path = format!("/sys/class/net/{tap}/queues");
        let out = self.exec("ls", &[&path]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|q| q.starts_with("tx-"))
            .count()
    }

    /// The tap's flags (/sys/class/net/TAP/tun_flags: IFF_*).
    pub fn tun_flags(&self, tap: &str) -> u32 {
        let path = format!("/sys/class/net/{tap}/tun_flags");
        let out = self.exec("cat", &[&path]);
        let text = String::from_utf8_lossy(&out.stdout);
        u32::from_str_radix(text.trim().trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("{path}: {text:?}: {e}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A vhost-net process in a namespace, killed on drop.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
    pub tap: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Backend {
    /// Starts vhost-net on a new tap in `ns` with `extra` arguments, waits
    /// for its socket, and configures the tap's host side.
    pub fn start(ns: &Netns, extra: &[&str]) -> Backend {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("net.sock");
        let log = dir.path().join("backend.log");
        let tap = unique_name("vnt");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, vhost_net_bin()])
            .arg("--socket")
            .arg(&socket)
            .args(["--tap", &tap])
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("backend log"));
        let mut child = cmd.spawn().expect("start vhost-net");
        let deadline = Instant::now() + TIMEOUT;
        while !socket.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "vhost-net exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ns.configure_tap(&tap);
        Backend {
            child,
            socket,
            tap,
            log,
            _dir: dir,
        }
    }

    /// What the backend logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("vhost-net exited with {status}:\n{}", self.log());
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid with a valid signal.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
