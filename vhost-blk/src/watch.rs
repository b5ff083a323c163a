//! How long a queue whose transfers wait for the disk watches its ring and
//! its completions before it sleeps (`--poll-us`, the longest window).
//!
//! A driver that keeps a disk busy makes its next requests available within
//! microseconds of its completions, and the disk completes within a few
//! hundred: watching catches both without the driver's kick, the io_uring
//! completion's wake-up and the queue worker's sleep, which on a nested or
//! busy host cost tens of microseconds each, all of them time the disk
//! waits for its next request. A queue that is seldom given work would
//! only burn its core, so the window adapts to how long the queue waited
//! for work, its watch and its sleep after it together, on the lines of
//! QEMU's adaptive polling: a wait longer than the window but no longer
//! than the longest doubles the window (from none, it starts at `START`),
//! and a longer one halves it (below `START`, to none).

use std::time::{Duration, Instant};

/// Where a window that has shrunk to nothing starts growing again.
const START: Duration = Duration::from_micros(8);

#[derive(Debug)]
pub struct WatchWindow {
    longest: Duration,
    current: Duration,
    /// When the queue began to wait: its first watch since it last had
    /// work, or its sleep.
    waiting_since: Option<Instant>,
    /// The wait ended in a sleep (`woke` judges only those).
    slept: bool,
}

impl Default for WatchWindow {
    /// A queue that never watches.
    fn default() -> Self {
        WatchWindow::new(Duration::ZERO)
    }
}

impl WatchWindow {
    /// A window of up to `longest` (zero: the queue never watches); it
    /// starts at its longest.
    pub fn new(longest: Duration) -> Self {
        WatchWindow {
            longest,
            current: longest,
            waiting_since: None,
            slept: false,
        }
    }

    /// How long the next watch lasts (zero: sleep at once).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The queue begins a watch now.
    pub fn watching(&mut self, now: Instant) {
        self.waiting_since.get_or_insert(now);
    }

    /// The watch found work: the wait is over.
    pub fn found(&mut self) {
        self.waiting_since = None;
    }

    /// The queue goes to sleep now (until a kick or a completion).
    pub fn sleeping(&mut self, now: Instant) {
        if !self.longest.is_zero() {
            self.waiting_since.get_or_insert(now);
            self.slept = true;
        }
    }

    /// The queue woke up from a sleep: a wait (watch and sleep) the
    /// longest window would have caught, and this one did not, widens the
    /// window; a longer one narrows it. A wake-up without a sleep before it
    /// changes nothing.
    pub fn woke(&mut self, now: Instant) {
        let since = self.waiting_since.take();
        let Some(since) = since.filter(|_| std::mem::take(&mut self.slept)) else {
            return;
        };
        let waited = now.saturating_duration_since(since);
        if waited > self.longest {
            self.current /= 2;
            if self.current < START {
                self.current = Duration::ZERO;
            }
        } else if waited > self.current {
            self.current = if self.current.is_zero() {
                START
            } else {
                self.current * 2
            }
            .min(self.longest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGEST: Duration = Duration::from_micros(1000);

    /// The queue begins to wait, and work comes `after` that: a watch at
    /// least that long finds it; a shorter one ends, the queue sleeps, and
    /// the work wakes it.
    fn work_after(w: &mut WatchWindow, after: Duration) {
        let t0 = Instant::now();
        if w.current().is_zero() {
            w.sleeping(t0);
        } else {
            w.watching(t0);
            if w.current() >= after {
                w.found();
                return;
            }
            w.sleeping(t0 + w.current());
        }
        w.woke(t0 + after);
    }

    #[test]
    fn long_waits_shut_the_window_and_short_ones_open_it_until_it_catches_them() {
        let mut w = WatchWindow::new(LONGEST);
        assert_eq!(w.current(), LONGEST);
        work_after(&mut w, Duration::from_millis(10));
        assert_eq!(w.current(), Duration::from_micros(500));
        for _ in 0..6 {
            work_after(&mut w, Duration::from_millis(10));
        }
        // 1000 / 2^7 is under 8 us: no watch at all.
        assert_eq!(w.current(), Duration::ZERO);
        work_after(&mut w, Duration::from_millis(10));
        assert_eq!(w.current(), Duration::ZERO, "a long wait leaves it shut");
        // A disk that completes in 300 us: the window grows until a watch
        // catches the completion, and stays there.
        work_after(&mut w, Duration::from_micros(300));
        assert_eq!(w.current(), START);
        for _ in 0..20 {
            work_after(&mut w, Duration::from_micros(300));
        }
        assert_eq!(w.current(), Duration::from_micros(512));
        // A driver that comes back 900 us later widens it to the longest.
        work_after(&mut w, Duration::from_micros(900));
        assert_eq!(w.current(), LONGEST);
    }

    #[test]
    fn the_watch_counts_in_the_wait() {
        // Work every 1.5 ms: the 1 ms watch misses it and the sleep after
        // lasts 0.5 ms, but the wait (1.5 ms) is over the longest window.
        let mut w = WatchWindow::new(LONGEST);
        work_after(&mut w, Duration::from_micros(1500));
        assert_eq!(w.current(), Duration::from_micros(500));
        for _ in 0..7 {
            work_after(&mut w, Duration::from_micros(1500));
        }
        assert_eq!(w.current(), Duration::ZERO);
    }

    #[test]
    fn a_wake_up_without_a_sleep_before_it_changes_nothing() {
        let mut w = WatchWindow::new(LONGEST);
        work_after(&mut w, Duration::from_millis(10));
        let now = w.current();
        w.woke(Instant::now());
        assert_eq!(w.current(), now);
        // Nor does a watch that was never followed by a sleep.
        w.watching(Instant::now());
        w.woke(Instant::now() + Duration::from_millis(10));
        assert_eq!(w.current(), now);
    }

    #[test]
    fn a_window_of_nothing_never_opens() {
        let mut w = WatchWindow::new(Duration::ZERO);
        work_after(&mut w, Duration::from_micros(1));
        assert_eq!(w.current(), Duration::ZERO);
    }
}
