//! scripts/launch: a VM with a disk and a NIC started as one unit, and
//! nothing left behind when it ends, whether the guest powers off or a
//! backend is killed.

use std::process::Command;
use std::time::Duration;

use vmm_tests::backend::workspace_bin;
use vmm_tests::blk::{make_image, LoopDevice};
use vmm_tests::net::{guest_ip, mac_text, Netns, HOST_IP};
use vmm_tests::pty::{same_termios, Pty};
use vmm_tests::vm::RunningVm;
use vmm_tests::{repo_root, require_kvm, test_guest, vmm_bin};

const TIMEOUT: Duration = Duration::from_secs(120);

fn launcher() -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("scripts/launch"))
        .env("VMM_BIN", vmm_bin())
        .env("VHOST_BLK_BIN", workspace_bin("vhost-blk", "VHOST_BLK_BIN"))
        .env("VHOST_NET_BIN", workspace_bin("vhost-net", "VHOST_NET_BIN"));
    cmd
}

/// Pids from the launcher's "started ... (pid N)" lines. The vmm writes to
/// the same stderr, so one of its messages may run into a line's start.
fn started_pids(stderr: &str) -> Vec<u32> {
    stderr
        .lines()
        .filter_map(|l| l.find("launch: ").map(|at| &l[at..]))
        .filter(|l| l.contains(": started "))
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .collect()
}

fn assert_all_gone(stderr: &str, expected: usize) {
    let pids = started_pids(stderr);
    assert_eq!(pids.len(), expected, "{stderr}");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived the launch:\n{stderr}"
        );
    }
    let work = stderr
        .lines()
        .find_map(|l| l.strip_prefix("launch: sockets in "))
        .unwrap_or_else(|| panic!("no socket directory in:\n{stderr}"));
    let work = std::path::Path::new(work);
    assert!(!work.exists(), "{} (sockets) remains", work.display());
}

#[test]
fn a_vm_with_a_disk_and_a_nic_starts_and_leaves_nothing_behind() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let ns = Netns::new();
    let tap = ns.tap_with_address(false);
    let config = dir.path().join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "[vm]\nkernel = {:?}\ncmdline = \"-q ip={} ping={HOST_IP}\"\nmemory = \"128M\"\n\n\
             [[disk]]\nimage = \"disk.img\"\n\n[[net]]\ntap = {tap:?}\nnetns = {:?}\n",
            test_guest().display().to_string(),
            guest_ip(1),
            ns.name
        ),
    )
    .expect("write config");
    let mut cmd = launcher();
    cmd.arg("--config")
        .arg(&config)
        .arg("--log-dir")
        .arg(dir.path().join("logs"));
    let mut vm = RunningVm::spawn(cmd);
    // A command line starting with `-` reaches the guest whole.
    vm.expect_line(
        &format!("testguest: cmdline -q ip={} ping={HOST_IP}", guest_ip(1)),
        TIMEOUT,
    );
    vm.expect_line("testguest: blk 00:01.0 write-read ok", TIMEOUT);
    // The backends keep their private directories in launch's work
    // directory (which the teardown removes even if one is killed).
    let stderr = vm.stderr.text();
    let work = stderr
        .lines()
        .find_map(|l| l.strip_prefix("launch: sockets in "))
        .unwrap_or_else(|| panic!("no socket directory in:\n{stderr}"));
    let inside: Vec<String> = std::fs::read_dir(work)
        .expect("the work directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    for prefix in ["vhost-blk-", "vhost-net-"] {
        assert!(
            inside.iter().any(|name| name.starts_with(prefix)),
            "no {prefix}* in {work}: {inside:?}"
        );
    }
    // Not the vmm's default (from the socket's path, new every launch):
    // one from the NIC's netns and tap, the same every time.
    let mac = vm.expect_line("testguest: net 00:02.0 mac ", TIMEOUT);
    assert!(mac.contains(&mac_text(stable_mac(&ns.name, &tap))), "{mac}");
    vm.expect_line(
        &format!("testguest: net ping {HOST_IP} 3/3 replies"),
        TIMEOUT,
    );
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(0), "{stderr}");
    vm.assert_no_guest_failure();
    assert_all_gone(&stderr, 3);
    for log in ["disk0.log", "net0.log"] {
        assert!(dir.path().join("logs").join(log).is_file(), "no {log}");
    }
}

#[test]
fn a_killed_backend_is_reported_and_everything_is_torn_down() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let mut cmd = launcher();
    cmd.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "count", "--memory", "64M", "--disk"])
        .arg(&image)
        .arg("--log-dir")
        .arg(dir.path().join("logs"));
    let mut vm = RunningVm::spawn(cmd);
    vm.expect_line("testguest: count 2", TIMEOUT);
    let pid = vm
        .stderr
        .wait_for("launch: disk0: started vhost-blk (pid ", TIMEOUT)
        .expect("backend line");
    let pid: i32 = pid
        .split("(pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .expect("pid");
    // SAFETY: kill(2) with a pid the launcher reported and a valid signal.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "launch: disk0: the backend (pid {pid}) was killed by signal 9; tearing the VM down"
        )),
        "{stderr}"
    );
    assert_all_gone(&stderr, 2);
}

/// Launches the test guest with `disk` as its only device (`cmd` is the
/// launcher, set up as the test needs), and checks that the guest's
/// write-read passed, the launch exited 0, and every process it started
/// is gone.
fn launch_with_one_disk(mut cmd: Command, disk: &std::path::Path, logs: &std::path::Path) {
    cmd.arg("--kernel")
        .arg(test_guest())
        .args(["--memory", "128M", "--cmdline", "nonet", "--disk"])
        .arg(disk)
        .arg("--log-dir")
        .arg(logs);
    let mut vm = RunningVm::spawn(cmd);
    vm.expect_line("testguest: blk 00:01.0 write-read ok", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(0), "{stderr}");
    vm.assert_no_guest_failure();
    assert_all_gone(&stderr, 2);
}

/// Under a TMPDIR long enough that a backend's relay socket would not fit
/// in a socket's name inside launch's work directory (but the public
/// sockets do), the backends keep their private directories in TMPDIR, the
/// VM runs, and the teardown leaves TMPDIR empty.
#[test]
fn a_long_tmpdir_keeps_the_backends_relay_sockets_where_they_fit() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let base = dir.path().as_os_str().len();
    // 70 bytes: the work directory's sockets (TMPDIR plus 31) fit in 107,
    // a relay socket under it (TMPDIR plus 48) does not.
    let tmpdir = dir.path().join("t".repeat(70 - base - 1));
    std::fs::create_dir(&tmpdir).expect("long TMPDIR");
    assert_eq!(tmpdir.as_os_str().len(), 70);
    let mut cmd = launcher();
    cmd.env("TMPDIR", &tmpdir);
    launch_with_one_disk(cmd, &image, &dir.path().join("logs"));
    let left: Vec<_> = std::fs::read_dir(&tmpdir)
        .expect("TMPDIR")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}

/// A backend that cannot start (here the second disk's: its image is the
/// first's, locked) ends the launch with its log, before the vmm starts,
/// and the backend started before it is stopped; a vmm that refuses its
/// arguments ends it with the vmm's status, its backend stopped too.
#[test]
fn a_backend_or_vmm_failing_at_start_stops_what_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let out = launcher()
        .arg("--kernel")
        .arg(test_guest())
        .arg("--disk")
        .arg(&image)
        .arg("--disk")
        .arg(&image)
        .arg("--log-dir")
        .arg(dir.path().join("logs"))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("launch: error: disk1: the backend exited with status 1; its log:"),
        "{stderr}"
    );
    assert!(stderr.contains("disk.img\": locked"), "{stderr}");
    assert!(!stderr.contains("vmm: started"), "{stderr}");
    assert_all_gone(&stderr, 2);

    let out = launcher()
        .arg("--kernel")
        .arg(test_guest())
        .arg("--disk")
        .arg(&image)
        .arg("--log-dir")
        .arg(dir.path().join("logs"))
        .args(["--", "--no-such-option"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("launch: vmm: exited with status 2"),
        "{stderr}"
    );
    assert_all_gone(&stderr, 2);
}

/// The launcher's default MAC for a NIC: FNV-1a of "HOST/NETNS/TAP" (HOST:
/// /etc/machine-id, or the host name), its first three bytes after
/// 52:54:00.
fn stable_mac(netns: &str, tap: &str) -> [u8; 6] {
    let host = ["/etc/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .map(|id| id.trim_ascii().to_vec())
        .find(|id| !id.is_empty())
        .unwrap_or_default();
    let mut hash: u32 = 0x811c_9dc5;
    for byte in host.into_iter().chain(format!("/{netns}/{tap}").bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = hash.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

/// Runs the launcher with `args`; expects status 1 and exactly `line` on
/// stderr.
fn refused_with(args: &[&std::ffi::OsStr], line: &str) {
    let mut cmd = launcher();
    cmd.args(args);
    refused(cmd, line);
}

/// Runs `cmd`; expects status 1 and exactly `line` on stderr.
fn refused(mut cmd: Command, line: &str) {
    let out = cmd.output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim_end(), line);
}

#[test]
fn a_bad_config_is_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[vm]\nkernel = \"nope\"\ncolour = \"blue\"\n").expect("write");
    refused_with(
        &["--config".as_ref(), config.as_os_str()],
        "launch: error: [vm]: unknown key 'colour'",
    );
}

#[test]
fn a_bad_queue_count_is_one_clear_line() {
    let guest = vmm_tests::test_guest();
    refused_with(
        &[
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--net".as_ref(),
            "tap0,queues=x".as_ref(),
        ],
        "launch: error: net 0: queues='x' is not a positive number",
    );
}

#[test]
fn a_readonly_flag_other_than_on_or_off_is_one_clear_line() {
    // Before, any value read as set: readonly=false served the disk
    // read-only.
    refused_with(
        &["--disk".as_ref(), "disk.img,readonly=false".as_ref()],
        "launch: error: --disk 'disk.img,readonly=false': readonly='false': expected on or off",
    );
}

/// Each mistake names the value: an unknown key, a MAC that is not a
/// unicast one, a tap given twice, an image path with an escaped comma.
#[test]
fn bad_device_options_are_one_clear_line_naming_the_value() {
    let dir = tempfile::tempdir().expect("tempdir");
    let guest = test_guest();
    let kernel = ["--kernel".as_ref(), guest.as_os_str()];
    let comma = format!("{}/a,,b.img", dir.path().display());
    let cases: [(&[&str], String); 6] = [
        (
            &["--disk", "d.img,foo=1"],
            "launch: error: disk 0: unknown key 'foo' (known: image, readonly, queues)".into(),
        ),
        (
            &["--net", "tap0,readonly"],
            "launch: error: --net 'tap0,readonly': 'readonly' is not key=value".into(),
        ),
        (
            &["--net", "tap0,mac=01:00:00:00:00:01"],
            "launch: error: net 0: mac '01:00:00:00:00:01' is not a unicast MAC like 52:54:00:12:34:56"
                .into(),
        ),
        (
            &["--net", "tap0", "--net", "tap0"],
            "launch: error: net 1: tap 'tap0' is net 0's already".into(),
        ),
        (
            &[
                "--net",
                "tap0,mac=52:54:00:00:00:01",
                "--net",
                "tap1,mac=52-54-00-00-00-01",
            ],
            "launch: error: net 1: mac '52-54-00-00-00-01' is net 0's already".into(),
        ),
        (
            &["--disk", &comma],
            format!(
                "launch: error: disk 0: image '{}/a,b.img': no such file",
                dir.path().display()
            ),
        ),
    ];
    for (args, line) in cases {
        let mut all: Vec<&std::ffi::OsStr> = kernel.to_vec();
        all.extend(args.iter().map(|a| std::ffi::OsStr::new(*a)));
        refused_with(&all, &line);
    }
}

/// A log directory another launch holds is refused before anything
/// starts (its backends' logs would be overwritten), and so is a vmm
/// binary that cannot be run.
#[test]
fn a_busy_log_dir_or_a_binary_that_cannot_run_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).expect("mkdir");
    let held = std::fs::File::open(&logs).expect("open the log dir");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&held);
    // SAFETY: flock on a descriptor this test owns; no memory is passed.
    let locked = unsafe { libc::flock(fd, libc::LOCK_EX) };
    assert_eq!(locked, 0);
    let guest = test_guest();
    refused_with(
        &[
            "--kernel".as_ref(),
            guest.as_os_str(),
            "--log-dir".as_ref(),
            logs.as_os_str(),
        ],
        &format!(
            "launch: error: --log-dir {}: another launch is using it (give each VM its own)",
            logs.display()
        ),
    );
    drop(held);

    // A backend binary missing is named before the first backend starts.
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let missing = dir.path().join("no-vhost-net");
    let mut cmd = launcher();
    cmd.env("VHOST_NET_BIN", &missing)
        .arg("--kernel")
        .arg(&guest)
        .arg("--disk")
        .arg(&image)
        .args(["--net", "tap0"])
        .arg("--log-dir")
        .arg(&logs);
    refused(
        cmd,
        &format!(
            "launch: error: {} is missing: run `cargo build --release -p vhost-net` (or set VHOST_NET_BIN)",
            missing.display()
        ),
    );

    let not_executable = dir.path().join("vmm");
    std::fs::write(&not_executable, "").expect("write");
    let mut cmd = launcher();
    cmd.env("VMM_BIN", &not_executable)
        .arg("--kernel")
        .arg(&guest);
    refused(
        cmd,
        &format!(
            "launch: error: {} is not executable (check VMM_BIN)",
            not_executable.display()
        ),
    );
}

#[test]
fn config_values_of_the_wrong_kind_are_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    let cases = [
        (
            "[disk]\nimage = \"disk.img\"\n".to_string(),
            format!(
                "launch: error: --config {}: disk must be tables, written [[disk]]",
                config.display()
            ),
        ),
        (
            "[vm]\nkernel = 5\n".to_string(),
            "launch: error: [vm] kernel = 5: expected a string".to_string(),
        ),
        (
            format!(
                "[vm]\nkernel = {:?}\n[[net]]\ntap = 5\n",
                test_guest().display().to_string()
            ),
            "launch: error: net 0: tap = 5: expected a string".to_string(),
        ),
    ];
    for (text, line) in cases {
        std::fs::write(&config, text).expect("write");
        refused_with(&["--config".as_ref(), config.as_os_str()], &line);
    }
}

/// An image that is a block device (vhost-blk serves those too) is taken,
/// and the guest's writes reach it.
#[test]
fn a_block_device_as_the_image_is_served() {
    require_kvm();
    let target = vmm_tests::repo_root().join("target");
    let dir = tempfile::tempdir_in(&target).expect("tempdir in target/");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let device = LoopDevice::new(&image, 512);
    launch_with_one_disk(launcher(), &device.0, &dir.path().join("logs"));
    drop(device);
    assert_eq!(
        vmm_tests::blk::read_pattern_area(&image),
        vmm_tests::blk::guest_pattern(0),
        "the guest's pattern is not on the device's file"
    );
}

#[test]
fn a_signal_to_the_launcher_stops_everything() {
    stops_everything_on(libc::SIGINT);
}

/// A signal nobody presses a key for, whose default action would end
/// launch without its clean-up.
#[test]
fn sigusr1_to_the_launcher_stops_everything_too() {
    stops_everything_on(libc::SIGUSR1);
}

fn stops_everything_on(signal: libc::c_int) {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let api = dir.path().join("vm.qmp");
    let mut cmd = launcher();
    cmd.arg("--kernel")
        .arg(test_guest())
        .args(["--cmdline", "count", "--memory", "64M", "--disk"])
        .arg(&image)
        .arg("--api-socket")
        .arg(&api)
        .arg("--log-dir")
        .arg(dir.path().join("logs"));
    let mut vm = RunningVm::spawn(cmd);
    vm.expect_line("testguest: count 2", TIMEOUT);
    vm.signal(signal);
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(128 + signal), "{stderr}");
    assert!(
        stderr.contains(&format!("launch: signal {signal}: stopping the VM")),
        "{stderr}"
    );
    assert_all_gone(&stderr, 2);
    assert!(!api.exists(), "the vmm's API socket remains");
}

/// The launcher with `script` (written into `dir`) as its vmm and kernel.
fn launcher_of_fake_vmm(dir: &std::path::Path, script: &str) -> Command {
    let fake = dir.join("fake-vmm");
    std::fs::write(&fake, script).expect("write");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let mut cmd = launcher();
    cmd.env("VMM_BIN", &fake)
        .arg("--kernel")
        .arg(&fake)
        .arg("--log-dir")
        .arg(dir.join("logs"));
    cmd
}

/// A vmm that ignores SIGTERM is killed at once on a second signal, rather
/// than after launch's whole stop timeout.
#[test]
fn a_second_signal_kills_what_ignores_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmd = launcher_of_fake_vmm(
        dir.path(),
        "#!/bin/sh\ntrap '' TERM\necho stubborn vmm up\nexec sleep 600\n",
    );
    let mut vm = RunningVm::spawn(cmd);
    vm.expect_line("stubborn vmm up", TIMEOUT);
    vm.signal(libc::SIGTERM);
    // The first signal is seen before the second is sent: two pending
    // signals of one kind are one.
    vm.stderr
        .wait_for("launch: signal 15: stopping the VM", TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.signal(libc::SIGINT);
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(
        stderr.contains("still running after another signal; killed it"),
        "{stderr}"
    );
    assert!(!stderr.contains("ignored SIGTERM"), "{stderr}");
    assert_all_gone(&stderr, 1);
}

/// A vmm that dies without putting the terminal back (here one that makes
/// it raw and kills itself with SIGKILL): launch puts it back.
#[test]
fn launch_restores_the_terminal_a_killed_vmm_left_raw() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmd = launcher_of_fake_vmm(dir.path(), "#!/bin/sh\nstty raw -echo\nkill -KILL $$\n");
    let pty = Pty::open();
    let before = pty.attributes();
    let mut vm = pty.spawn(cmd);
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(137), "{stderr}");
    assert!(stderr.contains("vmm: killed by signal 9"), "{stderr}");
    assert!(stderr.contains("put the terminal back"), "{stderr}");
    assert!(same_termios(&before, &pty.attributes()), "{stderr}");
}
