//! Asynchronous virtio-blk requests on one queue: up to `depth` in flight,
//! completions reaped from the used ring. One pipeline per thread; it owns
//! its queue and its request slots, and shares only the memory mapping.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::blk::{BlkError, Slot, S_UNWRITTEN, T_GET_ID, T_IN};
use crate::connection::Connection;
use crate::memory::Memory;
use crate::virtqueue::{Used, VirtQueue};

/// A request to submit: its data goes to or comes from the slot's buffer.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    pub len: u32,
}

/// A completed request.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub tag: u64,
    pub status: u8,
    pub used_len: u32,
    /// From `submit` to the reap that saw it.
    pub latency: Duration,
    /// Guest address of the request's data buffer: valid (see
    /// `Pipeline::read_data`) until the next `submit` reuses it.
    pub data: u64,
}

struct InFlight {
    slot: usize,
    tag: u64,
    start: Instant,
}

pub struct Pipeline {
    queue: VirtQueue,
    mem: Memory,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    /// By chain head.
    in_flight: Vec<Option<InFlight>>,
    unkicked: u16,
    used: Vec<Used>,
    /// How long `wait` watches the used ring before it sleeps.
    poll: Duration,
}

impl Pipeline {
    /// A pipeline on `queue` with `depth` slots of `max_len` data bytes,
    /// allocated from the connection's memory. A request takes three
    /// descriptors, so `depth` is capped at a third of the queue size.
    pub fn new(
        conn: &mut Connection,
        queue: VirtQueue,
        depth: usize,
        max_len: u32,
    ) -> Result<Self, BlkError> {
        // Each request takes 3 descriptors.
        let depth = depth.min(usize::from(queue.size) / 3).max(1);
        let slots = (0..depth)
            .map(|_| Slot::alloc(conn, max_len))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pipeline {
            mem: conn.memory.mem.clone(),
            free_slots: (0..depth).rev().collect(),
            in_flight: (0..queue.size).map(|_| None).collect(),
            queue,
            slots,
            unkicked: 0,
            used: Vec::with_capacity(depth),
            poll: Duration::ZERO,
        })
    }

    /// Makes `wait` watch the used ring for `poll` before it sleeps, as a
    /// polling guest driver does (none by default: it sleeps until the
    /// backend's call, as Linux's virtio-blk driver does).
    pub fn set_poll(&mut self, poll: Duration) {
        self.poll = poll;
    }

    /// The queue, for `Connection::resume` after its backend died.
    pub fn queue_mut(&mut self) -> &mut VirtQueue {
        &mut self.queue
    }

    pub fn index(&self) -> usize {
        self.queue.index
    }

    /// Most requests in flight at once.
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Queues `req` (not yet notified: see `kick`). `Ok(false)` when
    /// `depth` requests are already in flight.
    pub fn submit(&mut self, req: Request, tag: u64) -> Result<bool, BlkError> {
        let Some(&index) = self.free_slots.last() else {
            return Ok(false);
        };
        let slot = self.slots[index];
        if req.len > slot.capacity {
            return Err(BlkError::TooLarge {
                len: req.len as usize,
                max: slot.capacity,
            });
        }
        slot.prepare(&self.mem, req.kind, req.sector);
        let device_writes_data = matches!(req.kind, T_IN | T_GET_ID);
        let chain = slot.chain(req.len, device_writes_data);
        let Some(head) = self.queue.add(&self.mem, &chain)? else {
            return Ok(false);
        };
        self.free_slots.pop();
        self.in_flight[usize::from(head)] = Some(InFlight {
            slot: index,
            tag,
            start: Instant::now(),
        });
        self.unkicked = self.unkicked.saturating_add(1);
        Ok(true)
    }

    /// Fills the data buffer the next `submit` will use (a write's
    /// payload); false when the pipeline is full or `data` is too long.
    pub fn fill_next(&self, data: &[u8]) -> bool {
        let Some(&index) = self.free_slots.last() else {
            return false;
        };
        let slot = self.slots[index];
        data.len() <= slot.capacity as usize
            && self.mem.write_slice(data, GuestAddress(slot.data)).is_ok()
    }

    /// Copies a completed request's data (at `Done::data`) into `buf`.
    pub fn read_data(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.mem.read_slice(buf, GuestAddress(addr)).is_ok()
    }

    /// Notifies the backend of everything submitted since the last kick.
    pub fn kick(&mut self) -> Result<(), BlkError> {
        let n = std::mem::take(&mut self.unkicked);
        Ok(self.queue.kick(&self.mem, n)?)
    }

    /// Appends the completed requests to `out` (without asking for a
    /// call: `wait` does, before it sleeps).
    pub fn reap(&mut self, out: &mut Vec<Done>) -> Result<(), BlkError> {
        self.used.clear();
        self.queue.take_used(&self.mem, &mut self.used)?;
        let now = Instant::now();
        for used in &self.used {
            // The virtqueue only returns heads it has in flight, and every
            // head it has in flight came from `submit`.
            let Some(req) = self.in_flight[usize::from(used.head)].take() else {
                continue;
            };
            let status = self
                .mem
                .read_obj(GuestAddress(self.slots[req.slot].status))
                .unwrap_or(S_UNWRITTEN);
            self.free_slots.push(req.slot);
            out.push(Done {
                tag: req.tag,
                status,
                used_len: used.len,
                latency: now - req.start,
                data: self.slots[req.slot].data,
            });
        }
        Ok(())
    }

    /// Waits for the backend's call (or `timeout`) unless completions are
    /// already there; returns whether there may be something to reap.
    /// With a poll time (`set_poll`) it first watches the used ring for that
    /// long, giving up the core between looks: a backend thread that shares
    /// the core then gets its turn, where a spinning frontend would hold the
    /// core until the scheduler's tick and stall the backend it waits for.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, BlkError> {
        if !self.poll.is_zero() {
            let deadline = Instant::now() + self.poll;
            while Instant::now() < deadline {
                if self.queue.has_used(&self.mem)? {
                    return Ok(true);
                }
                std::thread::yield_now();
            }
        }
        // Asks for the call only now, as a driver does before it sleeps.
        Ok(self.queue.arm(&self.mem)?
            || self.queue.wait(timeout)?
            || self.queue.has_used(&self.mem)?)
    }
}
