//! Pausing and resuming the vCPUs (QMP `stop`/`cont`). A paused vCPU thread
//! parks on a condition variable before its next KVM_RUN; `pause` kicks
//! every thread out of KVM_RUN with the kick signal until all are parked,
//! so when it returns no guest instruction runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::bus::lock;

#[derive(Default)]
struct State {
    paused: bool,
    /// vCPU threads currently parked.
    parked: usize,
    /// Threads to kick; emptied (under the lock) before they are joined, so
    /// a late `pause` never signals a thread that is gone.
    threads: Vec<libc::pthread_t>,
    /// (vCPU index, kernel thread id), as each thread reports itself.
    tids: Vec<(u8, i64)>,
}

#[derive(Default)]
pub struct RunControl {
    /// Read by vCPUs after every exit without locking.
    paused: AtomicBool,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the vCPUs are not running")]
    NotRunning,
    #[error("{parked} of {total} vCPUs stopped within {timeout:?}")]
    Timeout {
        parked: usize,
        total: usize,
        timeout: Duration,
    },
}

impl RunControl {
    /// Records the started vCPU threads.
    pub fn set_threads(&self, threads: Vec<libc::pthread_t>) {
        lock(&self.state).threads = threads;
    }

    /// Called by each vCPU thread as it starts; replaces the thread id an
    /// earlier start (before a reboot) recorded for the same vCPU.
    pub fn register_tid(&self, index: u8) {
        // SAFETY: gettid(2) has no preconditions.
        let tid = i64::from(unsafe { libc::gettid() });
        let mut state = lock(&self.state);
        state.tids.retain(|&(i, _)| i != index);
        state.tids.push((index, tid));
    }

    /// The vCPUs' kernel thread ids, by index.
    pub fn tids(&self) -> Vec<(u8, i64)> {
        let mut tids = lock(&self.state).tids.clone();
        tids.sort_unstable();
        tids
    }

    /// Forgets the threads (before joining them) and wakes parked ones,
    /// which leave because the stop flag is set. A paused VM stays paused:
    /// the vCPUs a reboot starts park before they run (as in QEMU, a
    /// `system_reset` does not resume a stopped VM).
    pub fn finish(&self) {
        let mut state = lock(&self.state);
        state.threads.clear();
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Called by a vCPU thread between exits: sleeps while the VM is paused
    /// (and `stop` is not set). Whoever sets `stop` calls `finish` after,
    /// which takes the lock this checks `stop` under: the wake-up cannot
    /// come between the check and the wait.
    pub fn park_if_paused(&self, stop: &AtomicBool) {
        if !self.is_paused() {
            return;
        }
        let mut state = lock(&self.state);
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !stop.load(Ordering::Acquire) {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
    }

    /// Pauses every vCPU and waits until all are parked.
    pub fn pause(&self, kick: i32, timeout: Duration) -> Result<(), PauseError> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.state);
        if state.threads.is_empty() {
            return Err(PauseError::NotRunning);
        }
        state.paused = true;
        self.paused.store(true, Ordering::Release);
        while state.parked < state.threads.len() {
            for &thread in &state.threads {
                // SAFETY: the threads in the list are alive: `finish` empties
                // it under this lock before they are joined. The kick signal
                // has a handler installed.
                unsafe { libc::pthread_kill(thread, kick) };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PauseError::Timeout {
                    parked: state.parked,
                    total: state.threads.len(),
                    timeout,
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(5));
            state = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        let mut state = lock(&self.state);
        state.paused = false;
        self.paused.store(false, Ordering::Release);
        self.changed.notify_all();
    }
}
