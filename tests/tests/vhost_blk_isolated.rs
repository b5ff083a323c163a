//! vhost-blk without a VM: the test frontend connects to the backend's
//! socket, gives it a memfd as guest memory and builds the rings itself.
//! Every request type, the malformed ones, reconnection, and
//! qemu-storage-daemon driven the same way.

use std::path::Path;

use vhost_test_frontend::blk::{
    BlkClient, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_IN, T_OUT, T_WRITE_ZEROES,
};
use vhost_test_frontend::virtqueue::{Buf, RawDesc, DESC_F_NEXT, DESC_F_WRITE};
use vmm_tests::backend::{require_qemu_storage_daemon, Backend};

const IMAGE_SIZE: usize = 4 << 20;

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let bytes: Vec<u8> = (0..IMAGE_SIZE).map(|i| (i / 512) as u8).collect();
    std::fs::write(&path, bytes).expect("write image");
    path
}

fn sector_bytes(path: &Path, sector: usize, count: usize) -> Vec<u8> {
    std::fs::read(path).expect("read image")[sector * 512..(sector + count) * 512].to_vec()
}

#[test]
fn reads_writes_flush_id_discard_and_zeroes_reach_the_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let socket = dir.path().join("blk.sock");
    let _backend = Backend::vhost_blk(&socket, &img, &["--serial", "isolated-0"]);
    let mut client = BlkClient::connect(&socket, 1, 64).expect("connect");

    assert_eq!(
        client.capacity().expect("config"),
        (IMAGE_SIZE / 512) as u64
    );
    let (status, id) = client.get_id().expect("get id");
    assert_eq!(status, S_OK);
    assert_eq!(&id[..10], b"isolated-0");

    let mut buf = vec![0u8; 1024];
    assert_eq!(client.read(0, 7, &mut buf).expect("read"), S_OK);
    assert!(buf[..512].iter().all(|&b| b == 7) && buf[512..].iter().all(|&b| b == 8));

    let data: Vec<u8> = (0..4096).map(|i| (i * 13 % 251) as u8).collect();
    assert_eq!(client.write(0, 100, &data).expect("write"), S_OK);
    assert_eq!(client.flush(0).expect("flush"), S_OK);
    assert_eq!(
        sector_bytes(&img, 100, 8),
        data,
        "write did not reach the image"
    );

    assert_eq!(
        client
            .segment_request(T_DISCARD, 200, 8, 0)
            .expect("discard"),
        S_OK
    );
    assert_eq!(
        client
            .segment_request(T_WRITE_ZEROES, 300, 4, 0)
            .expect("zeroes"),
        S_OK
    );
    assert_eq!(
        client
            .segment_request(T_WRITE_ZEROES, 310, 4, 1)
            .expect("zeroes unmap"),
        S_OK
    );
    let mut back = vec![0xffu8; 4096];
    assert_eq!(client.read(0, 200, &mut back).expect("read"), S_OK);
    assert!(back.iter().all(|&b| b == 0), "discarded range not zero");
    assert!(sector_bytes(&img, 300, 4).iter().all(|&b| b == 0));
    assert!(sector_bytes(&img, 310, 4).iter().all(|&b| b == 0));
    assert!(sector_bytes(&img, 304, 1)
        .iter()
        .all(|&b| b == 304u32 as u8));
}

#[test]
fn malformed_requests_get_a_status_and_the_backend_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let before = std::fs::read(&img).expect("read");
    let socket = dir.path().join("blk.sock");
    let _backend = Backend::vhost_blk(&socket, &img, &[]);
    let mut client = BlkClient::connect(&socket, 1, 64).expect("connect");
    let slot = client.slot();
    let sectors = (IMAGE_SIZE / 512) as u64;
    let mut buf = vec![0u8; 512];

    // Out of range, overflowing, not whole sectors.
    assert_eq!(client.read(0, sectors, &mut buf).expect("req"), S_IOERR);
    assert_eq!(
        client.read(0, u64::MAX / 256, &mut buf).expect("req"),
        S_IOERR
    );
    assert_eq!(client.read(0, 0, &mut [0u8; 100]).expect("req"), S_IOERR);
    // Unknown type.
    client.prepare_header(0x4242, 0);
    let chain = client.chain(512, true);
    assert_eq!(client.submit(0, &chain).expect("req").1, S_UNSUPP);
    // A write from a device-writable buffer, a read into a read-only one.
    client.prepare_header(T_OUT, 0);
    let chain = client.chain(512, true);
    assert_eq!(client.submit(0, &chain).expect("req").1, S_IOERR);
    client.prepare_header(T_IN, 0);
    let chain = client.chain(512, false);
    assert_eq!(client.submit(0, &chain).expect("req").1, S_IOERR);
    // A header too short.
    let short = [
        Buf {
            addr: slot.header,
            len: 8,
            write: false,
        },
        Buf {
            addr: slot.data,
            len: 512,
            write: true,
        },
        Buf {
            addr: slot.status,
            len: 1,
            write: true,
        },
    ];
    client.prepare_header(T_IN, 0);
    assert_eq!(client.submit(0, &short).expect("req").1, S_IOERR);
    // A data buffer outside guest memory.
    let outside = [
        Buf {
            addr: slot.header,
            len: 16,
            write: false,
        },
        Buf {
            addr: 1 << 40,
            len: 512,
            write: true,
        },
        Buf {
            addr: slot.status,
            len: 1,
            write: true,
        },
    ];
    client.prepare_header(T_IN, 0);
    assert_eq!(client.submit(0, &outside).expect("req").1, S_IOERR);
    // A descriptor loop (0 -> 1 -> 0): cut at the queue size, completed.
    client.prepare_header(T_IN, 0);
    let looped = [
        RawDesc {
            addr: slot.header,
            len: 16,
            flags: DESC_F_NEXT,
            next: 1,
        },
        RawDesc {
            addr: slot.data,
            len: 512,
            flags: DESC_F_NEXT | DESC_F_WRITE,
            next: 0,
        },
    ];
    client
        .submit_raw(0, &looped)
        .expect("the loop hung the backend");
    // No status byte at all: an empty completion.
    client.prepare_header(T_IN, 0);
    let no_status = [
        RawDesc {
            addr: slot.header,
            len: 16,
            flags: DESC_F_NEXT,
            next: 1,
        },
        RawDesc {
            addr: slot.data,
            len: 512,
            flags: 0,
            next: 0,
        },
    ];
    let (used, _) = client.submit_raw(0, &no_status).expect("no completion");
    assert_eq!(used, 0);

    // Still serving, and nothing was written.
    assert_eq!(client.read(0, 1, &mut buf).expect("read"), S_OK);
    assert!(buf.iter().all(|&b| b == 1));
    drop(client);
    assert_eq!(std::fs::read(&img).expect("read"), before);
}

#[test]
fn read_only_rejects_writes_and_two_queues_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let before = std::fs::read(&img).expect("read");
    let socket = dir.path().join("ro.sock");
    let _backend = Backend::vhost_blk(&socket, &img, &["--readonly", "--num-queues", "2"]);
    let mut client = BlkClient::connect(&socket, 2, 64).expect("connect");
    assert_ne!(client.features() & (1 << 5), 0, "RO not offered");
    assert_ne!(client.features() & (1 << 12), 0, "MQ not offered");
    assert_eq!(client.write(1, 0, &[0u8; 512]).expect("write"), S_IOERR);
    assert_eq!(
        client.segment_request(T_DISCARD, 0, 1, 0).expect("discard"),
        S_IOERR
    );
    let mut buf = vec![0u8; 512];
    assert_eq!(client.read(1, 3, &mut buf).expect("read"), S_OK);
    assert!(buf.iter().all(|&b| b == 3));
    drop(client);
    assert_eq!(std::fs::read(&img).expect("read"), before);
}

#[test]
fn disconnect_and_reconnect_keep_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let socket = dir.path().join("blk.sock");
    let _backend = Backend::vhost_blk(&socket, &img, &[]);
    {
        let mut client = BlkClient::connect(&socket, 1, 32).expect("connect");
        assert_eq!(client.write(0, 40, &[0x5a; 512]).expect("write"), S_OK);
    }
    // The backend serves the next frontend, which sees the data.
    let mut client = None;
    for _ in 0..50 {
        match BlkClient::connect(&socket, 1, 32) {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    let mut client = client.expect("no second connection");
    let mut buf = vec![0u8; 512];
    assert_eq!(client.read(0, 40, &mut buf).expect("read"), S_OK);
    assert!(buf.iter().all(|&b| b == 0x5a));
}

#[test]
fn qemu_storage_daemon_driven_by_the_test_frontend() {
    require_qemu_storage_daemon();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let socket = dir.path().join("qsd.sock");
    let _backend = Backend::qemu_storage_daemon(&socket, &img, 2, true);
    let mut client = BlkClient::connect(&socket, 2, 64).expect("connect");
    assert_eq!(
        client.capacity().expect("config"),
        (IMAGE_SIZE / 512) as u64
    );
    let data = vec![0xc3u8; 8192];
    assert_eq!(client.write(1, 64, &data).expect("write"), S_OK);
    assert_eq!(client.flush(1).expect("flush"), S_OK);
    let mut back = vec![0u8; 8192];
    assert_eq!(client.read(0, 64, &mut back).expect("read"), S_OK);
    assert_eq!(back, data);
    assert_eq!(sector_bytes(&img, 64, 16), data);
}

fn short_load(socket: &Path, queues: usize, write: bool) -> vhost_test_frontend::load::Report {
    let spec = vhost_test_frontend::load::LoadSpec {
        queues,
        depth: 16,
        size: 4096,
        random: true,
        write,
        duration: std::time::Duration::from_millis(700),
        seed: 7,
    };
    vhost_test_frontend::load::run(socket, spec, |_, _| {}).expect("load run")
}

#[test]
fn the_load_generator_drives_vhost_blk_and_qemu_storage_daemon() {
    require_qemu_storage_daemon();
    let dir = tempfile::tempdir().expect("tempdir");
    let img = image(dir.path());
    let ours = dir.path().join("ours.sock");
    {
        let _backend = Backend::vhost_blk(&ours, &img, &["--num-queues", "2"]);
        for (queues, write) in [(1, false), (2, false), (1, true)] {
            let report = short_load(&ours, queues, write);
            assert!(report.ops > 100, "vhost-blk: only {} requests", report.ops);
            assert!(report.percentile_us(50.0) > 0.0);
        }
    }
    let qsd = dir.path().join("qsd.sock");
    let _backend = Backend::qemu_storage_daemon(&qsd, &img, 2, true);
    let report = short_load(&qsd, 2, false);
    assert!(
        report.ops > 100,
        "qemu-storage-daemon: only {} requests",
        report.ops
    );
}

#[test]
fn direct_io_goes_through_io_uring_and_reaches_the_image() {
    // O_DIRECT needs a real file system (not tmpfs): use the target dir.
    let target = vmm_tests::repo_root().join("target");
    let dir = tempfile::tempdir_in(&target).expect("tempdir in target/");
    let img = image(dir.path());
    let socket = dir.path().join("direct.sock");
    let _backend = Backend::vhost_blk(&socket, &img, &["--direct", "--num-queues", "2"]);
    let mut client = BlkClient::connect(&socket, 2, 64).expect("connect");
    // Aligned (io_uring) and unaligned (bounce buffer) transfers.
    let data: Vec<u8> = (0..8192).map(|i| (i * 31 % 253) as u8).collect();
    assert_eq!(client.write(1, 16, &data).expect("write"), S_OK);
    assert_eq!(client.write(0, 3, &data[..512]).expect("write"), S_OK);
    assert_eq!(client.flush(0).expect("flush"), S_OK);
    let mut back = vec![0u8; 8192];
    assert_eq!(client.read(0, 16, &mut back).expect("read"), S_OK);
    assert_eq!(back, data);
    let mut one = vec![0u8; 512];
    assert_eq!(client.read(1, 3, &mut one).expect("read"), S_OK);
    assert_eq!(one, data[..512]);
    drop(client);
    assert_eq!(sector_bytes(&img, 16, 16), data);
    assert_eq!(sector_bytes(&img, 3, 1), data[..512]);
    // Load through io_uring on both queues.
    let report = short_load(&socket, 2, true);
    assert!(report.ops > 100, "only {} requests", report.ops);
}
