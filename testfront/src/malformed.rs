//! Vhost-user messages no frontend should send, for checking that a
//! backend drops the connection that sent them and serves on. Each comes
//! with what is wrong with it.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const HEADER_LEN: usize = 12;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_KICK: u32 = 12;

/// A message of `code` with `payload`, framed as a frontend frames it
/// (version 1 in the flags).
pub fn message(code: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&code.to_le_bytes());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Malformed openings of a connection, each named.
pub fn nonsense() -> Vec<(&'static str, Vec<u8>)> {
    let owner = message(SET_OWNER, &[]);
    let with_header = |edit: fn(&mut Vec<u8>)| {
        let mut m = owner.clone();
        edit(&mut m);
        m
    };
    let mut many_regions = vec![0u8; 8 + 32];
    many_regions[..4].copy_from_slice(&200u32.to_le_bytes());
    let mut ring_99 = vec![0u8; 8];
    ring_99[..4].copy_from_slice(&99u32.to_le_bytes());
    ring_99[4..].copy_from_slice(&256u32.to_le_bytes());
    vec![
        ("a partial header", vec![1, 0, 0]),
        ("an unknown request", message(0xffff, &[])),
        ("a bad version", with_header(|m| m[4] = 0x7)),
        (
            "a huge size",
            with_header(|m| m[8..12].copy_from_slice(&0x1000_0000u32.to_le_bytes())),
        ),
        (
            "a memory table of 200 regions and no fds",
            [owner.clone(), message(SET_MEM_TABLE, &many_regions)].concat(),
        ),
        (
            "a ring index out of range",
            [owner.clone(), message(SET_VRING_NUM, &ring_99)].concat(),
        ),
        (
            "a kick for ring 0 without its fd",
            [owner, message(SET_VRING_KICK, &0u64.to_le_bytes())].concat(),
        ),
        (
            "random bytes",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
    ]
}

/// Sends `bytes` on a new connection to `socket` (hanging up first when
/// they do not even make a header) and reports whether the backend closed
/// the connection within `timeout`.
pub fn backend_hangs_up(socket: &Path, bytes: &[u8], timeout: Duration) -> std::io::Result<bool> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    // The backend may close before it has read everything.
    let _ = stream.write_all(bytes);
    if bytes.len() < HEADER_LEN {
        stream.shutdown(std::net::Shutdown::Write)?;
    }
    closed(&mut stream)
}

/// As `backend_hangs_up`, but true only if the backend also sent nothing
/// back first: a request it must refuse, not answer.
pub fn backend_hangs_up_unanswered(
    socket: &Path,
    bytes: &[u8],
    timeout: Duration,
) -> std::io::Result<bool> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    Ok(read_until_closed(&mut stream, &mut answer)? && answer.is_empty())
}

/// Whether the backend closes `stream` within its read timeout (whatever
/// it sends before that is read and dropped).
fn closed(stream: &mut UnixStream) -> std::io::Result<bool> {
    read_until_closed(stream, &mut Vec::new())
}

/// Reads what the backend sends into `rest` until it closes `stream`
/// (true) or the read timeout passes (false).
fn read_until_closed(stream: &mut UnixStream, rest: &mut Vec<u8>) -> std::io::Result<bool> {
    match stream.read_to_end(rest) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        // A reset is a hang-up too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(true),
        Err(e) => Err(e),
    }
}

/// Hands the backend a memory table whose one region claims 1 MiB of a
/// 64 KiB memfd, puts ring 0 past the end of the file, enables it and
/// kicks it: a backend that maps the whole region and reads the ring dies
/// of SIGBUS. Reports whether the backend closed the connection within
/// `timeout` (the requests after the table may fail once it has).
pub fn ring_past_the_end_of_its_memory(socket: &Path, timeout: Duration) -> std::io::Result<bool> {
    ring_in_missing_memory(socket, timeout, Shrink::BeforeTheTable)
}

/// As `ring_past_the_end_of_its_memory`, but the memfd is 1 MiB when the
/// table is sent and cut to 64 KiB right after (before the ring is set up
/// and kicked): the backend cannot see it coming when it maps the region.
pub fn ring_in_memory_shrunk_after_the_table(
    socket: &Path,
    timeout: Duration,
) -> std::io::Result<bool> {
    ring_in_missing_memory(socket, timeout, Shrink::AfterTheTable)
}

#[derive(Clone, Copy, PartialEq)]
enum Shrink {
    BeforeTheTable,
    AfterTheTable,
}

fn ring_in_missing_memory(
    socket: &Path,
    timeout: Duration,
    shrink: Shrink,
) -> std::io::Result<bool> {
    const FRONTEND_ADDR: u64 = 0x7f00_0000_0000;
    const VERSION_1: u64 = 1 << 32;
    const PROTOCOL_FEATURES: u64 = 1 << 30;
    let stream = UnixStream::connect(socket)?;
    let mut watch = stream.try_clone()?;
    // SAFETY: a NUL-terminated name; the call takes no other memory.
    let fd = unsafe { libc::memfd_create(c"short-memory".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let short = 64 << 10;
    file.set_len(match shrink {
        Shrink::BeforeTheTable => short,
        Shrink::AfterTheTable => 1 << 20,
    })?;
    let kick = EventFd::new(libc::EFD_NONBLOCK)?;
    let call = EventFd::new(libc::EFD_NONBLOCK)?;
    let mut frontend = Frontend::from_stream(stream, 1);
    let exchange = |frontend: &mut Frontend| -> vhost::Result<()> {
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        if offered & PROTOCOL_FEATURES != 0 {
            frontend.get_protocol_features()?;
            frontend.set_protocol_features(VhostUserProtocolFeatures::empty())?;
        }
        frontend.set_features(offered & (VERSION_1 | PROTOCOL_FEATURES))?;
        frontend.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: 1 << 20,
            userspace_addr: FRONTEND_ADDR,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }])?;
        if shrink == Shrink::AfterTheTable {
            // A request with a reply: once it comes back, the handler has
            // taken (mapped) the table, whole.
            frontend.get_features()?;
            file.set_len(short).map_err(vhost::Error::IOError)?;
        }
        frontend.set_vring_num(0, 16)?;
        frontend.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 16,
                queue_size: 16,
                flags: 0,
                desc_table_addr: FRONTEND_ADDR + (512 << 10),
                used_ring_addr: FRONTEND_ADDR + (516 << 10),
                avail_ring_addr: FRONTEND_ADDR + (520 << 10),
                log_addr: None,
            },
        )?;
        frontend.set_vring_base(0, 0)?;
        frontend.set_vring_kick(0, &kick)?;
        frontend.set_vring_call(0, &call)?;
        if offered & PROTOCOL_FEATURES != 0 {
            frontend.set_vring_enable(0, true)?;
        }
        Ok(())
    };
    // A backend that stops answering midway ends the exchange, not the test.
    let limit = crate::connection::Watch::arm(watch.try_clone()?, timeout)?;
    if let Err(e) = exchange(&mut frontend) {
        log::debug!("a ring past the end of its memory: {e}");
    }
    if limit.disarm() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the backend stopped answering within {timeout:?}"),
        ));
    }
    let _ = kick.write(1);
    watch.set_read_timeout(Some(timeout))?;
    closed(&mut watch)
}
