//! The QMP control socket: stop really pauses the vCPUs and cont resumes
//! them, quit ends the VMM with a SHUTDOWN event, system_powerdown presses
//! the ACPI power button and the guest powers off, bad input gets QMP
//! errors or a closed connection but never stops the VM, and the Python
//! qemu.qmp library (a client no one here wrote) drives it.

use std::process::Command;
use std::time::Duration;

use vmm_tests::qmp::RawQmp;
use vmm_tests::vm::{RunningVm, VmBuilder};
use vmm_tests::{assert_threads_sleep, repo_root, require_kvm, test_guest};

const TIMEOUT: Duration = Duration::from_secs(60);

fn counting_vm(socket: &std::path::Path) -> RunningVm {
    guest_with_api(socket, "count")
}

/// The test guest with `cmdline`, its API on `socket`.
fn guest_with_api(socket: &std::path::Path, cmdline: &str) -> RunningVm {
    VmBuilder::new(test_guest())
        .memory("64M")
        .cmdline(cmdline)
        .arg("--api-socket")
        .arg(socket.display().to_string())
        .arg("--name")
        .arg("qmp-test")
        .spawn()
}

/// A counting VM past its second count, and a client that negotiated
/// capabilities on its API socket in `dir`.
fn counting_vm_and_client(dir: &std::path::Path) -> (RunningVm, RawQmp) {
    let socket = dir.join("qmp.sock");
    let vm = counting_vm(&socket);
    vm.expect_line("testguest: count 2", TIMEOUT);
    let (mut qmp, _) = RawQmp::connect(&socket);
    qmp.negotiate();
    (vm, qmp)
}

/// The highest `count N` the guest printed so far.
fn last_count(vm: &RunningVm) -> u32 {
    vm.console
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("testguest: count "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn stop_pauses_the_guest_and_cont_resumes_it() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("qmp.sock");
    let mut vm = counting_vm(&socket);
    vm.expect_line("testguest: count 3", TIMEOUT);
    let (mut qmp, greeting) = RawQmp::connect(&socket);
    assert!(
        greeting.starts_with(r#"{"QMP":{"capabilities":[]"#),
        "{greeting}"
    );
    qmp.negotiate();
    assert!(qmp
        .request(r#"{"execute": "query-status"}"#)
        .contains(r#""status":"running""#));
    assert_eq!(
        qmp.request(r#"{"execute": "stop", "id": 1}"#),
        r#"{"id":1,"return":{}}"#
    );
    qmp.wait_event("STOP");
    assert!(qmp
        .request(r#"{"execute": "query-status"}"#)
        .contains(r#""status":"paused""#));
    let paused_at = last_count(&vm);
    // A paused vCPU sleeps rather than checks back now and then.
    assert_threads_sleep(vm.child.id(), &["vcpu0"], Duration::from_secs(2));
    assert_eq!(last_count(&vm), paused_at, "the guest ran while paused");

    assert_eq!(qmp.request(r#"{"execute": "cont"}"#), r#"{"return":{}}"#);
    qmp.wait_event("RESUME");
    vm.expect_line(&format!("testguest: count {}", paused_at + 2), TIMEOUT);

    // A reset does not resume a stopped VM: the new guest waits for cont.
    assert_eq!(qmp.request(r#"{"execute": "stop"}"#), r#"{"return":{}}"#);
    qmp.wait_event("STOP");
    assert_eq!(
        qmp.request(r#"{"execute": "system_reset"}"#),
        r#"{"return":{}}"#
    );
    qmp.wait_event("RESET");
    assert!(qmp
        .request(r#"{"execute": "query-status"}"#)
        .contains(r#""status":"paused""#));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        vm.console.count("testguest: hello"),
        1,
        "the rebooted guest ran while paused"
    );
    assert_eq!(qmp.request(r#"{"execute": "cont"}"#), r#"{"return":{}}"#);
    qmp.wait_event("RESUME");
    vm.console
        .wait_for_nth("testguest: hello", 2, TIMEOUT)
        .expect("the guest boots again after cont");

    let cpus = qmp.request(r#"{"execute": "query-cpus-fast"}"#);
    assert!(cpus.contains(r#""cpu-index":0"#), "{cpus}");
    assert_eq!(
        qmp.request(r#"{"execute": "query-name"}"#),
        r#"{"return":{"name":"qmp-test"}}"#
    );
    assert_eq!(qmp.request(r#"{"execute": "quit"}"#), r#"{"return":{}}"#);
    let shutdown = qmp.wait_event("SHUTDOWN");
    assert!(
        shutdown.contains(r#""reason":"host-qmp-quit""#),
        "{shutdown}"
    );
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    assert!(!socket.exists(), "the API socket is removed at exit");
}

/// Resets while the guest does nothing but MMIO reads (`busymmio`) reboot
/// it cleanly, again and again. The VMM has KVM finish the last read before
/// the vCPU gets its new registers (the KVM API asks for it; finished after,
/// it would send the rebooted guest to the old instruction's end). This
/// host's KVM reboots cleanly without that too, so here the test guards the
/// path rather than shows the fix.
#[test]
fn resets_during_mmio_reads_reboot_cleanly() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("qmp.sock");
    let mut vm = guest_with_api(&socket, "count busymmio");
    vm.expect_line("testguest: count 2", TIMEOUT);
    let (mut qmp, _) = RawQmp::connect(&socket);
    qmp.negotiate();
    for boot in 2..=4 {
        // The reply comes first, then the RESET event, as in QEMU.
        qmp.send_raw(b"{\"execute\": \"system_reset\"}\n");
        assert_eq!(
            qmp.read_line().as_deref(),
            Some(r#"{"return":{}}"#),
            "boot {boot}: the first line after system_reset"
        );
        qmp.wait_event("RESET");
        vm.console
            .wait_for_line_after("testguest: hello", boot, "testguest: count 2", TIMEOUT)
            .unwrap_or_else(|e| panic!("boot {boot}: {e}:\n{}", vm.console.text()));
    }
    assert!(!vm.console.text().contains("FAIL"), "{}", vm.console.text());
    assert_eq!(qmp.request(r#"{"execute": "quit"}"#), r#"{"return":{}}"#);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

/// A `stop` right behind a `system_reset` (so it lands while the VM
/// reboots, or just after) pauses the rebooted guest: it is reported
/// paused, not shut down, and runs again only on `cont`.
#[test]
fn a_stop_during_a_reset_holds_the_rebooted_guest() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut vm, mut qmp) = counting_vm_and_client(dir.path());
    qmp.send_raw(b"{\"execute\": \"system_reset\"}\n{\"execute\": \"stop\"}\n");
    assert_eq!(qmp.reply(), r#"{"return":{}}"#, "system_reset");
    assert_eq!(qmp.reply(), r#"{"return":{}}"#, "stop");
    qmp.wait_event("STOP");
    let status = qmp.request(r#"{"execute": "query-status"}"#);
    assert!(status.contains(r#""status":"paused""#), "{status}");
    qmp.wait_event("RESET");
    // Output the old guest had queued in the console thread settles first.
    std::thread::sleep(Duration::from_millis(500));
    let held = vm.console.text();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm.console.text(), held, "the guest ran while paused");
    let counts = vm.console.count("testguest: count ");
    assert_eq!(qmp.request(r#"{"execute": "cont"}"#), r#"{"return":{}}"#);
    qmp.wait_event("RESUME");
    vm.console
        .wait_for_nth("testguest: count ", counts + 1, TIMEOUT)
        .expect("the rebooted guest runs after cont");
    vm.console
        .wait_for_line_after("testguest: hello", 2, "testguest: count 2", TIMEOUT)
        .expect("the rebooted guest counts");
    assert_eq!(qmp.request(r#"{"execute": "quit"}"#), r#"{"return":{}}"#);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn bad_input_gets_errors_and_the_vm_keeps_running() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("qmp.sock");
    let mut vm = counting_vm(&socket);
    let (mut qmp, _) = RawQmp::connect(&socket);
    let before = qmp.request(r#"{"execute": "query-status"}"#);
    assert!(before.contains(r#""class":"CommandNotFound""#), "{before}");
    qmp.negotiate();
    for (input, expected) in [
        (
            "this is not json",
            r#""class":"GenericError","desc":"JSON parse error"#,
        ),
        (
            "{\"execute\": }",
            r#""class":"GenericError","desc":"JSON parse error"#,
        ),
        // One error, not a second for the stray `}` (the next request
        // would read it as its reply), and the object inside does not run.
        (
            r#"{"a": [1}, "b": {"execute": "quit"}}"#,
            r#""desc":"JSON parse error, mismatched brackets""#,
        ),
        // A missing quote ends with its line: the next command is heard.
        (
            r#"{"execute": "query-status}"#,
            r#""desc":"JSON parse error, a string left open at the end of the line""#,
        ),
        // A command sent as a JSON string is one error, not a value.
        (
            r#""{\"execute\": \"quit\"}""#,
            r#""desc":"JSON parse error, expected a JSON object""#,
        ),
        (
            r#"{"execute": "stop", "execute": "quit"}"#,
            r#""desc":"JSON parse error, duplicate key 'execute'"#,
        ),
        (
            r#"{"execute": "launch-missiles"}"#,
            r#""class":"CommandNotFound""#,
        ),
        (r#"{"execute": 42, "id": 5}"#, r#""id":5"#),
        (
            r#"{"execute": "stop", "arguments": [1]}"#,
            "'arguments' must be an object",
        ),
        (
            r#"{"execute": "cont", "arguments": {"x": 1}}"#,
            "Parameter 'x' is unexpected",
        ),
        (
            r#"{"execute": "query-status", "bogus": 1}"#,
            "'bogus' is unexpected",
        ),
    ] {
        let reply = qmp.request(input);
        assert!(reply.contains(r#"{"error":"#), "{input} -> {reply}");
        assert!(reply.contains(expected), "{input} -> {reply}");
    }
    // A huge message closes that connection.
    let mut huge = b"{\"execute\": \"".to_vec();
    huge.resize(1 << 20, b'a');
    qmp.send_until_closed(&huge);
    let reply = qmp.read_line().unwrap_or_default();
    assert!(reply.contains("too long"), "{reply}");
    assert_eq!(qmp.read_line(), None, "the connection stays open");
    drop(qmp);

    // A client that leaves mid-message.
    let (mut half, _) = RawQmp::connect(&socket);
    // A wrong argument type is an error, and negotiation can be retried.
    let reply = half.request(r#"{"execute": "qmp_capabilities", "arguments": {"enable": 5}}"#);
    assert!(
        reply.contains(r#""desc":"Invalid parameter type for 'enable', expected: array""#),
        "{reply}"
    );
    half.negotiate();
    half.send_raw(br#"{"execute": "sto"#);
    drop(half);

    // The VM still runs and the next client is served.
    let (mut qmp, _) = RawQmp::connect(&socket);
    qmp.negotiate();
    assert!(qmp
        .request(r#"{"execute": "query-status"}"#)
        .contains(r#""status":"running""#));
    let at = last_count(&vm);
    vm.expect_line(&format!("testguest: count {}", at + 2), TIMEOUT);
    qmp.request(r#"{"execute": "quit"}"#);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn the_python_qemu_qmp_library_drives_the_vmm() {
    require_kvm();
    let python = repo_root().join("target/qmp-venv/bin/python3");
    assert!(
        python.is_file(),
        "{} is missing: scripts/install-deps.sh makes it (a venv with qemu.qmp)",
        python.display()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("qmp.sock");
    let mut vm = counting_vm(&socket);
    vm.expect_line("testguest: count 2", TIMEOUT);
    let out = Command::new(python)
        .arg(repo_root().join("tests/qmp_client.py"))
        .arg(&socket)
        .output()
        .expect("run tests/qmp_client.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qmp_client.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "status running",
        "status paused",
        "status running again",
        "event POWERDOWN",
        "event SHUTDOWN guest-shutdown",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "no {line:?} in:\n{stdout}"
        );
    }
    vm.expect_line("testguest: power button", TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn the_api_also_listens_on_loopback_tcp() {
    require_kvm();
    use std::io::{BufRead, BufReader, Write};
    let port = 20000 + (std::process::id() % 20000) as u16;
    let mut vm = VmBuilder::new(test_guest())
        .memory("64M")
        .cmdline("count")
        .arg("--api-tcp")
        .arg(format!("127.0.0.1:{port}"))
        .spawn();
    vm.expect_line("testguest: count 1", TIMEOUT);
    let stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line).expect("greeting");
    assert!(line.starts_with(r#"{"QMP":"#), "{line}");
    for (request, reply) in [
        (r#"{"execute": "qmp_capabilities"}"#, r#"{"return":{}}"#),
        (r#"{"execute": "quit"}"#, r#"{"return":{}}"#),
    ] {
        writeln!(writer, "{request}").expect("send");
        line.clear();
        reader.read_line(&mut line).expect("reply");
        assert_eq!(line.trim_end(), reply);
    }
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}

#[test]
fn a_remote_api_address_needs_an_explicit_flag() {
    let out = VmBuilder::new(test_guest())
        .arg("--api-tcp")
        .arg("0.0.0.0:4444")
        .command()
        .output()
        .expect("run vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(r#"--api-tcp "0.0.0.0:4444": not a loopback address"#),
        "{stderr}"
    );
}

#[test]
fn an_api_address_in_use_stops_the_vmm_before_the_guest_runs() {
    require_kvm();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address");
    let out = VmBuilder::new(test_guest())
        .cmdline("count")
        .arg("--api-tcp")
        .arg(addr.to_string())
        .command()
        .output()
        .expect("run vmm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("--api-tcp {addr}: cannot listen")),
        "{stderr}"
    );
    assert!(!stdout.contains("testguest"), "the guest ran:\n{stdout}");
}

/// A client that floods commands and never reads a reply holds up
/// nothing: the guest keeps running, and SIGTERM still ends the VMM at
/// once (the SHUTDOWN event cannot wait on that client).
#[test]
fn a_client_that_stops_reading_holds_up_nothing() {
    use std::io::Write;
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut vm, qmp) = counting_vm_and_client(dir.path());
    // Far more replies than the socket buffers and the VMM's queue hold;
    // written from a thread, whose writes block once the VMM stops reading.
    let mut writer = qmp.writer();
    let flood = std::thread::spawn(move || {
        let lines = br#"{"execute": "query-status"}"#.repeat(1000);
        for _ in 0..100 {
            if writer.write_all(&lines).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let at = last_count(&vm);
    vm.expect_line(&format!("testguest: count {}", at + 2), TIMEOUT);
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(143), "{}", vm.stderr.text());
    drop(qmp);
    flood.join().expect("the flood thread");
}

#[test]
fn system_reset_reboots_with_the_same_disk_backend() {
    use vmm_tests::backend::Backend;
    use vmm_tests::blk::{
        clear_pattern_area, expect_disk, guest_pattern, hex, make_image, read_pattern_area,
        sector0_marker,
    };
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let disk_socket = dir.path().join("disk.sock");
    let mut backend = Backend::vhost_blk(&disk_socket, &image, &[]);
    let socket = dir.path().join("qmp.sock");
    let mut vm = VmBuilder::new(test_guest())
        .memory("128M")
        .cmdline("count")
        .arg("--api-socket")
        .arg(socket.display().to_string())
        .arg("--disk")
        .arg(format!("socket={}", disk_socket.display()))
        .spawn();
    expect_disk(&vm, "00:01.0", 0, false);
    vm.expect_line("testguest: count 2", TIMEOUT);
    let (mut qmp, _) = RawQmp::connect(&socket);
    qmp.negotiate();
    let blocks = qmp.request(r#"{"execute": "query-block"}"#);
    assert!(blocks.contains(r#""device":"disk0""#), "{blocks}");
    assert!(
        blocks.contains(&format!(r#""socket":"{}""#, disk_socket.display())),
        "{blocks}"
    );
    let commands = qmp.request(r#"{"execute": "query-commands"}"#);
    for name in [
        "system_reset",
        "system_powerdown",
        "query-vhost-user",
        "stop",
    ] {
        assert!(
            commands.contains(&format!(r#"{{"name":"{name}"}}"#)),
            "{commands}"
        );
    }
    let version = qmp.request(r#"{"execute": "query-version"}"#);
    assert!(version.contains(r#""package":"vmm "#), "{version}");
    // What the first boot wrote goes, so the second boot's write must land.
    clear_pattern_area(&image);
    assert_eq!(
        qmp.request(r#"{"execute": "system_reset"}"#),
        r#"{"return":{}}"#
    );
    let reset = qmp.wait_event("RESET");
    assert!(
        reset.contains(r#""reason":"host-qmp-system-reset""#),
        "{reset}"
    );
    // The guest boots again and its disk checks pass again, on the same
    // backend process and connection: it reads the image's sector 0 into
    // a buffer it poisoned first, writes its pattern, and reads it back.
    let bdf = "testguest: blk 00:01.0";
    let sector0 = format!("{bdf} sector0 {}", hex(&sector0_marker(0)));
    for line in [sector0.as_str(), &format!("{bdf} write-read ok")] {
        if let Err(e) = vm.console.wait_for_nth(line, 2, TIMEOUT) {
            panic!("after the reset: {e}\n{}", vm.stderr.text());
        }
    }
    let irqs = vm
        .console
        .wait_for_nth(&format!("{bdf} irqs "), 2, TIMEOUT)
        .expect("the rebooted guest's interrupt count");
    let seen = vmm_tests::blk::DiskIrqs::parse(&irqs);
    assert!(seen.own > 0 && seen.elsewhere == 0, "{irqs}");
    assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
    assert_eq!(vm.console.text().matches("testguest: hello").count(), 2);
    assert!(
        backend.child.try_wait().expect("try_wait").is_none(),
        "the backend is still the same process"
    );
    // The one vCPU, on the thread the reboot started, not its predecessor.
    let cpus = qmp.request(r#"{"execute": "query-cpus-fast"}"#);
    assert_eq!(cpus.matches(r#""cpu-index""#).count(), 1, "{cpus}");
    vm.console
        .wait_for_line_after("testguest: hello", 2, "testguest: count 2", TIMEOUT)
        .expect("the rebooted guest counts");
    qmp.request(r#"{"execute": "system_powerdown"}"#);
    let shutdown = qmp.wait_event("SHUTDOWN");
    assert!(
        shutdown.contains(r#""reason":"guest-shutdown""#),
        "{shutdown}"
    );
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    vm.assert_no_guest_failure();
}

#[test]
fn a_backend_that_dies_is_a_device_backend_event() {
    use vmm_tests::backend::Backend;
    use vmm_tests::blk::{expect_disk, make_image};
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let disk_socket = dir.path().join("disk.sock");
    let backend = Backend::vhost_blk(&disk_socket, &image, &[]);
    let socket = dir.path().join("qmp.sock");
    let mut vm = VmBuilder::new(test_guest())
        .memory("128M")
        .cmdline("count")
        .arg("--api-socket")
        .arg(socket.display().to_string())
        .arg("--disk")
        .arg(format!("socket={}", disk_socket.display()))
        .spawn();
    expect_disk(&vm, "00:01.0", 0, false);
    let (mut qmp, _) = RawQmp::connect(&socket);
    qmp.negotiate();
    let devices = qmp.request(r#"{"execute": "query-vhost-user"}"#);
    assert!(devices.contains(r#""connected":true"#), "{devices}");
    assert!(devices.contains(r#""type":"virtio-blk""#), "{devices}");
    backend.signal(libc::SIGKILL);
    let event = qmp.wait_event("DEVICE_BACKEND");
    assert!(event.contains(r#""device":"disk0""#), "{event}");
    assert!(event.contains(r#""connected":false"#), "{event}");
    let devices = qmp.request(r#"{"execute": "query-vhost-user"}"#);
    assert!(devices.contains(r#""connected":false"#), "{devices}");
    // The VM runs on without its disk.
    let at = last_count(&vm);
    vm.expect_line(&format!("testguest: count {}", at + 2), TIMEOUT);
    qmp.request(r#"{"execute": "quit"}"#);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
}
