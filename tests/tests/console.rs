//! The serial console driven interactively through a pty: input reaches the
//! guest, the terminal is raw while the VM runs and restored afterwards, and
//! Ctrl-A x quits; string port I/O (`rep outsb`, `rep insb`) reaches the UART;
//! console output that cannot be written does not stop the guest.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use vmm_tests::pty::{same_termios, Pty};
use vmm_tests::vm::{tail, Output, VmBuilder};
use vmm_tests::{require_kvm, test_guest};

const TIMEOUT: Duration = Duration::from_secs(60);

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

/// String port I/O exits once for many accesses: every byte of a
/// `rep outsb` line reaches the console, and every byte of a `rep insb`
/// from the line status register is filled in (transmitter empty, 0x60).
#[test]
fn string_port_io_reaches_the_uart_one_access_at_a_time() {
    require_kvm();
    let mut vm = VmBuilder::new(test_guest())
        .cmdline("nopci stringio")
        .spawn();
    vm.expect_line("testguest: rep outsb reached the console", TIMEOUT);
    let status_line = vm.expect_line("testguest: rep insb line status", TIMEOUT);
    assert_eq!(
        status_line,
        "testguest: rep insb line status [60, 60, 60, 60, 60, 60, 60, 60]"
    );
    let status = vm.wait_exit(TIMEOUT);
    vm.assert_no_guest_failure();
    assert_eq!(status.code(), Some(0), "stderr: {}", vm.stderr.text());
}

/// Waits for a child started outside `RunningVm`, killing it on timeout.
fn wait_or_kill(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Console output no one reads (a pipe left full) does not stop the guest:
/// it prints twice what the pipe holds and powers off, and the VMM exits.
#[test]
fn a_console_no_one_reads_does_not_stop_the_guest() {
    require_kvm();
    let mut cmd = VmBuilder::new(test_guest())
        .cmdline("nopci flood")
        .command();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the vmm");
    let stderr = Output::capture(child.stderr.take().expect("piped stderr"));
    let code = wait_or_kill(&mut child, TIMEOUT);
    let mut console = String::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut console)
        .expect("read the console");
    assert_eq!(code, Some(0), "stderr: {}", stderr.text());
    assert!(
        console.starts_with("testguest: hello\n"),
        "{}",
        tail(&console, 5)
    );
    assert!(
        console.contains("testguest: flood 00100 "),
        "{}",
        tail(&console, 5)
    );
}

/// A console that cannot be written (stdout on /dev/full) is reported once,
/// and the guest runs to its end.
#[test]
fn a_console_that_fails_is_reported_once() {
    require_kvm();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let mut cmd = VmBuilder::new(test_guest()).cmdline("nopci").command();
    cmd.stdin(Stdio::null()).stdout(full).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the vmm");
    let stderr = Output::capture(child.stderr.take().expect("piped stderr"));
    let code = wait_or_kill(&mut child, TIMEOUT);
    let log = stderr.text();
    assert_eq!(code, Some(0), "stderr: {log}");
    assert_eq!(log.matches("console output failed").count(), 1, "{log}");
    assert!(log.contains("No space left on device"), "{log}");
}

/// `--serial file=` takes what is not a regular file too: a FIFO gets the
/// guest's output (it is not truncated, which a FIFO refuses).
#[test]
fn the_serial_log_may_be_a_fifo() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::OpenOptionsExt;
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("console.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: a NUL-terminated path; mkfifo reads nothing else.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    // Read and write: open at once, and a reader is there when the vmm
    // opens its end.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&fifo)
        .expect("open the FIFO");
    let lines = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(reader).lines() {
            let line = line.expect("read the FIFO");
            let done = line.contains("testguest: poweroff");
            seen.push(line);
            if done {
                break;
            }
        }
        seen
    });
    let mut cmd = std::process::Command::new(vmm_tests::vmm_bin());
    cmd.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "nopci", "--serial"])
        .arg(format!("file={}", fifo.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start the vmm");
    let stderr = Output::capture(child.stderr.take().expect("piped stderr"));
    let code = wait_or_kill(&mut child, TIMEOUT);
    assert_eq!(code, Some(0), "stderr: {}", stderr.text());
    let lines = lines.join().expect("the FIFO reader");
    assert!(
        lines.iter().any(|l| l.contains("testguest: hello")),
        "{lines:?}"
    );
}
