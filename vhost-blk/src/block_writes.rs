//! The writes under way on an O_DIRECT disk, by range of blocks.
//!
//! A read-modify-write rewrites whole blocks from a copy it read just
//! before, so another write to one of those blocks landing in between
//! would be undone. A read-modify-write (and a discard or write-zeroes,
//! which may be one) therefore waits until nothing else writes its blocks
//! and then holds them alone; a plain write waits only while a
//! read-modify-write holds one of its blocks. Plain writes overlap each
//! other freely: their order is the driver's business.
//!
//! A claim lasts until it is dropped. An asynchronous write's claim
//! travels with its transfer and is dropped once the completion is reaped,
//! so a worker that is about to wait for blocks to itself completes its
//! own transfers first: it would otherwise wait for itself.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub struct BlockWrites {
    /// Bytes; a power of two.
    block: u64,
    state: Mutex<State>,
    released: Condvar,
}

#[derive(Default)]
struct State {
    next_id: u64,
    held: Vec<Held>,
    /// Claims waiting for a release.
    waiting: usize,
}

struct Held {
    id: u64,
    start: u64,
    end: u64,
    alone: bool,
}

/// Blocks held for a write until dropped.
pub struct WriteClaim {
    writes: Arc<BlockWrites>,
    id: u64,
}

impl BlockWrites {
    pub fn new(block: u64) -> Arc<Self> {
        Arc::new(BlockWrites {
            block: block.max(1),
            state: Mutex::new(State::default()),
            released: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blocks of `offset..offset + len` for a plain write: waits while
    /// a read-modify-write holds any of them.
    pub fn write(self: &Arc<Self>, offset: u64, len: u64) -> WriteClaim {
        self.claim(offset, len, false)
    }

    /// The blocks of `offset..offset + len` alone: waits until no other
    /// write holds any of them.
    pub fn read_modify_write(self: &Arc<Self>, offset: u64, len: u64) -> WriteClaim {
        self.claim(offset, len, true)
    }

    fn claim(self: &Arc<Self>, offset: u64, len: u64, alone: bool) -> WriteClaim {
        let start = offset / self.block * self.block;
        let end = offset
            .saturating_add(len)
            .checked_next_multiple_of(self.block)
            .unwrap_or(u64::MAX);
        let mut state = self.lock();
        while state
            .held
            .iter()
            .any(|h| h.start < end && start < h.end && (alone || h.alone))
        {
            state.waiting += 1;
            state = self.released.wait(state).unwrap_or_else(|p| p.into_inner());
            state.waiting -= 1;
        }
        let id = state.next_id;
        state.next_id += 1;
        state.held.push(Held {
            id,
            start,
            end,
            alone,
        });
        WriteClaim {
            writes: Arc::clone(self),
            id,
        }
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().held.len()
    }
}

impl Drop for WriteClaim {
    fn drop(&mut self) {
        let mut state = self.writes.lock();
        if let Some(at) = state.held.iter().position(|h| h.id == self.id) {
            state.held.swap_remove(at);
        }
        if state.waiting > 0 {
            self.writes.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use super::*;

    /// Takes a claim on another thread.
    fn try_claim(
        writes: &Arc<BlockWrites>,
        claim: fn(&Arc<BlockWrites>) -> WriteClaim,
    ) -> JoinHandle<WriteClaim> {
        let writes = writes.clone();
        std::thread::spawn(move || claim(&writes))
    }

    /// Whether the claim is taken within `wait`.
    fn taken_within(waiter: &JoinHandle<WriteClaim>, wait: Duration) -> bool {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if waiter.is_finished() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        waiter.is_finished()
    }

    const LONG: Duration = Duration::from_secs(5);
    const SHORT: Duration = Duration::from_millis(200);

    #[test]
    fn plain_writes_share_blocks_and_a_read_modify_write_has_them_alone() {
        let writes = BlockWrites::new(4096);
        let first = writes.write(0, 8192);

        let sharing = try_claim(&writes, |w| w.write(4096, 4096));
        assert!(taken_within(&sharing, LONG), "writes share blocks");
        let next_block = try_claim(&writes, |w| w.read_modify_write(8192, 512));
        assert!(taken_within(&next_block, LONG), "the next block is free");
        drop(next_block.join().unwrap());

        // Byte 8191 is in the second block, which both writes hold.
        let rmw = try_claim(&writes, |w| w.read_modify_write(8191, 1));
        assert!(!taken_within(&rmw, SHORT), "ahead of a write");
        drop(first);
        assert!(!taken_within(&rmw, SHORT), "ahead of the second write");
        drop(sharing.join().unwrap());
        assert!(taken_within(&rmw, LONG), "once the writes are done");

        let write = try_claim(&writes, |w| w.write(4096, 512));
        assert!(!taken_within(&write, SHORT), "ahead of a read-modify-write");
        drop(rmw.join().unwrap());
        assert!(taken_within(&write, LONG), "once it is done");
        drop(write.join().unwrap());
        assert_eq!(writes.held(), 0);
    }
}
