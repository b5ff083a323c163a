//! The virtio-net features this backend offers and what the negotiated ones
//! mean for the tap: the header length and the offloads (pure; unit-tested).

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// `struct virtio_net_hdr` without `num_buffers`.
pub const LEGACY_HDR_LEN: usize = 10;
/// `struct virtio_net_hdr_mrg_rxbuf`, the header of VERSION_1 devices.
pub const HDR_LEN: usize = 12;
/// The largest frame (after the header) either way: 64 KiB of a GSO
/// packet plus the Ethernet header.
pub const MAX_FRAME: usize = 65550;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Device features offered for `pairs` queue pairs. The configuration
/// space (MAC, STATUS, MTU) and the control queue belong to the VMM.
pub fn offered(pairs: usize) -> u64 {
    let mut f = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_RING_F_EVENT_IDX)
        | bit(VIRTIO_RING_F_INDIRECT_DESC)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_GUEST_UFO)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_HOST_ECN)
        | bit(VIRTIO_NET_F_HOST_UFO)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if pairs > 1 {
        f |= bit(VIRTIO_NET_F_MQ);
    }
    f
}

/// What the queues need to know of the negotiated features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Bytes of virtio-net header before each frame, in both directions.
    pub hdr_len: usize,
    /// VIRTIO_NET_F_MRG_RXBUF: a received frame may span several chains.
    pub mrg_rxbuf: bool,
}

impl NetConfig {
    pub fn from_features(acked: u64) -> Self {
        let mrg_rxbuf = acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let version_1 = acked & bit(VIRTIO_F_VERSION_1) != 0;
        NetConfig {
            hdr_len: if version_1 || mrg_rxbuf {
                HDR_LEN
            } else {
                LEGACY_HDR_LEN
            },
            mrg_rxbuf,
        }
    }
}

/// The tap offloads (TUNSETOFFLOAD) that match the guest's receive
/// features. The kernel takes segmentation offloads only with checksum
/// offload, and ECN only with TSO, as virtio requires of the guest too.
pub fn tun_offload(acked: u64) -> libc::c_uint {
    let has = |b: u32| acked & bit(b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    };

    #[test]
    fn offers_data_path_features_only() {
        let one = offered(1);
        assert_eq!(one & bit(VIRTIO_NET_F_MQ), 0);
        assert_ne!(offered(2) & bit(VIRTIO_NET_F_MQ), 0);
        for vmm_side in [VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS] {
            assert_eq!(one & bit(vmm_side), 0);
        }
        assert_ne!(one & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        assert_ne!(one & bit(VIRTIO_NET_F_MRG_RXBUF), 0);
    }

    #[test]
    fn header_length_follows_version_1_and_mrg_rxbuf() {
        assert_eq!(NetConfig::from_features(0).hdr_len, 10);
        assert_eq!(
            NetConfig::from_features(bit(VIRTIO_F_VERSION_1)).hdr_len,
            12
        );
        let mrg = NetConfig::from_features(bit(VIRTIO_NET_F_MRG_RXBUF));
        assert_eq!((mrg.hdr_len, mrg.mrg_rxbuf), (12, true));
    }

    #[test]
    fn offloads_follow_the_guest_features() {
        assert_eq!(tun_offload(0), 0);
        // TSO without checksum offload is not something the tap accepts.
        assert_eq!(tun_offload(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
        assert_eq!(tun_offload(bit(VIRTIO_NET_F_GUEST_CSUM)), libc::TUN_F_CSUM);
        let csum_ecn = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(tun_offload(csum_ecn), libc::TUN_F_CSUM);
        let all = offered(1);
        assert_eq!(
            tun_offload(all),
            libc::TUN_F_CSUM
                | libc::TUN_F_TSO4
                | libc::TUN_F_TSO6
                | libc::TUN_F_TSO_ECN
                | libc::TUN_F_UFO
        );
    }
}
