//! The transmit path: each chain (virtio-net header, then the frame) is
//! written to the tap with one writev straight from guest memory.

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::{collect, Seg};
use super::{complete, Counters, FrameIo};
use crate::features::{NetConfig, MAX_FRAME};
use crate::iovec::IoVecs;

/// An Ethernet header: the shortest frame the tap takes.
const ETH_HLEN: usize = 14;

/// Sends every available chain; returns how many were completed.
pub fn process<T: FrameIo>(
    tap: &T,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    cfg: NetConfig,
    segs: &mut Vec<Seg>,
    c: &mut Counters,
) -> Result<u32, virtio_queue::Error> {
    let mut used = 0;
    let min = (cfg.hdr_len + ETH_HLEN) as u64;
    let max = (cfg.hdr_len + MAX_FRAME) as u64;
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match collect(chain, mem, false, min, max, segs) {
            Ok(_) => send(tap, mem, segs, c),
            Err(why) => c.bad_chain("tx", head, &why),
        }
        // The device writes nothing into a tx chain.
        complete(q, mem, head, 0, &mut used)?;
    }
    Ok(used)
}

fn send<T: FrameIo>(tap: &T, mem: &GuestMemoryMmap, segs: &[Seg], c: &mut Counters) {
    let mut iov = IoVecs::new();
    for s in segs {
        if let Err(e) = iov.push_guest(mem, s.addr, s.len) {
            // Checked by `collect` a moment ago; only a memory map that
            // changed since gets here.
            c.dropped(false, &e);
            return;
        }
    }
    match tap.write_frame(&iov) {
        Ok(_) => c.stats.tx_frames += 1,
        // EAGAIN (the tap's socket buffer is full: it is INT_MAX unless
        // changed), EIO (the interface is down), EINVAL (a header the
        // kernel refuses): the frame is lost, as on a wire.
        Err(e) => c.dropped(false, &e),
    }
}
