//! Warnings a guest can cause over and over (a driver's mistakes, a BAR
//! put where it cannot go): the first few are logged at warn level, the
//! rest at debug, so a guest doing it in a loop cannot flood the host's log
//! or stall a vCPU writing it.

/// How many warnings of one source are logged at warn level.
const SHOWN: u32 = 10;

/// Counts the warnings of one source (a device, a BAR).
#[derive(Default)]
pub struct GuestWarnings {
    shown: u32,
    hushed: bool,
}

impl GuestWarnings {
    /// The level of the next warning about `who`; the first one past the
    /// limit says the rest go to debug.
    pub fn level(&mut self, who: &str) -> log::Level {
        if self.shown < SHOWN {
            self.shown += 1;
            return log::Level::Warn;
        }
        if !self.hushed {
            self.hushed = true;
            log::warn!(
                "{who}: {SHOWN} warnings about what the guest did so far; the next are logged at debug level"
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
    }
}
