//! Time from the time-stamp counter, for timeouts and pacing. The rate is
//! not calibrated: hosts run the TSC at 1-4 GHz, and nothing here needs
//! more than "about a second".

/// Time-stamp counter ticks in about a second.
pub const SECOND: u64 = 2_000_000_000;

pub fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A point in time.
pub struct Deadline(u64);

impl Deadline {
    pub fn after(ticks: u64) -> Self {
        Deadline(tsc().saturating_add(ticks))
    }

    pub fn passed(&self) -> bool {
        tsc() >= self.0
    }
}
