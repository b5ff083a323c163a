//! Connecting to a vhost-user backend as its frontend: negotiation, the
//! memory table, and the rings.
//!
//! The sequence, in QEMU's order for a vhost-user-blk device:
//!
//! ```text
//! SET_OWNER
//! GET_FEATURES
//! GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES  (CONFIG | MQ | REPLY_ACK | BACKEND_REQ, as offered)
//! SET_BACKEND_REQ_FD                             (with BACKEND_REQ)
//! SET_FEATURES
//! GET_QUEUE_NUM                                  (with MQ)
//! GET_CONFIG                                     (with CONFIG)
//! SET_MEM_TABLE                                  (one memfd region at guest-physical 0)
//! per queue: SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE 0,
//!            SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE 1
//! ```
//!
//! `resume` repeats it on a new connection after a backend died, with the
//! same memory and rings, each ring's base at its used index, as a VMM
//! does after a backend restart.
//!
//! With REPLY_ACK, every message that has no reply of its own carries
//! NEED_REPLY, so a backend that rejects one (a memory table it cannot map,
//! a ring outside it) fails here, by name, rather than silently later.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::virtqueue::{Layout, VirtQueue};

const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Bytes of config space read at connection: the virtio-blk fields up to
/// `write_zeroes_may_unmap` and its padding, which every backend serves.
pub const CONFIG_LEN: u32 = 60;

/// How long a synchronous request may take before the backend counts as hung.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("cannot connect to {0:?}")]
    Connect(PathBuf, #[source] vhost::Error),
    #[error("{0} failed")]
    Request(&'static str, #[source] vhost::Error),
    #[error("the backend does not offer {0}")]
    Missing(&'static str),
    #[error("the backend serves {offered} queues, {wanted} were asked for")]
    Queues { offered: u64, wanted: usize },
    #[error("queue size {0} is not a power of two from 1 to 32768")]
    QueueSize(u16),
    #[error("cannot create the guest memory")]
    Memory(#[source] std::io::Error),
    #[error("cannot create a queue's eventfds")]
    EventFd(#[source] std::io::Error),
    #[error("the backend accepted the connection and did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("cannot duplicate the socket")]
    Dup(#[source] std::io::Error),
    #[error("cannot start the thread that limits a request's wait")]
    Watch(#[source] std::io::Error),
    #[error("{0} bytes of guest memory are not enough")]
    OutOfMemory(u64),
    #[error("the new backend settled features {now:#x}, the one before {before:#x}")]
    FeaturesChanged { before: u64, now: u64 },
    #[error("the backend request channel")]
    Channel(#[source] std::io::Error),
    #[error("the backend sent request {0} (flags {1:#x}, {2} bytes) on its channel, not CONFIG_CHANGE_MSG")]
    UnexpectedBackendRequest(u32, u32, u32),
}

impl ConnectionError {
    /// Whether trying again may succeed: the socket is not there yet or
    /// the backend dropped the connection before answering (it was still
    /// busy with the previous frontend). Refusals and bad answers are not.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectionError::Connect(..) => true,
            ConnectionError::Request(_, e) => matches!(
                e,
                vhost::Error::VhostUserProtocol(
                    vhost::vhost_user::Error::Disconnected
                        | vhost::vhost_user::Error::PartialMessage
                        | vhost::vhost_user::Error::SocketBroken(_)
                        | vhost::vhost_user::Error::SocketError(_)
                )
            ),
            _ => false,
        }
    }
}

/// Shuts a connection down if it is still armed after `limit`.
pub(crate) struct Watch {
    cancel: mpsc::Sender<()>,
    fired: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Watch {
    pub(crate) fn arm(stream: UnixStream, limit: Duration) -> std::io::Result<Self> {
        let (cancel, cancelled) = mpsc::channel::<()>();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let thread = std::thread::Builder::new()
            .name("answer-watch".into())
            .spawn(move || {
                if let Err(mpsc::RecvTimeoutError::Timeout) = cancelled.recv_timeout(limit) {
                    flag.store(true, Ordering::Release);
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                }
            })?;
        Ok(Watch {
            cancel,
            fired,
            thread,
        })
    }

    /// Stops watching; true if the connection was shut down meanwhile.
    pub(crate) fn disarm(self) -> bool {
        drop(self.cancel);
        let _ = self.thread.join();
        self.fired.load(Ordering::Acquire)
    }
}

/// What to set up.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub mem_size: u64,
    pub num_queues: usize,
    /// The queues the device has without the MQ protocol feature (a
    /// disk's one, a NIC's pair).
    pub queues_without_mq: usize,
    pub queue_size: u16,
    /// Device feature bits (below 24) the driver would like.
    pub device_features: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Guest memory on 2 MiB huge pages.
    pub hugepages: bool,
}

/// A negotiated vhost-user session with its memory and rings. Dropping it
/// closes the socket.
pub struct Connection {
    pub frontend: Frontend,
    pub memory: GuestMemory,
    /// What the backend offered in GET_FEATURES.
    pub offered: u64,
    /// What was acknowledged in SET_FEATURES.
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    /// GET_QUEUE_NUM's answer (`queues_without_mq` without MQ).
    pub max_queues: u64,
    /// The config space read at connection (empty without CONFIG).
    pub config: Vec<u8>,
    pub queues: Vec<VirtQueue>,
    /// Our end of the backend request channel (with BACKEND_REQ).
    channel: Option<UnixStream>,
    /// What was asked for at connection.
    options: Options,
}

fn req<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, ConnectionError> {
    log::trace!("vhost-user {what}");
    r.map_err(|e| ConnectionError::Request(what, e))
}

/// What a handshake settled.
struct Negotiated {
    offered: u64,
    features: u64,
    protocol: VhostUserProtocolFeatures,
    max_queues: u64,
    config: Vec<u8>,
    channel: Option<UnixStream>,
}

impl Connection {
    pub fn connect(socket: &Path, options: Options) -> Result<Self, ConnectionError> {
        let size = options.queue_size;
        if size == 0 || !size.is_power_of_two() {
            return Err(ConnectionError::QueueSize(size));
        }
        Self::with_answer_limit(socket, options.num_queues, |frontend| {
            Self::negotiate(socket, frontend, options)
        })
    }

    /// Connects to `socket` and runs `exchange` on the new frontend; a
    /// backend that accepts the connection and never answers is an error,
    /// not a hang (the vhost crate retries a receive timeout, so the socket
    /// is shut down instead).
    fn with_answer_limit<T>(
        socket: &Path,
        num_queues: usize,
        exchange: impl FnOnce(Frontend) -> Result<T, ConnectionError>,
    ) -> Result<T, ConnectionError> {
        let connect_err = |e: std::io::Error| {
            ConnectionError::Connect(
                socket.to_path_buf(),
                vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(e)),
            )
        };
        let stream = UnixStream::connect(socket).map_err(connect_err)?;
        let watch = Watch::arm(stream.try_clone().map_err(connect_err)?, REQUEST_TIMEOUT)
            .map_err(connect_err)?;
        let result = exchange(Frontend::from_stream(stream, num_queues as u64));
        if watch.disarm() {
            return Err(ConnectionError::NoAnswer(REQUEST_TIMEOUT));
        }
        result
    }

    fn negotiate(
        socket: &Path,
        mut frontend: Frontend,
        options: Options,
    ) -> Result<Self, ConnectionError> {
        let size = options.queue_size;
        let n = Self::handshake(&mut frontend, options)?;
        let mut memory = GuestMemory::new(options.mem_size, options.hugepages)
            .map_err(ConnectionError::Memory)?;
        Self::send_mem_table(&mut frontend, &memory)?;
        let event_idx = n.features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(options.num_queues);
        for index in 0..options.num_queues {
            let base = memory
                .alloc(Layout::total_bytes(size), 4096)
                .ok_or(ConnectionError::OutOfMemory(options.mem_size))?;
            let mut q =
                VirtQueue::new(index, size, base, event_idx).map_err(ConnectionError::EventFd)?;
            Self::start_ring(&mut frontend, &memory, &mut q, 0, n.features)?;
            q.watch_peer(Self::peer(&frontend)?);
            queues.push(q);
        }
        log::debug!(
            "connected to {}: features {:#x}, protocol features {:#x}, {} of {} queues of {size}",
            socket.display(),
            n.features,
            n.protocol.bits(),
            options.num_queues,
            n.max_queues,
        );
        Ok(Connection {
            frontend,
            memory,
            offered: n.offered,
            features: n.features,
            protocol: n.protocol,
            max_queues: n.max_queues,
            config: n.config,
            queues,
            channel: n.channel,
            options,
        })
    }

    /// Features, protocol features, the queue count and the config space.
    fn handshake(frontend: &mut Frontend, options: Options) -> Result<Negotiated, ConnectionError> {
        req("SET_OWNER", frontend.set_owner())?;
        let offered = req("GET_FEATURES", frontend.get_features())?;
        if offered & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(ConnectionError::Missing("VIRTIO_F_VERSION_1"));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & PROTOCOL_FEATURES != 0 {
            let backend = req("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
            protocol = backend
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::BACKEND_REQ);
            req(
                "SET_PROTOCOL_FEATURES",
                frontend.set_protocol_features(protocol),
            )?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        let mut channel = None;
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let (ours, theirs) = UnixStream::pair().map_err(ConnectionError::Channel)?;
            req(
                "SET_BACKEND_REQ_FD",
                frontend.set_backend_request_fd(&theirs),
            )?;
            channel = Some(ours);
        }

        let mut wanted = (1 << VIRTIO_F_VERSION_1) | PROTOCOL_FEATURES | options.device_features;
        if options.event_idx {
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        let features = offered & wanted;
        req("SET_FEATURES", frontend.set_features(features))?;

        let mut max_queues = options.queues_without_mq as u64;
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            max_queues = req("GET_QUEUE_NUM", frontend.get_queue_num())?;
        } else if options.num_queues > options.queues_without_mq {
            return Err(ConnectionError::Missing("the MQ protocol feature"));
        }
        if max_queues < options.num_queues as u64 {
            return Err(ConnectionError::Queues {
                offered: max_queues,
                wanted: options.num_queues,
            });
        }

        let mut config = Vec::new();
        if protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            config = read_config(frontend, CONFIG_LEN)?;
        }
        Ok(Negotiated {
            offered,
            features,
            protocol,
            max_queues,
            config,
            channel,
        })
    }

    fn send_mem_table(
        frontend: &mut Frontend,
        memory: &GuestMemory,
    ) -> Result<(), ConnectionError> {
        let regions: Vec<VhostUserMemoryRegionInfo> = memory
            .mem
            .iter()
            .filter_map(|r| {
                let file = r.file_offset()?;
                Some(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: file.start(),
                    mmap_handle: file.file().as_raw_fd(),
                })
            })
            .collect();
        req("SET_MEM_TABLE", frontend.set_mem_table(&regions))?;
        Ok(())
    }

    /// A duplicate of the frontend's socket, for `VirtQueue::watch_peer`.
    fn peer(frontend: &Frontend) -> Result<OwnedFd, ConnectionError> {
        // SAFETY: the frontend owns this socket descriptor and is alive
        // for the whole borrow, which only lasts for the duplication.
        let socket = unsafe { BorrowedFd::borrow_raw(frontend.as_raw_fd()) };
        socket.try_clone_to_owned().map_err(ConnectionError::Dup)
    }

    /// Hands `q` to the backend, starting at `base` in its available ring.
    fn start_ring(
        frontend: &mut Frontend,
        memory: &GuestMemory,
        q: &mut VirtQueue,
        base: u16,
        features: u64,
    ) -> Result<(), ConnectionError> {
        let (index, size) = (q.index, q.size);
        // The backend translates ring addresses through the regions'
        // userspace_addr (the frontend's own mapping), as with QEMU.
        let host = |gpa: u64| {
            memory
                .mem
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| ConnectionError::OutOfMemory(memory.size))
        };
        let ring = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: host(q.layout.desc)?,
            used_ring_addr: host(q.layout.used)?,
            avail_ring_addr: host(q.layout.avail)?,
            log_addr: None,
        };
        req("SET_VRING_NUM", frontend.set_vring_num(index, size))?;
        req("SET_VRING_ADDR", frontend.set_vring_addr(index, &ring))?;
        req("SET_VRING_BASE", frontend.set_vring_base(index, base))?;
        req("SET_VRING_KICK", frontend.set_vring_kick(index, &q.kick))?;
        req("SET_VRING_CALL", frontend.set_vring_call(index, &q.call))?;
        if features & PROTOCOL_FEATURES != 0 {
            req("SET_VRING_ENABLE", frontend.set_vring_enable(index, true))?;
        }
        Ok(())
    }

    /// Connects to the backend now listening on `socket`, one that took
    /// the place of a backend that died, and hands it this connection's
    /// memory and `queues` (taken from it, with requests in flight), each
    /// starting where its used ring stands, as a VMM does after a backend
    /// restart; then kicks them, so the requests the dead backend did not
    /// complete are served. The new backend must settle the same features.
    pub fn resume(
        &mut self,
        socket: &Path,
        queues: &mut [&mut VirtQueue],
    ) -> Result<(), ConnectionError> {
        let options = self.options;
        let memory = &self.memory;
        let features = self.features;
        let frontend = Self::with_answer_limit(socket, options.num_queues, |mut frontend| {
            let n = Self::handshake(&mut frontend, options)?;
            if n.features != features {
                return Err(ConnectionError::FeaturesChanged {
                    before: features,
                    now: n.features,
                });
            }
            Self::send_mem_table(&mut frontend, memory)?;
            for q in queues.iter_mut() {
                let base = q
                    .used_idx(&memory.mem)
                    .map_err(|_| ConnectionError::OutOfMemory(memory.size))?;
                Self::start_ring(&mut frontend, memory, q, base, features)?;
            }
            Ok((frontend, n.channel))
        })?;
        let (frontend, channel) = frontend;
        self.channel = channel;
        // Only now: a failed attempt must not keep the new connection
        // open through a queue's watch.
        for q in queues.iter_mut() {
            q.watch_peer(Self::peer(&frontend)?);
        }
        self.frontend = frontend;
        // The dead backend may have taken the last kick (see the VMM's
        // `hand_rings`).
        for q in queues.iter() {
            q.kick.write(1).map_err(ConnectionError::EventFd)?;
        }
        Ok(())
    }

    /// Stops ring `index` (GET_VRING_BASE, as QEMU does to stop or migrate
    /// a VM) and returns the base the backend reports: where the ring
    /// starts again.
    pub fn stop_ring(&mut self, index: usize) -> Result<u32, ConnectionError> {
        self.exchange(|frontend| req("GET_VRING_BASE", frontend.get_vring_base(index)))
    }

    /// Gives ring `index` a call eventfd whose count is full, as a
    /// misbehaving frontend might: the backend's next signal fails (EAGAIN,
    /// the eventfd being non-blocking).
    pub fn break_call(&mut self, index: usize) -> Result<(), ConnectionError> {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let call = EventFd::new(EFD_NONBLOCK).map_err(ConnectionError::EventFd)?;
        call.write(u64::MAX - 1).map_err(ConnectionError::EventFd)?;
        self.exchange(|frontend| req("SET_VRING_CALL", frontend.set_vring_call(index, &call)))
    }

    /// Reads `len` bytes of the device's config space from offset 0, now
    /// (`config` holds the copy read at connection).
    pub fn get_config(&mut self, len: u32) -> Result<Vec<u8>, ConnectionError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(ConnectionError::Missing("the CONFIG protocol feature"));
        }
        self.exchange(|frontend| read_config(frontend, len))
    }

    /// Runs requests on the connection with REQUEST_TIMEOUT for them all:
    /// a backend that stops answering is an error (its connection is shut
    /// down), not a test that hangs.
    pub fn exchange<T>(
        &mut self,
        requests: impl FnOnce(&mut Frontend) -> Result<T, ConnectionError>,
    ) -> Result<T, ConnectionError> {
        let socket = UnixStream::from(Self::peer(&self.frontend)?);
        let watch = Watch::arm(socket, REQUEST_TIMEOUT).map_err(ConnectionError::Watch)?;
        let result = requests(&mut self.frontend);
        if watch.disarm() {
            return Err(ConnectionError::NoAnswer(REQUEST_TIMEOUT));
        }
        result
    }

    /// Waits up to `timeout` for the backend to say its configuration
    /// space changed (CONFIG_CHANGE_MSG on the backend request channel),
    /// and acknowledges it if asked to.
    pub fn wait_config_change(&mut self, timeout: Duration) -> Result<(), ConnectionError> {
        const CONFIG_CHANGE_MSG: u32 = 2;
        const NEED_REPLY: u32 = 0x8;
        const REPLY: u32 = 0x4;
        let channel = self
            .channel
            .as_mut()
            .ok_or(ConnectionError::Missing("the BACKEND_REQ protocol feature"))?;
        let io = ConnectionError::Channel;
        channel.set_read_timeout(Some(timeout)).map_err(io)?;
        let mut header = [0u8; 12];
        channel.read_exact(&mut header).map_err(io)?;
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8));
        // Version 1, and a request rather than a reply.
        if request != CONFIG_CHANGE_MSG || size != 0 || flags & 0x3 != 0x1 || flags & REPLY != 0 {
            return Err(ConnectionError::UnexpectedBackendRequest(
                request, flags, size,
            ));
        }
        if flags & NEED_REPLY != 0 {
            let mut reply = Vec::with_capacity(20);
            reply.extend_from_slice(&request.to_le_bytes());
            reply.extend_from_slice(&(0x1 | REPLY).to_le_bytes());
            reply.extend_from_slice(&8u32.to_le_bytes());
            reply.extend_from_slice(&0u64.to_le_bytes());
            channel.write_all(&reply).map_err(io)?;
        }
        Ok(())
    }

    /// Whether feature bit `bit` was acknowledged.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.features & (1 << bit) != 0
    }
}

fn read_config(frontend: &mut Frontend, len: u32) -> Result<Vec<u8>, ConnectionError> {
    let buf = vec![0u8; len as usize];
    // The vhost crate checks that the reply has exactly `len` bytes.
    let (_, reply) = req(
        "GET_CONFIG",
        frontend.get_config(0, len, VhostUserConfigFlags::empty(), &buf),
    )?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    use super::*;

    #[test]
    fn a_backend_that_accepts_and_never_answers_is_an_error() {
        let socket =
            std::env::temp_dir().join(format!("testfront-silent-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind");
        let silent = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            // Holds the connection open without a word until the client
            // gives up and shuts it down.
            let mut byte = [0u8; 64];
            while std::io::Read::read(&mut &stream, &mut byte).is_ok_and(|n| n > 0) {}
        });
        let options = Options {
            mem_size: 1 << 20,
            num_queues: 1,
            queues_without_mq: 1,
            queue_size: 8,
            device_features: 0,
            event_idx: false,
            hugepages: false,
        };
        let started = Instant::now();
        let result = Connection::connect(&socket, options);
        assert!(
            matches!(result, Err(ConnectionError::NoAnswer(_))),
            "{:?}",
            result.err()
        );
        assert!(started.elapsed() < REQUEST_TIMEOUT + Duration::from_secs(5));
        silent.join().expect("the silent backend");
        let _ = std::fs::remove_file(&socket);
    }
}
