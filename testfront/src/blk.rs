//! virtio-blk over the test frontend: synchronous requests for tests, and
//! the pieces the load generator uses.

use std::path::Path;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::connection::{Connection, ConnectionError, Options, REQUEST_TIMEOUT};
use crate::virtqueue::{Buf, RawDesc};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// virtio-blk features a test client asks for.
pub const BLK_FEATURES: u64 = (1 << 2) // SEG_MAX
    | (1 << 5) // RO
    | (1 << 6) // BLK_SIZE
    | (1 << 9) // FLUSH
    | (1 << 12) // MQ
    | (1 << 13) // DISCARD
    | (1 << 14); // WRITE_ZEROES

#[derive(Debug, Error)]
pub enum BlkError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("no completion within {0:?}: the backend hung or died")]
    Timeout(std::time::Duration),
    #[error("the queue is full")]
    QueueFull,
    #[error("waiting for the backend")]
    Wait(#[source] std::io::Error),
}

/// Where one request's header, data and status live in guest memory.
#[derive(Clone, Copy)]
pub struct Slot {
    pub header: u64,
    pub data: u64,
    pub status: u64,
    pub capacity: u32,
}

impl Slot {
    pub fn alloc(conn: &mut Connection, data_len: u32) -> Result<Slot, BlkError> {
        let mem = &mut conn.memory;
        let size = mem.size;
        let oom = || ConnectionError::OutOfMemory(size);
        let header = mem.alloc(32, 16).ok_or_else(oom)?;
        let data = mem.alloc(u64::from(data_len), 4096).ok_or_else(oom)?;
        Ok(Slot {
            header,
            status: header + 16,
            data,
            capacity: data_len,
        })
    }
}

pub struct BlkClient {
    pub conn: Connection,
    slot: Slot,
}

impl BlkClient {
    /// Connects with `num_queues` queues of `queue_size` and 64 MiB of memory.
    pub fn connect(socket: &Path, num_queues: usize, queue_size: u16) -> Result<Self, BlkError> {
        let mut conn = Connection::connect(
            socket,
            Options {
                mem_size: 64 << 20,
                num_queues,
                queue_size,
                device_features: BLK_FEATURES,
                event_idx: true,
            },
        )?;
        let slot = Slot::alloc(&mut conn, 1 << 20)?;
        Ok(BlkClient { conn, slot })
    }

    pub fn config(&mut self) -> Result<Vec<u8>, BlkError> {
        Ok(self.conn.get_config(60)?)
    }

    /// Capacity in 512-byte sectors, from the config space.
    pub fn capacity(&mut self) -> Result<u64, BlkError> {
        let config = self.config()?;
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&config[..8]);
        Ok(u64::from_le_bytes(bytes))
    }

    pub fn features(&self) -> u64 {
        self.conn.features
    }

    fn header(&self, kind: u32, sector: u64) {
        let mem = &self.conn.memory.mem;
        let _ = mem.write_obj(kind, GuestAddress(self.slot.header));
        let _ = mem.write_obj(0u32, GuestAddress(self.slot.header + 4));
        let _ = mem.write_obj(sector, GuestAddress(self.slot.header + 8));
        let _ = mem.write_obj(0xffu8, GuestAddress(self.slot.status));
    }

    /// Submits a chain on `queue` and waits for it; returns (used len, status).
    pub fn submit(&mut self, queue: usize, bufs: &[Buf]) -> Result<(u32, u8), BlkError> {
        let mem = &self.conn.memory.mem;
        let q = &mut self.conn.queues[queue];
        q.add(mem, bufs).ok_or(BlkError::QueueFull)?;
        q.kick(mem, 1).map_err(BlkError::Wait)?;
        self.wait_one(queue)
    }

    /// Submits raw descriptors (malformed chains) and waits.
    pub fn submit_raw(&mut self, queue: usize, descs: &[RawDesc]) -> Result<(u32, u8), BlkError> {
        let mem = &self.conn.memory.mem;
        let q = &mut self.conn.queues[queue];
        q.add_raw(mem, descs);
        q.kick(mem, 1).map_err(BlkError::Wait)?;
        self.wait_one(queue)
    }

    fn wait_one(&mut self, queue: usize) -> Result<(u32, u8), BlkError> {
        let deadline = std::time::Instant::now() + REQUEST_TIMEOUT;
        let mut done = Vec::new();
        loop {
            let mem = &self.conn.memory.mem;
            self.conn.queues[queue].reap(mem, &mut done);
            if let Some(&(_, len)) = done.first() {
                let status: u8 = mem.read_obj(GuestAddress(self.slot.status)).unwrap_or(0xff);
                return Ok((len, status));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err(BlkError::Timeout(REQUEST_TIMEOUT));
            }
            self.conn.queues[queue]
                .wait(deadline - now)
                .map_err(BlkError::Wait)?;
        }
    }

    /// The slot's header, data and status buffers as a standard chain.
    pub fn chain(&self, data_len: u32, data_write: bool) -> Vec<Buf> {
        let mut bufs = vec![Buf {
            addr: self.slot.header,
            len: 16,
            write: false,
        }];
        if data_len > 0 {
            bufs.push(Buf {
                addr: self.slot.data,
                len: data_len,
                write: data_write,
            });
        }
        bufs.push(Buf {
            addr: self.slot.status,
            len: 1,
            write: true,
        });
        bufs
    }

    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// Reads `buf.len()` bytes from `sector`; returns the status.
    pub fn read(&mut self, queue: usize, sector: u64, buf: &mut [u8]) -> Result<u8, BlkError> {
        self.header(T_IN, sector);
        let chain = self.chain(buf.len() as u32, true);
        let (_, status) = self.submit(queue, &chain)?;
        let _ = self
            .conn
            .memory
            .mem
            .read_slice(buf, GuestAddress(self.slot.data));
        Ok(status)
    }

    pub fn write(&mut self, queue: usize, sector: u64, data: &[u8]) -> Result<u8, BlkError> {
        self.header(T_OUT, sector);
        let _ = self
            .conn
            .memory
            .mem
            .write_slice(data, GuestAddress(self.slot.data));
        let chain = self.chain(data.len() as u32, false);
        Ok(self.submit(queue, &chain)?.1)
    }

    pub fn flush(&mut self, queue: usize) -> Result<u8, BlkError> {
        self.header(T_FLUSH, 0);
        let chain = self.chain(0, false);
        Ok(self.submit(queue, &chain)?.1)
    }

    pub fn get_id(&mut self) -> Result<(u8, [u8; 20]), BlkError> {
        self.header(T_GET_ID, 0);
        let chain = self.chain(20, true);
        let (_, status) = self.submit(0, &chain)?;
        let mut id = [0u8; 20];
        let _ = self
            .conn
            .memory
            .mem
            .read_slice(&mut id, GuestAddress(self.slot.data));
        Ok((status, id))
    }

    /// DISCARD or WRITE_ZEROES of one segment.
    pub fn segment_request(
        &mut self,
        kind: u32,
        sector: u64,
        count: u32,
        flags: u32,
    ) -> Result<u8, BlkError> {
        self.header(kind, 0);
        let mut segment = [0u8; 16];
        segment[..8].copy_from_slice(&sector.to_le_bytes());
        segment[8..12].copy_from_slice(&count.to_le_bytes());
        segment[12..].copy_from_slice(&flags.to_le_bytes());
        let _ = self
            .conn
            .memory
            .mem
            .write_slice(&segment, GuestAddress(self.slot.data));
        let chain = self.chain(16, false);
        Ok(self.submit(0, &chain)?.1)
    }

    /// Writes a request header at the slot (for raw submissions).
    pub fn prepare_header(&self, kind: u32, sector: u64) {
        self.header(kind, sector);
    }

    pub fn status_byte(&self) -> u8 {
        self.conn
            .memory
            .mem
            .read_obj(GuestAddress(self.slot.status))
            .unwrap_or(0xff)
    }
}
