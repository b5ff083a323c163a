//! The transmit path: each chain (virtio-net header, then the frame) is
//! written to the tap straight from guest memory, a batch of chains at a
//! time (one system call for the batch on a tap).

use std::io;

use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::GuestMemoryMmap;

use super::chain::collect;
use super::{complete, Counters, FrameIo};
use crate::features::{NetConfig, MAX_FRAME};
use crate::iovec::{IoVecs, IovStorage};

/// An Ethernet header: the shortest frame the tap takes.
const ETH_HLEN: usize = 14;

/// The most chains sent with one call.
pub const TX_BATCH: usize = 64;

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
/// a ring ahead, or it is not ready).
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
    // An available index more than a ring ahead (or a ring not ready) is
    // an error, not an empty ring: the caller stops serving the ring.
    for chain in q.iter(mem)?.take(TX_BATCH) {
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
