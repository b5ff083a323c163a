//! Disk images for the block tests and the checks of what the test guest's
//! virtio-blk driver reports about them.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::backend::Backend;
use crate::pty::Pty;
use crate::qmp::RawQmp;
use crate::test_guest;
use crate::vm::{RunningVm, VmBuilder};

pub const IMAGE_SIZE: u64 = 16 << 20;
/// Where the guest writes its 4 KiB pattern.
pub const PATTERN_SECTOR: u64 = 8;
const TIMEOUT: Duration = Duration::from_secs(90);

/// The first 16 bytes of sector 0 written before boot, per disk index.
pub fn sector0_marker(index: u8) -> [u8; 16] {
    std::array::from_fn(|i| (i as u8).wrapping_mul(17) ^ 0xa5 ^ index)
}

/// A zeroed image of IMAGE_SIZE bytes with the sector-0 marker.
pub fn make_image(path: &Path, index: u8) {
    let mut bytes = vec![0u8; IMAGE_SIZE as usize];
    bytes[..16].copy_from_slice(&sector0_marker(index));
    std::fs::write(path, bytes).expect("write image");
}

/// What the guest writes at PATTERN_SECTOR of the disk it found `index`-th.
pub fn guest_pattern(index: u8) -> Vec<u8> {
    (0..4096usize)
        .map(|i| ((i * 7 + 0x5a) & 0xff) as u8 ^ index)
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The 4 KiB at PATTERN_SECTOR of an image file.
pub fn read_pattern_area(path: &Path) -> Vec<u8> {
    let image = std::fs::read(path).expect("read image");
    let start = (PATTERN_SECTOR * 512) as usize;
    image[start..start + 4096].to_vec()
}

/// Zeroes the 4 KiB at PATTERN_SECTOR of an image file, so that a guest
/// that writes its pattern again shows its write reached the image (and
/// not an earlier guest's). The backend may have the image open: its
/// reads and writes go through the same page cache.
pub fn clear_pattern_area(path: &Path) {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image");
    file.write_all_at(&[0u8; 4096], PATTERN_SECTOR * 512)
        .expect("clear the pattern area");
    file.sync_data().expect("sync image");
}

/// Waits for the guest's report on the disk at `bdf` (found `index`-th)
/// and checks it; returns the `blk ... capacity` line.
pub fn expect_disk(vm: &RunningVm, bdf: &str, index: u8, ro: bool) -> String {
    vm.expect_line(&format!("testguest: pci {bdf} 1af4:1042"), TIMEOUT);
    let info = vm.expect_line(&format!("testguest: blk {bdf} capacity "), TIMEOUT);
    assert!(
        info.contains(&format!(
            "capacity {} size {IMAGE_SIZE} ro {}",
            IMAGE_SIZE / 512,
            u8::from(ro)
        )),
        "{info}"
    );
    vm.expect_line(
        &format!(
            "testguest: blk {bdf} sector0 {}",
            hex(&sector0_marker(index))
        ),
        TIMEOUT,
    );
    if ro {
        vm.expect_line(
            &format!("testguest: blk {bdf} write rejected (ro)"),
            TIMEOUT,
        );
    } else {
        vm.expect_line(&format!("testguest: blk {bdf} flush ok"), TIMEOUT);
        // The guest drives up to two queues and reads back through the
        // last, so a second queue must carry data too.
        let queues: u32 = info
            .split(" queues ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no queue count in {info:?}"));
        let last = queues.clamp(1, 2) - 1;
        vm.expect_line(
            &format!("testguest: blk {bdf} write-read ok on queue {last}"),
            TIMEOUT,
        );
    }
    let irqs = vm.expect_line(&format!("testguest: blk {bdf} irqs "), TIMEOUT);
    let seen = DiskIrqs::parse(&irqs);
    assert!(seen.own > 0, "no completion interrupt arrived: {irqs}");
    // Each disk's queues are routed to a vector of their own.
    assert_eq!(seen.vector, 0x40 + index % 8, "{irqs}");
    assert_eq!(
        seen.elsewhere, 0,
        "interrupts on another disk's vector: {irqs}"
    );
    info
}

/// The guest's `blk BDF irqs N on vector V, M elsewhere` line: the
/// completion interrupts that came on the disk's own vector while it was
/// driven, and those that came on other queue vectors meanwhile.
#[derive(Debug, PartialEq, Eq)]
pub struct DiskIrqs {
    pub own: u64,
    pub vector: u8,
    pub elsewhere: u64,
}

impl DiskIrqs {
    /// Parses the line; panics, naming it, if it is not one.
    pub fn parse(line: &str) -> DiskIrqs {
        let parsed = (|| {
            let rest = line.split(" irqs ").nth(1)?;
            let (own, rest) = rest.split_once(" on vector 0x")?;
            let (vector, rest) = rest.split_once(", ")?;
            let elsewhere = rest.strip_suffix(" elsewhere")?;
            Some(DiskIrqs {
                own: own.parse().ok()?,
                vector: u8::from_str_radix(vector, 16).ok()?,
                elsewhere: elsewhere.parse().ok()?,
            })
        })();
        parsed.unwrap_or_else(|| panic!("not an interrupt report: {line:?}"))
    }
}

/// Once the guest (cmdline `diskresize`) watches disk 00:01.0 for a
/// resize: grows `image` by 1 MiB in place with a marker in its new last
/// sector, sends the backend SIGHUP, and waits for the guest to read the
/// new capacity and the marker. Returns the new size in bytes.
pub fn grow_while_the_guest_watches(vm: &RunningVm, backend: &Backend, image: &Path) -> u64 {
    vm.expect_line("testguest: blk 00:01.0 resize watch", TIMEOUT);
    let grown = IMAGE_SIZE + (1 << 20);
    let marker: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(29) ^ 0x3c).collect();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(image)
        .expect("open image");
    file.set_len(grown).expect("grow image");
    file.write_all_at(&marker, grown - 512)
        .expect("write marker");
    drop(file);
    backend.signal(libc::SIGHUP);
    vm.expect_line(
        &format!(
            "testguest: blk 00:01.0 config change: capacity {}",
            grown / 512
        ),
        TIMEOUT,
    );
    vm.expect_line(
        &format!("testguest: blk 00:01.0 last sector {}", hex(&marker)),
        TIMEOUT,
    );
    grown
}

/// Waits for power-off and a 0 exit; returns the VMM's stderr.
pub fn finish(mut vm: RunningVm) -> String {
    vm.expect_line("testguest: poweroff", TIMEOUT);
    let status = vm.wait_exit(TIMEOUT);
    vm.assert_no_guest_failure();
    let log = vm.stderr.text();
    assert_eq!(status.code(), Some(0), "stderr: {log}");
    log
}

/// Checks the VMM's exit summary line for `disk`: no notify write (queue
/// kick) reached the VMM.
pub fn assert_kicks_bypassed_the_vmm(log: &str, disk: &str) {
    let line = log
        .lines()
        .find(|l| l.starts_with(&format!("vmm: {disk} ")))
        .unwrap_or_else(|| panic!("no exit counters for {disk}: {log}"));
    assert!(
        line.ends_with(", 0 notify writes reached the VMM"),
        "kicks exited to the VMM: {line}"
    );
}

/// Boots the test guest on our vmm with two disks: a writable one with two
/// queues and a read-only one, each served by a backend `start` makes from
/// (socket, image, queues, writable). Checks what the guest saw and both
/// images afterwards.
pub fn two_disks_one_mq_one_read_only(
    start: impl Fn(&Path, &Path, u32, bool) -> crate::backend::Backend,
) {
    crate::require_kvm();
    let tmp = test_dir();
    let dir = tmp.path();
    let rw = dir.join("rw.img");
    let ro = dir.join("ro.img");
    make_image(&rw, 0);
    make_image(&ro, 1);
    let ro_before = std::fs::read(&ro).expect("read");
    let rw_socket = dir.join("rw.sock");
    let ro_socket = dir.join("ro.sock");
    let _rw = start(&rw_socket, &rw, 2, true);
    let _ro = start(&ro_socket, &ro, 1, false);

    let vm = crate::vm::VmBuilder::new(crate::test_guest())
        .arg("--disk")
        .arg(format!("socket={},num_queues=2", rw_socket.display()))
        .arg("--disk")
        .arg(format!("socket={}", ro_socket.display()))
        .spawn();
    let info = expect_disk(&vm, "00:01.0", 0, false);
    assert!(info.contains("queues 2 "), "{info}");
    expect_disk(&vm, "00:02.0", 1, true);
    let log = finish(vm);
    assert_kicks_bypassed_the_vmm(&log, "disk0");
    assert_kicks_bypassed_the_vmm(&log, "disk1");
    assert_eq!(read_pattern_area(&rw), guest_pattern(0));
    assert_eq!(
        std::fs::read(&ro).expect("read"),
        ro_before,
        "read-only image changed"
    );
}

/// A fresh directory under target/ for one test's images and sockets,
/// removed when dropped, whether the test passed or not.
fn test_dir() -> tempfile::TempDir {
    let parent = crate::repo_root().join("target/test-tmp");
    std::fs::create_dir_all(&parent).expect("create target/test-tmp");
    tempfile::Builder::new()
        .prefix("blk-")
        .tempdir_in(&parent)
        .expect("create test dir")
}

/// A loop block device over a file, detached on drop.
pub struct LoopDevice(pub PathBuf);

impl LoopDevice {
    pub fn new(file: &Path, sector_size: u32) -> LoopDevice {
        let out = Command::new("losetup")
            .args([
                "--find",
                "--show",
                "--sector-size",
                &sector_size.to_string(),
            ])
            .arg(file)
            .output()
            .expect("run losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup (needs root and /dev/loop-control): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        LoopDevice(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup")
            .arg("--detach")
            .arg(&self.0)
            .status();
    }
}

/// A disk backend that dies while the guest runs is taken back when it
/// restarts: the guest reads through the first backend and stops (with
/// `diskwait`); the backend (from `start(socket, image)`) is killed, QMP
/// reports it gone, a new one starts on the same socket, the VMM dials it
/// and QMP reports it back; the guest's writes and read-back then go
/// through the new backend, and land in the image. Returns the VMM's log
/// (at info level).
pub fn restarted_backend_takes_over(start: &dyn Fn(&Path, &Path) -> Backend) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk0.img");
    make_image(&image, 0);
    let socket = dir.path().join("disk0.sock");
    let api = dir.path().join("vm.qmp");
    let first = start(&socket, &image);
    let pty = Pty::open();
    let mut cmd = VmBuilder::new(test_guest())
        .cmdline("diskwait")
        .arg("--disk")
        .arg(format!("socket={}", socket.display()))
        .arg("--api-socket")
        .arg(api.display().to_string())
        .command();
    cmd.env("RUST_LOG", "info");
    let vm = pty.spawn(cmd);
    vm.expect_line("testguest: blk 00:01.0 waiting", TIMEOUT);
    let (mut qmp, _) = RawQmp::connect(&api);
    qmp.negotiate();

    drop(first);
    // A missing event fails with what the VMM and the new backend logged.
    let expect_backend = |qmp: &mut RawQmp, connected: bool, backend: Option<&Backend>| {
        let seen = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            qmp.expect_backend(connected)
        }));
        if let Err(e) = seen {
            let why = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "{why} (connected: {connected})\nvmm stderr:\n{}\nnew backend's log:\n{}",
                vm.stderr.text(),
                backend.map(|b| b.log.text()).unwrap_or_default()
            );
        }
    };
    expect_backend(&mut qmp, false, None);
    let second = start(&socket, &image);
    expect_backend(&mut qmp, true, Some(&second));

    let mut master = pty.master.try_clone().expect("dup master");
    master.write_all(b"\r").expect("wake the guest");
    vm.expect_line("testguest: blk 00:01.0 write-read ok", TIMEOUT);
    let log = finish(vm);
    assert!(
        log.contains("disk0: the vhost-user backend reconnected"),
        "{log}"
    );
    assert_eq!(read_pattern_area(&image), guest_pattern(0), "image bytes");
    log
}

#[cfg(test)]
mod tests {
    use super::DiskIrqs;

    #[test]
    fn the_interrupt_report_is_read_whole() {
        assert_eq!(
            DiskIrqs::parse("testguest: blk 00:02.0 irqs 5 on vector 0x41, 0 elsewhere"),
            DiskIrqs {
                own: 5,
                vector: 0x41,
                elsewhere: 0
            }
        );
    }

    #[test]
    #[should_panic(expected = "not an interrupt report")]
    fn the_old_report_is_not_taken_for_one() {
        DiskIrqs::parse("testguest: blk 00:02.0 irqs 5");
    }
}
