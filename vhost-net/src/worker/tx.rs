//! The transmit path: each chain (virtio-net header, then the frame) is
//! written to the tap straight from guest memory, a batch of chains at a
//! time (one system call for the batch on a tap).

use std::io;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_common::avail::next_chain;
use vmm_common::ring_watch::{avail_within, Pause};

use super::chain::collect;
use super::{complete, Counters, FrameIo};
use crate::features::{NetConfig, MAX_FRAME};
use crate::iovec::{IoVecs, IovStorage};

/// An Ethernet header: the shortest frame the tap takes.
const ETH_HLEN: usize = 14;

/// The most chains sent with one call.
pub const TX_BATCH: usize = 64;
/// While the sender keeps the ring busy, tx completions are signalled
/// once per this fraction of the ring: often enough that it refills the
/// ring before it runs dry, seldom enough to spare it most wake-ups.
const TX_SIGNAL_FRACTION: u32 = 2;

/// How much one `run` may do before it lets the worker serve the pair's
/// other events (its rx ring, the tap, a ring stop, the worker's exit).
#[derive(Clone, Copy, Debug)]
pub struct TxBudget {
    /// Chains completed (checked between batches, so up to a batch more).
    pub chains: u32,
    /// Time spent, looking for more frames included.
    pub time: Duration,
    /// How long to look for more frames after a batch before sleeping.
    pub poll: Duration,
}

/// The tx ring as `run` sees it: its queue, and the guest's interrupt.
pub trait TxRing {
    fn queue(&mut self) -> &mut Queue;
    /// Tells the guest about the chains used, if it asked to be told.
    fn signal(&mut self, mem: &GuestMemoryMmap);
}

/// Why `run` returned.
#[derive(Debug, PartialEq, Eq)]
pub enum TxEnd {
    /// The ring is empty and notifications are enabled: the guest kicks
    /// when it adds frames.
    Idle,
    /// The budget is spent and frames may be left: the caller must run
    /// again soon, as the guest may not kick for them.
    Budget,
}

/// What the transmit path keeps between batches, so that a batch
/// allocates nothing.
#[derive(Default)]
pub struct TxScratch {
    /// The batch's heads, in ring order.
    heads: Vec<u16>,
    results: Vec<io::Result<usize>>,
    /// Iovec arrays of past batches, emptied.
    storage: Vec<IovStorage>,
}

/// Sends one batch of available chains (at most `TX_BATCH`); returns how
/// many were completed (0: the ring is empty). Fails, having taken no
/// chain, when the ring cannot be read (its available index is more than
/// a ring ahead, it is not ready, or its next entry is outside guest
/// memory).
pub fn process<T: FrameIo>(
    tap: &T,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    cfg: NetConfig,
    scratch: &mut TxScratch,
    c: &mut Counters,
) -> Result<u32, virtio_queue::Error> {
    let min = (cfg.hdr_len + ETH_HLEN) as u64;
    let max = (cfg.hdr_len + MAX_FRAME) as u64;
    let mut frames: Vec<IoVecs<'_>> = Vec::with_capacity(TX_BATCH);
    scratch.heads.clear();
    // An available index more than a ring ahead, a ring not ready, or an
    // entry outside guest memory is an error, not an empty ring: the
    // caller stops serving the ring. Found after some chains were taken,
    // it ends the batch; they are sent and completed, and the next call
    // fails before it takes any.
    while scratch.heads.len() < TX_BATCH {
        let chain = match next_chain(q, mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => break,
            Err(e) if scratch.heads.is_empty() => return Err(e),
            Err(_) => break,
        };
        let head = chain.head_index();
        scratch.heads.push(head);
        let mut iov = IoVecs::reusing(scratch.storage.pop().unwrap_or_default(), 0);
        match collect(chain, mem, false, min, max, &mut iov) {
            Ok(_) => frames.push(iov),
            Err(why) => {
                c.bad_chain("tx", head, &why);
                scratch.storage.push(iov.into_storage());
            }
        }
    }
    if !frames.is_empty() {
        tap.write_frames(&frames, &mut scratch.results);
        for result in scratch.results.drain(..) {
            match result {
                Ok(_) => c.stats.tx_frames += 1,
                // EAGAIN (the tap's socket buffer is full: it is INT_MAX
                // unless changed), EIO (the interface is down), EINVAL (a
                // header the kernel refuses): the frame is lost, as on a
                // wire.
                Err(e) => c.dropped(false, &e),
            }
        }
        scratch
            .storage
            .extend(frames.into_iter().map(IoVecs::into_storage));
    }
    // The frames have left guest memory: the chains go back. The device
    // writes nothing into a tx chain.
    let mut used = 0;
    for &head in &scratch.heads {
        complete(q, mem, head, 0, &mut used)?;
    }
    Ok(used)
}

/// Sends the ring's frames, batch by batch, until it stays empty with
/// notifications enabled or `budget` is spent. Completions are signalled
/// every so often while the ring is busy, and always before returning,
/// with an error too.
pub fn run<T: FrameIo, R: TxRing>(
    tap: &T,
    ring: &mut R,
    mem: &GuestMemoryMmap,
    cfg: NetConfig,
    budget: TxBudget,
    scratch: &mut TxScratch,
    c: &mut Counters,
) -> Result<TxEnd, virtio_queue::Error> {
    let started = Instant::now();
    let signal_batch = (u32::from(ring.queue().size()) / TX_SIGNAL_FRACTION).max(1);
    let mut unsignalled = 0;
    let mut sent = 0u32;
    let end = loop {
        if sent >= budget.chains || started.elapsed() >= budget.time {
            break Ok(TxEnd::Budget);
        }
        let q = ring.queue();
        if let Err(e) = q.disable_notification(mem) {
            break Err(e);
        }
        let used = match process(tap, q, mem, cfg, scratch, c) {
            Ok(used) => used,
            Err(e) => break Err(e),
        };
        sent = sent.saturating_add(used);
        unsignalled += used;
        if unsignalled >= signal_batch {
            ring.signal(mem);
            unsignalled = 0;
        }
        // A sender that keeps its ring full refills it within
        // microseconds: look for more for a moment before going back to
        // sleep, which saves its kick and our wake-up.
        if used > 0 && avail_within(ring.queue(), mem, budget.poll, Pause::Spin, || false) {
            continue;
        }
        if unsignalled > 0 {
            ring.signal(mem);
            unsignalled = 0;
        }
        match ring.queue().enable_notification(mem) {
            Ok(false) => break Ok(TxEnd::Idle),
            Ok(true) => {}
            Err(e) => break Err(e),
        }
    };
    // On an error too: chains completed before it (in earlier batches, or
    // earlier in the failed one) reach the driver.
    if unsignalled > 0 || end.is_err() {
        ring.signal(mem);
    }
    end
}
