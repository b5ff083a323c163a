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
