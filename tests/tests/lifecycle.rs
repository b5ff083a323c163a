//! How the VM ends: a guest reset reboots in place (or, with --no-reboot,
//! exits 3); triple fault and stop signals each give their documented exit
//! status.

use std::time::Duration;

use vmm_tests::vm::VmBuilder;
use vmm_tests::{require_kvm, test_guest};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn a_guest_reset_reboots_in_place() {
    require_kvm();
    let mut vm = VmBuilder::new(test_guest())
        .cpus(2)
        .cmdline("resetonce")
        .spawn();
    vm.expect_line("testguest: resetting", TIMEOUT);
    vm.expect_line("testguest: rebooted after reset", TIMEOUT);
    vm.expect_line("testguest: poweroff", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    vm.assert_no_guest_failure();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr.text());
    let console = vm.console.text();
    assert_eq!(console.matches("testguest: hello").count(), 2, "{console}");
    // Both processors came back after the reboot: the tables list both,
    // and the second one, back in its wait for INIT and STARTUP, ran the
    // guest's start-up code again.
    assert_eq!(
        console.matches("testguest: cpus 2\n").count(),
        2,
        "{console}"
    );
    assert_eq!(
        console.matches("testguest: cpus running 2\n").count(),
        2,
        "{console}"
    );
    // The IOAPIC too, at its power-on state (masked, vector 0) although the
    // first boot changed the entry's vector before the reset.
    assert_eq!(
        console
            .matches("testguest: ioapic pin15 0x00010000")
            .count(),
        2,
        "{console}"
    );
    // The boot processor's local APIC as well: the first boot masked its
    // timer on vector 0x41 and switched it to x2APIC mode; the second finds
    // it enabled in xAPIC mode at 0xfee00000, its timer at power-on state.
    assert_eq!(
        console
            .matches("testguest: lapic x2apic mode 0xfee00d00")
            .count(),
        1,
        "{console}"
    );
    assert_eq!(
        console
            .matches("testguest: lapic base 0xfee00900 lvt timer 0x00010000")
            .count(),
        2,
        "{console}"
    );
}

#[test]
fn guest_reset_exits_3_with_no_reboot() {
    require_kvm();
    let mut vm = VmBuilder::new(test_guest())
        .cmdline("reset")
        .arg("--no-reboot")
        .spawn();
    vm.expect_line("testguest: reset", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    vm.assert_no_guest_failure();
    assert_eq!(status.code(), Some(3), "stderr: {}", vm.stderr.text());
}

#[test]
fn triple_fault_exits_4_and_logs_registers() {
    require_kvm();
    let mut vm = VmBuilder::new(test_guest()).cmdline("triplefault").spawn();
    vm.expect_line("testguest: triplefault", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(4), "stderr: {}", vm.stderr.text());
    let log = vm.stderr.text();
    assert!(log.contains("triple fault"), "log: {log}");
    assert!(log.contains("registers: rip="), "log: {log}");
}

fn stop_with(signal: i32, expected: i32) {
    require_kvm();
    // In echo mode the guest waits for input forever.
    let mut vm = VmBuilder::new(test_guest()).cmdline("echo").cpus(2).spawn();
    vm.expect_line("testguest: echo ready", TIMEOUT);
    vm.signal(signal);
    let status = vm.wait_exit(Duration::from_secs(5));
    assert_eq!(
        status.code(),
        Some(expected),
        "stderr: {}",
        vm.stderr.text()
    );
}

#[test]
fn sigterm_exits_143() {
    stop_with(libc::SIGTERM, 143);
}

#[test]
fn sigint_exits_130() {
    stop_with(libc::SIGINT, 130);
}

/// Whether the process has SIGINT and SIGTERM blocked (the vmm blocks them
/// before it builds the VM and reads them from a signalfd).
fn stop_signals_blocked(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| {
            let bit = |s: i32| 1u64 << (s - 1);
            mask & bit(libc::SIGINT) != 0 && mask & bit(libc::SIGTERM) != 0
        })
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ctrl-C while the vmm waits for a `server=on` backend is a stop like
/// any other (status 130), not an error, and the socket goes.
#[test]
fn sigint_while_waiting_for_a_server_backend_exits_130() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("net.sock");
    let mut vm = VmBuilder::new(test_guest())
        .arg("--net")
        .arg(format!("socket={},server=on", socket.display()))
        .spawn();
    wait_until("the vmm listens", || socket.exists());
    vm.signal(libc::SIGINT);
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(130), "stderr: {stderr}");
    assert!(!stderr.contains("error"), "stderr: {stderr}");
    assert!(!socket.exists(), "the socket remains");
}

/// A stop signal that comes while the VM is being built (here while its
/// disk's backend is stopped mid-handshake) ends it before the guest runs.
#[test]
fn a_signal_during_the_build_stops_the_vm_before_the_guest_runs() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    vmm_tests::blk::make_image(&image, 0);
    let socket = dir.path().join("disk.sock");
    let backend = vmm_tests::backend::Backend::vhost_blk(&socket, &image, &[]);
    backend.signal(libc::SIGSTOP);
    let mut cmd = VmBuilder::new(test_guest())
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .command();
    cmd.env("RUST_LOG", "info");
    let mut vm = vmm_tests::vm::RunningVm::spawn(cmd);
    let pid = vm.child.id();
    wait_until("the vmm blocks its stop signals", || {
        stop_signals_blocked(pid)
    });
    vm.signal(libc::SIGTERM);
    backend.signal(libc::SIGCONT);
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(143), "stderr: {stderr}");
    assert!(
        stderr.contains("stopped by a signal before the guest started"),
        "stderr: {stderr}"
    );
    assert!(vm.console.text().is_empty(), "the guest ran");
}
