//! Disk images for the block tests and the checks of what the test guest's
//! virtio-blk driver reports about them.

use std::path::Path;
use std::time::Duration;

use crate::vm::RunningVm;

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
        vm.expect_line(&format!("testguest: blk {bdf} write-read ok"), TIMEOUT);
    }
    let irqs = vm.expect_line(&format!("testguest: blk {bdf} irqs "), TIMEOUT);
    let count: u64 = irqs
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(count > 0, "no completion interrupt arrived: {irqs}");
    info
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
