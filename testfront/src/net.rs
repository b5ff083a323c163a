//! virtio-net over the test frontend: rx buffers kept posted, frames sent
//! and received behind the 12-byte virtio-net header (mergeable buffers
//! reassembled), and raw chains for malformed-descriptor tests. Works with
//! any vhost-user-net backend that offers VERSION_1 and (for more than one
//! queue pair) the MQ protocol feature.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;
use virtio_bindings::virtio_net as vn;
use vm_memory::{Bytes, GuestAddress};

use crate::connection::{Connection, ConnectionError, Options, REQUEST_TIMEOUT};
use crate::memory::Memory;
use crate::virtqueue::{Buf, RawDesc, RingError, Used};

/// `struct virtio_net_hdr_mrg_rxbuf`: the header of a VERSION_1 device.
pub const HDR_LEN: usize = 12;
/// Where `num_buffers` sits in the header.
const NUM_BUFFERS_OFFSET: u64 = 10;
/// The largest frame behind a header (64 KiB of GSO plus Ethernet).
pub const MAX_FRAME: usize = 65550;

/// virtio-net features a test client asks for by default: mergeable rx
/// buffers and, with more than one pair, MQ. No offloads, so frames from
/// the host arrive whole and checksummed.
pub const NET_FEATURES: u64 = (1 << vn::VIRTIO_NET_F_MRG_RXBUF) | (1 << vn::VIRTIO_NET_F_MQ);

#[derive(Debug, Error)]
pub enum NetError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("no completion within {0:?}: the backend hung or died")]
    Timeout(Duration),
    #[error("queue {0} is not set up")]
    NoQueue(usize),
    #[error("queue {0} is full (or has chains in flight, for a raw chain)")]
    QueueBusy(usize),
    #[error("{0} bytes is more than a frame can be")]
    TooLarge(usize),
    #[error("the backend used {used} bytes of a {len}-byte rx buffer")]
    BadUsedLen { used: u32, len: u32 },
    #[error("the backend put a {0}-byte frame (less than a header) in an rx buffer")]
    ShortRx(u32),
    #[error("the backend says a frame spans {0} buffers")]
    BadNumBuffers(u16),
    #[error("out of guest memory for a burst of {0} frames")]
    NoMemory(usize),
}

/// What to set up.
#[derive(Clone, Copy, Debug)]
pub struct NetOptions {
    pub pairs: usize,
    pub queue_size: u16,
    /// Device feature bits (below 24) to ask for.
    pub features: u64,
    /// rx buffers kept posted on each pair (at most the queue size).
    pub rx_buffers: usize,
    pub rx_buffer_len: u32,
    pub mem_size: u64,
    pub event_idx: bool,
}

impl NetOptions {
    /// `pairs` queue pairs of 256 entries, 64 rx buffers of 2 KiB each.
    pub fn new(pairs: usize) -> Self {
        NetOptions {
            pairs,
            queue_size: 256,
            features: NET_FEATURES,
            rx_buffers: 64,
            rx_buffer_len: 2048,
            mem_size: 16 << 20,
            event_idx: true,
        }
    }
}

/// A frame received, header apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub pair: usize,
    pub header: Vec<u8>,
    pub frame: Vec<u8>,
    /// The chains it took (`num_buffers`).
    pub buffers: u16,
}

/// One pair's rx buffers: where each posted head's buffer is.
struct RxBuffers {
    posted: Vec<Option<u64>>,
    free: Vec<u64>,
    /// Completed, not yet read: (used entry, buffer address).
    done: VecDeque<(Used, u64)>,
}

/// A virtio-net driver over one connection. Sends wait for their
/// completion and receives for a frame, each up to a timeout (10 s unless
/// set): a backend that stops answering is an error, never a hang.
pub struct NetClient {
    pub conn: Connection,
    options: NetOptions,
    mrg_rxbuf: bool,
    rx: Vec<RxBuffers>,
    /// One frame buffer (header and frame) per pair.
    tx_buf: Vec<u64>,
    timeout: Duration,
}

fn rx_queue(pair: usize) -> usize {
    2 * pair
}

fn tx_queue(pair: usize) -> usize {
    2 * pair + 1
}

impl NetClient {
    /// Connects with `pairs` queue pairs and the default options, and posts
    /// the rx buffers.
    pub fn connect(socket: &Path, pairs: usize) -> Result<Self, NetError> {
        Self::connect_with(socket, NetOptions::new(pairs))
    }

    /// `connect`, retried until `timeout` while the backend is not ready
    /// (it serves one frontend at a time).
    pub fn connect_retrying(
        socket: &Path,
        pairs: usize,
        timeout: Duration,
    ) -> Result<Self, NetError> {
        let deadline = Instant::now() + timeout;
        loop {
            match Self::connect(socket, pairs) {
                Err(NetError::Connection(e)) if e.is_transient() && Instant::now() < deadline => {
                    log::debug!("{}: {e}; retrying", socket.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    pub fn connect_with(socket: &Path, options: NetOptions) -> Result<Self, NetError> {
        let mut conn = Connection::connect(
            socket,
            Options {
                mem_size: options.mem_size,
                num_queues: 2 * options.pairs,
                queues_without_mq: 2,
                queue_size: options.queue_size,
                device_features: options.features,
                event_idx: options.event_idx,
                hugepages: false,
            },
        )?;
        let mrg_rxbuf = conn.has_feature(vn::VIRTIO_NET_F_MRG_RXBUF);
        let oom = ConnectionError::OutOfMemory(options.mem_size);
        let mut tx_buf = Vec::with_capacity(options.pairs);
        for _ in 0..options.pairs {
            let addr = conn
                .memory
                .alloc((HDR_LEN + MAX_FRAME) as u64, 4096)
                .ok_or(ConnectionError::OutOfMemory(options.mem_size))?;
            tx_buf.push(addr);
        }
        let rx = (0..options.pairs)
            .map(|_| RxBuffers {
                posted: vec![None; usize::from(options.queue_size)],
                free: Vec::new(),
                done: VecDeque::new(),
            })
            .collect();
        let mut client = NetClient {
            conn,
            options,
            mrg_rxbuf,
            rx,
            tx_buf,
            timeout: REQUEST_TIMEOUT,
        };
        let count = options.rx_buffers.min(usize::from(options.queue_size));
        for pair in 0..options.pairs {
            if client.post_rx(pair, count)? < count {
                return Err(oom.into());
            }
        }
        Ok(client)
    }

    /// How long each send and receive may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The features acknowledged in SET_FEATURES.
    pub fn features(&self) -> u64 {
        self.conn.features
    }

    pub fn has_feature(&self, bit: u32) -> bool {
        self.conn.has_feature(bit)
    }

    pub fn pairs(&self) -> usize {
        self.options.pairs
    }

    pub fn mem(&self) -> &Memory {
        &self.conn.memory.mem
    }

    /// Guest address of pair `pair`'s frame buffer (`HDR_LEN + MAX_FRAME`
    /// bytes), for building raw chains over valid memory.
    pub fn tx_buffer(&self, pair: usize) -> Option<u64> {
        self.tx_buf.get(pair).copied()
    }

    /// Writes `bytes` into guest memory at `addr`; false when outside.
    pub fn write_mem(&self, addr: u64, bytes: &[u8]) -> bool {
        self.mem().write_slice(bytes, GuestAddress(addr)).is_ok()
    }

    /// Reads guest memory at `addr` into `buf`; false when outside.
    pub fn read_mem(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.mem().read_slice(buf, GuestAddress(addr)).is_ok()
    }

    fn queue(&self, index: usize) -> Result<usize, NetError> {
        if index < self.conn.queues.len() {
            Ok(index)
        } else {
            Err(NetError::NoQueue(index))
        }
    }

    /// Posts up to `count` more rx buffers on `pair` and kicks; returns how
    /// many were posted (fewer when the ring or the memory runs out).
    pub fn post_rx(&mut self, pair: usize, count: usize) -> Result<usize, NetError> {
        let q = self.queue(rx_queue(pair))?;
        let len = self.options.rx_buffer_len;
        let mut posted = 0;
        for _ in 0..count {
            let rx = &mut self.rx[pair];
            let addr = match rx.free.pop() {
                Some(addr) => addr,
                None => match self.conn.memory.alloc(u64::from(len), 64) {
                    Some(addr) => addr,
                    None => break,
                },
            };
            let mem = &self.conn.memory.mem;
            let buf = Buf {
                addr,
                len,
                write: true,
            };
            match self.conn.queues[q].add(mem, &[buf])? {
                Some(head) => {
                    self.rx[pair].posted[usize::from(head)] = Some(addr);
                    posted += 1;
                }
                None => {
                    self.rx[pair].free.push(addr);
                    break;
                }
            }
        }
        let mem = &self.conn.memory.mem;
        self.conn.queues[q].kick(mem, u16::try_from(posted).unwrap_or(u16::MAX))?;
        Ok(posted)
    }

    /// Sends `frame` on `pair`'s tx queue behind an all-zero header (two
    /// descriptors: header, frame) and waits for its completion.
    pub fn send(&mut self, pair: usize, frame: &[u8]) -> Result<(), NetError> {
        if frame.len() > MAX_FRAME {
            return Err(NetError::TooLarge(frame.len()));
        }
        let addr = *self
            .tx_buf
            .get(pair)
            .ok_or(NetError::NoQueue(tx_queue(pair)))?;
        let header = [0u8; HDR_LEN];
        // The buffer was allocated inside guest memory with room for both.
        let _ = self.mem().write_slice(&header, GuestAddress(addr));
        let data = addr + HDR_LEN as u64;
        let _ = self.mem().write_slice(frame, GuestAddress(data));
        let bufs = [
            Buf {
                addr,
                len: HDR_LEN as u32,
                write: false,
            },
            Buf {
                addr: data,
                len: frame.len() as u32,
                write: false,
            },
        ];
        self.submit(tx_queue(pair), &bufs)?;
        Ok(())
    }

    /// Sends `frames` on `pair`'s tx queue as one burst: every chain (one
    /// buffer each, header then frame) is made available before a single
    /// kick, so the backend finds them together. Waits for all of them to
    /// complete. Each burst takes fresh guest memory.
    pub fn send_burst(&mut self, pair: usize, frames: &[Vec<u8>]) -> Result<(), NetError> {
        let q = self.queue(tx_queue(pair))?;
        if let Some(long) = frames.iter().find(|f| f.len() > MAX_FRAME) {
            return Err(NetError::TooLarge(long.len()));
        }
        let mut bufs = Vec::with_capacity(frames.len());
        for frame in frames {
            let len = (HDR_LEN + frame.len()) as u64;
            let addr = self
                .conn
                .memory
                .alloc(len, 64)
                .ok_or(NetError::NoMemory(frames.len()))?;
            let _ = self.mem().write_slice(&[0u8; HDR_LEN], GuestAddress(addr));
            let _ = self
                .mem()
                .write_slice(frame, GuestAddress(addr + HDR_LEN as u64));
            bufs.push(Buf {
                addr,
                len: len as u32,
                write: false,
            });
        }
        let mem = &self.conn.memory.mem;
        let vq = &mut self.conn.queues[q];
        for buf in &bufs {
            vq.add(mem, std::slice::from_ref(buf))?
                .ok_or(NetError::QueueBusy(tx_queue(pair)))?;
        }
        vq.kick(mem, u16::try_from(bufs.len()).unwrap_or(u16::MAX))?;
        let deadline = Instant::now() + self.timeout;
        let mut done = Vec::new();
        while done.len() < bufs.len() {
            let mem = &self.conn.memory.mem;
            let vq = &mut self.conn.queues[q];
            vq.reap(mem, &mut done)?;
            let now = Instant::now();
            if done.len() >= bufs.len() {
                break;
            }
            if now >= deadline {
                return Err(NetError::Timeout(self.timeout));
            }
            vq.wait(deadline - now)?;
        }
        Ok(())
    }

    /// Submits a chain on queue `queue` (rx queues are 2p, tx 2p + 1) and
    /// waits for its completion.
    pub fn submit(&mut self, queue: usize, bufs: &[Buf]) -> Result<Used, NetError> {
        let q = self.queue(queue)?;
        let mem = &self.conn.memory.mem;
        let vq = &mut self.conn.queues[q];
        vq.add(mem, bufs)?.ok_or(NetError::QueueBusy(queue))?;
        vq.kick(mem, 1)?;
        let timeout = self.timeout;
        self.wait_used(q, timeout)?
            .ok_or(NetError::Timeout(timeout))
    }

    /// Writes raw descriptors at indices 0.. of queue `queue` (which must
    /// have nothing in flight: a tx queue between sends), publishes head 0
    /// and waits up to `timeout` for its completion (`None` if none came).
    pub fn submit_raw(
        &mut self,
        queue: usize,
        descs: &[RawDesc],
        timeout: Duration,
    ) -> Result<Option<Used>, NetError> {
        let q = self.queue(queue)?;
        let mem = &self.conn.memory.mem;
        let vq = &mut self.conn.queues[q];
        if vq.in_flight() > 0 || descs.is_empty() || descs.len() > usize::from(vq.size) {
            return Err(NetError::QueueBusy(queue));
        }
        vq.add_raw(mem, descs)?;
        vq.kick(mem, 1)?;
        self.wait_used(q, timeout)
    }

    fn wait_used(&mut self, q: usize, timeout: Duration) -> Result<Option<Used>, NetError> {
        let deadline = Instant::now() + timeout;
        let mut done = Vec::new();
        loop {
            let mem = &self.conn.memory.mem;
            let vq = &mut self.conn.queues[q];
            vq.reap(mem, &mut done)?;
            if let Some(used) = done.first() {
                return Ok(Some(*used));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            vq.wait(deadline - now)?;
        }
    }

    /// The next frame received on any pair, waiting up to `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Received>, NetError> {
        let deadline = Instant::now() + timeout;
        let pairs = self.options.pairs;
        loop {
            for pair in 0..pairs {
                if let Some(frame) = self.try_recv(pair)? {
                    return Ok(Some(frame));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // One pair: sleep on its call eventfd; more: look at each in turn.
            let slice = if pairs == 1 {
                deadline - now
            } else {
                (deadline - now).min(Duration::from_millis(5))
            };
            for pair in 0..pairs {
                let q = self.queue(rx_queue(pair))?;
                self.conn.queues[q].wait(slice / pairs as u32)?;
            }
        }
    }

    /// The first frame received within `timeout` that `wanted` accepts;
    /// the others are dropped (the host sends router solicitations and the
    /// like on a new interface).
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        mut wanted: impl FnMut(&Received) -> bool,
    ) -> Result<Option<Received>, NetError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(frame) if wanted(&frame) => return Ok(Some(frame)),
                Some(frame) => log::debug!("skipping a {}-byte frame", frame.frame.len()),
                None => return Ok(None),
            }
        }
    }

    /// A complete frame already in `pair`'s used ring, if any; its buffers
    /// are posted again.
    pub fn try_recv(&mut self, pair: usize) -> Result<Option<Received>, NetError> {
        let q = self.queue(rx_queue(pair))?;
        let mut used = Vec::new();
        {
            let mem = &self.conn.memory.mem;
            self.conn.queues[q].reap(mem, &mut used)?;
        }
        let rx = &mut self.rx[pair];
        for u in used {
            // reap only returns heads it had in flight, all posted here.
            if let Some(addr) = rx
                .posted
                .get_mut(usize::from(u.head))
                .and_then(Option::take)
            {
                rx.done.push_back((u, addr));
            }
        }
        let frame = self.assemble(pair)?;
        let free = self.rx[pair].free.len();
        if free > 0 {
            self.post_rx(pair, free)?;
        }
        Ok(frame)
    }

    /// Takes one frame (its `num_buffers` chains) off the completed ones.
    fn assemble(&mut self, pair: usize) -> Result<Option<Received>, NetError> {
        let len = self.options.rx_buffer_len;
        let queue_size = self.options.queue_size;
        let mrg = self.mrg_rxbuf;
        let mem = &self.conn.memory.mem;
        let rx = &mut self.rx[pair];
        loop {
            let Some(&(first, addr)) = rx.done.front() else {
                return Ok(None);
            };
            if first.len == 0 {
                // Completed empty: the backend dropped something.
                rx.done.pop_front();
                rx.free.push(addr);
                continue;
            }
            if first.len > len {
                return Err(NetError::BadUsedLen {
                    used: first.len,
                    len,
                });
            }
            if (first.len as usize) < HDR_LEN {
                return Err(NetError::ShortRx(first.len));
            }
            let count = if mrg {
                mem.read_obj::<u16>(GuestAddress(addr + NUM_BUFFERS_OFFSET))
                    .unwrap_or(0)
            } else {
                1
            };
            if count == 0 || count > queue_size {
                return Err(NetError::BadNumBuffers(count));
            }
            if rx.done.len() < usize::from(count) {
                return Ok(None);
            }
            let mut bytes = Vec::new();
            for _ in 0..count {
                let Some((u, a)) = rx.done.pop_front() else {
                    break;
                };
                if u.len > len {
                    return Err(NetError::BadUsedLen { used: u.len, len });
                }
                let mut part = vec![0u8; u.len as usize];
                // Every buffer was allocated inside guest memory.
                let _ = mem.read_slice(&mut part, GuestAddress(a));
                bytes.extend_from_slice(&part);
                rx.free.push(a);
            }
            let frame = bytes.split_off(HDR_LEN);
            return Ok(Some(Received {
                pair,
                header: bytes,
                frame,
                buffers: count,
            }));
        }
    }
}
