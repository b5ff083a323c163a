//! A pseudo-terminal for console tests: the vmm gets the slave side as its
//! controlling terminal, the test reads and writes the master side.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use crate::vm::{Output, RunningVm};

pub struct Pty {
    pub master: File,
    pub slave: OwnedFd,
}

impl Pty {
    pub fn open() -> Pty {
        let mut master: libc::c_int = -1;
        let mut slave: libc::c_int = -1;
        // SAFETY: valid out-pointers; null name, termios and winsize are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: openpty returned two fresh descriptors that we now own.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        Pty { master, slave }
    }

    /// The slave's terminal attributes, compared before and after a run.
    pub fn attributes(&self) -> libc::termios {
        // SAFETY: an all-zero termios is valid storage for tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open and `t` is writable.
        let rc = unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut t) };
        assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
        t
    }

    /// Spawns `cmd` in a new session with the slave as stdin, stdout and
    /// controlling terminal; stderr stays a pipe.
    pub fn spawn(&self, mut cmd: Command) -> RunningVm {
        let slave = self.slave.as_raw_fd();
        cmd.stdin(Stdio::from(self.slave.try_clone().expect("dup slave")))
            .stdout(Stdio::from(self.slave.try_clone().expect("dup slave")))
            .stderr(Stdio::piped());
        // SAFETY: the closure only calls async-signal-safe functions (setsid, ioctl).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(slave, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("cannot start the vmm on the pty");
        let console = Output::capture(self.master.try_clone().expect("dup master"));
        let stderr = Output::capture(child.stderr.take().expect("piped stderr"));
        RunningVm {
            child,
            console,
            stderr,
        }
    }
}

/// Whether two terminal settings match in everything a raw mode changes.
pub fn same_termios(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}
