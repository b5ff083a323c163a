//! Requests the VMM sends on a backend's socket itself, past the `vhost`
//! crate, where the crate's handling of the reply does not fit:
//!
//! - GET_QUEUE_NUM: the crate takes the answer as its limit on ring
//!   indexes, and a NIC backend that answers in queue pairs (one pair: 1)
//!   would have its second ring refused before it was sent.
//! - GET_CONFIG: a backend that cannot answer replies with a shorter
//!   message than a good answer (libvhost-user with the header alone, the
//!   `vhost` crate's backends with a body of size 0), and the crate waits
//!   for the bytes of a good answer that never come. Here the reply is
//!   read as long as its header says, so a refusal is seen as one.
//! - GET_INFLIGHT_FD: a backend that keeps no region answers a size of 0
//!   and no file (QEMU takes that as "not tracked"); the crate takes a
//!   reply without a file as malformed.
//!
//! The caller holds the frontend (so nothing else is on the socket) and
//! runs these under a reply deadline, as for the crate's own requests.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use vhost::vhost_user::{Error as ProtocolError, Frontend};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;
const GET_INFLIGHT_FD: u32 = 31;
/// VhostUserInflight: mmap size and offset (u64 each), queue count and
/// size (u16 each), padded to 8 bytes.
const INFLIGHT_BODY_SIZE: usize = 24;
const VERSION_1: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
const REPLY: u32 = 0x4;
const HEADER_SIZE: usize = 12;
/// GET_CONFIG's body before the config bytes: offset, size, flags.
const CONFIG_BODY_SIZE: usize = 12;

fn protocol(e: ProtocolError) -> vhost::Error {
    vhost::Error::VhostUserProtocol(e)
}

fn socket_error(e: io::Error) -> vhost::Error {
    protocol(ProtocolError::SocketError(e))
}

fn word(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(b) = bytes.get(at..at + 4) {
        word.copy_from_slice(b);
    }
    u32::from_le_bytes(word)
}

/// Sends request `code` with `payload` and returns its reply's payload,
/// which may be at most `max_reply` bytes, and the file that came with it.
fn request(
    frontend: &mut Frontend,
    code: u32,
    payload: &[u8],
    max_reply: usize,
) -> vhost::Result<(Vec<u8>, Option<File>)> {
    // SAFETY: the fd is the frontend's socket, open while `frontend` is
    // borrowed here; it is only duplicated, never closed through this.
    let socket = unsafe { BorrowedFd::borrow_raw(frontend.as_raw_fd()) }
        .try_clone_to_owned()
        .map_err(socket_error)?;
    let mut socket = UnixStream::from(socket);
    let size = u32::try_from(payload.len()).map_err(|_| protocol(ProtocolError::InvalidParam))?;
    let mut message = Vec::with_capacity(HEADER_SIZE + payload.len());
    for field in [code, VERSION_1, size] {
        message.extend_from_slice(&field.to_le_bytes());
    }
    message.extend_from_slice(payload);
    socket.write_all(&message).map_err(socket_error)?;

    let mut header = [0u8; HEADER_SIZE];
    // A file comes with the reply's first bytes.
    let (got, file) = socket
        .recv_with_fd(&mut header)
        .map_err(|e| socket_error(io::Error::from_raw_os_error(e.errno())))?;
    if got == 0 {
        return Err(socket_error(io::ErrorKind::UnexpectedEof.into()));
    }
    socket
        .read_exact(&mut header[got..])
        .map_err(socket_error)?;
    let size = word(&header, 8) as usize;
    let flags = word(&header, 4);
    if word(&header, 0) != code
        || flags & VERSION_MASK != VERSION_1
        || flags & REPLY == 0
        || size > max_reply
    {
        return Err(protocol(ProtocolError::InvalidMessage));
    }
    let mut reply = vec![0u8; size];
    socket.read_exact(&mut reply).map_err(socket_error)?;
    Ok((reply, file))
}

/// The backend's GET_QUEUE_NUM answer, as it gave it.
pub fn get_queue_num(frontend: &mut Frontend) -> vhost::Result<u64> {
    let (reply, _) = request(frontend, GET_QUEUE_NUM, &[], 8)?;
    let value: [u8; 8] = reply
        .as_slice()
        .try_into()
        .map_err(|_| protocol(ProtocolError::InvalidMessage))?;
    Ok(u64::from_le_bytes(value))
}

/// The first `size` bytes of the backend's configuration space. A
/// backend that answers that it cannot gives `BackendInternalError` (the
/// connection stays in step); a reply of the wrong shape gives
/// `InvalidMessage`.
pub fn get_config(frontend: &mut Frontend, size: u32) -> vhost::Result<Vec<u8>> {
    let bytes = size as usize;
    let mut payload = vec![0u8; CONFIG_BODY_SIZE + bytes];
    // Offset 0 and flags 0; the config bytes the frontend sends are zeros.
    payload[4..8].copy_from_slice(&size.to_le_bytes());
    let (reply, _) = request(frontend, GET_CONFIG, &payload, CONFIG_BODY_SIZE + bytes)?;
    if reply.is_empty() || (reply.len() >= CONFIG_BODY_SIZE && word(&reply, 4) == 0) {
        return Err(protocol(ProtocolError::BackendInternalError));
    }
    if reply.len() != CONFIG_BODY_SIZE + bytes || word(&reply, 0) != 0 || word(&reply, 4) != size {
        return Err(protocol(ProtocolError::InvalidMessage));
    }
    Ok(reply[CONFIG_BODY_SIZE..].to_vec())
}

/// A backend's region for requests in flight, as GET_INFLIGHT_FD gave it.
pub struct InflightReply {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    /// None for a backend that keeps no region (a size of 0).
    pub file: Option<File>,
}

/// Asks the backend for a region to track the requests in flight on
/// `num_queues` rings of up to `queue_size` entries. A size of 0 is an
/// answer (no region, and any file sent with it is dropped); a region
/// without a file is `InvalidMessage`.
pub fn get_inflight_fd(
    frontend: &mut Frontend,
    num_queues: u16,
    queue_size: u16,
) -> vhost::Result<InflightReply> {
    let mut payload = [0u8; INFLIGHT_BODY_SIZE];
    payload[16..18].copy_from_slice(&num_queues.to_le_bytes());
    payload[18..20].copy_from_slice(&queue_size.to_le_bytes());
    let (reply, file) = request(frontend, GET_INFLIGHT_FD, &payload, INFLIGHT_BODY_SIZE)?;
    if reply.len() != INFLIGHT_BODY_SIZE {
        return Err(protocol(ProtocolError::InvalidMessage));
    }
    let long = |at: usize| u64::from(word(&reply, at)) | u64::from(word(&reply, at + 4)) << 32;
    let (mmap_size, mmap_offset) = (long(0), long(8));
    if mmap_size == 0 {
        return Ok(InflightReply {
            mmap_size,
            mmap_offset,
            file: None,
        });
    }
    match file {
        Some(file) => Ok(InflightReply {
            mmap_size,
            mmap_offset,
            file: Some(file),
        }),
        None => Err(protocol(ProtocolError::InvalidMessage)),
    }
}
