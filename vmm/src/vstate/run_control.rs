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
    /// Threads to kick: each vCPU thread's own, from its start until it
    /// leaves its run loop; also emptied (under the lock) before they are
    /// joined, so a late `pause` never signals a thread that is gone.
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
    #[error("{parked} of {total} vCPUs stopped within {timeout:?}")]
    Timeout {
        parked: usize,
        total: usize,
        timeout: Duration,
    },
}

impl RunControl {
    /// Called by each vCPU thread as it starts, before it first enters the
    /// guest: from now on `pause` kicks it and waits for it. Also replaces
    /// the thread id an earlier start (before a reboot) recorded for the
    /// same vCPU. A thread that starts once `stop` is set (and `finish`
    /// has run) is not recorded: it leaves without running the guest.
    pub fn register(&self, index: u8, stop: &AtomicBool) {
        // SAFETY: gettid(2) has no preconditions.
        let tid = i64::from(unsafe { libc::gettid() });
        let mut state = lock(&self.state);
        state.tids.retain(|&(i, _)| i != index);
        state.tids.push((index, tid));
        if !stop.load(Ordering::Acquire) {
            // SAFETY: pthread_self has no preconditions.
            state.threads.push(unsafe { libc::pthread_self() });
        }
    }

    /// Called by a vCPU thread as it leaves its run loop: `pause` stops
    /// waiting for it (it will not run the guest again).
    pub fn unregister(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut state = lock(&self.state);
        // SAFETY: pthread_equal only compares the two handles.
        state
            .threads
            .retain(|&t| unsafe { libc::pthread_equal(t, me) } == 0);
        self.changed.notify_all();
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

    /// Pauses every vCPU and waits until all are parked. With no vCPU
    /// thread running (before the first start, or during a reboot) the
    /// pause holds: the threads that start next park before they run.
    pub fn pause(&self, kick: i32, timeout: Duration) -> Result<(), PauseError> {
        let deadline = Instant::now() + timeout;
        let mut state = lock(&self.state);
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    use super::*;

    /// Signal 0 checks the thread exists and delivers nothing: the test
    /// threads below come back to `park_if_paused` by themselves.
    const NO_SIGNAL: i32 = 0;
    const LIMIT: Duration = Duration::from_secs(10);

    /// A stand-in vCPU thread: registers, then "runs the guest" (counts)
    /// between checks for a pause, until `stop`.
    fn vcpu(
        run: &Arc<RunControl>,
        stop: &Arc<AtomicBool>,
        ran: &Arc<AtomicU32>,
    ) -> std::thread::JoinHandle<()> {
        let (run, stop, ran) = (run.clone(), stop.clone(), ran.clone());
        std::thread::spawn(move || {
            run.register(0, &stop);
            while !stop.load(Ordering::Acquire) {
                run.park_if_paused(&stop);
                if stop.load(Ordering::Acquire) {
                    break;
                }
                ran.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            }
            run.unregister();
        })
    }

    #[test]
    fn a_pause_with_no_vcpu_running_holds_the_ones_that_start() {
        let run = Arc::new(RunControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        let ran = Arc::new(AtomicU32::new(0));
        run.pause(NO_SIGNAL, LIMIT)
            .expect("a pause before the start");
        let thread = vcpu(&run, &stop, &ran);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ran.load(Ordering::Relaxed), 0, "ran while paused");
        // The started thread counts as parked: a second pause returns.
        run.pause(NO_SIGNAL, LIMIT)
            .expect("a pause of a parked vCPU");
        run.resume();
        let deadline = Instant::now() + LIMIT;
        while ran.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "did not run after resume");
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::Release);
        run.finish();
        thread.join().expect("join");
    }

    #[test]
    fn a_pause_waits_until_a_running_vcpu_parks() {
        let run = Arc::new(RunControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        let ran = Arc::new(AtomicU32::new(0));
        let thread = vcpu(&run, &stop, &ran);
        while ran.load(Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        run.pause(NO_SIGNAL, LIMIT).expect("pause");
        let at_pause = ran.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ran.load(Ordering::Relaxed), at_pause, "ran while paused");
        run.resume();
        stop.store(true, Ordering::Release);
        run.finish();
        thread.join().expect("join");
    }

    #[test]
    fn a_vcpu_that_leaves_its_loop_is_not_waited_for() {
        let run = Arc::new(RunControl::default());
        let stop = Arc::new(AtomicBool::new(false));
        let registered = Arc::new(AtomicBool::new(false));
        let leave = Arc::new(AtomicBool::new(false));
        // Registered, never parks, then leaves (as a vCPU does when the
        // VM stops for a reset).
        let thread = {
            let (run, stop, registered, leave) =
                (run.clone(), stop.clone(), registered.clone(), leave.clone());
            std::thread::spawn(move || {
                run.register(0, &stop);
                registered.store(true, Ordering::Release);
                while !leave.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                run.unregister();
            })
        };
        while !registered.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let pausing = {
            let run = run.clone();
            std::thread::spawn(move || run.pause(NO_SIGNAL, LIMIT))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pausing.is_finished(), "the pause did not wait");
        leave.store(true, Ordering::Release);
        let started = Instant::now();
        pausing.join().expect("join").expect("pause");
        assert!(started.elapsed() < LIMIT, "the pause waited for its limit");
        thread.join().expect("join");
    }

    #[test]
    fn a_thread_starting_after_the_stop_is_not_kicked() {
        let run = RunControl::default();
        let stop = AtomicBool::new(true);
        run.register(0, &stop);
        assert!(lock(&run.state).threads.is_empty());
        assert_eq!(run.tids().len(), 1);
    }
}
