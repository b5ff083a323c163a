//! vhost-user-net: a virtio-net NIC whose packets a backend process moves
//! (our `vhost-net`, DPDK's vhost PMD, OVS-DPDK). The VMM owns the
//! configuration space (MAC, link status, queue pairs, MTU), because network
//! backends do not serve GET_CONFIG, and the control queue (see `net_ctrl`).
//! The link is up while a backend is connected: the driver is told when it
//! goes down with its backend and when it comes back, as QEMU does.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::frontend::{
    DeviceSpec, FrontendError, Handshake, NewBackend, QueueNum, VhostUserDevice,
};
use super::net_ctrl::{ControlQueue, ControlRing, Controller};
use crate::guest_warnings::GuestWarnings;
use crate::virtio::device::{ActivateError, ActiveQueue, ConfigNotifier, VirtioDevice};
use crate::vstate::memory::GuestMemory;

const VIRTIO_ID_NET: u16 = 1;

const VIRTIO_NET_F_MTU: u64 = 1 << 3;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;
const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Data-path features the guest may negotiate with the backend.
const NET_DATA_FEATURES: u64 = (1 << 0) // CSUM
    | (1 << 1) // GUEST_CSUM
    | (1 << 7) // GUEST_TSO4
    | (1 << 8) // GUEST_TSO6
    | (1 << 9) // GUEST_ECN
    | (1 << 10) // GUEST_UFO
    | (1 << 11) // HOST_TSO4
    | (1 << 12) // HOST_TSO6
    | (1 << 13) // HOST_ECN
    | (1 << 14) // HOST_UFO
    | (1 << 15); // MRG_RXBUF

const VIRTIO_NET_S_LINK_UP: u16 = 1;
/// The MTU the device reports (VIRTIO_NET_F_MTU).
const MTU: u16 = 1500;

/// What the VMM knows about a NIC before the backend is reached.
pub struct NetSpec<'a> {
    pub index: usize,
    pub socket: &'a Path,
    pub mac: [u8; 6],
    pub queue_pairs: usize,
    pub queue_size: u16,
}

pub struct NetDevice {
    inner: VhostUserDevice,
    config: [u8; 12],
    queue_pairs: u16,
    queue_size: u16,
    control: Option<ControlQueue>,
    /// The control queue's warnings, across resets.
    control_warnings: Arc<Mutex<GuestWarnings>>,
}

fn device_spec(net: &NetSpec<'_>) -> DeviceSpec {
    let mq = if net.queue_pairs > 1 {
        VIRTIO_NET_F_MQ
    } else {
        0
    };
    DeviceSpec {
        name: format!("net{}", net.index),
        device_type: VIRTIO_ID_NET,
        device_features: NET_DATA_FEATURES | mq,
        num_queues: 2 * net.queue_pairs,
        queue_size: net.queue_size,
        queue_count_field: None,
        seg_max_field: None,
        config_from_backend: false,
        queues_without_mq: 2,
        queue_num: QueueNum::Pairs,
        // The VMM serves the NIC's configuration space (see `read_config`).
        config_size: 0,
        writable_config: &[],
        track_inflight: false,
    }
}

/// Connects to a backend listening on the NIC's socket.
pub fn connect(net: &NetSpec<'_>) -> Result<NetDevice, FrontendError> {
    let inner = VhostUserDevice::connect(device_spec(net), net.socket)?;
    Ok(NetDevice::new(inner, net))
}

/// Sets up a NIC whose backend connected to the VMM's socket.
pub fn from_stream(net: &NetSpec<'_>, stream: UnixStream) -> Result<NetDevice, FrontendError> {
    let inner = VhostUserDevice::from_stream(device_spec(net), stream, net.socket)?;
    Ok(NetDevice::new(inner, net))
}

impl NetDevice {
    fn new(inner: VhostUserDevice, net: &NetSpec<'_>) -> Self {
        // virtio_net_config: mac[6], status (see `read_config`),
        // max_virtqueue_pairs, mtu.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&net.mac);
        let pairs = net.queue_pairs as u16;
        config[8..10].copy_from_slice(&pairs.to_le_bytes());
        config[10..12].copy_from_slice(&MTU.to_le_bytes());
        NetDevice {
            inner,
            config,
            queue_pairs: pairs,
            queue_size: net.queue_size,
            control: None,
            control_warnings: Arc::default(),
        }
    }

    pub fn status(&self) -> std::sync::Arc<super::frontend::DeviceStatus> {
        self.inner.status()
    }

    /// What negotiates with this NIC's next backend.
    pub fn handshake(&self) -> Handshake {
        self.inner.handshake()
    }

    /// Features only the VMM implements, never passed to the backend.
    fn vmm_features(&self) -> u64 {
        let mq = if self.queue_pairs > 1 {
            VIRTIO_NET_F_MQ
        } else {
            0
        };
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU | VIRTIO_NET_F_CTRL_VQ | mq
    }
}

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn features(&self) -> u64 {
        self.inner.features() | self.vmm_features()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        // The data queues, then the control queue.
        vec![self.queue_size; 2 * usize::from(self.queue_pairs) + 1]
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let link = if self.inner.status().connected() {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        self.config[6..8].copy_from_slice(&link.to_le_bytes());
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| self.config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn set_config_notifier(&mut self, notifier: ConfigNotifier) {
        // The status listener runs when the backend hangs up and when a new
        // one takes over, after `connected()` changed.
        self.inner.status().on_change(Box::new(move |status| {
            log::info!(
                "{}: link {}",
                status.name,
                if status.connected() { "up" } else { "down" }
            );
            notifier.notify();
        }));
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is read-only for a modern driver (VIRTIO_NET_F_CTRL_MAC_ADDR
        // is not offered), and so is everything else.
        log::debug!("{}: config write at {offset:#x} ignored", self.name());
    }

    fn activate(
        &mut self,
        mem: &GuestMemory,
        driver_features: u64,
        queues: &[ActiveQueue<'_>],
    ) -> Result<(), ActivateError> {
        let mq = driver_features & VIRTIO_NET_F_MQ != 0;
        let pairs = if mq { self.queue_pairs } else { 1 };
        // Without MQ the device has one pair and the control queue is queue 2.
        let control_index = 2 * pairs;
        let data: Vec<_> = queues
            .iter()
            .filter(|q| q.index < control_index)
            .map(|q| ActiveQueue {
                index: q.index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: q.kick,
                call: q.call,
            })
            .collect();
        // Until the driver sets the pair count, only the first pair is used.
        self.inner
            .start_rings(mem, driver_features, &data, |index| index < 2)?;

        if driver_features & VIRTIO_NET_F_CTRL_VQ != 0 {
            if let Some(q) = queues.iter().find(|q| q.index == control_index) {
                let ring = ControlRing {
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    event_idx: driver_features & VIRTIO_F_RING_EVENT_IDX != 0,
                };
                let kick = q
                    .kick
                    .try_clone()
                    .map_err(|e| ActivateError(format!("control queue kick: {e}")))?;
                let call = q
                    .call
                    .map(|c| c.try_clone())
                    .transpose()
                    .map_err(|e| ActivateError(format!("control queue call: {e}")))?;
                let controller = Controller {
                    name: self.name().to_string(),
                    max_pairs: pairs,
                    set_up: data.iter().map(|q| q.index).collect(),
                    rings: self.inner.ring_switch(),
                };
                // The last worker's lock on the warnings goes with it.
                self.control = None;
                self.control = Some(
                    ControlQueue::start(
                        &ring,
                        mem.clone(),
                        kick,
                        call,
                        controller,
                        self.control_warnings.clone(),
                    )
                    .map_err(ActivateError)?,
                );
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.control = None;
        VirtioDevice::reset(&mut self.inner);
    }

    fn reconnect(&mut self, backend: NewBackend) -> Result<(), String> {
        self.inner.reattach(backend)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transport_features_are_not_device_features() {
        assert_eq!(
            super::NET_DATA_FEATURES & super::super::frontend::TRANSPORT_FEATURES,
            0
        );
    }
}
