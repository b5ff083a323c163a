//! The vhost-user side: features, config space, guest memory, and one
//! worker thread per queue that drains its ring through `request::execute`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use vmm_common::avail::{next_chain, not_set_up};
use vmm_common::ring_watch::{avail_within, Pause};

use crate::queue_io::{Completed, QueueIo};
use crate::request::{
    self, BlkTarget, ChainBuf, Parsed, MAX_DISCARD_SECTORS, SECTOR_SIZE, SEG_MAX,
};
use crate::serving::Serving;
use crate::used_order::UsedOrder;
use crate::watch::WatchWindow;

/// Reads and writes in flight at once, per queue.
const RING_ENTRIES: u32 = 256;

/// How long a worker that emptied its ring watches it for new requests
/// before it sleeps: a driver that keeps requests in flight submits the
/// next ones within microseconds of its completions, and watching saves its
/// kick and the worker's wake-up.
const POLL: Duration = Duration::from_micros(50);

/// A watch looks at the ring in slices this long, letting go of the ring's
/// lock between them: a frontend stopping or disabling the ring, which
/// takes it, waits a slice at most, and the watch ends there.
const WATCH_SLICE: Duration = Duration::from_micros(50);

/// Whether the driver makes new requests available on `vring`, or `other`
/// says there is other work, within `window` (see `watch`); false at once
/// once the ring is stopped or disabled.
fn watch_ring(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    window: Duration,
    mut other: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + window;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ring = vring.get_ref();
        if !ring.get_queue().ready() || !ring.is_enabled() {
            return false;
        }
        let slice = left.min(WATCH_SLICE);
        let slice_end = Instant::now() + slice;
        if avail_within(ring.get_queue(), mem, slice, Pause::Yield, &mut other) {
            return true;
        }
        if Instant::now() < slice_end {
            // The avail ring could not be read: nothing to watch.
            return false;
        }
    }
}

/// virtio_blk_config, laid out by hand (60 bytes, little-endian).
/// `block` is the disk's preferred transfer unit (a power of two, at least
/// a sector): the topology's physical block and minimum I/O size, so a
/// guest aligns its I/O to it while sectors stay 512 bytes.
/// `seg_max` leaves a ring of `queue_size` room for a request's header and
/// status too: a driver without indirect descriptors puts a whole request
/// in the ring, and one that cannot fit waits for ever.
fn config_space(capacity_sectors: u64, num_queues: u16, queue_size: u16, block: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity_sectors.to_le_bytes());
    let seg_max = SEG_MAX.min(u32::from(queue_size).saturating_sub(2));
    c[12..16].copy_from_slice(&seg_max.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    let sectors_per_block = (block / SECTOR_SIZE).clamp(1, 1 << 15);
    c[24] = sectors_per_block.ilog2() as u8; // physical_block_exp
    c[26..28].copy_from_slice(&(sectors_per_block as u16).to_le_bytes()); // min_io_size
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
    c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&(sectors_per_block as u32).to_le_bytes()); // discard_sector_alignment
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
    /// How long a queue with transfers in flight watches its ring and its
    /// completions before it sleeps (`--poll-us`).
    pub poll: Duration,
    /// The cores the process may run on (see `serving`).
    pub cores: usize,
}

type Handler = VringEpollHandler<BlkBackend>;

/// One connection's backend (fresh per frontend, sharing the device).
#[derive(Clone)]
pub struct BlkBackend {
    device: Arc<Device>,
    config: Arc<Vec<u8>>,
    event_idx: Arc<AtomicBool>,
    mem: Arc<RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>>,
    /// Per queue: its asynchronous transfers, made by the queue's worker on
    /// first use.
    queues: Arc<Vec<Mutex<QueueState>>>,
    /// The worker threads' epoll handlers, by queue, set once the daemon
    /// exists (weak: the daemon owns them).
    handlers: Arc<OnceLock<Vec<Weak<Handler>>>>,
    /// The frontend left (`quiesce`): workers take no new request.
    closing: Arc<AtomicBool>,
    /// The queue workers serving their rings now (see `serving`).
    serving: Arc<Serving>,
}

#[derive(Default)]
struct QueueState {
    io: AsyncIo,
    /// The queue's ring, once its worker has seen it (for `stop_vring`).
    vring: Option<VringRwLock>,
    /// The driver's available index is one the ring cannot hold: nothing
    /// more is taken from it until the frontend stops it (GET_VRING_BASE)
    /// and sets it up again.
    broken: bool,
    /// Finished requests wait here for earlier ones, so the used ring
    /// follows the available ring's order (see `used_order`).
    order: UsedOrder,
    /// How many times watching (`--poll-us`) found a request or a
    /// completion before the queue slept, for this frontend.
    watch_found: u64,
    /// How many watches the queue began, for this frontend.
    watches: u64,
    /// How long the queue watches before it sleeps, now.
    watch: WatchWindow,
}

impl QueueState {
    /// Whether the queue may sleep now, its pass done. Its completion
    /// event is cleared first, so that it wakes for a completion that
    /// comes later, not for the ones it has just reaped (which would also
    /// count as a short sleep and widen the watch); one that came
    /// meanwhile is served at once instead.
    fn may_sleep(&mut self) -> bool {
        if let AsyncIo::Ready(qio) = &mut self.io {
            qio.clear_event();
            if qio.has_completions() {
                return false;
            }
        }
        self.watch.sleeping(Instant::now());
        true
    }
}

#[derive(Default)]
enum AsyncIo {
    #[default]
    Untried,
    Ready(Box<QueueIo>),
    /// The disk has no asynchronous path, or io_uring is unavailable:
    /// requests run synchronously.
    Unavailable,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BlkBackend {
    pub fn new(device: Arc<Device>) -> Self {
        let capacity = device.target.disk.size() / SECTOR_SIZE;
        let block = device.target.disk.preferred_block();
        let config = Arc::new(config_space(
            capacity,
            device.num_queues,
            device.queue_size,
            block,
        ));
        BlkBackend {
            config,
            event_idx: Arc::new(AtomicBool::new(false)),
            mem: Arc::new(RwLock::new(None)),
            queues: Arc::new(
                (0..device.num_queues)
                    .map(|_| {
                        Mutex::new(QueueState {
                            watch: WatchWindow::new(device.poll),
                            ..QueueState::default()
                        })
                    })
                    .collect(),
            ),
            handlers: Arc::new(OnceLock::new()),
            closing: Arc::new(AtomicBool::new(false)),
            serving: Arc::new(Serving::new(device.cores)),
            device,
        }
    }

    /// Hands over the daemon's epoll handlers (one per queue, in order).
    pub fn set_handlers(&self, handlers: &[Arc<Handler>]) {
        let _ = self
            .handlers
            .set(handlers.iter().map(Arc::downgrade).collect());
    }

    /// The epoll event id of a queue's completions: past its ring and the
    /// exit event.
    fn done_event(&self) -> u64 {
        u64::from(self.device.num_queues) + 1
    }

    /// Makes the queue's io_uring and puts its completion eventfd in the
    /// queue worker's epoll set.
    fn setup_async(&self, queue: usize) -> AsyncIo {
        let disk = &self.device.target.disk;
        if disk.async_fd().is_none() || disk.async_alignment().is_none() {
            return AsyncIo::Unavailable;
        }
        let qio = match QueueIo::new(RING_ENTRIES) {
            Ok(qio) => qio,
            Err(e) => {
                log::warn!("io_uring unavailable ({e}); queue {queue} runs synchronously");
                return AsyncIo::Unavailable;
            }
        };
        let handler = self
            .handlers
            .get()
            .and_then(|h| h.get(queue))
            .and_then(Weak::upgrade);
        let Some(handler) = handler else {
            log::warn!("queue {queue}: no worker to watch its transfers; it runs synchronously");
            return AsyncIo::Unavailable;
        };
        if let Err(e) = handler.register_listener(qio.event_fd(), EventSet::IN, self.done_event()) {
            log::warn!("queue {queue}: cannot watch its transfers ({e}); it runs synchronously");
            return AsyncIo::Unavailable;
        }
        AsyncIo::Ready(Box::new(qio))
    }

    /// Finishes completed transfers and puts every request that may go
    /// there in the used ring; returns how many went.
    fn complete(
        &self,
        queue: usize,
        vring: &VringRwLock,
        order: &mut UsedOrder,
        mem: &GuestMemoryMmap,
        done: &mut Vec<Completed>,
    ) -> u32 {
        let mut completed = 0;
        for c in done.drain(..) {
            let used = request::finish(mem, &c.io, c.ok);
            completed += self.publish(queue, vring, order, c.head, used);
        }
        completed
    }

    /// Puts `head` in the used ring with the requests finished after it
    /// that waited for it (see `UsedOrder`); returns how many went. Once
    /// the frontend has left, none goes (see `quiesce`): a request that
    /// was running when it left (a slow synchronous one) is not completed.
    fn publish(
        &self,
        queue: usize,
        vring: &VringRwLock,
        order: &mut UsedOrder,
        head: u16,
        used: u32,
    ) -> u32 {
        let mut published = 0;
        order.finish(head, used, |head, used| {
            if self.add_used(queue, vring, head, used) {
                published += 1;
            }
        });
        published
    }

    /// Gives up on requests that will never finish (`QueueIo::take_lost`),
    /// so that the ones after them still enter the used ring; returns how
    /// many did.
    fn forget(
        &self,
        queue: usize,
        vring: &VringRwLock,
        order: &mut UsedOrder,
        lost: Vec<u16>,
    ) -> u32 {
        let mut published = 0;
        for head in lost {
            log::error!("queue {queue}: request at head {head} is given up and never completed");
            order.forget(head, |head, used| {
                if self.add_used(queue, vring, head, used) {
                    published += 1;
                }
            });
        }
        published
    }

    /// Puts `head` in the used ring; false if the frontend has left (see
    /// `publish`), and false with a warning for a head index the driver
    /// made up (outside the queue), which is skipped rather than ending
    /// the worker, so the queue keeps serving good requests.
    fn add_used(&self, queue: usize, vring: &VringRwLock, head: u16, used: u32) -> bool {
        if self.closing.load(Ordering::Acquire) {
            log::debug!(
                "queue {queue}: head {head} finished after the frontend left; not completed"
            );
            return false;
        }
        match vring.add_used(head, used) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("queue {queue}: cannot complete head {head}: {e:?}");
                false
            }
        }
    }

    /// Whether the worker may take new requests from the ring: not once the
    /// frontend has left, nor while the ring is disabled (SET_VRING_ENABLE
    /// 0: transfers in flight still complete, but nothing new starts).
    fn may_take(&self, vring: &VringRwLock) -> bool {
        !self.closing.load(Ordering::Acquire) && vring.get_ref().is_enabled()
    }

    /// The frontend has gone (its socket ended): from now on the workers
    /// take no new request and put nothing in the used ring (see
    /// `quiesce`). Set as soon as the relay sees the end, not only once the
    /// handler has: the frontend may read the used index at once.
    pub fn frontend_left(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// Once the frontend has left, before the workers are stopped: they
    /// take no new request, and every transfer in flight finishes. A worker
    /// may be waiting for blocks that another queue's transfers hold, and
    /// only their completion releases them, so none of them may be left in
    /// flight when the workers stop. None is completed to the driver: the
    /// frontend that gave them has gone, and may already have read the used
    /// index to hand on to the next backend (QEMU does when a backend hangs
    /// up; the vmm, when it cuts a slow backend off), which runs them
    /// again. A used entry written now could count a request twice, or land
    /// in a ring a new driver has set up since.
    pub fn quiesce(&self) {
        self.frontend_left();
        for (queue, state) in self.queues.iter().enumerate() {
            // Every queue that ran on io_uring says, even with watching off.
            let ran_async = matches!(lock(state).io, AsyncIo::Ready(_));
            if ran_async {
                let state = lock(state);
                log::info!(
                    "queue {queue}: watching (--poll-us) began {} time(s) and found work {} time(s) for this frontend",
                    state.watches,
                    state.watch_found
                );
            }
            if let Err(e) = self.finish_in_flight(queue) {
                log::warn!("queue {queue}: {e}");
            }
        }
    }

    /// Waits for the queue's transfers in flight. Once the frontend has
    /// left, none is completed (see `quiesce`); on a ring given up as
    /// broken with the frontend still there, each enters the used ring if
    /// it can (the frontend that sets the ring up again, or stops it, takes
    /// the base back counting them), and the driver is told if it can be.
    fn finish_in_flight(&self, queue: usize) -> io::Result<()> {
        let Some(state) = self.queues.get(queue) else {
            return Ok(());
        };
        let mut guard = lock(state);
        let state = &mut *guard;
        let AsyncIo::Ready(qio) = &mut state.io else {
            return Ok(());
        };
        // The completions are taken here: the worker need not wake for them.
        qio.clear_event();
        let mut finished = Vec::new();
        let drained = qio.drain(&mut finished);
        let lost = qio.take_lost();
        if drained.is_err() {
            // `drain` gave the ring up (`abandon`): its submission queue
            // may still name transfers that are gone, so it is never
            // entered again; the queue runs synchronously from now on.
            state.io = AsyncIo::Unavailable;
        }
        let mem = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone();
        match (state.vring.clone(), mem) {
            (Some(vring), Some(atomic)) if !self.closing.load(Ordering::Acquire) => {
                let mem: Arc<GuestMemoryMmap> = atomic.memory().into_inner();
                let mut completed =
                    self.complete(queue, &vring, &mut state.order, &mem, &mut finished);
                completed += self.forget(queue, &vring, &mut state.order, lost);
                if completed > 0 {
                    if let Err(e) = vring.signal_used_queue() {
                        log::debug!(
                            "queue {queue}: cannot signal the {completed} request(s) completed on a ring given up: {e}"
                        );
                    }
                }
            }
            _ => {
                let left = finished.len() + lost.len();
                if left > 0 {
                    log::info!(
                        "queue {queue}: {left} request(s) in flight when the frontend left; the next backend runs them again"
                    );
                }
            }
        }
        drained
    }

    /// Serves the ring: completes finished transfers, parses every
    /// available request (while the queue has room for transfers), runs
    /// the synchronous ones inline and hands reads and writes to io_uring
    /// when the disk takes them asynchronously, then signals once (a queue
    /// without io_uring also after each request, when a core is free for
    /// the frontend: see `serving`). With EVENT_IDX, re-enables
    /// notifications and loops if more arrived.
    ///
    /// A ring it cannot serve (its used ring or call eventfd fails: a
    /// frontend gave an unwritable call eventfd, or took the memory away
    /// under the ring) is marked broken before the queue's lock goes, so a
    /// ring the frontend sets up again meanwhile is not taken for it; it
    /// is not served until the frontend sets it up again.
    pub(crate) fn process_queue(&self, queue: usize, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let Some(state) = self.queues.get(queue) else {
            return Ok(());
        };
        let mut guard = lock(state);
        let state = &mut *guard;
        let _turn = self.serving.begin();
        let served = self.serve(queue, vring, state, &atomic, event_idx);
        if let Err(e) = &served {
            if !state.broken {
                log::error!(
                    "queue {queue}: {e}; it is not served until the frontend sets it up again"
                );
            }
            state.broken = true;
        }
        served
    }

    /// The frontend has gone: transfers that finished are reaped, which
    /// lets go of the blocks their writes held (a request on another queue
    /// may wait for them), but none is completed (see `quiesce`).
    /// Transfers left queued when the kernel was short of resources go in
    /// now: they may hold blocks too, and nothing else would submit them
    /// (`quiesce` would, but may be waiting for the queue that waits for
    /// them).
    fn reap_after_frontend_left(queue: usize, state: &mut QueueState) {
        let AsyncIo::Ready(qio) = &mut state.io else {
            return;
        };
        let mut finished = Vec::new();
        let gave_up = match qio.submit() {
            Ok(()) => false,
            Err(e) => {
                log::warn!(
                    "queue {queue}: io_uring refused transfers ({e}) after the frontend left"
                );
                qio.abandon(&mut finished);
                true
            }
        };
        qio.reap(&mut finished);
        if !finished.is_empty() {
            log::debug!(
                "queue {queue}: {} request(s) finished after the frontend left; not completed",
                finished.len()
            );
        }
        if gave_up {
            // As in `finish_in_flight`: the ring is never entered again.
            state.io = AsyncIo::Unavailable;
        }
    }

    /// `process_queue`'s work, under the queue's lock.
    fn serve(
        &self,
        queue: usize,
        vring: &VringRwLock,
        state: &mut QueueState,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap>,
        event_idx: bool,
    ) -> io::Result<()> {
        // A stopped ring (GET_VRING_BASE) is the frontend's again: a late
        // completion event must not touch it.
        if !vring.get_ref().get_queue().ready() {
            return Ok(());
        }
        if self.closing.load(Ordering::Acquire) {
            Self::reap_after_frontend_left(queue, state);
            return Ok(());
        }
        if state.vring.is_none() {
            state.vring = Some(vring.clone());
        }
        if let AsyncIo::Untried = state.io {
            state.io = self.setup_async(queue);
        }
        state.watch.woke(Instant::now());
        let disk_fd = self.device.target.disk.async_fd();
        let vq_err = |e: virtio_queue::Error| io::Error::other(format!("{e:?}"));
        let mut finished = Vec::new();
        let mut chain_buf = ChainBuf::new();
        // The frontend has not set the ring up (yet): served on its next kick.
        let mut not_ready = false;
        let ring_size = usize::from(vring.get_ref().get_queue().size());
        loop {
            // Taken again each pass: a busy queue may stay here a long
            // time, and a memory table the frontend sends meanwhile (memory
            // it added) must be the one new requests are read from.
            // Transfers in flight keep the memory they were started with.
            let mem: Arc<GuestMemoryMmap> = atomic.memory().into_inner();
            if self.closing.load(Ordering::Acquire) {
                // The frontend left during the last pass or a watch.
                Self::reap_after_frontend_left(queue, state);
                return Ok(());
            }
            if event_idx {
                vring.disable_notification().map_err(vq_err)?;
            }
            let mut qio = match &mut state.io {
                AsyncIo::Ready(qio) => Some(qio.as_mut()),
                _ => None,
            };
            if let Some(qio) = qio.as_deref_mut() {
                qio.reap(&mut finished);
            }
            let mut completed = self.complete(queue, vring, &mut state.order, &mem, &mut finished);
            let mut full = false;
            let mut refused = None;
            loop {
                if !self.may_take(vring) || state.broken {
                    break;
                }
                if qio.as_deref().is_some_and(|q| !q.has_room()) {
                    full = true;
                    break;
                }
                // A driver that follows the spec has at most a ring's worth
                // waiting (one per head); one that makes heads available
                // again before they are used waits for a completion, so
                // what waits stays bounded.
                if state.order.pending() >= ring_size {
                    full = true;
                    break;
                }
                let popped = next_chain(vring.get_mut().get_queue_mut(), mem.clone());
                let chain = match popped {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) if not_set_up(&e) => {
                        not_ready = true;
                        break;
                    }
                    Err(e) => {
                        log::warn!(
                            "queue {queue}: the driver's ring is broken ({e}); it is not served until the frontend sets it up again"
                        );
                        state.broken = true;
                        break;
                    }
                };
                let head = chain.head_index();
                state.order.take(head);
                let used = match request::parse(
                    &self.device.target,
                    &mem,
                    chain,
                    qio.is_some(),
                    &mut chain_buf,
                ) {
                    Parsed::Done(used) => used,
                    Parsed::Sync(request) => {
                        if let Some(qio) = qio.as_deref_mut().filter(|_| request.changes_disk()) {
                            // Its writes in flight may hold blocks this
                            // request needs to itself: they finish first,
                            // and completing them releases the blocks.
                            if let Err(e) = qio.drain(&mut finished) {
                                refused = Some(e);
                            }
                            completed +=
                                self.complete(queue, vring, &mut state.order, &mem, &mut finished);
                        }
                        request.run(&self.device.target, &mem)
                    }
                    Parsed::Io(io) => match (qio.as_deref_mut(), disk_fd) {
                        (Some(qio), Some(fd)) => match qio.start(fd, head, io, mem.clone()) {
                            Ok(()) => match qio.submit_due() {
                                Ok(()) => continue,
                                Err(e) => {
                                    refused = Some(e);
                                    break;
                                }
                            },
                            // There was room a moment ago.
                            Err(io) => request::finish(&mem, &io, false),
                        },
                        // Not asked for: fail it rather than drop it.
                        _ => request::finish(&mem, &io, false),
                    },
                };
                let published = self.publish(queue, vring, &mut state.order, head, used);
                completed += published;
                // The frontend may be asleep, waiting for this one: wake it
                // now if a core is free for it (see `serving`). Not on
                // io_uring, where a failed signal here would leave
                // transfers unsubmitted.
                if published > 0
                    && qio.is_none()
                    && event_idx
                    && self.serving.core_to_spare()
                    && vring.needs_notification().map_err(vq_err)?
                {
                    vring.signal_used_queue()?;
                }
                if refused.is_some() {
                    break;
                }
            }
            let is_async = qio.is_some();
            if let Some(qio) = qio {
                if refused.is_none() {
                    refused = qio.submit().err();
                }
                match &refused {
                    None => qio.reap(&mut finished),
                    Some(e) => {
                        log::error!(
                            "queue {queue}: io_uring refused transfers ({e}); the queue runs synchronously from now on"
                        );
                        qio.abandon(&mut finished);
                        completed += self.forget(queue, vring, &mut state.order, qio.take_lost());
                    }
                }
            }
            if refused.is_some() {
                // The transfers it never took complete below as failed.
                state.io = AsyncIo::Unavailable;
            }
            completed += self.complete(queue, vring, &mut state.order, &mem, &mut finished);
            if completed > 0 {
                let notify = !event_idx || vring.needs_notification().map_err(vq_err)?;
                if notify {
                    vring.signal_used_queue()?;
                }
            }
            if refused.is_some() {
                // The chains still available go through the synchronous path.
                continue;
            }
            if full || state.broken || not_ready || !self.may_take(vring) {
                // A completion brings the worker back for the rest; a ring
                // it may not take from has nothing more to serve.
                if state.may_sleep() {
                    return Ok(());
                }
                continue;
            }
            // Synchronous requests: the next ones come within microseconds.
            // The watch yields between looks: with two queues on two cores,
            // a spinning worker held the core its frontend's thread needed
            // (4k reads from tmpfs against a polling frontend: 0.5M IOPS
            // spinning, 0.88M yielding). A queue whose transfers wait for a
            // device watches only on io_uring (below, `--poll-us`).
            let left = || self.closing.load(Ordering::Acquire);
            if completed > 0
                && !is_async
                && event_idx
                && avail_within(vring.get_ref().get_queue(), &mem, POLL, Pause::Yield, left)
            {
                continue;
            }
            let window = state.watch.current();
            if is_async && event_idx && !window.is_zero() {
                if let AsyncIo::Ready(qio) = &mut state.io {
                    if qio.in_flight() > 0 || completed > 0 {
                        // Completions reaped in the passes before left the
                        // event set: cleared now, so the queue does not wake
                        // for them after the watch. One that comes after
                        // this sets it again or is seen by the watch.
                        qio.clear_event();
                        state.watches += 1;
                        state.watch.watching(Instant::now());
                        if watch_ring(vring, &mem, window, || qio.has_completions() || left()) {
                            state.watch.found();
                            if !left() {
                                state.watch_found += 1;
                            }
                            continue;
                        }
                    }
                }
            }
            if !event_idx || !vring.enable_notification().map_err(vq_err)? {
                if state.may_sleep() {
                    return Ok(());
                }
                continue;
            }
        }
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
            | 1 << VIRTIO_BLK_F_TOPOLOGY
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
            // The channel a resize is announced on (see `resize`).
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = offset as usize;
        let mut out = vec![0u8; size as usize];
        // The capacity as it is now: the disk may have been resized.
        let mut config = self.config.to_vec();
        let capacity = self.device.target.disk.size() / SECTOR_SIZE;
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        if let Some(avail) = config.get(start..) {
            let n = avail.len().min(out.len());
            out[..n].copy_from_slice(&avail[..n]);
        }
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        vmm_common::lost_memory::watch(mem.memory().into_inner());
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
        thread_id: usize,
    ) -> io::Result<()> {
        // Any event is a reason to look at the queue (which is harmless
        // when there is nothing new): ending the worker on an odd event
        // set would leave the queue's transfers in flight.
        if evset != EventSet::IN {
            log::debug!("queue {thread_id}: event set {evset:?}");
        }
        // One queue per worker thread: the thread's index is the queue's.
        let queue = thread_id;
        let vring = vrings
            .first()
            .ok_or_else(|| io::Error::other(format!("queue {queue} has no ring")))?;
        if u64::from(device_event) == self.done_event() {
            if let Some(state) = self.queues.get(queue) {
                if let AsyncIo::Ready(qio) = &lock(state).io {
                    qio.clear_event();
                }
            }
        } else if device_event != 0 {
            return Err(io::Error::other(format!(
                "queue {queue}: unknown event {device_event}"
            )));
        }
        // The worker lives on whatever its ring did: one that ended would
        // leave its transfers in flight, holding blocks that other queues'
        // requests may wait for. A ring it could not serve was given up
        // (`process_queue`); its transfers finish now and release theirs.
        if self.process_queue(queue, vring).is_err() {
            if let Err(e) = self.finish_in_flight(queue) {
                log::debug!("queue {queue}: completing its transfers: {e}");
            }
        }
        Ok(())
    }

    /// The ring stops (GET_VRING_BASE) with its frontend still there (QEMU
    /// stopping the VM, saving it or migrating it; a device reset): every
    /// transfer in flight finishes and is completed to the driver, with
    /// the requests waiting behind it, and the driver told, before the
    /// base goes back. The frontend takes the ring back at that base, which
    /// counts every request taken: one not in the used ring by then would
    /// never be.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let queue = queue_index as usize;
        let Some(state) = self.queues.get(queue) else {
            return Ok(());
        };
        let mut guard = lock(state);
        let state = &mut *guard;
        let mut finished = Vec::new();
        let mut lost = Vec::new();
        let mut drained = Ok(());
        if let AsyncIo::Ready(qio) = &mut state.io {
            // The completions are taken here: the worker need not wake.
            qio.clear_event();
            drained = qio.drain(&mut finished);
            lost = qio.take_lost();
            if drained.is_err() {
                // As in `finish_in_flight`: the ring is never entered again.
                state.io = AsyncIo::Unavailable;
            }
        }
        if self.closing.load(Ordering::Acquire) {
            // The frontend left while the transfers finished (the vmm cuts
            // off a backend whose stop takes too long, and takes the ring
            // back): as in `quiesce`, none is completed.
            let left = finished.len() + lost.len();
            if left > 0 {
                log::info!(
                    "queue {queue}: {left} request(s) in flight when the frontend left; the next backend runs them again"
                );
            }
            finished.clear();
            state.order.clear();
            return drained;
        }
        let mem = self.mem.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(vring), Some(atomic)) = (state.vring.clone(), mem) {
            let mem: Arc<GuestMemoryMmap> = atomic.memory().into_inner();
            let mut completed = self.complete(queue, &vring, &mut state.order, &mem, &mut finished);
            completed += self.forget(queue, &vring, &mut state.order, lost);
            if completed > 0 {
                // The call eventfd is still the frontend's until this
                // returns.
                if let Err(e) = vring.signal_used_queue() {
                    log::warn!("queue {queue}: cannot signal the requests completed at stop: {e}");
                }
            }
        }
        state.broken = false;
        // Everything taken is in the used ring now (or was given up); the
        // ring starts again from nothing taken.
        state.order.clear();
        drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write queued when the kernel was short of resources (io_uring's
    /// submit said EAGAIN with transfers in the kernel) still goes in once
    /// the frontend has left, so its blocks are let go of.
    #[test]
    fn a_write_left_queued_goes_in_after_the_frontend_left() {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x1000)])
                .expect("guest memory"),
        );
        let host =
            vm_memory::GuestMemoryBackend::get_host_address(&*mem, vm_memory::GuestAddress(0))
                .expect("in guest memory");
        let file = tempfile::tempfile().expect("temp file");
        file.set_len(0x1000).expect("size the file");
        let mut qio = QueueIo::new(8).expect("io_uring");
        let write = crate::request::PendingIo::for_test(true, 0, host, 0x1000);
        assert!(qio
            .start(std::os::fd::AsRawFd::as_raw_fd(&file), 1, write, mem)
            .is_ok());
        let mut state = QueueState {
            io: AsyncIo::Ready(Box::new(qio)),
            ..Default::default()
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            BlkBackend::reap_after_frontend_left(0, &mut state);
            let AsyncIo::Ready(qio) = &state.io else {
                panic!("the ring was given up");
            };
            if qio.in_flight() == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the queued write never went in"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn seg_max_leaves_room_in_the_ring_for_header_and_status() {
        let seg_max = |queue_size| {
            let c = config_space(8, 1, queue_size, 512);
            u32::from_le_bytes([c[12], c[13], c[14], c[15]])
        };
        assert_eq!(seg_max(256), SEG_MAX);
        assert_eq!(seg_max(128), 126);
        assert_eq!(seg_max(64), 62);
        assert_eq!(seg_max(4), 2);
    }
}
