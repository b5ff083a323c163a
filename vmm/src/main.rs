//! `vmm`: parse the command line, validate it, build the VM, run it until
//! the guest powers off or the VMM is told to stop, and exit with a status
//! that says which (see README.md).

mod api;
mod arch;
mod builder;
mod bus;
mod cli;
mod config;
mod devices;
mod exit;
mod guest_warnings;
mod interrupts;
mod pci;
mod signals;
mod terminal;
mod vhost_user;
mod virtio;
mod vstate;

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use crate::config::{HostLimits, SerialMode, VmConfig};
use crate::exit::VmExit;

fn main() -> ExitCode {
    vmm_common::logging::init();
    let args = cli::Args::parse();
    std::panic::set_hook(Box::new(|info| {
        // Where a panic ends the VMM (the main thread; a vCPU's stops the
        // VM), or ends what reads the terminal (console-in: then Ctrl-C
        // must work again). One in another helper thread leaves the VM
        // running on its raw terminal, and main restores it on the way out.
        let restores = std::thread::current()
            .name()
            .is_none_or(|name| name == "main" || name == "console-in" || name.starts_with("vcpu"));
        if restores {
            terminal::restore();
        }
        eprintln!("vmm panicked: {info}");
    }));
    match run(args) {
        Ok(reason) => ExitCode::from(reason.exit_code()),
        Err(e) => {
            terminal::restore();
            eprintln!("error: {}", vmm_common::error_chain::render(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// One line per device: the accesses that reached the VMM. Notify writes
/// should be 0 (KVM ioeventfds take them).
fn print_device_exits(devices: &[builder::DeviceStats]) {
    use std::sync::atomic::Ordering::Relaxed;
    for d in devices {
        eprintln!(
            "vmm: {} ({}): {} BAR reads, {} BAR writes, {} notify writes reached the VMM",
            d.name,
            d.socket.display(),
            d.bar.reads.load(Relaxed),
            d.bar.writes.load(Relaxed),
            d.transport.notify_exits.load(Relaxed)
        );
    }
}

fn host_memory_bytes() -> u64 {
    // SAFETY: an all-zero sysinfo is a valid out-parameter.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable sysinfo struct.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    (info.totalram as u64 + info.totalswap as u64) * u64::from(info.mem_unit)
}

/// What ends `run` with an error past the build, with its cause.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("cannot take the stop signals (SIGINT, SIGTERM, SIGHUP)")]
    Signals(#[source] std::io::Error),
    #[error("cannot put the terminal in raw mode for the console")]
    RawTerminal(#[source] std::io::Error),
    #[error("cannot start the thread that reads the console's input")]
    ConsoleIn(#[source] std::io::Error),
    #[error("waiting for the VM to stop")]
    Wait(#[source] std::io::Error),
    #[error("cannot reboot")]
    Reboot(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl RunError {
    fn reboot(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        RunError::Reboot(Box::new(e))
    }
}

/// How long vCPU threads get to leave the guest when the VM stops, on top
/// of the longest a vCPU may wait on a vhost-user backend (a device it
/// starts or resets in the middle of an exit: `longest_run`).
const STOP_GRACE: Duration = Duration::from_secs(2);

/// How long the guest's last console output gets to be written out at exit.
const CONSOLE_DRAIN: Duration = Duration::from_secs(2);

fn run(args: cli::Args) -> Result<VmExit, Box<dyn std::error::Error>> {
    // The arguments are checked before a KVM that cannot be opened is
    // reported: a bad value is named whatever the host.
    let kvm = vstate::vm::open_kvm();
    let limits = HostLimits {
        max_cpus: kvm
            .as_ref()
            .map_or(vstate::vm::MAX_XAPIC_VCPUS, vstate::vm::max_vcpus),
        memory_bytes: host_memory_bytes(),
        free_hugepages: vmm_common::shared_memory::free_hugepages(),
    };
    let config = VmConfig::from_args(args, limits)?;
    let kvm = kvm?;
    let signals = signals::SignalFd::block_stop_signals().map_err(RunError::Signals)?;
    let api = api::server::listen(config.api_socket.as_deref(), config.api_tcp)?;
    let mut vm = match builder::build(&kvm, &config, signals.as_fd()) {
        Ok(vm) => vm,
        Err(builder::BuildError::Listen(vhost_user::listener::ListenError::Interrupted(_))) => {
            // Ctrl-C while waiting for a server=on backend: a stop, not an
            // error (the signal is still pending: it says which stop).
            let reason = signals
                .take_pending()
                .map_err(RunError::Signals)?
                .unwrap_or(VmExit::Terminated);
            log::info!("stopped by a signal while waiting for a backend");
            return Ok(reason);
        }
        Err(e) => return Err(e.into()),
    };

    if config.serial == SerialMode::Stdio {
        let tty = terminal::stdin_is_tty();
        if tty {
            terminal::set_raw().map_err(RunError::RawTerminal)?;
        }
        devices::serial::spawn_stdin_forwarder(vm.serial.clone(), vm.exit.clone(), tty)
            .map_err(RunError::ConsoleIn)?;
    }
    let stop_timeout = STOP_GRACE + vhost_user::deadline::longest_run(config.memory_bytes);
    let sink = std::sync::Arc::new(api::server::EventSink::default());
    let control = std::sync::Arc::new(api::VmApi {
        run: vm.run.clone(),
        ged: vm.ged.clone(),
        exit: vm.exit.clone(),
        sink: sink.clone(),
        name: config.name.clone(),
        devices: vm.devices.iter().map(|d| d.status.clone()).collect(),
        no_reboot: config.no_reboot,
        pause_timeout: stop_timeout,
    });
    control.watch_devices();
    let _api = api.serve(control, sink.clone())?;
    // A stop signal that came while the VM was built (backends connecting,
    // memory being allocated) stops it before the guest runs at all.
    if let Some(reason) = signals.take_pending().map_err(RunError::Signals)? {
        log::info!("stopped by a signal before the guest started");
        sink.emit("SHUTDOWN", Some(api::shutdown_data(reason)));
        sink.flush(Duration::from_secs(1));
        terminal::restore();
        return Ok(reason);
    }
    let mut threads = vm.start()?;
    let reason = loop {
        let reason = signals.wait_for_exit(&vm.exit).map_err(RunError::Wait)?;
        let guest = match reason {
            VmExit::Reset => true,
            VmExit::ResetRequested => false,
            _ => break reason,
        };
        if config.no_reboot {
            break reason;
        }
        // Reboot in place: the same process, memory and backends; never
        // with a vCPU missing or one still running the old guest.
        let rebooted = vm
            .stop_vcpus(threads, stop_timeout)
            .map_err(RunError::reboot)
            .and_then(|vcpus| vm.reboot(vcpus).map_err(RunError::reboot))
            .and_then(|()| {
                sink.emit("RESET", Some(api::reset_data(guest)));
                vm.start().map_err(RunError::reboot)
            });
        match rebooted {
            Ok(started) => threads = started,
            Err(e) => {
                // The VM ends here: QMP clients hear it as they would any
                // other end.
                sink.emit("SHUTDOWN", Some(api::shutdown_data(reason)));
                sink.flush(Duration::from_secs(1));
                return Err(e.into());
            }
        }
    };
    sink.emit("SHUTDOWN", Some(api::shutdown_data(reason)));
    sink.flush(Duration::from_secs(1));
    if let Err(e) = vm.stop_vcpus(threads, stop_timeout) {
        // The process ends anyway, and that ends the threads.
        log::error!("{e}");
    }
    vm.console_output.finish(CONSOLE_DRAIN);
    terminal::restore();
    log::info!("VM stopped: {reason:?}");
    print_device_exits(&vm.devices);
    Ok(reason)
}
