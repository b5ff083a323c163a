//! DPDK's vhost PMD as the network backend of our vmm: dpdk-testpmd
//! forwards between its vhost-user port and a tap port it creates, and the
//! test guest pings the host across it, with DPDK as the socket server and
//! with the VMM as the server (DPDK `client=1`); OVS-DPDK's
//! dpdkvhostuserclient port carries it as well (scripts/vm-ovs.sh).

use std::time::Duration;

use vmm_tests::blk::{assert_kicks_bypassed_the_vmm, finish};
use vmm_tests::net::{
    guest_ip, mac_text, require_testpmd, test_mac, unique_name, Netns, Testpmd, HOST_IP,
};
use vmm_tests::vm::{RunningVm, VmBuilder};
use vmm_tests::{require_kvm, test_guest};

const TIMEOUT: Duration = Duration::from_secs(120);

fn vmm(net: String, cmdline: &str) -> RunningVm {
    VmBuilder::new(test_guest())
        .memory("128M")
        .cmdline(cmdline)
        .arg("--net")
        .arg(net)
        .spawn()
}

fn expect_ping(vm: &RunningVm, host: &str) {
    vm.expect_line(&format!("testguest: net arp {host} is-at "), TIMEOUT);
    vm.expect_line(&format!("testguest: net ping {host} 3/3 replies"), TIMEOUT);
}

#[test]
fn guest_pings_the_host_across_testpmd_as_server() {
    require_kvm();
    require_testpmd();
    let ns = Netns::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("dpdk.sock");
    let tap = unique_name("vd");
    let mut testpmd = Testpmd::start(&ns, &socket, &tap, false, 1);
    testpmd.wait_for_socket(&socket);
    ns.wait_for_link(&tap, TIMEOUT);
    ns.add_host_address(&tap);

    let mac = test_mac(10);
    let vm = vmm(
        format!("socket={},mac={}", socket.display(), mac_text(mac)),
        &format!("ip={} ping={HOST_IP}", guest_ip(1)),
    );
    let info = vm.expect_line("testguest: net 00:01.0 ", TIMEOUT);
    assert!(
        info.contains(&format!("mac {} link up", mac_text(mac))),
        "{info}"
    );
    expect_ping(&vm, HOST_IP);
    let log = finish(vm);
    assert_kicks_bypassed_the_vmm(&log, "net0");
}

#[test]
fn guest_pings_the_host_across_testpmd_as_client() {
    require_kvm();
    require_testpmd();
    let ns = Netns::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vmm.sock");
    let vm = vmm(
        format!("socket={},server=on", socket.display()),
        &format!("ip={} ping={HOST_IP}", guest_ip(1)),
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the vmm did not listen on {}: {}",
            socket.display(),
            vm.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A peer that connects and hangs up first (a probe of whether the
    // socket is live) is not taken for the backend.
    drop(std::os::unix::net::UnixStream::connect(&socket).expect("probe the socket"));
    let tap = unique_name("vd");
    let _testpmd = Testpmd::start(&ns, &socket, &tap, true, 1);
    ns.wait_for_link(&tap, TIMEOUT);
    ns.add_host_address(&tap);
    vm.expect_line("testguest: net 00:01.0 ", TIMEOUT);
    expect_ping(&vm, HOST_IP);
    finish(vm);
    assert!(!socket.exists(), "the vmm removes its socket at exit");
}

/// scripts/vm-dpdk.sh, both ways round: the guest's ping crosses DPDK and
/// nothing the script started is left behind.
#[test]
fn the_dpdk_launcher_pairs_a_vm_with_testpmd_and_cleans_up() {
    require_kvm();
    require_testpmd();
    for client in [false, true] {
        let netns = unique_name("vmmdl");
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(vmm_tests::repo_root().join("scripts/vm-dpdk.sh"))
            .env("VMM_BIN", vmm_tests::vmm_bin())
            .args(["--netns", &netns, "--kernel"])
            .arg(test_guest());
        if client {
            cmd.arg("--client");
        }
        let mut vm = RunningVm::spawn(cmd);
        expect_ping(&vm, HOST_IP);
        let status = vm.wait_exit(TIMEOUT);
        assert_eq!(status.code(), Some(0), "{}", vm.stderr.text());
        let namespaces = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        assert!(
            !String::from_utf8_lossy(&namespaces.stdout).contains(&netns),
            "the launcher left its namespace {netns}"
        );
    }
}

/// scripts/vm-ovs.sh: OVS-DPDK (a private ovs-vswitchd with DPDK, a netdev
/// bridge, a dpdkvhostuserclient port) carries the guest's ping to the
/// bridge's address, with the vmm as the socket server; nothing is left.
#[test]
fn ovs_dpdk_carries_the_guest_ping() {
    require_kvm();
    let mut vm = RunningVm::spawn({
        let mut cmd = std::process::Command::new("bash");
        cmd.arg(vmm_tests::repo_root().join("scripts/vm-ovs.sh"))
            .env("VMM_BIN", vmm_tests::vmm_bin())
            .arg("--kernel")
            .arg(test_guest());
        cmd
    });
    expect_ping(&vm, HOST_IP);
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.text();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let netns = stderr
        .split("netns ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_else(|| panic!("no namespace in:\n{stderr}"))
        .to_string();
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains(&netns),
        "vm-ovs.sh left its namespace {netns}"
    );
    // Its daemons ran with their pidfiles in the socket's directory.
    let work = stderr
        .split("with port vhu0 on ")
        .nth(1)
        .and_then(|s| s.lines().next())
        .and_then(|sock| std::path::Path::new(sock).parent())
        .unwrap_or_else(|| panic!("no socket path in:\n{stderr}"))
        .to_path_buf();
    assert!(!work.exists(), "vm-ovs.sh left {}", work.display());
    let work = work.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let path = entry.expect("/proc entry").path();
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&work),
            "{} survived vm-ovs.sh: {}",
            path.display(),
            String::from_utf8_lossy(&cmdline).replace('\0', " ")
        );
    }
}

/// With server=on, a DPDK that restarts (client=1 reconnects) gets the NIC
/// back while the guest runs: QMP reports the backend gone and back, and
/// the guest answers ARP through the new DPDK, so its rings were handed
/// over again where they stood.
#[test]
fn a_restarted_testpmd_reconnects_to_a_running_guest() {
    use vmm_tests::net::expect_arp_reply;
    use vmm_tests::qmp::RawQmp;
    require_kvm();
    require_testpmd();
    let ns = Netns::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vmm.sock");
    let api = dir.path().join("vm.qmp");
    let mac = test_mac(30);
    let mut vm = VmBuilder::new(test_guest())
        .memory("128M")
        .cmdline(&format!("ip={} respond=1000", guest_ip(1)))
        .arg("--net")
        .arg(format!(
            "socket={},server=on,mac={}",
            socket.display(),
            mac_text(mac)
        ))
        .arg("--api-socket")
        .arg(api.display().to_string())
        .spawn();
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no vmm socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let tap = unique_name("vd");
    let probe = |what: &str| {
        ns.wait_for_link(&tap, TIMEOUT);
        expect_arp_reply(&ns, &tap, mac, &guest_ip(1), what, TIMEOUT);
    };
    let first = Testpmd::start(&ns, &socket, &tap, true, 1);
    vm.expect_line("testguest: net 00:01.0 ", TIMEOUT);
    let (mut qmp, _) = RawQmp::connect(&api);
    qmp.negotiate();
    probe("through the first testpmd");

    drop(first);
    qmp.expect_backend(false);
    let _second = Testpmd::start(&ns, &socket, &tap, true, 1);
    qmp.expect_backend(true);
    let devices = qmp.request(r#"{"execute": "query-vhost-user"}"#);
    assert!(devices.contains(r#""connected":true"#), "{devices}");
    probe("through the restarted testpmd");

    qmp.request(r#"{"execute": "quit"}"#);
    assert_eq!(vm.wait_exit(TIMEOUT).code(), Some(0));
    vm.assert_no_guest_failure();
}
