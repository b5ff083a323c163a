//! Descriptor chains for fuzzing a backend's ring handling: drawn wholly at
//! random, or well-formed ones with one field changed. Addresses fall in
//! the buffers the caller names, at or past the end of guest memory, or
//! anywhere; lengths run from 0 to 4 GiB; flags and next links are random
//! (loops, links off the chain, indirect tables). The same seed gives the
//! same chains.

use crate::load::Rng;
use crate::virtqueue::{Buf, RawDesc, DESC_F_NEXT, DESC_F_WRITE};

/// VIRTQ_DESC_F_INDIRECT.
pub const DESC_F_INDIRECT: u16 = 4;

/// A buffer chains may point into: anywhere in its first `spread` bytes,
/// at 512-byte steps.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub addr: u64,
    pub spread: u64,
}

pub struct ChainFuzzer {
    rng: Rng,
    targets: Vec<Target>,
    mem_end: u64,
}

impl ChainFuzzer {
    /// Chains into `targets` (at least one) of guest memory `mem_end`
    /// bytes long.
    pub fn new(seed: u64, targets: Vec<Target>, mem_end: u64) -> Self {
        assert!(!targets.is_empty(), "a fuzzer needs a buffer to aim at");
        ChainFuzzer {
            rng: Rng::new(seed),
            targets,
            mem_end,
        }
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.next_u64() % n
    }

    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn addr(&mut self) -> u64 {
        match self.below(8) {
            0..=4 => {
                let pick = self.below(self.targets.len() as u64) as usize;
                let t = self.targets[pick];
                t.addr + self.below(t.spread.div_ceil(512).max(1)) * 512
            }
            5 => self.mem_end - self.below(4096),
            6 => self.rng.next_u64(),
            _ => 1 << 40,
        }
    }

    fn len(&mut self) -> u32 {
        match self.below(8) {
            0 => 0,
            1 => 1,
            2 => 16,
            3 => 512,
            4 => 4096,
            5 => self.below(70_000) as u32,
            6 => u32::MAX,
            _ => 8,
        }
    }

    fn flags(&mut self, last: bool) -> u16 {
        let mut flags = 0;
        if !last || self.below(8) == 0 {
            flags |= DESC_F_NEXT;
        }
        if self.below(2) == 0 {
            flags |= DESC_F_WRITE;
        }
        if self.below(16) == 0 {
            flags |= DESC_F_INDIRECT;
        }
        flags
    }

    fn next(&mut self, d: usize) -> u16 {
        if self.below(8) == 0 {
            self.below(70) as u16
        } else {
            d as u16 + 1
        }
    }

    /// One to five descriptors drawn wholly at random.
    pub fn random(&mut self) -> Vec<RawDesc> {
        let n = 1 + self.below(5) as usize;
        (0..n)
            .map(|d| RawDesc {
                addr: self.addr(),
                len: self.len(),
                flags: self.flags(d + 1 == n),
                next: self.next(d),
            })
            .collect()
    }

    /// `bufs` as a chain, left as it is half the time, otherwise with one
    /// field of one descriptor changed.
    pub fn mutated(&mut self, bufs: &[Buf]) -> Vec<RawDesc> {
        let mut chain = chain_of(bufs);
        if chain.is_empty() || self.below(2) == 0 {
            return chain;
        }
        let n = chain.len();
        let d = self.below(n as u64) as usize;
        match self.below(4) {
            0 => chain[d].addr = self.addr(),
            1 => chain[d].len = self.len(),
            2 => chain[d].flags = self.flags(d + 1 == n),
            _ => chain[d].next = self.next(d),
        }
        chain
    }
}

/// Buffers as the descriptors 0, 1, ... of one chain.
pub fn chain_of(bufs: &[Buf]) -> Vec<RawDesc> {
    let n = bufs.len();
    bufs.iter()
        .enumerate()
        .map(|(d, b)| {
            let mut flags = if b.write { DESC_F_WRITE } else { 0 };
            if d + 1 < n {
                flags |= DESC_F_NEXT;
            }
            RawDesc {
                addr: b.addr,
                len: b.len,
                flags,
                next: d as u16 + 1,
            }
        })
        .collect()
}

/// The bytes a plain chain (no indirect table, no link off it or back
/// into it) lets the device write; None for any other chain.
pub fn writable_room(chain: &[RawDesc]) -> Option<u64> {
    let mut room = 0;
    for (d, c) in chain.iter().enumerate() {
        if c.flags & DESC_F_INDIRECT != 0 {
            return None;
        }
        if c.flags & DESC_F_WRITE != 0 {
            room += u64::from(c.len);
        }
        if c.flags & DESC_F_NEXT == 0 {
            return Some(room);
        }
        if usize::from(c.next) != d + 1 || d + 1 == chain.len() {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(addr: u64, len: u32, write: bool) -> Buf {
        Buf { addr, len, write }
    }

    #[test]
    fn room_counts_writable_bytes_of_plain_chains_only() {
        let plain = chain_of(&[buf(0, 16, false), buf(4096, 512, true), buf(16, 1, true)]);
        assert_eq!(writable_room(&plain), Some(513));
        let mut off_chain = plain.clone();
        off_chain[2].flags |= DESC_F_NEXT;
        assert_eq!(writable_room(&off_chain), None);
        let mut looped = plain.clone();
        looped[1].next = 0;
        assert_eq!(writable_room(&looped), None);
        let mut indirect = plain;
        indirect[0].flags |= DESC_F_INDIRECT;
        assert_eq!(writable_room(&indirect), None);
    }

    #[test]
    fn chains_are_reproducible_and_aim_at_the_targets() {
        let targets = vec![Target {
            addr: 0x10_0000,
            spread: 4096,
        }];
        let mut a = ChainFuzzer::new(7, targets.clone(), 1 << 24);
        let mut b = ChainFuzzer::new(7, targets, 1 << 24);
        let mut in_target = 0;
        for _ in 0..500 {
            let chain = a.random();
            assert_eq!(format!("{chain:?}"), format!("{:?}", b.random()));
            assert!((1..=5).contains(&chain.len()));
            in_target += chain
                .iter()
                .filter(|d| (0x10_0000..0x10_1000).contains(&d.addr))
                .count();
        }
        assert!(
            in_target > 500,
            "only {in_target} descriptors in the target"
        );
    }
}
