//! How long a queue whose transfers wait for the disk watches its ring and
//! its completions before it sleeps (`--poll-us`, the longest window).
//!
//! A driver that keeps a disk busy makes its next requests available within
//! microseconds of its completions, and the disk completes within a few
//! hundred: watching catches both without the driver's kick, the io_uring
//! completion's wake-up and the queue worker's sleep, which on a nested or
//! busy host cost tens of microseconds each, all of them time the disk
//! waits for its next request. A queue that is seldom given work would
//! only burn its core, so the window adapts to how long the queue sleeps,
//! on the lines of QEMU's adaptive polling: a sleep that a watch of the
//! longest window would have caught doubles the window (from none, it
//! starts at `START`), and a longer one halves it (below `START`, to none).
//! A watch that runs out changes nothing by itself: the sleep after it says
//! whether a longer one would have paid.

use std::time::{Duration, Instant};

/// Where a window that has shrunk to nothing starts growing again.
const START: Duration = Duration::from_micros(8);

#[derive(Debug)]
pub struct WatchWindow {
    longest: Duration,
    current: Duration,
    slept_at: Option<Instant>,
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
            slept_at: None,
        }
    }

    /// How long the next watch lasts (zero: sleep at once).
    pub fn current(&self) -> Duration {
        self.current
    }

    /// The queue goes to sleep now (until a kick or a completion).
    pub fn sleeping(&mut self, now: Instant) {
        if !self.longest.is_zero() {
            self.slept_at = Some(now);
        }
    }

    /// The queue woke up: a sleep the longest window would have caught
    /// widens the window, a longer one narrows it. A wake-up without a
    /// sleep before it changes nothing.
    pub fn woke(&mut self, now: Instant) {
        let Some(slept_at) = self.slept_at.take() else {
            return;
        };
        if now.saturating_duration_since(slept_at) <= self.longest {
            self.current = if self.current.is_zero() {
                START
            } else {
                self.current * 2
            }
            .min(self.longest);
        } else {
            self.current /= 2;
            if self.current < START {
                self.current = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGEST: Duration = Duration::from_micros(1000);

    fn slept(w: &mut WatchWindow, for_: Duration) {
        let t0 = Instant::now();
        w.sleeping(t0);
        w.woke(t0 + for_);
    }

    #[test]
    fn long_sleeps_shut_the_window_and_short_ones_open_it_to_the_longest() {
        let mut w = WatchWindow::new(LONGEST);
        assert_eq!(w.current(), LONGEST);
        slept(&mut w, Duration::from_millis(10));
        assert_eq!(w.current(), Duration::from_micros(500));
        for _ in 0..6 {
            slept(&mut w, Duration::from_millis(10));
        }
        // 1000 / 2^7 is under 8 us: no watch at all.
        assert_eq!(w.current(), Duration::ZERO);
        slept(&mut w, Duration::from_millis(10));
        assert_eq!(w.current(), Duration::ZERO, "a long sleep leaves it shut");
        // A disk that completes in 300 us, watched too briefly to be seen:
        // each sleep is short, so the window grows until a watch catches it.
        slept(&mut w, Duration::from_micros(300));
        assert_eq!(w.current(), START);
        for _ in 0..10 {
            slept(&mut w, Duration::from_micros(300));
        }
        assert_eq!(w.current(), LONGEST);
    }

    #[test]
    fn a_wake_up_without_a_sleep_before_it_changes_nothing() {
        let mut w = WatchWindow::new(LONGEST);
        slept(&mut w, Duration::from_millis(10));
        let now = w.current();
        w.woke(Instant::now());
        assert_eq!(w.current(), now);
    }

    #[test]
    fn a_window_of_nothing_never_opens() {
        let mut w = WatchWindow::new(Duration::ZERO);
        slept(&mut w, Duration::from_micros(1));
        assert_eq!(w.current(), Duration::ZERO);
    }
}
