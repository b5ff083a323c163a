//! vCPUs: creation and initial state, and the thread that runs each one.
//!
//! A vCPU thread loops on KVM_RUN, dispatching port I/O to the bus. It
//! stops when its `stop` flag is set; the main thread sets the flag and
//! kicks the thread out of KVM_RUN with a real-time signal.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86_64::{cpuid, regs};
use crate::bus::{MmioBus, PioBus};
use crate::exit::{ExitNotifier, VmExit};
use crate::vstate::memory::GuestMemory;
use crate::vstate::run_control::RunControl;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("cannot set the CPUID of vCPU {0}")]
    Cpuid(u8, #[source] kvm_ioctls::Error),
    #[error("cannot set up vCPU {0}")]
    Regs(u8, #[source] regs::RegsError),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot set the run state of vCPU {0}")]
    MpState(u8, #[source] kvm_ioctls::Error),
    #[error("cannot start the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes KVM_RUN return EINTR.
}

/// Installs the kick handler; call once before starting vCPU threads.
pub fn init_kick_signal() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VcpuError::Signal)
}

/// What every vCPU thread shares.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    pub exit: Arc<ExitNotifier>,
    pub stop: Arc<AtomicBool>,
    pub run: Arc<RunControl>,
    /// Keeps guest RAM mapped while the thread may still run the guest,
    /// even if the VM is dropped first (a thread that did not stop).
    pub _memory: GuestMemory,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    power_on: PowerOnState,
}

/// What a reboot puts back that the guest may have changed and the boot
/// setup does not write: the whole local APIC (timer, TPR, LVTs, pending
/// interrupts), the APIC base MSR (a guest that switched to x2APIC mode
/// would otherwise keep it, and an xAPIC kernel could not reach its LAPIC),
/// the pending exception, NMI and interrupt-shadow state, the debug
/// registers (breakpoints a debugger armed in DR7 would fire in the next
/// kernel's first instructions) and XCR0 (the extended state it enabled).
struct PowerOnState {
    lapic: kvm_bindings::kvm_lapic_state,
    apic_base: u64,
    events: kvm_bindings::kvm_vcpu_events,
    debug_regs: kvm_bindings::kvm_debugregs,
    /// None where KVM keeps no XCRs for its guests.
    xcrs: Option<kvm_bindings::kvm_xcrs>,
}

impl PowerOnState {
    fn capture(fd: &VcpuFd) -> Result<Self, regs::RegsError> {
        Ok(PowerOnState {
            lapic: fd
                .get_lapic()
                .map_err(|e| regs::RegsError::Kvm("LAPIC", e))?,
            apic_base: regs::get_apic_base(fd)?,
            events: fd
                .get_vcpu_events()
                .map_err(|e| regs::RegsError::Kvm("vCPU events", e))?,
            debug_regs: fd
                .get_debug_regs()
                .map_err(|e| regs::RegsError::Kvm("debug registers", e))?,
            xcrs: fd.get_xcrs().ok(),
        })
    }

    /// The APIC base first: KVM reads the LAPIC state in the mode it sets.
    fn restore(&self, fd: &VcpuFd) -> Result<(), regs::RegsError> {
        regs::set_apic_base(fd, self.apic_base)?;
        fd.set_lapic(&self.lapic)
            .map_err(|e| regs::RegsError::Kvm("LAPIC", e))?;
        fd.set_vcpu_events(&self.events)
            .map_err(|e| regs::RegsError::Kvm("vCPU events", e))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(|e| regs::RegsError::Kvm("debug registers", e))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs)
                .map_err(|e| regs::RegsError::Kvm("XCRs", e))?;
        }
        Ok(())
    }
}

/// Stops the VM if the vCPU thread panics: a guest must not run on with a
/// CPU missing (the panic is reported when the thread is joined).
struct StopOnPanic(Arc<ExitNotifier>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.notify(VmExit::KvmError);
        }
    }
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID, MSRs, FPU and LAPIC set up.
    pub fn new(
        vm: &VmFd,
        id: u8,
        cpu_count: u8,
        base_cpuid: &CpuId,
        supported_msrs: &[u32],
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Create(id, e))?;
        // The rate the guest's TSC runs at, for the timing leaf; a KVM
        // that cannot tell leaves the leaf out.
        let tsc_khz = match fd.get_tsc_khz() {
            Ok(khz) if khz > 0 => Some(khz),
            Ok(_) => None,
            Err(e) => {
                log::debug!("vCPU {id}: KVM_GET_TSC_KHZ: {e}; no CPUID timing leaf");
                None
            }
        };
        let vcpu_cpuid = cpuid::for_vcpu(base_cpuid, id, cpu_count, tsc_khz);
        if id == 0 {
            match (cpuid::timing_leaf_khz(&vcpu_cpuid), tsc_khz) {
                (Some(khz), _) => log::info!("guest TSC: {khz} kHz (CPUID 0x40000010)"),
                (None, None) => log::info!(
                    "guest TSC: no CPUID timing leaf (KVM did not give the TSC's rate)"
                ),
                (None, Some(_)) => log::info!(
                    "guest TSC: no CPUID timing leaf (TSC not invariant, no KVM signature leaf, or no room)"
                ),
            }
        }
        fd.set_cpuid2(&vcpu_cpuid)
            .map_err(|e| VcpuError::Cpuid(id, e))?;
        regs::setup_msrs(&fd, supported_msrs).map_err(|e| VcpuError::Regs(id, e))?;
        regs::setup_fpu(&fd).map_err(|e| VcpuError::Regs(id, e))?;
        regs::setup_lapic(&fd).map_err(|e| VcpuError::Regs(id, e))?;
        let power_on = PowerOnState::capture(&fd).map_err(|e| VcpuError::Regs(id, e))?;
        Ok(Vcpu { id, fd, power_on })
    }

    /// Puts the boot processor at the kernel's entry point.
    pub fn setup_boot_entry(
        &self,
        mem: &GuestMemory,
        mode: regs::EntryMode,
    ) -> Result<(), VcpuError> {
        regs::write_boot_tables(mem, mode).map_err(|e| VcpuError::Regs(self.id, e))?;
        regs::setup_sregs(&self.fd, mode).map_err(|e| VcpuError::Regs(self.id, e))?;
        regs::setup_regs(&self.fd, mode).map_err(|e| VcpuError::Regs(self.id, e))
    }

    /// Puts the vCPU back in its power-on state for an in-place reboot:
    /// MSRs, FPU, APIC base, LAPIC and pending events as at creation; the
    /// boot processor at the kernel's entry (`entry`), the others waiting
    /// for INIT/SIPI.
    pub fn reset(
        &self,
        mem: &GuestMemory,
        supported_msrs: &[u32],
        entry: Option<regs::EntryMode>,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        regs::setup_msrs(&self.fd, supported_msrs).map_err(|e| VcpuError::Regs(id, e))?;
        regs::reset_pv_msrs(&self.fd, supported_msrs).map_err(|e| VcpuError::Regs(id, e))?;
        regs::setup_fpu(&self.fd).map_err(|e| VcpuError::Regs(id, e))?;
        self.power_on
            .restore(&self.fd)
            .map_err(|e| VcpuError::Regs(id, e))?;
        let mp_state = match entry {
            Some(mode) => {
                self.setup_boot_entry(mem, mode)?;
                kvm_bindings::KVM_MP_STATE_RUNNABLE
            }
            None => kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
        };
        self.fd
            .set_mp_state(kvm_bindings::kvm_mp_state { mp_state })
            .map_err(|e| VcpuError::MpState(id, e))
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Starts the vCPU's thread; the thread hands the vCPU back when it ends.
    pub fn start(self, ctx: VcpuContext) -> Result<JoinHandle<Vcpu>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let _stops_the_vm = StopOnPanic(ctx.exit.clone());
                self.run(&ctx)
            })
            .map_err(|e| VcpuError::Spawn(id, e))
    }

    fn run(mut self, ctx: &VcpuContext) -> Vcpu {
        ctx.run.register(self.id, &ctx.stop);
        // A device may have stopped the VM (power-off) during the last exit:
        // do not enter the guest again.
        while !ctx.stop.load(Ordering::Acquire) && !ctx.exit.is_stopping() {
            ctx.run.park_if_paused(&ctx.stop);
            if ctx.stop.load(Ordering::Acquire) {
                break;
            }
            if let Some(reason) = self.run_once(ctx) {
                if matches!(reason, VmExit::TripleFault | VmExit::KvmError) {
                    self.log_state();
                }
                ctx.exit.notify(reason);
                break;
            }
        }
        self.finish_pending_exit(ctx);
        ctx.run.unregister();
        self
    }

    /// Completes the last MMIO or port exit inside KVM without running
    /// the guest. KVM finishes an emulated read (its register, RIP) only at
    /// the next KVM_RUN; after a reset that would overwrite the new entry
    /// point with the end of the old instruction. With `immediate_exit`,
    /// KVM_RUN finishes it and returns EINTR before entering the guest; an
    /// access KVM splits (more than 8 bytes, across a page, a `rep movs`)
    /// exits again for its next part first, which is served the same way.
    fn finish_pending_exit(&mut self, ctx: &VcpuContext) {
        const MOST_PARTS: usize = 64;
        self.fd.set_kvm_immediate_exit(1);
        for _ in 0..MOST_PARTS {
            match self.fd.run() {
                Ok(VcpuExit::MmioRead(addr, data)) => ctx.mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => ctx.mmio.write(addr, data),
                Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => {
                    if let Err(e) = self.port_io(ctx) {
                        log::debug!("vCPU {}: completing its last exit: {e}", self.id);
                        break;
                    }
                }
                Err(e) if e.errno() == libc::EINTR => break,
                // After a triple fault or a KVM error, say: nothing to finish.
                Err(e) => {
                    log::debug!("vCPU {}: completing its last exit: {e}", self.id);
                    break;
                }
                Ok(exit) => {
                    log::debug!("vCPU {}: completing its last exit: {exit:?}", self.id);
                    break;
                }
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Runs the vCPU until its next exit; returns a reason to stop the VM.
    fn run_once(&mut self, ctx: &VcpuContext) -> Option<VmExit> {
        match self.fd.run() {
            Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => {
                if let Err(e) = self.port_io(ctx) {
                    log::error!("vCPU {}: {e}", self.id);
                    return Some(VmExit::KvmError);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => ctx.mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => ctx.mmio.write(addr, data),
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
            Ok(VcpuExit::Shutdown) => {
                log::error!("vCPU {}: triple fault", self.id);
                return Some(VmExit::TripleFault);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return Some(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::PowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    _ => {
                        log::error!("vCPU {}: unexpected system event {kind}", self.id);
                        VmExit::KvmError
                    }
                });
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                log::error!(
                    "vCPU {}: KVM failed to enter the guest (hardware reason {reason:#x}, host cpu {cpu})",
                    self.id
                );
                return Some(VmExit::KvmError);
            }
            Ok(VcpuExit::InternalError) => {
                log::error!("vCPU {}: KVM internal error", self.id);
                return Some(VmExit::KvmError);
            }
            Ok(other) => {
                log::error!("vCPU {}: unexpected exit {other:?}", self.id);
                return Some(VmExit::KvmError);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                log::error!("vCPU {}: KVM_RUN failed: {e}", self.id);
                return Some(VmExit::KvmError);
            }
        }
        None
    }

    /// Serves a port I/O exit from `kvm_run` itself, which tells the width of
    /// one access: a string instruction (`rep outsb`, `rep insw`) exits once
    /// with `count` accesses of `size` bytes, and the device gets them one at
    /// a time, in order, as the guest made them.
    fn port_io(&mut self, ctx: &VcpuContext) -> Result<(), String> {
        let run = self.fd.get_kvm_run();
        // SAFETY: KVM_RUN just returned KVM_EXIT_IO (the caller matched it),
        // so `io` is the union member KVM filled in.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        if !matches!(size, 1 | 2 | 4) {
            return Err(format!("port I/O of {size} bytes at port {:#x}", io.port));
        }
        let len = size * io.count as usize;
        let data_offset = usize::try_from(io.data_offset).map_err(|e| e.to_string())?;
        let base: *mut u8 = (run as *mut kvm_bindings::kvm_run).cast();
        // SAFETY: KVM puts the `count * size` bytes of a port I/O exit at
        // `data_offset` inside the vCPU's kvm_run mapping (the pages after
        // the struct are part of it), which lives as long as `self.fd`; the
        // slice is the only reference to those bytes until it is dropped
        // below, before the next KVM_RUN.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(data_offset), len) };
        let port = u64::from(io.port);
        for access in data.chunks_exact_mut(size) {
            if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
                ctx.pio.read(port, access);
            } else {
                ctx.pio.write(port, access);
            }
        }
        Ok(())
    }

    /// Logs the registers after a fatal exit.
    fn log_state(&self) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => log::error!(
                "vCPU {} registers: rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} \
                 rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x} cr0={:#x} cr2={:#x} \
                 cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/{:#x}",
                self.id,
                r.rip,
                r.rsp,
                r.rflags,
                r.rax,
                r.rbx,
                r.rcx,
                r.rdx,
                r.rsi,
                r.rdi,
                r.rbp,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.cs.base
            ),
            (Err(e), _) | (_, Err(e)) => {
                log::error!("vCPU {}: cannot read registers: {e}", self.id)
            }
        }
    }
}

#[derive(Debug, Error)]
pub enum StopError {
    #[error(
        "{stuck} of {total} vCPU threads did not stop within {timeout:?} \
         (and were not waiting on a vhost-user backend)"
    )]
    Timeout {
        stuck: usize,
        total: usize,
        timeout: Duration,
    },
    #[error(
        "{stuck} of {total} vCPU threads did not stop within {ceiling:?}, \
         though each was waiting on a vhost-user backend"
    )]
    Ceiling {
        stuck: usize,
        total: usize,
        ceiling: Duration,
    },
    #[error("{0} vCPU threads panicked")]
    Panicked(usize),
}

/// Whether a thread is waiting on something that has a time limit of its
/// own (an exchange with a vhost-user backend): `stop_all` keeps waiting
/// for such a thread past its timeout.
pub type Waiting = fn(std::thread::ThreadId) -> bool;

/// How long the stop keeps waiting, past its timeout, after it last saw a
/// stuck thread in a wait with a limit of its own (between one backend
/// exchange and the next, a vCPU runs for microseconds).
const BETWEEN_WAITS: Duration = Duration::from_millis(500);

/// The longest a stop waits for threads in waits with limits of their own
/// (about twelve backend exchanges that each run to their limit), unless
/// one exchange's limit is longer (see `BuiltVm::stop_vcpus`).
pub const STOP_CEILING: Duration = Duration::from_secs(60);

/// Stops every vCPU thread: sets the flag, releases paused ones, then kicks
/// each thread still running until it has left KVM_RUN (a kick can land
/// just before KVM_RUN starts, so it is repeated).
/// Returns every vCPU, or an error if a thread did not end within
/// `timeout` (it keeps running, and keeps guest RAM mapped) or panicked.
/// While `waiting` says one of the stuck threads is in a wait with a limit
/// of its own, and until BETWEEN_WAITS after that was last seen, the stop
/// waits past `timeout`: a vCPU whose MMIO write sets a device up runs one
/// backend exchange after another, each with its own limit (and others
/// may wait for the device it holds), and the chain ends; but never past
/// `ceiling` (or `timeout`, if longer) in all.
pub fn stop_all<T>(
    stop: &AtomicBool,
    run: &RunControl,
    threads: Vec<JoinHandle<T>>,
    timeout: Duration,
    ceiling: Duration,
    waiting: Waiting,
) -> Result<Vec<T>, StopError> {
    stop.store(true, Ordering::Release);
    run.finish();
    let ceiling = ceiling.max(timeout);
    let start = Instant::now();
    let deadline = start + timeout;
    let mut last_seen_waiting = None;
    loop {
        let running: Vec<&JoinHandle<T>> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        let now = Instant::now();
        if running.iter().any(|t| waiting(t.thread().id())) {
            last_seen_waiting = Some(now);
        }
        let waited_for = last_seen_waiting.is_some_and(|seen| now < seen + BETWEEN_WAITS);
        if now > deadline && !waited_for {
            return Err(StopError::Timeout {
                stuck: running.len(),
                total: threads.len(),
                timeout,
            });
        }
        if now > start + ceiling {
            return Err(StopError::Ceiling {
                stuck: running.len(),
                total: threads.len(),
                ceiling,
            });
        }
        for thread in running {
            // SAFETY: the handle refers to a live thread that was not
            // joined, and the kick signal has a handler installed.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut vcpus = Vec::with_capacity(threads.len());
    let mut panicked = 0;
    for thread in threads {
        match thread.join() {
            Ok(vcpu) => vcpus.push(vcpu),
            Err(_) => panicked += 1,
        }
    }
    if panicked > 0 {
        return Err(StopError::Panicked(panicked));
    }
    Ok(vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// The thread the test's `waiting` names.
        static WAITING: std::cell::Cell<Option<std::thread::ThreadId>> =
            const { std::cell::Cell::new(None) };
    }

    /// A thread that ignores the stop flag for `busy`, then returns.
    fn slow_thread(busy: Duration) -> JoinHandle<u8> {
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < busy {
                // Kicks interrupt the sleep; it resumes.
                std::thread::sleep(Duration::from_millis(5));
            }
            7
        })
    }

    /// `stop_all` with a 50 ms timeout.
    fn stop(
        threads: Vec<JoinHandle<u8>>,
        ceiling: Duration,
        waiting: Waiting,
    ) -> Result<Vec<u8>, StopError> {
        let stop = AtomicBool::new(false);
        let run = RunControl::default();
        stop_all(
            &stop,
            &run,
            threads,
            Duration::from_millis(50),
            ceiling,
            waiting,
        )
    }

    #[test]
    fn a_thread_in_a_wait_with_its_own_limit_is_waited_for_past_the_timeout() {
        init_kick_signal().expect("kick handler");
        let threads = vec![slow_thread(Duration::from_millis(400))];
        let done =
            stop(threads, STOP_CEILING, |_| true).expect("waited for the thread in its wait");
        assert_eq!(done, vec![7]);

        // A second thread, waiting for the first (say, for the device the
        // first is setting up), is waited for along with it.
        let in_wait = slow_thread(Duration::from_millis(300));
        let first = in_wait.thread().id();
        WAITING.with(|w| w.set(Some(first)));
        let threads = vec![in_wait, slow_thread(Duration::from_millis(400))];
        let done = stop(threads, STOP_CEILING, |t| {
            WAITING.with(|w| w.get()) == Some(t)
        })
        .expect("waited for both");
        assert_eq!(done, vec![7, 7]);

        let threads = vec![slow_thread(Duration::from_millis(400))];
        let err = stop(threads, STOP_CEILING, |_| false)
            .expect_err("a stuck thread outside any wait is not waited for");
        assert!(
            matches!(
                err,
                StopError::Timeout {
                    stuck: 1,
                    total: 1,
                    ..
                }
            ),
            "{err}"
        );

        // Nor is one that stays in waits past the ceiling.
        let threads = vec![slow_thread(Duration::from_secs(2))];
        let started = Instant::now();
        let err = stop(threads, Duration::from_millis(300), |_| true)
            .expect_err("waited past the ceiling");
        assert!(
            matches!(
                err,
                StopError::Ceiling {
                    stuck: 1,
                    total: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "{err}");
    }

    #[test]
    fn a_vcpu_thread_that_panics_stops_the_vm() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let guard_exit = exit.clone();
        let thread = std::thread::spawn(move || {
            let _stops_the_vm = StopOnPanic(guard_exit);
            panic!("a bug in an exit handler");
        });
        assert!(thread.join().is_err());
        assert_eq!(exit.reason(), Some(VmExit::KvmError));
        // A thread that ends normally stops nothing.
        let calm = Arc::new(ExitNotifier::new().unwrap());
        let guard_exit = calm.clone();
        std::thread::spawn(move || drop(StopOnPanic(guard_exit)))
            .join()
            .unwrap();
        assert_eq!(calm.reason(), None);
    }
}
