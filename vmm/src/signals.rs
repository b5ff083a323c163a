//! Stop signals: SIGINT/SIGTERM/SIGHUP are blocked in every thread and
//! read from a signalfd by the main thread, next to the VM's exit event.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::exit::{ExitNotifier, VmExit};

pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks the stop signals (threads started later inherit the mask)
    /// and opens a signalfd for them.
    pub fn block_stop_signals() -> std::io::Result<Self> {
        // SAFETY: an all-zero sigset is valid storage for sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is valid; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGHUP);
        }
        // SAFETY: `set` is initialised; a null old-set pointer is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is initialised; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(SignalFd { fd })
    }

    /// Waits until the VM reports an exit or a stop signal arrives.
    pub fn wait_for_exit(&self, exit: &ExitNotifier) -> std::io::Result<VmExit> {
        loop {
            if let Some(reason) = exit.reason() {
                return Ok(reason);
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: exit.event().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd structs.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                if let Some(reason) = self.read_signal() {
                    exit.notify(reason);
                }
            }
            if fds[1].revents & libc::POLLIN != 0 {
                // The counter is only a wake-up; the reason is kept apart.
                let _ = exit.event().read();
            }
        }
    }
}

impl SignalFd {
    /// A stop signal that came before anything waited for one (while the
    /// VM was being built), taken; None if none is pending.
    pub fn take_pending(&self) -> std::io::Result<Option<VmExit>> {
        let mut fd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fd` is one valid pollfd; a zero timeout does not block.
        let rc = unsafe { libc::poll(&mut fd, 1, 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(if fd.revents & libc::POLLIN != 0 {
            self.read_signal()
        } else {
            None
        })
    }

    /// Reads one signal from the signalfd (which is readable): SIGINT is
    /// an interrupt, SIGTERM and SIGHUP a termination.
    fn read_signal(&self) -> Option<VmExit> {
        // SAFETY: an all-zero siginfo is valid storage for read().
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is writable and exactly `size` bytes long.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n != size as isize {
            return None;
        }
        log::info!("signal {} received", info.ssi_signo);
        Some(if info.ssi_signo == libc::SIGINT as u32 {
            VmExit::Interrupted
        } else {
            VmExit::Terminated
        })
    }
}

impl AsFd for SignalFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
