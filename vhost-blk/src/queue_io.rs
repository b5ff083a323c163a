//! One queue's asynchronous transfers: an io_uring, the eventfd it signals
//! when a transfer completes (in the queue worker's epoll set), and the
//! requests in flight. Requests go in as the guest makes them available and
//! come out as the device finishes them, in any order, so a queue keeps its
//! whole depth in flight on a slow device instead of waiting for a batch.
//!
//! Transfers go to the kernel two at a time, as the worker parses them,
//! not once per ring batch: the kernel's work to issue a direct transfer
//! (about 3 us here) would otherwise hold the whole batch back from the
//! device (32 transfers waited 90 us for the last one's turn, and 4k random
//! reads lost a fifth of their rate). Two still halves the system calls,
//! and is few enough that the kernel sends each to the device at once.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::request::PendingIo;

/// Transfers queued with `start` that `submit_due` hands to the kernel.
const SUBMIT_EVERY: usize = 2;

struct InFlight {
    head: u16,
    io: PendingIo,
    /// Keeps the guest memory the transfer reads or writes mapped until it
    /// completes, even if the frontend replaces the memory table meanwhile.
    _mem: Arc<GuestMemoryMmap>,
}

/// A transfer that completed: the chain's head, the request, and whether
/// every byte moved.
pub struct Completed {
    pub head: u16,
    pub io: PendingIo,
    pub ok: bool,
}

pub struct QueueIo {
    ring: IoUring,
    done: EventFd,
    /// By io_uring user data.
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Queued with `start` and not yet submitted to the kernel.
    unsubmitted: usize,
}

impl QueueIo {
    /// A ring for up to `depth` transfers in flight.
    pub fn new(depth: u32) -> io::Result<Self> {
        let ring = IoUring::new(depth)?;
        let done = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(done.as_raw_fd())?;
        let depth = depth as usize;
        Ok(QueueIo {
            ring,
            done,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            unsubmitted: 0,
        })
    }

    /// Readable when a transfer has completed (see `clear_event`).
    pub fn event_fd(&self) -> RawFd {
        self.done.as_raw_fd()
    }

    /// Resets the completion eventfd before reaping.
    pub fn clear_event(&self) {
        // Non-blocking: nothing to read is fine.
        let _ = self.done.read();
    }

    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues the transfer of `io` on `fd` for chain `head`; it goes to the
    /// kernel at the next `submit`. Hands `io` back when the queue is full.
    pub fn start(
        &mut self,
        fd: RawFd,
        head: u16,
        io: PendingIo,
        mem: Arc<GuestMemoryMmap>,
    ) -> Result<(), PendingIo> {
        let Some(slot) = self.free.pop() else {
            return Err(io);
        };
        let iov = io.iovecs.as_ptr();
        // At most SEG_MAX iovecs: the parser's limit.
        let count = io.iovecs.len() as u32;
        let entry = if io.write {
            opcode::Writev::new(types::Fd(fd), iov, count)
                .offset(io.offset)
                .build()
        } else {
            opcode::Readv::new(types::Fd(fd), iov, count)
                .offset(io.offset)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: the iovec array (owned by `io`, which moves into the slot
        // below and stays there untouched) and the guest memory it points
        // to (kept mapped by `mem`, stored with it) live until the
        // completion of this entry is reaped, or until `Drop` has waited
        // for it.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free.push(slot);
            return Err(io);
        }
        self.slots[slot] = Some(InFlight {
            head,
            io,
            _mem: mem,
        });
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands the queued transfers to the kernel once there are
    /// `SUBMIT_EVERY` of them; `submit` sends the rest at the end of a pass.
    pub fn submit_due(&mut self) -> io::Result<()> {
        if self.unsubmitted >= SUBMIT_EVERY {
            self.submit()?;
        }
        Ok(())
    }

    /// Hands the queued transfers to the kernel without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes every completed transfer, without waiting.
    pub fn reap(&mut self, out: &mut Vec<Completed>) {
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(done) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let ok = u32::try_from(cqe.result()).is_ok_and(|n| n == done.io.len);
            out.push(Completed {
                head: done.head,
                io: done.io,
                ok,
            });
        }
    }

    /// Submits what is queued and waits until nothing is in flight; every
    /// transfer completed meanwhile goes to `out`.
    pub fn drain(&mut self, out: &mut Vec<Completed>) -> io::Result<()> {
        self.submit()?;
        while self.in_flight() > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.reap(out);
        }
        Ok(())
    }
}

impl Drop for QueueIo {
    /// The kernel may still be writing into guest memory that is about to
    /// be unmapped: wait for every transfer first.
    fn drop(&mut self) {
        let mut lost = Vec::new();
        if let Err(e) = self.drain(&mut lost) {
            log::error!("cannot wait for transfers in flight: {e}");
        }
    }
}
