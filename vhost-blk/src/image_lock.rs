//! The image's lock, in QEMU's own scheme, so that `vhost-blk`, QEMU,
//! qemu-storage-daemon and qemu-img see one another: open file description
//! (OFD) read locks on single bytes, one per block-layer permission. A
//! process holding permission `i` locks byte `100 + i`; one that refuses to
//! share it with others locks byte `200 + i`. Taking a permission needs
//! byte `200 + i` free of others' locks, refusing one needs byte `100 + i`
//! free. The locks go with the open file, so a process that dies (or
//! closes the image) lets go of them.
//!
//! A backend holds "consistent read", and "write" when writable, and
//! refuses to share "write" either way: a second writer is refused, and so
//! is a writer while a read-only backend serves the image, as with QEMU's
//! `-drive` without `share-rw=on`. "resize" stays shared: growing an image
//! in place is how a disk is resized (see the README).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Byte of the first permission's "held" lock.
const PERM_BASE: i64 = 100;
/// Byte of the first permission's "not shared" lock.
const SHARED_BASE: i64 = 200;

/// QEMU's block-layer permissions this backend locks (bit numbers of
/// `BLK_PERM_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    ConsistentRead = 0,
    Write = 1,
}

impl Permission {
    /// What the permission is for, as in "open for ...".
    fn purpose(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "reading",
            Permission::Write => "writing",
        }
    }
}

/// Why the image cannot be taken: someone else refuses to share a
/// permission this backend needs, or holds one this backend refuses to
/// share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// Another process refuses to share it.
    NotShared(Permission),
    /// Another process holds it.
    InUse(Permission),
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Conflict::NotShared(p) => write!(
                f,
                "another process has it open and does not share {}",
                p.purpose()
            ),
            Conflict::InUse(p) => write!(f, "another process has it open for {}", p.purpose()),
        }
    }
}

#[derive(Debug)]
pub enum LockError {
    Conflict(Conflict),
    Io(io::Error),
}

/// Takes the image's locks for a backend that reads it, and writes it
/// when `writable`; checks nobody else's locks conflict. The locks are
/// taken before the check, as QEMU does, so two processes racing for one
/// image cannot both succeed; on a conflict they are let go again, so a
/// process racing this one (or trying while this one waits to retry)
/// does not see them.
pub fn lock(file: &File, writable: bool) -> Result<(), LockError> {
    let held: &[Permission] = if writable {
        &[Permission::ConsistentRead, Permission::Write]
    } else {
        &[Permission::ConsistentRead]
    };
    let unshared = [Permission::Write];
    let bytes: Vec<i64> = held
        .iter()
        .map(|&p| PERM_BASE + p as i64)
        .chain(unshared.iter().map(|&p| SHARED_BASE + p as i64))
        .collect();
    let outcome = take_and_check(file, held, &unshared, &bytes);
    if outcome.is_err() {
        for &byte in &bytes {
            // Best effort: the locks go with the file when it is closed.
            let _ = set(file, libc::F_UNLCK, byte);
        }
    }
    outcome
}

fn take_and_check(
    file: &File,
    held: &[Permission],
    unshared: &[Permission],
    bytes: &[i64],
) -> Result<(), LockError> {
    for &byte in bytes {
        set(file, libc::F_RDLCK, byte).map_err(LockError::Io)?;
    }
    for &p in held {
        if locked_by_others(file, SHARED_BASE + p as i64).map_err(LockError::Io)? {
            return Err(LockError::Conflict(Conflict::NotShared(p)));
        }
    }
    for &p in unshared {
        if locked_by_others(file, PERM_BASE + p as i64).map_err(LockError::Io)? {
            return Err(LockError::Conflict(Conflict::InUse(p)));
        }
    }
    Ok(())
}

fn one_byte(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: flock is a plain C struct; all zeroes is a valid value (and
    // l_pid must be 0 for OFD locks).
    let mut range: libc::flock = unsafe { std::mem::zeroed() };
    range.l_type = kind as libc::c_short;
    range.l_whence = libc::SEEK_SET as libc::c_short;
    range.l_start = byte;
    range.l_len = 1;
    range
}

/// A read lock on `byte` (`kind` F_RDLCK), owned by the open file, or
/// none (F_UNLCK).
fn set(file: &File, kind: libc::c_int, byte: i64) -> io::Result<()> {
    let range = one_byte(kind, byte);
    // SAFETY: F_OFD_SETLK reads the flock struct, which lives across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &range) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file holds a lock on `byte` (a write lock there
/// would conflict with any lock; this file's own do not count).
fn locked_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut range = one_byte(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and rewrites the flock struct, which lives
    // across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut range) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(range.l_type != libc::F_UNLCK as libc::c_short)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).expect("image");
        (dir, path)
    }

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .expect("open")
    }

    fn conflict(result: Result<(), LockError>) -> Option<Conflict> {
        match result {
            Ok(()) => None,
            Err(LockError::Conflict(c)) => Some(c),
            Err(LockError::Io(e)) => panic!("lock: {e}"),
        }
    }

    #[test]
    fn one_writer_or_many_readers() {
        let (_dir, path) = image();
        let (a, b) = (open(&path), open(&path));
        assert_eq!(conflict(lock(&a, false)), None);
        assert_eq!(conflict(lock(&b, false)), None, "readers share");
        let c = open(&path);
        assert_eq!(
            conflict(lock(&c, true)),
            Some(Conflict::NotShared(Permission::Write)),
            "readers refuse a writer"
        );
        assert!(
            !locked_by_others(&a, PERM_BASE + 1).expect("test 101"),
            "a refused writer keeps no lock"
        );
        drop((a, b, c));
        let (a, b) = (open(&path), open(&path));
        assert_eq!(conflict(lock(&a, true)), None, "closing lets go");
        assert_eq!(
            conflict(lock(&b, false)),
            Some(Conflict::InUse(Permission::Write)),
            "a writer refuses readers that refuse it"
        );
    }

    /// The bytes are QEMU's: a writer there (a qemu-storage-daemon export
    /// holds "write" and shares it) keeps this backend out, and QEMU's
    /// own check for "write" (a write-lock test on byte 201) sees this
    /// backend.
    #[test]
    fn qemu_sees_the_locks_and_they_see_qemu() {
        let (_dir, path) = image();
        let qemu = open(&path);
        set(&qemu, libc::F_RDLCK, PERM_BASE).expect("lock 100");
        set(&qemu, libc::F_RDLCK, PERM_BASE + 1).expect("lock 101");
        let ours = open(&path);
        assert_eq!(
            conflict(lock(&ours, false)),
            Some(Conflict::InUse(Permission::Write))
        );
        drop((qemu, ours));

        let ours = open(&path);
        assert_eq!(conflict(lock(&ours, true)), None);
        let qemu = open(&path);
        assert!(locked_by_others(&qemu, SHARED_BASE + 1).expect("test 201"));
        assert!(locked_by_others(&qemu, PERM_BASE + 1).expect("test 101"));
        assert!(!locked_by_others(&qemu, SHARED_BASE).expect("test 200"));
        assert!(!locked_by_others(&qemu, SHARED_BASE + 3).expect("test 203: resize shared"));
    }
}
