//! Builds a ready-to-run VM from a validated configuration, in order:
//! guest memory, KVM VM and irqchip, platform devices, ACPI tables, kernel,
//! vCPUs. Nothing runs until `RunningVm::start`.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{acpi, boot, layout};
use crate::bus::{MmioBus, PioBus};
use crate::config::{SerialMode, VmConfig};
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::ged::{Ged, GedEvents};
use crate::devices::i8042::I8042;
use crate::devices::serial::{self, SerialConsole};
use crate::exit::ExitNotifier;
use crate::interrupts::msi::GsiRouter;
use crate::pci::bus::{BarExitCounters, BarRegion, ConfigSpace, Ecam, PciBus};
use crate::pci::config_io::{self, PciConfigIo};
use crate::vhost_user;
use crate::vhost_user::frontend::{DeviceStatus, Handshake};
use crate::vhost_user::listener::ServerSocket;
use crate::vhost_user::net::NetSpec;
use crate::virtio::device::VirtioDevice;
use crate::virtio::pci::{self as virtio_pci, TransportCounters, VirtioPciDevice};
use crate::vstate::memory::{self, GuestMemory, GuestRam};
use crate::vstate::run_control::RunControl;
use crate::vstate::vcpu::{self, Vcpu, VcpuContext};
use crate::vstate::vm;

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("cannot create the exit notifier")]
    ExitEvent(#[source] std::io::Error),
    #[error("cannot set up the ACPI event interrupt")]
    GedIrq(#[source] std::io::Error),
    #[error("cannot connect the ACPI event interrupt to KVM")]
    GedIrqfd(#[source] kvm_ioctls::Error),
    #[error("cannot set up the serial console interrupt")]
    SerialIrq(#[source] std::io::Error),
    #[error("cannot start the console output thread")]
    ConsoleOutput(#[source] std::io::Error),
    #[error("cannot connect the serial console interrupt to KVM")]
    SerialIrqfd(#[source] kvm_ioctls::Error),
    #[error("--serial file={0:?}: cannot open it for writing")]
    SerialFile(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot place a device on the I/O bus")]
    Bus(#[from] crate::bus::Overlap),
    #[error("--dump-acpi {0:?}: cannot write the tables")]
    DumpAcpi(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot read the CPUID or MSRs KVM supports")]
    KvmCaps(#[source] kvm_ioctls::Error),
    #[error("--disk")]
    Disk(#[source] vhost_user::frontend::FrontendError),
    #[error("--net")]
    Net(#[source] vhost_user::frontend::FrontendError),
    #[error("--net server=on")]
    Listen(#[from] vhost_user::listener::ListenError),
    #[error("cannot start the thread that takes reconnecting backends")]
    ReconnectThread(#[source] std::io::Error),
    #[error("cannot create the PCI device for {0}")]
    Transport(String, #[source] virtio_pci::TransportError),
    #[error("too many PCI devices")]
    PciSlots(#[from] crate::pci::bus::NoFreeSlot),
    #[error("the 32-bit PCI MMIO window is full")]
    MmioWindowFull,
}

/// Exit counters of one virtio-pci device, printed when the VM stops.
pub struct DeviceStats {
    pub name: String,
    pub socket: std::path::PathBuf,
    pub bar: Arc<BarExitCounters>,
    pub transport: Arc<TransportCounters>,
    pub status: Arc<DeviceStatus>,
}

/// A VM whose vCPUs have not started yet.
pub struct BuiltVm {
    // Field order matters for drop: the vCPUs go before the memory. The VM
    // itself may outlive it by a moment in the devices' clones of `vm`,
    // which is harmless: with no vCPU left, nothing runs on the memory.
    pub vcpus: Vec<Vcpu>,
    /// Kept open for the VM's lifetime (devices hold irqfds and ioeventfds).
    #[allow(dead_code)]
    pub vm: Arc<VmFd>,
    /// Guest RAM must outlive the VM that maps it.
    #[allow(dead_code)]
    pub ram: GuestRam,
    pub exit: Arc<ExitNotifier>,
    pub pio: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    pub serial: Arc<Mutex<SerialConsole>>,
    /// The thread that writes the console output.
    pub console_output: serial::ConsoleOutput,
    pub stop: Arc<AtomicBool>,
    pub devices: Vec<DeviceStats>,
    /// Pauses and resumes the vCPUs.
    pub run: Arc<RunControl>,
    /// ACPI events for the guest (the power button).
    pub ged: Arc<GedEvents>,
    /// What an in-place reboot needs again.
    pci_bus: Arc<Mutex<PciBus>>,
    pci_config_io: Arc<Mutex<PciConfigIo>>,
    acpi_pm: Arc<Mutex<AcpiPm>>,
    acpi_tables: Vec<acpi::AcpiTable>,
    supported_msrs: Vec<u32>,
    platform: vm::PlatformState,
    boot: BootSource,
    /// `server=on` sockets, removed when the VM is dropped.
    #[allow(dead_code)]
    pub server_sockets: Vec<ServerSocket>,
}

/// The `--serial file=` log while the VM is built: opened without
/// emptying it, so a start that fails leaves an earlier log as it was (and
/// removes one it made); emptied once the VM is built.
struct SerialLog {
    file: File,
    path: std::path::PathBuf,
    created: bool,
    kept: bool,
}

impl SerialLog {
    /// The log and the console's handle on it.
    fn open(path: &Path) -> std::io::Result<(Self, File)> {
        let (file, created) = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(file) => (file, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // Not blocking on a FIFO with no reader (the open fails
                // instead); the console then writes to it blocking.
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)?;
                let fd = file.as_raw_fd();
                // SAFETY: F_GETFL on a descriptor this function owns.
                let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
                if flags < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: F_SETFL on the same descriptor, with its own flags.
                let set = unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) };
                if set < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                (file, false)
            }
            Err(e) => return Err(e),
        };
        let sink = file.try_clone()?;
        let log = SerialLog {
            file,
            path: path.to_path_buf(),
            created,
            kept: false,
        };
        Ok((log, sink))
    }

    /// The VM is built: the log starts empty (a regular file; a terminal,
    /// a pipe or /dev/null is written to as it is).
    fn keep(mut self) -> std::io::Result<()> {
        self.kept = true;
        if self.file.metadata()?.is_file() {
            self.file.set_len(0)?;
        }
        Ok(())
    }
}

impl Drop for SerialLog {
    fn drop(&mut self) {
        if !self.kept && self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Builds the VM. `interrupt` (the stop-signal fd) cuts short a wait for a
/// backend to connect to a `server=on` socket.
pub fn build(
    kvm: &Kvm,
    config: &VmConfig,
    interrupt: BorrowedFd<'_>,
) -> Result<BuiltVm, BuildError> {
    let ram = memory::create_guest_ram(config.memory_bytes, config.hugepages)?;
    let vm = Arc::new(vm::create_vm(kvm, &ram.memory)?);
    // The kernel and the tables first: a kernel that cannot boot is
    // refused before any backend is contacted or file written.
    let tables = acpi::build_tables(config.cpus, config.memory_bytes)?;
    acpi::write_tables(&ram.memory, &tables)?;
    let boot_info = boot::load(
        &ram.memory,
        &config.kernel,
        config.initramfs.as_deref(),
        &config.cmdline,
        config.memory_bytes,
        layout::ACPI_START,
    )?;
    let platform = vm::PlatformState::save(&vm)?;
    let router = Arc::new(GsiRouter::new(vm.clone()));
    let exit = Arc::new(ExitNotifier::new().map_err(BuildError::ExitEvent)?);

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::SerialIrq)?;
    vm.register_irqfd(&serial_irq, layout::ports::SERIAL_IRQ)
        .map_err(BuildError::SerialIrqfd)?;
    let mut serial_log = None;
    let out: serial::ConsoleOut = match &config.serial {
        SerialMode::Stdio => serial::stdout_sink(),
        SerialMode::File(path) => {
            let (log, sink) =
                SerialLog::open(path).map_err(|e| BuildError::SerialFile(path.clone(), e))?;
            serial_log = Some(log);
            Box::new(sink)
        }
        SerialMode::Off => Box::new(std::io::sink()),
    };
    let (console_output, out) =
        serial::ConsoleOutput::spawn(out).map_err(BuildError::ConsoleOutput)?;
    let serial = Arc::new(Mutex::new(
        SerialConsole::new(serial_irq, out).map_err(BuildError::SerialIrq)?,
    ));

    let pio = PioBus::default();
    pio.insert(
        u64::from(layout::ports::SERIAL_BASE),
        u64::from(layout::ports::SERIAL_LEN),
        serial.clone(),
    )?;
    let pm_registers = Arc::new(Mutex::new(AcpiPm::new(exit.clone())));
    pio.insert(
        u64::from(acpi_pm::PORT_BASE),
        u64::from(acpi_pm::PORT_LEN),
        pm_registers.clone(),
    )?;
    pio.insert(
        u64::from(layout::ports::I8042_COMMAND),
        1,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    let ged_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::GedIrq)?;
    vm.register_irqfd(&ged_irq, layout::ports::GED_IRQ)
        .map_err(BuildError::GedIrqfd)?;
    let ged = GedEvents::new(ged_irq);
    let mmio = Arc::new(MmioBus::default());
    let pci_bus = Arc::new(Mutex::new(PciBus::new(&mmio)));
    let pci_config = ConfigSpace::new(pci_bus.clone());
    let pci_config_io = Arc::new(Mutex::new(PciConfigIo::new(
        pci_config.clone(),
        exit.clone(),
    )));
    pio.insert(
        u64::from(config_io::PORT_BASE),
        u64::from(config_io::PORT_LEN),
        pci_config_io.clone(),
    )?;
    mmio.insert(
        layout::PCI_ECAM_START,
        layout::PCI_ECAM_SIZE,
        Arc::new(Ecam::new(pci_config)),
    )?;

    mmio.insert(
        layout::GED_START,
        layout::GED_SIZE,
        Arc::new(Mutex::new(Ged(ged.clone()))),
    )?;
    let mut pci = PciDevices {
        memory: &ram.memory,
        vm: &vm,
        router: &router,
        bus: &pci_bus,
        next_bar: layout::PCI_MMIO32_START,
        stats: Vec::new(),
    };
    for (index, disk) in config.disks.iter().enumerate() {
        let device =
            vhost_user::blk::connect(index, &disk.socket, disk.num_queues, disk.queue_size)
                .map_err(BuildError::Disk)?;
        let status = device.status();
        let handshake = device.handshake();
        let transport = pci.add_virtio(Box::new(device), status.clone(), "vhost-user-blk")?;
        redial_when_gone(
            format!("disk{index}"),
            &disk.socket,
            status,
            handshake,
            transport,
        )?;
    }
    let mut server_sockets = Vec::new();
    for (index, net) in config.nets.iter().enumerate() {
        let spec = NetSpec {
            index,
            socket: &net.socket,
            mac: net.mac,
            queue_pairs: net.queue_pairs,
            queue_size: net.queue_size,
        };
        if net.server {
            let server = ServerSocket::bind(&net.socket)?;
            // A peer that connects and goes (a probe of whether the socket
            // is live), or talks nonsense, is not the backend: the next
            // connection may be. One that answers and refuses is.
            let device = loop {
                let stream = server.accept(interrupt)?;
                match vhost_user::net::from_stream(&spec, stream) {
                    Ok(device) => break device,
                    Err(e) if e.peer_failed() => log::warn!(
                        "net{index}: {}; waiting for another connection",
                        vmm_common::error_chain::render(&e)
                    ),
                    Err(e) => return Err(BuildError::Net(e)),
                }
            };
            let status = device.status();
            let handshake = device.handshake();
            let transport = pci.add_virtio(Box::new(device), status.clone(), "vhost-user-net")?;
            // DPDK (client=1) and OVS reconnect after a restart.
            server
                .serve_reconnects(
                    format!("net{index}"),
                    move || status.wait_hung_up(),
                    take_back(handshake, transport),
                )
                .map_err(BuildError::ReconnectThread)?;
            server_sockets.push(server);
        } else {
            let device = vhost_user::net::connect(&spec).map_err(BuildError::Net)?;
            let status = device.status();
            let handshake = device.handshake();
            let transport = pci.add_virtio(Box::new(device), status.clone(), "vhost-user-net")?;
            redial_when_gone(
                format!("net{index}"),
                &net.socket,
                status,
                handshake,
                transport,
            )?;
        }
    }
    let devices = pci.stats;

    let base_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::KvmCaps)?;
    let msr_list = kvm.get_msr_index_list().map_err(BuildError::KvmCaps)?;
    let supported_msrs = msr_list.as_slice().to_vec();
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for id in 0..config.cpus {
        vcpus.push(Vcpu::new(
            &vm,
            id,
            config.cpus,
            &base_cpuid,
            &supported_msrs,
        )?);
    }
    vcpus[0].setup_boot_entry(&ram.memory, boot_info.entry)?;
    log::info!(
        "VM built: {} vCPU(s), {} MiB, entry {:?}",
        config.cpus,
        config.memory_bytes >> 20,
        boot_info.entry
    );

    // Files last: a start that fails writes none.
    if let Some(dir) = &config.dump_acpi {
        dump_acpi(dir, &tables).map_err(|e| BuildError::DumpAcpi(dir.clone(), e))?;
    }
    if let Some(log) = serial_log {
        let path = log.path.clone();
        log.keep().map_err(|e| BuildError::SerialFile(path, e))?;
    }

    Ok(BuiltVm {
        vcpus,
        vm,
        ram,
        exit,
        pio: Arc::new(pio),
        mmio,
        serial,
        console_output,
        stop: Arc::new(AtomicBool::new(false)),
        run: Arc::new(RunControl::default()),
        ged,
        pci_bus,
        pci_config_io,
        acpi_pm: pm_registers,
        acpi_tables: tables,
        supported_msrs,
        platform,
        boot: BootSource {
            kernel: config.kernel.clone(),
            initramfs: config.initramfs.clone(),
            cmdline: config.cmdline.clone(),
            memory_bytes: config.memory_bytes,
        },
        devices,
        server_sockets,
    })
}

/// The kernel and its arguments, loaded again on every reboot.
struct BootSource {
    kernel: std::path::PathBuf,
    initramfs: Option<std::path::PathBuf>,
    cmdline: String,
    memory_bytes: u64,
}

impl BuiltVm {
    /// Reboots in place after the vCPU threads have ended: every device is
    /// reset (vhost-user devices stop their backends' rings and are set up
    /// again when the guest's drivers start them), the kernel and ACPI
    /// tables are loaded afresh, and the interrupt controllers, the PIT
    /// and the vCPUs return to their power-on state. `start` then runs the
    /// guest again.
    pub fn reboot(&mut self, vcpus: Vec<Vcpu>) -> Result<(), BuildError> {
        crate::bus::lock(&self.pci_bus).reset_devices();
        crate::bus::lock(&self.pci_config_io).reset();
        crate::bus::lock(&self.acpi_pm).reset();
        crate::bus::lock(&self.serial)
            .reset()
            .map_err(BuildError::SerialIrq)?;
        self.ged.reset();
        self.platform.restore(&self.vm)?;
        acpi::write_tables(&self.ram.memory, &self.acpi_tables)?;
        let boot_info = boot::load(
            &self.ram.memory,
            &self.boot.kernel,
            self.boot.initramfs.as_deref(),
            &self.boot.cmdline,
            self.boot.memory_bytes,
            layout::ACPI_START,
        )?;
        for vcpu in &vcpus {
            let entry = (vcpu.id() == 0).then_some(boot_info.entry);
            vcpu.reset(&self.ram.memory, &self.supported_msrs, entry)?;
        }
        self.vcpus = vcpus;
        self.stop.store(false, std::sync::atomic::Ordering::Release);
        self.exit.rearm();
        log::info!("VM rebooted in place");
        Ok(())
    }
}

/// Places virtio-pci devices on bus 0 with a BAR each.
struct PciDevices<'a> {
    memory: &'a GuestMemory,
    vm: &'a Arc<VmFd>,
    router: &'a Arc<GsiRouter>,
    bus: &'a Arc<Mutex<PciBus>>,
    next_bar: u64,
    stats: Vec<DeviceStats>,
}

impl PciDevices<'_> {
    fn add_virtio(
        &mut self,
        device: Box<dyn VirtioDevice>,
        status: Arc<DeviceStatus>,
        kind: &str,
    ) -> Result<Arc<Mutex<VirtioPciDevice>>, BuildError> {
        let socket = status.socket.clone();
        let name = device.name().to_string();
        let bar_addr = self.next_bar.next_multiple_of(virtio_pci::BAR_SIZE);
        self.next_bar = bar_addr + virtio_pci::BAR_SIZE;
        if self.next_bar > layout::PCI_MMIO32_END {
            return Err(BuildError::MmioWindowFull);
        }
        let transport = VirtioPciDevice::new(
            device,
            self.memory.clone(),
            self.vm,
            self.router.clone(),
            bar_addr,
        )
        .map_err(|e| BuildError::Transport(name.clone(), e))?;
        let transport_counters = transport.counters();
        let msix = transport.msix_region();
        let transport = Arc::new(Mutex::new(transport));
        let bar_counters = Arc::new(BarExitCounters::default());
        let mut bus = crate::bus::lock(self.bus);
        let slot = bus.next_slot()?;
        bus.add(slot, transport.clone());
        bus.map_bar(
            slot,
            0,
            bar_addr,
            virtio_pci::BAR_SIZE,
            Arc::new(BarRegion::new(transport.clone(), 0, bar_counters.clone()).with_msix(msix)),
        )?;
        drop(bus);
        log::info!(
            "{name}: {kind} on {} at PCI 00:{slot:02x}.0, BAR0 {bar_addr:#x}",
            socket.display()
        );
        self.stats.push(DeviceStats {
            name,
            socket,
            bar: bar_counters,
            transport: transport_counters,
            status,
        });
        Ok(transport)
    }
}

/// What a device does with a new backend connection: the handshake first,
/// without holding the device, then the device takes the backend.
fn take_back(
    handshake: Handshake,
    transport: Arc<Mutex<VirtioPciDevice>>,
) -> impl Fn(std::os::unix::net::UnixStream) -> Result<(), String> + Send + 'static {
    move |stream| {
        let backend = handshake.run(stream)?;
        crate::bus::lock(&transport).reconnect_backend(backend)
    }
}

/// A device whose backend listens: when the backend dies, the VMM dials
/// its socket until a restarted backend answers, negotiates with it
/// (without holding the device), and hands it the device.
fn redial_when_gone(
    name: String,
    socket: &Path,
    status: Arc<DeviceStatus>,
    handshake: Handshake,
    transport: Arc<Mutex<VirtioPciDevice>>,
) -> Result<(), BuildError> {
    vhost_user::reconnect::spawn(
        name,
        socket.to_path_buf(),
        vhost_user::reconnect::Source::Dial,
        move || status.wait_hung_up(),
        take_back(handshake, transport),
    )
    .map_err(BuildError::ReconnectThread)
}

/// Writes each table to DIR/<SIG>.dat, through a temporary file so that no
/// half-written table is left behind.
fn dump_acpi(dir: &Path, tables: &[acpi::AcpiTable]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for table in tables {
        let path = dir.join(format!("{}.dat", table.signature));
        let tmp = dir.join(format!(".{}.dat.tmp", table.signature));
        std::fs::write(&tmp, &table.bytes)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// How long the vCPUs a failed start did start get to stop: they have not
/// reached a device yet.
const STOP_AFTER_FAILED_START: std::time::Duration = std::time::Duration::from_secs(2);

impl BuiltVm {
    /// Stops the vCPU threads (`vcpu::stop_all`): within `timeout`, or
    /// later while they are in exchanges with backends, up to STOP_CEILING
    /// or twice `timeout` (which covers the longest run of exchanges).
    pub fn stop_vcpus(
        &self,
        threads: Vec<std::thread::JoinHandle<Vcpu>>,
        timeout: std::time::Duration,
    ) -> Result<Vec<Vcpu>, vcpu::StopError> {
        vcpu::stop_all(
            &self.stop,
            &self.run,
            threads,
            timeout,
            vcpu::STOP_CEILING.max(timeout * 2),
            crate::vhost_user::deadline::in_exchange,
        )
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<Vec<std::thread::JoinHandle<Vcpu>>, BuildError> {
        vcpu::init_kick_signal()?;
        let ctx = VcpuContext {
            pio: self.pio.clone(),
            mmio: self.mmio.clone(),
            exit: self.exit.clone(),
            stop: self.stop.clone(),
            run: self.run.clone(),
            _memory: self.ram.memory.clone(),
        };
        let mut threads = Vec::new();
        let vcpus: Vec<Vcpu> = self.vcpus.drain(..).collect();
        for vcpu in vcpus {
            match vcpu.start(ctx.clone()) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // Nothing runs a guest that lacks a vCPU.
                    if let Err(stop) = self.stop_vcpus(threads, STOP_AFTER_FAILED_START) {
                        log::error!("{stop}");
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(threads)
    }
}
