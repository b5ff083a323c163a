//! The driver half of a split virtqueue in the test frontend's memory.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::Memory;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// One buffer of a request: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A raw descriptor, for building malformed chains in tests.
#[derive(Clone, Copy, Debug)]
pub struct RawDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub struct VirtQueue {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: EventFd,
    pub call: EventFd,
    free: Vec<u16>,
    chain_len: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    pub event_idx: bool,
}

impl VirtQueue {
    /// Lays a queue of `size` entries out at `base` (page aligned, with
    /// `layout_size(size)` bytes available).
    pub fn new(index: usize, size: u16, base: u64, event_idx: bool) -> io::Result<Self> {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4096);
        Ok(VirtQueue {
            index,
            size,
            desc,
            avail,
            used,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
            free: (0..size).rev().collect(),
            chain_len: vec![0; usize::from(size)],
            avail_idx: 0,
            last_used: 0,
            event_idx,
        })
    }

    /// Bytes a queue of `size` entries needs.
    pub fn layout_size(size: u16) -> u64 {
        let size = u64::from(size);
        (16 * size + 6 + 2 * size).next_multiple_of(4096) + (6 + 8 * size).next_multiple_of(4096)
    }

    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Queues a chain; returns its head, or None when descriptors run out.
    pub fn add(&mut self, mem: &Memory, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..bufs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, buf) in bufs.iter().enumerate() {
            let mut flags = if buf.write { DESC_F_WRITE } else { 0 };
            let next = ids.get(i + 1).copied().unwrap_or(0);
            if i + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(
                mem,
                ids[i],
                RawDesc {
                    addr: buf.addr,
                    len: buf.len,
                    flags,
                    next,
                },
            );
        }
        self.chain_len[usize::from(ids[0])] = bufs.len() as u16;
        self.publish(mem, ids[0]);
        Some(ids[0])
    }

    /// Writes descriptors verbatim at indices 0.. and publishes index 0 as a
    /// head. Only for an idle queue (tests of malformed chains).
    pub fn add_raw(&mut self, mem: &Memory, descs: &[RawDesc]) -> u16 {
        for (i, d) in descs.iter().enumerate() {
            self.write_desc(mem, i as u16, *d);
        }
        // Keep the free list consistent: these slots are in use until reaped.
        self.free.retain(|&id| usize::from(id) >= descs.len());
        self.chain_len[0] = descs.len() as u16;
        self.publish(mem, 0);
        0
    }

    fn write_desc(&self, mem: &Memory, id: u16, d: RawDesc) {
        let at = self.desc + 16 * u64::from(id);
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&d.addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&d.len.to_le_bytes());
        bytes[12..14].copy_from_slice(&d.flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&d.next.to_le_bytes());
        // The ring lives inside the memory we allocated; this cannot fail.
        let _ = mem.write_slice(&bytes, GuestAddress(at));
    }

    fn publish(&mut self, mem: &Memory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(slot));
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
        fence(Ordering::SeqCst);
    }

    /// Notifies the backend, unless EVENT_IDX says it does not need it.
    pub fn kick(&mut self, mem: &Memory, added: u16) -> io::Result<()> {
        if self.event_idx {
            let avail_event: u16 = mem
                .read_obj(GuestAddress(self.used + 4 + 8 * u64::from(self.size)))
                .unwrap_or(0);
            let new = self.avail_idx;
            let old = new.wrapping_sub(added);
            // vring_need_event(event, new, old)
            if new.wrapping_sub(avail_event).wrapping_sub(1) >= new.wrapping_sub(old) {
                return Ok(());
            }
        }
        self.kick.write(1)
    }

    /// Collects completed chains: (head, used length). Frees their descriptors.
    pub fn reap(&mut self, mem: &Memory, out: &mut Vec<(u16, u32)>) {
        fence(Ordering::SeqCst);
        let used_idx: u16 = mem
            .read_obj(GuestAddress(self.used + 2))
            .unwrap_or(self.last_used);
        while self.last_used != used_idx {
            let slot = self.used + 4 + 8 * u64::from(self.last_used % self.size);
            let id: u32 = mem.read_obj(GuestAddress(slot)).unwrap_or(0);
            let len: u32 = mem.read_obj(GuestAddress(slot + 4)).unwrap_or(0);
            self.last_used = self.last_used.wrapping_add(1);
            let head = (id % u32::from(self.size)) as u16;
            self.release(mem, head);
            out.push((head, len));
        }
        if self.event_idx {
            // used_event: interrupt us at the next completion.
            let _ = mem.write_obj(
                self.last_used,
                GuestAddress(self.avail + 4 + 2 * u64::from(self.size)),
            );
            fence(Ordering::SeqCst);
        }
    }

    fn release(&mut self, mem: &Memory, head: u16) {
        let mut id = head;
        let count = std::mem::take(&mut self.chain_len[usize::from(head)]).max(1);
        for _ in 0..count {
            if !self.free.contains(&id) {
                self.free.push(id);
            }
            let at = self.desc + 16 * u64::from(id);
            let flags: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap_or(0);
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            id = mem.read_obj(GuestAddress(at + 14)).unwrap_or(0) % self.size;
        }
    }

    /// True when the used ring holds completions not reaped yet.
    pub fn has_used(&self, mem: &Memory) -> bool {
        fence(Ordering::SeqCst);
        let used_idx: u16 = mem
            .read_obj(GuestAddress(self.used + 2))
            .unwrap_or(self.last_used);
        used_idx != self.last_used
    }

    /// Waits until the backend signals the call eventfd (or `timeout`).
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc == 0 {
            return Ok(false);
        }
        let _ = self.call.read();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_and_aligns_the_used_ring() {
        let q = VirtQueue::new(0, 256, 0x10000, false).unwrap();
        assert_eq!(q.used % 4096, 0);
        assert!(q.used + 6 + 8 * 256 <= 0x10000 + VirtQueue::layout_size(256));
        assert_eq!(q.free_descriptors(), 256);
    }
}
