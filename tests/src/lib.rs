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

/// Tests of guest memory on huge pages fail (never skip) without `pages`
/// free 2 MiB huge pages.
pub fn require_free_hugepages(pages: u64) {
    let free = vmm_common::shared_memory::free_hugepages();
    assert!(
        free >= pages,
        "this test needs {pages} free 2 MiB huge pages and the host has {free}: \
         run scripts/hugepages.sh {pages} (scripts/test.sh does)"
    );
}

/// The page size (in KiB) of every mapping of the memfd named `name` in
/// process `pid`'s address space, with the mapping's size in KiB.
pub fn memfd_mappings(pid: u32, name: &str) -> Vec<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/smaps: {e}"));
    let needle = format!("/memfd:{name}");
    let mut found = Vec::new();
    let mut current: Option<(u64, u64)> = None;
    let kib = |line: &str| -> u64 {
        line.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    for line in smaps.lines() {
        let header = line
            .split_whitespace()
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'));
        if header {
            found.extend(current.take());
            if line.contains(&needle) {
                current = Some((0, 0));
            }
        } else if let Some((size, page)) = current.as_mut() {
            if line.starts_with("Size:") {
                *size = kib(line);
            } else if line.starts_with("KernelPageSize:") {
                *page = kib(line);
            }
        }
    }
    found.extend(current);
    found
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

/// The threads of process `pid` whose name starts with `prefix`, each
/// with its thread id and how many times it has been switched out so far
/// (voluntarily or not). Names are as the kernel keeps them: at most 15
/// bytes.
pub fn thread_switches(pid: u32, prefix: &str) -> Vec<(String, u32, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/task: {e}"));
    let mut found = Vec::new();
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let dir = task.path();
        // A thread that ended meanwhile has no files left: skip it.
        let Ok(name) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let name = name.trim_end().to_string();
        if !name.starts_with(prefix) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        let switches = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        found.push((name, tid, switches));
    }
    found.sort();
    found
}

/// Asserts that process `pid` has threads named each of `names` (cut to
/// the 15 bytes the kernel keeps) and that none of them, every thread of
/// each name, wakes during `quiet` (at most one switch, for the odd
/// spurious wake-up): threads that wait for an event rather than poll.
pub fn assert_threads_sleep(pid: u32, names: &[&str], quiet: std::time::Duration) {
    let sample = || -> Vec<(String, u32, u64)> {
        let mut all = Vec::new();
        for name in names {
            let kept = &name[..name.len().min(15)];
            let found = thread_switches(pid, kept);
            let named: Vec<_> = found.iter().filter(|(n, ..)| n == kept).cloned().collect();
            assert!(
                !named.is_empty(),
                "process {pid} has no thread {kept}: it has {found:?}"
            );
            all.extend(named);
        }
        all
    };
    let before = sample();
    std::thread::sleep(quiet);
    let after = sample();
    for (name, tid, was) in &before {
        // A thread that ended meanwhile did not wake to poll.
        let Some((.., now)) = after.iter().find(|(_, t, _)| t == tid) else {
            continue;
        };
        let woke = now.saturating_sub(*was);
        assert!(
            woke <= 1,
            "thread {name} ({tid}) of process {pid} woke {woke} times in {quiet:?} while nothing happened"
        );
    }
}
