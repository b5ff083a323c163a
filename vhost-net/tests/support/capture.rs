//! A packet capture (AF_PACKET) on an interface of a test's namespace:
//! what the host received on the tap.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// An AF_PACKET socket bound to one interface.
pub struct Capture {
    fd: OwnedFd,
}

fn check(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(rc)
}

fn open_in_netns(netns: &str, ifname: &str) -> io::Result<OwnedFd> {
    let ns = std::fs::File::open(format!("/var/run/netns/{netns}"))?;
    // SAFETY: setns on this (short-lived) thread only, with an open
    // namespace file; the thread ends right after opening the socket.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    check(rc, "setns")?;
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, libc::c_int::from(all)) };
    let fd = check(fd, "socket")?;
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: `name` is NUL-terminated.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = all;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and the length is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    check(rc, "bind")?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval, which `timeout` is.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    check(rc, "SO_RCVTIMEO")?;
    // Room for bursts of hundreds of frames (the default holds about 150
    // small ones); FORCE passes the system's limit (the tests run as root).
    let room: libc::c_int = 16 << 20;
    // SAFETY: SO_RCVBUFFORCE takes an int, which `room` is.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&room as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, "SO_RCVBUFFORCE")?;
    Ok(fd)
}

impl Capture {
    /// Starts capturing on `ifname` in namespace `netns`.
    pub fn start(netns: &str, ifname: &str) -> Capture {
        let (ns, name) = (netns.to_string(), ifname.to_string());
        let fd = std::thread::spawn(move || open_in_netns(&ns, &name))
            .join()
            .expect("capture thread")
            .unwrap_or_else(|e| panic!("cannot capture on {ifname} in {netns}: {e}"));
        Capture { fd }
    }

    /// Waits up to `timeout` for a frame that `wanted` accepts.
    pub fn wait_for(&self, timeout: Duration, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < deadline {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if let Ok(n) = usize::try_from(n) {
                if wanted(&buf[..n]) {
                    return Some(buf[..n].to_vec());
                }
            }
        }
        None
    }
}
