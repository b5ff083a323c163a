//! Why the VM stopped, how that maps to the process exit status, and the
//! notifier through which vCPUs and devices report it to the main thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// The reasons a VM stops. The first one reported wins, except that the
/// user's stop (a signal, Ctrl-A x, `quit`) overrides a reset that is
/// still pending: a VM told to stop during a reboot stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off through ACPI (S5) or its documented port.
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, 0xCF9, i8042).
    Reset,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM could not run a vCPU (internal error, failed entry, unknown exit).
    KvmError,
    /// The user stopped the VM: SIGINT or Ctrl-A x on the console.
    Interrupted,
    /// SIGTERM.
    Terminated,
    /// The control API's `quit`.
    Quit,
    /// The control API's `system_reset`.
    ResetRequested,
}

impl VmExit {
    pub fn is_reset(self) -> bool {
        matches!(self, VmExit::Reset | VmExit::ResetRequested)
    }

    fn is_user_stop(self) -> bool {
        matches!(
            self,
            VmExit::Interrupted | VmExit::Terminated | VmExit::Quit
        )
    }

    /// The process exit status. Documented in README.md.
    pub fn exit_code(self) -> u8 {
        match self {
            VmExit::PowerOff => 0,
            VmExit::Reset => 3,
            VmExit::TripleFault => 4,
            VmExit::KvmError => 5,
            VmExit::Interrupted => 130,
            VmExit::Terminated => 143,
            VmExit::Quit => 0,
            VmExit::ResetRequested => 3,
        }
    }
}

/// Collects the first exit reason and wakes the main thread.
pub struct ExitNotifier {
    reason: Mutex<Option<VmExit>>,
    /// Set with the reason, read by vCPUs after every exit without locking.
    stopping: AtomicBool,
    event: EventFd,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitNotifier {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    pub fn notify(&self, reason: VmExit) {
        let mut slot = crate::bus::lock(&self.reason);
        let first = match *slot {
            None => true,
            Some(pending) => pending.is_reset() && reason.is_user_stop(),
        };
        if first {
            log::info!("VM stopping: {reason:?}");
            *slot = Some(reason);
            self.stopping.store(true, Ordering::Release);
        }
        if let Err(e) = self.event.write(1) {
            log::error!("cannot wake the main thread: {e}");
        }
    }

    /// True once any reason was reported: vCPUs stop entering the guest.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<VmExit> {
        *crate::bus::lock(&self.reason)
    }

    /// Forgets the reset after an in-place reboot, so that the next stop
    /// is reported again. A stop that came during the reboot stays: the
    /// restarted vCPUs see it at once and the main thread ends the VM.
    pub fn rearm(&self) {
        let mut slot = crate::bus::lock(&self.reason);
        if slot.is_some_and(|reason| !reason.is_reset()) {
            return;
        }
        *slot = None;
        self.stopping.store(false, Ordering::Release);
        let _ = self.event.read();
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let notifier = ExitNotifier::new().unwrap();
        notifier.notify(VmExit::PowerOff);
        notifier.notify(VmExit::KvmError);
        assert_eq!(notifier.reason(), Some(VmExit::PowerOff));
        assert_eq!(notifier.event().read().unwrap(), 2);
    }

    #[test]
    fn a_stop_during_a_reboot_survives_the_rearm() {
        let notifier = ExitNotifier::new().unwrap();
        notifier.notify(VmExit::ResetRequested);
        notifier.notify(VmExit::TripleFault);
        assert_eq!(notifier.reason(), Some(VmExit::ResetRequested));
        notifier.notify(VmExit::Quit);
        assert_eq!(notifier.reason(), Some(VmExit::Quit));
        notifier.rearm();
        assert_eq!(notifier.reason(), Some(VmExit::Quit));
        assert!(notifier.is_stopping());

        let notifier = ExitNotifier::new().unwrap();
        notifier.notify(VmExit::Reset);
        notifier.rearm();
        assert_eq!(notifier.reason(), None);
        assert!(!notifier.is_stopping());
    }

    #[test]
    fn exit_codes_are_distinct() {
        let all = [
            VmExit::PowerOff,
            VmExit::Reset,
            VmExit::TripleFault,
            VmExit::KvmError,
            VmExit::Interrupted,
            VmExit::Terminated,
        ];
        // Quit shares 0 with PowerOff (a clean, asked-for end), and a
        // requested reset 3 with a guest reset (--no-reboot).
        assert_eq!(VmExit::Quit.exit_code(), VmExit::PowerOff.exit_code());
        assert_eq!(
            VmExit::ResetRequested.exit_code(),
            VmExit::Reset.exit_code()
        );
        let mut codes: Vec<u8> = all.iter().map(|e| e.exit_code()).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }
}
