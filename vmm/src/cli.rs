//! The command line, as clap parses it. Validation lives in `config`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

/// Boots a Linux kernel or a PVH ELF on KVM. Virtio devices are served by
/// vhost-user backend processes; the VMM keeps only the control path.
#[derive(Debug, Parser)]
#[command(name = "vmm", version, about, long_about = None)]
pub struct Args {
    /// Kernel to boot: a bzImage (Linux 64-bit boot protocol) or an ELF
    /// with a PVH entry note (a Linux vmlinux, the project's test guest).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk handed to the kernel (boot_params for a bzImage,
    /// the first PVH module for an ELF).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = "")]
    pub cmdline: String,

    /// Number of vCPUs (1 to the host KVM's limit).
    #[arg(
        long,
        value_name = "N",
        default_value = "1",
        allow_hyphen_values = true
    )]
    pub cpus: String,

    /// Guest RAM size, in bytes or with a K, M, G or T suffix (powers of 1024).
    /// `size=SIZE,hugepages=on` puts it on 2 MiB huge pages, all taken at
    /// start (the memory backends map; what DPDK-based backends expect).
    #[arg(
        long,
        value_name = "SIZE|size=SIZE[,hugepages=on]",
        default_value = "512M",
        allow_hyphen_values = true
    )]
    pub memory: String,

    /// Where the 16550 console at 0x3f8 goes: `stdio` (stdin is forwarded;
    /// a terminal is put in raw mode, Ctrl-A x quits), `file=PATH`, or `off`.
    #[arg(long, value_name = "MODE", default_value = "stdio")]
    pub serial: OsString,

    /// A virtio-blk disk served by a vhost-user backend listening on PATH
    /// (our vhost-blk, qemu-storage-daemon, ...). Repeatable. num_queues
    /// defaults to 1, queue_size to 256.
    #[arg(
        long = "disk",
        value_name = "socket=PATH[,num_queues=N][,queue_size=N]"
    )]
    pub disks: Vec<OsString>,

    /// A virtio-net NIC whose packets a vhost-user backend moves (our
    /// vhost-net, DPDK's vhost PMD, OVS-DPDK, ...). Repeatable. The VMM
    /// connects to the backend's socket, or with server=on listens on it and
    /// waits for the backend (DPDK client=1, OVS dpdkvhostuserclient).
    /// num_queues counts queue pairs (default 1); mac defaults to one
    /// derived from the host's machine id and the socket path; queue_size
    /// defaults to 256.
    #[arg(
        long = "net",
        value_name = "socket=PATH[,mac=MAC][,num_queues=N][,queue_size=N][,server=on]"
    )]
    pub nets: Vec<OsString>,

    /// Serve the QMP control API on this Unix socket (see README.md for
    /// the commands). A stale socket file is replaced; it is removed at exit.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Serve the QMP control API on this TCP address. Only loopback
    /// addresses are accepted unless --api-tcp-allow-remote is given (QMP
    /// has no authentication).
    #[arg(long, value_name = "HOST:PORT")]
    pub api_tcp: Option<String>,

    /// Allow --api-tcp on a non-loopback address.
    #[arg(long)]
    pub api_tcp_allow_remote: bool,

    /// Exit (status 3) when the guest resets or QMP asks for a reset,
    /// instead of rebooting the VM in place.
    #[arg(long)]
    pub no_reboot: bool,

    /// A name for the VM, reported by QMP's query-name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Also write every ACPI table the VM gets to DIR/<SIGNATURE>.dat
    /// (e.g. for `iasl -d`), then boot as usual.
    #[arg(long, value_name = "DIR")]
    pub dump_acpi: Option<PathBuf>,
}
