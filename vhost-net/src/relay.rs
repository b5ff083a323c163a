//! What vhost-net's relay (see `vmm_common::relay`) does: answer one
//! frontend quirk.
//!
//! QEMU's virtio-net (7.2 and later) sends `SET_VRING_ENABLE` as soon as the
//! driver's features are known, before `SET_FEATURES` reaches the backend:
//! it counts VHOST_USER_F_PROTOCOL_FEATURES as negotiated once the backend
//! offers it. The vhost crate refuses the message until `SET_FEATURES` has
//! acknowledged that bit, and drops the connection. So before the first
//! `SET_VRING_ENABLE` that precedes any `SET_FEATURES`, the relay inserts a
//! `SET_FEATURES` with only PROTOCOL_FEATURES (no reply asked for); the
//! frontend's own `SET_FEATURES` later sets the real features.

use vmm_common::relay::{message, send_message, Inspect};

const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// The relay's look at each message of one connection.
pub fn protocol_features_first() -> Inspect {
    // Only before the frontend's first SET_FEATURES: once it has set
    // features, an injected message would replace them (a frontend that
    // acked no PROTOCOL_FEATURES and then enables a ring is refused by the
    // library, as it should be).
    let mut features_set = false;
    Box::new(move |m, out| {
        if m.request == SET_VRING_ENABLE && !features_set {
            log::debug!(
                "SET_VRING_ENABLE before SET_FEATURES: acknowledging PROTOCOL_FEATURES first"
            );
            send_message(
                out,
                &message(SET_FEATURES, &PROTOCOL_FEATURES.to_le_bytes()),
                &[],
            )?;
        }
        if m.request == SET_FEATURES || m.request == SET_VRING_ENABLE {
            features_set = true;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vmm_common::relay::{read_message, Relay, HEADER_LEN};

    fn read(stream: &UnixStream) -> (u32, Vec<u8>) {
        let (m, _) = read_message(stream).unwrap().expect("a message");
        let request = u32::from_le_bytes(m[..4].try_into().unwrap());
        (request, m[HEADER_LEN..].to_vec())
    }

    fn relay() -> (UnixStream, UnixStream, Relay) {
        let (frontend, relay_front) = UnixStream::pair().unwrap();
        let (relay_back, backend) = UnixStream::pair().unwrap();
        let relay =
            Relay::start(relay_front, relay_back, u64::MAX, protocol_features_first()).unwrap();
        (frontend, backend, relay)
    }

    #[test]
    fn an_early_vring_enable_gets_protocol_features_first() {
        let (mut frontend, backend, relay) = relay();
        let enable = [0u8, 0, 0, 0, 1, 0, 0, 0];
        frontend
            .write_all(&message(SET_VRING_ENABLE, &enable))
            .unwrap();
        assert_eq!(
            read(&backend),
            (SET_FEATURES, PROTOCOL_FEATURES.to_le_bytes().to_vec())
        );
        assert_eq!(read(&backend).0, SET_VRING_ENABLE);
        // Only once.
        frontend
            .write_all(&message(SET_VRING_ENABLE, &enable))
            .unwrap();
        assert_eq!(read(&backend).0, SET_VRING_ENABLE);
        drop(frontend);
        relay.join();
    }

    /// A SET_FEATURES without PROTOCOL_FEATURES is the frontend's word: a
    /// later SET_VRING_ENABLE goes through alone (the library refuses it),
    /// rather than after an injected SET_FEATURES that would replace the
    /// features the frontend set.
    #[test]
    fn nothing_is_injected_after_the_frontends_own_set_features() {
        let (mut frontend, backend, relay) = relay();
        let version_1 = 1u64 << 32;
        frontend
            .write_all(&message(SET_FEATURES, &version_1.to_le_bytes()))
            .unwrap();
        assert_eq!(
            read(&backend),
            (SET_FEATURES, version_1.to_le_bytes().to_vec())
        );
        frontend
            .write_all(&message(SET_VRING_ENABLE, &[0, 0, 0, 0, 1, 0, 0, 0]))
            .unwrap();
        assert_eq!(read(&backend).0, SET_VRING_ENABLE);
        drop(frontend);
        relay.join();
    }
}
