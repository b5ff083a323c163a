//! QEMU as the vhost-user frontend with our vhost-blk as the backend: QEMU
//! (q35, KVM, guest RAM in a shared memfd) boots the test guest, whose
//! virtio-blk driver reads and writes through our backend.

use std::process::Command;

use vmm_tests::backend::Backend;
use vmm_tests::blk::{expect_disk, finish, guest_pattern, make_image, read_pattern_area};
use vmm_tests::vm::RunningVm;
use vmm_tests::{require_kvm, test_guest};

#[test]
fn qemu_boots_the_test_guest_on_our_vhost_blk() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.img");
    make_image(&image, 0);
    let socket = dir.path().join("disk.sock");
    let _backend = Backend::vhost_blk(&socket, &image, &["--serial", "from-qemu"]);

    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-M", "q35,memory-backend=mem", "-accel", "kvm"])
        .args(["-cpu", "max,-arch-capabilities", "-m", "256", "-smp", "1"])
        .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
        .arg("-chardev")
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args([
            "-device",
            "vhost-user-blk-pci,chardev=c0,num-queues=1,disable-legacy=on",
        ])
        .args([
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(test_guest())
        .args(["-append", ""]);
    let vm = RunningVm::spawn(qemu);
    let info = expect_disk(&vm, "00:01.0", 0, false);
    assert!(info.ends_with("serial from-qemu"), "{info}");
    finish(vm);
    assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
}
