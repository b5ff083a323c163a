//! A validated VM configuration, built from the command line with no side
//! effects other than looking at the host (file metadata, KVM limits and the
//! amount of host memory are passed in so the checks stay testable).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use vmm_common::shared_memory::{HUGEPAGE_POOL, HUGEPAGE_SIZE};

use crate::cli::Args;

/// Everything the builder needs to create a VM, already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_bytes: u64,
    /// Guest RAM on 2 MiB huge pages (hugetlbfs), all taken at start.
    pub hugepages: bool,
    pub serial: SerialMode,
    pub dump_acpi: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    pub api_socket: Option<PathBuf>,
    pub api_tcp: Option<std::net::SocketAddr>,
    pub name: Option<String>,
    pub no_reboot: bool,
}

/// A vhost-user-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub socket: PathBuf,
    pub num_queues: usize,
    pub queue_size: u16,
}

/// A vhost-user-net NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub socket: PathBuf,
    pub mac: [u8; 6],
    /// Queue pairs (each an RX and a TX queue).
    pub queue_pairs: usize,
    pub queue_size: u16,
    /// The VMM listens on the socket and waits for the backend to connect.
    pub server: bool,
}

/// Most queue pairs a NIC may ask for (two MSI-X vectors each, plus the
/// control queue and the config vector).
pub const MAX_QUEUE_PAIRS: usize = 31;

/// Most queues a device may ask for (one MSI-X vector each, plus one).
pub const MAX_QUEUES: usize = 64;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialMode {
    Stdio,
    File(PathBuf),
    Off,
}

/// Limits of the host the configuration is checked against.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// The most vCPUs the VM may have (KVM's limit, capped by the xAPIC ID space).
    pub max_cpus: u32,
    /// Host RAM plus swap, in bytes.
    pub memory_bytes: u64,
    /// 2 MiB huge pages free and not promised to anyone.
    pub free_hugepages: u64,
}

/// Guest RAM below this size cannot hold the boot structures and a kernel.
pub const MIN_MEMORY: u64 = 2 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--cpus {0:?}: not a number")]
    CpusNotANumber(String),
    #[error("--cpus {0}: must be at least 1")]
    CpusZero(u64),
    #[error("--cpus {value}: more than this host's limit of {max}")]
    CpusTooMany { value: u64, max: u32 },
    #[error("--memory {0:?}: not a size (use bytes or a K, M, G or T suffix, e.g. 512M)")]
    MemoryGarbled(String),
    #[error("--memory {0:?}: must be at least 2M")]
    MemoryTooSmall(String),
    #[error("--memory {value:?}: more than this host can give ({host_mib} MiB of RAM and swap)")]
    MemoryTooLarge { value: String, host_mib: u64 },
    #[error("--memory {value:?}: {why}")]
    MemoryOption { value: String, why: String },
    #[error("--memory {0:?}: with hugepages=on the size must be a multiple of 2M")]
    MemoryHugeAlign(String),
    #[error("--memory {0:?}: not a whole number of 4 KiB pages")]
    MemoryPageAlign(String),
    #[error("--memory {value:?}: needs {needed} huge pages of 2 MiB, the host has {free} free (raise {HUGEPAGE_POOL}/nr_hugepages)")]
    MemoryHugeShort {
        value: String,
        needed: u64,
        free: u64,
    },
    #[error("--serial {0:?}: expected stdio, file=PATH or off")]
    SerialMode(String),
    #[error("--serial file={0:?}: the same file as {1}, which the console log would overwrite")]
    SerialIsInput(PathBuf, &'static str),
    #[error("--kernel {0:?}: no such file")]
    KernelMissing(PathBuf),
    #[error("--kernel {0:?}: cannot read it: {1}")]
    KernelUnreadable(PathBuf, String),
    #[error("--kernel {0:?}: not a regular file")]
    KernelNotFile(PathBuf),
    #[error("--initramfs {0:?}: no such file")]
    InitramfsMissing(PathBuf),
    #[error("--initramfs {0:?}: cannot read it: {1}")]
    InitramfsUnreadable(PathBuf, String),
    #[error("--initramfs {0:?}: not a regular file")]
    InitramfsNotFile(PathBuf),
    #[error("--cmdline: contains a NUL byte")]
    CmdlineNul,
    #[error("--cmdline {0:?}: init arguments after \" -- \" need a kernel argument before it")]
    CmdlineInitOnly(String),
    #[error("--disk {value:?}: {why}")]
    Disk { value: String, why: String },
    #[error("--net {value:?}: {why}")]
    Net { value: String, why: String },
    #[error("--api-tcp {0:?}: not an address and port (e.g. 127.0.0.1:4444)")]
    ApiTcp(String),
    #[error("--api-tcp {0:?}: not a loopback address; add --api-tcp-allow-remote to listen on it (QMP has no authentication)")]
    ApiTcpRemote(String),
    #[error(
        "{second} socket {path:?}: already given to {first} (one backend connection per socket)"
    )]
    SocketTwice {
        path: PathBuf,
        first: &'static str,
        second: &'static str,
    },
    #[error("--net {second:?}: mac={mac} is already the address of --net {first:?}")]
    MacTwice {
        mac: String,
        first: String,
        second: String,
    },
    #[error("--disk and --net: {0} devices, more than the {MAX_PCI_DEVICES} PCI slots")]
    TooManyDevices(usize),
}

impl VmConfig {
    /// Checks the arguments against the host and builds the configuration.
    pub fn from_args(args: Args, host: HostLimits) -> Result<Self, ConfigError> {
        let cpus = parse_cpus(&args.cpus, host.max_cpus)?;
        let (memory_bytes, hugepages) = parse_memory(&args.memory, host)?;
        let serial = parse_serial(&args.serial)?;
        if args.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        // linux-loader writes no command line whose kernel part is empty.
        let init_only = match args.cmdline.split_once(" -- ") {
            Some((kernel, init)) => kernel.trim().is_empty() && !init.trim().is_empty(),
            None => false,
        };
        if init_only {
            return Err(ConfigError::CmdlineInitOnly(args.cmdline));
        }
        match readable_file(&args.kernel) {
            Readable::File => {}
            Readable::Missing => return Err(ConfigError::KernelMissing(args.kernel)),
            Readable::NotFile => return Err(ConfigError::KernelNotFile(args.kernel)),
            Readable::Unreadable(why) => {
                return Err(ConfigError::KernelUnreadable(args.kernel, why))
            }
        }
        if let Some(initramfs) = &args.initramfs {
            let path = initramfs.clone();
            match readable_file(initramfs) {
                Readable::File => {}
                Readable::Missing => return Err(ConfigError::InitramfsMissing(path)),
                Readable::NotFile => return Err(ConfigError::InitramfsNotFile(path)),
                Readable::Unreadable(why) => {
                    return Err(ConfigError::InitramfsUnreadable(path, why))
                }
            }
        }
        if let SerialMode::File(log) = &serial {
            let inputs = [
                ("--kernel", Some(&args.kernel)),
                ("--initramfs", args.initramfs.as_ref()),
            ];
            for (what, input) in inputs {
                if input.is_some_and(|input| same_file(log, input)) {
                    return Err(ConfigError::SerialIsInput(log.clone(), what));
                }
            }
        }
        let disks = args
            .disks
            .iter()
            .map(parse_disk)
            .collect::<Result<Vec<_>, _>>()?;
        let nets = args
            .nets
            .iter()
            .map(parse_net)
            .collect::<Result<Vec<_>, _>>()?;
        if disks.len() + nets.len() > MAX_PCI_DEVICES {
            return Err(ConfigError::TooManyDevices(disks.len() + nets.len()));
        }
        let sockets = disks
            .iter()
            .map(|d| ("--disk", &d.socket))
            .chain(nets.iter().map(|n| ("--net", &n.socket)))
            .chain(args.api_socket.iter().map(|p| ("--api-socket", p)));
        let mut seen: Vec<(&'static str, PathBuf)> = Vec::new();
        for (option, path) in sockets {
            let same = socket_identity(path);
            if let Some((first, _)) = seen.iter().find(|(_, other)| *other == same) {
                return Err(ConfigError::SocketTwice {
                    path: path.clone(),
                    first,
                    second: option,
                });
            }
            seen.push((option, same));
        }
        // Two NICs with one address on one network: each would get the
        // other's frames.
        for (index, net) in nets.iter().enumerate() {
            if let Some(first) = nets[..index].iter().position(|n| n.mac == net.mac) {
                return Err(ConfigError::MacTwice {
                    mac: format_mac(&net.mac),
                    first: args.nets[first].to_string_lossy().into_owned(),
                    second: args.nets[index].to_string_lossy().into_owned(),
                });
            }
        }
        let api_tcp = match &args.api_tcp {
            None => None,
            Some(text) => Some(parse_api_tcp(text, args.api_tcp_allow_remote)?),
        };
        Ok(VmConfig {
            disks,
            nets,
            api_socket: args.api_socket,
            api_tcp,
            name: args.name,
            no_reboot: args.no_reboot,
            kernel: args.kernel,
            initramfs: args.initramfs,
            cmdline: args.cmdline,
            cpus,
            memory_bytes,
            hugepages,
            serial,
            dump_acpi: args.dump_acpi,
        })
    }
}

/// PCI slots for devices (bus 0 has 32; the host bridge takes one).
pub const MAX_PCI_DEVICES: usize = crate::pci::bus::SLOTS - 1;

enum Readable {
    File,
    Missing,
    NotFile,
    Unreadable(String),
}

/// Whether `path` is a regular file this process can open for reading.
fn readable_file(path: &std::path::Path) -> Readable {
    // The type first: opening a FIFO would wait for a writer.
    match std::fs::metadata(path) {
        Ok(meta) if !meta.is_file() => return Readable::NotFile,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Readable::Missing,
        Err(e) => return Readable::Unreadable(e.to_string()),
        Ok(_) => {}
    }
    match std::fs::File::open(path) {
        Ok(_) => Readable::File,
        Err(e) => Readable::Unreadable(e.to_string()),
    }
}

/// What a socket path names, for telling two spellings of one socket
/// apart from two sockets: its directory resolved (`./n.sock`, `n.sock`
/// and a path through a symlinked directory are the same socket).
fn socket_identity(path: &std::path::Path) -> PathBuf {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return path.to_path_buf();
    };
    let dir = if dir.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        dir
    };
    match std::fs::canonicalize(dir) {
        Ok(dir) => dir.join(name),
        Err(_) => path.to_path_buf(),
    }
}

fn parse_cpus(text: &str, max: u32) -> Result<u8, ConfigError> {
    let value: u64 = text
        .trim()
        .parse()
        .map_err(|_| ConfigError::CpusNotANumber(text.to_string()))?;
    if value == 0 {
        return Err(ConfigError::CpusZero(value));
    }
    if value > u64::from(max) {
        return Err(ConfigError::CpusTooMany { value, max });
    }
    u8::try_from(value).map_err(|_| ConfigError::CpusTooMany { value, max })
}

/// Parses `512M`, `4G`, `1048576`, `2048K` (suffixes are powers of 1024,
/// case-insensitive, an optional trailing `B` or `iB` is accepted).
pub fn parse_size(text: &str) -> Option<u64> {
    parse_wide_size(text).and_then(|bytes| u64::try_from(bytes).ok())
}

/// `parse_size` without the 64-bit limit (up to 38 digits), so that a
/// well-formed size too large for any host is told apart from a garbled one.
fn parse_wide_size(text: &str) -> Option<u128> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .unwrap_or(t);
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let number: u128 = digits.parse().ok()?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" => 10,
        "M" | "MB" => 20,
        "G" | "GB" => 30,
        "T" | "TB" => 40,
        _ => return None,
    };
    number.checked_mul(1u128 << shift)
}

/// Parses `SIZE` or `size=SIZE[,hugepages=on|off]` into the RAM size and
/// whether it is on huge pages.
fn parse_memory(text: &str, host: HostLimits) -> Result<(u64, bool), ConfigError> {
    let (size_text, hugepages) = if text.contains('=') {
        let bad = |why: String| ConfigError::MemoryOption {
            value: text.to_string(),
            why,
        };
        let mut size = None;
        let mut hugepages = false;
        let pairs = options(OsStr::new(text))
            .map_err(|why| bad(format!("{why} (expected SIZE or size=SIZE[,hugepages=on])")))?;
        for (key, value) in pairs {
            let value = text_value(&key, &value).map_err(bad)?;
            match key.as_str() {
                "size" => size = Some(value.to_string()),
                "hugepages" => {
                    hugepages = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad(format!("hugepages={value} is not on or off"))),
                    }
                }
                _ => return Err(bad(format!("unknown option {key:?}"))),
            }
        }
        (
            size.ok_or_else(|| bad("size=SIZE is required".into()))?,
            hugepages,
        )
    } else {
        (text.to_string(), false)
    };
    let bytes = match (parse_size(&size_text), parse_wide_size(&size_text)) {
        (Some(bytes), _) => bytes,
        (None, Some(_)) => {
            return Err(ConfigError::MemoryTooLarge {
                value: text.to_string(),
                host_mib: host.memory_bytes >> 20,
            })
        }
        (None, None) => return Err(ConfigError::MemoryGarbled(text.to_string())),
    };
    if bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(text.to_string()));
    }
    // Huge pages come out of their own pool, which the host's RAM holds.
    if !hugepages && bytes > host.memory_bytes {
        return Err(ConfigError::MemoryTooLarge {
            value: text.to_string(),
            host_mib: host.memory_bytes >> 20,
        });
    }
    if hugepages {
        if bytes % HUGEPAGE_SIZE != 0 {
            return Err(ConfigError::MemoryHugeAlign(text.to_string()));
        }
        let needed = bytes / HUGEPAGE_SIZE;
        if needed > host.free_hugepages {
            return Err(ConfigError::MemoryHugeShort {
                value: text.to_string(),
                needed,
                free: host.free_hugepages,
            });
        }
    }
    // Guest RAM is mapped in whole pages.
    if bytes % 4096 != 0 {
        return Err(ConfigError::MemoryPageAlign(text.to_string()));
    }
    Ok((bytes, hugepages))
}

/// Splits `key=value,key=value` into its pairs. As in QEMU, `,,` is a comma
/// inside a value (a path with a comma in it); a key given twice is refused.
/// Keys are text; values are bytes, as a path may be (`text_value` gives
/// the others as text).
fn options(text: &OsStr) -> Result<Vec<(String, OsString)>, String> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = text.as_bytes().iter().copied().peekable();
    while let Some(b) = bytes.next() {
        if b != b',' {
            current.push(b);
        } else if bytes.next_if_eq(&b',').is_some() {
            current.push(b',');
        } else {
            parts.push(std::mem::take(&mut current));
        }
    }
    parts.push(current);
    let mut pairs: Vec<(String, OsString)> = Vec::with_capacity(parts.len());
    for mut part in parts {
        let shown = String::from_utf8_lossy(&part).into_owned();
        let equals = part
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| format!("{shown:?} is not key=value"))?;
        let value = part.split_off(equals + 1);
        part.truncate(equals);
        let key = String::from_utf8(part).map_err(|_| format!("{shown:?}: the key is not text"))?;
        if pairs.iter().any(|(seen, _)| *seen == key) {
            return Err(format!("{key} is given twice"));
        }
        pairs.push((key, OsString::from_vec(value)));
    }
    Ok(pairs)
}

/// An option's value that must be text (all but paths).
fn text_value<'a>(key: &str, value: &'a OsStr) -> Result<&'a str, String> {
    value
        .to_str()
        .ok_or_else(|| format!("{key}={} is not UTF-8 text", value.to_string_lossy()))
}

/// A device's options, split.
struct DeviceOptions {
    /// `socket=PATH`, taken as bytes. The caller requires it after it has
    /// checked the others, so a misspelt `sokcet=` is named as unknown, not
    /// as a missing socket.
    socket: Option<PathBuf>,
    /// The others, as text.
    others: Vec<(String, String)>,
}

fn device_options(text: &OsStr) -> Result<DeviceOptions, String> {
    let mut socket = None;
    let mut others = Vec::new();
    for (key, value) in options(text)? {
        if key == "socket" {
            if value.is_empty() {
                return Err("socket= is empty".into());
            }
            socket = Some(PathBuf::from(value));
        } else {
            let value = text_value(&key, &value)?.to_string();
            others.push((key, value));
        }
    }
    Ok(DeviceOptions { socket, others })
}

/// A device's `socket=PATH`, which it cannot do without.
fn required_socket(socket: Option<PathBuf>) -> Result<PathBuf, String> {
    socket.ok_or_else(|| "socket=PATH is required".to_string())
}

/// Parses `socket=PATH[,num_queues=N][,queue_size=N]`.
fn parse_disk(text: impl AsRef<OsStr>) -> Result<DiskConfig, ConfigError> {
    let text = text.as_ref();
    let bad = |why: String| ConfigError::Disk {
        value: text.to_string_lossy().into_owned(),
        why,
    };
    let mut num_queues = 1usize;
    let mut queue_size = DEFAULT_QUEUE_SIZE;
    let DeviceOptions { socket, others } = device_options(text).map_err(bad)?;
    for (key, value) in others {
        let value = value.as_str();
        match key.as_str() {
            "num_queues" => {
                num_queues = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_QUEUES).contains(n))
                    .ok_or_else(|| bad(format!("num_queues={value} is not 1 to {MAX_QUEUES}")))?;
            }
            "queue_size" => {
                queue_size = parse_queue_size(value).map_err(bad)?;
                if queue_size < 4 {
                    // A request is a header, data and a status.
                    return Err(bad(format!(
                        "queue_size={value} is too small for a disk: 4 at least"
                    )));
                }
            }
            _ => return Err(bad(format!("unknown option {key:?}"))),
        }
    }
    let socket = required_socket(socket).map_err(bad)?;
    Ok(DiskConfig {
        socket,
        num_queues,
        queue_size,
    })
}

/// A ring size: a power of two up to 32768.
fn parse_queue_size(value: &str) -> Result<u16, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|n| n.is_power_of_two())
        .ok_or_else(|| format!("queue_size={value} is not a power of two up to 32768"))
}

/// Parses `socket=PATH[,mac=MAC][,num_queues=N][,queue_size=N][,server=on|off]`.
/// `num_queues` counts queue pairs, as QEMU's `queues=` does.
fn parse_net(text: impl AsRef<OsStr>) -> Result<NetConfig, ConfigError> {
    let text = text.as_ref();
    let bad = |why: String| ConfigError::Net {
        value: text.to_string_lossy().into_owned(),
        why,
    };
    let mut mac = None;
    let mut queue_pairs = 1usize;
    let mut queue_size = DEFAULT_QUEUE_SIZE;
    let mut server = false;
    let DeviceOptions { socket, others } = device_options(text).map_err(bad)?;
    for (key, value) in others {
        let value = value.as_str();
        match key.as_str() {
            "mac" => {
                mac = Some(parse_mac(value).ok_or_else(|| {
                    bad(format!(
                        "mac={value} is not a unicast MAC address like 52:54:00:12:34:56"
                    ))
                })?)
            }
            "num_queues" => {
                queue_pairs = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
                    .ok_or_else(|| {
                        bad(format!(
                            "num_queues={value} is not 1 to {MAX_QUEUE_PAIRS} queue pairs"
                        ))
                    })?;
            }
            "queue_size" => queue_size = parse_queue_size(value).map_err(bad)?,
            "server" => {
                server = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(bad(format!("server={value} is not on or off"))),
                }
            }
            _ => return Err(bad(format!("unknown option {key:?}"))),
        }
    }
    let socket = required_socket(socket).map_err(bad)?;
    let mac = mac.unwrap_or_else(|| stable_mac(&socket));
    Ok(NetConfig {
        socket,
        mac,
        queue_pairs,
        queue_size,
        server,
    })
}

/// `HOST:PORT` with an IP address or `localhost`; loopback only unless
/// `allow_remote`.
fn parse_api_tcp(text: &str, allow_remote: bool) -> Result<std::net::SocketAddr, ConfigError> {
    // No name lookup: what a host name resolves to (Debian maps its own to
    // 127.0.1.1) is not what the user wrote.
    let literal = match text.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => text.to_string(),
    };
    let addr: std::net::SocketAddr = literal
        .parse()
        .map_err(|_| ConfigError::ApiTcp(text.to_string()))?;
    if addr.port() == 0 {
        return Err(ConfigError::ApiTcp(text.to_string()));
    }
    if !allow_remote && !addr.ip().is_loopback() {
        return Err(ConfigError::ApiTcpRemote(text.to_string()));
    }
    Ok(addr)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `aa:bb:cc:dd:ee:ff` (or with dashes), unicast and not all zeroes.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    if parts.next().is_some() || mac[0] & 1 != 0 || mac == [0; 6] {
        return None;
    }
    Some(mac)
}

/// A locally administered MAC derived from this host's identity and the
/// socket path: the same command line gives the guest the same address
/// every time, and the same command line on another host (on the same
/// network, say) another address.
fn stable_mac(socket: &std::path::Path) -> [u8; 6] {
    mac_of(&host_identity(), socket.as_os_str().as_encoded_bytes())
}

/// /etc/machine-id, or the host name where there is none.
fn host_identity() -> Vec<u8> {
    ["/etc/machine-id", "/proc/sys/kernel/hostname"]
        .iter()
        .filter_map(|path| std::fs::read(path).ok())
        .map(|id| id.trim_ascii().to_vec())
        .find(|id| !id.is_empty())
        .unwrap_or_default()
}

/// 52:54:00 and three bytes of the FNV-1a hash (stable across Rust
/// versions, unlike DefaultHasher) of "HOST/NAME".
fn mac_of(host: &[u8], name: &[u8]) -> [u8; 6] {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in host.iter().chain(b"/").chain(name) {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = hash.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

/// Whether `a` and `b` name one existing file (the same device and inode,
/// however each is spelled).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn parse_serial(text: &OsStr) -> Result<SerialMode, ConfigError> {
    match text.as_bytes() {
        b"stdio" => Ok(SerialMode::Stdio),
        b"off" => Ok(SerialMode::Off),
        bytes => match bytes.strip_prefix(b"file=") {
            Some(path) if !path.is_empty() => {
                Ok(SerialMode::File(PathBuf::from(OsStr::from_bytes(path))))
            }
            _ => Err(ConfigError::SerialMode(text.to_string_lossy().into_owned())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostLimits = HostLimits {
        max_cpus: 254,
        memory_bytes: 24 << 30,
        free_hugepages: 100,
    };

    fn args(cpus: &str, memory: &str, serial: &str) -> Args {
        Args {
            kernel: PathBuf::from("/proc/self/exe"),
            initramfs: None,
            cmdline: String::new(),
            cpus: cpus.into(),
            memory: memory.into(),
            serial: serial.into(),
            dump_acpi: None,
            disks: Vec::new(),
            nets: Vec::new(),
            api_socket: None,
            api_tcp: None,
            api_tcp_allow_remote: false,
            name: None,
            no_reboot: false,
        }
    }

    /// linux-loader writes no line whose part before " -- " is empty; a
    /// line that only starts with "--" it takes whole.
    #[test]
    fn a_cmdline_of_init_arguments_alone_is_refused() {
        let with = |cmdline: &str| {
            let mut a = args("1", "64M", "stdio");
            a.cmdline = cmdline.into();
            VmConfig::from_args(a, HOST)
        };
        assert!(matches!(
            with(" -- init=/bin/sh"),
            Err(ConfigError::CmdlineInitOnly(_))
        ));
        for fine in ["", "-- single", "console=ttyS0 -- single", " -- "] {
            assert!(with(fine).is_ok(), "{fine:?}");
        }
    }

    #[test]
    fn sizes_take_suffixes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("4g"), Some(4 << 30));
        assert_eq!(parse_size("2048K"), Some(2 << 20));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("abc"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
        assert_eq!(parse_size("16777216T"), None);
    }

    /// A well-formed size past 2^64 bytes is too large, not garbled.
    #[test]
    fn a_size_too_large_for_64_bits_is_called_too_large() {
        let err = |memory: &str| VmConfig::from_args(args("1", memory, "off"), HOST).unwrap_err();
        for memory in [
            "16777216T",
            "99999999999999999999T",
            "size=16777216T,hugepages=on",
        ] {
            assert!(
                matches!(err(memory), ConfigError::MemoryTooLarge { .. }),
                "{memory}: {}",
                err(memory)
            );
        }
        assert_eq!(
            err("16777216Q"),
            ConfigError::MemoryGarbled("16777216Q".into())
        );
    }

    #[test]
    fn disks_are_parsed_and_checked() {
        assert_eq!(
            parse_disk("socket=/run/d.sock,num_queues=2,queue_size=128").unwrap(),
            DiskConfig {
                socket: "/run/d.sock".into(),
                num_queues: 2,
                queue_size: 128
            }
        );
        assert_eq!(
            parse_disk("socket=/x").unwrap().queue_size,
            DEFAULT_QUEUE_SIZE
        );
        for bad in [
            "num_queues=2",
            "socket=",
            "socket=/x,num_queues=0",
            "socket=/x,queue_size=100",
            "socket=/x,queue_size=2",
            "socket=/x,queue_size=65536",
            "socket=/x,color=red",
            "/x",
            "socket=/x,socket=/y",
            "socket=/x,",
        ] {
            let err = parse_disk(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--disk {bad:?}")), "{err}");
        }
        let err = parse_disk("socket=").unwrap_err().to_string();
        assert!(err.ends_with("socket= is empty"), "{err}");
        let err = parse_disk("socket=/x,color=red").unwrap_err().to_string();
        assert!(err.ends_with("unknown option \"color\""), "{err}");
        // A misspelt socket is named, not reported as missing.
        let err = parse_disk("path=/x").unwrap_err().to_string();
        assert!(err.ends_with("unknown option \"path\""), "{err}");
        let err = parse_net("sokcet=/x").unwrap_err().to_string();
        assert!(err.ends_with("unknown option \"sokcet\""), "{err}");
        let err = parse_net("mac=52:54:00:12:34:56").unwrap_err().to_string();
        assert!(err.ends_with("socket=PATH is required"), "{err}");
    }

    #[test]
    fn a_double_comma_is_a_comma_in_a_value() {
        assert_eq!(
            parse_disk("socket=/run/a,,b.sock,num_queues=2").unwrap(),
            DiskConfig {
                socket: "/run/a,b.sock".into(),
                num_queues: 2,
                queue_size: DEFAULT_QUEUE_SIZE
            }
        );
        assert_eq!(
            parse_net("socket=/run/n,,,,x,,").unwrap().socket,
            PathBuf::from("/run/n,,x,")
        );
        let err = parse_disk("socket=/x,num_queues=1,num_queues=2")
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_queues is given twice"), "{err}");
    }

    #[test]
    fn paths_need_not_be_text() {
        let bytes = |b: &[u8]| OsStr::from_bytes(b).to_os_string();
        let disk = parse_disk(bytes(b"socket=/run/\xffd.sock,num_queues=2")).unwrap();
        assert_eq!(disk.socket.as_os_str().as_bytes(), b"/run/\xffd.sock");
        assert_eq!(disk.num_queues, 2);
        let net = parse_net(bytes(b"socket=/run/\xfe,,n.sock")).unwrap();
        assert_eq!(net.socket.as_os_str().as_bytes(), b"/run/\xfe,n.sock");
        assert_eq!(
            parse_serial(&bytes(b"file=/tmp/\xff.log")).unwrap(),
            SerialMode::File(PathBuf::from(bytes(b"/tmp/\xff.log")))
        );
        // The other values are text, and the error shows what it can.
        let err = parse_disk(bytes(b"socket=/x,num_queues=\xff"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--disk \"socket=/x,num_queues=\u{fffd}\"")
                && err.ends_with("num_queues=\u{fffd} is not UTF-8 text"),
            "{err}"
        );
        let err = parse_net(bytes(b"socket=/x,\xff=1"))
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("the key is not text"), "{err}");
        let err = parse_serial(&bytes(b"fil\xff")).unwrap_err().to_string();
        assert!(err.starts_with("--serial \"fil\u{fffd}\""), "{err}");
    }

    #[test]
    fn api_tcp_is_loopback_unless_allowed() {
        assert_eq!(parse_api_tcp("127.0.0.1:4444", false).unwrap().port(), 4444);
        assert!(parse_api_tcp("localhost:4444", false).is_ok());
        assert!(parse_api_tcp("[::1]:4444", false).is_ok());
        assert_eq!(
            parse_api_tcp("0.0.0.0:4444", false),
            Err(ConfigError::ApiTcpRemote("0.0.0.0:4444".into()))
        );
        assert!(parse_api_tcp("0.0.0.0:4444", true).is_ok());
        for bad in [
            "4444",
            ":4444",
            "127.0.0.1",
            "127.0.0.1:http",
            "host name:1",
            "127.0.0.1:0",
            // Names are not looked up.
            "localhost.localdomain:4444",
            "ip6-localhost:4444",
        ] {
            assert_eq!(
                parse_api_tcp(bad, false),
                Err(ConfigError::ApiTcp(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn nets_are_parsed_and_checked() {
        let net =
            parse_net("socket=/run/n.sock,mac=52:54:00:aa:bb:cc,num_queues=2,server=on").unwrap();
        assert_eq!(net.mac, [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]);
        assert_eq!(net.queue_pairs, 2);
        assert!(net.server);
        let plain = parse_net("socket=/run/n.sock").unwrap();
        assert_eq!(
            (plain.queue_pairs, plain.queue_size),
            (1, DEFAULT_QUEUE_SIZE)
        );
        assert!(!plain.server);
        // The derived MAC is stable and depends on the socket.
        assert_eq!(plain.mac, parse_net("socket=/run/n.sock").unwrap().mac);
        assert_ne!(plain.mac, parse_net("socket=/run/m.sock").unwrap().mac);
        assert_eq!(plain.mac, mac_of(&host_identity(), b"/run/n.sock"));
        assert_ne!(
            mac_of(b"host-a", b"/run/n.sock"),
            mac_of(b"host-b", b"/run/n.sock"),
            "another host, another address"
        );
        assert_eq!(plain.mac[0] & 3, 2, "locally administered unicast");
        for bad in [
            "mac=52:54:00:00:00:01",
            "socket=/x,mac=01:00:5e:00:00:01",
            "socket=/x,mac=00:00:00:00:00:00",
            "socket=/x,mac=52:54:00:00:00",
            "socket=/x,mac=52:54:00:00:00:zz",
            "socket=/x,num_queues=0",
            "socket=/x,num_queues=32",
            "socket=/x,queue_size=100",
            "socket=/x,server=maybe",
            "socket=/x,vhost=on",
        ] {
            let err = parse_net(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--net {bad:?}")), "{err}");
        }
    }

    #[test]
    fn valid_arguments_become_a_config() {
        let config = VmConfig::from_args(args("4", "1G", "file=/tmp/x"), HOST).unwrap();
        assert_eq!(config.cpus, 4);
        assert_eq!(config.memory_bytes, 1 << 30);
        assert_eq!(config.serial, SerialMode::File("/tmp/x".into()));
    }

    #[test]
    fn memory_may_be_on_huge_pages() {
        let config = VmConfig::from_args(args("1", "size=64M,hugepages=on", "off"), HOST).unwrap();
        assert_eq!((config.memory_bytes, config.hugepages), (64 << 20, true));
        let config = VmConfig::from_args(args("1", "size=64M", "off"), HOST).unwrap();
        assert_eq!((config.memory_bytes, config.hugepages), (64 << 20, false));
        let err = |memory: &str| {
            VmConfig::from_args(args("1", memory, "off"), HOST)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("size=5M,hugepages=on"),
            "--memory \"size=5M,hugepages=on\": with hugepages=on the size must be a multiple of 2M"
        );
        assert_eq!(
            err("size=1G,hugepages=on"),
            "--memory \"size=1G,hugepages=on\": needs 512 huge pages of 2 MiB, the host has 100 free (raise /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)"
        );
        assert_eq!(
            err("size=64M,hugepages=yes"),
            "--memory \"size=64M,hugepages=yes\": hugepages=yes is not on or off"
        );
        assert_eq!(
            err("hugepages=on"),
            "--memory \"hugepages=on\": size=SIZE is required"
        );
        assert_eq!(
            err("size=64M,shared=on"),
            "--memory \"size=64M,shared=on\": unknown option \"shared\""
        );
        assert!(err("size=12Q").starts_with("--memory \"size=12Q\": not a size"));
        assert_eq!(
            err("512M,hugepages=on"),
            "--memory \"512M,hugepages=on\": \"512M\" is not key=value (expected SIZE or size=SIZE[,hugepages=on])"
        );
        // The pool, not RAM plus swap, bounds memory on huge pages.
        assert!(err("size=100T,hugepages=on").contains("needs 52428800 huge pages"));
    }

    #[test]
    fn bad_values_are_named() {
        let err = VmConfig::from_args(args("0", "1G", "off"), HOST).unwrap_err();
        assert_eq!(err.to_string(), "--cpus 0: must be at least 1");
        let err = VmConfig::from_args(args("300", "1G", "off"), HOST).unwrap_err();
        assert!(err.to_string().starts_with("--cpus 300:"));
        let err = VmConfig::from_args(args("x", "1G", "off"), HOST).unwrap_err();
        assert!(err.to_string().contains("\"x\""));
        let err = VmConfig::from_args(args("1", "0", "off"), HOST).unwrap_err();
        assert!(err.to_string().starts_with("--memory \"0\""));
        let err = VmConfig::from_args(args("1", "100T", "off"), HOST).unwrap_err();
        assert!(err.to_string().starts_with("--memory \"100T\": more than"));
        let err = VmConfig::from_args(args("1", "12Q", "off"), HOST).unwrap_err();
        assert!(err.to_string().starts_with("--memory \"12Q\": not a size"));
        let err = VmConfig::from_args(args("1", "1G", "tcp"), HOST).unwrap_err();
        assert!(err.to_string().starts_with("--serial \"tcp\""));
        let mut missing = args("1", "1G", "off");
        missing.kernel = "/nonexistent/kernel".into();
        let err = VmConfig::from_args(missing, HOST).unwrap_err();
        assert_eq!(
            err,
            ConfigError::KernelMissing("/nonexistent/kernel".into())
        );
        let mut directory = args("1", "1G", "off");
        directory.kernel = "/".into();
        let err = VmConfig::from_args(directory, HOST).unwrap_err();
        assert_eq!(err, ConfigError::KernelNotFile("/".into()));
        // A path through a file is not "no such file".
        let mut through_file = args("1", "1G", "off");
        through_file.kernel = "/proc/self/exe/kernel".into();
        let err = VmConfig::from_args(through_file, HOST).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--kernel \"/proc/self/exe/kernel\": cannot read it: Not a directory"),
            "{err}"
        );
    }

    /// A FIFO is refused by its type, without opening it (which would
    /// wait for a writer that never comes).
    #[test]
    fn a_fifo_as_the_kernel_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("kernel");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let mut a = args("1", "64M", "off");
        a.kernel = fifo.clone();
        let err = VmConfig::from_args(a, HOST).unwrap_err();
        assert_eq!(err, ConfigError::KernelNotFile(fifo));
    }

    #[test]
    fn memory_in_part_pages_is_refused() {
        let err = VmConfig::from_args(args("1", "1000000000", "off"), HOST).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--memory \"1000000000\": not a whole number of 4 KiB pages"
        );
        let config = VmConfig::from_args(args("1", "999997440", "off"), HOST).unwrap();
        assert_eq!(config.memory_bytes, 999997440);
    }

    #[test]
    fn two_nics_with_one_address_are_refused() {
        let mut a = args("1", "64M", "off");
        a.nets = vec![
            "socket=/run/a.sock,mac=52:54:00:00:00:01".into(),
            "socket=/run/b.sock,mac=52-54-00-00-00-01".into(),
        ];
        let err = VmConfig::from_args(a, HOST).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--net \"socket=/run/b.sock,mac=52-54-00-00-00-01\": mac=52:54:00:00:00:01 is already the address of --net \"socket=/run/a.sock,mac=52:54:00:00:00:01\""
        );
        let mut a = args("1", "64M", "off");
        a.nets = vec!["socket=/run/a.sock".into(), "socket=/run/b.sock".into()];
        assert!(VmConfig::from_args(a, HOST).is_ok());
    }

    /// One socket is one backend connection: it may serve one device, and
    /// the API socket is not a device's.
    #[test]
    fn a_socket_given_to_two_devices_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        let same = format!("{}/./d.sock", dir.path().display());
        /// Disks, NICs, the API socket, how the error starts.
        type Case<'a> = (&'a [String], &'a [String], Option<String>, &'a str);
        let cases: [Case<'_>; 4] = [
            (
                &[format!("socket={}", at("d.sock")), format!("socket={same}")],
                &[],
                None,
                "--disk socket",
            ),
            (
                &[format!("socket={}", at("d.sock"))],
                &[format!("socket={}", at("d.sock"))],
                None,
                "--net socket",
            ),
            (
                &[],
                &[
                    format!("socket={}", at("n.sock")),
                    format!("socket={}", at("n.sock")),
                ],
                None,
                "--net socket",
            ),
            (
                &[format!("socket={}", at("d.sock"))],
                &[],
                Some(at("d.sock")),
                "--api-socket socket",
            ),
        ];
        for (disks, nets, api, starts) in cases {
            let mut a = args("1", "1G", "off");
            a.disks = disks.iter().map(OsString::from).collect();
            a.nets = nets.iter().map(OsString::from).collect();
            a.api_socket = api.map(PathBuf::from);
            let err = VmConfig::from_args(a, HOST).unwrap_err().to_string();
            assert!(
                err.starts_with(starts) && err.contains("already given to"),
                "{err}"
            );
        }
        let mut fine = args("1", "1G", "off");
        fine.disks = vec![
            format!("socket={}", at("d.sock")).into(),
            format!("socket={}", at("e.sock")).into(),
        ];
        fine.nets = vec![format!("socket={}", at("n.sock")).into()];
        assert!(VmConfig::from_args(fine, HOST).is_ok());
    }

    #[test]
    fn more_devices_than_pci_slots_are_refused_up_front() {
        let mut a = args("1", "1G", "off");
        a.disks = (0..=MAX_PCI_DEVICES)
            .map(|i| format!("socket=/run/d{i}.sock").into())
            .collect();
        assert_eq!(
            VmConfig::from_args(a, HOST).unwrap_err().to_string(),
            "--disk and --net: 32 devices, more than the 31 PCI slots"
        );
    }
}
