//! How many of the backend's queue workers are serving their rings now,
//! and from that, whether a completion may wake the frontend before the
//! worker's pass ends.
//!
//! A worker serving synchronous requests (a buffered image) fills the used
//! ring one request at a time. Signalling only when the pass ends leaves
//! the frontend asleep until then, and the worker idle while it wakes, once
//! per round trip: with one queue of 32 requests from tmpfs, 0.32M IOPS
//! against fio's 0.52M. Asking at each completion whether the frontend
//! wants a call (EVENT_IDX: it asked before it slept) wakes it while the
//! worker goes on, and the two overlap (0.42M by hand, 0.44M in
//! bench-blk). That needs a core for the woken thread: with two queues on
//! two cores, the extra wake-ups took the cores from the workers (0.85M
//! IOPS to 0.50M). So a worker signals early only while the process has
//! two cores for each worker in a pass now. That is a guess: it counts the
//! backend's own workers and cores, not where the frontend's threads run,
//! and a worker whose neighbour sleeps between passes may signal early.
//! A queue on io_uring signals once a pass: its completions come in
//! batches.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The cores this process may run on (its affinity and cgroup quota), one
/// if that cannot be told.
pub fn cores_of_this_process() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Debug)]
pub struct Serving {
    workers: AtomicUsize,
    cores: usize,
}

/// A worker's turn at its ring; ends when dropped.
pub struct Turn<'a>(&'a Serving);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.workers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Serving {
    /// For a process that may run on `cores` cores.
    pub fn new(cores: usize) -> Self {
        Serving {
            workers: AtomicUsize::new(0),
            cores,
        }
    }

    /// A worker begins serving its ring.
    pub fn begin(&self) -> Turn<'_> {
        self.workers.fetch_add(1, Ordering::AcqRel);
        Turn(self)
    }

    /// Whether there is a core for each worker serving now and one for the
    /// frontend thread each feeds, so one woken early has a core to run
    /// on.
    pub fn core_to_spare(&self) -> bool {
        self.workers.load(Ordering::Acquire).saturating_mul(2) <= self.cores
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_on_two_cores_may_signal_early_two_may_not() {
        let serving = Serving::new(2);
        let first = serving.begin();
        assert!(serving.core_to_spare());
        let second = serving.begin();
        assert!(!serving.core_to_spare());
        drop(first);
        assert!(serving.core_to_spare());
        drop(second);
        assert!(serving.core_to_spare());
    }

    #[test]
    fn one_core_never_spares_one() {
        let serving = Serving::new(1);
        let _turn = serving.begin();
        assert!(!serving.core_to_spare());
    }

    #[test]
    fn eight_cores_spare_one_for_up_to_four_workers() {
        let serving = Serving::new(8);
        let turns: Vec<_> = (0..4).map(|_| serving.begin()).collect();
        assert!(serving.core_to_spare());
        let fifth = serving.begin();
        assert!(!serving.core_to_spare());
        drop(fifth);
        drop(turns);
    }
}
