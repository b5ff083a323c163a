//! A network load generator over the test frontend: it plays the guest of
//! a vhost-user-net backend (ours, DPDK's vhost PMD, ...) whose other side
//! is a tap, and counts frames in one direction.
//!
//! - `Tx`: the frontend keeps its tx ring full of frames; what counts is
//!   what reached the host, the tap's `rx_packets` counter (a backend that
//!   consumes frames and drops them gets no credit).
//! - `Rx`: a thread injects frames into the tap with an AF_PACKET socket as
//!   fast as it can; what counts is what arrived in the frontend's rx ring.
//!
//! Frames are addressed from 02:00:00:00:00:01 to 02:00:00:00:00:02 with
//! the local experimental EtherType 0x88B5, so the host stack drops them
//! early and nothing leaves the tap.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::connection::{Connection, ConnectionError, Options};
use crate::net::HDR_LEN;
use crate::virtqueue::{Buf, RingError, Used};

#[derive(Debug, thiserror::Error)]
pub enum NetLoadError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("frame size {0}: expected 60 to 1514 bytes")]
    FrameSize(usize),
    #[error("{0}")]
    Host(String),
    #[error("the backend completed no frame for {0:?}")]
    Stalled(Duration),
}

/// How long the backend may leave every frame offered to it in flight.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const DST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const SRC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Each rx buffer: header and the largest plain Ethernet frame, rounded.
const RX_BUFFER: u32 = 2048;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Frontend to host.
    Tx,
    /// Host to frontend.
    Rx,
}

#[derive(Clone, Debug)]
pub struct NetLoad {
    pub direction: Direction,
    /// Ethernet frame size without the virtio-net header (60 to 1514).
    pub frame_size: usize,
    pub duration: Duration,
    pub queue_size: u16,
    /// The tap on the backend's host side (in this process's namespace).
    pub iface: String,
}

#[derive(Clone, Debug, Default)]
pub struct NetReport {
    /// Frames counted at the receiving end.
    pub frames: u64,
    /// Frames the sending end handed over (tx: completed by the backend;
    /// rx: sent into the tap while the ring was watched, those the tap's
    /// full queue dropped included).
    pub offered: u64,
    pub seconds: f64,
}

impl NetReport {
    pub fn pps(&self) -> f64 {
        self.frames as f64 / self.seconds
    }

    /// Ethernet frame bits per second, in Gbit/s.
    pub fn gbps(&self, frame_size: usize) -> f64 {
        self.pps() * frame_size as f64 * 8.0 / 1e9
    }
}

/// The test frame of `size` bytes.
pub fn frame(size: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(size);
    f.extend_from_slice(&DST);
    f.extend_from_slice(&SRC);
    f.extend_from_slice(&ETHERTYPE);
    while f.len() < size {
        f.push(f.len() as u8);
    }
    f
}

/// A counter of /sys/class/net/IFACE/statistics.
fn iface_counter(iface: &str, counter: &str) -> Result<u64, NetLoadError> {
    let path = format!("/sys/class/net/{iface}/statistics/{counter}");
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| NetLoadError::Host(format!("cannot read {path}")))
}

/// Runs the load against the backend at `socket` (one queue pair).
pub fn run(socket: &Path, load: &NetLoad) -> Result<NetReport, NetLoadError> {
    if !(60..=1514).contains(&load.frame_size) {
        return Err(NetLoadError::FrameSize(load.frame_size));
    }
    let slots = u64::from(load.queue_size);
    let mut conn = Connection::connect(
        socket,
        Options {
            mem_size: 2 * slots * u64::from(RX_BUFFER) + (4 << 20),
            num_queues: 2,
            queues_without_mq: 2,
            queue_size: load.queue_size,
            device_features: 0,
            event_idx: true,
            hugepages: false,
        },
    )?;
    match load.direction {
        Direction::Tx => run_tx(&mut conn, load),
        Direction::Rx => run_rx(&mut conn, load),
    }
}

fn oom() -> NetLoadError {
    NetLoadError::Host("out of guest memory".into())
}

/// Keeps the tx ring full; counts what the tap delivered to the host.
fn run_tx(conn: &mut Connection, load: &NetLoad) -> Result<NetReport, NetLoadError> {
    let frame = frame(load.frame_size);
    let len = (HDR_LEN + frame.len()) as u32;
    let mut bufs = Vec::new();
    for _ in 0..load.queue_size {
        let addr = conn.memory.alloc(u64::from(len), 64).ok_or_else(oom)?;
        // The buffer lies in guest memory: header (zero) then the frame.
        let _ = conn
            .memory
            .mem
            .write_slice(&[0u8; HDR_LEN], GuestAddress(addr));
        let _ = conn
            .memory
            .mem
            .write_slice(&frame, GuestAddress(addr + HDR_LEN as u64));
        bufs.push(addr);
    }
    let before = iface_counter(&load.iface, "rx_packets")?;
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut free = bufs;
    let mut in_flight = std::collections::HashMap::new();
    let mut completed = 0u64;
    let mut used: Vec<Used> = Vec::new();
    let mut last_completion = Instant::now();
    let tx = 1;
    while Instant::now() < deadline {
        let mem = &conn.memory.mem;
        let vq = &mut conn.queues[tx];
        let mut added = 0u16;
        while let Some(addr) = free.pop() {
            match vq.add(
                mem,
                &[Buf {
                    addr,
                    len,
                    write: false,
                }],
            )? {
                Some(head) => {
                    in_flight.insert(head, addr);
                    added += 1;
                }
                None => {
                    free.push(addr);
                    break;
                }
            }
        }
        if added > 0 {
            vq.kick(mem, added)?;
        }
        used.clear();
        vq.reap(mem, &mut used)?;
        for u in &used {
            if let Some(addr) = in_flight.remove(&u.head) {
                free.push(addr);
                completed += 1;
            }
        }
        if !used.is_empty() {
            last_completion = Instant::now();
        } else if added == 0 {
            if last_completion.elapsed() >= STALL_TIMEOUT {
                return Err(NetLoadError::Stalled(STALL_TIMEOUT));
            }
            vq.wait(Duration::from_millis(1))?;
        }
    }
    // The frames still on the ring are counted too, and the time they
    // take: the tap's count then covers the same frames.
    let drain_deadline = Instant::now() + STALL_TIMEOUT;
    while !in_flight.is_empty() && Instant::now() < drain_deadline {
        let mem = &conn.memory.mem;
        let vq = &mut conn.queues[tx];
        used.clear();
        vq.reap(mem, &mut used)?;
        for u in &used {
            if in_flight.remove(&u.head).is_some() {
                completed += 1;
            }
        }
        if used.is_empty() {
            vq.wait(Duration::from_millis(1))?;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    // Frames the backend wrote may still be on their way through the tap.
    std::thread::sleep(Duration::from_millis(100));
    let after = iface_counter(&load.iface, "rx_packets")?;
    Ok(NetReport {
        frames: after.saturating_sub(before),
        offered: completed,
        seconds,
    })
}

/// Injects frames into the tap from a thread; counts those that arrive in
/// the rx ring.
fn run_rx(conn: &mut Connection, load: &NetLoad) -> Result<NetReport, NetLoadError> {
    let rx = 0;
    let mut posted = std::collections::HashMap::new();
    {
        let mut added = 0u16;
        for _ in 0..load.queue_size {
            let addr = conn
                .memory
                .alloc(u64::from(RX_BUFFER), 64)
                .ok_or_else(oom)?;
            let mem = &conn.memory.mem;
            let vq = &mut conn.queues[rx];
            match vq.add(
                mem,
                &[Buf {
                    addr,
                    len: RX_BUFFER,
                    write: true,
                }],
            )? {
                Some(head) => {
                    posted.insert(head, addr);
                    added += 1;
                }
                None => break,
            }
        }
        conn.queues[rx].kick(&conn.memory.mem, added)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let injected = Arc::new(AtomicU64::new(0));
    let injector = {
        let socket = packet_socket(&load.iface)?;
        let frame = frame(load.frame_size);
        let (stop, injected) = (stop.clone(), injected.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: `frame` is readable for its length; the socket is
                // open for the thread's life.
                let n = unsafe {
                    libc::send(
                        socket.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n > 0 {
                    injected.fetch_add(1, Ordering::Relaxed);
                } else {
                    std::thread::yield_now();
                }
            }
        })
    };
    let start = Instant::now();
    let injected_before = injected.load(Ordering::Relaxed);
    let deadline = start + load.duration;
    let mut frames = 0u64;
    let mut used: Vec<Used> = Vec::new();
    let mut result: Result<(), NetLoadError> = Ok(());
    'run: while Instant::now() < deadline {
        let mem = &conn.memory.mem;
        let vq = &mut conn.queues[rx];
        used.clear();
        if let Err(e) = vq.reap(mem, &mut used) {
            result = Err(e.into());
            break;
        }
        let mut added = 0u16;
        for u in &used {
            let Some(addr) = posted.remove(&u.head) else {
                continue;
            };
            // A frame of ours, whole: the right length and EtherType. The
            // EtherType is cleared before the buffer goes back, so a
            // buffer returned empty next time does not count again.
            let mut ethertype = [0u8; 2];
            let at = GuestAddress(addr + HDR_LEN as u64 + 12);
            let whole = usize::try_from(u.len).ok() == Some(HDR_LEN + load.frame_size);
            if whole && mem.read_slice(&mut ethertype, at).is_ok() && ethertype == ETHERTYPE {
                frames += 1;
            }
            let _ = mem.write_slice(&[0u8; 2], at);
            match vq.add(
                mem,
                &[Buf {
                    addr,
                    len: RX_BUFFER,
                    write: true,
                }],
            ) {
                Ok(Some(head)) => {
                    posted.insert(head, addr);
                    added += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    result = Err(e.into());
                    break 'run;
                }
            }
        }
        if added > 0 {
            if let Err(e) = vq.kick(mem, added) {
                result = Err(e.into());
                break;
            }
        }
        if used.is_empty() {
            // A backend that hung up ends the run with an error, not a
            // low figure.
            if let Err(e) = vq.wait(Duration::from_millis(1)) {
                result = Err(e.into());
                break;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    // Only what was injected while the ring was watched.
    let offered = injected.load(Ordering::Relaxed) - injected_before;
    stop.store(true, Ordering::Relaxed);
    let _ = injector.join();
    result?;
    Ok(NetReport {
        frames,
        offered,
        seconds,
    })
}

/// An AF_PACKET socket that sends on `iface`.
fn packet_socket(iface: &str) -> Result<OwnedFd, NetLoadError> {
    let io = |what: &str| {
        NetLoadError::Host(format!(
            "{what} on {iface}: {}",
            std::io::Error::last_os_error()
        ))
    };
    let name = std::ffi::CString::new(iface).map_err(|_| io("bad interface name"))?;
    // SAFETY: `name` is a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io("no such interface"));
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if raw < 0 {
        return Err(io("AF_PACKET socket"));
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is a valid starting value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and its size is passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(io("bind"));
    }
    Ok(fd)
}
