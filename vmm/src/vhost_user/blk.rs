//! vhost-user-blk: a virtio-blk device served by a backend process such as
//! our `vhost-blk` or qemu-storage-daemon. Its configuration space comes
//! from the backend (GET_CONFIG).

use std::path::Path;

use super::frontend::{DeviceSpec, FrontendError, QueueNum, VhostUserDevice};

const VIRTIO_ID_BLOCK: u16 = 2;
/// Offset of `num_queues` in virtio_blk_config.
const CONFIG_NUM_QUEUES: u64 = 34;
/// Offset of `seg_max` in virtio_blk_config.
const CONFIG_SEG_MAX: u64 = 12;
/// virtio_blk_config up to `write_zeroes_may_unmap` and its padding, as
/// qemu-storage-daemon 7.2 and our `vhost-blk` serve it.
const CONFIG_SIZE: usize = 60;
/// `writeback`, the one field a driver writes (VIRTIO_BLK_F_CONFIG_WCE).
const CONFIG_WRITEBACK: std::ops::Range<u64> = 32..33;

/// virtio-blk feature bits the guest may negotiate with the backend.
const BLK_FEATURES: u64 = (1 << 1) // SIZE_MAX
    | (1 << 2) // SEG_MAX
    | (1 << 4) // GEOMETRY
    | (1 << 5) // RO
    | (1 << 6) // BLK_SIZE
    | (1 << 9) // FLUSH
    | (1 << 10) // TOPOLOGY
    | (1 << 11) // CONFIG_WCE
    | (1 << 12) // MQ
    | (1 << 13) // DISCARD
    | (1 << 14); // WRITE_ZEROES

/// Connects to a vhost-user-blk backend.
pub fn connect(
    index: usize,
    socket: &Path,
    num_queues: usize,
    queue_size: u16,
) -> Result<VhostUserDevice, FrontendError> {
    let spec = DeviceSpec {
        name: format!("disk{index}"),
        device_type: VIRTIO_ID_BLOCK,
        device_features: BLK_FEATURES,
        num_queues,
        queue_size,
        queue_count_field: Some(CONFIG_NUM_QUEUES),
        seg_max_field: Some(CONFIG_SEG_MAX),
        config_from_backend: true,
        queues_without_mq: 1,
        queue_num: QueueNum::Queues,
        config_size: CONFIG_SIZE,
        writable_config: &[CONFIG_WRITEBACK],
        track_inflight: true,
    };
    VhostUserDevice::connect(spec, socket)
}
