//! Connecting to a vhost-user backend as its frontend: negotiation, the
//! memory table, and the rings.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;
use crate::virtqueue::VirtQueue;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const PROTOCOL_FEATURES: u64 = 1 << 30;

#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error("cannot connect to {0:?}")]
    Connect(PathBuf, #[source] vhost::Error),
    #[error("{0} failed")]
    Request(&'static str, #[source] vhost::Error),
    #[error("the backend does not offer {0}")]
    Missing(&'static str),
    #[error("the backend serves {offered} queues, {wanted} were asked for")]
    Queues { offered: u64, wanted: usize },
    #[error("guest memory")]
    Memory(#[source] std::io::Error),
    #[error("{0} bytes of guest memory are not enough")]
    OutOfMemory(u64),
}

/// What to set up.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub mem_size: u64,
    pub num_queues: usize,
    pub queue_size: u16,
    /// Device feature bits (below 24) the driver would like.
    pub device_features: u64,
    pub event_idx: bool,
}

pub struct Connection {
    pub frontend: Frontend,
    pub memory: GuestMemory,
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
    pub queues: Vec<VirtQueue>,
}

fn req<T>(what: &'static str, r: vhost::Result<T>) -> Result<T, ConnectionError> {
    r.map_err(|e| ConnectionError::Request(what, e))
}

impl Connection {
    pub fn connect(socket: &Path, options: Options) -> Result<Self, ConnectionError> {
        let mut frontend = Frontend::connect(socket, options.num_queues as u64)
            .map_err(|e| ConnectionError::Connect(socket.to_path_buf(), e))?;
        req("SET_OWNER", frontend.set_owner())?;
        let offered = req("GET_FEATURES", frontend.get_features())?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            return Err(ConnectionError::Missing("VIRTIO_F_VERSION_1"));
        }
        let mut protocol = VhostUserProtocolFeatures::empty();
        if offered & PROTOCOL_FEATURES != 0 {
            let backend = req("GET_PROTOCOL_FEATURES", frontend.get_protocol_features())?;
            protocol = backend
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::REPLY_ACK);
            req(
                "SET_PROTOCOL_FEATURES",
                frontend.set_protocol_features(protocol),
            )?;
        }
        if options.num_queues > 1 {
            if !protocol.contains(VhostUserProtocolFeatures::MQ) {
                return Err(ConnectionError::Missing("the MQ protocol feature"));
            }
            let max = req("GET_QUEUE_NUM", frontend.get_queue_num())?;
            if max < options.num_queues as u64 {
                return Err(ConnectionError::Queues {
                    offered: max,
                    wanted: options.num_queues,
                });
            }
        }
        let mut wanted = VIRTIO_F_VERSION_1 | PROTOCOL_FEATURES | options.device_features;
        if options.event_idx {
            wanted |= VIRTIO_RING_F_EVENT_IDX;
        }
        let features = offered & wanted;
        req("SET_FEATURES", frontend.set_features(features))?;

        let mut memory = GuestMemory::new(options.mem_size).map_err(ConnectionError::Memory)?;
        let regions: Vec<VhostUserMemoryRegionInfo> = memory
            .mem
            .iter()
            .filter_map(|r| {
                let file = r.file_offset()?;
                Some(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.start_addr().0,
                    memory_size: r.len(),
                    userspace_addr: r.as_ptr() as u64,
                    mmap_offset: file.start(),
                    mmap_handle: file.file().as_raw_fd(),
                })
            })
            .collect();
        req("SET_MEM_TABLE", frontend.set_mem_table(&regions))?;

        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(options.num_queues);
        for index in 0..options.num_queues {
            let base = memory
                .alloc(VirtQueue::layout_size(options.queue_size), 4096)
                .ok_or(ConnectionError::OutOfMemory(options.mem_size))?;
            let q = VirtQueue::new(index, options.queue_size, base, event_idx)
                .map_err(ConnectionError::Memory)?;
            let host = |gpa: u64| {
                memory
                    .mem
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .unwrap_or(0)
            };
            let ring = VringConfigData {
                queue_max_size: options.queue_size,
                queue_size: options.queue_size,
                flags: 0,
                desc_table_addr: host(q.desc),
                used_ring_addr: host(q.used),
                avail_ring_addr: host(q.avail),
                log_addr: None,
            };
            req(
                "SET_VRING_NUM",
                frontend.set_vring_num(index, options.queue_size),
            )?;
            req("SET_VRING_ADDR", frontend.set_vring_addr(index, &ring))?;
            req("SET_VRING_BASE", frontend.set_vring_base(index, 0))?;
            req("SET_VRING_CALL", frontend.set_vring_call(index, &q.call))?;
            req("SET_VRING_KICK", frontend.set_vring_kick(index, &q.kick))?;
            if features & PROTOCOL_FEATURES != 0 {
                req("SET_VRING_ENABLE", frontend.set_vring_enable(index, true))?;
            }
            queues.push(q);
        }
        Ok(Connection {
            frontend,
            memory,
            features,
            protocol,
            queues,
        })
    }

    /// Reads `len` bytes of the device's config space from offset 0.
    pub fn get_config(&mut self, len: u32) -> Result<Vec<u8>, ConnectionError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(ConnectionError::Missing("the CONFIG protocol feature"));
        }
        let buf = vec![0u8; len as usize];
        let (_, reply) = req(
            "GET_CONFIG",
            self.frontend
                .get_config(0, len, VhostUserConfigFlags::empty(), &buf),
        )?;
        Ok(reply)
    }
}

/// How long a synchronous request may take before the backend counts as hung.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
