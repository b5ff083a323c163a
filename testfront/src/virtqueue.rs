//! The driver half of a split virtqueue in the test frontend's memory.
//!
//! Layout (virtio 1.x, 2.7): the descriptor table (16 bytes an entry) at the
//! base, the avail ring right after it (flags, idx, `ring[size]`, used_event),
//! and the used ring on the next page (flags, idx, `ring[size]` of (id, len),
//! avail_event). Everything the backend writes (the used ring) is treated as
//! untrusted: a bad id is an error, never a panic.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use thiserror::Error;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::Memory;

pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

#[derive(Debug, Error)]
pub enum RingError {
    #[error("the backend completed descriptor {id}, which heads no chain in flight")]
    BadUsedId { id: u32 },
    #[error("{0} is outside guest memory")]
    Memory(&'static str),
    #[error("cannot notify the backend")]
    Kick(#[source] io::Error),
    #[error("cannot wait for the backend")]
    Wait(#[source] io::Error),
    #[error("the backend closed the connection")]
    Disconnected,
}

/// One buffer of a request: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A raw descriptor, for building malformed chains in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// A completed chain as the backend reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub head: u16,
    pub len: u32,
}

/// Guest addresses of a queue's three parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Layout {
    /// Lays a queue of `size` entries out at `base` (page aligned).
    pub fn new(base: u64, size: u16) -> Layout {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + Self::avail_bytes(size)).next_multiple_of(4096);
        Layout { desc, avail, used }
    }

    /// Bytes a queue of `size` entries needs from its base.
    pub fn total_bytes(size: u16) -> u64 {
        let l = Layout::new(0, size);
        (l.used + Self::used_bytes(size)).next_multiple_of(4096)
    }

    /// flags, idx, `ring[size]`, used_event.
    fn avail_bytes(size: u16) -> u64 {
        6 + 2 * u64::from(size)
    }

    /// flags, idx, `ring[size]` of 8 bytes, avail_event.
    fn used_bytes(size: u16) -> u64 {
        6 + 8 * u64::from(size)
    }
}

/// `vring_need_event` of the virtio spec: does moving an index from `old`
/// to `new` pass `event`?
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

pub struct VirtQueue {
    pub index: usize,
    pub size: u16,
    pub layout: Layout,
    pub kick: EventFd,
    pub call: EventFd,
    pub event_idx: bool,
    free: Vec<u16>,
    /// Descriptor ids of the chain headed by each index, empty when that
    /// index heads nothing in flight.
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
    /// The vhost-user socket (a duplicate), watched while waiting so that
    /// a backend that went away is an error at once, not a timeout.
    peer: Option<OwnedFd>,
}

impl VirtQueue {
    /// A queue of `size` entries at `base` (page aligned, with
    /// `Layout::total_bytes(size)` bytes available).
    pub fn new(index: usize, size: u16, base: u64, event_idx: bool) -> io::Result<Self> {
        Ok(VirtQueue {
            index,
            size,
            layout: Layout::new(base, size),
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
            event_idx,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            peer: None,
        })
    }

    /// Makes `wait` fail with `Disconnected` when `socket` hangs up.
    pub fn watch_peer(&mut self, socket: OwnedFd) {
        self.peer = Some(socket);
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains published and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.chains.iter().filter(|c| !c.is_empty()).count()
    }

    /// Queues a chain; returns its head, or None when descriptors run out.
    /// The backend is not notified until `kick`.
    pub fn add(&mut self, mem: &Memory, bufs: &[Buf]) -> Result<Option<u16>, RingError> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return Ok(None);
        }
        let ids: Vec<u16> = self.free.split_off(self.free.len() - bufs.len());
        for (i, buf) in bufs.iter().enumerate() {
            let mut flags = if buf.write { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let desc = RawDesc {
                addr: buf.addr,
                len: buf.len,
                flags,
                next,
            };
            self.write_desc(mem, ids[i], desc)?;
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        self.publish(mem, head)?;
        Ok(Some(head))
    }

    /// Writes `descs` verbatim at descriptor indices 0.. and publishes index
    /// 0 as a head: for malformed chains (loops, bad addresses, bad flags).
    /// Only valid on a queue with nothing in flight.
    pub fn add_raw(&mut self, mem: &Memory, descs: &[RawDesc]) -> Result<u16, RingError> {
        assert!(
            !descs.is_empty() && descs.len() <= usize::from(self.size),
            "a raw chain has 1 to queue-size descriptors"
        );
        assert_eq!(self.in_flight(), 0, "add_raw needs an idle queue");
        for (id, d) in (0..self.size).zip(descs) {
            self.write_desc(mem, id, *d)?;
        }
        // These slots are in use until the chain is reaped.
        self.free.retain(|&id| usize::from(id) >= descs.len());
        self.chains[0] = (0..self.size).take(descs.len()).collect();
        self.publish(mem, 0)?;
        Ok(0)
    }

    fn write_desc(&self, mem: &Memory, id: u16, d: RawDesc) -> Result<(), RingError> {
        let at = self.layout.desc + 16 * u64::from(id);
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&d.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&d.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&d.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&d.next.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(at))
            .map_err(|_| RingError::Memory("the descriptor table"))
    }

    fn publish(&mut self, mem: &Memory, head: u16) -> Result<(), RingError> {
        let slot = self.layout.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot))
            .map_err(|_| RingError::Memory("the avail ring"))?;
        // The descriptors and the ring entry must be visible before the
        // index that covers them.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.layout.avail + 2))
            .map_err(|_| RingError::Memory("the avail ring"))?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Notifies the backend of the last `added` chains, unless EVENT_IDX
    /// says it is not waiting for them (avail_event).
    pub fn kick(&mut self, mem: &Memory, added: u16) -> Result<(), RingError> {
        if added == 0 {
            return Ok(());
        }
        if self.event_idx {
            fence(Ordering::SeqCst);
            let at = self.layout.used + 4 + 8 * u64::from(self.size);
            let avail_event: u16 = mem
                .read_obj(GuestAddress(at))
                .map_err(|_| RingError::Memory("avail_event"))?;
            let new = self.avail_idx;
            if !need_event(avail_event, new, new.wrapping_sub(added)) {
                return Ok(());
            }
        }
        self.kick.write(1).map_err(RingError::Kick)
    }

    /// The device's used index, as it stands in memory. The fence before
    /// orders it after this side's earlier writes (used_event); the one
    /// after keeps the used entries and buffers it covers from being read
    /// before it (acquire).
    pub fn used_idx(&self, mem: &Memory) -> Result<u16, RingError> {
        fence(Ordering::SeqCst);
        let idx = mem
            .read_obj(GuestAddress(self.layout.used + 2))
            .map_err(|_| RingError::Memory("the used ring"))?;
        fence(Ordering::Acquire);
        Ok(idx)
    }

    /// Collects completed chains into `out` and frees their descriptors.
    /// With EVENT_IDX, asks for a call at the next completion (used_event)
    /// and looks again afterwards, so a completion that raced with that
    /// write is not left waiting for a call that will not come.
    pub fn reap(&mut self, mem: &Memory, out: &mut Vec<Used>) -> Result<(), RingError> {
        loop {
            self.take_used(mem, out)?;
            if !self.arm(mem)? {
                return Ok(());
            }
        }
    }

    /// As `reap`, without asking for a call: a driver that polls its ring
    /// asks only before it sleeps (`arm`), so the device does not signal
    /// completions the driver is about to find anyway.
    pub fn take_used(&mut self, mem: &Memory, out: &mut Vec<Used>) -> Result<(), RingError> {
        let used_idx = self.used_idx(mem)?;
        while self.last_used != used_idx {
            let slot = self.layout.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = mem
                .read_obj(GuestAddress(slot))
                .map_err(|_| RingError::Memory("the used ring"))?;
            let len: u32 = mem
                .read_obj(GuestAddress(slot + 4))
                .map_err(|_| RingError::Memory("the used ring"))?;
            self.last_used = self.last_used.wrapping_add(1);
            let head = u16::try_from(id)
                .ok()
                .filter(|&h| h < self.size && !self.chains[usize::from(h)].is_empty())
                .ok_or(RingError::BadUsedId { id })?;
            // Return the ids we recorded, whatever the table holds now.
            let ids = std::mem::take(&mut self.chains[usize::from(head)]);
            self.free.extend(ids);
            out.push(Used { head, len });
        }
        Ok(())
    }

    /// With EVENT_IDX, asks for a call at the next completion (used_event);
    /// returns whether completions are already there (one may have come
    /// before the request was seen): reap them rather than wait.
    pub fn arm(&self, mem: &Memory) -> Result<bool, RingError> {
        if !self.event_idx {
            return Ok(false);
        }
        let used_event = self.layout.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(self.last_used, GuestAddress(used_event))
            .map_err(|_| RingError::Memory("used_event"))?;
        self.has_used(mem)
    }

    /// True when the used ring holds completions not reaped yet.
    pub fn has_used(&self, mem: &Memory) -> Result<bool, RingError> {
        Ok(self.used_idx(mem)? != self.last_used)
    }

    /// Waits until the backend signals the call eventfd or `timeout`
    /// passes; returns whether it signalled (or a signal to this process
    /// cut the wait short: look again either way).
    pub fn wait(&self, timeout: Duration) -> Result<bool, RingError> {
        let hangup = libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR;
        let mut fds = [
            libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                // poll ignores negative descriptors.
                fd: self.peer.as_ref().map_or(-1, |p| p.as_raw_fd()),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of pollfds, exclusively borrowed for
        // the duration of the call, and the count matches its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                // Not a timeout: the caller looks again.
                return Ok(true);
            }
            return Err(RingError::Wait(e));
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // Non-blocking: a spurious wake-up reads EAGAIN, which is harmless.
            let _ = self.call.read();
            return Ok(true);
        }
        if fds[1].revents & hangup != 0 {
            return Err(RingError::Disconnected);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemory;

    /// Plays the device: completes `head` with `len` in the used ring.
    fn complete(mem: &Memory, q: &VirtQueue, head: u16, len: u32) {
        let idx: u16 = mem.read_obj(GuestAddress(q.layout.used + 2)).unwrap();
        let slot = q.layout.used + 4 + 8 * u64::from(idx % q.size);
        mem.write_obj(u32::from(head), GuestAddress(slot)).unwrap();
        mem.write_obj(len, GuestAddress(slot + 4)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(q.layout.used + 2))
            .unwrap();
    }

    fn avail_idx(mem: &Memory, q: &VirtQueue) -> u16 {
        mem.read_obj(GuestAddress(q.layout.avail + 2)).unwrap()
    }

    fn bufs(n: usize) -> Vec<Buf> {
        (0..n)
            .map(|i| Buf {
                addr: 0x10000 + 0x1000 * i as u64,
                len: 512,
                write: i + 1 == n,
            })
            .collect()
    }

    #[test]
    fn layout_matches_the_spec_and_aligns_the_used_ring() {
        let l = Layout::new(0x10000, 256);
        assert_eq!(l.desc, 0x10000);
        assert_eq!(l.avail, 0x10000 + 16 * 256);
        // avail: 4 + 2 * 256 + 2 = 518 bytes after 4096, so used is 2 pages in.
        assert_eq!(l.used, 0x10000 + 2 * 4096);
        assert_eq!(Layout::total_bytes(256), 3 * 4096);
        let small = Layout::new(0, 16);
        assert_eq!((small.avail, small.used), (256, 4096));
        assert_eq!(Layout::total_bytes(16), 2 * 4096);
        for size in [1u16, 2, 64, 128, 1024, 32768] {
            let l = Layout::new(0, size);
            assert_eq!(l.used % 4096, 0);
            assert!(l.avail + 6 + 2 * u64::from(size) <= l.used);
            assert!(l.used + 6 + 8 * u64::from(size) <= Layout::total_bytes(size));
        }
    }

    #[test]
    fn need_event_follows_the_spec_across_wrap_around() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(8, 8, 3));
        assert!(need_event(u16::MAX, 1, u16::MAX - 1));
        assert!(!need_event(2, 1, u16::MAX));
    }

    #[test]
    fn chains_are_published_reaped_and_their_descriptors_reused() {
        let mem = GuestMemory::new(1 << 20, false).unwrap().mem;
        let mut q = VirtQueue::new(0, 8, 0x1000, false).unwrap();
        let a = q.add(&mem, &bufs(3)).unwrap().unwrap();
        let b = q.add(&mem, &bufs(3)).unwrap().unwrap();
        assert_eq!(avail_idx(&mem, &q), 2);
        assert_eq!((q.free_descriptors(), q.in_flight()), (2, 2));
        assert!(q.add(&mem, &bufs(3)).unwrap().is_none(), "only 2 left");

        // The chain's links and flags as a device would walk them.
        let at = q.layout.desc + 16 * u64::from(a);
        let flags: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
        assert_eq!(flags, DESC_F_NEXT);

        complete(&mem, &q, b, 512);
        let mut out = Vec::new();
        q.reap(&mem, &mut out).unwrap();
        assert_eq!(out, [Used { head: b, len: 512 }]);
        assert_eq!(q.free_descriptors(), 5);
        assert!(!q.has_used(&mem).unwrap());
        complete(&mem, &q, a, 1);
        out.clear();
        q.reap(&mem, &mut out).unwrap();
        assert_eq!(out, [Used { head: a, len: 1 }]);
        assert_eq!((q.free_descriptors(), q.in_flight()), (8, 0));

        // Many more than the queue size: indices wrap, slots recycle.
        for round in 0..100u32 {
            let h = q.add(&mem, &bufs(2)).unwrap().unwrap();
            complete(&mem, &q, h, round);
            out.clear();
            q.reap(&mem, &mut out).unwrap();
            assert_eq!(
                out,
                [Used {
                    head: h,
                    len: round
                }]
            );
        }
        assert_eq!(q.free_descriptors(), 8);
    }

    #[test]
    fn a_bogus_used_id_is_an_error_not_a_panic() {
        let mem = GuestMemory::new(1 << 20, false).unwrap().mem;
        let mut q = VirtQueue::new(0, 8, 0x1000, false).unwrap();
        let head = q.add(&mem, &bufs(2)).unwrap().unwrap();
        let mut out = Vec::new();
        for bogus in [1000u16, (head + 1) % 8] {
            complete(&mem, &q, bogus, 0);
            assert!(matches!(
                q.reap(&mem, &mut out),
                Err(RingError::BadUsedId { .. })
            ));
        }
        assert!(out.is_empty());
    }

    #[test]
    fn event_idx_sets_used_event_and_suppresses_needless_kicks() {
        let mem = GuestMemory::new(1 << 20, false).unwrap().mem;
        let mut q = VirtQueue::new(0, 8, 0x1000, true).unwrap();
        let avail_event = q.layout.used + 4 + 8 * 8;
        // The device wants a kick when avail idx moves past 0.
        q.add(&mem, &bufs(2)).unwrap().unwrap();
        q.kick(&mem, 1).unwrap();
        assert_eq!(q.kick.read().unwrap(), 1);
        // It has not caught up (avail_event still 0): no kick for 1 -> 2.
        let h = q.add(&mem, &bufs(2)).unwrap().unwrap();
        q.kick(&mem, 1).unwrap();
        assert!(q.kick.read().is_err(), "kicked although not asked to");
        mem.write_obj(2u16, GuestAddress(avail_event)).unwrap();
        q.add(&mem, &bufs(2)).unwrap().unwrap();
        q.kick(&mem, 1).unwrap();
        assert_eq!(q.kick.read().unwrap(), 1);

        complete(&mem, &q, h, 0);
        let mut out = Vec::new();
        q.reap(&mem, &mut out).unwrap();
        let used_event: u16 = mem
            .read_obj(GuestAddress(q.layout.avail + 4 + 2 * 8))
            .unwrap();
        assert_eq!(used_event, 1, "asks for a call at the next completion");
    }

    /// A polling driver takes completions without asking for a call, and
    /// asks (`arm`) only before it sleeps; `arm` says when one is already
    /// there, so the driver reaps it rather than waiting for a call that
    /// will not come.
    #[test]
    fn taking_completions_asks_for_no_call_until_armed() {
        let mem = GuestMemory::new(1 << 20, false).unwrap().mem;
        let mut q = VirtQueue::new(0, 8, 0x1000, true).unwrap();
        let used_event_at = GuestAddress(q.layout.avail + 4 + 2 * 8);
        mem.write_obj(0xbeefu16, used_event_at).unwrap();
        let a = q.add(&mem, &bufs(2)).unwrap().unwrap();
        let b = q.add(&mem, &bufs(2)).unwrap().unwrap();
        complete(&mem, &q, a, 0);
        let mut out = Vec::new();
        q.take_used(&mem, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        let untouched: u16 = mem.read_obj(used_event_at).unwrap();
        assert_eq!(untouched, 0xbeef, "take_used asked for a call");
        assert!(!q.arm(&mem).unwrap(), "nothing is waiting");
        let used_event: u16 = mem.read_obj(used_event_at).unwrap();
        assert_eq!(used_event, 1, "armed for the next completion");
        complete(&mem, &q, b, 0);
        assert!(q.arm(&mem).unwrap(), "a completion is already there");
        // Without EVENT_IDX the device calls every time: nothing to arm.
        let plain = VirtQueue::new(0, 8, 0x1000, false).unwrap();
        assert!(!plain.arm(&mem).unwrap());
    }

    #[test]
    fn waiting_sees_a_call_a_timeout_and_a_hang_up() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut q = VirtQueue::new(0, 8, 0x1000, false).unwrap();
        q.watch_peer(OwnedFd::from(ours));
        assert!(!q.wait(Duration::from_millis(10)).unwrap());
        q.call.write(1).unwrap();
        assert!(q.wait(Duration::from_secs(5)).unwrap());
        assert!(q.call.read().is_err(), "the call was consumed");
        drop(theirs);
        assert!(matches!(
            q.wait(Duration::from_secs(5)),
            Err(RingError::Disconnected)
        ));
    }

    #[test]
    fn a_raw_chain_is_written_verbatim_and_freed_once() {
        let mem = GuestMemory::new(1 << 20, false).unwrap().mem;
        let mut q = VirtQueue::new(0, 8, 0x1000, false).unwrap();
        let looped = [
            RawDesc {
                addr: 0x10000,
                len: 16,
                flags: DESC_F_NEXT,
                next: 1,
            },
            RawDesc {
                addr: 0x20000,
                len: 512,
                flags: DESC_F_NEXT | DESC_F_WRITE,
                next: 0,
            },
        ];
        assert_eq!(q.add_raw(&mem, &looped).unwrap(), 0);
        let next: u16 = mem.read_obj(GuestAddress(q.layout.desc + 16 + 14)).unwrap();
        assert_eq!(next, 0);
        assert_eq!(q.free_descriptors(), 6);
        complete(&mem, &q, 0, 0);
        let mut out = Vec::new();
        q.reap(&mem, &mut out).unwrap();
        assert_eq!(q.free_descriptors(), 8);
    }
}
