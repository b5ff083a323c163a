//! Shared helpers for the integration tests: where the binaries and guest
//! images are, a builder that spawns the `vmm` as a child process that is
//! killed on drop, and helpers that wait for serial output or exit.
//!
//! The tests need `scripts/test.sh` (or `cargo build -p vmm`,
//! `scripts/build-guest.sh`, `scripts/fetch-linux.sh`) to have run first;
//! a missing artifact fails the test with the path and the command to run.

pub mod backend;
pub mod blk;
pub mod net;
pub mod pty;
pub mod qmp;
pub mod vm;

use std::path::PathBuf;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn require_file(path: PathBuf, how: &str) -> PathBuf {
    assert!(
        path.is_file(),
        "{} is missing: run `{how}` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The `vmm` binary: `VMM_BIN`, or the workspace's debug build.
pub fn vmm_bin() -> PathBuf {
    let path = std::env::var_os("VMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/debug/vmm"));
    require_file(path, "cargo build -p vmm")
}

/// The project's test guest (PVH ELF).
pub fn test_guest() -> PathBuf {
    require_file(
        repo_root().join("target/guest/testguest.elf"),
        "scripts/build-guest.sh",
    )
}

/// Debian's cloud kernel as a bzImage.
pub fn linux_bzimage() -> PathBuf {
    require_file(
        repo_root().join("target/linux/bzImage"),
        "scripts/fetch-linux.sh",
    )
}

/// The same kernel's vmlinux (PVH entry).
pub fn linux_vmlinux() -> PathBuf {
    require_file(
        repo_root().join("target/linux/vmlinux"),
        "scripts/fetch-linux.sh",
    )
}

/// KVM tests fail (never skip) without a usable /dev/kvm.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this test boots a VM and needs /dev/kvm read-write: {e}");
    }
}
