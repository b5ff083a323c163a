//! Request handling against virtio-queue's mock split queue and the
//! in-memory disk: each request type, and the malformed requests a guest
//! may send, each with its status byte.

use std::sync::Arc;

use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

use crate::backend::{BlkBackend, Device};
use crate::disk::Alignment;
use crate::disk::MemDisk;
use crate::request::{execute, parse, BlkTarget, ChainBuf, Parsed, MAX_DISCARD_SECTORS, SEG_MAX};

const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const REGION_2: u64 = 0x8_0000;
const DISK_SIZE: usize = 64 * 1024;
const W: u16 = VRING_DESC_F_WRITE as u16;

struct Rig {
    mem: GuestMemoryMmap,
    disk: Arc<MemDisk>,
}

impl Rig {
    /// Guest memory is two regions, contiguous in guest-physical space
    /// (as QEMU's are with several memory backends) but apart in this
    /// process, the second from `REGION_2`.
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), REGION_2 as usize),
            (GuestAddress(REGION_2), REGION_2 as usize),
        ])
        .unwrap();
        let disk = Arc::new(MemDisk::new(DISK_SIZE));
        for (i, b) in disk.bytes.lock().unwrap().iter_mut().enumerate() {
            *b = (i / 512) as u8;
        }
        Rig { mem, disk }
    }

    fn target(&self, readonly: bool) -> BlkTarget {
        BlkTarget {
            disk: self.disk.clone(),
            readonly,
            serial: *b"test-serial\0\0\0\0\0\0\0\0\0",
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs a chain of (addr, len, flags); returns (used length, status byte).
    fn run(&self, readonly: bool, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        self.run_on(&self.target(readonly), descs)
    }

    /// `run` on another disk.
    fn run_on(&self, target: &BlkTarget, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        let vq = MockSplitQueue::new(&self.mem, 256);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, flags)| RawDescriptor::from(Descriptor::new(addr, len, flags, 0)))
            .collect();
        let chain = vq.build_desc_chain(&raw).unwrap();
        let used = execute(target, &self.mem, chain);
        (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn simple(
        &self,
        readonly: bool,
        kind: u32,
        sector: u64,
        data: Option<(u32, u16)>,
    ) -> (u32, u8) {
        self.header(kind, sector);
        let mut descs = vec![(HEADER, 16, 0)];
        if let Some((len, flags)) = data {
            descs.push((DATA, len, flags));
        }
        descs.push((STATUS, 1, W));
        self.run(readonly, &descs)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_fills_guest_memory_from_the_disk() {
    let rig = Rig::new();
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_IN, 3, Some((1024, W))),
        (1025, OK)
    );
    let mut buf = [0u8; 1024];
    rig.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3));
    assert!(buf[512..].iter().all(|&b| b == 4));
}

#[test]
fn write_reaches_the_disk() {
    let rig = Rig::new();
    rig.mem
        .write_slice(&[0xab; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_OUT, 5, Some((512, 0))),
        (1, OK)
    );
    let bytes = rig.disk.bytes.lock().unwrap();
    assert!(bytes[5 * 512..6 * 512].iter().all(|&b| b == 0xab));
    assert_eq!(bytes[6 * 512], 6);
}

#[test]
fn read_only_disks_reject_writes_discards_and_zeroes() {
    let rig = Rig::new();
    assert_eq!(
        rig.simple(true, VIRTIO_BLK_T_OUT, 5, Some((512, 0))).1,
        IOERR
    );
    rig.mem.write_obj(1u64, GuestAddress(DATA)).unwrap();
    rig.mem.write_obj(1u32, GuestAddress(DATA + 8)).unwrap();
    rig.mem.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
    assert_eq!(
        rig.simple(true, VIRTIO_BLK_T_DISCARD, 0, Some((16, 0))).1,
        IOERR
    );
    assert_eq!(
        rig.simple(true, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, 0)))
            .1,
        IOERR
    );
    assert!(rig.disk.bytes.lock().unwrap()[512..1024]
        .iter()
        .all(|&b| b == 1));
    // Reads and flushes still work.
    assert_eq!(rig.simple(true, VIRTIO_BLK_T_IN, 0, Some((512, W))).1, OK);
    assert_eq!(rig.simple(true, VIRTIO_BLK_T_FLUSH, 0, None).1, OK);
}

#[test]
fn flush_and_get_id() {
    let rig = Rig::new();
    assert_eq!(rig.simple(false, VIRTIO_BLK_T_FLUSH, 0, None), (1, OK));
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_GET_ID, 0, Some((20, W))),
        (21, OK)
    );
    let mut id = [0u8; 20];
    rig.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..11], b"test-serial");
}

#[test]
fn discard_and_write_zeroes_clear_the_range() {
    let rig = Rig::new();
    let segment = |sector: u64, count: u32, flags: u32| {
        rig.mem.write_obj(sector, GuestAddress(DATA)).unwrap();
        rig.mem.write_obj(count, GuestAddress(DATA + 8)).unwrap();
        rig.mem.write_obj(flags, GuestAddress(DATA + 12)).unwrap();
    };
    segment(2, 2, 0);
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_DISCARD, 0, Some((16, 0))).1,
        OK
    );
    segment(10, 1, 1);
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, 0)))
            .1,
        OK
    );
    {
        let bytes = rig.disk.bytes.lock().unwrap();
        assert!(bytes[2 * 512..4 * 512].iter().all(|&b| b == 0));
        assert!(bytes[10 * 512..11 * 512].iter().all(|&b| b == 0));
        assert_eq!(bytes[4 * 512], 4);
    }
    // Unknown flags are unsupported; ranges past the end are errors.
    segment(2, 1, 2);
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_WRITE_ZEROES, 0, Some((16, 0)))
            .1,
        UNSUPP
    );
    segment(127, 2, 0);
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_DISCARD, 0, Some((16, 0))).1,
        IOERR
    );
    // An unknown flag is unsupported even on a range past the end.
    segment(u64::MAX / 512, 1, 1);
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_DISCARD, 0, Some((16, 0))).1,
        UNSUPP
    );
}

/// One request may not zero more than the config space's
/// max_write_zeroes_sectors, however large the disk: it would hold its
/// queue, and the blocks, for the whole of it.
#[test]
fn write_zeroes_past_the_advertised_limit_is_refused() {
    let rig = Rig::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let target = BlkTarget {
        disk: Arc::new(crate::disk::RawFile::open(&path, false, false).unwrap()),
        readonly: false,
        serial: [0; 20],
    };
    for (count, status) in [(MAX_DISCARD_SECTORS + 1, IOERR), (MAX_DISCARD_SECTORS, OK)] {
        rig.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        rig.mem.write_obj(0u64, GuestAddress(DATA)).unwrap();
        rig.mem.write_obj(count, GuestAddress(DATA + 8)).unwrap();
        rig.mem.write_obj(1u32, GuestAddress(DATA + 12)).unwrap();
        let descs = [(HEADER, 16, 0), (DATA, 16, 0), (STATUS, 1, W)];
        assert_eq!(rig.run_on(&target, &descs).1, status, "{count} sectors");
    }
}

#[test]
fn malformed_requests_get_a_status_not_a_panic() {
    let rig = Rig::new();
    let sectors = (DISK_SIZE / 512) as u64;
    // Past the end, or overflowing the sector arithmetic.
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_IN, sectors, Some((512, W)))
            .1,
        IOERR
    );
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_IN, u64::MAX / 2, Some((512, W)))
            .1,
        IOERR
    );
    // Not a whole number of sectors.
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_IN, 0, Some((100, W))).1,
        IOERR
    );
    // A read into a read-only buffer, a write from a writable one.
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_IN, 0, Some((512, 0))).1,
        IOERR
    );
    assert_eq!(
        rig.simple(false, VIRTIO_BLK_T_OUT, 0, Some((512, W))).1,
        IOERR
    );
    // Unknown request type.
    assert_eq!(rig.simple(false, 0x7777, 0, Some((512, W))).1, UNSUPP);
    // A header too short, or writable.
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.run(false, &[(HEADER, 8, 0), (DATA, 512, W), (STATUS, 1, W)])
            .1,
        IOERR
    );
    assert_eq!(
        rig.run(false, &[(HEADER, 16, W), (DATA, 512, W), (STATUS, 1, W)])
            .1,
        IOERR
    );
    // A data buffer outside guest memory.
    assert_eq!(
        rig.run(
            false,
            &[(HEADER, 16, 0), (0x4000_0000, 512, W), (STATUS, 1, W)]
        )
        .1,
        IOERR
    );
    // Only a status descriptor.
    assert_eq!(rig.run(false, &[(STATUS, 1, W)]).1, IOERR);
    // No writable status byte: nothing to report, an empty completion.
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(rig.run(false, &[(HEADER, 16, 0), (DATA, 512, 0)]).0, 0);
    // The status byte itself outside guest memory.
    assert_eq!(rig.run(false, &[(HEADER, 16, 0), (0x4000_0000, 1, W)]).0, 0);
}

/// VIRTIO 1.x drivers may share a descriptor between the header and the
/// data, or the data and the status byte: the bytes move all the same.
#[test]
fn data_sharing_a_descriptor_with_the_header_or_the_status_moves() {
    let rig = Rig::new();
    rig.header(VIRTIO_BLK_T_OUT, 2);
    rig.mem
        .write_slice(&[0xcd; 512], GuestAddress(HEADER + 16))
        .unwrap();
    assert_eq!(
        rig.run(false, &[(HEADER, 16 + 512, 0), (STATUS, 1, W)]),
        (1, OK)
    );
    assert!(rig.disk.bytes.lock().unwrap()[2 * 512..3 * 512]
        .iter()
        .all(|&b| b == 0xcd));

    rig.header(VIRTIO_BLK_T_IN, 3);
    rig.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(
        rig.run(false, &[(HEADER, 16, 0), (STATUS - 512, 513, W)]),
        (513, OK)
    );
    let mut buf = [0u8; 512];
    rig.mem
        .read_slice(&mut buf, GuestAddress(STATUS - 512))
        .unwrap();
    assert!(buf.iter().all(|&b| b == 3));

    // All three in one chain of two: header + data, then data + status.
    rig.header(VIRTIO_BLK_T_OUT, 4);
    rig.mem
        .write_slice(&[0xee; 512], GuestAddress(HEADER + 16))
        .unwrap();
    rig.mem
        .write_slice(&[0xef; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        rig.run(
            false,
            &[(HEADER, 16 + 512, 0), (DATA, 512, 0), (STATUS, 1, W)]
        ),
        (1, OK)
    );
    let bytes = rig.disk.bytes.lock().unwrap();
    assert!(bytes[4 * 512..5 * 512].iter().all(|&b| b == 0xee));
    assert!(bytes[5 * 512..6 * 512].iter().all(|&b| b == 0xef));
}

/// VIRTIO 1.x drivers may also spread the header over several
/// descriptors, the last of them shared with the data: it is read whole.
#[test]
fn a_header_spread_over_descriptors_is_read_whole() {
    let rig = Rig::new();
    rig.header(VIRTIO_BLK_T_IN, 5);
    assert_eq!(
        rig.run(
            false,
            &[
                (HEADER, 8, 0),
                (HEADER + 8, 8, 0),
                (DATA, 512, W),
                (STATUS, 1, W)
            ]
        ),
        (513, OK)
    );
    let mut buf = [0u8; 512];
    rig.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(buf.iter().all(|&b| b == 5));

    // 4 + 4 + 8 bytes, the last piece followed by the data.
    rig.header(VIRTIO_BLK_T_OUT, 6);
    rig.mem
        .write_slice(&[0xab; 512], GuestAddress(HEADER + 16))
        .unwrap();
    assert_eq!(
        rig.run(
            false,
            &[
                (HEADER, 4, 0),
                (HEADER + 4, 4, 0),
                (HEADER + 8, 8 + 512, 0),
                (STATUS, 1, W)
            ]
        ),
        (1, OK)
    );
    assert!(rig.disk.bytes.lock().unwrap()[6 * 512..7 * 512]
        .iter()
        .all(|&b| b == 0xab));
}

/// A buffer may cross from one memory region into the next: every request
/// type moves it whole, whatever the descriptors.
#[test]
fn a_buffer_crossing_into_the_next_memory_region_moves_whole() {
    let rig = Rig::new();
    let across = REGION_2 - 512;
    rig.header(VIRTIO_BLK_T_IN, 3);
    assert_eq!(
        rig.run(false, &[(HEADER, 16, 0), (across, 1024, W), (STATUS, 1, W)]),
        (1025, OK)
    );
    let mut buf = [0u8; 1024];
    rig.mem.read_slice(&mut buf, GuestAddress(across)).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 3));
    assert!(buf[512..].iter().all(|&b| b == 4));

    rig.header(VIRTIO_BLK_T_OUT, 20);
    rig.mem
        .write_slice(&[0x5a; 1024], GuestAddress(across))
        .unwrap();
    assert_eq!(
        rig.run(false, &[(HEADER, 16, 0), (across, 1024, 0), (STATUS, 1, W)]),
        (1, OK)
    );
    assert!(rig.disk.bytes.lock().unwrap()[20 * 512..22 * 512]
        .iter()
        .all(|&b| b == 0x5a));

    // The serial over three descriptors, the last across the boundary.
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    let id_at = REGION_2 - 4;
    assert_eq!(
        rig.run(
            false,
            &[
                (HEADER, 16, 0),
                (DATA, 3, W),
                (DATA + 3, 5, W),
                (id_at, 64, W),
                (STATUS, 1, W)
            ]
        ),
        (21, OK)
    );
    let mut id = [0u8; 20];
    rig.mem
        .read_slice(&mut id[..8], GuestAddress(DATA))
        .unwrap();
    rig.mem
        .read_slice(&mut id[8..], GuestAddress(id_at))
        .unwrap();
    assert_eq!(&id, b"test-serial\0\0\0\0\0\0\0\0\0");

    // A discard segment in two pieces, the second across the boundary.
    let segment_at = REGION_2 - 6;
    rig.mem.write_obj(30u64, GuestAddress(DATA)).unwrap();
    rig.mem.write_obj(2u32, GuestAddress(segment_at)).unwrap();
    rig.mem
        .write_obj(0u32, GuestAddress(segment_at + 4))
        .unwrap();
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.run(
            false,
            &[
                (HEADER, 16, 0),
                (DATA, 8, 0),
                (segment_at, 8, 0),
                (STATUS, 1, W)
            ]
        ),
        (1, OK)
    );
    {
        let bytes = rig.disk.bytes.lock().unwrap();
        assert!(bytes[30 * 512..32 * 512].iter().all(|&b| b == 0));
        assert_eq!(bytes[29 * 512], 29);
        assert_eq!(bytes[32 * 512], 32);
    }
    // Two segments are more than the device takes; half of one is malformed.
    assert_eq!(
        rig.run(false, &[(HEADER, 16, 0), (DATA, 32, 0), (STATUS, 1, W)]),
        (1, UNSUPP)
    );
    assert_eq!(
        rig.run(false, &[(HEADER, 16, 0), (DATA, 8, 0), (STATUS, 1, W)]),
        (1, IOERR)
    );
}

/// On the asynchronous path a buffer across the boundary becomes one
/// iovec per region, each at that region's host address.
#[test]
fn an_asynchronous_transfer_across_memory_regions_gets_one_iovec_per_region() {
    let rig = Rig::new();
    let disk = Arc::new(MemDisk {
        async_alignment: Some(Alignment {
            memory: 512,
            offset: 512,
        }),
        ..MemDisk::new(DISK_SIZE)
    });
    let target = BlkTarget {
        disk,
        readonly: false,
        serial: [0; 20],
    };
    let across = REGION_2 - 1024;
    rig.header(VIRTIO_BLK_T_IN, 1);
    let vq = MockSplitQueue::new(&rig.mem, 16);
    let raw = [(HEADER, 16, 0), (across, 4096, W), (STATUS, 1, W)]
        .map(|(addr, len, flags)| RawDescriptor::from(Descriptor::new(addr, len, flags, 0)));
    let chain = vq.build_desc_chain(&raw).unwrap();
    let mut buf = ChainBuf::new();
    let Parsed::Io(io) = parse(&target, &rig.mem, chain, true, &mut buf) else {
        panic!("a well-formed read was not handed over as a transfer");
    };
    let host = |addr: u64| rig.mem.get_host_address(GuestAddress(addr)).unwrap();
    let pieces: Vec<_> = io
        .iovecs
        .iter()
        .map(|v| (v.iov_base as *mut u8, v.iov_len))
        .collect();
    assert_eq!(pieces, [(host(across), 1024), (host(REGION_2), 3072)]);
    assert_eq!((io.offset, io.len), (512, 4096));
}

/// A chain longer than the device's limit is refused, and the refusal
/// goes to its real status byte, past the limit.
#[test]
fn a_chain_past_the_segment_limit_gets_ioerr_in_its_own_status() {
    let rig = Rig::new();
    rig.header(VIRTIO_BLK_T_OUT, 0);
    let mut descs = vec![(HEADER, 16, 0)];
    // One buffer, given again and again, past the longest chain taken.
    descs.extend((0..SEG_MAX + 20).map(|_| (DATA, 512, 0)));
    descs.push((STATUS, 1, W));
    rig.mem
        .write_slice(&[0xcd; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(rig.run(false, &descs), (1, IOERR));
    assert!(rig.disk.bytes.lock().unwrap()[..512]
        .iter()
        .all(|&b| b == 0));
}

/// SEG_MAX counts data segments: a header spread over one descriptor per
/// byte still leaves room for SEG_MAX of them, and one more is refused.
#[test]
fn a_header_split_byte_by_byte_leaves_seg_max_data_segments() {
    for (segments, status) in [(SEG_MAX, OK), (SEG_MAX + 1, IOERR)] {
        let rig = Rig::new();
        rig.header(VIRTIO_BLK_T_OUT, 0);
        let mut descs: Vec<_> = (0..16).map(|i| (HEADER + i, 1, 0)).collect();
        // Segment i is 512 bytes of value i, for sector i.
        for i in 0..u64::from(segments) {
            let at = DATA + 512 * i;
            rig.mem
                .write_slice(&[i as u8 ^ 0x5a; 512], GuestAddress(at))
                .unwrap();
            descs.push((at, 512, 0));
        }
        descs.push((STATUS, 1, W));
        assert_eq!(rig.run(false, &descs), (1, status), "{segments} segments");
        let disk = rig.disk.bytes.lock().unwrap();
        for i in 0..segments as usize {
            let sector = &disk[512 * i..512 * (i + 1)];
            let want = if status == OK {
                i as u8 ^ 0x5a
            } else {
                i as u8
            };
            assert!(
                sector.iter().all(|&b| b == want),
                "{segments} segments: sector {i}"
            );
        }
    }
}

#[test]
fn a_descriptor_loop_ends() {
    let rig = Rig::new();
    rig.header(VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&rig.mem, 4);
    // 0 -> 1 -> 0 -> ...: the chain iterator stops after the queue size.
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(Descriptor::new(HEADER, 16, next, 1)),
        RawDescriptor::from(Descriptor::new(DATA, 512, next | W, 0)),
    ];
    vq.add_desc_chains(&descs, 0).unwrap();
    let mut queue: Queue = vq.create_queue().unwrap();
    let chain = queue.pop_descriptor_chain(&rig.mem).unwrap();
    // The chain is cut at the queue size; its last (writable) descriptor is
    // taken as the status and gets IOERR: a completion, no hang.
    let used = execute(&rig.target(false), &rig.mem, chain);
    assert_eq!(used, 1);
    assert_eq!(
        rig.mem.read_obj::<u8>(GuestAddress(DATA + 511)).unwrap(),
        IOERR
    );
}

/// A head index outside the queue (a guest bug or attack) is skipped, and
/// the good request after it still completes: the worker does not end.
#[test]
fn a_made_up_head_index_does_not_stop_the_queue() {
    let rig = Rig::new();
    let vq = MockSplitQueue::new(&rig.mem, 16);
    rig.header(VIRTIO_BLK_T_IN, 1);
    let next = VRING_DESC_F_NEXT as u16;
    for (i, (addr, len, flags)) in [(HEADER, 16, next), (DATA, 512, W | next), (STATUS, 1, W)]
        .into_iter()
        .enumerate()
    {
        let desc = Descriptor::new(addr, len, flags, i as u16 + 1);
        vq.desc_table()
            .store(i as u16, RawDescriptor::from(desc))
            .unwrap();
    }
    // avail ring: a head of 99 in a 16-entry queue, then the real chain.
    vq.avail().ring().ref_at(0).unwrap().store(u16::to_le(99));
    vq.avail().ring().ref_at(1).unwrap().store(u16::to_le(0));
    vq.avail().idx().store(u16::to_le(2));

    let (backend, vring) = serving(&rig, &vq);
    backend
        .process_queue(0, &vring)
        .expect("the queue keeps working");
    assert_eq!(u16::from_le(vq.used().idx().load()), 1, "one completion");
    let elem = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!(elem.id(), 0, "the good chain completed");
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
    let mut sector = [0u8; 512];
    rig.mem.read_slice(&mut sector, GuestAddress(DATA)).unwrap();
    assert!(sector.iter().all(|&b| b == 1), "sector 1 was read");
}

/// Queue 0 of a connection's backend, laid out by `vq` in the rig's
/// memory: ready and enabled, with EVENT_IDX, in a process on two cores.
fn serving(rig: &Rig, vq: &MockSplitQueue<GuestMemoryMmap>) -> (BlkBackend, VringRwLock) {
    serving_disk(rig, vq, rig.target(false), 2)
}

/// `serving`, with `target` as the disk, on `cores` cores.
fn serving_disk(
    rig: &Rig,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    target: BlkTarget,
    cores: usize,
) -> (BlkBackend, VringRwLock) {
    serving_with_used_ring(rig, vq, target, cores, vq.used_addr())
}

/// `serving_disk`, with the used ring at `used` rather than where the mock
/// puts it, which overlaps the avail ring's `used_event`.
fn serving_with_used_ring(
    rig: &Rig,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    target: BlkTarget,
    cores: usize,
    used: GuestAddress,
) -> (BlkBackend, VringRwLock) {
    let device = Device {
        target,
        num_queues: 1,
        queue_size: 256,
        poll: std::time::Duration::ZERO,
        cores,
    };
    let backend = BlkBackend::new(Arc::new(device));
    let atomic = GuestMemoryAtomic::new(rig.mem.clone());
    backend.update_memory(atomic.clone()).unwrap();
    backend.set_event_idx(true);
    let vring = VringRwLock::new(atomic, 256).unwrap();
    vring.set_queue_size(16);
    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, used.0)
        .unwrap();
    vring.set_queue_event_idx(true);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    (backend, vring)
}

/// Makes a read of sector 0 available on `vq`.
fn make_read_available(rig: &Rig, vq: &MockSplitQueue<GuestMemoryMmap>, at: u16) {
    rig.header(VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        (HEADER, 16, next, at + 1),
        (DATA, 512, W | next, at + 2),
        (STATUS, 1, W, 0),
    ];
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(addr, len, flags, next)| {
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    vq.add_desc_chains(&raw, at).unwrap();
}

/// Runs `process_queue` on another thread: its result, or None if it has
/// not returned within 5 s.
fn process_within(backend: &BlkBackend, vring: &VringRwLock) -> Option<std::io::Result<()>> {
    let (done, result) = std::sync::mpsc::channel();
    let (backend, vring) = (backend.clone(), vring.clone());
    std::thread::spawn(move || {
        let _ = done.send(backend.process_queue(0, &vring));
    });
    result.recv_timeout(std::time::Duration::from_secs(5)).ok()
}

/// An available index more than a ring ahead of the backend is one no
/// driver can mean: the worker gives the ring up rather than spin on it (a
/// spinning worker also never reaches its exit event, so the next frontend
/// would never be served), until the frontend sets the ring up again.
#[test]
fn a_ring_with_an_impossible_available_index_is_given_up_not_spun_on() {
    let rig = Rig::new();
    let vq = MockSplitQueue::new(&rig.mem, 16);
    make_read_available(&rig, &vq, 0);
    vq.avail().idx().store(17);
    let (backend, vring) = serving(&rig, &vq);

    let first = process_within(&backend, &vring).expect("the worker returns");
    assert!(first.is_ok());
    assert!(process_within(&backend, &vring).is_some());
    assert_eq!(vq.used().idx().load(), 0, "nothing was taken");

    // The frontend stops the ring and starts it again where it was.
    backend.stop_vring(0).unwrap();
    vq.avail().idx().store(1);
    assert!(process_within(&backend, &vring).expect("returns").is_ok());
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
}

/// An avail ring placed in the last 4 bytes of guest memory (a frontend
/// may: the library checks only where a ring starts) has an index that
/// reads and entries that do not. The worker gives it up rather than take
/// it for empty, find the index still ahead, and look again for ever.
#[test]
fn a_ring_whose_entries_lie_outside_memory_is_given_up_not_spun_on() {
    let rig = Rig::new();
    let vq = MockSplitQueue::new(&rig.mem, 16);
    let (backend, vring) = serving(&rig, &vq);
    let end = rig.mem.last_addr().0 + 1;
    vring
        .set_queue_info(vq.desc_table_addr().0, end - 4, vq.used_addr().0)
        .unwrap();
    rig.mem.write_obj(1u16, GuestAddress(end - 2)).unwrap();

    let first = process_within(&backend, &vring).expect("the worker returns");
    assert!(first.is_ok(), "{first:?}");
    assert!(process_within(&backend, &vring).is_some());
    assert_eq!(vq.used().idx().load(), 0, "nothing was taken");
}

/// A call eventfd the worker cannot write (a frontend passed a read-only
/// file) fails the signal. The worker does not end (its event loop would
/// stop, with its transfers in flight holding blocks other queues may
/// wait for): the request is completed, the ring is not served again
/// until the frontend sets it up again, and then it is.
///
/// On two cores the failing signal is the one at the request (see
/// `serving`), on one the one at the end of the pass.
#[test]
fn a_ring_whose_call_fails_is_given_up_and_its_worker_lives_on() {
    for cores in [1, 2] {
        a_ring_whose_call_fails_on(cores);
    }
}

fn a_ring_whose_call_fails_on(cores: usize) {
    let rig = Rig::new();
    let vq = MockSplitQueue::new(&rig.mem, 16);
    make_read_available(&rig, &vq, 0);
    let (backend, vring) = serving_disk(&rig, &vq, rig.target(false), cores);
    vring.set_call(Some(std::fs::File::open("/dev/null").unwrap()));
    let served = |vring: &VringRwLock| {
        backend.handle_event(
            0,
            vmm_sys_util::epoll::EventSet::IN,
            std::slice::from_ref(vring),
            0,
        )
    };

    assert!(served(&vring).is_ok(), "the worker ended");
    assert_eq!(vq.used().idx().load(), 1, "the read was completed");
    make_read_available(&rig, &vq, 3);
    assert!(served(&vring).is_ok());
    assert_eq!(vq.used().idx().load(), 1, "a given-up ring was served");

    // The frontend stops the ring and sets it up again with a call that works.
    backend.stop_vring(0).unwrap();
    vring.set_call(None);
    assert!(served(&vring).is_ok());
    assert_eq!(vq.used().idx().load(), 2);
}

/// A get-id (no disk needed) and then a read of the disk the test holds,
/// so the worker's pass stops at the read: whether the sleeping driver
/// (EVENT_IDX, used_event 0: it wants a call at the first completion) has
/// been called by then, and after the pass ends.
fn call_before_the_pass_ends(cores: usize) -> (bool, bool) {
    const ID_HEADER: u64 = 0x4_0000;
    const ID_DATA: u64 = 0x4_1000;
    const ID_STATUS: u64 = 0x4_2000;
    const USED: u64 = 0x5_0000;
    let rig = Rig::new();
    let vq = MockSplitQueue::new(&rig.mem, 16);
    rig.mem
        .write_obj(VIRTIO_BLK_T_GET_ID, GuestAddress(ID_HEADER))
        .unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    let get_id = [
        Descriptor::new(ID_HEADER, 16, next, 1),
        Descriptor::new(ID_DATA, 20, W | next, 2),
        Descriptor::new(ID_STATUS, 1, W, 0),
    ]
    .map(RawDescriptor::from);
    vq.add_desc_chains(&get_id, 0).unwrap();
    make_read_available(&rig, &vq, 3);
    let (backend, vring) =
        serving_with_used_ring(&rig, &vq, rig.target(false), cores, GuestAddress(USED));
    let used_idx = || rig.mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap();
    let call = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let file = call.try_clone().unwrap();
    // SAFETY: `into_raw_fd` gives up the clone's descriptor, which the
    // file then owns alone.
    let file =
        unsafe { std::os::fd::FromRawFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(file)) };
    vring.set_call(Some(file));
    let called = |within: std::time::Duration| {
        let deadline = std::time::Instant::now() + within;
        loop {
            if call.read().is_ok() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };

    let held = rig.disk.bytes.lock().unwrap();
    let worker = {
        let (backend, vring) = (backend.clone(), vring.clone());
        std::thread::spawn(move || backend.process_queue(0, &vring))
    };
    // The worker is stuck in the read once the get-id is in the used ring.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while used_idx() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the get-id never completed"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The pass cannot end while the disk is held, so a call now is the
    // early one; the wait is only for a worker descheduled on its way.
    let early = called(std::time::Duration::from_secs(1));
    drop(held);
    assert!(worker.join().unwrap().is_ok());
    assert_eq!(used_idx(), 2, "both requests completed");
    let mut id = [0u8; 11];
    rig.mem.read_slice(&mut id, GuestAddress(ID_DATA)).unwrap();
    assert_eq!(&id, b"test-serial");
    (early, early || called(std::time::Duration::from_secs(5)))
}

/// With a core for the driver's thread, a buffered queue calls a sleeping
/// driver at its first completion, while it goes on with the rest (see
/// `serving`); without one, when its pass ends. Either way the driver is
/// called.
#[test]
fn a_sleeping_driver_is_called_before_the_pass_ends_only_with_a_core_to_spare() {
    assert_eq!(call_before_the_pass_ends(2), (true, true));
    assert_eq!(call_before_the_pass_ends(1), (false, true));
}

/// A disabled ring (SET_VRING_ENABLE 0) is not served: a worker woken for
/// it (a completion of its own transfers) leaves new requests where they
/// are.
#[test]
fn a_disabled_ring_is_left_alone_until_enabled() {
    let rig = Rig::new();
    let vq = MockSplitQueue::new(&rig.mem, 16);
    make_read_available(&rig, &vq, 0);
    let (backend, vring) = serving(&rig, &vq);
    vring.set_enabled(false);

    assert!(process_within(&backend, &vring).expect("returns").is_ok());
    assert_eq!(vq.used().idx().load(), 0, "a disabled ring is left alone");
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);

    vring.set_enabled(true);
    assert!(process_within(&backend, &vring).expect("returns").is_ok());
    assert_eq!(vq.used().idx().load(), 1);
}

/// A ring the frontend starts before it gives the ring's addresses (its
/// kick came first) has nothing to take yet: it is not given up as broken,
/// and is served once the addresses come.
#[test]
fn a_ring_started_before_its_addresses_is_served_once_they_come() {
    let rig = Rig::new();
    let vq = MockSplitQueue::new(&rig.mem, 16);
    make_read_available(&rig, &vq, 0);
    let (backend, vring) = serving(&rig, &vq);
    vring.set_queue_info(0, 0, 0).unwrap();

    assert!(process_within(&backend, &vring).expect("returns").is_ok());
    assert_eq!(vq.used().idx().load(), 0);

    vring
        .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0)
        .unwrap();
    assert!(process_within(&backend, &vring).expect("returns").is_ok());
    assert_eq!(vq.used().idx().load(), 1, "the ring was given up");
    assert_eq!(rig.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
}

/// A disk whose reads take long enough for the frontend to leave meanwhile
/// (here: the read itself says the frontend left).
struct LeftDuringRead {
    disk: MemDisk,
    backend: std::sync::OnceLock<BlkBackend>,
}

impl crate::disk::Disk for LeftDuringRead {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_at(&self, offset: u64, buf: &crate::disk::GuestBuf<'_>) -> std::io::Result<()> {
        if let Some(backend) = self.backend.get() {
            backend.frontend_left();
        }
        self.disk.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &crate::disk::GuestBuf<'_>) -> std::io::Result<()> {
        self.disk.write_at(offset, buf)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.disk.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> std::io::Result<()> {
        self.disk.write_zeroes(offset, len, unmap)
    }
}

/// A synchronous request running when the frontend leaves is not put in
/// the used ring once it finishes: the frontend may already have read the
/// used index to hand the ring on, and the next backend runs it again.
#[test]
fn a_request_running_when_the_frontend_leaves_is_not_completed() {
    let rig = Rig::new();
    let vq = MockSplitQueue::new(&rig.mem, 16);
    make_read_available(&rig, &vq, 0);
    let disk = Arc::new(LeftDuringRead {
        disk: MemDisk::new(DISK_SIZE),
        backend: std::sync::OnceLock::new(),
    });
    let target = BlkTarget {
        disk: disk.clone(),
        readonly: false,
        serial: [0; 20],
    };
    let (backend, vring) = serving_disk(&rig, &vq, target, 2);
    assert!(disk.backend.set(backend.clone()).is_ok());

    assert!(process_within(&backend, &vring).expect("returns").is_ok());
    assert_eq!(
        vq.used().idx().load(),
        0,
        "completed after the frontend left"
    );
}
