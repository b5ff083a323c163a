//! A message relay between a vhost-user frontend and the vhost crate's
//! request handler in a backend process, for what the handler does not
//! let a backend do itself: see a message in passing (vhost-blk keeps the
//! backend request channel the frontend sends, to tell it of a resized
//! disk) or put one in before it (vhost-net answers a QEMU quirk).
//!
//! Each frontend connects to the backend's public socket; the relay copies
//! whole messages, with their file descriptors (SCM_RIGHTS), between it and
//! the handler, which listens on an inner socket in a directory only this
//! user may enter (mode 0700), so no other local user can connect there in
//! the relay's place.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::thread::JoinHandle;

pub const HEADER_LEN: usize = 12;
/// Larger payloads than this are not vhost-user messages.
const MAX_PAYLOAD: usize = 64 * 1024;
/// vhost-user sends at most 8 descriptors per message (memory regions).
const MAX_FDS: usize = 32;

/// One message from the frontend, as the relay passes it on.
pub struct Message<'a> {
    /// The request code (the header's first word).
    pub request: u32,
    pub payload: &'a [u8],
    /// The descriptors that came with it (the handler gets its own copies).
    pub fds: &'a [OwnedFd],
}

/// Sees each message from the frontend before the handler does, and may
/// send the handler messages of its own first (on the stream given).
pub type Inspect = Box<dyn FnMut(&Message<'_>, &UnixStream) -> io::Result<()> + Send>;

/// The two copying threads of one connection.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` and `backend` until either side closes;
    /// `inspect` sees what the frontend sends. `offered` is the backend's
    /// protocol features: the frontend may ack no others.
    pub fn start(
        frontend: UnixStream,
        backend: UnixStream,
        offered: u64,
        inspect: Inspect,
    ) -> io::Result<Relay> {
        Self::start_with_end(frontend, backend, offered, inspect, Box::new(|| ()))
    }

    /// `start`, with `frontend_left` run as soon as the frontend's side
    /// ends (it closed, or the connection was shut down), before the
    /// handler is told.
    pub fn start_with_end(
        frontend: UnixStream,
        backend: UnixStream,
        offered: u64,
        mut inspect: Inspect,
        frontend_left: Box<dyn FnOnce() + Send>,
    ) -> io::Result<Relay> {
        let (f_read, f_write) = (frontend.try_clone()?, frontend);
        let (b_read, b_write) = (backend.try_clone()?, backend);
        let to_backend = std::thread::Builder::new()
            .name("relay-in".into())
            .spawn(move || {
                let result = copy_messages(&f_read, &b_write, &mut |m, to| {
                    check_memory_regions(m)?;
                    check_ring_events(m)?;
                    check_ring_size(m)?;
                    check_protocol_features(m, offered)?;
                    inspect(m, to)?;
                    if matches!(m.request, SET_MEM_TABLE | ADD_MEM_REGION) {
                        // Passed on next: the workers may touch it before
                        // the backend watches it.
                        crate::lost_memory::table_coming();
                    }
                    Ok(())
                });
                frontend_left();
                finish("frontend", result, &b_write);
            })?;
        let to_frontend =
            std::thread::Builder::new()
                .name("relay-out".into())
                .spawn(move || {
                    let result = copy_messages(&b_read, &f_write, &mut |_, _| Ok(()));
                    finish("backend", result, &f_write);
                })?;
        Ok(Relay {
            threads: vec![to_backend, to_frontend],
        })
    }

    /// Waits for both directions to end.
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// A private directory (mode 0700) for the handler's inner socket; it goes
/// when dropped.
pub fn private_dir(prefix: &str) -> io::Result<tempfile::TempDir> {
    // tempfile leaves the mode to the umask unless told.
    tempfile::Builder::new()
        .prefix(prefix)
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
}

/// Where the handler listens inside a private directory.
pub fn inner_socket(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("relay.sock")
}

/// Binds the handler's inner socket at `path`; the error names it (a long
/// TMPDIR makes it too long for a socket, and the user knows only the
/// public one).
pub fn bind_inner(path: &std::path::Path) -> io::Result<std::os::unix::net::UnixListener> {
    std::os::unix::net::UnixListener::bind(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("the relay's inner socket {}: {e}", path.display()),
        )
    })
}

/// Shuts the other side down once one direction ends, so both threads stop.
fn finish(from: &str, result: io::Result<()>, other: &UnixStream) {
    match result {
        Ok(()) => log::debug!("relay: the {from} closed its side"),
        Err(e) => log::debug!("relay: {from} side ended: {e}"),
    }
    let _ = other.shutdown(std::net::Shutdown::Both);
}

const SET_MEM_TABLE: u32 = 5;
const ADD_MEM_REGION: u32 = 37;
/// A memory region in a message: guest address, size, frontend address,
/// offset in its file (four little-endian u64).
const REGION_LEN: usize = 32;

/// Refuses (ending the connection) a memory table or added region that
/// reaches past the end of its file: the backend would map it all the
/// same (neither the vhost crate nor vm-memory looks), and its first touch
/// of a ring or buffer there would kill it with SIGBUS. Regions on files
/// that are not regular (devices) are left to the mapping.
fn check_memory_regions(message: &Message<'_>) -> io::Result<()> {
    let regions = match message.request {
        SET_MEM_TABLE => message.payload.get(8..),
        ADD_MEM_REGION => message.payload.get(8..8 + REGION_LEN),
        _ => return Ok(()),
    };
    // A malformed payload is the handler's to refuse.
    let Some(regions) = regions else {
        return Ok(());
    };
    for (index, (region, fd)) in regions
        .chunks_exact(REGION_LEN)
        .zip(message.fds)
        .enumerate()
    {
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&region[at..at + 8]);
            u64::from_le_bytes(bytes)
        };
        let (size, offset) = (word(8), word(24));
        // SAFETY: an all-zero stat is a valid value for fstat to fill.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open (owned by the message) and `stat` is
        // writable for the call.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            continue;
        }
        let file_len = stat.st_size as u64;
        if let Some(page) = huge_page_size(fd, &stat)? {
            if size % page != 0 || offset % page != 0 {
                let e = format!(
                    "memory region {index}: {size:#x} bytes at offset {offset:#x} of a file of \
                     {page:#x}-byte huge pages are not whole pages"
                );
                log::warn!("the frontend's {e}; ending the connection");
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
        if offset.checked_add(size).is_none_or(|end| end > file_len) {
            let e = format!(
                "memory region {index}: {size:#x} bytes at offset {offset:#x} run past the end \
                 of its file ({file_len:#x} bytes)"
            );
            log::warn!("the frontend's {e}; ending the connection");
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    Ok(())
}

/// The huge page size of a file on hugetlbfs (or a huge-page memfd), None
/// for any other file. A region of such a file must be whole pages: the
/// kernel maps whole ones, and a lost region could not be replaced (see
/// `lost_memory`) from the middle of one.
fn huge_page_size(fd: &OwnedFd, stat: &libc::stat) -> io::Result<Option<u64>> {
    /// linux/magic.h
    const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
    // SAFETY: an all-zero statfs is a valid value for fstatfs to fill.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open (owned by the message) and `fs` is writable for
    // the call.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
    let is_hugetlbfs = fs.f_type as i64 == HUGETLBFS_MAGIC;
    Ok(is_hugetlbfs.then_some(stat.st_blksize as u64))
}

const SET_VRING_KICK: u32 = 12;
const SET_VRING_ERR: u32 = 14;

const SET_VRING_NUM: u32 = 8;

/// Refuses (ending the connection) a split ring size that is not a power
/// of two: the vhost crate logs it and keeps the ring's old size, so the
/// backend would read a ring of a size the driver never made.
fn check_ring_size(message: &Message<'_>) -> io::Result<()> {
    if message.request != SET_VRING_NUM {
        return Ok(());
    }
    // vhost_vring_state: the ring's index, then its size. A malformed
    // payload is the handler's to refuse.
    let Some(num) = message.payload.get(4..8) else {
        return Ok(());
    };
    let num = u32::from_le_bytes([num[0], num[1], num[2], num[3]]);
    if num != 0 && !num.is_power_of_two() {
        let e = format!("ring size {num} is not a power of two");
        log::warn!("the frontend's {e}; ending the connection");
        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
    }
    Ok(())
}

const SET_PROTOCOL_FEATURES: u32 = 16;

/// Refuses (ending the connection) protocol features the backend did not
/// offer (`offered`; a frontend that reconnects may ack what it saved
/// without asking again, as Cloud Hypervisor does): the vhost
/// crate would take them and serve requests the backend is not built for
/// (added memory regions beyond what it guards, a device reset it does
/// not clear its rings on).
fn check_protocol_features(message: &Message<'_>, offered: u64) -> io::Result<()> {
    if message.request != SET_PROTOCOL_FEATURES {
        return Ok(());
    }
    // A malformed payload is the handler's to refuse.
    let Ok(bits) = <[u8; 8]>::try_from(message.payload) else {
        return Ok(());
    };
    let unoffered = u64::from_le_bytes(bits) & !offered;
    if unoffered != 0 {
        let e = format!(
            "protocol features {unoffered:#x} were acked but not offered (offered: {offered:#x})"
        );
        log::warn!("the frontend's {e}; ending the connection");
        return Err(io::Error::new(io::ErrorKind::InvalidData, e));
    }
    Ok(())
}

/// Refuses (ending the connection) a ring's kick, call or error descriptor
/// that is not an eventfd: the vhost crates read and write it 8 bytes at a
/// time and end a ring's worker thread on a short read or a hang-up (a
/// pipe), which leaves that queue's requests in flight for ever. A
/// blocking eventfd (crosvm's) is made non-blocking: the crates read a
/// kick once epoll says it is readable, and a frontend that takes the
/// count first (or gives two rings one eventfd) would otherwise hold the
/// worker, with its ring locked, in that read for ever, and every later
/// message about the ring with it. The flag belongs to the file, so the
/// frontend's descriptor turns non-blocking too; QEMU, DPDK and our `vmm`
/// make them so anyway, and a frontend waits for these with poll.
fn check_ring_events(message: &Message<'_>) -> io::Result<()> {
    if !(SET_VRING_KICK..=SET_VRING_ERR).contains(&message.request) {
        return Ok(());
    }
    for fd in message.fds {
        let fd = fd.as_raw_fd();
        let is_eventfd = match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
            Ok(target) => target.as_os_str() == "anon_inode:[eventfd]",
            // No /proc (a sandbox): an anonymous inode has no file type.
            Err(_) => {
                // SAFETY: an all-zero stat is a valid value for fstat to fill.
                let mut stat: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: `fd` is open (owned by the message) and `stat` is
                // writable for the call.
                let rc = unsafe { libc::fstat(fd, &mut stat) };
                rc == 0 && stat.st_mode & libc::S_IFMT == 0
            }
        };
        let fault = if !is_eventfd {
            Some("is not an eventfd".to_string())
        } else {
            make_nonblocking(fd)
                .err()
                .map(|e| format!("cannot be made non-blocking: {e}"))
        };
        if let Some(fault) = fault {
            let e = format!("request {}: the ring's descriptor {fault}", message.request);
            log::warn!("the frontend's {e}; ending the connection");
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    }
    Ok(())
}

fn make_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on an open descriptor (owned by the message) takes
    // no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    log::debug!("a ring's eventfd is blocking; making it non-blocking");
    // SAFETY: F_SETFL with an int argument on the same descriptor.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Builds a message: header (version 1, no reply wanted) and payload.
pub fn message(request: u32, payload: &[u8]) -> Vec<u8> {
    const VERSION_1: u32 = 0x1;
    let mut m = Vec::with_capacity(HEADER_LEN + payload.len());
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&VERSION_1.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// Reads one whole message (header and payload) and its descriptors, or
/// None once `from` has closed.
pub fn read_message(from: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut header = [0u8; HEADER_LEN];
    let (n, fds) = recv_with_fds(from, &mut header)?;
    if n == 0 {
        return Ok(None);
    }
    if n < HEADER_LEN {
        (&*from).read_exact(&mut header[n..])?;
    }
    let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if size > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {size}-byte payload is not a vhost-user message"),
        ));
    }
    let mut message = header.to_vec();
    message.resize(HEADER_LEN + size, 0);
    (&*from).read_exact(&mut message[HEADER_LEN..])?;
    Ok(Some((message, fds)))
}

/// Copies whole messages (header, payload, descriptors) from `from` to `to`
/// until `from` closes. `inspect` sees each message before it is sent and
/// may send messages of its own first.
fn copy_messages(
    from: &UnixStream,
    to: &UnixStream,
    inspect: &mut dyn FnMut(&Message<'_>, &UnixStream) -> io::Result<()>,
) -> io::Result<()> {
    while let Some((message, fds)) = read_message(from)? {
        let request = u32::from_le_bytes([message[0], message[1], message[2], message[3]]);
        inspect(
            &Message {
                request,
                payload: &message[HEADER_LEN..],
                fds: &fds,
            },
            to,
        )?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_message(to, &message, &raw)?;
        // `fds` (our copies) close here; the peer has its own.
    }
    Ok(())
}

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE((fds * std::mem::size_of::<RawFd>()) as u32) as usize }
}

/// Reads up to `buf.len()` bytes and any descriptors sent with them.
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut control = vec![0u8; cmsg_space(MAX_FDS)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`) and `control`, both
        // alive and writable for the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control
    // buffer within `msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a valid header inside the control buffer.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: as above; CMSG_LEN(0) is the header size.
            let data_len = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            let count = data_len / std::mem::size_of::<RawFd>();
            // SAFETY: CMSG_DATA points at `count` descriptors in the buffer.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: the kernel installed these descriptors for us; we
                // own them from here on. The read may be unaligned.
                let fd = unsafe { std::ptr::read_unaligned(data.add(i)) };
                // SAFETY: `fd` is a fresh descriptor nothing else owns.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: `msg` and `cmsg` are valid as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "too many descriptors in one message",
        ));
    }
    Ok((n, fds))
}

/// Sends `bytes` with `fds` attached, all of it.
pub fn send_message(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut control = vec![
        0u8;
        if fds.is_empty() {
            0
        } else {
            cmsg_space(fds.len())
        }
    ];
    let mut sent = 0;
    while sent < bytes.len() {
        let mut iov = libc::iovec {
            iov_base: bytes[sent..].as_ptr() as *mut libc::c_void,
            iov_len: bytes.len() - sent,
        };
        // SAFETY: an all-zero msghdr is a valid starting value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len();
            // SAFETY: the control buffer has room for one header with
            // `fds.len()` descriptors (cmsg_space).
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    std::ptr::write_unaligned(data.add(i), *fd);
                }
            }
        }
        // SAFETY: `msg` points at `iov` over `bytes` and at `control`, both
        // alive for the call; the descriptors are open.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Every protocol feature offered.
    const ALL: u64 = u64::MAX;

    fn read(stream: &UnixStream) -> (u32, Vec<u8>, usize) {
        let (m, fds) = read_message(stream).unwrap().expect("a message");
        let request = u32::from_le_bytes(m[..4].try_into().unwrap());
        (request, m[HEADER_LEN..].to_vec(), fds.len())
    }

    #[test]
    fn messages_pass_both_ways_with_their_descriptors_and_inspect_sees_them() {
        let (mut frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, mut backend) = UnixStream::pair().unwrap();
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let inspect: Inspect = Box::new(move |m, out| {
            let _ = seen_tx.send((m.request, m.payload.to_vec(), m.fds.len()));
            if m.request == 7 {
                send_message(out, &message(8, &[]), &[])?;
            }
            Ok(())
        });
        let relay = Relay::start(relay_front, relay_back, ALL, inspect).unwrap();

        let file = std::fs::File::open("/dev/null").unwrap();
        send_message(&frontend, &message(5, &[1, 2, 3, 4]), &[file.as_raw_fd()]).unwrap();
        assert_eq!(read(&backend), (5, vec![1, 2, 3, 4], 1));
        assert_eq!(seen_rx.recv().unwrap(), (5, vec![1, 2, 3, 4], 1));

        // What inspect sends goes first.
        frontend.write_all(&message(7, &[9])).unwrap();
        assert_eq!(read(&backend).0, 8);
        assert_eq!(read(&backend), (7, vec![9], 0));

        // Replies flow back.
        backend.write_all(&message(1, &[9; 8])).unwrap();
        assert_eq!(read(&frontend), (1, vec![9; 8], 0));

        drop(frontend);
        relay.join();
    }

    /// The relay ends the connection (rather than pass the message on)
    /// within 5 s.
    fn assert_ends(backend: &UnixStream) {
        backend
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let next = read_message(backend).expect("the relay neither ended nor passed it on");
        assert!(next.is_none(), "the relay passed it on");
    }

    fn memory_table(regions: &[(u64, u64)]) -> Vec<u8> {
        let mut payload = (regions.len() as u64).to_le_bytes().to_vec();
        for (i, &(size, offset)) in regions.iter().enumerate() {
            for word in [i as u64 * (1 << 30), size, 0x7f00_0000_0000, offset] {
                payload.extend_from_slice(&word.to_le_bytes());
            }
        }
        message(SET_MEM_TABLE, &payload)
    }

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: a NUL-terminated name; the call takes no other memory.
        let fd = unsafe { libc::memfd_create(c"relay-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    #[test]
    fn memory_past_the_end_of_its_file_ends_the_relay() {
        let (a, b) = (memfd(1 << 20), memfd(64 << 10));
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        // Within their files (the second region at an offset): passed on.
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back, ALL, Box::new(|_, _| Ok(()))).unwrap();
        let fits = memory_table(&[(1 << 20, 0), (32 << 10, 32 << 10)]);
        send_message(&frontend, &fits, &fds).unwrap();
        assert_eq!(
            read(&backend),
            (SET_MEM_TABLE, fits[HEADER_LEN..].to_vec(), 2)
        );
        // The second region 1 byte too long: not passed on, and the end.
        let past = memory_table(&[(1 << 20, 0), (32 << 10, (32 << 10) + 1)]);
        send_message(&frontend, &past, &fds).unwrap();
        assert_ends(&backend);
        relay.join();

        // One added region past its file, too; a size that wraps as well.
        for (size, offset) in [(1 << 20, 0), (u64::MAX, 2)] {
            let (frontend, relay_front) = UnixStream::pair().unwrap();
            let (relay_back, backend) = UnixStream::pair().unwrap();
            let relay =
                Relay::start(relay_front, relay_back, ALL, Box::new(|_, _| Ok(()))).unwrap();
            let mut payload = vec![0u8; 8];
            for word in [0, size, 0x7f00_0000_0000, offset] {
                payload.extend_from_slice(&u64::to_le_bytes(word));
            }
            send_message(&frontend, &message(ADD_MEM_REGION, &payload), &fds[1..]).unwrap();
            assert_ends(&backend);
            relay.join();
        }
    }

    /// A region of a huge-page file must be whole pages: a lost one is
    /// replaced whole, and part of a huge page cannot be.
    #[test]
    fn part_of_a_huge_page_ends_the_relay() {
        // SAFETY: a NUL-terminated name; the call takes no other memory.
        let fd = unsafe {
            libc::memfd_create(
                c"relay-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            )
        };
        assert!(
            fd >= 0,
            "memfd_create(MFD_HUGETLB): {}",
            io::Error::last_os_error()
        );
        // SAFETY: a new descriptor nothing else owns.
        let huge = unsafe { std::fs::File::from_raw_fd(fd) };
        // Sizing a hugetlbfs file takes no page from the pool.
        huge.set_len(4 << 20).unwrap();
        let fds = [huge.as_raw_fd()];
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back, ALL, Box::new(|_, _| Ok(()))).unwrap();
        let whole = memory_table(&[(2 << 20, 2 << 20)]);
        send_message(&frontend, &whole, &fds).unwrap();
        assert_eq!(
            read(&backend),
            (SET_MEM_TABLE, whole[HEADER_LEN..].to_vec(), 1)
        );
        drop(frontend);
        relay.join();
        for (size, offset) in [((2 << 20) + 4096, 0), (2 << 20, 4096)] {
            let (frontend, relay_front) = UnixStream::pair().unwrap();
            let (relay_back, backend) = UnixStream::pair().unwrap();
            let relay =
                Relay::start(relay_front, relay_back, ALL, Box::new(|_, _| Ok(()))).unwrap();
            send_message(&frontend, &memory_table(&[(size, offset)]), &fds).unwrap();
            assert_ends(&backend);
            relay.join();
        }
    }

    fn eventfd(flags: libc::c_int) -> OwnedFd {
        // SAFETY: eventfd takes no memory.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) };
        assert!(fd >= 0);
        // SAFETY: a new descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn a_blocking_ring_eventfd_is_made_non_blocking() {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back, ALL, Box::new(|_, _| Ok(()))).unwrap();
        let blocking = eventfd(0);
        let ring_0 = 0u64.to_le_bytes();
        send_message(&frontend, &message(13, &ring_0), &[blocking.as_raw_fd()]).unwrap();
        assert_eq!(read(&backend), (13, ring_0.to_vec(), 1));
        // SAFETY: F_GETFL on an open descriptor takes no memory.
        let flags = unsafe { libc::fcntl(blocking.as_raw_fd(), libc::F_GETFL) };
        assert!(
            flags >= 0 && flags & libc::O_NONBLOCK != 0,
            "still blocking"
        );
        drop(frontend);
        relay.join();
    }

    #[test]
    fn a_ring_size_that_is_not_a_power_of_two_ends_the_relay() {
        let (mut frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back, ALL, Box::new(|_, _| Ok(()))).unwrap();
        let state = |index: u32, num: u32| {
            let mut payload = index.to_le_bytes().to_vec();
            payload.extend_from_slice(&num.to_le_bytes());
            payload
        };
        frontend
            .write_all(&message(SET_VRING_NUM, &state(1, 256)))
            .unwrap();
        assert_eq!(read(&backend), (SET_VRING_NUM, state(1, 256), 0));
        frontend
            .write_all(&message(SET_VRING_NUM, &state(1, 255)))
            .unwrap();
        assert_ends(&backend);
        relay.join();
    }

    #[test]
    fn protocol_features_not_offered_end_the_relay() {
        let (mut frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        // Offered: MQ (0) and REPLY_ACK (3).
        let relay = Relay::start(relay_front, relay_back, 0b1001, Box::new(|_, _| Ok(()))).unwrap();
        // Part of what was offered, without asking first: passed on.
        let acked = 0b1000u64.to_le_bytes();
        frontend
            .write_all(&message(SET_PROTOCOL_FEATURES, &acked))
            .unwrap();
        assert_eq!(read(&backend), (SET_PROTOCOL_FEATURES, acked.to_vec(), 0));
        // CONFIGURE_MEM_SLOTS (15) was not offered.
        let more = (0b1001u64 | 1 << 15).to_le_bytes();
        frontend
            .write_all(&message(SET_PROTOCOL_FEATURES, &more))
            .unwrap();
        assert_ends(&backend);
        relay.join();
    }

    #[test]
    fn a_ring_descriptor_that_is_not_an_eventfd_ends_the_relay() {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back, ALL, Box::new(|_, _| Ok(()))).unwrap();
        let event = eventfd(libc::EFD_NONBLOCK);
        let ring_0 = 0u64.to_le_bytes();
        for request in [12, 13, 14] {
            send_message(&frontend, &message(request, &ring_0), &[event.as_raw_fd()]).unwrap();
            assert_eq!(read(&backend), (request, ring_0.to_vec(), 1));
        }
        // Without a descriptor (polling): passed on.
        let no_fd = (1u64 << 8).to_le_bytes();
        send_message(&frontend, &message(12, &no_fd), &[]).unwrap();
        assert_eq!(read(&backend), (12, no_fd.to_vec(), 0));
        let (socket, _other) = UnixStream::pair().unwrap();
        send_message(&frontend, &message(12, &ring_0), &[socket.as_raw_fd()]).unwrap();
        assert_ends(&backend);
        relay.join();
    }

    #[test]
    fn an_oversized_payload_ends_the_relay() {
        let (mut frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back, ALL, Box::new(|_, _| Ok(()))).unwrap();
        let mut header = message(5, &[]);
        header[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
        frontend.write_all(&header).unwrap();
        relay.join();
        assert!(read_message(&backend).unwrap().is_none());
    }
}
