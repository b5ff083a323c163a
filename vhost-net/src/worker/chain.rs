//! Reading a descriptor chain into a list of checked guest buffers.

use std::ops::Deref;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::iovec::{IoVecs, MAX_IOVECS};

/// Buffers one chain may have: one iovec each, with one left for the
/// receive path's overflow area.
pub const MAX_SEGS: usize = MAX_IOVECS - 1;

/// A guest buffer inside one memory region (one iovec).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: usize,
}

/// Where `collect` puts a chain's buffers: guest addresses to keep
/// (`Vec<Seg>`), or iovecs to use at once (`IoVecs`).
pub trait Buffers<'a> {
    fn clear(&mut self);
    fn count(&self) -> usize;
    /// Adds `slice`, which is guest memory at `addr`.
    fn add(&mut self, addr: GuestAddress, slice: &VolatileSlice<'a, ()>);
}

impl<'a> Buffers<'a> for Vec<Seg> {
    fn clear(&mut self) {
        Vec::clear(self);
    }

    fn count(&self) -> usize {
        self.len()
    }

    fn add(&mut self, addr: GuestAddress, slice: &VolatileSlice<'a, ()>) {
        self.push(Seg {
            addr,
            len: slice.len(),
        });
    }
}

impl<'a> Buffers<'a> for IoVecs<'a> {
    fn clear(&mut self) {
        IoVecs::clear(self);
    }

    fn count(&self) -> usize {
        IoVecs::count(self)
    }

    fn add(&mut self, _addr: GuestAddress, slice: &VolatileSlice<'a, ()>) {
        // `collect` stops at MAX_SEGS, below the iovec limit.
        let _ = self.push_slice(slice);
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BadChain {
    #[error("no descriptor could be read")]
    Empty,
    #[error("the chain does not end (a loop, more descriptors than the queue size, or a bad next index or indirect table)")]
    Unterminated,
    #[error("a device-{0} buffer in a chain of device-{1} ones")]
    Direction(&'static str, &'static str),
    #[error("{len} bytes at {addr:#x} are outside guest memory")]
    Outside { addr: u64, len: u32 },
    #[error("more than {MAX_SEGS} buffers")]
    TooMany,
    #[error("{0} bytes, more than the {1}-byte limit")]
    TooLong(u64, u64),
    #[error("{0} bytes, fewer than the {1} a frame needs")]
    TooShort(u64, u64),
}

/// Collects the buffers of `chain` into `out`, checking that each is
/// device-writable (`writable`) or device-readable, inside guest memory,
/// and that the chain ends, holds at most `MAX_SEGS` buffers and from
/// `min_len` to `max_len` bytes. Returns the total length.
pub fn collect<'a, M>(
    chain: DescriptorChain<M>,
    mem: &'a GuestMemoryMmap,
    writable: bool,
    min_len: u64,
    max_len: u64,
    out: &mut impl Buffers<'a>,
) -> Result<u64, BadChain>
where
    M: Deref<Target = GuestMemoryMmap>,
{
    out.clear();
    let mut total = 0u64;
    let mut count = 0usize;
    let mut last_has_next = false;
    for desc in chain {
        count += 1;
        last_has_next = desc.has_next();
        if desc.is_write_only() != writable {
            return Err(if writable {
                BadChain::Direction("readable", "writable")
            } else {
                BadChain::Direction("writable", "readable")
            });
        }
        let len = desc.len();
        total += u64::from(len);
        if total > max_len {
            return Err(BadChain::TooLong(total, max_len));
        }
        // One buffer per memory region it touches.
        let mut offset = 0u64;
        for slice in mem.get_slices(desc.addr(), len as usize) {
            let outside = BadChain::Outside {
                addr: desc.addr().0,
                len,
            };
            let slice = slice.map_err(|_| outside)?;
            if out.count() == MAX_SEGS {
                return Err(BadChain::TooMany);
            }
            let addr = desc.addr().checked_add(offset).ok_or(BadChain::Outside {
                addr: desc.addr().0,
                len,
            })?;
            out.add(addr, &slice);
            offset += slice.len() as u64;
        }
    }
    if count == 0 {
        return Err(BadChain::Empty);
    }
    if last_has_next {
        return Err(BadChain::Unterminated);
    }
    if total < min_len {
        return Err(BadChain::TooShort(total, min_len));
    }
    Ok(total)
}

/// How many of the ring's own descriptors the chain at `head` takes (an
/// indirect table's entries are not the ring's): the guest cannot use
/// them for other buffers until the chain is used. Counts what it can
/// read, at least 1 and at most the ring size.
pub fn ring_descriptors(q: &Queue, mem: &GuestMemoryMmap, head: u16) -> u16 {
    let table = GuestAddress(q.desc_table());
    let mut index = head;
    let mut count = 0;
    while count < q.size() {
        count += 1;
        let desc = table
            .checked_add(16 * u64::from(index))
            .and_then(|at| mem.read_obj::<RawDescriptor>(at).ok())
            .map(Descriptor::from);
        match desc {
            Some(d) if d.has_next() && !d.refers_to_indirect_table() => index = d.next(),
            _ => break,
        }
    }
    count
}
