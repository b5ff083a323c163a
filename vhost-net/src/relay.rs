//! A message relay between the frontend and the vhost crate's request
//! handler, for one frontend quirk.
//!
//! QEMU's virtio-net (7.2 and later) sends `SET_VRING_ENABLE` as soon as the
//! driver's features are known, before `SET_FEATURES` reaches the backend:
//! it counts VHOST_USER_F_PROTOCOL_FEATURES as negotiated once the backend
//! offers it. The vhost crate refuses the message until `SET_FEATURES` has
//! acknowledged that bit, and drops the connection. So the relay forwards
//! every message unchanged, except that before the first `SET_VRING_ENABLE`
//! that precedes any `SET_FEATURES` it inserts a `SET_FEATURES` with only
//! PROTOCOL_FEATURES (no reply asked for); the frontend's own `SET_FEATURES`
//! later sets the real features. Messages keep their file descriptors
//! (SCM_RIGHTS) in both directions.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

const HEADER_LEN: usize = 12;
/// Larger payloads than this are not vhost-user messages.
const MAX_PAYLOAD: usize = 64 * 1024;
/// vhost-user sends at most 8 descriptors per message (memory regions).
const MAX_FDS: usize = 32;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
/// Header flags: protocol version 1, no reply wanted.
const VERSION_1: u32 = 0x1;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// The two copying threads of one connection.
pub struct Relay {
    threads: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between `frontend` and `backend` until either side closes.
    pub fn start(frontend: UnixStream, backend: UnixStream) -> io::Result<Relay> {
        let (f_read, f_write) = (frontend.try_clone()?, frontend);
        let (b_read, b_write) = (backend.try_clone()?, backend);
        let to_backend = std::thread::Builder::new()
            .name("relay-in".into())
            .spawn(move || {
                // Only before the frontend's first SET_FEATURES: once it
                // has set features, an injected message would replace them
                // (a frontend that acked no PROTOCOL_FEATURES and then
                // enables a ring is refused by the library, as it should be).
                let mut features_set = false;
                let result = copy_messages(&f_read, &b_write, |header, _, out| {
                    let request = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
                    if request == SET_VRING_ENABLE && !features_set {
                        log::debug!("SET_VRING_ENABLE before SET_FEATURES: acknowledging PROTOCOL_FEATURES first");
                        send_message(out, &set_features_message(PROTOCOL_FEATURES), &[])?;
                    }
                    if request == SET_FEATURES || request == SET_VRING_ENABLE {
                        features_set = true;
                    }
                    Ok(())
                });
                finish("frontend", result, &b_write);
            })?;
        let to_frontend =
            std::thread::Builder::new()
                .name("relay-out".into())
                .spawn(move || {
                    let result = copy_messages(&b_read, &f_write, |_, _, _| Ok(()));
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

/// Shuts the other side down once one direction ends, so both threads stop.
fn finish(from: &str, result: io::Result<()>, other: &UnixStream) {
    match result {
        Ok(()) => log::debug!("relay: the {from} closed its side"),
        Err(e) => log::debug!("relay: {from} side ended: {e}"),
    }
    let _ = other.shutdown(std::net::Shutdown::Both);
}

fn set_features_message(features: u64) -> Vec<u8> {
    let mut message = Vec::with_capacity(HEADER_LEN + 8);
    message.extend_from_slice(&SET_FEATURES.to_le_bytes());
    message.extend_from_slice(&VERSION_1.to_le_bytes());
    message.extend_from_slice(&8u32.to_le_bytes());
    message.extend_from_slice(&features.to_le_bytes());
    message
}

/// Copies whole messages (header, payload, descriptors) from `from` to `to`
/// until `from` closes. `inspect` sees each message before it is sent and
/// may send messages of its own first.
fn copy_messages(
    from: &UnixStream,
    to: &UnixStream,
    mut inspect: impl FnMut(&[u8; HEADER_LEN], &[u8], &UnixStream) -> io::Result<()>,
) -> io::Result<()> {
    loop {
        let mut header = [0u8; HEADER_LEN];
        let (n, fds) = recv_with_fds(from, &mut header)?;
        if n == 0 {
            return Ok(());
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
        inspect(&header, &message[HEADER_LEN..], to)?;
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_message(to, &message, &raw)?;
        // `fds` (our copies) close here; the peer has its own.
    }
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
fn send_message(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
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

    fn message(request: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = request.to_le_bytes().to_vec();
        m.extend_from_slice(&VERSION_1.to_le_bytes());
        m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    fn read_message(stream: &mut UnixStream) -> (u32, Vec<u8>, usize) {
        let mut header = [0u8; HEADER_LEN];
        let (n, fds) = recv_with_fds(stream, &mut header).unwrap();
        assert_eq!(n, HEADER_LEN);
        let size = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        let mut payload = vec![0u8; size];
        stream.read_exact(&mut payload).unwrap();
        (
            u32::from_le_bytes(header[..4].try_into().unwrap()),
            payload,
            fds.len(),
        )
    }

    #[test]
    fn an_early_vring_enable_gets_protocol_features_first_and_fds_pass() {
        let (mut frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, mut backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back).unwrap();

        // A message with a descriptor goes through with it.
        let file = std::fs::File::open("/dev/null").unwrap();
        send_message(&frontend, &message(5, &[1, 2, 3, 4]), &[file.as_raw_fd()]).unwrap();
        assert_eq!(read_message(&mut backend), (5, vec![1, 2, 3, 4], 1));

        // SET_VRING_ENABLE before SET_FEATURES: a SET_FEATURES comes first.
        let enable = [0u8, 0, 0, 0, 1, 0, 0, 0];
        frontend
            .write_all(&message(SET_VRING_ENABLE, &enable))
            .unwrap();
        let (request, payload, _) = read_message(&mut backend);
        assert_eq!(request, SET_FEATURES);
        assert_eq!(payload, PROTOCOL_FEATURES.to_le_bytes());
        assert_eq!(read_message(&mut backend).0, SET_VRING_ENABLE);
        // Only once.
        frontend
            .write_all(&message(SET_VRING_ENABLE, &enable))
            .unwrap();
        assert_eq!(read_message(&mut backend).0, SET_VRING_ENABLE);

        // Replies flow back.
        backend.write_all(&message(1, &[9; 8])).unwrap();
        assert_eq!(read_message(&mut frontend), (1, vec![9; 8], 0));

        drop(frontend);
        relay.join();
    }

    /// A SET_FEATURES without PROTOCOL_FEATURES is the frontend's word: a
    /// later SET_VRING_ENABLE goes through alone (the library refuses it),
    /// rather than after an injected SET_FEATURES that would replace the
    /// features the frontend set.
    #[test]
    fn nothing_is_injected_after_the_frontends_own_set_features() {
        let (mut frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, mut backend) = UnixStream::pair().unwrap();
        let relay = Relay::start(relay_front, relay_back).unwrap();

        let version_1 = 1u64 << 32;
        frontend
            .write_all(&message(SET_FEATURES, &version_1.to_le_bytes()))
            .unwrap();
        assert_eq!(
            read_message(&mut backend),
            (SET_FEATURES, version_1.to_le_bytes().to_vec(), 0)
        );
        frontend
            .write_all(&message(SET_VRING_ENABLE, &[0, 0, 0, 0, 1, 0, 0, 0]))
            .unwrap();
        assert_eq!(read_message(&mut backend).0, SET_VRING_ENABLE);

        drop(frontend);
        relay.join();
    }
}
