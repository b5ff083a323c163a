//! Request latencies kept as a log-linear histogram: a fixed 58 KiB per
//! histogram however long the run, values below 256 ns exact and every
//! other value within 1/128 (0.8%) of the truth. Percentiles are taken by
//! nearest rank, as from the sorted samples, and reported as the highest
//! value their bucket holds (never above the largest value seen).

/// Bits of each value kept below its leading one.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Values below `2 * SUB` each have a bucket; each power of two above
/// that has `SUB` of them.
const BUCKETS: usize = ((64 - SUB_BITS as usize - 1) << SUB_BITS) + 2 * SUB as usize;

#[derive(Clone, Debug)]
pub struct Latencies {
    counts: Vec<u64>,
    count: u64,
    max: u64,
}

impl Default for Latencies {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            count: 0,
            max: 0,
        }
    }
}

/// The bucket of `value`.
fn bucket(value: u64) -> usize {
    if value < 2 * SUB {
        return value as usize;
    }
    let shift = 63 - value.leading_zeros() - SUB_BITS;
    // The top SUB_BITS + 1 bits: SUB..2 * SUB.
    let top = value >> shift;
    ((shift as usize) << SUB_BITS) + top as usize
}

/// The highest value bucket `index` holds.
fn bucket_high(index: usize) -> u64 {
    if index < 2 * SUB as usize {
        return index as u64;
    }
    let shift = (index >> SUB_BITS) as u32 - 1;
    let top = (index as u64 & (SUB - 1)) + SUB;
    // The last bucket's end, 2^64, shifts out to 0 and wraps to u64::MAX.
    ((top + 1) << shift).wrapping_sub(1)
}

impl Latencies {
    /// Adds one latency, in nanoseconds.
    pub fn record(&mut self, nanos: u64) {
        self.counts[bucket(nanos)] += 1;
        self.count += 1;
        self.max = self.max.max(nanos);
    }

    /// Adds every latency `other` holds.
    pub fn merge(&mut self, other: &Latencies) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The nearest-rank `p`-th percentile in nanoseconds (0 for none).
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // The epsilon keeps 99.9% of 1000 at rank 999 despite rounding.
        let rank = ((p / 100.0) * self.count as f64 - 1e-9).ceil() as u64;
        let rank = rank.clamp(1, self.count);
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_high(index).min(self.max);
            }
        }
        self.max
    }

    /// The `p`-th percentile in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        self.percentile(p) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(values: impl IntoIterator<Item = u64>) -> Latencies {
        let mut l = Latencies::default();
        values.into_iter().for_each(|v| l.record(v));
        l
    }

    #[test]
    fn small_values_use_the_exact_nearest_rank() {
        let l = of(1..=200);
        assert_eq!(l.percentile(50.0), 100);
        assert_eq!(l.percentile(99.0), 198);
        assert_eq!(l.percentile(100.0), 200);
        assert_eq!(l.percentile(0.0), 1);
        assert_eq!(of([]).percentile(50.0), 0);
        assert_eq!(of([7]).percentile(99.9), 7);
    }

    #[test]
    fn large_values_are_within_one_part_in_128_and_never_below() {
        let values: Vec<u64> = (0..2000u64).map(|i| 1000 + i * i * 97).collect();
        let l = of(values.iter().copied());
        for p in [1.0, 50.0, 90.0, 99.0, 99.9] {
            let rank = ((p / 100.0) * values.len() as f64 - 1e-9).ceil() as usize;
            let exact = values[rank - 1];
            let got = l.percentile(p);
            assert!(got >= exact, "p{p}: {got} below {exact}");
            assert!(
                got - exact <= exact / 128,
                "p{p}: {got} too far from {exact}"
            );
        }
        assert_eq!(l.percentile(100.0), *values.last().unwrap());
        assert_eq!(l.count(), 2000);
    }

    #[test]
    fn every_bucket_holds_the_values_that_map_to_it() {
        for shift in 0..64 {
            for v in [
                1u64 << shift,
                (1u64 << shift) - 1,
                (1 << shift) + (1 << shift) / 3,
            ] {
                let index = bucket(v);
                assert!(index < BUCKETS, "{v}");
                assert!(bucket_high(index) >= v, "{v}");
                if index > 0 {
                    assert!(bucket_high(index - 1) < v, "{v}");
                }
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_high(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn merged_histograms_count_both() {
        let mut a = of([10, 20]);
        a.merge(&of([30, 5000]));
        assert_eq!(a.count(), 4);
        assert_eq!(a.percentile(50.0), 20);
        assert_eq!(a.percentile(100.0), 5000);
    }
}
