//! The vhost-user side: features, config space, guest memory, and one
//! worker thread per queue that drains its ring through `request::execute`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use io_uring::{opcode, types, IoUring};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::request::{self, BlkTarget, Parsed, SECTOR_SIZE, SEG_MAX};

/// Reads and writes submitted to io_uring at once, per queue.
const RING_ENTRIES: u32 = 256;

/// Largest discard / write-zeroes request, in sectors.
const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// virtio_blk_config, laid out by hand (60 bytes, little-endian).
fn config_space(capacity_sectors: u64, num_queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

/// Shared by every connection.
pub struct Device {
    pub target: BlkTarget,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// One connection's backend (fresh per frontend, sharing the device).
#[derive(Clone)]
pub struct BlkBackend {
    device: Arc<Device>,
    config: Arc<Vec<u8>>,
    event_idx: Arc<AtomicBool>,
    mem: Arc<RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>>,
    /// One io_uring per queue, made by the queue's worker on first use.
    rings: Arc<Vec<Mutex<RingState>>>,
}

#[derive(Default)]
enum RingState {
    #[default]
    Untried,
    Ready(Box<IoUring>),
    /// io_uring is unavailable: requests run synchronously.
    Unavailable,
}

impl BlkBackend {
    pub fn new(device: Arc<Device>) -> Self {
        let capacity = device.target.disk.size() / SECTOR_SIZE;
        let config = Arc::new(config_space(capacity, device.num_queues));
        BlkBackend {
            config,
            event_idx: Arc::new(AtomicBool::new(false)),
            mem: Arc::new(RwLock::new(None)),
            rings: Arc::new(
                (0..device.num_queues)
                    .map(|_| Mutex::new(RingState::Untried))
                    .collect(),
            ),
            device,
        }
    }

    /// Drains the ring: parses every available request, runs plain reads
    /// and writes together through the queue's io_uring (the rest inline),
    /// completes them, then signals once. With EVENT_IDX, re-enables
    /// notifications and loops if more arrived.
    pub(crate) fn process_queue(&self, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let Some(ring_lock) = self.rings.get(queue) else {
            return Ok(());
        };
        let mut ring_state = ring_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let RingState::Untried = *ring_state {
            let disk = &self.device.target.disk;
            *ring_state = if disk.async_fd().is_none() || disk.async_alignment().is_none() {
                RingState::Unavailable
            } else {
                match IoUring::new(RING_ENTRIES) {
                    Ok(ring) => RingState::Ready(Box::new(ring)),
                    Err(e) => {
                        log::warn!("io_uring unavailable ({e}); queue {queue} runs synchronously");
                        RingState::Unavailable
                    }
                }
            };
        }
        let vq_err = |e: virtio_queue::Error| io::Error::other(format!("{e:?}"));
        let mut batch: Vec<(u16, Parsed)> = Vec::new();
        loop {
            if event_idx {
                vring.disable_notification().map_err(vq_err)?;
            }
            let mut completed = 0;
            loop {
                batch.clear();
                let mut pending = 0u32;
                let ring = match &mut *ring_state {
                    RingState::Ready(ring) => Some(ring),
                    _ => None,
                };
                let allow_async = ring.is_some();
                while pending < RING_ENTRIES {
                    let chain = vring
                        .get_mut()
                        .get_queue_mut()
                        .pop_descriptor_chain(mem.clone());
                    let Some(chain) = chain else { break };
                    let head = chain.head_index();
                    let parsed = request::parse(&self.device.target, &mem, chain, allow_async);
                    if let Parsed::Io(_) = parsed {
                        pending += 1;
                    }
                    batch.push((head, parsed));
                }
                if batch.is_empty() {
                    break;
                }
                let results = match ring {
                    Some(ring) if pending > 0 => self.run_batch(ring, &batch, pending)?,
                    _ => Vec::new(),
                };
                for (i, (head, parsed)) in batch.iter().enumerate() {
                    let used = match parsed {
                        Parsed::Done(used) => *used,
                        Parsed::Io(io) => {
                            let ok = results.get(i).copied().flatten() == Some(io.len as i32);
                            request::finish(&mem, io, ok)
                        }
                    };
                    // A head index the driver made up (outside the queue)
                    // cannot be completed; skip it rather than end the
                    // worker, so the queue keeps serving good requests.
                    if let Err(e) = vring.add_used(*head, used) {
                        log::warn!("queue {queue}: cannot complete head {head}: {e:?}");
                        continue;
                    }
                    completed += 1;
                }
            }
            if completed > 0 {
                let notify = !event_idx || vring.needs_notification().map_err(vq_err)?;
                if notify {
                    vring.signal_used_queue()?;
                }
            }
            if !event_idx || !vring.enable_notification().map_err(vq_err)? {
                return Ok(());
            }
        }
    }

    /// Submits the batch's transfers and waits for all of them; returns each
    /// request's result (bytes moved or -errno) by batch index.
    fn run_batch(
        &self,
        ring: &mut IoUring,
        batch: &[(u16, Parsed)],
        pending: u32,
    ) -> io::Result<Vec<Option<i32>>> {
        let Some(fd) = self.device.target.disk.async_fd() else {
            return Ok(Vec::new());
        };
        for (i, (_, parsed)) in batch.iter().enumerate() {
            let Parsed::Io(io) = parsed else { continue };
            let entry = if io.write {
                opcode::Writev::new(types::Fd(fd), io.iovecs.as_ptr(), io.iovecs.len() as u32)
                    .offset(io.offset)
                    .build()
            } else {
                opcode::Readv::new(types::Fd(fd), io.iovecs.as_ptr(), io.iovecs.len() as u32)
                    .offset(io.offset)
                    .build()
            }
            .user_data(i as u64);
            // SAFETY: the iovecs and the guest buffers they point to stay
            // valid until this function has reaped every completion: the
            // batch and the guest memory guard outlive the wait below.
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        let mut results = vec![None; batch.len()];
        let mut reaped = 0u32;
        while reaped < pending {
            match ring.submit_and_wait((pending - reaped) as usize) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for cqe in ring.completion() {
                if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                    *slot = Some(cqe.result());
                }
                reaped += 1;
            }
        }
        Ok(results)
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.device.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.device.target.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.device.num_queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        let mut out = vec![0u8; size as usize];
        if let Some(avail) = self.config.get(start..) {
            let n = avail.len().min(out.len());
            out[..n].copy_from_slice(&avail[..n]);
        }
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::error!("cannot create a worker exit event: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("event for unknown queue {device_event}")))?;
        self.process_queue(usize::from(device_event), vring)
    }
}
