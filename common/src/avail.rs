//! Taking the next chain from a virtqueue's avail ring.
//!
//! virtio-queue's `AvailIter` ends in two cases it does not tell apart: the
//! driver has made nothing more available, or the ring entry that names the
//! next chain cannot be read. The second happens when a frontend places
//! the avail ring so that it runs past the end of guest memory (the
//! vhost-user library checks only where a ring starts), or takes the
//! memory away under a running ring. A worker that takes it for an empty
//! ring finds the available index still ahead when it turns notifications
//! back on, looks again, and spins for ever. `next_chain` reports it as an
//! error instead, so the worker stops serving the ring.

use std::ops::Deref;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, Permissions};

/// Bytes before the avail ring's entries (flags, idx), and per entry.
const AVAIL_HEADER: u64 = 4;
const AVAIL_ENTRY: u64 = 2;

/// Whether `next_chain`'s error says the ring is not set up (yet): not
/// ready, or without its avail ring's address. A frontend may start a ring
/// before it gives the addresses, or stop it while a worker looks: there is
/// nothing to take until it is set up, which is not a ring the driver
/// broke (that one is left alone until the frontend sets it up again).
pub fn not_set_up(e: &virtio_queue::Error) -> bool {
    matches!(e, virtio_queue::Error::QueueNotReady)
}

/// The next chain the driver made available on `q`, or None when it made
/// none. An error when the ring cannot be read: its index is more than a
/// ring ahead, it is not ready, or the entry naming the next chain lies
/// outside guest memory (whether or not the driver has filled it yet).
pub fn next_chain<M>(
    q: &mut Queue,
    mem: M,
) -> Result<Option<DescriptorChain<M>>, virtio_queue::Error>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    if let Some(chain) = q.iter(mem.clone())?.next() {
        return Ok(Some(chain));
    }
    // Nothing came: see whether the entry it would have come from exists.
    let slot = q.next_avail().checked_rem(q.size()).unwrap_or(0);
    let entry = q
        .avail_ring()
        .checked_add(AVAIL_HEADER + u64::from(slot) * AVAIL_ENTRY)
        .map(GuestAddress);
    match entry {
        Some(at) if mem.check_range(at, AVAIL_ENTRY as usize, Permissions::Read) => Ok(None),
        at => Err(virtio_queue::Error::GuestMemory(
            GuestMemoryError::InvalidGuestAddress(at.unwrap_or(GuestAddress(q.avail_ring()))),
        )),
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    const MEM: u64 = 0x1_0000;
    const SIZE: u16 = 16;

    fn ring(mem: &GuestMemoryMmap, avail: u64) -> Queue {
        let mut q = Queue::new(SIZE).expect("queue");
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(avail as u32), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        // One chain of one descriptor: head 0, 16 bytes at 0x4000.
        mem.write_obj(0x4000u64, GuestAddress(0x1000))
            .expect("desc addr");
        mem.write_obj(16u32, GuestAddress(0x1008))
            .expect("desc len");
        q
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("memory")
    }

    #[test]
    fn an_empty_ring_gives_nothing_and_a_made_available_chain_comes_next() {
        let mem = memory();
        let mut q = ring(&mem, 0x2000);
        assert!(next_chain(&mut q, &mem).expect("empty ring").is_none());
        mem.write_obj(0u16, GuestAddress(0x2004)).expect("entry");
        mem.write_obj(1u16, GuestAddress(0x2002)).expect("idx");
        let chain = next_chain(&mut q, &mem).expect("ring").expect("a chain");
        assert_eq!(chain.head_index(), 0);
        assert!(next_chain(&mut q, &mem).expect("ring").is_none());
    }

    #[test]
    fn a_ring_without_its_addresses_is_not_set_up_rather_than_broken() {
        let mem = memory();
        let mut unset = Queue::new(SIZE).expect("queue");
        unset.set_ready(true);
        let e = next_chain(&mut unset, &mem).expect_err("a ring with no avail ring");
        assert!(not_set_up(&e), "{e:?}");
        let mut q = ring(&mem, 0x2000);
        q.set_ready(false);
        assert!(not_set_up(
            &next_chain(&mut q, &mem).expect_err("not ready")
        ));
        let mut past = ring(&mem, MEM - AVAIL_HEADER);
        mem.write_obj(1u16, GuestAddress(MEM - 2)).expect("idx");
        assert!(!not_set_up(
            &next_chain(&mut past, &mem).expect_err("outside")
        ));
    }

    /// The avail ring's header is the last 4 bytes of memory: its index
    /// reads, its first entry does not. Taking that for an empty ring is
    /// what made workers spin.
    #[test]
    fn an_entry_outside_memory_is_an_error_not_an_empty_ring() {
        let mem = memory();
        let mut q = ring(&mem, MEM - AVAIL_HEADER);
        mem.write_obj(1u16, GuestAddress(MEM - 2)).expect("idx");
        let e = next_chain(&mut q, &mem).expect_err("an unreadable entry was taken as none");
        assert!(matches!(e, virtio_queue::Error::GuestMemory(_)), "{e:?}");
    }
}
