//! The generic vhost-user frontend device, built on the `vhost` crate's
//! `Frontend`. Device types differ only in their feature mask and where
//! their configuration space comes from (see `blk`).

use std::fs::File;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::backend_channel::{BackendChannel, NotifierSlot, Stop};
use super::deadline::{self, exchange, Budget, ExchangeError, Secs, REPLY_TIMEOUT};
use super::raw_request;
use crate::guest_warnings::GuestWarnings;
use crate::virtio::device::{
    ActivateError, ActiveQueue, ConfigNotifier, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::vstate::memory::GuestMemory;

/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never shown to the guest.
const PROTOCOL_FEATURES_BIT: u64 = 1 << 30;
const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
/// Transport features the guest may negotiate with the backend.
pub const TRANSPORT_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX;
/// Config accesses are "frontend" accesses (flags 0, as QEMU sends them),
/// at most this large in one GET_CONFIG (the vhost-user limit).
const MAX_CONFIG_ACCESS: usize = 256;
/// x86-64's page size, the unit of mmap's offsets.
const PAGE_SIZE: u64 = 4096;

/// What a backend's GET_QUEUE_NUM answer counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueNum {
    /// Queues (a disk).
    Queues,
    /// Queue pairs, as QEMU reads it for a NIC (one RX and one TX ring
    /// each). DPDK answers its pair limit.
    Pairs,
}

impl QueueNum {
    /// How many rings one counted unit is.
    fn rings(self) -> usize {
        match self {
            QueueNum::Queues => 1,
            QueueNum::Pairs => 2,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            QueueNum::Queues => "queues",
            QueueNum::Pairs => "queue pairs",
        }
    }
}

#[derive(Debug, Error)]
pub enum FrontendError {
    #[error("cannot connect to the vhost-user backend at {0:?}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("the vhost-user backend at {path:?}")]
    Exchange {
        path: PathBuf,
        #[source]
        source: ExchangeError,
    },
    #[error("the vhost-user backend at {path:?} took the whole {} a handshake may take", Secs(*limit))]
    SlowHandshake {
        path: PathBuf,
        limit: Duration,
        #[source]
        source: ExchangeError,
    },
    #[error("cannot create an eventfd for the device at {0:?}")]
    EventFd(PathBuf, #[source] std::io::Error),
    #[error("cannot open a request channel for the vhost-user backend at {0:?}")]
    Channel(PathBuf, #[source] vhost::Error),
    #[error("the vhost-user backend at {0:?} does not offer {1}")]
    Missing(PathBuf, &'static str),
    #[error("the vhost-user backend at {path:?} offers {offered} {unit}, {wanted} were asked for")]
    TooManyQueues {
        path: PathBuf,
        offered: u64,
        wanted: usize,
        unit: &'static str,
    },
}

impl FrontendError {
    /// Whether the peer broke the exchange (hung up, garbled it, went
    /// silent) rather than answered in good form what it cannot do: a
    /// listening VMM may get its real backend on the next connection.
    pub fn peer_failed(&self) -> bool {
        match self {
            FrontendError::Exchange { source, .. }
            | FrontendError::SlowHandshake { source, .. } => !source.refused(),
            _ => false,
        }
    }
}

/// What a device type asks of the generic frontend.
#[derive(Clone)]
pub struct DeviceSpec {
    pub name: String,
    pub device_type: u16,
    /// Device-specific feature bits (0..23) the VMM lets through.
    pub device_features: u64,
    pub num_queues: usize,
    pub queue_size: u16,
    /// Offset of a u16 queue-count field in the config space that the VMM
    /// answers itself: the backend may serve more queues than this device
    /// exposes (virtio-blk `num_queues`).
    pub queue_count_field: Option<u64>,
    /// Offset of a u32 segments-per-request field the VMM caps at the ring
    /// size less two (virtio-blk `seg_max`): the backend's figure is for
    /// its own ring size, and a driver without indirect descriptors puts a
    /// whole request (header and status too) in the ring.
    pub seg_max_field: Option<u64>,
    /// The backend serves the configuration space (GET_CONFIG); otherwise
    /// the device type answers it in the VMM (network backends such as
    /// DPDK's do not implement GET_CONFIG).
    pub config_from_backend: bool,
    /// How many queues a backend without the MQ protocol feature serves
    /// (1 for a disk, 2 for a NIC: one RX and one TX).
    pub queues_without_mq: usize,
    /// What the backend's GET_QUEUE_NUM answer counts.
    pub queue_num: QueueNum,
    /// Size of the configuration structure a backend serves (at most 256).
    /// Reads past it read as all ones, as in QEMU, without asking the
    /// backend: qemu-storage-daemon refuses a GET_CONFIG past its struct.
    pub config_size: usize,
    /// The configuration-space fields a driver may write, forwarded with
    /// SET_CONFIG (virtio-blk's `writeback`). Writes anywhere else are
    /// dropped: backends refuse them.
    pub writable_config: &'static [Range<u64>],
    /// Asks a backend that offers it (INFLIGHT_SHMFD) for a region where it
    /// records the requests it has taken and not completed, and hands the
    /// same region to the backend that takes over after it dies (see
    /// `InflightRegion`). Disks only, as in QEMU: a NIC may drop packets.
    pub track_inflight: bool,
}

/// Negotiates with a device's next backend, away from the device itself,
/// so a backend that is slow to answer holds no lock the guest needs.
pub struct Handshake {
    spec: DeviceSpec,
    socket: PathBuf,
    notifier: NotifierSlot,
}

/// A backend connection that went through the handshake.
pub struct NewBackend {
    frontend: Frontend,
    features: u64,
    channel: Option<BackendChannel>,
    /// It took INFLIGHT_SHMFD.
    tracks_inflight: bool,
}

/// What the handshake settled.
struct Negotiated {
    features: u64,
    channel: Option<BackendChannel>,
    tracks_inflight: bool,
}

/// The shared memory (a file the backend made, GET_INFLIGHT_FD) where a
/// backend records each request it takes from a ring until it completes
/// it, in the layout the vhost-user spec gives. The VMM keeps the file
/// from the device's first start after a reset to the next reset, and
/// hands it (SET_INFLIGHT_FD) to each backend that takes the rings over:
/// a backend that restarts after a crash serves again exactly the
/// requests its predecessor had taken and not completed, even if it had
/// completed later ones first. The VMM never maps it.
struct InflightRegion {
    /// As sent with SET_INFLIGHT_FD.
    info: VhostUserInflight,
    file: File,
}

impl InflightRegion {
    /// The region a backend answered `asked` with, if it is one the next
    /// backend can map as told without faulting: in a memfd (as
    /// libvhost-user, DPDK and SPDK make it; its size is then known
    /// without asking another process, as a FUSE file's would be), within
    /// the file, and large enough for the rings `asked` names (the spec's
    /// split-ring layout: a 16-byte header and 16 bytes a descriptor per
    /// queue, each queue's part 64-byte aligned), at an offset mmap takes.
    fn check(asked: VhostUserInflight, size: u64, offset: u64, file: File) -> Result<Self, String> {
        // SAFETY: F_GET_SEALS on a descriptor we own reads its seals and
        // changes nothing.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) } < 0 {
            return Err("its in-flight region is not in a memfd".into());
        }
        let file_len = file
            .metadata()
            .map_err(|e| format!("cannot look at its in-flight region's memfd: {e}"))?
            .len();
        // mmap takes offsets in whole pages: a backend handed another
        // could not map the region at all.
        if offset % PAGE_SIZE != 0 {
            return Err(format!(
                "its in-flight region's offset {offset} is not a multiple of the page size"
            ));
        }
        let per_queue = (16 + 16 * u64::from(asked.queue_size)).next_multiple_of(64);
        let needed = per_queue * u64::from(asked.num_queues);
        let end = offset.checked_add(size);
        if size < needed || end.is_none_or(|end| end > file_len) {
            return Err(format!(
                "its in-flight region ({size} bytes at offset {offset}) is not within its memfd \
                 of {file_len} bytes or is smaller than the {needed} bytes {} queues of {} need",
                asked.num_queues, asked.queue_size
            ));
        }
        Ok(InflightRegion {
            info: VhostUserInflight {
                mmap_size: size,
                mmap_offset: offset,
                ..asked
            },
            file,
        })
    }
}

impl Handshake {
    pub fn run(&self, stream: UnixStream) -> Result<NewBackend, String> {
        let mut frontend = Frontend::from_stream(stream, self.spec.num_queues as u64);
        let Negotiated {
            features,
            channel,
            tracks_inflight,
        } = VhostUserDevice::negotiate(&self.spec, &mut frontend, &self.socket, &self.notifier)
            .map_err(|e| vmm_common::error_chain::render(&e))?;
        Ok(NewBackend {
            frontend,
            features,
            channel,
            tracks_inflight,
        })
    }
}

/// Called when a device's backend connection changes (hang-up).
pub type StatusListener = Box<dyn Fn(&DeviceStatus) + Send>;

/// What the control API reports about a vhost-user device; shared with
/// the connection watcher.
pub struct DeviceStatus {
    pub name: String,
    pub socket: PathBuf,
    pub device_type: u16,
    /// What the backend connected now offered (GET_FEATURES).
    pub backend_features: AtomicU64,
    /// Negotiated at the last activation (0 before the driver starts it).
    pub acked_features: AtomicU64,
    pub queues: usize,
    /// Set when the backend hung up or failed: the device stops.
    pub broken: Arc<AtomicBool>,
    /// Set when the backend's connection closed (not when a backend that
    /// is still connected failed a request): a new backend may take over.
    hung_up: Mutex<bool>,
    /// Told when `hung_up` is set.
    hang_up_seen: Condvar,
    listeners: Mutex<Vec<StatusListener>>,
}

impl DeviceStatus {
    pub fn connected(&self) -> bool {
        !self.broken.load(Ordering::Acquire)
    }

    /// Whether the backend's connection has closed since it last connected.
    #[cfg(test)]
    fn hung_up(&self) -> bool {
        *crate::bus::lock(&self.hung_up)
    }

    /// Sleeps until the backend's connection has closed.
    pub fn wait_hung_up(&self) {
        let hung_up = crate::bus::lock(&self.hung_up);
        let _gone = self
            .hang_up_seen
            .wait_while(hung_up, |hung_up| !*hung_up)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }

    /// `wait_hung_up`, for at most `limit`; whether the connection closed.
    fn wait_hung_up_for(&self, limit: Duration) -> bool {
        let hung_up = crate::bus::lock(&self.hung_up);
        let (gone, _) = self
            .hang_up_seen
            .wait_timeout_while(hung_up, limit, |hung_up| !*hung_up)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *gone
    }

    fn set_hung_up(&self, hung_up: bool) {
        *crate::bus::lock(&self.hung_up) = hung_up;
        if hung_up {
            self.hang_up_seen.notify_all();
        }
    }

    /// Adds a function told about connection changes.
    pub fn on_change(&self, listener: StatusListener) {
        crate::bus::lock(&self.listeners).push(listener);
    }

    fn changed(&self) {
        for listener in crate::bus::lock(&self.listeners).iter() {
            listener(self);
        }
    }
}

/// Why handing the rings to a backend stopped halfway.
#[derive(Debug, thiserror::Error)]
enum Handover {
    /// The connection broke or the backend stopped answering: it was cut
    /// off, and the next backend gets the rings as after a crash.
    #[error("{0}")]
    Lost(ActivateError),
    /// The backend refused a step, the vhost crate turned a request down,
    /// or the rings cannot be handed to any backend (an address outside
    /// guest memory): a device starting fails (the driver sees
    /// NEEDS_RESET); a reconnecting backend is left cut off or idle.
    #[error("{0}")]
    Refused(ActivateError),
}

/// What the last activation handed the backend, kept to hand it again to a
/// backend that reconnects while the driver runs.
struct Activation {
    mem: GuestMemory,
    features: u64,
    queues: Vec<SavedQueue>,
    /// A backend has had a ring of it running (was sent its kick): the
    /// guest's used rings say where the next one starts. Until then it
    /// starts at 0, whatever the used rings' memory holds.
    rings_sent: bool,
}

struct SavedQueue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: Option<EventFd>,
}

pub struct VhostUserDevice {
    spec: DeviceSpec,
    /// The connection; replaced when a backend reconnects (shared with the
    /// control queue's `RingSwitch`).
    frontend: Arc<Mutex<Frontend>>,
    /// Whether each ring is enabled, as last set.
    ring_enabled: Arc<Mutex<Vec<bool>>>,
    activation: Option<Activation>,
    backend_features: u64,
    active_queues: Vec<usize>,
    /// Set when the backend hung up or failed: the device stops.
    broken: Arc<AtomicBool>,
    status: Arc<DeviceStatus>,
    /// Given as the call fd of queues the driver left without a vector.
    unused_call: EventFd,
    /// The backend took INFLIGHT_SHMFD (see `InflightRegion`).
    backend_tracks_inflight: bool,
    /// Made by a backend at the device's first start since it was reset.
    inflight: Option<InflightRegion>,
    /// Told when the backend reports a configuration change.
    config_notifier: NotifierSlot,
    /// The backend's configuration space as last read (from offset 0),
    /// served while it is away: a guest that probes the device then (a
    /// reboot during a backend restart) must not read all-ones sizes.
    config_seen: Vec<u8>,
    /// Config accesses the backend refused, for the log's sake.
    config_refusals: GuestWarnings,
    /// What the driver wrote to writable fields since the device was last
    /// reset and the backend took (offset, bytes), latest last: sent again
    /// to a backend that reconnects, which starts from its own defaults (a
    /// disk set to write-through must not come back write-back).
    config_written: Vec<(u32, Vec<u8>)>,
    /// Starts while the backend is away or lost, which a driver resetting
    /// in a loop can repeat, for the log's sake.
    start_warnings: GuestWarnings,
}

impl VhostUserDevice {
    /// Connects to a backend listening on `socket` and negotiates everything
    /// that does not depend on the driver.
    pub fn connect(spec: DeviceSpec, socket: &Path) -> Result<Self, FrontendError> {
        let stream = deadline::dial_at_start(socket, REPLY_TIMEOUT, deadline::start_up_grace())
            .map_err(|e| FrontendError::Connect(socket.to_path_buf(), e))?;
        Self::from_stream(spec, stream, socket)
    }

    /// Negotiates with a backend that connected to our listening socket.
    pub fn from_stream(
        spec: DeviceSpec,
        stream: UnixStream,
        socket: &Path,
    ) -> Result<Self, FrontendError> {
        let frontend = Frontend::from_stream(stream, spec.num_queues as u64);
        Self::set_up(spec, frontend, socket, NotifierSlot::default())
    }

    /// The handshake that does not depend on the driver: owner, features,
    /// protocol features, the backend's request channel, queue count.
    fn negotiate(
        spec: &DeviceSpec,
        frontend: &mut Frontend,
        socket: &Path,
        notifier: &NotifierSlot,
    ) -> Result<Negotiated, FrontendError> {
        let path = socket.to_path_buf();
        let budget = Budget::new(deadline::HANDSHAKE_LIMIT);
        let failed = |source: ExchangeError| {
            let path = path.clone();
            // Once the budget is spent, the next step's limit is 0: the
            // socket may be shut before the step notices its own deadline.
            if budget.spent() {
                FrontendError::SlowHandshake {
                    path,
                    limit: budget.total(),
                    source,
                }
            } else {
                FrontendError::Exchange { path, source }
            }
        };
        let name = spec.name.as_str();
        let limit = || budget.limit(REPLY_TIMEOUT);
        exchange(frontend, name, "SET_OWNER", limit(), |f| f.set_owner()).map_err(failed)?;
        let backend_features = exchange(frontend, name, "GET_FEATURES", limit(), |f| {
            f.get_features()
        })
        .map_err(failed)?;
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FrontendError::Missing(path, "VIRTIO_F_VERSION_1"));
        }
        if backend_features & PROTOCOL_FEATURES_BIT == 0 {
            return Err(FrontendError::Missing(
                path,
                "VHOST_USER_F_PROTOCOL_FEATURES",
            ));
        }
        let offered = exchange(frontend, name, "GET_PROTOCOL_FEATURES", limit(), |f| {
            f.get_protocol_features()
        })
        .map_err(failed)?;
        let mut wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
        if spec.config_from_backend {
            // With the request channel, the backend can say when its
            // configuration changed (a resized disk).
            wanted |= VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ;
        }
        if spec.track_inflight {
            wanted |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        }
        let protocol = offered & wanted;
        exchange(frontend, name, "SET_PROTOCOL_FEATURES", limit(), |f| {
            f.set_protocol_features(protocol)
        })
        .map_err(failed)?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every request then waits for the backend's word: one that
            // cannot map the memory or start a ring says so, and is not
            // taken as serving it.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if spec.config_from_backend && !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(FrontendError::Missing(path, "the CONFIG protocol feature"));
        }
        let mut channel = None;
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            let reply_ack = protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
            let opened = BackendChannel::new(name, notifier.clone(), reply_ack)
                .map_err(|e| FrontendError::Channel(path.clone(), e))?;
            let end = opened.backend_end();
            exchange(frontend, name, "SET_BACKEND_REQ_FD", limit(), |f| {
                f.set_backend_request_fd(&end)
            })
            .map_err(failed)?;
            channel = Some(opened);
        }
        if spec.num_queues > 1 && protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = exchange(frontend, name, "GET_QUEUE_NUM", limit(), |f| {
                raw_request::get_queue_num(f)
            })
            .map_err(failed)?;
            let wanted = spec.num_queues.div_ceil(spec.queue_num.rings());
            if max < wanted as u64 {
                return Err(FrontendError::TooManyQueues {
                    path,
                    offered: max,
                    wanted,
                    unit: spec.queue_num.noun(),
                });
            }
            if max < spec.num_queues as u64 {
                // Backends built on vhost-user-backend (our vhost-net) count
                // rings here: one of those would refuse the rings past its
                // count when the driver starts the device.
                log::warn!(
                    "{name}: the backend at {} answers GET_QUEUE_NUM with {max}: enough {} if it \
                     counts those, as DPDK does, but not {} rings if it counts rings",
                    socket.display(),
                    spec.queue_num.noun(),
                    spec.num_queues
                );
            }
        } else if spec.num_queues > spec.queues_without_mq {
            return Err(FrontendError::Missing(path, "the MQ protocol feature"));
        }
        log::info!(
            "{}: connected to {}, features {backend_features:#x}, protocol {:?}",
            spec.name,
            socket.display(),
            protocol
        );
        Ok(Negotiated {
            features: backend_features,
            channel,
            tracks_inflight: protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD),
        })
    }

    /// The handshake, then the device around the connection.
    fn set_up(
        spec: DeviceSpec,
        mut frontend: Frontend,
        socket: &Path,
        config_notifier: NotifierSlot,
    ) -> Result<Self, FrontendError> {
        let Negotiated {
            features: backend_features,
            channel,
            tracks_inflight,
        } = Self::negotiate(&spec, &mut frontend, socket, &config_notifier)?;
        let broken = Arc::new(AtomicBool::new(false));
        let status = Arc::new(DeviceStatus {
            name: spec.name.clone(),
            socket: socket.to_path_buf(),
            device_type: spec.device_type,
            backend_features: AtomicU64::new(backend_features),
            acked_features: AtomicU64::new(0),
            queues: spec.num_queues,
            broken: broken.clone(),
            hung_up: Mutex::new(false),
            hang_up_seen: Condvar::new(),
            listeners: Mutex::new(Vec::new()),
        });
        // Made before the watcher starts: a failure here drops the
        // connection, whose fd the watcher would go on polling.
        let unused_call = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| FrontendError::EventFd(socket.to_path_buf(), e))?;
        watch_hangup(
            frontend.as_raw_fd(),
            status.clone(),
            channel.as_ref().map(BackendChannel::stopper),
        );
        if let Some(channel) = channel {
            channel.serve();
        }
        let mut device = VhostUserDevice {
            ring_enabled: Arc::new(Mutex::new(vec![false; spec.num_queues])),
            activation: None,
            spec,
            frontend: Arc::new(Mutex::new(frontend)),
            backend_features,
            active_queues: Vec::new(),
            broken,
            status,
            unused_call,
            backend_tracks_inflight: tracks_inflight,
            inflight: None,
            config_notifier,
            config_seen: Vec::new(),
            config_refusals: GuestWarnings::default(),
            config_written: Vec::new(),
            start_warnings: GuestWarnings::default(),
        };
        // A backend lost on its first GET_CONFIG (hung up, silent) fails
        // the start like one lost in the handshake: the guest would read
        // all ones, a 2^64-sector disk with 0xffffffff-byte blocks, until
        // a backend came back. One that refuses it in good form is taken.
        if let Err(source) = device.prime_config(REPLY_TIMEOUT) {
            // The connection is shut down by now: the watcher sees that,
            // stops the request channel and ends before the socket closes
            // with the device (it polls the socket's fd number).
            if !device.status.wait_hung_up_for(Duration::from_secs(1)) {
                log::warn!("{}: the connection's watcher did not end", device.spec.name);
            }
            return Err(FrontendError::Exchange {
                path: socket.to_path_buf(),
                source,
            });
        }
        Ok(device)
    }

    /// A backend that failed a step of handing the rings over. One that
    /// timed out was cut off already; one that refused may have started
    /// rings before that step, over memory the guest now expects no device
    /// to touch, so it is cut off too: it drops every ring, and the device
    /// takes a backend back (the same one, or a restarted one) as after a
    /// crash. Whether that one gets the rings is the `Handover` kind's
    /// business: a lost backend's successor does.
    fn fail(&self, e: ExchangeError) -> Handover {
        cut_off(&self.frontend, &self.broken, &e);
        if e.backend_lost() {
            Handover::Lost(ActivateError(e.to_string()))
        } else {
            Handover::Refused(ActivateError(format!("{e}; the device is stopped")))
        }
    }

    /// `fail`, for an exchange of a run under `budget`: one that ran out
    /// of the run's time says so.
    fn fail_within(&self, e: ExchangeError, budget: &Budget) -> Handover {
        let spent = e.timed_out() && budget.spent();
        match self.fail(e) {
            Handover::Lost(ActivateError(e)) if spent => Handover::Lost(ActivateError(format!(
                "{e}, the end of the {} the whole handover may take",
                Secs(budget.total())
            ))),
            other => other,
        }
    }

    /// What the VMM says in the backend's configuration space: its own
    /// queue count, and a segment limit its rings can hold.
    fn override_config(&self, reply: &mut [u8]) {
        if let Some(field) = self.spec.queue_count_field.map(|f| f as usize) {
            let count = (self.spec.num_queues as u16).to_le_bytes();
            for (i, byte) in count.iter().enumerate() {
                if let Some(slot) = reply.get_mut(field + i) {
                    *slot = *byte;
                }
            }
        }
        if let Some(field) = self.spec.seg_max_field.map(|f| f as usize) {
            if let Some(slot) = reply.get_mut(field..field + 4) {
                let said = u32::from_le_bytes([slot[0], slot[1], slot[2], slot[3]]);
                let room = u32::from(self.spec.queue_size).saturating_sub(2);
                slot.copy_from_slice(&said.min(room).to_le_bytes());
            }
        }
    }

    /// Keeps the backend's latest configuration (overridden) for reads
    /// while it is away.
    fn remember_config(&mut self, reply: Vec<u8>) {
        if reply.len() >= self.config_seen.len() {
            self.config_seen = reply;
        } else {
            self.config_seen[..reply.len()].copy_from_slice(&reply);
        }
    }

    /// Reads the new backend's whole configuration space, so that a driver
    /// that first reads it after the backend is lost again reads it, not
    /// all ones (a disk of 2^64 sectors, of 0xffff queues).
    fn prime_config(&mut self, limit: Duration) -> Result<(), ExchangeError> {
        if !self.spec.config_from_backend {
            return Ok(());
        }
        let size = self.spec.config_size.min(MAX_CONFIG_ACCESS);
        let read = exchange(&mut self.fe(), &self.spec.name, "GET_CONFIG", limit, |f| {
            raw_request::get_config(f, size as u32)
        });
        match read {
            Ok(mut reply) => {
                self.override_config(&mut reply);
                self.remember_config(reply);
                Ok(())
            }
            Err(e) => {
                let what = format!("reading its {size} bytes of config space");
                self.config_failed(&what, &e);
                if self.broken.load(Ordering::Acquire) {
                    return Err(e);
                }
                Ok(())
            }
        }
    }

    /// A config access the backend got wrong. One it refused in good form
    /// leaves the connection as it was; anything else (a malformed reply,
    /// a broken socket) leaves the stream of replies out of step, so the
    /// backend is cut off and the device takes one back as after a crash.
    fn config_failed(&mut self, what: &str, e: &ExchangeError) {
        let name = &self.spec.name;
        if e.refused() {
            // A guest that keeps reading must not flood the log.
            let level = self.config_refusals.level(name);
            log::log!(level, "{name}: {what}: {e}");
        } else {
            log::error!("{name}: {what}: {e}; cutting the backend off");
            cut_off(&self.frontend, &self.broken, e);
        }
    }

    fn host_addr(mem: &GuestMemory, gpa: u64) -> Result<u64, ActivateError> {
        mem.get_host_address(GuestAddress(gpa))
            .map(|ptr| ptr as u64)
            .map_err(|_| ActivateError(format!("ring address {gpa:#x} is outside guest memory")))
    }
}

/// Stops a device whose backend failed an exchange: marks it broken and
/// closes the connection (one that timed out was closed already), so the
/// backend drops every ring and the hang-up watcher hands the device to the
/// next backend.
fn cut_off(frontend: &Mutex<Frontend>, broken: &AtomicBool, e: &ExchangeError) {
    if e.timed_out() {
        broken.store(true, Ordering::Release);
    } else {
        cut_off_now(frontend, broken);
    }
}

/// `cut_off`, for a backend whose exchange went through but whose answer
/// the VMM cannot use.
fn cut_off_now(frontend: &Mutex<Frontend>, broken: &AtomicBool) {
    broken.store(true, Ordering::Release);
    let frontend = crate::bus::lock(frontend);
    // SAFETY: the connection's socket stays open while we hold it.
    unsafe { deadline::cut_off(frontend.as_raw_fd()) };
}

/// Logs once when the backend's socket hangs up, marks the device broken,
/// stops the connection's request channel, tells the status listeners, and
/// then marks the connection hung up (which wakes the reconnect thread).
fn watch_hangup(fd: RawFd, status: Arc<DeviceStatus>, channel: Option<Stop>) {
    let name = status.name.clone();
    // A mark left by an earlier connection that had this fd number.
    deadline::take_cut_off(fd);
    let spawned = std::thread::Builder::new()
        .name(format!("{}-watch", status.name))
        .spawn(move || loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLRDHUP,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid pollfd. The socket stays open while
            // this thread uses it: a device made is never dropped while the
            // VMM runs (a start that fails after this thread started waits
            // for it to end, or ends the VMM), and a connection is replaced
            // (and closed) only after `set_hung_up(true)`, the last thing
            // this thread does.
            let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("{name}: cannot watch the backend's connection any more: {e}");
                return;
            }
            if pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
            {
                status.broken.store(true, Ordering::Release);
                if let Some(channel) = &channel {
                    channel.stop();
                }
                if deadline::take_cut_off(fd) {
                    log::error!(
                        "{name}: cut off from its vhost-user backend; the device is stopped"
                    );
                } else {
                    log::error!(
                        "{name}: the vhost-user backend disconnected; the device is stopped"
                    );
                }
                status.changed();
                // Last: this lets a new backend take over, and the device
                // tells its listeners of that, after this loss.
                status.set_hung_up(true);
                return;
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot watch the backend connection: {e}");
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u16 {
        self.spec.device_type
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    fn features(&self) -> u64 {
        self.backend_features & (self.spec.device_features | TRANSPORT_FEATURES)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.spec.queue_size; self.spec.num_queues]
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if self.broken.load(Ordering::Acquire) {
            let seen = usize::try_from(offset)
                .ok()
                .and_then(|start| self.config_seen.get(start..));
            if let Some(seen) = seen {
                let n = seen.len().min(data.len());
                data[..n].copy_from_slice(&seen[..n]);
            }
            return;
        }
        // Only the part of the access inside the backend's struct is asked
        // for. Backends built on libvhost-user answer GET_CONFIG from
        // offset 0 whatever offset is asked (QEMU only ever asks for offset
        // 0), so read from 0 up to the end of that part and take its tail.
        let size = self.spec.config_size.min(MAX_CONFIG_ACCESS);
        let Some(start) = usize::try_from(offset).ok().filter(|&o| o < size) else {
            return;
        };
        // An access that ends inside a field the VMM overrides reads the
        // whole field, so that the override covers the bytes it returns.
        let end = [
            self.spec.queue_count_field.map(|f| (f as usize, 2)),
            self.spec.seg_max_field.map(|f| (f as usize, 4)),
        ]
        .into_iter()
        .flatten()
        .filter(|&(field, len)| start < field + len && start.saturating_add(data.len()) > field)
        .map(|(field, len)| field + len)
        .fold(start.saturating_add(data.len()), usize::max)
        .min(size);
        let read = exchange(
            &mut self.fe(),
            &self.spec.name,
            "GET_CONFIG",
            REPLY_TIMEOUT,
            |f| raw_request::get_config(f, end as u32),
        );
        let mut reply = match read {
            Ok(reply) => reply,
            Err(e) => {
                self.config_failed(&format!("reading {end} bytes of config space"), &e);
                if self.broken.load(Ordering::Acquire) {
                    // Lost in this very read: what it said last, as below.
                    self.read_config(offset, data);
                }
                return;
            }
        };
        self.override_config(&mut reply);
        // `get_config` checked the reply's size against the request, which
        // may reach past the access (to a field's end).
        if let Some(part) = reply.get(start..) {
            let n = part.len().min(data.len());
            data[..n].copy_from_slice(&part[..n]);
        }
        self.remember_config(reply);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let name = &self.spec.name;
        let end = offset.saturating_add(data.len() as u64);
        let writable = self
            .spec
            .writable_config
            .iter()
            .any(|field| field.start <= offset && end <= field.end);
        if !writable {
            log::debug!(
                "{name}: config write of {} bytes at {offset:#x} dropped: not a writable field",
                data.len()
            );
            return;
        }
        let Ok(at) = u32::try_from(offset) else {
            return;
        };
        if self.broken.load(Ordering::Acquire) {
            // For the next backend.
            self.record_config_write(at, data);
            return;
        }
        let written = exchange(&mut self.fe(), name, "SET_CONFIG", REPLY_TIMEOUT, |f| {
            f.set_config(at, VhostUserConfigFlags::empty(), data)
        });
        match written {
            Ok(()) => self.record_config_write(at, data),
            Err(e) => {
                if !e.refused() {
                    // Lost with the backend, not refused: the next one
                    // gets it.
                    self.record_config_write(at, data);
                }
                self.config_failed(&format!("writing config space at {offset:#x}"), &e);
            }
        }
    }

    fn activate(
        &mut self,
        mem: &GuestMemory,
        driver_features: u64,
        queues: &[ActiveQueue<'_>],
    ) -> Result<(), ActivateError> {
        self.start_rings(mem, driver_features, queues, |_| true)
    }

    fn reset(&mut self) {
        self.config_written.clear();
        self.stop_rings();
        // Every request was completed (or the backend is gone, and the
        // driver gave its requests up): the next start gets a clean region.
        self.inflight = None;
    }

    fn reconnect(&mut self, backend: NewBackend) -> Result<(), String> {
        self.reattach(backend)
    }

    fn set_config_notifier(&mut self, notifier: ConfigNotifier) {
        *crate::bus::lock(&self.config_notifier) = Some(notifier);
    }
}

impl VhostUserDevice {
    pub fn status(&self) -> Arc<DeviceStatus> {
        self.status.clone()
    }

    /// What negotiates with this device's next backend.
    pub fn handshake(&self) -> Handshake {
        Handshake {
            spec: self.spec.clone(),
            socket: self.status.socket.clone(),
            notifier: self.config_notifier.clone(),
        }
    }

    /// A handle that turns rings on and off while the device runs (the
    /// control queue of a multi-queue NIC).
    pub fn ring_switch(&self) -> RingSwitch {
        RingSwitch {
            name: self.spec.name.clone(),
            frontend: self.frontend.clone(),
            enabled: self.ring_enabled.clone(),
            broken: self.broken.clone(),
        }
    }

    /// The current connection (a cheap handle on it).
    fn fe(&self) -> Frontend {
        crate::bus::lock(&self.frontend).clone()
    }

    /// Hands the backend the features, the memory table and every ring; the
    /// rings for which `enabled(index)` is false are set up but left off.
    pub fn start_rings(
        &mut self,
        mem: &GuestMemory,
        driver_features: u64,
        queues: &[ActiveQueue<'_>],
        enabled: impl Fn(u16) -> bool,
    ) -> Result<(), ActivateError> {
        // Refused now even while the backend is away: the next backend
        // would otherwise be left connected with no rings.
        for q in queues {
            for addr in [q.desc, q.avail, q.used] {
                Self::host_addr(mem, addr)?;
            }
        }
        if mem.iter().any(|region| region.file_offset().is_none()) {
            return Err(ActivateError("guest memory is not file-backed".into()));
        }
        let mut saved = Vec::with_capacity(queues.len());
        for q in queues {
            let dup = |fd: &EventFd| {
                fd.try_clone().map_err(|e| {
                    ActivateError(format!("cannot keep ring {}'s eventfd: {e}", q.index))
                })
            };
            saved.push(SavedQueue {
                index: q.index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: dup(q.kick)?,
                call: q.call.map(dup).transpose()?,
            });
        }
        // Held until the backend has every ring (see `hand_rings`).
        let ring_enabled = self.ring_enabled.clone();
        let mut flags = crate::bus::lock(&ring_enabled);
        for q in queues {
            if let Some(flag) = flags.get_mut(usize::from(q.index)) {
                *flag = enabled(q.index);
            }
        }
        let mut activation = Activation {
            mem: mem.clone(),
            features: driver_features,
            queues: saved,
            rings_sent: false,
        };
        if self.broken.load(Ordering::Acquire) {
            // The driver started the device while its backend is away (a
            // reboot during a backend restart): the next backend gets the
            // rings when it connects, as after a crash.
            log::log!(
                self.start_warnings.level(&self.spec.name),
                "{}: started while the backend is away; its rings wait for the next one",
                self.spec.name
            );
            self.activation = Some(activation);
            return Ok(());
        }
        let memory_bytes = mem.iter().map(|r| r.len()).sum();
        let budget = Budget::new(deadline::handover_limit(memory_bytes));
        let handed = self.hand_rings(&mut activation, &flags, false, &budget);
        drop(flags);
        match handed {
            Ok(()) => {}
            // Lost halfway, as in a crash: the next backend gets the rings.
            Err(Handover::Lost(e)) => log::log!(
                self.start_warnings.level(&self.spec.name),
                "{}: the backend was lost while the driver started the device ({e}); its rings wait for the next one",
                self.spec.name
            ),
            Err(Handover::Refused(e)) => return Err(e),
        }
        self.activation = Some(activation);
        Ok(())
    }

    /// Sends an activation to the backend, each ring on or off as `enabled`
    /// says, every exchange within `budget` as a whole. The rings continue
    /// from where the guest's used rings are if a backend has run them
    /// before (`Activation::rings_sent`), else from 0. `reconnect`: a
    /// backend taking over, whose rings are kicked once they are its.
    ///
    /// The caller holds the ring flags' lock throughout, which
    /// `RingSwitch::set` holds over its own message: a ring the driver
    /// turns on or off meanwhile waits, and then reaches a backend that
    /// has its features and every ring, not one halfway through.
    fn hand_rings(
        &mut self,
        act: &mut Activation,
        enabled: &[bool],
        reconnect: bool,
        budget: &Budget,
    ) -> Result<(), Handover> {
        let resume = act.rings_sent;
        let mut fe = self.fe();
        let name = self.spec.name.clone();
        let mem = &act.mem;
        let memory_bytes = mem.iter().map(|r| r.len()).sum();
        let table_limit = deadline::longest_reply(memory_bytes);
        let limit = || budget.limit(REPLY_TIMEOUT);
        // Everything that may be refused is worked out before the first
        // message: a handover refused halfway would leave the backend with
        // some rings running.
        let mut rings = Vec::with_capacity(act.queues.len());
        for queue in &act.queues {
            rings.push(VringConfigData {
                queue_max_size: self.spec.queue_size,
                queue_size: queue.size,
                flags: 0,
                desc_table_addr: Self::host_addr(mem, queue.desc).map_err(Handover::Refused)?,
                used_ring_addr: Self::host_addr(mem, queue.used).map_err(Handover::Refused)?,
                avail_ring_addr: Self::host_addr(mem, queue.avail).map_err(Handover::Refused)?,
                log_addr: None,
            });
        }
        let mut regions = Vec::new();
        for region in mem.iter() {
            let file = region.file_offset().ok_or_else(|| {
                Handover::Refused(ActivateError("guest memory is not file-backed".into()))
            })?;
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            });
        }

        let features = (act.features & self.features()) | PROTOCOL_FEATURES_BIT;
        exchange(&mut fe, &name, "SET_FEATURES", limit(), |f| {
            f.set_features(features)
        })
        .map_err(|e| self.fail_within(e, budget))?;
        self.status
            .acked_features
            .store(features & !PROTOCOL_FEATURES_BIT, Ordering::Relaxed);
        self.share_inflight(&mut fe, budget)?;
        exchange(
            &mut fe,
            &name,
            "SET_MEM_TABLE",
            budget.limit(table_limit),
            |f| f.set_mem_table(&regions),
        )
        .map_err(|e| self.fail_within(e, budget))?;

        self.active_queues.clear();
        for (queue, ring) in act.queues.iter().zip(&rings) {
            let index = usize::from(queue.index);
            // A new backend starts where the guest's used ring stands: what
            // the old one completed stays completed, the rest is redone.
            let base = if resume {
                mem.read_obj::<u16>(GuestAddress(queue.used + 2))
                    .map(u16::from_le)
                    .unwrap_or(0)
            } else {
                0
            };
            let call = queue.call.as_ref().unwrap_or(&self.unused_call);
            exchange(&mut fe, &name, "SET_VRING_NUM", limit(), |f| {
                f.set_vring_num(index, queue.size)
            })
            .map_err(|e| self.fail_within(e, budget))?;
            exchange(&mut fe, &name, "SET_VRING_ADDR", limit(), |f| {
                f.set_vring_addr(index, ring)
            })
            .map_err(|e| self.fail_within(e, budget))?;
            exchange(&mut fe, &name, "SET_VRING_BASE", limit(), |f| {
                f.set_vring_base(index, base)
            })
            .map_err(|e| self.fail_within(e, budget))?;
            exchange(&mut fe, &name, "SET_VRING_CALL", limit(), |f| {
                f.set_vring_call(index, call)
            })
            .map_err(|e| self.fail_within(e, budget))?;
            // From its kick on, the backend may serve the ring.
            act.rings_sent = true;
            exchange(&mut fe, &name, "SET_VRING_KICK", limit(), |f| {
                f.set_vring_kick(index, &queue.kick)
            })
            .map_err(|e| self.fail_within(e, budget))?;
            let enable = enabled.get(index).copied().unwrap_or(false);
            exchange(&mut fe, &name, "SET_VRING_ENABLE", limit(), |f| {
                f.set_vring_enable(index, enable)
            })
            .map_err(|e| self.fail_within(e, budget))?;
            self.active_queues.push(index);
        }
        if reconnect {
            // The old backend may have taken the guest's last kick and died
            // before serving what it announced; the guest, having kicked,
            // waits. A kick of every ring makes the new backend look at
            // what is available (an extra look at an empty ring costs
            // nothing), as QEMU does when it starts a vhost-user-blk.
            for queue in &act.queues {
                if let Err(e) = queue.kick.write(1) {
                    log::warn!("{name}: cannot kick ring {}: {e}", queue.index);
                }
            }
        }
        log::info!(
            "{}: started {} ring(s) with features {features:#x}",
            self.spec.name,
            self.active_queues.len()
        );
        Ok(())
    }

    /// Hands a backend that tracks requests in flight the device's region
    /// for them, first asking it for one if the device has none (its first
    /// start since a reset, or one made while no backend was there). As in
    /// QEMU, this comes after the features (a backend lays the region out
    /// for the ring format they name) and before the memory table and the
    /// rings. A backend that does not track them gets none, and the region
    /// is dropped: what it serves is not recorded there, and a backend
    /// after it must not serve again what the region says. A start
    /// refused later keeps the region until the driver resets the device.
    fn share_inflight(&mut self, fe: &mut Frontend, budget: &Budget) -> Result<(), Handover> {
        if !self.backend_tracks_inflight {
            self.inflight = None;
            return Ok(());
        }
        let name = self.spec.name.clone();
        let limit = || budget.limit(REPLY_TIMEOUT);
        if self.inflight.is_some() {
            log::info!("{name}: handing the backend the requests in flight recorded so far");
        } else {
            let asked = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                // At most 64 for a disk (the config's limit).
                num_queues: self.spec.num_queues as u16,
                queue_size: self.spec.queue_size,
            };
            let answered = exchange(fe, &name, "GET_INFLIGHT_FD", limit(), |f| {
                raw_request::get_inflight_fd(f, asked.num_queues, asked.queue_size)
            })
            .map_err(|e| self.fail_within(e, budget))?;
            let Some(file) = answered.file else {
                // As QEMU takes a size of 0.
                log::warn!(
                    "{name}: the backend keeps no region for requests in flight; they are not tracked"
                );
                return Ok(());
            };
            let region =
                InflightRegion::check(asked, answered.mmap_size, answered.mmap_offset, file)
                    .map_err(|why| {
                        // Out of step with what it offered, as a refused ring is.
                        cut_off_now(&self.frontend, &self.broken);
                        Handover::Refused(ActivateError(format!(
                            "GET_INFLIGHT_FD: {why}; the device is stopped"
                        )))
                    })?;
            log::info!(
                "{name}: the backend records requests in flight in {} bytes",
                region.info.mmap_size
            );
            self.inflight = Some(region);
        }
        // Kept whatever happens now: a backend lost here leaves the
        // requests to the next one.
        if let Some(region) = &self.inflight {
            exchange(fe, &name, "SET_INFLIGHT_FD", limit(), |f| {
                f.set_inflight_fd(&region.info, region.file.as_raw_fd())
            })
            .map_err(|e| self.fail_within(e, budget))?;
        }
        Ok(())
    }

    /// Takes a new backend connection after the last one closed (the
    /// backend connected to our `server=on` socket, or answered when the
    /// VMM dialed its socket again): the handshake,
    /// then, if the driver had started the device, the memory table and
    /// every ring as they stand. Tells the status listener.
    pub fn reattach(&mut self, backend: NewBackend) -> Result<(), String> {
        let NewBackend {
            frontend,
            features,
            channel,
            tracks_inflight,
        } = backend;
        // Everything the guest was offered, used yet or not: a driver
        // that starts after the reconnect (or after a reboot) may take any
        // of it, and the offer cannot change under the guest.
        let offered = self.features();
        if features & offered != offered {
            return Err(format!(
                "the new backend lacks features {:#x} the device offers the driver",
                offered & !features
            ));
        }
        // The control API reports this backend's offer from now on; what
        // the driver is offered stays what the first backend set
        // (`self.features()`).
        self.status
            .backend_features
            .store(features, Ordering::Relaxed);
        let fd = frontend.as_raw_fd();
        // Taken before the device is marked connected and held until the
        // backend has every ring (see `hand_rings`).
        let ring_enabled = self.ring_enabled.clone();
        let flags = crate::bus::lock(&ring_enabled);
        *crate::bus::lock(&self.frontend) = frontend;
        self.backend_tracks_inflight = tracks_inflight;
        // Cleared before the watcher starts: a connection that is already
        // gone must leave the device marked broken and hung up.
        self.broken.store(false, Ordering::Release);
        self.status.set_hung_up(false);
        watch_hangup(
            fd,
            self.status.clone(),
            channel.as_ref().map(BackendChannel::stopper),
        );
        if let Some(channel) = channel {
            channel.serve();
        }
        // One limit for all that follows, under the device's lock: a vCPU
        // waiting for the device waits no longer than for a run of
        // exchanges of its own (`deadline::longest_run`), which is what a
        // stop or a pause allows it.
        let memory_bytes = self
            .activation
            .as_ref()
            .map_or(0, |act| act.mem.iter().map(|r| r.len()).sum::<u64>());
        let budget = Budget::new(deadline::longest_run(memory_bytes));
        self.replay_config_writes(&budget)?;
        self.prime_config(budget.limit(REPLY_TIMEOUT))
            .map_err(|e| format!("reading its config space: {e}"))?;
        if let Some(mut activation) = self.activation.take() {
            let result = self.hand_rings(&mut activation, &flags, true, &budget);
            self.activation = Some(activation);
            result.map_err(|e| e.to_string())?;
        }
        drop(flags);
        log::warn!("{}: the vhost-user backend reconnected", self.spec.name);
        self.status.changed();
        if self.spec.config_from_backend && self.activation.is_some() {
            // The new backend's configuration (a disk's capacity, say) may
            // not be the last one's: a running driver reads it again.
            if let Some(notifier) = crate::bus::lock(&self.config_notifier).as_ref() {
                notifier.notify();
            }
        }
        Ok(())
    }

    /// Keeps what the driver wrote at `at` for a backend that reconnects,
    /// and serves it while the backend is away.
    fn record_config_write(&mut self, at: u32, data: &[u8]) {
        self.config_written
            .retain(|(o, bytes)| (*o, bytes.len()) != (at, data.len()));
        self.config_written.push((at, data.to_vec()));
        let start = at as usize;
        if let Some(seen) = self.config_seen.get_mut(start..start + data.len()) {
            seen.copy_from_slice(data);
        }
    }

    /// Sends a new backend what the driver wrote to the configuration
    /// space before it came. One it refuses keeps its own value, which the
    /// driver reads from it from now on; one it fails otherwise is dropped
    /// (so the next backend is not failed by it too) and fails the
    /// reconnect.
    fn replay_config_writes(&mut self, budget: &Budget) -> Result<(), String> {
        let name = self.spec.name.clone();
        let mut index = 0;
        while let Some((at, bytes)) = self.config_written.get(index).cloned() {
            index += 1;
            let limit = budget.limit(REPLY_TIMEOUT);
            let written = exchange(&mut self.fe(), &name, "SET_CONFIG", limit, |f| {
                f.set_config(at, VhostUserConfigFlags::empty(), &bytes)
            });
            match written {
                Ok(()) => log::info!(
                    "{name}: the driver's config write at {at:#x} sent again to the new backend"
                ),
                Err(e) if e.refused() => log::warn!(
                    "{name}: the new backend refused the driver's config write at {at:#x} ({e}); \
                     it keeps its own value"
                ),
                Err(e) => {
                    self.config_written.remove(index - 1);
                    // Out of step with the backend, as for a ring handover.
                    cut_off(&self.frontend, &self.broken, &e);
                    return Err(format!("sending the driver's config write at {at:#x}: {e}"));
                }
            }
        }
        Ok(())
    }

    /// Stops every ring the device started.
    pub fn stop_rings(&mut self) {
        let was_running = self.activation.take().is_some();
        // The next driver negotiates afresh: nothing is acked until then.
        self.status.acked_features.store(0, Ordering::Relaxed);
        if self.broken.load(Ordering::Acquire) {
            self.active_queues.clear();
            return;
        }
        let mut fe = self.fe();
        let name = self.spec.name.clone();
        // A backend that does not stop a ring as asked may still be using
        // it, over memory the guest now takes back: it is cut off, which
        // stops every ring it has. Every ring is turned off first, so
        // that no ring takes new requests while another is stopped, and
        // the requests in flight on all of them finish together (QEMU
        // stops rings in the same order). GET_VRING_BASE then waits for a
        // ring's requests in flight.
        let budget = Budget::new(deadline::RESET_LIMIT);
        let rings = std::mem::take(&mut self.active_queues);
        type Step = fn(&mut Frontend, usize) -> vhost::Result<()>;
        let steps: [(&'static str, Step); 2] = [
            ("SET_VRING_ENABLE", |f, index| {
                f.set_vring_enable(index, false)
            }),
            ("GET_VRING_BASE", |f, index| {
                f.get_vring_base(index).map(drop)
            }),
        ];
        let stopped = steps.iter().try_for_each(|&(step, call)| {
            rings.iter().try_for_each(|&index| {
                exchange(&mut fe, &name, step, budget.limit(REPLY_TIMEOUT), |f| {
                    call(f, index)
                })
                .map_err(|e| (index, e))
            })
        });
        if let Err((index, e)) = stopped {
            let whole = if e.timed_out() && budget.spent() {
                format!(
                    ", the end of the {} the whole reset may take",
                    Secs(budget.total())
                )
            } else {
                String::new()
            };
            log::error!("{name}: stopping ring {index}: {e}{whole}; cutting the backend off");
            cut_off(&self.frontend, &self.broken, &e);
        }
        if was_running {
            log::info!("{}: reset", self.spec.name);
        }
    }
}

/// Turns a running device's rings on and off.
pub struct RingSwitch {
    name: String,
    frontend: Arc<Mutex<Frontend>>,
    enabled: Arc<Mutex<Vec<bool>>>,
    broken: Arc<AtomicBool>,
}

impl RingSwitch {
    /// Turns ring `index` on or off, waiting up to `limit()` for the
    /// backend's word. `limit` is asked once the switch has the ring flags'
    /// lock, which a reconnect holds while it hands a new backend its rings:
    /// time spent waiting for that is not the backend's to answer in.
    /// False when the backend does not have it: it was away (the switch is
    /// recorded for the next one) or is cut off now.
    pub fn set(&mut self, index: usize, enable: bool, limit: impl FnOnce() -> Duration) -> bool {
        // Held until the backend has the message (see `hand_rings`).
        let mut flags = crate::bus::lock(&self.enabled);
        if let Some(flag) = flags.get_mut(index) {
            *flag = enable;
        }
        if self.broken.load(Ordering::Acquire) {
            // Recorded: the next backend gets the ring as the driver set it.
            return false;
        }
        let limit = limit();
        let mut fe = crate::bus::lock(&self.frontend).clone();
        match exchange(&mut fe, &self.name, "SET_VRING_ENABLE", limit, |f| {
            f.set_vring_enable(index, enable)
        }) {
            Ok(()) => true,
            Err(e) => {
                // The backend's rings are no longer as the driver set them:
                // cut off, the next backend gets them as recorded.
                log::error!(
                    "{}: turning ring {index} {}: {e}; cutting the backend off",
                    self.name,
                    if enable { "on" } else { "off" }
                );
                cut_off(&self.frontend, &self.broken, &e);
                false
            }
        }
    }
}

#[cfg(test)]
impl RingSwitch {
    /// A switch whose backend is away: switches are only recorded.
    pub fn without_backend(rings: usize) -> RingSwitch {
        let (ours, _theirs) = UnixStream::pair().expect("socket pair");
        RingSwitch {
            name: "net9".into(),
            frontend: Arc::new(Mutex::new(Frontend::from_stream(ours, rings as u64))),
            enabled: Arc::new(Mutex::new(vec![true; rings])),
            broken: Arc::new(AtomicBool::new(true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use vmm_sys_util::sock_ctrl_msg::ScmSocket;

    use super::*;
    use crate::vstate::memory::create_guest_ram;

    const GET_FEATURES: u32 = 1;
    const SET_FEATURES: u32 = 2;
    const SET_MEM_TABLE: u32 = 5;
    const SET_VRING_BASE: u32 = 10;
    const GET_VRING_BASE: u32 = 11;
    const SET_VRING_KICK: u32 = 12;
    const GET_PROTOCOL_FEATURES: u32 = 15;
    const GET_QUEUE_NUM: u32 = 17;
    const SET_VRING_ENABLE: u32 = 18;
    const SET_BACKEND_REQ_FD: u32 = 21;
    const GET_CONFIG: u32 = 24;
    const SET_CONFIG: u32 = 25;
    const GET_INFLIGHT_FD: u32 = 31;
    const SET_INFLIGHT_FD: u32 = 32;
    const REPLY: u32 = 0x4;
    const NEED_REPLY: u32 = 0x8;
    const WAIT: Duration = Duration::from_secs(5);
    /// virtio-blk's `writeback` field.
    const WRITEBACK: Range<u64> = 32..33;

    /// How a scripted backend behaves.
    #[derive(Clone)]
    struct Script {
        /// The request (code, first 8 payload bytes) it refuses (a REPLY_ACK
        /// of failure); it acks every other one.
        refused: Option<(u32, u64)>,
        /// Its configuration space; offering one offers the CONFIG
        /// protocol feature.
        config: Option<Vec<u8>>,
        /// Its GET_CONFIG replies name another offset than asked.
        garbled_config: bool,
        /// It refuses its first GET_CONFIG after the one at connection, in
        /// this form.
        config_refusal: Option<ConfigRefusal>,
        /// Its GET_QUEUE_NUM answer.
        queue_num: u64,
        /// It hangs up after answering this request.
        quit_after: Option<u32>,
        /// It waits `SLOW` before answering this request.
        slow: Option<u32>,
        /// From the first request with this code (and first payload word,
        /// if given) on, it waits this long before answering each one.
        slow_from: Option<(u32, Option<u64>, Duration)>,
        /// It offers the BACKEND_REQ protocol feature, and after answering
        /// this request, sends CONFIG_CHANGE_MSG on the channel it got and
        /// reports the frontend's ack.
        config_change_after: Option<u32>,
        /// It offers INFLIGHT_SHMFD, and answers GET_INFLIGHT_FD so, its
        /// 4 KiB file starting with `inflight_mark`.
        inflight: Option<InflightAnswer>,
        inflight_mark: u64,
        /// Feature bits it offers besides VERSION_1 and PROTOCOL_FEATURES.
        extra_features: u64,
    }

    impl Default for Script {
        fn default() -> Self {
            Script {
                refused: None,
                config: Some(vec![0; 60]),
                garbled_config: false,
                config_refusal: None,
                queue_num: 2,
                quit_after: None,
                slow: None,
                slow_from: None,
                config_change_after: None,
                inflight: None,
                inflight_mark: 0,
                extra_features: 0,
            }
        }
    }

    /// A scripted backend's answer to GET_INFLIGHT_FD.
    #[derive(Clone, Copy)]
    enum InflightAnswer {
        /// A region of this size in a memfd.
        Memfd(u64),
        /// A whole region in a file that is not a memfd.
        PlainFile,
        /// A size of 0 and no file.
        NoFile,
    }

    /// How a backend says it cannot read its configuration space.
    #[derive(Clone, Copy)]
    enum ConfigRefusal {
        /// The header alone, of size 0 (libvhost-user: qemu-storage-daemon).
        HeaderOnly,
        /// The body with a size of 0 and no config bytes (the `vhost`
        /// crate's backends).
        EmptyBody,
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        /// A request's code and first 8 payload bytes.
        Request(u32, u64),
        /// The frontend's ack of a CONFIG_CHANGE_MSG.
        ConfigChangeAck(u64),
        /// The file of a SET_INFLIGHT_FD: the mark it starts with, and the
        /// message's size, offset, queue count and queue size.
        Inflight(u64, u64, u64, u16, u16),
        Closed,
    }

    fn message(code: u32, body: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(12 + body.len());
        msg.extend_from_slice(&code.to_le_bytes());
        msg.extend_from_slice(&(0x1 | REPLY).to_le_bytes());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(body);
        msg
    }

    fn word(bytes: &[u8], at: usize) -> u32 {
        bytes
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A vhost-user backend reduced to a script: it offers VERSION_1,
    /// PROTOCOL_FEATURES, MQ and REPLY_ACK (and CONFIG with a config
    /// space), and reports each request, and the connection closing, on
    /// `seen`.
    fn scripted_backend(mut stream: UnixStream, script: Script, seen: mpsc::Sender<Seen>) {
        let mut channel = None;
        let mut delay = None;
        let mut config_refusal = script.config_refusal;
        let mut config_reads = 0;
        let mut file_sent = None;
        loop {
            let mut header = [0u8; 12];
            let mut payload = Vec::new();
            // The header comes with the message's file, if it has one.
            let read = stream
                .recv_with_fd(&mut header)
                .map_err(std::io::Error::other)
                .and_then(|(got, file)| {
                    match word(&header, 0) {
                        SET_BACKEND_REQ_FD => {
                            channel = file.map(|f| UnixStream::from(std::os::fd::OwnedFd::from(f)))
                        }
                        _ => file_sent = file,
                    }
                    stream.read_exact(&mut header[got..])
                })
                .and_then(|()| {
                    payload.resize(word(&header, 8) as usize, 0);
                    stream.read_exact(&mut payload)
                });
            if read.is_err() {
                let _ = seen.send(Seen::Closed);
                return;
            }
            let (code, flags) = (word(&header, 0), word(&header, 4));
            let first = u64::from(word(&payload, 0)) | u64::from(word(&payload, 4)) << 32;
            let _ = seen.send(Seen::Request(code, first));
            if code == GET_CONFIG {
                config_reads += 1;
            }
            if let (SET_INFLIGHT_FD, Some(file)) = (code, file_sent.take()) {
                let mut mark = [0u8; 8];
                // The file's offset is the maker's: read from the start.
                let _ = std::os::unix::fs::FileExt::read_exact_at(&file, &mut mark, 0);
                let half = |at| u16::from_le_bytes([payload[at], payload[at + 1]]);
                let _ = seen.send(Seen::Inflight(
                    u64::from_le_bytes(mark),
                    first,
                    u64::from(word(&payload, 8)) | u64::from(word(&payload, 12)) << 32,
                    half(16),
                    half(18),
                ));
            }
            let answer = match code {
                GET_FEATURES => Some(message(
                    code,
                    &(VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT | script.extra_features)
                        .to_le_bytes(),
                )),
                GET_PROTOCOL_FEATURES => {
                    let mut offered =
                        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
                    if script.config.is_some() {
                        offered |= VhostUserProtocolFeatures::CONFIG;
                    }
                    if script.config_change_after.is_some() {
                        offered |= VhostUserProtocolFeatures::BACKEND_REQ;
                    }
                    if script.inflight.is_some() {
                        offered |= VhostUserProtocolFeatures::INFLIGHT_SHMFD;
                    }
                    Some(message(code, &offered.bits().to_le_bytes()))
                }
                GET_QUEUE_NUM => Some(message(code, &script.queue_num.to_le_bytes())),
                GET_INFLIGHT_FD => {
                    let (size, file) = match script.inflight {
                        Some(InflightAnswer::Memfd(size)) => (
                            size,
                            Some(
                                vmm_common::shared_memory::create("inflight", 4096, false)
                                    .expect("in-flight memfd"),
                            ),
                        ),
                        Some(InflightAnswer::PlainFile) => {
                            let file = tempfile::tempfile().expect("in-flight file");
                            file.set_len(4096).expect("in-flight file size");
                            (4096, Some(file))
                        }
                        _ => (0, None),
                    };
                    // Its size and offset, then the queue count and size asked.
                    let mut body = size.to_le_bytes().to_vec();
                    body.extend_from_slice(&0u64.to_le_bytes());
                    body.extend_from_slice(payload.get(16..24).unwrap_or(&[0; 8]));
                    let answer = message(code, &body);
                    let sent = match &file {
                        Some(file) => {
                            (&*file)
                                .write_all(&script.inflight_mark.to_le_bytes())
                                .expect("in-flight mark");
                            stream.send_with_fd(&answer[..], file.as_raw_fd()).map(drop)
                        }
                        None => stream.write_all(&answer).map_err(Into::into),
                    };
                    if sent.is_err() {
                        let _ = seen.send(Seen::Closed);
                        return;
                    }
                    None
                }
                GET_CONFIG if config_reads > 1 && config_refusal.is_some() => {
                    let mut body = payload.get(..12).unwrap_or_default().to_vec();
                    match config_refusal.take() {
                        Some(ConfigRefusal::EmptyBody) => body[4..8].fill(0),
                        _ => body.clear(),
                    }
                    Some(message(code, &body))
                }
                GET_CONFIG => {
                    let (offset, size) = (word(&payload, 0), word(&payload, 4));
                    let config = script.config.clone().unwrap_or_default();
                    let named = if script.garbled_config {
                        offset + 1
                    } else {
                        offset
                    };
                    let mut body = Vec::new();
                    body.extend_from_slice(&named.to_le_bytes());
                    body.extend_from_slice(&size.to_le_bytes());
                    body.extend_from_slice(&0u32.to_le_bytes());
                    for at in offset..offset + size {
                        body.push(config.get(at as usize).copied().unwrap_or(0));
                    }
                    Some(message(code, &body))
                }
                _ if flags & NEED_REPLY != 0 => {
                    let refuse = script.refused == Some((code, first));
                    Some(message(code, &u64::from(refuse).to_le_bytes()))
                }
                _ => None,
            };
            if script.slow == Some(code) {
                std::thread::sleep(SLOW);
            }
            if let Some((from, word, wait)) = script.slow_from {
                if from == code && word.is_none_or(|w| w == first) {
                    delay = Some(wait);
                }
            }
            if let Some(wait) = delay {
                std::thread::sleep(wait);
            }
            if let Some(answer) = answer {
                if stream.write_all(&answer).is_err() {
                    let _ = seen.send(Seen::Closed);
                    return;
                }
            }
            if script.quit_after == Some(code) {
                let _ = seen.send(Seen::Closed);
                return;
            }
            if let (true, Some(channel)) = (script.config_change_after == Some(code), &mut channel)
            {
                // CONFIG_CHANGE_MSG, version 1, NEED_REPLY, no payload.
                let mut msg = Vec::new();
                msg.extend_from_slice(&2u32.to_le_bytes());
                msg.extend_from_slice(&(0x1 | NEED_REPLY).to_le_bytes());
                msg.extend_from_slice(&0u32.to_le_bytes());
                let mut ack = [0u8; 20];
                if channel.write_all(&msg).is_ok() && channel.read_exact(&mut ack).is_ok() {
                    let value = u64::from(word(&ack, 12)) | u64::from(word(&ack, 16)) << 32;
                    let _ = seen.send(Seen::ConfigChangeAck(value));
                }
            }
        }
    }

    /// A two-queue disk whose configuration space comes from the backend.
    fn disk_spec() -> DeviceSpec {
        DeviceSpec {
            name: "disk9".into(),
            device_type: 2,
            device_features: 0,
            num_queues: 2,
            queue_size: 16,
            queue_count_field: Some(34),
            seg_max_field: Some(12),
            config_from_backend: true,
            queues_without_mq: 1,
            queue_num: QueueNum::Queues,
            config_size: 60,
            writable_config: &[WRITEBACK],
            track_inflight: true,
        }
    }

    /// A backend following `script` on one end of a socket pair, and the
    /// other end.
    fn spawn_backend(script: Script) -> (UnixStream, mpsc::Receiver<Seen>) {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let (seen, requests) = mpsc::channel();
        std::thread::spawn(move || scripted_backend(theirs, script, seen));
        (ours, requests)
    }

    fn scripted_disk(script: Script) -> (VhostUserDevice, mpsc::Receiver<Seen>) {
        let (ours, requests) = spawn_backend(script);
        let device = VhostUserDevice::from_stream(disk_spec(), ours, Path::new("scripted"))
            .expect("handshake");
        (device, requests)
    }

    /// A backend following `script` takes the device over; what it saw.
    fn take_over(device: &mut VhostUserDevice, script: Script) -> Vec<Seen> {
        let (ours, requests) = spawn_backend(script);
        let backend = device.handshake().run(ours).expect("handshake");
        device.reattach(backend).expect("reattach");
        drain(&requests)
    }

    /// What the backend saw, up to its hang-up or `WAIT` of quiet.
    fn seen_until_quiet(requests: &mpsc::Receiver<Seen>, quiet: Duration) -> Vec<Seen> {
        let mut seen = Vec::new();
        while let Ok(event) = requests.recv_timeout(quiet) {
            let closed = event == Seen::Closed;
            seen.push(event);
            if closed {
                break;
            }
        }
        seen
    }

    fn drain(requests: &mpsc::Receiver<Seen>) -> Vec<Seen> {
        seen_until_quiet(requests, Duration::from_millis(200))
    }

    fn wait_closed(requests: &mpsc::Receiver<Seen>) -> bool {
        seen_until_quiet(requests, WAIT).contains(&Seen::Closed)
    }

    /// Waits until the device has seen its backend's connection close (as
    /// the reconnect thread does before it takes the next backend).
    fn wait_hung_up(device: &VhostUserDevice) {
        let status = device.status();
        let since = Instant::now();
        while !status.hung_up() && since.elapsed() < WAIT {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(status.hung_up(), "the hang-up was not seen");
    }

    /// The backend got the memory table and both rings, each set up and on.
    fn assert_every_ring_handed_over(seen: &[Seen]) {
        assert!(seen.contains(&Seen::Request(SET_MEM_TABLE, 1)), "{seen:?}");
        for index in 0..2 {
            assert!(
                seen.contains(&Seen::Request(SET_VRING_KICK, index)),
                "{seen:?}"
            );
            let on = Seen::Request(SET_VRING_ENABLE, ring_state(index, true));
            assert!(seen.contains(&on), "{seen:?}");
        }
    }

    /// A device the driver starts while its backend hangs up after
    /// answering `quit_after`, once the hang-up is seen; with the guest
    /// memory and kicks its rings use.
    fn started_as_backend_is_lost(
        quit_after: u32,
    ) -> (
        VhostUserDevice,
        crate::vstate::memory::GuestRam,
        [EventFd; 2],
    ) {
        started_as_scripted_backend_is_lost(Script {
            quit_after: Some(quit_after),
            ..Script::default()
        })
    }

    /// `started_as_backend_is_lost`, the backend following `script` (which
    /// must quit during the start).
    fn started_as_scripted_backend_is_lost(
        script: Script,
    ) -> (
        VhostUserDevice,
        crate::vstate::memory::GuestRam,
        [EventFd; 2],
    ) {
        let (mut device, requests) = scripted_disk(script);
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("a backend lost during the handover failed the driver's start");
        assert!(wait_closed(&requests));
        assert!(!device.status().connected());
        wait_hung_up(&device);
        (device, ram, kicks)
    }

    /// How long a slow scripted backend takes to answer.
    const SLOW: Duration = Duration::from_millis(300);

    fn kicks() -> [EventFd; 2] {
        [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ]
    }

    fn rings(kicks: &[EventFd; 2]) -> Vec<ActiveQueue<'_>> {
        (0..2u16)
            .map(|index| {
                let base = 0x1_0000 * (u64::from(index) + 1);
                ActiveQueue {
                    index,
                    size: 16,
                    desc: base,
                    avail: base + 0x1000,
                    used: base + 0x2000,
                    kick: &kicks[usize::from(index)],
                    call: None,
                }
            })
            .collect()
    }

    /// A ring outside guest memory is refused before the backend hears
    /// anything, so that no earlier ring runs on at a backend whose
    /// handover stopped halfway.
    #[test]
    fn a_ring_outside_guest_memory_is_refused_before_any_message() {
        let (mut device, requests) = scripted_disk(Script::default());
        drain(&requests);
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        let mut queues = rings(&kicks);
        queues[1].used = 2 << 20;
        assert!(device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &queues)
            .is_err());
        let sent = drain(&requests);
        assert!(
            !sent.iter().any(|s| matches!(s, Seen::Request(..))),
            "sent before the refusal: {sent:?}"
        );
    }

    /// A disk backend that tracks requests in flight, its region marked.
    fn tracking(mark: u64) -> Script {
        Script {
            inflight: Some(InflightAnswer::Memfd(4096)),
            inflight_mark: mark,
            ..Script::default()
        }
    }

    /// What a backend given `tracking(mark)`'s region for both 16-entry
    /// rings sees.
    fn region(mark: u64) -> Seen {
        Seen::Inflight(mark, 4096, 0, 2, 16)
    }

    fn position(seen: &[Seen], what: impl Fn(&Seen) -> bool, name: &str) -> usize {
        seen.iter()
            .position(what)
            .unwrap_or_else(|| panic!("no {name}: {seen:?}"))
    }

    /// A backend that tracks requests in flight gets a region of its own
    /// at the device's start, after its features and before its memory
    /// table and rings. The backend
    /// that takes over after it dies gets that same region, with what the
    /// dead one recorded in it, and is not asked for another; after a
    /// reset, the next start asks for a new one.
    #[test]
    fn the_in_flight_region_outlives_a_backend_until_the_device_resets() {
        let (mut device, requests) = scripted_disk(Script {
            quit_after: Some(SET_VRING_KICK),
            ..tracking(7)
        });
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("start");
        let seen = seen_until_quiet(&requests, WAIT);
        let asked = position(
            &seen,
            |s| matches!(s, Seen::Request(GET_INFLIGHT_FD, _)),
            "GET_INFLIGHT_FD",
        );
        let table = position(
            &seen,
            |s| matches!(s, Seen::Request(SET_MEM_TABLE, _)),
            "SET_MEM_TABLE",
        );
        let given = position(&seen, |s| *s == region(7), "SET_INFLIGHT_FD of region 7");
        let features = position(
            &seen,
            |s| matches!(s, Seen::Request(SET_FEATURES, _)),
            "SET_FEATURES",
        );
        assert!(
            features < asked && asked < given && given < table,
            "{seen:?}"
        );
        wait_hung_up(&device);

        let (ours, requests) = spawn_backend(tracking(8));
        let backend = device.handshake().run(ours).expect("handshake");
        device.reattach(backend).expect("reattach");
        let seen = drain(&requests);
        assert!(seen.contains(&region(7)), "{seen:?}");
        assert!(
            !seen
                .iter()
                .any(|s| matches!(s, Seen::Request(GET_INFLIGHT_FD, _))),
            "asked the new backend for a region: {seen:?}"
        );
        assert_every_ring_handed_over(&seen);

        device.reset();
        drain(&requests);
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("start after the reset");
        let seen = drain(&requests);
        assert!(seen.contains(&region(8)), "{seen:?}");
    }

    /// A backend without in-flight tracking that takes over ends the
    /// region: it records nothing there, so the next backend that tracks
    /// them gets a new region rather than requests served long ago.
    #[test]
    fn a_backend_that_does_not_track_requests_in_flight_ends_the_region() {
        let (mut device, _ram, _kicks) = started_as_scripted_backend_is_lost(Script {
            quit_after: Some(SET_VRING_KICK),
            ..tracking(7)
        });
        let (ours, requests) = spawn_backend(Script {
            quit_after: Some(SET_VRING_KICK),
            ..Script::default()
        });
        // Lost halfway through the rings.
        let _ = device.reattach(device.handshake().run(ours).expect("handshake"));
        let seen = seen_until_quiet(&requests, WAIT);
        assert!(
            !seen.iter().any(|s| matches!(s, Seen::Inflight(..))),
            "{seen:?}"
        );
        wait_hung_up(&device);
        let seen = take_over(&mut device, tracking(9));
        assert!(seen.contains(&region(9)), "{seen:?}");
    }

    /// A device the driver started while its backend was away gets its
    /// region from the backend that takes the rings.
    #[test]
    fn a_device_started_while_its_backend_is_away_gets_a_region_from_the_next_one() {
        let mut device = gone_at_once(tracking(7));
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("starting a device whose backend is away");
        let seen = take_over(&mut device, tracking(8));
        assert!(
            seen.iter()
                .any(|s| matches!(s, Seen::Request(GET_INFLIGHT_FD, _))),
            "{seen:?}"
        );
        assert!(seen.contains(&region(8)), "{seen:?}");
        assert_every_ring_handed_over(&seen);
    }

    /// A backend that answers GET_INFLIGHT_FD with no file (a size of 0)
    /// keeps no region, as in QEMU: the rings go to it without one.
    #[test]
    fn a_backend_that_offers_no_in_flight_region_gets_the_rings_without_one() {
        let (_device, requests) = started_disk(Script {
            inflight: Some(InflightAnswer::NoFile),
            ..Script::default()
        });
        let seen = drain(&requests);
        assert!(
            !seen
                .iter()
                .any(|s| matches!(s, Seen::Request(SET_INFLIGHT_FD, _))),
            "{seen:?}"
        );
        assert_every_ring_handed_over(&seen);
    }

    /// A region at an offset mmap cannot take (not a whole number of
    /// pages) is refused: no later backend could map it.
    #[test]
    fn an_in_flight_region_at_an_offset_mmap_refuses_is_refused() {
        let asked = VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 2,
            queue_size: 16,
        };
        let memfd = || vmm_common::shared_memory::create("inflight", 8192, false).expect("memfd");
        let e = InflightRegion::check(asked, 4096, 1, memfd())
            .err()
            .expect("an offset of 1 was taken");
        assert!(e.contains("offset 1"), "{e}");
        assert!(InflightRegion::check(asked, 4096, 4096, memfd()).is_ok());
    }

    /// A region in a file that is not a memfd is refused (its size could
    /// only be learned by asking whoever serves the file), and the backend
    /// is cut off; a backend that reconnects with one is cut off too,
    /// rather than left connected with no rings.
    #[test]
    fn an_in_flight_region_outside_a_memfd_cuts_the_backend_off() {
        let plain = || Script {
            inflight: Some(InflightAnswer::PlainFile),
            ..Script::default()
        };
        let (mut device, requests) = scripted_disk(plain());
        drain(&requests);
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        let e = device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect_err("a region outside a memfd was taken");
        assert!(e.to_string().contains("not in a memfd"), "{e}");
        assert!(wait_closed(&requests), "the backend is still connected");
        wait_hung_up(&device);

        // Started while away; the next backend's region is refused at
        // the reconnect.
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("starting a device whose backend is away");
        let (ours, requests) = spawn_backend(plain());
        let refused = device.reattach(device.handshake().run(ours).expect("handshake"));
        assert!(refused.is_err());
        assert!(wait_closed(&requests), "the backend is still connected");
        assert!(!device.status().connected());
    }

    /// A region larger than the file the backend sent, or too small for
    /// the rings (2 of 16 entries: 640 bytes), would fault in the next
    /// backend that maps it: the start fails before the memory table and
    /// any ring, and the backend is cut off.
    #[test]
    fn an_in_flight_region_outside_its_file_or_too_small_fails_the_start() {
        for size in [8192, 576] {
            let (mut device, requests) = scripted_disk(Script {
                inflight: Some(InflightAnswer::Memfd(size)),
                ..Script::default()
            });
            drain(&requests);
            let ram = create_guest_ram(1 << 20, false).expect("guest memory");
            let kicks = kicks();
            let e = device
                .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
                .expect_err("a bad region was taken");
            assert!(
                e.to_string().contains(&format!("{size} bytes at offset 0")),
                "{e}"
            );
            let sent = seen_until_quiet(&requests, WAIT);
            assert!(
                !sent.iter().any(|s| matches!(
                    s,
                    Seen::Request(SET_INFLIGHT_FD | SET_MEM_TABLE | SET_VRING_KICK, _)
                )),
                "{sent:?}"
            );
            assert!(sent.contains(&Seen::Closed), "not cut off: {sent:?}");
        }
    }

    /// A ring outside guest memory is refused at the start while the
    /// backend is away too, so that the next backend is not left connected
    /// with rings it cannot be given: it gets none, and stays connected.
    #[test]
    fn a_ring_outside_guest_memory_is_refused_while_the_backend_is_away() {
        let mut device = gone_at_once(Script::default());
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        let mut queues = rings(&kicks);
        queues[1].used = 2 << 20;
        let e = device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &queues)
            .expect_err("a ring outside guest memory was taken");
        assert!(e.to_string().contains("outside guest memory"), "{e}");
        let seen = take_over(&mut device, Script::default());
        assert!(
            !seen.iter().any(|s| matches!(
                s,
                Seen::Request(SET_MEM_TABLE | SET_VRING_KICK | SET_VRING_ENABLE, _)
            )),
            "{seen:?}"
        );
        assert!(device.status().connected());
    }

    #[test]
    fn the_api_reports_the_features_of_the_backend_that_took_over() {
        let device = gone_at_once(Script::default());
        let status = device.status();
        let first = status.backend_features.load(Ordering::Relaxed);
        assert_eq!(first, VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES_BIT);
        let mut device = device;
        let more = VIRTIO_F_RING_EVENT_IDX;
        take_over(
            &mut device,
            Script {
                extra_features: more,
                ..Script::default()
            },
        );
        assert_eq!(
            status.backend_features.load(Ordering::Relaxed),
            first | more
        );
    }

    /// Both rings' used indexes in the guest's memory (see `rings`) say 5.
    fn used_rings_at_5(ram: &crate::vstate::memory::GuestRam) {
        for index in 0..2u64 {
            let used = 0x1_0000 * (index + 1) + 0x2000;
            ram.memory
                .write_obj(5u16.to_le(), GuestAddress(used + 2))
                .expect("used index");
        }
    }

    /// SET_VRING_BASE's first payload word: ring index, then base.
    fn ring_base(index: u64, base: u32) -> Seen {
        Seen::Request(SET_VRING_BASE, index | u64::from(base) << 32)
    }

    /// A backend that takes over rings an earlier one ran starts them where
    /// the guest's used rings stand; one that takes rings no backend has
    /// run (the driver started the device while its backend was away)
    /// starts them at 0, whatever their memory held before the driver set
    /// them up.
    #[test]
    fn a_backend_resumes_rings_from_the_used_index_only_if_one_ran_them() {
        let (mut device, ram, _kicks) = started_as_backend_is_lost(SET_VRING_ENABLE);
        used_rings_at_5(&ram);
        let seen = take_over(&mut device, Script::default());
        assert!(seen.contains(&ring_base(0, 5)), "{seen:?}");
        assert!(seen.contains(&ring_base(1, 5)), "{seen:?}");

        let mut device = gone_at_once(Script::default());
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        used_rings_at_5(&ram);
        let kicks = kicks();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("starting a device whose backend is away");
        let seen = take_over(&mut device, Script::default());
        assert!(seen.contains(&ring_base(0, 0)), "{seen:?}");
        assert!(seen.contains(&ring_base(1, 0)), "{seen:?}");
    }

    /// A scripted disk whose backend (following `script`) hangs up right
    /// after the handshake and its config read, once the hang-up is seen.
    fn gone_at_once(script: Script) -> VhostUserDevice {
        let (device, requests) = scripted_disk(Script {
            quit_after: Some(GET_CONFIG),
            ..script
        });
        assert!(wait_closed(&requests));
        wait_hung_up(&device);
        device
    }

    /// A scripted disk the driver started with both rings.
    fn started_disk(script: Script) -> (VhostUserDevice, mpsc::Receiver<Seen>) {
        let (mut device, requests) = scripted_disk(script);
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("activate");
        (device, requests)
    }

    /// SET_VRING_ENABLE's first payload word: ring index, then on/off.
    fn ring_state(index: u64, on: bool) -> u64 {
        index | u64::from(on) << 32
    }

    /// A backend that refuses a step of the ring handover after it has
    /// started a ring is cut off: the rings it started stop with the
    /// connection, rather than run on over memory the guest gave up.
    #[test]
    fn a_backend_refusing_a_ring_midway_is_cut_off() {
        let (mut device, requests) = scripted_disk(Script {
            refused: Some((SET_VRING_KICK, 1)),
            ..Script::default()
        });
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        let refused = device.activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks));
        let e = refused.expect_err("a refused SET_VRING_KICK was taken as success");
        assert!(e.to_string().contains("SET_VRING_KICK"), "{e}");
        assert!(!device.status().connected());
        assert!(
            wait_closed(&requests),
            "the backend that started ring 0 is still connected"
        );
    }

    /// The backend is asked only for its struct: a read past it reads as
    /// all ones without a message (qemu-storage-daemon would refuse it), a
    /// read across its end gets the part inside.
    #[test]
    fn config_reads_stop_at_the_backends_struct() {
        let config: Vec<u8> = (0..60).map(|i| i as u8 + 1).collect();
        let (mut device, requests) = scripted_disk(Script {
            config: Some(config.clone()),
            ..Script::default()
        });
        drain(&requests);
        let mut data = [0u8; 4];
        device.read_config(0, &mut data);
        assert_eq!(data, [1, 2, 3, 4]);
        device.read_config(34, &mut data);
        assert_eq!(data[..2], [2, 0], "num_queues is the device's own");
        device.read_config(12, &mut data);
        assert_eq!(data, [14, 0, 0, 0], "seg_max fits the 16-entry ring");
        device.read_config(60, &mut data);
        assert_eq!(data, [0xff; 4]);
        device.read_config(0xffc, &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut across = [0u8; 8];
        device.read_config(56, &mut across);
        assert_eq!(across, [57, 58, 59, 60, 0xff, 0xff, 0xff, 0xff]);
        let asked: Vec<u64> = drain(&requests)
            .into_iter()
            .filter_map(|seen| match seen {
                Seen::Request(GET_CONFIG, first) => Some(first >> 32),
                _ => None,
            })
            .collect();
        assert_eq!(asked, [4, 38, 16, 60], "GET_CONFIG sizes asked");
        assert!(device.status().connected());
    }

    /// The segment limit is capped however the guest reads it: an access
    /// ending inside the field reads the whole of it, so the cap applies.
    #[test]
    fn the_segment_limit_is_capped_in_partial_reads_too() {
        let mut config = vec![0u8; 60];
        config[12..16].copy_from_slice(&1000u32.to_le_bytes());
        let (mut device, requests) = scripted_disk(Script {
            config: Some(config),
            ..Script::default()
        });
        drain(&requests);
        let mut half = [0u8; 2];
        device.read_config(12, &mut half);
        assert_eq!(half, [14, 0], "queue size 16 less 2");
        let mut one = [0u8; 1];
        device.read_config(13, &mut one);
        assert_eq!(one, [0]);
        let mut across = [0u8; 4];
        device.read_config(10, &mut across);
        assert_eq!(across[2..], [14, 0]);
    }

    /// A backend that hangs up after the handshake, on its first
    /// GET_CONFIG, fails the device's start (a listening VMM then waits for
    /// the next one): the guest must not read a config space no backend
    /// gave.
    #[test]
    fn a_backend_lost_on_its_first_config_read_fails_the_start() {
        let (ours, requests) = spawn_backend(Script {
            quit_after: Some(GET_QUEUE_NUM),
            ..Script::default()
        });
        let result = VhostUserDevice::from_stream(disk_spec(), ours, Path::new("scripted"));
        let err = result.err().expect("the start went on without a config");
        assert!(err.peer_failed(), "{err}");
        let mut chain = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(e) = source {
            chain += &format!(": {e}");
            source = e.source();
        }
        assert!(chain.contains("GET_CONFIG"), "{chain}");
        drain(&requests);
    }

    /// While the backend is away, config reads get what it said last, not
    /// all ones (a guest probing the disk then would see a 2^64-sector disk
    /// with 0xffffffff-byte blocks, and give it up).
    #[test]
    fn config_reads_while_the_backend_is_away_get_what_it_said_last() {
        let config: Vec<u8> = (0..60).map(|i| i as u8 + 1).collect();
        let (mut device, requests) = scripted_disk(Script {
            config: Some(config.clone()),
            quit_after: Some(GET_CONFIG),
            ..Script::default()
        });
        // The device read the whole space as the backend came; the backend
        // went right after, before the driver read any of it.
        assert!(wait_closed(&requests), "the backend did not go");
        wait_hung_up(&device);
        let mut whole = [0u8; 60];
        device.read_config(0, &mut whole);
        assert_eq!(whole[..8], config[..8]);
        let mut data = [0u8; 4];
        device.read_config(20, &mut data);
        assert_eq!(data, [21, 22, 23, 24]);
        device.read_config(34, &mut data);
        assert_eq!(data, [2, 0, 37, 38], "num_queues is still the device's own");
        let mut across = [0u8; 8];
        device.read_config(56, &mut across);
        assert_eq!(across, [57, 58, 59, 60, 0xff, 0xff, 0xff, 0xff]);
    }

    /// Only virtio-blk's `writeback` reaches the backend; a backend that
    /// refuses a write in good form stays connected.
    #[test]
    fn only_writable_config_fields_reach_the_backend() {
        let (mut device, requests) = scripted_disk(Script {
            refused: Some((SET_CONFIG, 32 | 1 << 32)),
            ..Script::default()
        });
        drain(&requests);
        device.write_config(0, &[1, 2, 3, 4]);
        device.write_config(31, &[1, 1]);
        assert_eq!(drain(&requests), [], "a read-only field was written");
        device.write_config(32, &[1]);
        assert_eq!(drain(&requests), [Seen::Request(SET_CONFIG, 32 | 1 << 32)]);
        assert!(device.status().connected(), "cut off for a refusal");
    }

    /// What the driver wrote to a writable field (a disk's cache mode),
    /// before the backend was lost or while it was away, reaches the next
    /// backend, and the running driver is told to read the configuration
    /// again; a device reset forgets the writes.
    #[test]
    fn config_writes_reach_a_reconnected_backend_until_the_device_resets() {
        let (mut device, requests) = scripted_disk(Script {
            quit_after: Some(SET_CONFIG),
            ..Script::default()
        });
        let vector = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let notifier = ConfigNotifier::new(vec![vector.try_clone().expect("dup")]);
        notifier.set_vector(0);
        device.set_config_notifier(notifier.clone());
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("start");
        // The driver reads the field, then writes it.
        let mut read = [0u8; 1];
        device.read_config(32, &mut read);
        device.write_config(32, &[0]);
        assert!(wait_closed(&requests));
        wait_hung_up(&device);
        // While the backend is away: kept, and read back.
        device.write_config(32, &[1]);
        device.read_config(32, &mut read);
        assert_eq!(read, [1]);
        assert_eq!(device.config_written, [(32, vec![1])]);

        let generation = notifier.generation();
        let seen = take_over(&mut device, Script::default());
        let set = seen
            .iter()
            .position(|s| *s == Seen::Request(SET_CONFIG, 32 | 1 << 32))
            .unwrap_or_else(|| panic!("not sent again: {seen:?}"));
        let rings = seen
            .iter()
            .position(|s| matches!(s, Seen::Request(SET_VRING_KICK, _)))
            .expect("rings handed over");
        assert!(set < rings, "the rings ran before the cache mode was set");
        assert_eq!(notifier.generation(), generation.wrapping_add(1));
        assert_eq!(vector.read().ok(), Some(1), "no configuration interrupt");

        device.reset();
        assert!(device.config_written.is_empty(), "kept across a reset");
    }

    /// A malformed reply leaves the connection out of step: the backend is
    /// cut off, and at the start (the first config read) that fails the
    /// device's start rather than give the guest a wrong value.
    #[test]
    fn a_garbled_config_reply_cuts_the_backend_off() {
        let (ours, requests) = spawn_backend(Script {
            config: Some(vec![7; 60]),
            garbled_config: true,
            ..Script::default()
        });
        let result = VhostUserDevice::from_stream(disk_spec(), ours, Path::new("scripted"));
        let err = result.err().expect("a garbled config was taken");
        assert!(err.peer_failed(), "{err}");
        assert!(wait_closed(&requests), "the backend is still connected");
    }

    /// A backend that cannot read its configuration space says so with a
    /// shorter reply than an answer, in either form backends use: the
    /// guest reads all ones, the backend stays connected and in step (the
    /// next read gets its config), and nobody waits for the bytes of an
    /// answer (that would hold the vCPU until the reply deadline, and then
    /// cut the backend off).
    #[test]
    fn a_config_read_the_backend_refuses_leaves_it_connected() {
        for refusal in [ConfigRefusal::HeaderOnly, ConfigRefusal::EmptyBody] {
            let mut config = vec![0u8; 60];
            config[..4].copy_from_slice(&[1, 2, 3, 4]);
            let (mut device, _requests) = scripted_disk(Script {
                config: Some(config),
                config_refusal: Some(refusal),
                ..Script::default()
            });
            let mut data = [0u8; 4];
            device.read_config(0, &mut data);
            assert_eq!(data, [0xff; 4]);
            assert!(device.status().connected());
            device.read_config(0, &mut data);
            assert_eq!(data, [1, 2, 3, 4]);
            assert!(device.status().connected());
        }
    }

    /// A device the driver starts while its backend is away (a reboot
    /// during a backend restart) is handed to the next backend.
    #[test]
    fn a_device_started_while_its_backend_is_away_goes_to_the_next_one() {
        let mut device = gone_at_once(Script::default());
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("starting a device whose backend is away");

        let (ours, requests) = spawn_backend(Script::default());
        let backend = device.handshake().run(ours).expect("handshake");
        assert!(kicks.iter().all(|k| k.read().is_err()), "kicked early");
        device.reattach(backend).expect("reattach");
        let seen = drain(&requests);
        assert_every_ring_handed_over(&seen);
        // The new backend looks at what the guest made available meanwhile
        // without waiting for another kick.
        for (index, kick) in kicks.iter().enumerate() {
            assert_eq!(kick.read().ok(), Some(1), "ring {index} was not kicked");
        }
        assert!(device.status().connected());
    }

    /// A backend lost halfway through the handover at DRIVER_OK (it hangs
    /// up after SET_FEATURES) is a crash, not the driver's error: the
    /// device keeps its rings for the next backend, which gets all of them.
    #[test]
    fn a_backend_lost_while_the_device_starts_leaves_its_rings_to_the_next_one() {
        let (mut device, _ram, _kicks) = started_as_backend_is_lost(SET_FEATURES);

        let seen = take_over(&mut device, Script::default());
        assert_every_ring_handed_over(&seen);
        assert!(device.status().connected());
    }

    /// The driver turns a ring off (the NIC's control queue) while a new
    /// backend is getting the rings: the switch waits until that backend
    /// has its features and every ring, then reaches it, so the ring ends
    /// up off and the backend stays connected.
    #[test]
    fn a_ring_switch_during_a_reconnect_reaches_the_backend_after_the_rings() {
        // The first backend is lost during the handover: the device keeps
        // its rings for the next one.
        let (mut device, _ram, _kicks) = started_as_backend_is_lost(SET_MEM_TABLE);

        let (ours, requests) = spawn_backend(Script {
            slow: Some(SET_FEATURES),
            ..Script::default()
        });
        let backend = device.handshake().run(ours).expect("handshake");
        let mut switch = device.ring_switch();
        let switcher = std::thread::spawn(move || {
            std::thread::sleep(SLOW / 3);
            switch.set(1, false, || REPLY_TIMEOUT)
        });
        device.reattach(backend).expect("reattach");
        // Had the switch come before the reconnect (a slow machine), it was
        // recorded and handed over with the rings: the order holds too.
        switcher.join().expect("switch thread");
        let seen = drain(&requests);
        let at = |event: Seen| seen.iter().position(|s| *s == event);
        let off = at(Seen::Request(SET_VRING_ENABLE, ring_state(1, false)))
            .unwrap_or_else(|| panic!("ring 1 was never turned off: {seen:?}"));
        for index in 0..2 {
            let kick = at(Seen::Request(SET_VRING_KICK, index)).expect("every ring is handed over");
            assert!(
                kick < off,
                "ring 1 was switched before ring {index} was set up: {seen:?}"
            );
        }
        assert!(device.status().connected());
    }

    /// A ring switch's limit is worked out once the switch has the ring
    /// flags (a reconnect handing over the rings holds them): the wait for
    /// them is not taken from the backend's time to answer.
    #[test]
    fn a_ring_switch_asks_its_limit_once_it_has_the_ring_flags() {
        let (device, requests) = started_disk(Script::default());
        drain(&requests);
        let mut switch = device.ring_switch();
        let flags = crate::bus::lock(&device.ring_enabled);
        let switcher = std::thread::spawn(move || {
            let mut asked = None;
            let reached = switch.set(1, false, || {
                asked = Some(Instant::now());
                REPLY_TIMEOUT
            });
            (reached, asked)
        });
        std::thread::sleep(SLOW);
        let released = Instant::now();
        drop(flags);
        let (reached, asked) = switcher.join().expect("switch thread");
        assert!(reached);
        assert!(asked.expect("the limit was asked") >= released);
        assert!(drain(&requests).contains(&Seen::Request(SET_VRING_ENABLE, ring_state(1, false))));
    }

    /// A backend that answers every step of the ring handover just inside
    /// the limit of one reply is cut off when the handover as a whole has
    /// taken the memory table's limit and one reply's: the driver's vCPU
    /// waits that long at most, not the sum of every reply's limit.
    #[test]
    fn a_backend_slow_over_the_whole_ring_handover_is_cut_off() {
        // 14 answers (features, memory table, 6 per ring) of 0.9 s each:
        // 12.6 s, past the 10 s a handover of 1 MiB may take.
        let (mut device, requests) = scripted_disk(Script {
            slow_from: Some((SET_FEATURES, None, Duration::from_millis(900))),
            ..Script::default()
        });
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        let since = Instant::now();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("a backend lost during the handover failed the driver's start");
        let took = since.elapsed();
        let budget = deadline::handover_limit(1 << 20);
        assert!(
            took >= budget - Duration::from_millis(100) && took < budget + Duration::from_secs(2),
            "the handover took {took:?}, its budget is {budget:?}"
        );
        assert!(!device.status().connected());
        assert!(
            wait_closed(&requests),
            "the slow backend is still connected"
        );
        let seen = drain(&requests);
        let last_on = Seen::Request(SET_VRING_ENABLE, ring_state(1, true));
        assert!(
            !seen.contains(&last_on),
            "the handover ran to its end: {seen:?}"
        );
    }

    /// A backend that takes over and answers the config read and each step
    /// of the ring handover just inside the limit of one reply is cut off
    /// once the whole takeover has taken a run of exchanges' limit
    /// (`longest_run`): the device's lock, which vCPUs may be waiting for,
    /// is held no longer than a stop or a pause waits for a vCPU.
    #[test]
    fn a_backend_slow_over_the_whole_takeover_is_cut_off() {
        let (mut device, _ram, _kicks) = started_as_backend_is_lost(SET_MEM_TABLE);
        // GET_CONFIG, then the 14 answers of the handover, 3 s each: the
        // config read alone leaves the handover 7 s.
        let (ours, requests) = spawn_backend(Script {
            slow_from: Some((GET_CONFIG, None, Duration::from_secs(3))),
            ..Script::default()
        });
        let backend = device.handshake().run(ours).expect("handshake");
        let since = Instant::now();
        device
            .reattach(backend)
            .expect_err("a backend slower than the takeover's limit was taken");
        let took = since.elapsed();
        let budget = deadline::longest_run(1 << 20);
        assert!(
            took >= budget - Duration::from_millis(100)
                && took < budget + Duration::from_millis(1500),
            "the takeover took {took:?}, its limit is {budget:?}"
        );
        assert!(
            wait_closed(&requests),
            "the slow backend is still connected"
        );
        assert!(!device.status().connected());
    }

    /// A backend that answers each handshake message just inside the limit
    /// of one reply is cut off when the handshake has taken two replies'
    /// limits: a VMM starting, or a device taking a restarted backend,
    /// waits that long at most.
    #[test]
    fn a_backend_slow_over_the_whole_handshake_is_cut_off() {
        // It waits 3.5 s after each message: GET_FEATURES is answered at
        // 3.5 s, GET_PROTOCOL_FEATURES at 7 s, and GET_QUEUE_NUM (read
        // after SET_PROTOCOL_FEATURES's wait) at 14 s; its own limit
        // alone would run out at 12 s.
        let (ours, requests) = spawn_backend(Script {
            slow_from: Some((GET_FEATURES, None, Duration::from_millis(3500))),
            ..Script::default()
        });
        let since = Instant::now();
        let refused = VhostUserDevice::from_stream(disk_spec(), ours, Path::new("scripted"));
        let took = since.elapsed();
        let budget = deadline::HANDSHAKE_LIMIT;
        let Err(e) = refused else {
            panic!("a handshake of {took:?} was taken");
        };
        assert!(
            took >= budget - Duration::from_millis(100) && took < budget + Duration::from_secs(1),
            "the handshake took {took:?}, its budget is {budget:?}"
        );
        let said = vmm_common::error_chain::render(&e);
        assert!(
            said.contains("took the whole 10 s a handshake may take")
                && said.contains("GET_QUEUE_NUM"),
            "{said}"
        );
        assert!(
            wait_closed(&requests),
            "the slow backend is still connected"
        );
    }

    /// A backend that stops each ring on reset just inside the limit of one
    /// reply is cut off when the reset has taken two replies' limits.
    #[test]
    fn a_backend_slow_over_a_whole_reset_is_cut_off() {
        // 4 answers (SET_VRING_ENABLE per ring, then GET_VRING_BASE) of 3 s:
        // 12 s, past the 10 s.
        let (mut device, requests) = started_disk(Script {
            slow_from: Some((
                SET_VRING_ENABLE,
                Some(ring_state(0, false)),
                Duration::from_secs(3),
            )),
            ..Script::default()
        });
        drain(&requests);
        let since = Instant::now();
        device.reset();
        let took = since.elapsed();
        let budget = deadline::RESET_LIMIT;
        assert!(
            took >= budget - Duration::from_millis(100) && took < budget + Duration::from_secs(2),
            "the reset took {took:?}, its budget is {budget:?}"
        );
        assert!(!device.status().connected());
        assert!(
            wait_closed(&requests),
            "the slow backend is still connected"
        );
    }

    /// A reset turns every ring off before it stops any (as QEMU does), so
    /// no ring takes new requests while another one's are waited for.
    #[test]
    fn a_reset_turns_every_ring_off_before_it_stops_one() {
        let (mut device, requests) = started_disk(Script::default());
        drain(&requests);
        device.reset();
        assert!(device.status().connected());
        let seen = seen_until_quiet(&requests, Duration::from_millis(200));
        let at = |wanted: &Seen| seen.iter().position(|s| s == wanted);
        let offs: Vec<_> = (0..2)
            .map(|index| at(&Seen::Request(SET_VRING_ENABLE, ring_state(index, false))))
            .collect();
        let bases: Vec<_> = (0..2)
            .map(|index| at(&Seen::Request(GET_VRING_BASE, index)))
            .collect();
        assert!(
            offs.iter().chain(&bases).all(Option::is_some),
            "every ring turned off and stopped: {seen:?}"
        );
        assert!(offs.iter().max() < bases.iter().min(), "{seen:?}");
    }

    /// A backend that refuses to stop a ring on reset may still use it: it
    /// is cut off.
    #[test]
    fn a_backend_that_does_not_stop_a_ring_is_cut_off() {
        let (mut device, requests) = started_disk(Script {
            refused: Some((SET_VRING_ENABLE, ring_state(1, false))),
            ..Script::default()
        });
        device.reset();
        assert!(!device.status().connected());
        assert!(wait_closed(&requests), "the backend is still connected");
    }

    /// A ring switch the backend refuses cuts it off; the switch is kept
    /// and the next backend gets the ring as the driver set it.
    #[test]
    fn a_refused_ring_switch_is_kept_for_the_next_backend() {
        let (mut device, requests) = started_disk(Script {
            refused: Some((SET_VRING_ENABLE, ring_state(1, false))),
            ..Script::default()
        });
        assert!(!device.ring_switch().set(1, false, || REPLY_TIMEOUT));
        assert!(wait_closed(&requests), "the backend is still connected");

        let seen = take_over(&mut device, Script::default());
        assert!(seen.contains(&Seen::Request(SET_VRING_ENABLE, ring_state(0, true))));
        assert!(
            seen.contains(&Seen::Request(SET_VRING_ENABLE, ring_state(1, false))),
            "{seen:?}"
        );
    }

    /// A NIC's GET_QUEUE_NUM answer counts queue pairs, as QEMU reads it.
    #[test]
    fn get_queue_num_counts_pairs_for_a_nic() {
        let nic = DeviceSpec {
            name: "net9".into(),
            device_type: 1,
            num_queues: 4,
            queues_without_mq: 2,
            queue_count_field: None,
            seg_max_field: None,
            config_from_backend: false,
            queue_num: QueueNum::Pairs,
            config_size: 0,
            writable_config: &[],
            track_inflight: false,
            ..disk_spec()
        };
        let connect = |spec: DeviceSpec, queue_num| {
            let (ours, _requests) = spawn_backend(Script {
                queue_num,
                ..Script::default()
            });
            VhostUserDevice::from_stream(spec, ours, Path::new("scripted")).map(|_| ())
        };
        connect(nic.clone(), 2).expect("two pairs offered, two asked for");
        let e = connect(nic.clone(), 1).expect_err("one pair offered, two asked for");
        assert!(
            e.to_string()
                .contains("offers 1 queue pairs, 2 were asked for"),
            "{e}"
        );
        let e = connect(disk_spec(), 1).expect_err("one queue offered, two asked for");
        assert!(
            e.to_string().contains("offers 1 queues, 2 were asked for"),
            "{e}"
        );

        // One pair, answered as 1: both its rings start (the vhost crate
        // would have taken the 1 as its limit on ring indexes).
        let (ours, requests) = spawn_backend(Script {
            queue_num: 1,
            ..Script::default()
        });
        let one_pair = DeviceSpec {
            num_queues: 2,
            ..nic
        };
        let mut device =
            VhostUserDevice::from_stream(one_pair, ours, Path::new("scripted")).expect("handshake");
        let ram = create_guest_ram(1 << 20, false).expect("guest memory");
        let kicks = kicks();
        device
            .activate(&ram.memory, VIRTIO_F_VERSION_1, &rings(&kicks))
            .expect("both rings of the pair start");
        let seen = drain(&requests);
        assert!(
            seen.contains(&Seen::Request(SET_VRING_ENABLE, ring_state(1, true))),
            "{seen:?}"
        );
    }

    /// A backend that says its configuration changed (a resized disk) over
    /// its request channel gets an ack, and the driver gets the
    /// configuration vector.
    #[test]
    fn a_backends_config_change_reaches_the_driver() {
        let (mut device, requests) = scripted_disk(Script {
            config_change_after: Some(GET_CONFIG),
            ..Script::default()
        });
        let seen = drain(&requests);
        assert!(
            seen.iter()
                .any(|s| matches!(s, Seen::Request(SET_BACKEND_REQ_FD, _))),
            "no request channel was set up: {seen:?}"
        );
        let vector = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let notifier = ConfigNotifier::new(vec![vector.try_clone().expect("dup")]);
        notifier.set_vector(0);
        device.set_config_notifier(notifier.clone());
        let generation = notifier.generation();

        let mut data = [0u8; 8];
        device.read_config(0, &mut data);
        let ack = std::iter::from_fn(|| requests.recv_timeout(WAIT).ok())
            .find(|seen| matches!(seen, Seen::ConfigChangeAck(_) | Seen::Closed));
        assert_eq!(ack, Some(Seen::ConfigChangeAck(0)));
        assert_eq!(vector.read().expect("the vector was not raised"), 1);
        assert_eq!(notifier.generation(), generation.wrapping_add(1));
        assert!(device.status().connected());
    }
}
