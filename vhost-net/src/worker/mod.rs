//! One queue pair's data path: frames from the tx queue to the tap, and
//! from the tap into the rx queue. Works on a virtio-queue `Queue` and guest
//! memory and knows nothing of sockets or threads; the tests drive it with
//! virtio-queue's mock rings and an in-memory tap.
//!
//! A malformed chain (an address outside guest memory, a buffer of the wrong
//! direction, no end, too many buffers, a frame too short or too long) is
//! completed with length 0 and counted; a frame that does not fit is dropped
//! and counted. Neither stops the queue.

mod chain;
mod rx;
mod tx;

#[cfg(test)]
mod tests;

use std::fmt::Display;
use std::io;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

pub use rx::{RxOutcome, RxStop};
pub use tx::{TxBudget, TxEnd, TxRing, TX_BATCH};

use crate::features::NetConfig;
use crate::iovec::IoVecs;

/// Where frames (each behind its virtio-net header) come from and go to:
/// a tap queue, or an in-memory one in tests.
pub trait FrameIo {
    /// Reads one frame into `iov`; `None` when no frame is waiting. The
    /// length returned is the frame's, which may exceed `iov.len()` when
    /// it was cut short.
    fn read_frame(&self, iov: &IoVecs<'_>) -> io::Result<Option<usize>>;
    /// Writes one frame made of `iov`.
    fn write_frame(&self, iov: &IoVecs<'_>) -> io::Result<usize>;
    /// Writes each of `frames`, in order; `results` gets one result per
    /// frame. A tap does it with one system call.
    fn write_frames(&self, frames: &[IoVecs<'_>], results: &mut Vec<io::Result<usize>>) {
        results.clear();
        results.extend(frames.iter().map(|f| self.write_frame(f)));
    }
}

/// Per-pair counters, reported when a frontend disconnects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub rx_frames: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_dropped: u64,
    /// Chains completed unused because they were malformed.
    pub bad_chains: u64,
}

/// At most one report a second; counts the ones it held back.
#[derive(Debug, Default)]
struct LogLimit {
    next: Option<Instant>,
    held_back: u64,
}

impl LogLimit {
    const INTERVAL: Duration = Duration::from_secs(1);

    /// `Some(reports held back since the last one)` when one may be logged.
    fn check(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|next| now < next) {
            self.held_back += 1;
            return None;
        }
        self.next = Some(now + Self::INTERVAL);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// " (N more reports held back)" when N > 0.
struct HeldBack(u64);

impl Display for HeldBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " ({n} more reports held back)"),
        }
    }
}

/// Counting and rate-limited reporting of what a pair dropped.
#[derive(Debug, Default)]
struct Counters {
    pair: usize,
    stats: Stats,
    limit: LogLimit,
}

impl Counters {
    /// A malformed chain: the guest's driver is broken (warn).
    fn bad_chain(&mut self, queue: &str, head: u16, why: &dyn Display) {
        self.stats.bad_chains += 1;
        if let Some(held_back) = self.limit.check() {
            log::warn!(
                "pair {} {queue} chain {head} dropped: {why}{}",
                self.pair,
                HeldBack(held_back)
            );
        }
    }

    /// A frame lost on the way (debug: networks drop frames).
    fn dropped(&mut self, rx: bool, why: &dyn Display) {
        if rx {
            self.stats.rx_dropped += 1;
        } else {
            self.stats.tx_dropped += 1;
        }
        if let Some(held_back) = self.limit.check() {
            log::debug!(
                "pair {} {} frame dropped: {why}{}",
                self.pair,
                if rx { "rx" } else { "tx" },
                HeldBack(held_back)
            );
        }
    }
}

/// Puts `head` in the used ring with `len` bytes written. A head the
/// guest made up (outside the queue) cannot be: it is only counted.
fn complete(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    used: &mut u32,
) -> Result<(), virtio_queue::Error> {
    if head >= q.size() {
        return Ok(());
    }
    q.add_used(mem, head, len)?;
    *used += 1;
    Ok(())
}

/// A queue pair's state for one connection.
pub struct Pair {
    counters: Counters,
    rx: rx::Rx,
    /// Reused by every tx batch.
    tx: tx::TxScratch,
}

impl Pair {
    pub fn new(index: usize) -> Self {
        Pair {
            counters: Counters {
                pair: index,
                ..Counters::default()
            },
            rx: rx::Rx::new(),
            tx: tx::TxScratch::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.counters.stats
    }

    /// Sends a batch of the chains available on the tx queue (at most
    /// `TX_BATCH`) to `tap`; returns the number of chains completed, 0 when
    /// the queue is empty. (The backend uses `tx_run`.)
    #[cfg(test)]
    pub fn tx<T: FrameIo>(
        &mut self,
        tap: &T,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        cfg: NetConfig,
    ) -> Result<u32, virtio_queue::Error> {
        tx::process(tap, q, mem, cfg, &mut self.tx, &mut self.counters)
    }

    /// Sends the tx ring's frames to `tap` until the ring stays empty with
    /// notifications enabled (`Idle`) or `budget` is spent (`Budget`: the
    /// caller must come back, as the guest may not kick again).
    pub fn tx_run<T: FrameIo, R: TxRing>(
        &mut self,
        tap: &T,
        ring: &mut R,
        mem: &GuestMemoryMmap,
        cfg: NetConfig,
        budget: TxBudget,
    ) -> Result<TxEnd, virtio_queue::Error> {
        tx::run(
            tap,
            ring,
            mem,
            cfg,
            budget,
            &mut self.tx,
            &mut self.counters,
        )
    }

    /// Moves frames from `tap` into the rx queue until the tap is empty,
    /// the queue has no buffers left (notifications are then enabled), or
    /// a budget is spent.
    pub fn rx<T: FrameIo>(
        &mut self,
        tap: &T,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        cfg: NetConfig,
    ) -> Result<RxOutcome, virtio_queue::Error> {
        self.rx.process(tap, q, mem, cfg, &mut self.counters)
    }

    /// Gives back the rx buffers taken from the ring but not used (when
    /// the ring stops); returns the chains completed empty (when they
    /// could not be handed back by moving the ring's index).
    pub fn release_rx(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<u32, virtio_queue::Error> {
        self.rx.release(q, mem, &mut self.counters)
    }
}
