//! How the VM ends: guest reset, triple fault and stop signals each give
//! their documented exit status.

use std::time::Duration;

use vmm_tests::vm::VmBuilder;
use vmm_tests::{require_kvm, test_guest};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn guest_reset_exits_3() {
    require_kvm();
    let mut vm = VmBuilder::new(test_guest()).cmdline("reset").spawn();
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
