//! How long a queue whose transfers wait for the disk watches its ring and
//! its completions before it sleeps (`--poll-us`, the longest window).
//!
//! A driver that keeps a disk busy makes its next requests available within
//! microseconds of its completions, and the disk completes within a few
//! hundred: watching catches both without the driver's kick, the io_uring
//! completion's wake-up and the queue worker's sleep, which on a nested or
//! busy host cost tens of microseconds each, all of them time the disk
//! waits for its next request. A queue that is seldom given work would
//! only burn its core, so the window adapts, as QEMU's adaptive polling
//! does: a watch that found nothing halves it (down to none), and a watch
//! that found work, or a sleep that ended within the longest window,
//! doubles it (from none, it starts at `START`).

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

    /// The last watch found work before its window ended.
    pub fn found(&mut self) {
        self.grow();
    }

    /// The last watch ended with nothing found.
    pub fn missed(&mut self) {
        self.current /= 2;
        if self.current < START {
            self.current = Duration::ZERO;
        }
    }

    /// The queue goes to sleep now (until a kick or a completion).
    pub fn sleeping(&mut self, now: Instant) {
        if !self.longest.is_zero() {
            self.slept_at = Some(now);
        }
    }

    /// The queue woke up: a sleep that a watch of the longest window would
    /// have caught widens the window.
    pub fn woke(&mut self, now: Instant) {
        if let Some(slept_at) = self.slept_at.take() {
            if now.saturating_duration_since(slept_at) <= self.longest {
                self.grow();
            }
        }
    }

    fn grow(&mut self) {
        self.current = if self.current.is_zero() {
            START
        } else {
            self.current * 2
        }
        .min(self.longest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONGEST: Duration = Duration::from_micros(1000);

    #[test]
    fn misses_shrink_the_window_to_nothing_and_finds_widen_it_to_the_longest() {
        let mut w = WatchWindow::new(LONGEST);
        assert_eq!(w.current(), LONGEST);
        w.missed();
        assert_eq!(w.current(), Duration::from_micros(500));
        for _ in 0..6 {
            w.missed();
        }
        // 1000 / 2^7 is under 8 us: no watch at all.
        assert_eq!(w.current(), Duration::ZERO);
        w.found();
        assert_eq!(w.current(), START);
        for _ in 0..10 {
            w.found();
        }
        assert_eq!(w.current(), LONGEST);
    }

    #[test]
    fn only_a_sleep_the_longest_window_would_have_caught_widens_it() {
        let mut w = WatchWindow::new(LONGEST);
        for _ in 0..8 {
            w.missed();
        }
        let t0 = Instant::now();
        w.sleeping(t0);
        w.woke(t0 + Duration::from_millis(5));
        assert_eq!(w.current(), Duration::ZERO, "a long sleep leaves it shut");
        w.sleeping(t0);
        w.woke(t0 + Duration::from_micros(300));
        assert_eq!(w.current(), START);
        // A wake-up without a sleep before it (the first one) changes nothing.
        w.woke(t0 + Duration::from_micros(400));
        assert_eq!(w.current(), START);
    }

    #[test]
    fn a_window_of_nothing_never_opens() {
        let mut w = WatchWindow::new(Duration::ZERO);
        w.found();
        let t0 = Instant::now();
        w.sleeping(t0);
        w.woke(t0);
        assert_eq!(w.current(), Duration::ZERO);
    }
}
