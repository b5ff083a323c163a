//! Vhost-user messages no frontend should send, for checking that a
//! backend drops the connection that sent them and serves on. Each comes
//! with what is wrong with it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

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
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
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
