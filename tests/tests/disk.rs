//! Disks served by a separate process: the test guest's virtio-blk driver
//! on our vmm with qemu-storage-daemon (a vhost-user-blk backend no one here
//! wrote) as the backend. Checks what the guest saw (capacity, pre-written
//! bytes), what reached the image file (the guest's writes, byte for byte),
//! read-only rejection, that the guest's kicks never exited to the VMM,
//! that the threads that watch a backend sleep until it dies, that its
//! death stops its device but not the VMM and a restarted one takes over
//! the running guest's disk, that `vhost-blk` and
//! qemu-storage-daemon lock each other out of an image, and that a
//! backend that is missing, never answers or answers nonsense is a clear
//! error at start.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::backend::{
    qemu_storage_daemon_command, require_qemu_storage_daemon, vhost_blk_bin, Backend,
};
use vmm_tests::blk::{
    assert_kicks_bypassed_the_vmm, expect_disk, finish, guest_pattern, make_image,
    read_pattern_area, restarted_backend_takes_over, two_disks_one_mq_one_read_only,
};
use vmm_tests::vm::VmBuilder;
use vmm_tests::{assert_threads_sleep, require_kvm, test_guest, thread_switches};

#[test]
fn guest_reads_and_writes_through_qemu_storage_daemon() {
    require_kvm();
    require_qemu_storage_daemon();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("qsd.img");
    make_image(&image, 0);
    let socket = dir.path().join("qsd.sock");
    let _backend = Backend::qemu_storage_daemon(&socket, &image, 1, true);

    let vm = VmBuilder::new(test_guest())
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .spawn();
    let info = expect_disk(&vm, "00:01.0", 0, false);
    assert!(info.contains("queues 1 "), "{info}");
    let log = finish(vm);
    assert_kicks_bypassed_the_vmm(&log, "disk0");
    assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
}

/// qemu-storage-daemon killed while the guest runs is taken back when it
/// restarts (see `restarted_backend_takes_over`).
#[test]
fn a_restarted_qemu_storage_daemon_takes_over_the_running_guest() {
    require_kvm();
    require_qemu_storage_daemon();
    let log = restarted_backend_takes_over(&|socket, image| {
        Backend::qemu_storage_daemon(socket, image, 1, true)
    });
    // Its export (7.2) offers no INFLIGHT_SHMFD: nothing to hand over.
    assert!(!log.contains("requests in flight"), "{log}");
}

#[test]
fn two_disks_one_with_two_queues_one_read_only() {
    require_qemu_storage_daemon();
    two_disks_one_mq_one_read_only(|socket, image, queues, writable| {
        Backend::qemu_storage_daemon(socket, image, queues, writable)
    });
}

/// Both take QEMU's image locks: neither starts on an image the other
/// has open for writing, each says why, and the image is untouched.
#[test]
fn vhost_blk_and_qemu_storage_daemon_lock_each_other_out() {
    require_qemu_storage_daemon();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("shared.img");
    make_image(&image, 7);
    let before = std::fs::read(&image).expect("read the image");
    let qsd_socket = dir.path().join("qsd.sock");
    let ours_socket = dir.path().join("ours.sock");

    {
        let _ours = Backend::vhost_blk(&ours_socket, &image, &["--readonly"]);
        let mut qsd = qemu_storage_daemon_command(&qsd_socket, &image, 1, true);
        let (status, stderr) = refused_within(&mut qsd, "qemu-storage-daemon");
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains("\"write\" lock"), "{stderr}");
        assert!(!qsd_socket.exists());
    }

    let _qsd = Backend::qemu_storage_daemon(&qsd_socket, &image, 1, true);
    let refused_socket = dir.path().join("refused.sock");
    for readonly in [false, true] {
        let mut cmd = Command::new(vhost_blk_bin());
        cmd.env_remove("RUST_LOG")
            .arg("--socket")
            .arg(&refused_socket)
            .arg("--image")
            .arg(&image);
        if readonly {
            cmd.arg("--readonly");
        }
        let (status, stderr) = refused_within(&mut cmd, "vhost-blk");
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("shared.img") && stderr.contains("open for writing"),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!refused_socket.exists());
    }
    drop(_qsd);
    assert_eq!(std::fs::read(&image).expect("read the image"), before);
}

/// Runs `cmd`, which should refuse to start: its exit status and stderr.
/// One still running after 20 s took what it should have been refused:
/// it is killed and the test fails.
fn refused_within(cmd: &mut Command, what: &str) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} started on an image locked against it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr)
        .expect("read its stderr");
    (status, stderr)
}

#[test]
fn a_backend_that_dies_stops_its_device_not_the_vmm() {
    require_kvm();
    require_qemu_storage_daemon();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk0.img");
    make_image(&image, 0);
    let socket = dir.path().join("disk0.sock");
    let backend = Backend::qemu_storage_daemon(&socket, &image, 1, true);

    // In echo mode the guest keeps running after its disk checks.
    let mut vm = VmBuilder::new(test_guest())
        .cmdline("echo")
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .spawn();
    expect_disk(&vm, "00:01.0", 0, false);
    vm.expect_line("testguest: echo ready", Duration::from_secs(60));
    // While the backend lives, the threads that watch its connection, wait
    // to take a new one, and serve its request channel all sleep.
    let pid = vm.child.id();
    assert_threads_sleep(
        pid,
        &["disk0-watch", "disk0-reconnect", "disk0-requests"],
        Duration::from_secs(1),
    );
    backend.signal(libc::SIGKILL);
    vm.stderr
        .wait_for(
            "disk0: the vhost-user backend disconnected",
            Duration::from_secs(10),
        )
        .expect("the VMM did not report the backend's death");
    // The dead connection's request channel is closed down.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !thread_switches(pid, "disk0-requests").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the request channel of the dead connection is still served"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The VMM is still alive and stops cleanly on request.
    assert!(vm.child.try_wait().expect("try_wait").is_none());
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(143), "stderr: {}", vm.stderr.text());
}

#[test]
fn a_missing_backend_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nobody.sock");
    let out = VmBuilder::new(test_guest())
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .command()
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("nobody.sock"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("testguest:"));
}

/// A fake backend on `socket`: it accepts every connection, reads what
/// the VMM sends and answers each read with `answer` (nothing when empty),
/// keeping the connection open.
fn fake_backend(socket: &Path, answer: &'static [u8]) {
    let listener = UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || (!answer.is_empty() && stream.write_all(answer).is_err()) {
                        return;
                    }
                }
            });
        }
    });
}

/// Starts the test guest with a disk on `socket`; expects exit status 1
/// and a last stderr line naming the socket and containing `why`.
fn refused_at_start(socket: &Path, why: &str) {
    let mut vm = VmBuilder::new(test_guest())
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .spawn();
    let status = vm.wait_exit(Duration::from_secs(60));
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let name = socket.file_name().expect("file name").to_string_lossy();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.contains(&*name) && last.contains(why), "{stderr}");
    assert!(!vm.console.text().contains("testguest:"));
}

/// A socket that accepts the VMM's connection and then says nothing: the
/// VMM gives up after its reply timeout with an error naming the socket,
/// rather than waiting for ever.
#[test]
fn a_backend_that_never_answers_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("mute.sock");
    fake_backend(&socket, b"");
    refused_at_start(&socket, "no answer to GET_FEATURES within");
}

/// A backend that stopped accepting connections, its listen queue full:
/// the VMM gives up connecting after its limit instead of waiting for ever.
#[test]
fn a_backend_that_accepts_no_connection_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("full.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    // SAFETY: listen() on the listener's own socket; no pointers.
    let rc = unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 0) };
    assert_eq!(rc, 0, "listen");
    // With a backlog of 0, one connection waiting to be accepted fills it.
    let _waiting = std::os::unix::net::UnixStream::connect(&socket).expect("first connection");
    refused_at_start(&socket, "listen queue stayed full");
}

/// A socket that answers with bytes that are not vhost-user: a clear error
/// at start naming the socket and the step.
#[test]
fn a_backend_that_answers_nonsense_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("babble.sock");
    fake_backend(&socket, &[0xab; 64]);
    refused_at_start(&socket, "GET_FEATURES failed");
}
