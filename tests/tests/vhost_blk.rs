//! Our vhost-blk backend under the test guest on our vmm: the guest sees the
//! image (capacity, serial, pre-written bytes), its writes land in the image
//! file byte for byte, read-only disks reject writes, the backend serves the
//! next VM after a disconnect, refuses a second writer of the same image,
//! exits cleanly on SIGTERM, a restarted backend takes over a running
//! guest's disk, and a backend that stops answering is cut off and taken
//! back when it answers again; a disk grown while the guest runs shows the
//! guest its new size; guest memory on huge pages reaches the backend as
//! huge pages.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::Duration;

use vmm_tests::backend::{vhost_blk_bin, Backend};
use vmm_tests::blk::{
    assert_kicks_bypassed_the_vmm, clear_pattern_area, expect_disk, finish,
    grow_while_the_guest_watches, guest_pattern, make_image, read_pattern_area,
    restarted_backend_takes_over, two_disks_one_mq_one_read_only, IMAGE_SIZE,
};
use vmm_tests::qmp::RawQmp;
use vmm_tests::vm::{RunningVm, VmBuilder};
use vmm_tests::{memfd_mappings, require_free_hugepages, require_kvm, test_guest};

#[test]
fn guest_reads_and_writes_through_vhost_blk_and_the_next_vm_too() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk0.img");
    make_image(&image, 0);
    let socket = dir.path().join("disk0.sock");
    let _backend = Backend::vhost_blk(&socket, &image, &["--serial", "serial-disk0"]);

    // Two VMs in a row on the same backend: it serves the next frontend,
    // and the second's writes land too (the first's are cleared first).
    for _ in 0..2 {
        clear_pattern_area(&image);
        let vm = VmBuilder::new(test_guest())
            .arg("--disk")
            .arg(format!("socket={}", socket.display()))
            .spawn();
        let info = expect_disk(&vm, "00:01.0", 0, false);
        assert!(info.ends_with("queues 1 serial serial-disk0"), "{info}");
        let log = finish(vm);
        assert_kicks_bypassed_the_vmm(&log, "disk0");
        assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
    }
}

/// A socket whose path is not UTF-8 text (a Linux path is bytes) serves the
/// disk as any other: the VMM takes `--disk socket=` as bytes.
#[test]
fn a_disk_socket_whose_path_is_not_text_works() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let odd = dir.path().join(OsStr::from_bytes(b"odd-\xff-dir"));
    std::fs::create_dir(&odd).expect("create the directory");
    let image = dir.path().join("disk0.img");
    make_image(&image, 0);
    let socket = odd.join("disk0.sock");
    let _backend = Backend::vhost_blk(&socket, &image, &[]);
    let mut disk = OsString::from("socket=");
    disk.push(&socket);
    let vm = VmBuilder::new(test_guest()).arg("--disk").arg(disk).spawn();
    expect_disk(&vm, "00:01.0", 0, false);
    let log = finish(vm);
    assert_kicks_bypassed_the_vmm(&log, "disk0");
    assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
}

/// A guest that moves its disks' BARs (as firmware, or an OS that assigns
/// PCI resources itself, does) drives them at the new addresses, and its
/// kicks still bypass the VMM: the BAR windows and the queues' notify
/// ioeventfds followed the BARs.
#[test]
fn disks_whose_bars_the_guest_moves_work_at_the_new_addresses() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut backends = Vec::new();
    let mut vm = VmBuilder::new(test_guest()).cmdline("movebars");
    for index in 0..2u8 {
        let image = dir.path().join(format!("disk{index}.img"));
        make_image(&image, index);
        let socket = dir.path().join(format!("disk{index}.sock"));
        backends.push(Backend::vhost_blk(&socket, &image, &[]));
        vm = vm.arg("--disk").arg(format!("socket={}", socket.display()));
    }
    let mut cmd = vm.command();
    cmd.env("RUST_LOG", "info");
    let vm = RunningVm::spawn(cmd);
    for (index, (bdf, to)) in [("00:01.0", "0xd0010000"), ("00:02.0", "0xd0020000")]
        .into_iter()
        .enumerate()
    {
        vm.expect_line(
            &format!("testguest: pci {bdf} bar0 moved to {to}"),
            Duration::from_secs(90),
        );
        expect_disk(&vm, bdf, index as u8, false);
    }
    let log = finish(vm);
    for (bdf, to) in [("00:01.0", "0xd0010000"), ("00:02.0", "0xd0020000")] {
        assert!(
            log.contains(&format!("PCI {bdf}: BAR0 on the bus at {to}")),
            "{log}"
        );
    }
    assert_kicks_bypassed_the_vmm(&log, "disk0");
    assert_kicks_bypassed_the_vmm(&log, "disk1");
    for index in 0..2u8 {
        let image = dir.path().join(format!("disk{index}.img"));
        assert_eq!(
            read_pattern_area(&image),
            guest_pattern(index),
            "disk{index}"
        );
    }
}

/// A vhost-blk that dies while the guest runs is taken back when it
/// restarts (see `restarted_backend_takes_over`).
#[test]
fn a_restarted_vhost_blk_takes_over_the_running_guest() {
    require_kvm();
    let log = restarted_backend_takes_over(&|socket, image| Backend::vhost_blk(socket, image, &[]));
    // vhost-user-backend has no in-flight tracking: nothing to hand over.
    assert!(!log.contains("requests in flight"), "{log}");
}

/// A disk resized while the guest runs: the image grows in place, SIGHUP
/// makes vhost-blk serve the new size and send CONFIG_CHANGE_MSG, the VMM
/// gives the guest a configuration-change interrupt, and the guest reads
/// the new capacity and the bytes put in the new last sector.
#[test]
fn a_disk_grown_while_the_guest_runs_shows_its_new_size_and_bytes() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk0.img");
    make_image(&image, 0);
    let socket = dir.path().join("disk0.sock");
    let mut backend_cmd = Command::new(vhost_blk_bin());
    backend_cmd
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&image)
        .env("RUST_LOG", "info");
    let backend = Backend::spawn(backend_cmd, &socket);
    let mut cmd = VmBuilder::new(test_guest())
        .cmdline("diskresize")
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .command();
    cmd.env("RUST_LOG", "info");
    let vm = RunningVm::spawn(cmd);
    expect_disk(&vm, "00:01.0", 0, false);
    let grown = grow_while_the_guest_watches(&vm, &backend, &image);
    let log = finish(vm);
    assert!(
        log.contains("disk0: the backend's configuration changed"),
        "{log}"
    );
    assert!(
        backend.log.text().contains(&format!(
            "the image went from {IMAGE_SIZE} to {grown} bytes"
        )),
        "{}",
        backend.log.text()
    );
}

/// A vhost-blk that stops answering (SIGSTOP) while the VMM resets the
/// device: the reset gives up after the reply timeout instead of hanging
/// the VMM, the log names the device, QMP reports the backend gone; once
/// the backend runs again the VMM takes it back, and after another reset
/// the guest's disk checks pass through it.
#[test]
fn a_backend_that_stops_answering_is_cut_off_and_taken_back() {
    require_kvm();
    let timeout = Duration::from_secs(90);
    let ok = "testguest: blk 00:01.0 write-read ok";
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk0.img");
    make_image(&image, 0);
    let socket = dir.path().join("disk0.sock");
    let api = dir.path().join("vm.qmp");
    let backend = Backend::vhost_blk(&socket, &image, &[]);
    let mut vm = VmBuilder::new(test_guest())
        .cmdline("echo")
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .arg("--api-socket")
        .arg(api.display().to_string())
        .spawn();
    vm.expect_line(ok, timeout);
    vm.expect_line("testguest: echo ready", timeout);
    let (mut qmp, _) = RawQmp::connect(&api);
    qmp.negotiate();

    backend.signal(libc::SIGSTOP);
    assert_eq!(
        qmp.request(r#"{"execute": "system_reset"}"#),
        r#"{"return":{}}"#
    );
    let cut = vm
        .stderr
        .wait_for("did not answer within", Duration::from_secs(30));
    backend.signal(libc::SIGCONT);
    let cut = cut.unwrap_or_else(|e| panic!("the reset waited on the stopped backend: {e}"));
    assert!(cut.contains("disk0"), "{cut}");
    qmp.expect_backend(false);
    // The hang-up that follows is reported as the VMM's doing.
    vm.stderr
        .wait_for(
            "disk0: cut off from its vhost-user backend",
            Duration::from_secs(10),
        )
        .expect("the hang-up was not put down to the timeout");
    assert!(!vm
        .stderr
        .text()
        .contains("disk0: the vhost-user backend disconnected"));
    qmp.expect_backend(true);
    // The VMM still answers, and the device works again.
    assert!(qmp
        .request(r#"{"execute": "query-status"}"#)
        .contains("\"running\""));
    // The guest the first reset started is done with its disk before the
    // pattern it wrote is cleared.
    if let Err(e) = vm.console.wait_for_nth("testguest: echo ready", 2, timeout) {
        panic!("{e}\nvmm stderr:\n{}", vm.stderr.text());
    }
    let seen = vm.console.count(ok);
    clear_pattern_area(&image);
    assert_eq!(
        qmp.request(r#"{"execute": "system_reset"}"#),
        r#"{"return":{}}"#
    );
    if let Err(e) = vm.console.wait_for_nth(ok, seen + 1, timeout) {
        panic!("{e}\nvmm stderr:\n{}", vm.stderr.text());
    }
    assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(143), "stderr: {}", vm.stderr.text());
}

/// `--memory size=64M,hugepages=on`: the guest's disk checks pass, and
/// both the VMM and vhost-blk map guest RAM with 2 MiB pages (what the
/// kernel reports in their smaps), all 64 MiB of it.
#[test]
fn guest_memory_on_huge_pages_reaches_the_backend_as_huge_pages() {
    require_kvm();
    require_free_hugepages(32);
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk0.img");
    make_image(&image, 0);
    let socket = dir.path().join("disk0.sock");
    let backend = Backend::vhost_blk(&socket, &image, &[]);
    let mut vm = VmBuilder::new(test_guest())
        .cmdline("echo")
        .memory("size=64M,hugepages=on")
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .spawn();
    expect_disk(&vm, "00:01.0", 0, false);
    vm.expect_line("testguest: echo ready", Duration::from_secs(60));
    for (who, pid) in [("vmm", vm.child.id()), ("vhost-blk", backend.child.id())] {
        let maps = memfd_mappings(pid, "guest-ram");
        assert!(!maps.is_empty(), "{who} has no guest-ram mapping");
        assert!(
            maps.iter().all(|&(_, page)| page == 2048),
            "{who} maps guest RAM with other than 2 MiB pages: {maps:?}"
        );
        let total: u64 = maps.iter().map(|&(size, _)| size).sum();
        assert_eq!(total, 64 << 10, "{who}'s guest-ram mappings: {maps:?}");
    }
    assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(143), "stderr: {}", vm.stderr.text());
}

#[test]
fn two_disks_one_with_two_queues_one_read_only() {
    two_disks_one_mq_one_read_only(|socket, image, queues, writable| {
        let queues = queues.to_string();
        let mut args = vec!["--num-queues", queues.as_str()];
        if !writable {
            args.push("--readonly");
        }
        Backend::vhost_blk(socket, image, &args)
    });
}

#[test]
fn a_second_writer_is_refused_and_sigterm_cleans_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let socket = dir.path().join("a.sock");
    let mut first = Backend::vhost_blk(&socket, &image, &[]);

    let out = Command::new(vhost_blk_bin())
        .arg("--socket")
        .arg(dir.path().join("b.sock"))
        .arg("--image")
        .arg(&image)
        .output()
        .expect("run vhost-blk");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("disk.img") && stderr.contains("locked"),
        "{stderr}"
    );
    assert!(!dir.path().join("b.sock").exists());

    first.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = first.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "vhost-blk ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "the socket file was left behind");
}

#[test]
fn bad_arguments_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    for (args, needle) in [
        (vec!["--image", "/nonexistent.img"], "/nonexistent.img"),
        (
            vec!["--image", "/etc/hostname", "--num-queues", "0"],
            "--num-queues",
        ),
        (
            vec!["--image", "/etc/hostname", "--queue-size", "100"],
            "--queue-size",
        ),
        (
            vec!["--image", "/etc/hostname", "--poll-us", "5000"],
            "--poll-us \"5000\"",
        ),
        (
            vec!["--image", "/etc/hostname", "--poll-us", "30"],
            "--poll-us 30: only with --direct",
        ),
    ] {
        let out = Command::new(vhost_blk_bin())
            .arg("--socket")
            .arg(&socket)
            .args(&args)
            .output()
            .expect("run vhost-blk");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{args:?} accepted");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!socket.exists());
    }
}
