//! virtio-blk over the test frontend: one synchronous request at a time
//! for tests, including raw chains for malformed requests.

use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;
use virtio_bindings::virtio_blk as vb;
use vm_memory::{Bytes, GuestAddress};

use crate::connection::{Connection, ConnectionError, Options, REQUEST_TIMEOUT};
use crate::memory::Memory;
use crate::pipeline::Pipeline;
use crate::virtqueue::{Buf, RawDesc, RingError, Used};

pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
/// What the status byte holds before the backend writes it.
pub const S_UNWRITTEN: u8 = 0xff;
/// What a read's data buffer holds before the backend writes it.
pub const POISON: u8 = 0xee;
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// `struct virtio_blk_outhdr`: type, reserved (ioprio), sector.
pub const HEADER_LEN: u32 = 16;
/// One `struct virtio_blk_discard_write_zeroes` segment.
pub const SEGMENT_LEN: u32 = 16;

/// virtio-blk features a test client asks for.
pub const BLK_FEATURES: u64 = (1 << vb::VIRTIO_BLK_F_SEG_MAX)
    | (1 << vb::VIRTIO_BLK_F_RO)
    | (1 << vb::VIRTIO_BLK_F_BLK_SIZE)
    | (1 << vb::VIRTIO_BLK_F_FLUSH)
    | (1 << vb::VIRTIO_BLK_F_MQ)
    | (1 << vb::VIRTIO_BLK_F_DISCARD)
    | (1 << vb::VIRTIO_BLK_F_WRITE_ZEROES);

/// Guest memory of the default client: rings and a 1 MiB request slot.
pub const DEFAULT_MEM: u64 = 64 << 20;
/// The largest transfer of one synchronous request.
pub const MAX_TRANSFER: u32 = 1 << 20;

#[derive(Debug, Error)]
pub enum BlkError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("no completion within {0:?}: the backend hung or died")]
    Timeout(Duration),
    #[error("queue {0} is not set up (or was handed to a pipeline)")]
    NoQueue(usize),
    #[error("the queue is full")]
    QueueFull,
    #[error("{len} bytes is more than the {max}-byte request buffer")]
    TooLarge { len: usize, max: u32 },
    #[error("the config space is {0} bytes, too short")]
    ShortConfig(usize),
    #[error("{what} completed with status {status}")]
    Status { what: &'static str, status: u8 },
}

/// Where one request's header, data and status live in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    pub header: u64,
    pub data: u64,
    pub status: u64,
    pub capacity: u32,
}

impl Slot {
    pub fn alloc(conn: &mut Connection, data_len: u32) -> Result<Slot, BlkError> {
        let mem = &mut conn.memory;
        let oom = ConnectionError::OutOfMemory(mem.size);
        let header = mem.alloc(32, 16).ok_or(oom)?;
        let data = mem
            .alloc(u64::from(data_len.max(1)), 4096)
            .ok_or(ConnectionError::OutOfMemory(mem.size))?;
        Ok(Slot {
            header,
            status: header + u64::from(HEADER_LEN),
            data,
            capacity: data_len,
        })
    }

    /// Writes a request header and marks the status byte unwritten.
    pub fn prepare(&self, mem: &Memory, kind: u32, sector: u64) {
        let mut header = [0u8; HEADER_LEN as usize];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        // The slot was allocated inside `mem`: these writes cannot fail.
        let _ = mem.write_slice(&header, GuestAddress(self.header));
        let _ = mem.write_obj(S_UNWRITTEN, GuestAddress(self.status));
    }

    /// The usual chain: header, data (if any), status.
    pub fn chain(&self, data_len: u32, device_writes_data: bool) -> Vec<Buf> {
        let mut bufs = vec![Buf {
            addr: self.header,
            len: HEADER_LEN,
            write: false,
        }];
        if data_len > 0 {
            bufs.push(Buf {
                addr: self.data,
                len: data_len,
                write: device_writes_data,
            });
        }
        bufs.push(Buf {
            addr: self.status,
            len: 1,
            write: true,
        });
        bufs
    }
}

/// A completion: the used length the backend reported and the status byte
/// at the slot's status address ([`S_UNWRITTEN`] if it did not write it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub used_len: u32,
    pub status: u8,
}

/// A virtio-blk driver over one connection, one request at a time. Each
/// call waits for its completion up to a timeout (10 s unless set): a
/// backend that stops answering is an error, never a hang. After a timeout
/// the request may still complete later, into the same buffers: use a new
/// client.
pub struct BlkClient {
    pub conn: Connection,
    slot: Slot,
    timeout: Duration,
}

impl BlkClient {
    /// Connects with `num_queues` queues of `queue_size`, EVENT_IDX when
    /// offered, and [`DEFAULT_MEM`] of guest memory.
    pub fn connect(socket: &Path, num_queues: usize, queue_size: u16) -> Result<Self, BlkError> {
        Self::connect_with(
            socket,
            Options {
                mem_size: DEFAULT_MEM,
                num_queues,
                queues_without_mq: 1,
                queue_size,
                device_features: BLK_FEATURES,
                event_idx: true,
                hugepages: false,
            },
        )
    }

    /// `connect`, retried until `timeout` while the backend is not ready:
    /// a backend that serves one frontend at a time is briefly not
    /// listening (or drops the connection) while it finishes the previous one.
    pub fn connect_retrying(
        socket: &Path,
        num_queues: usize,
        queue_size: u16,
        timeout: Duration,
    ) -> Result<Self, BlkError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(socket, num_queues, queue_size) {
                Err(BlkError::Connection(e)) if e.is_transient() && Instant::now() < deadline => {
                    log::debug!("{}: {e}; retrying", socket.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    pub fn connect_with(socket: &Path, options: Options) -> Result<Self, BlkError> {
        let mut conn = Connection::connect(socket, options)?;
        let slot = Slot::alloc(&mut conn, MAX_TRANSFER)?;
        Ok(BlkClient {
            conn,
            slot,
            timeout: REQUEST_TIMEOUT,
        })
    }

    /// How long each request may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The config space, read from the backend now.
    pub fn config(&mut self) -> Result<Vec<u8>, BlkError> {
        Ok(self.conn.get_config(crate::connection::CONFIG_LEN)?)
    }

    /// Capacity in 512-byte sectors, from the config space.
    pub fn capacity(&mut self) -> Result<u64, BlkError> {
        let config = self.config()?;
        let bytes = config
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .ok_or(BlkError::ShortConfig(config.len()))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// The features acknowledged in SET_FEATURES.
    pub fn features(&self) -> u64 {
        self.conn.features
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.conn.has_feature(bit)
    }

    pub fn mem(&self) -> &Memory {
        &self.conn.memory.mem
    }

    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// Reads `buf.len()` bytes from `sector`; returns the status. The data
    /// buffer is filled with `POISON` first, as a driver's fresh buffer
    /// would hold anything: bytes the backend did not write are never
    /// those a write on this client left there.
    pub fn read(&mut self, queue: usize, sector: u64, buf: &mut [u8]) -> Result<u8, BlkError> {
        let len = self.fits(buf.len())?;
        let poison = vec![POISON; len as usize];
        let _ = self
            .mem()
            .write_slice(&poison, GuestAddress(self.slot.data));
        self.prepare_header(T_IN, sector);
        let chain = self.slot.chain(len, true);
        let done = self.submit(queue, &chain)?;
        let _ = self.mem().read_slice(buf, GuestAddress(self.slot.data));
        Ok(done.status)
    }

    /// Writes `data` at `sector`; returns the status.
    pub fn write(&mut self, queue: usize, sector: u64, data: &[u8]) -> Result<u8, BlkError> {
        let len = self.fits(data.len())?;
        self.prepare_header(T_OUT, sector);
        let _ = self.mem().write_slice(data, GuestAddress(self.slot.data));
        let chain = self.slot.chain(len, false);
        Ok(self.submit(queue, &chain)?.status)
    }

    pub fn flush(&mut self, queue: usize) -> Result<u8, BlkError> {
        self.prepare_header(T_FLUSH, 0);
        let chain = self.slot.chain(0, false);
        Ok(self.submit(queue, &chain)?.status)
    }

    /// The device id (the backend's serial, NUL padded).
    pub fn get_id(&mut self) -> Result<[u8; ID_BYTES], BlkError> {
        // Poisoned, so the NUL padding is the backend's.
        let _ = self
            .mem()
            .write_slice(&[POISON; ID_BYTES], GuestAddress(self.slot.data));
        self.prepare_header(T_GET_ID, 0);
        let chain = self.slot.chain(ID_BYTES as u32, true);
        let done = self.submit(0, &chain)?;
        if done.status != S_OK {
            return Err(BlkError::Status {
                what: "GET_ID",
                status: done.status,
            });
        }
        let mut id = [0u8; ID_BYTES];
        let _ = self.mem().read_slice(&mut id, GuestAddress(self.slot.data));
        Ok(id)
    }

    /// DISCARD of `count` sectors at `sector`; returns the status.
    pub fn discard(&mut self, sector: u64, count: u32) -> Result<u8, BlkError> {
        self.segment_request(T_DISCARD, sector, count, 0)
    }

    /// WRITE_ZEROES of `count` sectors at `sector`; returns the status.
    pub fn write_zeroes(&mut self, sector: u64, count: u32, unmap: bool) -> Result<u8, BlkError> {
        let flags = if unmap { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        self.segment_request(T_WRITE_ZEROES, sector, count, flags)
    }

    /// DISCARD or WRITE_ZEROES with one segment, on queue 0.
    pub fn segment_request(
        &mut self,
        kind: u32,
        sector: u64,
        count: u32,
        flags: u32,
    ) -> Result<u8, BlkError> {
        self.prepare_header(kind, 0);
        let mut segment = [0u8; SEGMENT_LEN as usize];
        segment[..8].copy_from_slice(&sector.to_le_bytes());
        segment[8..12].copy_from_slice(&count.to_le_bytes());
        segment[12..].copy_from_slice(&flags.to_le_bytes());
        let _ = self
            .mem()
            .write_slice(&segment, GuestAddress(self.slot.data));
        let chain = self.slot.chain(SEGMENT_LEN, false);
        Ok(self.submit(0, &chain)?.status)
    }

    fn fits(&self, len: usize) -> Result<u32, BlkError> {
        u32::try_from(len)
            .ok()
            .filter(|&l| l <= self.slot.capacity)
            .ok_or(BlkError::TooLarge {
                len,
                max: self.slot.capacity,
            })
    }

    // The raw API: build any chain over the slot (or anywhere), submit it,
    // and read what the backend did.

    /// Writes a request header at the slot and marks the status unwritten.
    pub fn prepare_header(&self, kind: u32, sector: u64) {
        self.slot.prepare(self.mem(), kind, sector);
    }

    /// Writes arbitrary header bytes at the slot (at most 32) and marks the
    /// status unwritten.
    pub fn prepare_header_bytes(&self, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min(32)];
        let _ = self
            .mem()
            .write_slice(bytes, GuestAddress(self.slot.header));
        let _ = self
            .mem()
            .write_obj(S_UNWRITTEN, GuestAddress(self.slot.status));
    }

    /// The slot's header, data and status buffers as a standard chain.
    pub fn chain(&self, data_len: u32, device_writes_data: bool) -> Vec<Buf> {
        self.slot.chain(data_len, device_writes_data)
    }

    /// Reads guest memory at `addr` (to see what the backend wrote for a
    /// raw chain); false when it is outside guest memory.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.mem().read_slice(buf, GuestAddress(addr)).is_ok()
    }

    /// Writes guest memory at `addr` (canaries around what a test hands
    /// the backend); false when it is outside guest memory.
    pub fn write_mem(&self, addr: u64, data: &[u8]) -> bool {
        self.mem().write_slice(data, GuestAddress(addr)).is_ok()
    }

    /// The slot's status byte as it is now.
    pub fn status_byte(&self) -> u8 {
        self.mem()
            .read_obj(GuestAddress(self.slot.status))
            .unwrap_or(S_UNWRITTEN)
    }

    /// Submits a chain on `queue` and waits for its completion.
    pub fn submit(&mut self, queue: usize, bufs: &[Buf]) -> Result<Completion, BlkError> {
        let q = self.queue(queue)?;
        let mem = &self.conn.memory.mem;
        let q = &mut self.conn.queues[q];
        q.add(mem, bufs)?.ok_or(BlkError::QueueFull)?;
        q.kick(mem, 1)?;
        let timeout = self.timeout;
        self.wait_one(queue, timeout)?
            .ok_or(BlkError::Timeout(timeout))
    }

    /// Submits raw descriptors (written at indices 0.., head 0) on an idle
    /// queue and waits for the completion.
    pub fn submit_raw(&mut self, queue: usize, descs: &[RawDesc]) -> Result<Completion, BlkError> {
        let timeout = self.timeout;
        self.submit_raw_timeout(queue, descs, timeout)?
            .ok_or(BlkError::Timeout(timeout))
    }

    /// Like `submit_raw`, but no completion within `timeout` is `Ok(None)`,
    /// for chains a backend may rightly never complete. The chain then
    /// stays in flight: later raw submissions on that queue are refused.
    pub fn submit_raw_timeout(
        &mut self,
        queue: usize,
        descs: &[RawDesc],
        timeout: Duration,
    ) -> Result<Option<Completion>, BlkError> {
        let q = self.queue(queue)?;
        let mem = &self.conn.memory.mem;
        let q = &mut self.conn.queues[q];
        if q.in_flight() > 0 {
            return Err(BlkError::QueueFull);
        }
        q.add_raw(mem, descs)?;
        q.kick(mem, 1)?;
        self.wait_one(queue, timeout)
    }

    fn queue(&self, queue: usize) -> Result<usize, BlkError> {
        if queue < self.conn.queues.len() {
            Ok(queue)
        } else {
            Err(BlkError::NoQueue(queue))
        }
    }

    fn wait_one(
        &mut self,
        queue: usize,
        timeout: Duration,
    ) -> Result<Option<Completion>, BlkError> {
        let deadline = Instant::now() + timeout;
        let mut done: Vec<Used> = Vec::new();
        loop {
            let mem = &self.conn.memory.mem;
            let q = &mut self.conn.queues[queue];
            q.reap(mem, &mut done)?;
            if let Some(used) = done.first() {
                return Ok(Some(Completion {
                    used_len: used.len,
                    status: self.status_byte(),
                }));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            q.wait(deadline - now)?;
        }
    }

    /// Hands the queues to pipelines of `depth` requests of up to `max_len`
    /// bytes each, for asynchronous use (one thread per pipeline). The
    /// client's synchronous calls then fail with `NoQueue`; keep the client
    /// alive while the pipelines run, it holds the connection.
    pub fn pipelines(&mut self, depth: usize, max_len: u32) -> Result<Vec<Pipeline>, BlkError> {
        let queues = std::mem::take(&mut self.conn.queues);
        queues
            .into_iter()
            .map(|q| Pipeline::new(&mut self.conn, q, depth, max_len))
            .collect()
    }
}
