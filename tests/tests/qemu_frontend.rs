//! QEMU as the vhost-user frontend with our backends: QEMU (q35, KVM, guest
//! RAM in a shared memfd) boots the test guest, whose virtio-blk driver
//! reads and writes through our vhost-blk (and sees the disk grow when
//! vhost-blk says so) and whose virtio-net driver pings the host through
//! our vhost-net. QEMU gives the guest two processors, and the guest's
//! check that every processor runs its code passes on QEMU too.

use std::process::Command;
use std::time::Duration;

use vmm_tests::backend::Backend;
use vmm_tests::blk::{
    expect_disk, finish, grow_while_the_guest_watches, guest_pattern, make_image, read_pattern_area,
};
use vmm_tests::net::{guest_ip, mac_text, test_mac, Capture, Netns, HOST_IP};
use vmm_tests::vm::RunningVm;
use vmm_tests::{require_kvm, test_guest};

/// q35 on KVM with guest RAM in a shared memfd, booting the test guest.
fn qemu_with_shared_memory() -> Command {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", "q35,memory-backend=mem", "-accel", "kvm"])
        .args(["-cpu", "max,-arch-capabilities", "-m", "256", "-smp", "2"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .args([
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(test_guest());
    qemu
}

#[test]
fn qemu_guest_pings_the_host_through_our_vhost_net() {
    require_kvm();
    let ns = Netns::new();
    let tap = ns.tap_with_address(false);
    let capture = Capture::start(&ns, &tap);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("net.sock");
    let _backend = Backend::vhost_net(&ns, &socket, &tap, 1);
    let mac = test_mac(20);
    let guest = guest_ip(1);

    let mut qemu = qemu_with_shared_memory();
    qemu.arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args(["-netdev", "vhost-user,id=n0,chardev=c0"])
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,disable-legacy=on,mac={}",
            mac_text(mac)
        ))
        .arg("-append")
        .arg(format!("ip={guest} ping={HOST_IP}"));
    let vm = RunningVm::spawn(qemu);
    let info = vm.expect_line("testguest: net 00:01.0 ", Duration::from_secs(120));
    // QEMU reports the link up only once its main loop has handled the
    // backend connection, which can come after the guest's first look.
    assert!(
        info.contains(&format!("mac {} link ", mac_text(mac))),
        "{info}"
    );
    vm.expect_line(
        &format!("testguest: net ping {HOST_IP} 3/3 replies"),
        Duration::from_secs(120),
    );
    finish(vm);
    assert!(capture.echo_requests(&guest, HOST_IP) >= 3);
}

#[test]
fn qemu_boots_the_test_guest_on_our_vhost_blk() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let socket = dir.path().join("disk.sock");
    let backend = Backend::vhost_blk(&socket, &image, &["--serial", "from-qemu"]);

    let mut qemu = qemu_with_shared_memory();
    qemu.arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args([
            "-device",
            "vhost-user-blk-pci,chardev=c0,num-queues=1,disable-legacy=on",
        ])
        .args(["-append", "diskresize"]);
    let vm = RunningVm::spawn(qemu);
    // The guest's processor check holds on a VMM that is not ours.
    let running = vm.expect_line("testguest: cpus running ", Duration::from_secs(120));
    assert_eq!(running, "testguest: cpus running 2");
    let info = expect_disk(&vm, "00:01.0", 0, false);
    assert!(info.ends_with("serial from-qemu"), "{info}");
    // QEMU takes vhost-blk's word that the disk grew to the guest.
    grow_while_the_guest_watches(&vm, &backend, &image);
    finish(vm);
    assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
}
