//! The serial console driven interactively through a pty: input reaches the
//! guest, the terminal is raw while the VM runs and restored afterwards, and
//! Ctrl-A x quits.

use std::io::Write;
use std::time::Duration;

use vmm_tests::pty::Pty;
use vmm_tests::vm::VmBuilder;
use vmm_tests::{require_kvm, test_guest};

const TIMEOUT: Duration = Duration::from_secs(60);

fn same_termios(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

#[test]
fn typed_lines_reach_the_guest_and_the_terminal_is_restored() {
    require_kvm();
    let pty = Pty::open();
    let before = pty.attributes();
    let mut vm = pty.spawn(VmBuilder::new(test_guest()).cmdline("echo").command());
    vm.expect_line("testguest: echo ready", TIMEOUT);
    let during = pty.attributes();
    assert_eq!(during.c_lflag & libc::ICANON, 0, "the terminal is not raw");
    assert_eq!(during.c_lflag & libc::ECHO, 0, "the terminal still echoes");

    let mut master = pty.master.try_clone().expect("dup master");
    master.write_all(b"hello pty\r").expect("type");
    vm.expect_line("testguest: echo hello pty", TIMEOUT);
    master.write_all(b"poweroff\r").expect("type");
    vm.expect_line("testguest: poweroff", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr.text());
    assert!(
        same_termios(&before, &pty.attributes()),
        "terminal attributes were not restored"
    );
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    require_kvm();
    let pty = Pty::open();
    let before = pty.attributes();
    let mut vm = pty.spawn(VmBuilder::new(test_guest()).cmdline("echo").command());
    vm.expect_line("testguest: echo ready", TIMEOUT);
    let mut master = pty.master.try_clone().expect("dup master");
    // Ctrl-C goes to the guest as a byte; it does not stop the VMM.
    master.write_all(b"\x03abc\r").expect("type");
    vm.expect_line("testguest: echo \u{3}abc", TIMEOUT);
    master.write_all(b"\x01x").expect("type");
    let status = vm.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(130), "stderr: {}", vm.stderr.text());
    assert!(same_termios(&before, &pty.attributes()));
}

/// A guest that reads nothing from its UART (here one that only counts)
/// fills the input FIFO; what is typed past it is dropped, as on a real
/// UART, so Ctrl-A x still quits.
#[test]
fn ctrl_a_x_quits_a_guest_that_reads_no_input() {
    require_kvm();
    let pty = Pty::open();
    let mut vm = pty.spawn(VmBuilder::new(test_guest()).cmdline("count").command());
    vm.expect_line("testguest: count 1", TIMEOUT);
    let mut master = pty.master.try_clone().expect("dup master");
    master.write_all(&[b'z'; 200]).expect("type");
    std::thread::sleep(Duration::from_millis(200));
    master.write_all(b"\x01x").expect("type");
    let status = vm.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130), "stderr: {}", vm.stderr.text());
}
