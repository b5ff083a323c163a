//! Builds a ready-to-run VM from a validated configuration, in order:
//! guest memory, KVM VM and irqchip, platform devices, ACPI tables, kernel,
//! vCPUs. Nothing runs until `RunningVm::start`.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{acpi, boot, layout};
use crate::bus::PioBus;
use crate::config::{SerialMode, VmConfig};
use crate::devices::acpi_pm::{self, AcpiPm};
use crate::devices::i8042::I8042;
use crate::devices::serial::{self, SerialConsole};
use crate::exit::ExitNotifier;
use crate::pci::config_io::{self, PciConfigIo};
use crate::vstate::memory::{self, GuestRam};
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
    #[error("cannot set up the serial console interrupt")]
    SerialIrq(#[source] std::io::Error),
    #[error("cannot connect the serial console interrupt to KVM")]
    SerialIrqfd(#[source] kvm_ioctls::Error),
    #[error("--serial file={0:?}: cannot create the file")]
    SerialFile(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot place a device on the I/O bus")]
    Bus(#[from] crate::bus::Overlap),
    #[error("--dump-acpi {0:?}: cannot write the tables")]
    DumpAcpi(std::path::PathBuf, #[source] std::io::Error),
    #[error("cannot read the CPUID or MSRs KVM supports")]
    KvmCaps(#[source] kvm_ioctls::Error),
}

/// A VM whose vCPUs have not started yet.
pub struct BuiltVm {
    // Field order matters for drop: vCPUs and the VM go before the memory.
    pub vcpus: Vec<Vcpu>,
    /// Kept open for the VM's lifetime (devices will add irqfds and ioeventfds).
    #[allow(dead_code)]
    pub vm: VmFd,
    /// Guest RAM must outlive the VM that maps it.
    #[allow(dead_code)]
    pub ram: GuestRam,
    pub exit: Arc<ExitNotifier>,
    pub pio: Arc<PioBus>,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub stop: Arc<AtomicBool>,
}

pub fn build(kvm: &Kvm, config: &VmConfig) -> Result<BuiltVm, BuildError> {
    let ram = memory::create_guest_ram(config.memory_bytes)?;
    let vm = vm::create_vm(kvm, &ram.memory)?;
    let exit = Arc::new(ExitNotifier::new().map_err(BuildError::ExitEvent)?);

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::SerialIrq)?;
    vm.register_irqfd(&serial_irq, layout::ports::SERIAL_IRQ)
        .map_err(BuildError::SerialIrqfd)?;
    let out: serial::ConsoleOut = match &config.serial {
        SerialMode::Stdio => serial::stdout_sink(),
        SerialMode::File(path) => {
            Box::new(File::create(path).map_err(|e| BuildError::SerialFile(path.clone(), e))?)
        }
        SerialMode::Off => Box::new(std::io::sink()),
    };
    let serial = Arc::new(Mutex::new(SerialConsole::new(serial_irq, out)));

    let mut pio = PioBus::default();
    pio.insert(
        layout::ports::SERIAL_BASE,
        layout::ports::SERIAL_LEN,
        serial.clone(),
    )?;
    pio.insert(
        acpi_pm::PORT_BASE,
        acpi_pm::PORT_LEN,
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
    )?;
    pio.insert(
        layout::ports::I8042_COMMAND,
        1,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;
    pio.insert(
        config_io::PORT_BASE,
        config_io::PORT_LEN,
        Arc::new(Mutex::new(PciConfigIo::new(exit.clone()))),
    )?;

    let tables = acpi::build_tables(config.cpus, config.memory_bytes)?;
    acpi::write_tables(&ram.memory, &tables)?;
    if let Some(dir) = &config.dump_acpi {
        dump_acpi(dir, &tables).map_err(|e| BuildError::DumpAcpi(dir.clone(), e))?;
    }

    let boot_info = boot::load(
        &ram.memory,
        &config.kernel,
        config.initramfs.as_deref(),
        &config.cmdline,
        config.memory_bytes,
        layout::ACPI_START,
    )?;

    let base_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::KvmCaps)?;
    let msr_list = kvm.get_msr_index_list().map_err(BuildError::KvmCaps)?;
    let supported_msrs = msr_list.as_slice();
    let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
    for id in 0..config.cpus {
        vcpus.push(Vcpu::new(
            &vm,
            id,
            config.cpus,
            &base_cpuid,
            supported_msrs,
        )?);
    }
    vcpus[0].setup_boot_entry(&ram.memory, boot_info.entry)?;
    log::info!(
        "VM built: {} vCPU(s), {} MiB, entry {:?}",
        config.cpus,
        config.memory_bytes >> 20,
        boot_info.entry
    );

    Ok(BuiltVm {
        vcpus,
        vm,
        ram,
        exit,
        pio: Arc::new(pio),
        serial,
        stop: Arc::new(AtomicBool::new(false)),
    })
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

impl BuiltVm {
    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<Vec<std::thread::JoinHandle<()>>, BuildError> {
        vcpu::init_kick_signal()?;
        let ctx = VcpuContext {
            pio: self.pio.clone(),
            exit: self.exit.clone(),
            stop: self.stop.clone(),
        };
        let mut threads = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            threads.push(vcpu.start(ctx.clone())?);
        }
        Ok(threads)
    }
}
