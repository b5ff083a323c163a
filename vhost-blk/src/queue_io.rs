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
/// How often, and how far apart, a submission the kernel has no resources
/// for is tried again when nothing it holds will complete meanwhile.
const SUBMIT_RETRIES: u32 = 100;
const SUBMIT_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);
/// io_uring_enter's flag to wait for completions (include/uapi/linux/io_uring.h).
const IORING_ENTER_GETEVENTS: u32 = 1;

struct InFlight {
    head: u16,
    io: PendingIo,
    /// The file the transfer is on (for the rest of a short one).
    fd: RawFd,
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
    /// Heads of transfers given up for good (see `abandon`), for `take_lost`.
    lost: Vec<u16>,
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
            lost: Vec::new(),
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
        // At most 1024 iovecs (UIO_MAXIOV): the parser's limit.
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
        // completion of this entry is reaped: `drain`, `abandon` and `Drop`
        // wait for every entry the kernel took, and if they cannot, leak
        // the slots rather than free them; the entries `abandon` hands
        // back are never submitted (the ring is dropped unentered).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free.push(slot);
            return Err(io);
        }
        self.slots[slot] = Some(InFlight {
            head,
            io,
            fd,
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

    /// Hands the queued transfers to the kernel without waiting. When the
    /// kernel is short of resources (EAGAIN, EBUSY), what it already holds
    /// will complete and bring the worker back to try again, so the rest
    /// stays queued; with nothing in the kernel, this waits a little for
    /// resources instead. Any other error is for `abandon`.
    pub fn submit(&mut self) -> io::Result<()> {
        let mut retries = 0;
        while self.unsubmitted > 0 {
            match self.ring.submit() {
                Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    if self.in_kernel() > 0 {
                        return Ok(());
                    }
                    if retries == SUBMIT_RETRIES {
                        return Err(e);
                    }
                    retries += 1;
                    std::thread::sleep(SUBMIT_RETRY_PAUSE);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Transfers the kernel has taken and not yet completed.
    fn in_kernel(&self) -> usize {
        self.in_flight().saturating_sub(self.unsubmitted)
    }

    /// Waits for at least one completion without submitting anything.
    fn wait_for_completion(&self) -> io::Result<()> {
        loop {
            // SAFETY: io_uring_enter with nothing to submit and GETEVENTS
            // only waits for completions; it reads no submission entries.
            let entered = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 1, IORING_ENTER_GETEVENTS, None)
            };
            match entered {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Gives the ring up after the kernel refused a submission: waits for
    /// every transfer the kernel took, and hands back the ones it never
    /// took as failed. The ring must not be entered again with entries to
    /// submit (the queue drops it): its submission queue still names
    /// transfers that are gone.
    pub fn abandon(&mut self, out: &mut Vec<Completed>) {
        while self.in_kernel() > 0 {
            if let Err(e) = self.wait_for_completion() {
                log::error!(
                    "cannot wait for {} transfers in the kernel ({e}); their guest memory stays mapped",
                    self.in_kernel()
                );
                // The kernel may still use those buffers: never unmap them.
                // Their blocks are given up, though: a read-modify-write
                // waiting for them would otherwise wait forever.
                for in_flight in self.slots.iter_mut().flatten() {
                    in_flight.io.release_blocks();
                    self.lost.push(in_flight.head);
                }
                std::mem::forget(std::mem::take(&mut self.slots));
                self.free.clear();
                self.unsubmitted = 0;
                return;
            }
            self.reap(out);
        }
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            if let Some(never_taken) = entry.take() {
                self.free.push(slot);
                out.push(Completed {
                    head: never_taken.head,
                    io: never_taken.io,
                    ok: false,
                });
            }
        }
        self.unsubmitted = 0;
    }

    /// The heads of the transfers `abandon` gave up without completing
    /// them (the kernel may still use their buffers, so they never are).
    pub fn take_lost(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.lost)
    }

    /// Whether a transfer has completed and waits to be reaped.
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Takes every completed transfer, without waiting.
    pub fn reap(&mut self, out: &mut Vec<Completed>) {
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(done) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let ok = settle(&done, cqe.result());
            out.push(Completed {
                head: done.head,
                io: done.io,
                ok,
            });
        }
    }

    /// Submits what is queued and waits until nothing is in flight; every
    /// transfer completed meanwhile goes to `out`. If the kernel refuses
    /// the rest, what it took is still waited for and the rest comes back
    /// failed (`abandon`) before the error is returned.
    pub fn drain(&mut self, out: &mut Vec<Completed>) -> io::Result<()> {
        while self.in_flight() > 0 {
            if let Err(e) = self.submit() {
                self.abandon(out);
                return Err(e);
            }
            if self.in_kernel() > 0 {
                if let Err(e) = self.wait_for_completion() {
                    self.abandon(out);
                    return Err(e);
                }
            }
            self.reap(out);
        }
        Ok(())
    }
}

/// Whether a transfer that completed with `result` moved all its bytes. A
/// short one (the kernel may end a direct transfer early, as read(2) and
/// write(2) may) has its rest moved here, synchronously, as the
/// synchronous path would: only the end of the file or an error fails it
/// (with O_DIRECT, so does a rest that does not start on a block).
fn settle(done: &InFlight, result: i32) -> bool {
    let io = &done.io;
    let what = if io.write { "write" } else { "read" };
    let outcome = match u32::try_from(result) {
        Ok(n) if n == io.len => return true,
        Ok(n) if n > 0 && n < io.len => match finish_rest(done, n as usize) {
            Ok(()) => return true,
            Err(e) => format!("{n} bytes moved, then {e}"),
        },
        Ok(n) => format!("{n} bytes moved"),
        Err(_) => io::Error::from_raw_os_error(result.saturating_neg()).to_string(),
    };
    log::warn!(
        "{what} of {} bytes at byte {} failed: {outcome}",
        io.len,
        io.offset
    );
    false
}

/// Moves what a short transfer left after its first `moved` bytes.
fn finish_rest(done: &InFlight, mut moved: usize) -> io::Result<()> {
    let io = &done.io;
    let total = io.len as usize;
    while moved < total {
        let rest = iovecs_after(&io.iovecs, moved);
        let at = i64::try_from(io.offset + moved as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let count = rest.len() as libc::c_int;
        // SAFETY: `rest` describes the part of the transfer's buffers not
        // yet moved; they are guest memory kept mapped by `done._mem`, and
        // no transfer in the kernel uses them (this one has completed).
        let n = unsafe {
            if io.write {
                libc::pwritev64(done.fd, rest.as_ptr(), count, at)
            } else {
                libc::preadv64(done.fd, rest.as_ptr(), count, at)
            }
        };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            n => moved += n as usize,
        }
    }
    Ok(())
}

/// The iovecs that describe what follows the first `skip` bytes of `iovecs`.
fn iovecs_after(iovecs: &[libc::iovec], mut skip: usize) -> Vec<libc::iovec> {
    let mut rest = Vec::with_capacity(iovecs.len());
    for v in iovecs {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        rest.push(libc::iovec {
            iov_base: v.iov_base.cast::<u8>().wrapping_add(skip).cast(),
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    rest
}

impl Drop for QueueIo {
    /// The kernel may still be writing into guest memory that is about to
    /// be unmapped: wait for every transfer first (`drain` leaves nothing
    /// in the kernel, or keeps the memory of what it could not wait for).
    fn drop(&mut self) {
        let mut lost = Vec::new();
        if let Err(e) = self.drain(&mut lost) {
            log::error!("cannot wait for transfers in flight: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;

    const PAGE: u64 = 0x1000;

    fn page_write(mem: &GuestMemoryMmap, page: u64, offset: u64) -> PendingIo {
        let host = mem
            .get_host_address(GuestAddress(page * PAGE))
            .expect("in guest memory");
        PendingIo::for_test(true, offset, host, PAGE as u32)
    }

    /// A transfer io_uring ends early has its rest moved, and succeeds; one
    /// that runs into the end of the file fails.
    #[test]
    fn a_short_transfer_is_finished_and_one_past_the_end_fails() {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 * PAGE as usize)])
                .expect("guest memory"),
        );
        let file = tempfile::tempfile().expect("temp file");
        let image: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut &file, &image).expect("fill the file");
        let host = mem
            .get_host_address(GuestAddress(0))
            .expect("in guest memory");
        // Two pages read into two iovecs, as if the kernel had stopped
        // 100 bytes into the second.
        let mut io = PendingIo::for_test(false, PAGE, host, 2 * PAGE as u32);
        io.iovecs = vec![
            libc::iovec {
                iov_base: host.cast(),
                iov_len: PAGE as usize,
            },
            libc::iovec {
                iov_base: host.wrapping_add(PAGE as usize).cast(),
                iov_len: PAGE as usize,
            },
        ];
        let done = InFlight {
            head: 0,
            io,
            fd: file.as_raw_fd(),
            _mem: mem.clone(),
        };
        let first = PAGE as usize + 100;
        mem.write_slice(&image[PAGE as usize..][..first], GuestAddress(0))
            .expect("what the kernel moved");
        assert!(settle(&done, first as i32));
        let mut read = vec![0; 2 * PAGE as usize];
        mem.read_slice(&mut read, GuestAddress(0))
            .expect("read back");
        assert!(read == image[PAGE as usize..], "the rest was not read");

        // The same read one page further runs into the end of the file.
        let mut past = done;
        past.io.offset = 2 * PAGE;
        assert!(!settle(&past, 100));
        assert!(!settle(&past, -libc::EIO));
        assert!(settle(&past, 2 * PAGE as i32));
    }

    /// A ring the kernel refuses is given up: the transfer it took is
    /// waited for and completes; those it never took come back failed and
    /// never reach the file, even when the ring is dropped afterwards.
    #[test]
    fn abandoned_transfers_come_back_failed_and_never_reach_the_file() {
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 * PAGE as usize)])
                .expect("guest memory"),
        );
        mem.write_slice(&[0xaa; PAGE as usize], GuestAddress(0))
            .expect("fill page 0");
        mem.write_slice(&[0xbb; PAGE as usize], GuestAddress(PAGE))
            .expect("fill page 1");
        let file = tempfile::tempfile().expect("temp file");
        file.set_len(4 * PAGE).expect("size the file");
        let fd = file.as_raw_fd();

        let mut qio = QueueIo::new(8).expect("io_uring");
        assert!(qio
            .start(fd, 1, page_write(&mem, 0, 0), mem.clone())
            .is_ok());
        qio.submit().expect("submit");
        assert!(qio
            .start(fd, 2, page_write(&mem, 1, PAGE), mem.clone())
            .is_ok());
        assert!(qio
            .start(fd, 3, page_write(&mem, 1, 2 * PAGE), mem.clone())
            .is_ok());
        let mut out = Vec::new();
        qio.abandon(&mut out);
        assert_eq!(qio.in_flight(), 0);
        drop(qio);

        let mut seen: Vec<(u16, bool)> = out.iter().map(|c| (c.head, c.ok)).collect();
        seen.sort_unstable();
        assert_eq!(seen, [(1, true), (2, false), (3, false)]);
        let mut image = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut image).expect("read the file");
        assert!(image[..PAGE as usize].iter().all(|&b| b == 0xaa));
        assert!(image[PAGE as usize..].iter().all(|&b| b == 0));
    }
}
