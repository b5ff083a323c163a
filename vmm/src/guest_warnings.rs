//! Warnings a guest can cause over and over (a driver's mistakes, a BAR
//! put where it cannot go): the first few of a minute are logged at warn
//! level, the rest at debug, so a guest doing it in a loop cannot flood
//! the host's log or stall a vCPU writing it.

use std::time::{Duration, Instant};

/// How many warnings of one source are logged at warn level in a window.
const SHOWN: u32 = 10;
const WINDOW: Duration = Duration::from_secs(60);

/// Counts the warnings of one source (a device, a BAR).
#[derive(Default)]
pub struct GuestWarnings {
    shown: u32,
    hushed: bool,
    /// When the window of the warnings counted began.
    since: Option<Instant>,
}

impl GuestWarnings {
    /// The level of the next warning about `who`; the first one past the
    /// limit says the rest of the window's go to debug.
    pub fn level(&mut self, who: &str) -> log::Level {
        let now = Instant::now();
        if self
            .since
            .is_none_or(|since| now.duration_since(since) >= WINDOW)
        {
            *self = GuestWarnings {
                since: Some(now),
                ..GuestWarnings::default()
            };
        }
        if self.shown < SHOWN {
            self.shown += 1;
            return log::Level::Warn;
        }
        if !self.hushed {
            self.hushed = true;
            log::warn!(
                "{who}: {SHOWN} warnings about what the guest did within a minute; the rest of the minute's are logged at debug level"
            );
        }
        log::Level::Debug
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_warnings_are_warnings_and_the_rest_debug() {
        let mut warnings = GuestWarnings::default();
        let levels: Vec<log::Level> = (0..SHOWN + 3).map(|_| warnings.level("dev")).collect();
        assert!(levels[..SHOWN as usize]
            .iter()
            .all(|l| *l == log::Level::Warn));
        assert!(levels[SHOWN as usize..]
            .iter()
            .all(|l| *l == log::Level::Debug));
        assert!(warnings.hushed);
        // A new window shows warnings again.
        warnings.since = warnings.since.and_then(|s| s.checked_sub(WINDOW));
        assert_eq!(warnings.level("dev"), log::Level::Warn);
        assert!(!warnings.hushed);
    }
}
