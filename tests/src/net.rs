//! Host-side network plumbing for NIC tests. Each test gets its own network
//! namespace, deleted on drop with everything in it, holding its taps and
//! bridges and the host side's address 192.0.2.1/24 (TEST-NET-1): tests
//! running in parallel never share a route, and nothing touches the
//! machine's own interfaces (whose network may well be 192.0.2.0/24 too).
//! Backends that open taps run inside the namespace; vhost-user sockets are
//! files, so the VMM reaches them from outside.
//!
//! Also: a packet capture on an interface of the namespace, and the
//! backends (our vhost-net, DPDK's testpmd) that move the guest's frames.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::vm::Output;

/// The host side's address in every test namespace.
pub const HOST_IP: &str = "192.0.2.1";

/// The `n`th guest's address (n from 1): 192.0.2.(1+n).
pub fn guest_ip(n: u8) -> String {
    format!("192.0.2.{}", 1 + n)
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?} (apt-get install iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A unique name (at most 15 bytes): `prefix` + pid + counter.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("{prefix}{}x{n}", std::process::id() % 100_000);
    assert!(name.len() <= 15, "{name} is too long for an interface");
    name
}

/// A network namespace for one test; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique_name("vmmt");
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`
    /// execs it, so the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// A persistent tap (multi-queue if asked), up, with no address.
    pub fn tap(&self, multi_queue: bool) -> String {
        let name = unique_name("vt");
        let mut args = vec!["tuntap", "add", "dev", &name, "mode", "tap"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.ip(&args);
        self.ip(&["link", "set", &name, "up"]);
        name
    }

    /// A tap with the host address.
    pub fn tap_with_address(&self, multi_queue: bool) -> String {
        let name = self.tap(multi_queue);
        self.add_host_address(&name);
        name
    }

    /// A Linux bridge, up.
    pub fn bridge(&self) -> String {
        let name = unique_name("vb");
        self.ip(&["link", "add", &name, "type", "bridge"]);
        self.ip(&["link", "set", &name, "up"]);
        name
    }

    pub fn enslave(&self, link: &str, bridge: &str) {
        self.ip(&["link", "set", link, "master", bridge]);
    }

    /// Gives `link` the host address and brings it up.
    pub fn add_host_address(&self, link: &str) {
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", link]);
        self.ip(&["link", "set", link, "up"]);
    }

    /// Waits until an interface another program creates (DPDK's net_tap)
    /// exists in the namespace.
    pub fn wait_for_link(&self, name: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let found = Command::new("ip")
                .args(["-n", &self.name, "link", "show", name])
                .output()
                .is_ok_and(|o| o.status.success());
            if found {
                return;
            }
            assert!(Instant::now() < deadline, "interface {name} did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Frames seen on an interface by an AF_PACKET socket, read by a thread
/// (inside the namespace) until the capture is dropped.
pub struct Capture {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
}

impl Capture {
    /// Captures on `ifname` inside `ns`.
    pub fn start(ns: &Netns, ifname: &str) -> Capture {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (ns_name, ifname) = (ns.name.clone(), ifname.to_string());
        let frames = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (frames_t, stop_t) = (frames.clone(), stop.clone());
        std::thread::spawn(move || {
            enter_netns(&ns_name);
            let fd = open_capture(&ifname);
            let _ = ready_tx.send(());
            let mut buf = vec![0u8; 65536];
            while !stop_t.load(Ordering::Relaxed) {
                // SAFETY: `buf` is writable for its length; `fd` is open
                // (owned by this thread).
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    frames_t
                        .lock()
                        .expect("capture lock")
                        .push(buf[..n as usize].to_vec());
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the capture thread did not start");
        Capture { frames, stop }
    }

    /// ICMP echo requests (type 8) from `src` to `dst` seen so far.
    pub fn echo_requests(&self, src: &str, dst: &str) -> usize {
        let (src, dst) = (parse_ipv4(src), parse_ipv4(dst));
        self.frames
            .lock()
            .expect("capture lock")
            .iter()
            .filter(|f| {
                f.len() >= 14 + 20 + 8
                    && f[12..14] == [0x08, 0x00]
                    && f[14 + 9] == 1
                    && f[14 + 12..14 + 16] == src
                    && f[14 + 16..14 + 20] == dst
                    && f.get(14 + usize::from(f[14] & 0xf) * 4) == Some(&8)
            })
            .count()
    }

    /// Frames whose Ethernet source is `mac`.
    pub fn frames_from(&self, mac: [u8; 6]) -> usize {
        self.frames
            .lock()
            .expect("capture lock")
            .iter()
            .filter(|f| f.len() >= 12 && f[6..12] == mac)
            .count()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends one raw Ethernet frame out of `ifname` inside `ns` (towards
/// whatever reads the tap: the backend, then the guest).
pub fn send_frame(ns: &Netns, ifname: &str, frame: &[u8]) {
    let (ns_name, ifname, frame) = (ns.name.clone(), ifname.to_string(), frame.to_vec());
    std::thread::spawn(move || {
        enter_netns(&ns_name);
        let fd = open_capture(&ifname);
        // SAFETY: `frame` is readable for its length; `fd` is an open
        // AF_PACKET socket bound to the interface.
        let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send on {ifname}: {}",
            std::io::Error::last_os_error()
        );
    })
    .join()
    .expect("the sending thread");
}

/// An ARP request for `target` from `sender_ip` at `sender_mac`.
pub fn arp_request(sender_mac: [u8; 6], sender_ip: &str, target: &str) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&parse_ipv4(sender_ip));
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&parse_ipv4(target));
    f.resize(60, 0);
    f
}

impl Capture {
    /// ARP replies (operation 2) sent by `mac` seen so far.
    pub fn arp_replies_from(&self, mac: [u8; 6]) -> usize {
        self.frames
            .lock()
            .expect("capture lock")
            .iter()
            .filter(|f| f.len() >= 42 && f[6..12] == mac && f[12..14] == [0x08, 0x06] && f[21] == 2)
            .count()
    }
}

/// Sends ARP requests for `guest_ip` into `tap` (from the host's address)
/// every 200 ms until the guest whose NIC has `mac` answers one; panics
/// naming `what` after `timeout`.
pub fn expect_arp_reply(
    ns: &Netns,
    tap: &str,
    mac: [u8; 6],
    guest_ip: &str,
    what: &str,
    timeout: Duration,
) {
    let capture = Capture::start(ns, tap);
    let request = arp_request([0x02, 0, 0, 0, 0, 0x09], HOST_IP, guest_ip);
    let deadline = Instant::now() + timeout;
    while capture.arp_replies_from(mac) == 0 {
        assert!(
            Instant::now() < deadline,
            "no ARP reply from the guest {what}"
        );
        send_frame(ns, tap, &request);
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Moves the calling thread into the namespace `name`.
fn enter_netns(name: &str) {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // SAFETY: setns(2) with an open namespace descriptor; it only changes
    // the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// An AF_PACKET socket bound to `ifname` (in the calling thread's
/// namespace) with a 100 ms receive timeout.
fn open_capture(ifname: &str) -> OwnedFd {
    let name = std::ffi::CString::new(ifname).expect("interface name");
    // SAFETY: `name` is a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index != 0, "no interface {ifname}");
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    assert!(
        raw >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and its size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind to {ifname}: {}",
        std::io::Error::last_os_error()
    );
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval, whose size is passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(timeout).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}

fn parse_ipv4(text: &str) -> [u8; 4] {
    let mut out = [0u8; 4];
    let mut parts = text.split('.');
    for byte in &mut out {
        *byte = parts
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad IPv4 address {text}"));
    }
    out
}

/// `52:54:00:..` as the VMM's `mac=` option and the guest print it.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC unique to this test process and `n`.
pub fn test_mac(n: u8) -> [u8; 6] {
    let pid = std::process::id().to_be_bytes();
    [0x52, 0x54, 0x00, pid[2], pid[3], n]
}

impl Backend {
    /// Our vhost-net on `tap` (inside `ns`) with `pairs` queue pairs.
    pub fn vhost_net(ns: &Netns, socket: &Path, tap: &str, pairs: u32) -> Backend {
        let mut cmd = ns.command(crate::backend::workspace_bin("vhost-net", "VHOST_NET_BIN"));
        cmd.arg("--socket")
            .arg(socket)
            .arg("--tap")
            .arg(tap)
            .arg("--num-queues")
            .arg((2 * pairs).to_string());
        Backend::spawn(cmd, socket)
    }
}

/// dpdk-testpmd (inside a namespace) forwarding between a vhost-user port
/// and a net_tap port it creates (`tap`), in io mode. With `client`, DPDK
/// connects to a socket the VMM listens on (client=1) instead of listening
/// itself. Runs without hugepages (`--no-huge -m 1024`), as CI machines
/// have none; SIGTERM on drop.
pub struct Testpmd {
    pub child: Child,
    pub log: Output,
    /// EAL's --file-prefix: its runtime directory is removed on drop.
    prefix: String,
}

impl Testpmd {
    pub fn start(ns: &Netns, socket: &Path, tap: &str, client: bool, queues: u32) -> Testpmd {
        let mut vhost = format!("net_vhost0,iface={},queues={queues}", socket.display());
        if client {
            vhost.push_str(",client=1");
        }
        let prefix = unique_name("vmmtest");
        let mut cmd = ns.command("dpdk-testpmd");
        cmd.args(["--no-pci", "--no-huge", "-m", "1024"])
            .arg(format!("--file-prefix={prefix}"))
            .arg("--vdev")
            .arg(vhost)
            .arg("--vdev")
            .arg(format!("net_tap0,iface={tap}"))
            .args([
                "--",
                "--no-mlockall",
                "--total-num-mbufs=8192",
                "--forward-mode=io",
                "--auto-start",
                // With a stats period testpmd runs until a signal instead
                // of exiting at the end of its (empty) standard input.
                "--stats-period=10",
            ])
            .arg(format!("--rxq={queues}"))
            .arg(format!("--txq={queues}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start dpdk-testpmd (apt-get install dpdk-dev; .ci/run does): {e}")
        });
        let log = Output::capture(child.stdout.take().expect("piped stdout"));
        let _stderr = Output::capture(child.stderr.take().expect("piped stderr"));
        Testpmd { child, log, prefix }
    }

    /// Waits for testpmd's vhost socket to appear (server mode).
    pub fn wait_for_socket(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !socket.exists() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("dpdk-testpmd exited with {status}: {}", self.log.text());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not appear; testpmd output:\n{}",
                socket.display(),
                self.log.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid with a valid signal number.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

/// Fails clearly when dpdk-testpmd is not installed.
pub fn require_testpmd() {
    let found = Command::new("sh")
        .args(["-c", "command -v dpdk-testpmd"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "dpdk-testpmd is not installed (apt-get install dpdk-dev; .ci/run does)"
    );
}
