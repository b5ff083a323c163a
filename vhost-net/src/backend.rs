//! The vhost-user side: features, guest memory, and one worker thread per
//! queue pair. A pair's thread waits on the rx and tx kicks and on the
//! pair's tap queue, which is in its epoll set only while the rx ring has
//! buffers: with none left, the tap is left unread (frames wait in the
//! kernel) until the guest kicks the rx queue. It also waits on two events
//! of its own: a timer (which retries the tap after a failed read, looks
//! for a deleted tap to come back, and checks that an unwatched pair is
//! still enabled) and a resume event that brings it back to a tx ring busy
//! past its budget once it has served the pair's other events.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, RwLockWriteGuard, Weak};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_common::avail::not_set_up;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::features::{self, NetConfig};
use crate::tap::Tap;
use crate::worker::{Pair, RxStop, Stats, TxBudget, TxEnd, TxRing, TX_BATCH};

/// A pair's queues, as its worker thread numbers them.
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// How long a tx worker looks for more frames before it sleeps.
const TX_POLL: Duration = Duration::from_micros(100);
/// What one tx call may do before the worker serves the pair's other
/// events (rx, a ring stop, its exit) and then comes back: a guest that
/// keeps its tx ring busy would otherwise keep the worker for ever.
const TX_BUDGET: TxBudget = TxBudget {
    chains: 4 * TX_BATCH as u32,
    time: Duration::from_millis(1),
    poll: TX_POLL,
};
/// Without a way to come back (no resume event), no budget.
const TX_UNBOUNDED: TxBudget = TxBudget {
    chains: u32::MAX,
    time: Duration::MAX,
    poll: TX_POLL,
};
/// After a tap read fails, when the worker tries again (an rx kick also
/// does): the guest may hold back its kicks while the backend holds all
/// its buffers.
const TAP_RETRY: Duration = Duration::from_millis(10);
/// After the tap was deleted, how often the worker looks for an interface
/// of the same name to attach its queue to again.
const TAP_REATTACH: Duration = Duration::from_secs(1);
/// How often the worker looks at a pair whose multi-queue tap queue is
/// attached but unwatched (its rx ring out of buffers, or not yet served):
/// the frontend may have disabled the pair meanwhile (SET_VRING_ENABLE 0
/// reaches no backend hook), and then the queue must leave the tap, or the
/// kernel keeps steering flows to it that nobody reads.
const ENABLED_CHECK: Duration = Duration::from_millis(100);
/// After a ring's worth of malformed rx chains, when the worker goes on
/// with the ring: soon, as nothing else may bring it back for a frame
/// already taken from the tap, but not at once, so a guest that keeps
/// offering them does not keep the worker busy.
const MALFORMED_PAUSE: Duration = Duration::from_millis(1);
/// What a pair without its rx timer lacks.
const NO_RX_TIMER: &str = "failed tap reads are retried at rx kicks only, and a disabled pair's queue leaves the tap only when a frame reaches it";

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
type Handler = VringEpollHandler<NetBackend>;
type StateGuard<'a> = RwLockWriteGuard<'a, VringState<Mem>>;

/// Shared by every connection: the tap queues outlive frontends.
pub struct Device {
    /// One tap queue per queue pair.
    pub taps: Vec<Tap>,
    pub queue_size: u16,
}

impl Device {
    pub fn num_queues(&self) -> usize {
        2 * self.taps.len()
    }
}

/// A pair's state for one connection.
struct PairState {
    worker: Pair,
    /// Whether the tap queue is in the worker's epoll set.
    watching: bool,
    /// The pair's rx ring, once its worker has seen it (for `stop_vring`).
    rx_vring: Option<VringRwLock>,
    /// A tap error was reported (once, until the tap works again).
    tap_failed: bool,
    /// The tap was deleted: its queue leads nowhere until an interface of
    /// its name is back (`Tap::reattach`). The second is whether a failed
    /// reattach was reported (once per deletion).
    tap_gone: bool,
    reattach_failed: bool,
    /// Brings the worker back to rx: `TAP_RETRY` after a failed tap read,
    /// `TAP_REATTACH` while the tap is gone, `ENABLED_CHECK` while the tap
    /// queue is attached but unwatched (None if it could not be made or
    /// watched: then only rx kicks do).
    rx_timer: Option<TimerFd>,
    /// Written when a tx call spent its budget with frames left: brings
    /// the worker back to them (None if it could not be made or watched:
    /// then tx calls have no budget).
    tx_resume: Option<EventFd>,
    /// The guest broke the rx or tx ring (an available index more than a
    /// ring ahead, a ring outside guest memory): it is left alone, and its
    /// kicks ignored, until the frontend stops it (GET_VRING_BASE) or
    /// resets the device to set it up again.
    rx_broken: bool,
    tx_broken: bool,
}

/// One connection's backend (fresh per frontend, sharing the device).
#[derive(Clone)]
pub struct NetBackend {
    device: Arc<Device>,
    acked: Arc<AtomicU64>,
    mem: Arc<RwLock<Option<Mem>>>,
    pairs: Arc<Vec<Mutex<PairState>>>,
    /// The worker threads' epoll handlers, by pair, set once the daemon
    /// has made them (weak: they own clones of this backend).
    handlers: Arc<OnceLock<Vec<Weak<Handler>>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Signals the guest if it asked to be (EVENT_IDX) or always.
fn notify(pair: usize, guard: &mut StateGuard<'_>, mem: &GuestMemoryMmap) {
    match guard.get_queue_mut().needs_notification(mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = guard.signal_used_queue() {
                log::warn!("pair {pair}: cannot signal the guest: {e}");
            }
        }
    }
}

/// A one-shot timer whose reads never block (`TimerFd::new` makes one
/// that blocks until it fires, and a timer set again after epoll saw it
/// fire no longer has anything to read).
fn nonblocking_timer() -> io::Result<TimerFd> {
    // SAFETY: no pointers are passed; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a timerfd just made, owned by nothing else.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

/// Marks a ring the guest broke as broken, and says so once. A ring the
/// frontend has not set up yet is left as it is: its next kick serves it.
fn ring_broken(pair: usize, broken: &mut bool, queue: u16, e: &virtio_queue::Error) {
    if not_set_up(e) {
        log::debug!("pair {pair}: queue {queue} of the pair is not set up yet");
        return;
    }
    if !*broken {
        let (name, index) = match queue {
            RX_QUEUE => ("rx", 2 * pair),
            _ => ("tx", 2 * pair + 1),
        };
        log::warn!(
            "pair {pair}: the {name} ring (queue {index}) is broken, ignored until the frontend sets it up again: {e}"
        );
        *broken = true;
    }
}

/// Attaches (`attach`) or detaches pair `pair`'s queue of a multi-queue
/// tap. A tap that is gone is left to rx, whose next read reports it.
fn steer(pair: usize, tap: &Tap, attach: bool) {
    match tap.set_attached(attach) {
        Ok(()) => {}
        Err(e) if Tap::is_gone(&e) => log::debug!("pair {pair}: tap {} is gone", tap.name()),
        Err(e) => log::warn!(
            "pair {pair}: cannot {} its tap queue: {e}",
            if attach { "attach" } else { "detach" }
        ),
    }
}

impl NetBackend {
    pub fn new(device: Arc<Device>) -> Self {
        // The kernel steers frames to every attached queue of a multi-queue
        // tap: until the frontend enables a pair, its queue is detached, so
        // no flow lands where nobody reads.
        for (pair, tap) in device.taps.iter().enumerate() {
            steer(pair, tap, false);
        }
        let pairs = (0..device.taps.len())
            .map(|index| {
                let rx_timer = nonblocking_timer()
                    .map_err(|e| {
                        log::warn!("pair {index}: no rx timer ({e}): {NO_RX_TIMER}");
                    })
                    .ok();
                let tx_resume = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
                    .map_err(|e| {
                        log::warn!("pair {index}: no tx resume event ({e}): a busy tx ring can hold its worker");
                    })
                    .ok();
                Mutex::new(PairState {
                    worker: Pair::new(index),
                    watching: false,
                    rx_vring: None,
                    tap_failed: false,
                    tap_gone: false,
                    reattach_failed: false,
                    rx_timer,
                    tx_resume,
                    rx_broken: false,
                    tx_broken: false,
                })
            })
            .collect();
        NetBackend {
            device,
            acked: Arc::new(AtomicU64::new(0)),
            mem: Arc::new(RwLock::new(None)),
            pairs: Arc::new(pairs),
            handlers: Arc::new(OnceLock::new()),
        }
    }

    /// Hands over the daemon's epoll handlers (one per pair, in order),
    /// and has each watch its pair's rx timer and tx resume event.
    pub fn set_handlers(&self, handlers: &[Arc<Handler>]) {
        if self
            .handlers
            .set(handlers.iter().map(Arc::downgrade).collect())
            .is_err()
        {
            return;
        }
        for (pair, (handler, state)) in handlers.iter().zip(self.pairs.iter()).enumerate() {
            let mut state = lock(state);
            if let Some(timer) = &state.rx_timer {
                let fd = timer.as_raw_fd();
                if let Err(e) = handler.register_listener(fd, EventSet::IN, self.rx_timer_event()) {
                    log::warn!("pair {pair}: cannot watch the rx timer ({e}): {NO_RX_TIMER}");
                    state.rx_timer = None;
                }
            }
            if let Some(resume) = &state.tx_resume {
                let fd = resume.as_raw_fd();
                if let Err(e) = handler.register_listener(fd, EventSet::IN, self.resume_event()) {
                    log::warn!("pair {pair}: cannot watch the tx resume event ({e}): a busy tx ring can hold its worker");
                    state.tx_resume = None;
                }
            }
        }
    }

    /// Logs each pair's counters (at the end of a connection).
    pub fn report(&self) {
        for (pair, state) in self.pairs.iter().enumerate() {
            let Stats {
                rx_frames,
                rx_dropped,
                tx_frames,
                tx_dropped,
                bad_chains,
            } = lock(state).worker.stats();
            log::info!(
                "pair {pair}: received {rx_frames} frames ({rx_dropped} dropped), sent {tx_frames} ({tx_dropped} dropped), {bad_chains} malformed chains"
            );
        }
    }

    /// The epoll event id of the tap: past the queues and the exit event.
    fn tap_event(&self) -> u64 {
        self.device.num_queues() as u64 + 1
    }

    /// The epoll event id of the pair's rx timer.
    fn rx_timer_event(&self) -> u64 {
        self.tap_event() + 1
    }

    /// The epoll event id of the pair's tx resume event.
    fn resume_event(&self) -> u64 {
        self.tap_event() + 2
    }

    fn config(&self) -> NetConfig {
        NetConfig::from_features(self.acked.load(Ordering::Relaxed))
    }

    fn memory(&self) -> Option<Mem> {
        self.mem.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Brings the worker back to the pair's rx after `after`.
    fn arm_rx_timer(pair: usize, state: &mut PairState, after: Duration) {
        if let Some(timer) = state.rx_timer.as_mut() {
            if let Err(e) = timer.reset(after, None) {
                log::warn!("pair {pair}: cannot set the rx timer: {e}");
            }
        }
    }

    /// Adds the pair's tap queue to its worker's epoll set, or removes it.
    fn watch(&self, pair: usize, state: &mut PairState, on: bool) {
        if state.watching == on {
            return;
        }
        let handler = self
            .handlers
            .get()
            .and_then(|h| h.get(pair))
            .and_then(Weak::upgrade);
        let (Some(handler), Some(tap)) = (handler, self.device.taps.get(pair)) else {
            return;
        };
        let fd = tap.as_raw_fd();
        let result = if on {
            handler.register_listener(fd, EventSet::IN, self.tap_event())
        } else {
            handler.unregister_listener(fd, EventSet::IN, self.tap_event())
        };
        match result {
            Ok(()) => state.watching = on,
            Err(e) => log::error!("pair {pair}: cannot change the worker's watch of the tap: {e}"),
        }
    }

    fn usable(guard: &StateGuard<'_>) -> bool {
        guard.get_queue().ready() && guard.is_enabled()
    }

    /// Attaches the pair's queue to its tap made again after a deletion;
    /// false (and the timer set to look again) while that cannot be done.
    fn reattach(pair: usize, state: &mut PairState, tap: &Tap) -> bool {
        match tap.reattach() {
            Ok(true) => {
                log::warn!(
                    "pair {pair}: tap {} is back, and its queue attached again",
                    tap.name()
                );
                state.tap_gone = false;
                state.tap_failed = false;
                return true;
            }
            Ok(false) => {}
            Err(e) => {
                if !state.reattach_failed {
                    log::error!(
                        "pair {pair}: {}; trying again every {TAP_REATTACH:?}",
                        vmm_common::error_chain::render(&e)
                    );
                    state.reattach_failed = true;
                }
            }
        }
        Self::arm_rx_timer(pair, state, TAP_REATTACH);
        false
    }

    /// Moves frames from the tap into the rx ring.
    fn rx(&self, pair: usize, vring: &VringRwLock) {
        let (Some(tap), Some(state)) = (self.device.taps.get(pair), self.pairs.get(pair)) else {
            return;
        };
        let mut state = lock(state);
        if state.rx_vring.is_none() {
            state.rx_vring = Some(vring.clone());
        }
        if state.rx_broken {
            self.watch(pair, &mut state, false);
            return;
        }
        let Some(atomic) = self.memory() else {
            self.watch(pair, &mut state, false);
            return;
        };
        let mem = atomic.memory();
        let mut guard = vring.get_mut();
        if !Self::usable(&guard) {
            drop(guard);
            self.watch(pair, &mut state, false);
            if state.tap_gone {
                // Nothing may wake the worker when the pair is enabled
                // again (SET_VRING_ENABLE reaches no hook, and a full rx
                // ring is not kicked): the timer goes on looking.
                Self::arm_rx_timer(pair, &mut state, TAP_REATTACH);
            } else {
                // Steer the tap's frames to the pairs in use.
                steer(pair, tap, false);
            }
            return;
        }
        if state.tap_gone && !Self::reattach(pair, &mut state, tap) {
            return;
        }
        steer(pair, tap, true);
        let outcome = state
            .worker
            .rx(tap, guard.get_queue_mut(), &mem, self.config());
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(e) => {
                drop(guard);
                ring_broken(pair, &mut state.rx_broken, RX_QUEUE, &e);
                self.watch(pair, &mut state, false);
                return;
            }
        };
        if outcome.used > 0 {
            notify(pair, &mut guard, &mem);
        }
        drop(guard);
        match outcome.stop {
            RxStop::NoBuffers => {
                self.watch(pair, &mut state, false);
                if tap.detachable() {
                    Self::arm_rx_timer(pair, &mut state, ENABLED_CHECK);
                }
            }
            RxStop::TapEmpty | RxStop::Budget => {
                state.tap_failed = false;
                self.watch(pair, &mut state, true);
            }
            RxStop::Malformed => {
                state.tap_failed = false;
                self.watch(pair, &mut state, true);
                Self::arm_rx_timer(pair, &mut state, MALFORMED_PAUSE);
            }
            RxStop::TapError(e) if Tap::is_gone(&e) => {
                log::warn!(
                    "pair {pair}: tap {} is gone (deleted): frames are dropped until an interface of that name is back, which is looked for every {TAP_REATTACH:?}",
                    tap.name()
                );
                state.tap_gone = true;
                state.reattach_failed = false;
                self.watch(pair, &mut state, false);
                // It may be back already (deleted and made again at once).
                if Self::reattach(pair, &mut state, tap) {
                    self.watch(pair, &mut state, true);
                }
            }
            RxStop::TapError(e) => {
                if !state.tap_failed {
                    log::error!(
                        "pair {pair}: reading tap {} failed: {e}; retrying every {TAP_RETRY:?} and at rx kicks",
                        tap.name()
                    );
                    state.tap_failed = true;
                }
                // A tap that keeps failing may keep looking readable: it
                // is left out of the epoll set, and read again later.
                self.watch(pair, &mut state, false);
                Self::arm_rx_timer(pair, &mut state, TAP_RETRY);
            }
        }
    }

    /// Sends the tx ring's frames to the tap until no more arrive once
    /// notifications are back on, or its budget is spent (the resume event
    /// then brings the worker back once it has served the pair's other
    /// events).
    fn tx(&self, pair: usize, vring: &VringRwLock) {
        let (Some(tap), Some(state)) = (self.device.taps.get(pair), self.pairs.get(pair)) else {
            return;
        };
        let mut state = lock(state);
        if state.tx_broken {
            return;
        }
        let Some(atomic) = self.memory() else { return };
        let mem = atomic.memory();
        let cfg = self.config();
        let mut guard = vring.get_mut();
        if !Self::usable(&guard) {
            return;
        }
        // A gone tap has no queue to attach; rx looks for it to come back.
        if !state.tap_gone {
            let attaching = !tap.is_attached();
            steer(pair, tap, true);
            if attaching && !state.watching {
                // Until rx runs, nothing would see the pair disabled.
                Self::arm_rx_timer(pair, &mut state, ENABLED_CHECK);
            }
        }
        let budget = if state.tx_resume.is_some() {
            TX_BUDGET
        } else {
            // Nothing would bring the worker back for what is left.
            TX_UNBOUNDED
        };
        let mut ring = LockedRing {
            pair,
            guard: &mut guard,
        };
        match state.worker.tx_run(tap, &mut ring, &mem, cfg, budget) {
            Ok(TxEnd::Idle) => {}
            Ok(TxEnd::Budget) => {
                // Level-triggered: the worker serves its other events,
                // then comes back here.
                if let Some(Err(e)) = state.tx_resume.as_ref().map(|r| r.write(1)) {
                    log::error!("pair {pair}: cannot schedule the rest of the tx ring: {e}");
                }
            }
            Err(e) => ring_broken(pair, &mut state.tx_broken, TX_QUEUE, &e),
        }
    }
}

/// The tx ring under its lock, as the worker's tx loop sees it.
struct LockedRing<'a, 'g> {
    pair: usize,
    guard: &'a mut StateGuard<'g>,
}

impl TxRing for LockedRing<'_, '_> {
    fn queue(&mut self) -> &mut Queue {
        self.guard.get_queue_mut()
    }

    fn signal(&mut self, mem: &GuestMemoryMmap) {
        notify(self.pair, self.guard, mem);
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    fn features(&self) -> u64 {
        features::offered(self.device.taps.len())
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // No CONFIG: the VMM serves the configuration space.
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Relaxed);
        let cfg = NetConfig::from_features(features);
        let offload = features::tun_offload(features);
        for tap in &self.device.taps {
            match tap.set_vnet_hdr_len(cfg.hdr_len) {
                Ok(()) => {}
                Err(e) if Tap::is_gone(&e) => log::info!(
                    "tap {} is gone: its header length is set when it is back",
                    tap.name()
                ),
                Err(e) => log::error!("tap {}: cannot set the header length: {e}", tap.name()),
            }
            match tap.set_offload(offload) {
                Ok(()) => {}
                Err(e) if Tap::is_gone(&e) => log::info!(
                    "tap {} is gone: its offloads are set when it is back",
                    tap.name()
                ),
                Err(e) => log::warn!("tap {}: cannot set offloads {offload:#x}: {e}", tap.name()),
            }
        }
        log::debug!(
            "features {features:#x}: {}-byte headers, mergeable rx buffers {}, tap offloads {offload:#x}",
            cfg.hdr_len,
            cfg.mrg_rxbuf
        );
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets it on each ring's Queue, which acts on it.
    }

    /// Not offered (no CONFIG protocol feature): an empty answer, which
    /// vhost-user reads as a failure.
    fn get_config(&self, _offset: u32, _size: u32) -> Vec<u8> {
        Vec::new()
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        vmm_common::lost_memory::watch(mem.memory().into_inner());
        *self.mem.write().unwrap_or_else(|p| p.into_inner()) = Some(mem);
        Ok(())
    }

    /// One thread per pair: queues 2p (rx) and 2p + 1 (tx).
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.device.taps.len())
            .map(|pair| 0b11u64 << (2 * pair))
            .collect()
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

    /// The device is reset: the frontend sets every ring up again, so
    /// broken ones are served again.
    fn reset_device(&self) {
        for state in self.pairs.iter() {
            let mut state = lock(state);
            state.rx_broken = false;
            state.tx_broken = false;
        }
    }

    /// The ring stops (GET_VRING_BASE): rx buffers taken ahead go back, so
    /// that the base reported covers only buffers used. A broken ring is
    /// served again once the frontend has set it up again.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let pair = (queue_index / 2) as usize;
        let Some(state) = self.pairs.get(pair) else {
            return Ok(());
        };
        let mut state = lock(state);
        if queue_index % 2 != 0 {
            state.tx_broken = false;
            return Ok(());
        }
        state.rx_broken = false;
        let (Some(vring), Some(atomic)) = (state.rx_vring.clone(), self.memory()) else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut guard = vring.get_mut();
        match state.worker.release_rx(guard.get_queue_mut(), &mem) {
            Ok(0) => {}
            Ok(_) => notify(pair, &mut guard, &mem),
            Err(e) => log::warn!("pair {pair}: cannot give back rx buffers: {e}"),
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let pair = thread_id;
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else {
            return Err(io::Error::other(format!("pair {pair} has no rings")));
        };
        match device_event {
            RX_QUEUE => self.rx(pair, rx),
            TX_QUEUE => self.tx(pair, tx),
            // The tap is readable (or failed: the read tells).
            e if u64::from(e) == self.tap_event() => self.rx(pair, rx),
            e if u64::from(e) == self.rx_timer_event() => {
                if let Some(state) = self.pairs.get(pair) {
                    if let Some(timer) = lock(state).rx_timer.as_mut() {
                        // Never blocks: nothing to read if it was set again.
                        let _ = timer.wait();
                    }
                }
                self.rx(pair, rx);
            }
            e if u64::from(e) == self.resume_event() => {
                if let Some(state) = self.pairs.get(pair) {
                    if let Some(resume) = &lock(state).tx_resume {
                        // Non-blocking: nothing to read is fine.
                        let _ = resume.read();
                    }
                }
                self.tx(pair, tx);
            }
            e => return Err(io::Error::other(format!("unknown event {e}"))),
        }
        Ok(())
    }
}
