//! Writing a batch of frames to a tap queue with one system call: one
//! io_uring writev per frame, submitted together, all reaped before the
//! call returns. A tap opened O_NONBLOCK is written inline by the submit,
//! so the batch costs one kernel entry instead of one per frame.
//!
//! Where io_uring is unavailable (an old kernel, a seccomp policy, a
//! container that forbids it), the first batch finds out, logs it once, and
//! the caller writes frame by frame from then on.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

use crate::iovec::IoVecs;
use crate::worker::TX_BATCH;

#[derive(Default)]
enum State {
    #[default]
    Untried,
    Ready {
        ring: Box<IoUring>,
        /// Whether the tap's descriptor is registered with the ring (as
        /// fixed file 0), which saves a descriptor lookup per frame.
        fixed: bool,
    },
    Unavailable,
}

/// A tap queue's io_uring, made on first use.
#[derive(Default)]
pub struct BatchWriter {
    state: State,
}

impl BatchWriter {
    /// Writes each of `frames` (at most `TX_BATCH`) to `fd` and appends
    /// one result per frame, in order, to `results`. Returns false, having
    /// written nothing, when io_uring is unavailable or refuses the batch.
    pub fn write(
        &mut self,
        fd: RawFd,
        frames: &[IoVecs<'_>],
        results: &mut Vec<io::Result<usize>>,
    ) -> bool {
        if let State::Untried = self.state {
            self.state = Self::setup(fd);
        }
        let State::Ready { ring, fixed } = &mut self.state else {
            return false;
        };
        let fixed = *fixed;
        let first = results.len();
        results.extend(frames.iter().map(|_| Err(io::ErrorKind::Other.into())));
        let mut queued = 0usize;
        for (i, frame) in frames.iter().enumerate().take(TX_BATCH) {
            let raw = frame.as_raw();
            // At most UIO_MAXIOV (1024) iovecs per frame: IoVecs's limit.
            let count = raw.len() as u32;
            let entry = if fixed {
                opcode::Writev::new(types::Fixed(0), raw.as_ptr(), count).build()
            } else {
                opcode::Writev::new(types::Fd(fd), raw.as_ptr(), count).build()
            }
            .user_data(i as u64);
            // SAFETY: the iovec array and the buffers it points to (guest
            // memory, borrowed by `frames` for this call) stay valid until
            // every entry queued here has completed: the loop below reaps
            // them all before this function returns. If the kernel fails
            // instead, the ring is dropped with entries possibly still
            // running: the kernel copied each iovec array when it took the
            // entry, and reads the frames through this process's mapping
            // of guest memory (a fault there fails the write, it cannot
            // touch memory this process does not map).
            if unsafe { ring.submission().push(&entry) }.is_err() {
                break;
            }
            queued += 1;
        }
        let mut reaped = 0usize;
        let mut submitted = false;
        while reaped < queued {
            match ring.submit_and_wait(queued - reaped) {
                Ok(_) => submitted = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("io_uring submission failed ({e}); writing frame by frame");
                    self.state = State::Unavailable;
                    if submitted {
                        // Some frames went out: they are not written twice.
                        return true;
                    }
                    // None went out (io_uring_enter fails only when it took
                    // nothing): the caller writes this batch itself.
                    results.truncate(first);
                    return false;
                }
            }
            for cqe in ring.completion() {
                let result = cqe.result();
                if let Some(slot) = results.get_mut(first + cqe.user_data() as usize) {
                    *slot = usize::try_from(result)
                        .map_err(|_| io::Error::from_raw_os_error(result.saturating_neg()));
                }
                reaped += 1;
            }
        }
        true
    }

    fn setup(fd: RawFd) -> State {
        let ring = match IoUring::new(TX_BATCH as u32) {
            Ok(ring) => ring,
            Err(e) => {
                log::info!("io_uring unavailable ({e}); frames are written one by one");
                return State::Unavailable;
            }
        };
        let fixed = ring.submitter().register_files(&[fd]).is_ok();
        State::Ready {
            ring: Box::new(ring),
            fixed,
        }
    }
}
