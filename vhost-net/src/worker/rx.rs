//! The receive path: frames read from the tap straight into the guest's
//! rx buffers.
//!
//! Chains are taken from the ring ahead of need ("held") so that one readv
//! can spread a frame over as many buffers as it may need: one chain
//! without MRG_RXBUF; with it, chains worth a largest frame (or as many as
//! the ring has). The readv ends with an overflow area of this process, so
//! a frame longer than the buffers is noticed, never cut: without
//! MRG_RXBUF it is dropped (the chain is kept for the next frame); with
//! MRG_RXBUF its tail waits in the overflow area until the guest adds
//! buffers, and is copied into them. Held chains the frame did not need
//! stay held for the next frame, and go back to the ring when it stops.

use std::collections::VecDeque;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};
use vmm_common::avail::next_chain;

use super::chain::{collect, ring_descriptors, Seg, MAX_SEGS};
use super::{complete, Counters, FrameIo};
use crate::features::{NetConfig, HDR_LEN, MAX_FRAME};
use crate::iovec::{IoVecs, MAX_IOVECS};

/// Frames read per call (moved or dropped), so that the pair's tx queue
/// gets its turn (the tap stays readable, so the worker comes back at once).
pub(super) const BUDGET: usize = 64;
/// Where `num_buffers` sits in the 12-byte header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Why `process` returned.
#[derive(Debug)]
pub enum RxStop {
    /// No frame is waiting in the tap.
    TapEmpty,
    /// The ring has no buffers left; notifications are enabled, so the
    /// guest kicks when it adds some.
    NoBuffers,
    /// `BUDGET` frames were read; more may be waiting.
    Budget,
    /// A ring's worth of malformed chains was completed: more chains may
    /// wait, and a frame part-received (not in the tap any more) with
    /// them, which no kick may announce (the guest posted them already):
    /// the worker must come back by itself.
    Malformed,
    /// Reading the tap failed; notifications are enabled, so the guest
    /// kicks when it adds buffers.
    TapError(std::io::Error),
}

#[derive(Debug)]
pub struct RxOutcome {
    /// Chains put in the used ring.
    pub used: u32,
    pub stop: RxStop,
}

/// A chain taken from the ring and not used yet.
struct Held {
    head: u16,
    /// The avail ring position it was taken from.
    pos: u16,
    segs: Vec<Seg>,
    cap: usize,
    /// Ring descriptors it takes.
    descs: usize,
}

/// A frame read past the held buffers (MRG_RXBUF only): its first
/// `in_chains` bytes fill the first `chains` held chains, the other `tail`
/// bytes are at the start of the overflow area.
#[derive(Clone, Copy, Debug)]
struct Pending {
    chains: usize,
    in_chains: usize,
    tail: usize,
}

/// What one readv produced.
enum Read {
    Frame {
        len: usize,
        /// Held chains the readv covered, and their bytes.
        chains: usize,
        cap: usize,
        /// Bytes the readv could take (the chains and the overflow area).
        room: usize,
    },
    Stop(RxStop),
    /// Held chain `index` is no longer inside guest memory.
    Gone(usize),
}

pub struct Rx {
    held: VecDeque<Held>,
    held_bytes: usize,
    held_segs: usize,
    /// Ring descriptors the held chains take.
    held_descs: usize,
    pending: Option<Pending>,
    overflow: Box<[u8]>,
}

impl Rx {
    pub fn new() -> Self {
        Rx {
            held: VecDeque::new(),
            held_bytes: 0,
            held_segs: 0,
            held_descs: 0,
            pending: None,
            // One byte more than the largest frame: a frame that fills it
            // was cut short.
            overflow: vec![0u8; HDR_LEN + MAX_FRAME + 1].into_boxed_slice(),
        }
    }

    pub fn process<T: FrameIo>(
        &mut self,
        tap: &T,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        cfg: NetConfig,
        c: &mut Counters,
    ) -> Result<RxOutcome, virtio_queue::Error> {
        let mut used = 0u32;
        let mut reads = 0usize;
        let mut malformed = 0usize;
        // No kicks are needed while there are buffers.
        q.disable_notification(mem)?;
        loop {
            if self.fill(q, mem, cfg, c, &mut used, &mut malformed)? {
                // A ring's worth of malformed chains: the rest wait for the
                // next run, which the caller schedules (`Malformed`), so a
                // guest that keeps offering them cannot hold the worker and
                // its locks.
                q.enable_notification(mem)?;
                return Ok(RxOutcome {
                    used,
                    stop: RxStop::Malformed,
                });
            }
            let ready = match self.pending {
                Some(p) => self.held_bytes >= p.in_chains + p.tail,
                None => !self.held.is_empty(),
            };
            if !ready && self.pending.is_some() && self.held_descs >= usize::from(q.size()) {
                // Every descriptor of the ring is in a held chain (so the
                // guest can offer no more buffers), and the frame still
                // does not fit: it never will.
                self.pending = None;
                c.dropped(true, &"larger than the whole rx ring");
                continue;
            }
            if !ready {
                // Out of buffers. Ask for a kick, then look once more: the
                // guest may have added buffers before it saw the request.
                if q.enable_notification(mem)? {
                    q.disable_notification(mem)?;
                    continue;
                }
                return Ok(RxOutcome {
                    used,
                    stop: RxStop::NoBuffers,
                });
            }
            if let Some(p) = self.pending.take() {
                if self.finish(q, mem, cfg, p, &mut used)? {
                    c.stats.rx_frames += 1;
                } else {
                    c.dropped(true, &"its buffers left guest memory");
                }
                continue;
            }
            // Checked only here, with no frame pending: a frame whose tail
            // waits in the overflow area is not in the tap, and its
            // readiness would not bring the worker back for it.
            if reads == BUDGET {
                return Ok(RxOutcome {
                    used,
                    stop: RxStop::Budget,
                });
            }
            match self.read(tap, mem, cfg) {
                Read::Stop(RxStop::TapEmpty) => {
                    return Ok(RxOutcome {
                        used,
                        stop: RxStop::TapEmpty,
                    })
                }
                Read::Stop(stop) => {
                    // The backend stops watching the tap: only a kick (or
                    // its own retry) runs this again, so the guest must be
                    // asked for kicks.
                    q.enable_notification(mem)?;
                    return Ok(RxOutcome { used, stop });
                }
                Read::Gone(index) => {
                    if let Some(h) = self.take(index) {
                        c.bad_chain("rx", h.head, &"its buffers left guest memory");
                        complete(q, mem, h.head, 0, &mut used)?;
                    }
                }
                Read::Frame {
                    len,
                    chains,
                    cap,
                    room,
                } => {
                    reads += 1;
                    if len < cfg.hdr_len {
                        c.dropped(true, &format_args!("{len} bytes, shorter than a header"));
                    } else if len >= room {
                        c.dropped(true, &format_args!("{len} bytes, more than a frame can be"));
                    } else if len <= cap {
                        self.deliver(q, mem, cfg, len, &mut used)?;
                        c.stats.rx_frames += 1;
                    } else if !cfg.mrg_rxbuf {
                        let why = format_args!(
                            "{} bytes do not fit the {}-byte rx chain (no MRG_RXBUF)",
                            len - cfg.hdr_len,
                            cap.saturating_sub(cfg.hdr_len)
                        );
                        c.dropped(true, &why);
                    } else {
                        self.pending = Some(Pending {
                            chains,
                            in_chains: cap,
                            tail: len - cap,
                        });
                    }
                }
            }
        }
    }

    /// Takes chains from the ring until the held ones are enough for the
    /// next frame (or the ring is empty). Malformed chains are completed
    /// empty at once, and counted in `malformed`: true, with nothing more
    /// taken, once a ring's worth of them has been.
    fn fill(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        cfg: NetConfig,
        c: &mut Counters,
        used: &mut u32,
        malformed: &mut usize,
    ) -> Result<bool, virtio_queue::Error> {
        loop {
            if *malformed >= usize::from(q.size()) {
                return Ok(true);
            }
            let enough = match self.pending {
                Some(p) => self.held_bytes >= p.in_chains + p.tail,
                None if cfg.mrg_rxbuf => {
                    self.held_bytes >= cfg.hdr_len + MAX_FRAME || self.held_segs >= MAX_SEGS
                }
                None => !self.held.is_empty(),
            };
            if enough {
                return Ok(false);
            }
            let pos = q.next_avail();
            // An available index more than a ring ahead, or an entry
            // outside guest memory, is an error, not an empty ring: it would
            // otherwise look like buffers that never come, and `process`
            // would wait for them for ever (or spin).
            let Some(chain) = next_chain(q, mem)? else {
                return Ok(false);
            };
            let head = chain.head_index();
            let mut segs = Vec::new();
            // Each chain holds at least a header (with MRG_RXBUF, every
            // buffer must; without, the frame's chain must).
            let min = cfg.hdr_len as u64;
            match collect(chain, mem, true, min, u64::from(u32::MAX), &mut segs) {
                Ok(cap) => {
                    let cap = cap as usize;
                    let descs = usize::from(ring_descriptors(q, mem, head));
                    self.held_bytes += cap;
                    self.held_segs += segs.len();
                    self.held_descs += descs;
                    self.held.push_back(Held {
                        head,
                        pos,
                        segs,
                        cap,
                        descs,
                    });
                }
                Err(why) => {
                    *malformed += 1;
                    c.bad_chain("rx", head, &why);
                    complete(q, mem, head, 0, used)?;
                }
            }
        }
    }

    fn take(&mut self, index: usize) -> Option<Held> {
        let h = self.held.remove(index)?;
        self.held_bytes -= h.cap;
        self.held_segs -= h.segs.len();
        self.held_descs -= h.descs;
        Some(h)
    }

    /// Reads one frame into the held chains it may need, then the overflow
    /// area.
    fn read<T: FrameIo>(&mut self, tap: &T, mem: &GuestMemoryMmap, cfg: NetConfig) -> Read {
        let Rx { held, overflow, .. } = self;
        let mut iov = IoVecs::reserving(1);
        let (mut chains, mut cap) = (0, 0);
        for (index, h) in held.iter().enumerate() {
            let enough = if cfg.mrg_rxbuf {
                cap >= cfg.hdr_len + MAX_FRAME
            } else {
                chains == 1
            };
            if enough || iov.count() + h.segs.len() >= MAX_IOVECS {
                break;
            }
            for seg in &h.segs {
                if iov.push_guest(mem, seg.addr, seg.len).is_err() {
                    // Checked when taken: guest memory changed since.
                    return Read::Gone(index);
                }
            }
            chains += 1;
            cap += h.cap;
        }
        if chains == 0 {
            return Read::Stop(RxStop::NoBuffers);
        }
        // `reserving(1)` kept room for it.
        let _ = iov.push_local(overflow);
        let room = iov.len();
        match tap.read_frame(&iov) {
            Ok(Some(len)) => Read::Frame {
                len,
                chains,
                cap,
                room,
            },
            Ok(None) => Read::Stop(RxStop::TapEmpty),
            Err(e) => Read::Stop(RxStop::TapError(e)),
        }
    }

    /// Completes a frame of `len` bytes (header included) that fits the
    /// first held chains.
    fn deliver(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        cfg: NetConfig,
        len: usize,
        used: &mut u32,
    ) -> Result<(), virtio_queue::Error> {
        let mut lens = Vec::new();
        let mut left = len;
        for h in &self.held {
            let n = left.min(h.cap);
            lens.push(n);
            left -= n;
            if left == 0 {
                break;
            }
        }
        self.complete_frame(q, mem, cfg, &lens, used)
    }

    /// Copies the tail of a pending frame into the chains after the ones
    /// its head filled, then completes it. False if guest memory changed
    /// under the chains (the frame is dropped, the chains kept).
    fn finish(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        cfg: NetConfig,
        p: Pending,
        used: &mut u32,
    ) -> Result<bool, virtio_queue::Error> {
        let mut lens: Vec<usize> = self.held.iter().take(p.chains).map(|h| h.cap).collect();
        let mut tail = self.overflow.get(..p.tail).unwrap_or_default();
        for h in self.held.iter().skip(p.chains) {
            if tail.is_empty() {
                break;
            }
            let n = tail.len().min(h.cap);
            if !write_at(mem, &h.segs, 0, &tail[..n]) {
                return Ok(false);
            }
            lens.push(n);
            tail = &tail[n..];
        }
        if !tail.is_empty() {
            // `process` only calls this with room for the whole tail.
            return Ok(false);
        }
        self.complete_frame(q, mem, cfg, &lens, used)?;
        Ok(true)
    }

    /// Writes `num_buffers`, then puts the first `lens.len()` held chains
    /// in the used ring with those lengths.
    fn complete_frame(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        cfg: NetConfig,
        lens: &[usize],
        used: &mut u32,
    ) -> Result<(), virtio_queue::Error> {
        if cfg.hdr_len == HDR_LEN {
            // Without MRG_RXBUF the field is there (VERSION_1) and says 1.
            let count = u16::try_from(lens.len()).unwrap_or(u16::MAX);
            if let Some(first) = self.held.front() {
                // The chain is inside guest memory (it was just written).
                let _ = write_at(mem, &first.segs, NUM_BUFFERS_OFFSET, &count.to_le_bytes());
            }
        }
        for &n in lens {
            let Some(h) = self.take(0) else { break };
            // A chain holds at most u32::MAX bytes (checked when taken).
            complete(q, mem, h.head, u32::try_from(n).unwrap_or(u32::MAX), used)?;
        }
        Ok(())
    }

    /// Gives the held chains back: the ring's next index moves back over
    /// them when they are the last ones taken, in order; otherwise (a
    /// malformed chain was completed between them) they are completed empty.
    pub fn release(
        &mut self,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        c: &mut Counters,
    ) -> Result<u32, virtio_queue::Error> {
        if self.pending.take().is_some() {
            c.dropped(true, &"the rx ring stopped");
        }
        // Let go of first: a chain is given back at most once, even if
        // completing one of them fails half way.
        let held = std::mem::take(&mut self.held);
        self.held_bytes = 0;
        self.held_segs = 0;
        self.held_descs = 0;
        let k = held.len();
        let next = q.next_avail();
        let in_order = held
            .iter()
            .enumerate()
            .all(|(i, h)| h.pos == next.wrapping_sub((k - i) as u16));
        let mut used = 0;
        if in_order {
            q.set_next_avail(next.wrapping_sub(k as u16));
        } else {
            for h in &held {
                complete(q, mem, h.head, 0, &mut used)?;
            }
        }
        Ok(used)
    }
}

/// Writes `data` at byte `offset` of a chain's buffers; false if it does
/// not fit or a buffer is outside guest memory.
fn write_at(mem: &GuestMemoryMmap, segs: &[Seg], offset: usize, data: &[u8]) -> bool {
    let mut skip = offset;
    let mut data = data;
    for s in segs {
        if data.is_empty() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(data.len());
        let Some(addr) = s.addr.checked_add(skip as u64) else {
            return false;
        };
        if mem.write_slice(&data[..n], addr).is_err() {
            return false;
        }
        data = &data[n..];
        skip = 0;
    }
    data.is_empty()
}
