//! Bad command-line input: a one-line error naming the value, a non-zero
//! exit, at once, and no guest run.

use std::process::Command;
use std::time::{Duration, Instant};

use vmm_tests::{test_guest, vmm_bin};

fn run_vmm(args: &[&str]) -> (i32, String, String) {
    let start = Instant::now();
    let out = Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("cannot run the vmm");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the vmm took {:?} to reject {args:?}",
        start.elapsed()
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs with the test guest as kernel plus `args`; expects a rejection
/// whose message names `needle`.
/// Runs the vmm on the test guest with `args`; checks it failed with one
/// error line naming `needle`, and returns its stderr.
fn rejected(args: &[&str], needle: &str) -> String {
    let guest = test_guest();
    let mut all = vec!["--kernel", guest.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    rejected_raw(&all, needle)
}

fn rejected_raw(args: &[&str], needle: &str) -> String {
    let (code, stdout, stderr) = run_vmm(args);
    assert_ne!(code, 0, "{args:?} was accepted; stderr: {stderr}");
    assert!(
        !stdout.contains("testguest:"),
        "a guest ran for {args:?}: {stdout}"
    );
    assert!(
        stderr.contains(needle),
        "the error for {args:?} does not name {needle:?}: {stderr}"
    );
    let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(error_lines.len(), 1, "not one error line: {stderr}");
    stderr
}

#[test]
fn missing_kernel() {
    rejected_raw(
        &["--kernel", "/nonexistent/vmlinuz"],
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.bin");
    let bytes: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&junk, bytes).expect("write junk");
    rejected_raw(&["--kernel", junk.to_str().expect("utf-8")], "junk.bin");
}

#[test]
fn kernel_that_is_a_directory() {
    rejected_raw(&["--kernel", "/tmp"], "/tmp");
}

#[test]
fn missing_initramfs() {
    rejected(
        &["--initramfs", "/nonexistent/initrd.img"],
        "/nonexistent/initrd.img",
    );
}

#[test]
fn memory_zero() {
    rejected(&["--memory", "0"], "--memory \"0\"");
}

#[test]
fn memory_more_than_the_host() {
    rejected(&["--memory", "100T"], "100T");
}

#[test]
fn memory_garbled() {
    rejected(&["--memory", "12Q"], "12Q");
    rejected(&["--memory", "abc"], "abc");
    rejected(&["--memory", "-1G"], "-1G");
}

#[test]
fn memory_on_huge_pages_that_are_not_there_or_misfit() {
    rejected(
        &["--memory", "size=5M,hugepages=on"],
        "\"size=5M,hugepages=on\": with hugepages=on the size must be a multiple of 2M",
    );
    rejected(
        &["--memory", "size=64M,hugepages=yes"],
        "hugepages=yes is not on or off",
    );
    // Far more than any test machine keeps free (CI reserves 64).
    rejected(
        &["--memory", "size=16G,hugepages=on"],
        "\"size=16G,hugepages=on\": needs 8192 huge pages of 2 MiB, the host has",
    );
}

#[test]
fn cpus_zero() {
    rejected(&["--cpus", "0"], "--cpus 0");
    rejected(&["--cpus", "-2"], "-2");
}

#[test]
fn cpus_above_the_limit() {
    rejected(&["--cpus", "100000"], "100000");
}

#[test]
fn cpus_not_a_number() {
    rejected(&["--cpus", "two"], "two");
}

#[test]
fn cmdline_with_init_arguments_only() {
    rejected(&["--cmdline", " -- init=/bin/sh"], "init=/bin/sh");
}

#[test]
fn serial_mode_unknown() {
    rejected(&["--serial", "bogus"], "bogus");
    rejected(&["--serial", "file="], "file=");
}

#[test]
fn unknown_option_is_a_usage_error() {
    let (code, _, stderr) = run_vmm(&["--kernel", "x", "--frobnicate"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--frobnicate"), "{stderr}");
}

/// A start that fails leaves what was there: an earlier console log keeps
/// its contents, and a log the VMM would have made is not left behind.
#[test]
fn a_failed_start_leaves_the_serial_log_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nobody.sock");
    let missing = format!("socket={}", missing.display());
    let old_log = dir.path().join("old.log");
    std::fs::write(&old_log, "yesterday's boot\n").expect("write the old log");
    let serial = format!("file={}", old_log.display());
    rejected(&["--serial", &serial, "--disk", &missing], "nobody.sock");
    assert_eq!(
        std::fs::read_to_string(&old_log).expect("read the old log"),
        "yesterday's boot\n"
    );
    let new_log = dir.path().join("new.log");
    let serial = format!("file={}", new_log.display());
    let tables = dir.path().join("acpi");
    let dump = tables.to_str().expect("utf-8");
    rejected(
        &["--serial", &serial, "--dump-acpi", dump, "--disk", &missing],
        "nobody.sock",
    );
    assert!(!new_log.exists(), "a failed start left {new_log:?}");
    assert!(!tables.exists(), "a failed start left {tables:?}");
}

/// A console log that is the kernel or the initramfs (a typo, or another
/// spelling of the path) is refused, and the file is left as it was.
#[test]
fn a_serial_log_that_is_the_kernel_or_initramfs_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = dir.path().join("k");
    std::fs::copy(test_guest(), &kernel).expect("copy the kernel");
    let before = std::fs::read(&kernel).expect("read the kernel");
    let k = kernel.to_str().expect("utf-8");
    let other_spelling = format!("file={}/./k", dir.path().display());
    rejected_raw(
        &["--kernel", k, "--serial", &other_spelling],
        "the same file as --kernel",
    );
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"an initramfs").expect("write");
    let i = initrd.to_str().expect("utf-8");
    rejected(
        &["--initramfs", i, "--serial", &format!("file={i}")],
        "the same file as --initramfs",
    );
    assert_eq!(std::fs::read(&kernel).expect("read"), before);
    assert_eq!(std::fs::read(&initrd).expect("read"), b"an initramfs");
}

/// On a host where KVM cannot be opened (here /dev is an empty tmpfs in a
/// mount namespace of its own), a bad value is still what the error names;
/// good values then get the KVM error.
#[test]
fn bad_values_are_named_before_kvm_is_needed() {
    let guest = test_guest();
    let without_kvm = |args: &[&str]| {
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount -t tmpfs none /dev && exec "$0" "$@""#)
            .arg(vmm_bin())
            .arg("--kernel")
            .arg(&guest)
            .args(args)
            .output()
            .expect("cannot run unshare (util-linux)");
        assert_ne!(out.status.code(), Some(0), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = without_kvm(&["--cpus", "0"]);
    assert!(
        stderr.starts_with("error: --cpus 0") && stderr.lines().count() == 1,
        "{stderr}"
    );
    let stderr = without_kvm(&["--cpus", "1"]);
    assert!(stderr.contains("/dev/kvm"), "{stderr}");
}

/// A socket file whose backend is gone (nothing listens on it) is refused
/// with one line naming it, after the short grace a backend that is just
/// starting gets.
#[test]
fn a_stale_backend_socket_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stale = dir.path().join("gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists(), "the socket file stays after its listener");
    let disk = format!("socket={}", stale.display());
    let stderr = rejected(&["--disk", &disk], "gone.sock");
    assert!(
        stderr.contains("connection refused: nothing listens on the socket"),
        "{stderr}"
    );
}

/// An image given where the backend's socket goes is refused, naming it,
/// without the grace a starting backend gets.
#[test]
fn a_file_that_is_not_a_socket_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, [0u8; 4096]).expect("write");
    let disk = format!("socket={}", image.display());
    let stderr = rejected(&["--disk", &disk], "disk.img");
    assert!(stderr.contains("the path is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&image).expect("read"), [0u8; 4096]);
}

/// A FIFO no one reads as the serial log is refused at once (not waited
/// on for ever, with the stop signals blocked).
#[test]
fn a_serial_fifo_without_a_reader_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("console.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: a NUL-terminated path; mkfifo reads nothing else.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
    let serial = format!("file={}", fifo.display());
    rejected(&["--serial", &serial], "console.fifo");
}

/// A kernel that cannot boot is refused before any backend is waited for
/// (a `server=on` NIC would wait for its backend for ever).
#[test]
fn a_bad_kernel_is_refused_before_backends_are_waited_for() {
    let dir = tempfile::tempdir().expect("tempdir");
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, vec![0x5a; 4096]).expect("write junk");
    let net = format!("socket={},server=on", dir.path().join("n.sock").display());
    rejected_raw(
        &["--kernel", junk.to_str().expect("utf-8"), "--net", &net],
        "junk.bin",
    );
}

/// The API socket is bound before the VM is built: a path that cannot be
/// bound is refused before any backend is waited for.
#[test]
fn an_api_socket_that_cannot_be_bound_is_refused_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = format!("socket={},server=on", dir.path().join("n.sock").display());
    rejected(
        &["--api-socket", "/nonexistent/dir/api.sock", "--net", &net],
        "/nonexistent/dir/api.sock",
    );
}
