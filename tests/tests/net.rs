//! The test guest's virtio-net driver on our vmm with our vhost-net
//! backend on a tap: it pings the host, two guests on a bridge exchange
//! frames, two queue pairs are negotiated, a restarted backend takes over
//! a running guest's NIC, and the guest sees the link follow its backend. Each test has its own network namespace
//! (see `vmm_tests::net`).

use std::time::Duration;

use vmm_tests::backend::Backend;
use vmm_tests::blk::{assert_kicks_bypassed_the_vmm, finish};
use vmm_tests::net::{expect_arp_reply, guest_ip, mac_text, test_mac, Capture, Netns, HOST_IP};
use vmm_tests::qmp::RawQmp;
use vmm_tests::vm::{RunningVm, VmBuilder};
use vmm_tests::{require_kvm, test_guest};

const TIMEOUT: Duration = Duration::from_secs(120);

/// Boots the test guest with one NIC on `socket` and the given cmdline.
fn boot(socket: &std::path::Path, mac: [u8; 6], pairs: u32, cmdline: &str) -> RunningVm {
    VmBuilder::new(test_guest())
        .memory("128M")
        .cmdline(cmdline)
        .arg("--net")
        .arg(format!(
            "socket={},mac={},num_queues={pairs}",
            socket.display(),
            mac_text(mac)
        ))
        .spawn()
}

/// Waits for the guest's three echo replies from `host`.
fn expect_ping(vm: &RunningVm, host: &str) {
    vm.expect_line(&format!("testguest: net arp {host} is-at "), TIMEOUT);
    for seq in 1..=3 {
        vm.expect_line(
            &format!("testguest: net ping {host} seq {seq} reply ok"),
            TIMEOUT,
        );
    }
    vm.expect_line(&format!("testguest: net ping {host} 3/3 replies"), TIMEOUT);
}

#[test]
fn guest_pings_the_host_through_vhost_net() {
    require_kvm();
    let ns = Netns::new();
    let tap = ns.tap_with_address(false);
    let capture = Capture::start(&ns, &tap);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("net.sock");
    let _backend = Backend::vhost_net(&ns, &socket, &tap, 1);
    let mac = test_mac(1);
    let guest = guest_ip(1);

    let vm = boot(&socket, mac, 1, &format!("ip={guest} ping={HOST_IP}"));
    let info = vm.expect_line("testguest: net 00:01.0 ", TIMEOUT);
    assert_eq!(
        info,
        format!(
            "testguest: net 00:01.0 mac {} link up pairs 1 mtu 1500",
            mac_text(mac)
        )
    );
    expect_ping(&vm, HOST_IP);
    let log = finish(vm);
    assert_kicks_bypassed_the_vmm(&log, "net0");
    // The host saw the guest's echo requests on the tap.
    let seen = capture.echo_requests(&guest, HOST_IP);
    assert!(seen >= 3, "the capture on {tap} saw {seen} echo requests");
}

/// A vhost-net that dies while the guest runs is taken back when it
/// restarts on the same socket: the VMM dials it again, QMP reports the
/// backend gone and back, and the guest answers ARP through the new
/// backend, so its rings were handed over where they stood.
#[test]
fn a_restarted_vhost_net_takes_over_the_running_guest() {
    require_kvm();
    let ns = Netns::new();
    let tap = ns.tap_with_address(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("net.sock");
    let api = dir.path().join("vm.qmp");
    let mac = test_mac(31);
    let guest = guest_ip(1);
    let first = Backend::vhost_net(&ns, &socket, &tap, 1);
    let mut vm = VmBuilder::new(test_guest())
        .memory("128M")
        .cmdline(&format!("ip={guest} respond=1000"))
        .arg("--net")
        .arg(format!("socket={},mac={}", socket.display(), mac_text(mac)))
        .arg("--api-socket")
        .arg(api.display().to_string())
        .spawn();
    let probe = |what: &str| expect_arp_reply(&ns, &tap, mac, &guest, what, TIMEOUT);
    vm.expect_line("testguest: net 00:01.0 ", TIMEOUT);
    let (mut qmp, _) = RawQmp::connect(&api);
    qmp.negotiate();
    probe("through the first vhost-net");

    drop(first);
    qmp.expect_backend(false);
    let _second = Backend::vhost_net(&ns, &socket, &tap, 1);
    qmp.expect_backend(true);
    probe("through the restarted vhost-net");

    qmp.request(r#"{"execute": "quit"}"#);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    vm.assert_no_guest_failure();
    let log = vm.stderr.text();
    assert!(
        log.contains("net0: the vhost-user backend reconnected"),
        "{log}"
    );
}

/// The NIC's link follows its backend, as in QEMU: when vhost-net dies the
/// guest gets a configuration-change interrupt and reads the link down;
/// when a new vhost-net takes over, another one, and the link is up.
#[test]
fn the_guest_sees_the_link_go_down_and_up_with_its_backend() {
    require_kvm();
    let ns = Netns::new();
    let tap = ns.tap_with_address(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("net.sock");
    let first = Backend::vhost_net(&ns, &socket, &tap, 1);
    let mut vm = boot(&socket, test_mac(32), 1, "linkwatch");
    vm.expect_line("testguest: net 00:01.0 ", TIMEOUT);
    vm.expect_line("testguest: net link watch", TIMEOUT);

    drop(first);
    let down = "testguest: net config change: link down";
    let up = "testguest: net config change: link up";
    vm.expect_line(down, TIMEOUT);
    assert_eq!(
        vm.console.count(up),
        0,
        "the link came up with no backend:\n{}",
        vm.console.text()
    );
    let _second = Backend::vhost_net(&ns, &socket, &tap, 1);
    vm.expect_line(up, TIMEOUT);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    vm.assert_no_guest_failure();
    let text = vm.console.text();
    let changes: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| l.contains("net config change"))
        .collect();
    assert_eq!(changes, [down, up], "{text}");
}

#[test]
fn two_queue_pairs_are_negotiated() {
    require_kvm();
    let ns = Netns::new();
    let tap = ns.tap_with_address(true);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("net.sock");
    let _backend = Backend::vhost_net(&ns, &socket, &tap, 2);
    let vm = boot(
        &socket,
        test_mac(2),
        2,
        &format!("ip={} ping={HOST_IP}", guest_ip(1)),
    );
    let info = vm.expect_line("testguest: net 00:01.0 ", TIMEOUT);
    assert!(info.ends_with(" link up pairs 2 mtu 1500"), "{info}");
    vm.expect_line("testguest: net mq pairs 2 set ok", TIMEOUT);
    expect_ping(&vm, HOST_IP);
    // The guest sends its requests on each pair in turn: the second
    // pair's transmit ring carried one out, and its reply came back.
    vm.expect_line(
        &format!("testguest: net ping {HOST_IP} seq 2 reply ok on pair 1"),
        TIMEOUT,
    );
    // A multi-queue tap sends a flow's frames to the queue picked by where
    // the flow last came from (6.18 picks the other of two queues, as a
    // bare tap shows), and the backend reads each pair's own queue: the
    // replies to requests sent on alternate pairs came back on both
    // pairs' receive rings.
    vm.expect_line(
        &format!("testguest: net ping {HOST_IP} 3/3 replies"),
        TIMEOUT,
    );
    let text = vm.console.text();
    let back_on: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.contains(&format!("testguest: net ping {HOST_IP} seq ")))
        .filter_map(|l| l.trim_end().rsplit(' ').next())
        .collect();
    assert_eq!(
        back_on,
        ["0", "1"].into(),
        "the replies did not come back on both pairs:\n{text}"
    );
    finish(vm);
}

#[test]
fn two_guests_on_a_bridge_exchange_frames() {
    require_kvm();
    let ns = Netns::new();
    let bridge = ns.bridge();
    let taps = [ns.tap(false), ns.tap(false)];
    for tap in &taps {
        ns.enslave(tap, &bridge);
    }
    // The responder's tap sees what the bridge forwards to it and what it
    // sends back (a capture on the bridge device itself sees only frames
    // for the host).
    let capture = Capture::start(&ns, &taps[1]);
    let dir = tempfile::tempdir().expect("tempdir");
    let sockets = [dir.path().join("a.sock"), dir.path().join("b.sock")];
    let _backends: Vec<_> = sockets
        .iter()
        .zip(&taps)
        .map(|(socket, tap)| Backend::vhost_net(&ns, socket, tap, 1))
        .collect();
    let (a, b) = (guest_ip(1), guest_ip(2));
    let responder = boot(&sockets[1], test_mac(4), 1, &format!("ip={b} respond=3"));
    responder.expect_line("testguest: net 00:01.0 ", TIMEOUT);
    let pinger = boot(&sockets[0], test_mac(3), 1, &format!("ip={a} ping={b}"));
    expect_ping(&pinger, &b);
    for seq in 1..=3 {
        responder.expect_line(
            &format!("testguest: net answered echo seq {seq} from {a}"),
            TIMEOUT,
        );
    }
    responder.expect_line("testguest: net responder done 3", TIMEOUT);
    finish(pinger);
    finish(responder);
    // The frames crossed the host's bridge.
    assert!(capture.echo_requests(&a, &b) >= 3);
    assert!(
        capture.frames_from(test_mac(4)) >= 4,
        "ARP and echo replies"
    );
}

/// A frontend that shrinks its memory file after vhost-net mapped it (past
/// the ring it then kicks) loses its connection; the backend, which would
/// have died of SIGBUS reading the ring, serves the next frontend (which
/// does the same, and is dropped the same way). No VM: the test frontend
/// drives the socket.
#[test]
fn memory_shrunk_under_vhost_net_drops_the_frontend_not_the_backend() {
    let ns = Netns::new();
    let tap = ns.tap(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("net.sock");
    let mut backend = Backend::vhost_net(&ns, &socket, &tap, 1);
    for round in 1..=2 {
        let closed = vhost_test_frontend::malformed::ring_in_memory_shrunk_after_the_table(
            &socket,
            Duration::from_secs(10),
        )
        .expect("send the memory table");
        assert!(
            closed,
            "round {round}: the backend kept the connection open"
        );
        backend.dropped_a_frontend_whose_memory_shrank(round);
    }
}
