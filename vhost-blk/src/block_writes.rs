//! The writes under way on an O_DIRECT disk, by range of blocks.
//!
//! A read-modify-write rewrites whole blocks from a copy it read just
//! before, so another write to one of those blocks landing in between
//! would be undone. A read-modify-write (and a discard or write-zeroes,
//! which may be one) therefore waits until nothing else writes its blocks
//! and then holds them alone; a plain write waits only while a
//! read-modify-write holds or waits for one of its blocks. Plain writes
//! overlap each other freely: their order is the driver's business.
//! Claims that conflict are granted in the order they were asked for, so a
//! stream of plain writes cannot keep a read-modify-write waiting.
//!
//! A claim lasts until it is dropped. An asynchronous write's claim
//! travels with its transfer and is dropped once the completion is reaped.
//! So a worker never waits for blocks while transfers of its own are in
//! flight: it completes them first (it would otherwise wait for itself, or
//! for a claim queued behind its own), and an asynchronous write only
//! takes blocks that are free at once (`try_write`).

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
    held: Vec<Claimed>,
    /// Claims waiting for a release, oldest first.
    waiting: Vec<Claimed>,
}

/// A range of blocks, held or waited for; `id`s grow in the order claims
/// are asked for.
#[derive(Clone, Copy)]
struct Claimed {
    id: u64,
    start: u64,
    end: u64,
    alone: bool,
}

impl Claimed {
    /// Whether the two claims cannot hold their blocks at once.
    fn conflicts(&self, other: &Claimed) -> bool {
        self.start < other.end && other.start < self.end && (self.alone || other.alone)
    }
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
    /// a read-modify-write holds or waits for any of them.
    pub fn write(self: &Arc<Self>, offset: u64, len: u64) -> WriteClaim {
        self.claim(offset, len, false)
    }

    /// The blocks for a plain write if no read-modify-write holds or waits
    /// for any of them; None rather than wait.
    pub fn try_write(self: &Arc<Self>, offset: u64, len: u64) -> Option<WriteClaim> {
        let mut state = self.lock();
        let wanted = self.range(&mut state, offset, len, false);
        if state
            .held
            .iter()
            .chain(&state.waiting)
            .any(|other| wanted.conflicts(other))
        {
            return None;
        }
        state.held.push(wanted);
        Some(self.claimed(wanted.id))
    }

    /// The blocks of `offset..offset + len` alone: waits until no other
    /// write holds any of them.
    pub fn read_modify_write(self: &Arc<Self>, offset: u64, len: u64) -> WriteClaim {
        self.claim(offset, len, true)
    }

    /// Whole blocks around `offset..offset + len`, with the next id.
    fn range(&self, state: &mut State, offset: u64, len: u64, alone: bool) -> Claimed {
        let start = offset / self.block * self.block;
        let end = offset
            .saturating_add(len)
            .checked_next_multiple_of(self.block)
            .unwrap_or(u64::MAX);
        let id = state.next_id;
        state.next_id += 1;
        Claimed {
            id,
            start,
            end,
            alone,
        }
    }

    fn claimed(self: &Arc<Self>, id: u64) -> WriteClaim {
        WriteClaim {
            writes: Arc::clone(self),
            id,
        }
    }

    /// Waits until no held claim and no claim asked for earlier conflicts.
    fn claim(self: &Arc<Self>, offset: u64, len: u64, alone: bool) -> WriteClaim {
        let mut state = self.lock();
        let wanted = self.range(&mut state, offset, len, alone);
        state.waiting.push(wanted);
        while state.held.iter().any(|h| wanted.conflicts(h))
            || state
                .waiting
                .iter()
                .take_while(|w| w.id != wanted.id)
                .any(|w| wanted.conflicts(w))
        {
            state = self.released.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.waiting.retain(|w| w.id != wanted.id);
        state.held.push(wanted);
        // Claims behind this one that it does not conflict with may go.
        if !state.waiting.is_empty() {
            self.released.notify_all();
        }
        self.claimed(wanted.id)
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
        if !state.waiting.is_empty() {
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

    /// A read-modify-write waiting for a block goes before plain writes to
    /// it asked for later, so a stream of them cannot hold it off; writes
    /// elsewhere still go at once.
    #[test]
    fn a_waiting_read_modify_write_goes_before_later_writes_to_its_blocks() {
        let writes = BlockWrites::new(4096);
        let stream = writes.write(0, 4096);
        let rmw = try_claim(&writes, |w| w.read_modify_write(0, 512));
        assert!(!taken_within(&rmw, SHORT), "behind the first write");

        // The stream goes on: each next write to the block is refused,
        // or waits, until the read-modify-write has had its turn.
        assert!(writes.try_write(0, 4096).is_none());
        assert!(writes.try_write(4095, 1).is_none());
        let queued = try_claim(&writes, |w| w.write(0, 4096));
        assert!(writes.try_write(4096, 4096).is_some(), "another block");
        drop(stream);
        assert!(taken_within(&rmw, LONG), "its turn");
        assert!(writes.try_write(0, 4096).is_none(), "it holds the block");
        assert!(!taken_within(&queued, SHORT), "it holds the block");
        drop(rmw.join().unwrap());
        assert!(taken_within(&queued, LONG));
        drop(queued.join().unwrap());
        assert_eq!(writes.held(), 0);
        assert!(writes.lock().waiting.is_empty());
    }
}
