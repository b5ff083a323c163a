//! The load generator's engine: one thread per queue keeps `depth`
//! requests in flight against a vhost-user-blk backend through a
//! [`Pipeline`] and records each latency, by direction.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::blk::{BlkError, BLK_FEATURES, S_OK, T_IN, T_OUT};
use crate::connection::{Connection, ConnectionError, Options};
use crate::latency::Latencies;
use crate::pipeline::{Done, Pipeline, Request};
use crate::virtqueue::Layout;
use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;

/// How long a queue may go without a completion before the backend counts
/// as hung, unless the spec says otherwise.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to retry a connection the backend is not ready for.
pub const CONNECT_RETRY: Duration = Duration::from_secs(2);

/// What the requests do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// Reads of the spec's `size` and writes of `write_size` bytes take
    /// turns on each queue, as a guest's reads meet its writeback: it shows
    /// what a backend's large writes cost the small reads queued with them.
    Mixed {
        write_size: u32,
    },
}

#[derive(Clone, Copy, Debug)]
pub struct LoadSpec {
    pub queues: usize,
    pub depth: usize,
    /// Bytes per request (per read with `Op::Mixed`), a multiple of 512.
    pub size: u32,
    pub random: bool,
    pub op: Op,
    /// How long the load runs before it is measured: what completes in it
    /// counts in no figure.
    pub warmup: Duration,
    /// How long the measured part runs.
    pub duration: Duration,
    /// How long a queue may wait for a completion before the run fails.
    pub stall_timeout: Duration,
    /// Stop each queue after this many requests, warm-up ones included
    /// (None: run for `duration`).
    pub max_requests: Option<u64>,
    pub seed: u64,
    /// Guest memory; None sizes it to fit the rings and buffers.
    pub mem_size: Option<u64>,
    /// Guest memory on 2 MiB huge pages.
    pub hugepages: bool,
    /// How long a queue watches its used ring before it sleeps until the
    /// backend's call (zero: it sleeps at once, as Linux's virtio-blk
    /// driver does).
    pub poll: Duration,
}

impl LoadSpec {
    /// The type and length of a queue's request number `n`.
    pub fn request(&self, n: u64) -> (u32, u32) {
        match self.op {
            Op::Read => (T_IN, self.size),
            Op::Write => (T_OUT, self.size),
            Op::Mixed { write_size } if n % 2 == 1 => (T_OUT, write_size),
            Op::Mixed { .. } => (T_IN, self.size),
        }
    }

    /// The longest request: the buffers' size, and what offsets align to.
    pub fn largest(&self) -> u32 {
        match self.op {
            Op::Mixed { write_size } => self.size.max(write_size),
            Op::Read | Op::Write => self.size,
        }
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Blk(#[from] BlkError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("request size {0} is not a positive multiple of 512")]
    Size(u32),
    #[error("--mem {given} is too small: {needed} bytes are needed")]
    MemTooSmall { given: u64, needed: u64 },
    #[error(
        "the backend refused queues of {queue_size} (3 descriptors for each of --depth \
         {depth}, to a power of two): lower --depth, or raise the backend's queue size \
         (vhost-blk --queue-size)"
    )]
    QueueSize {
        queue_size: u16,
        depth: usize,
        #[source]
        source: vhost::Error,
    },
    #[error("the disk ({0} bytes) is smaller than one request")]
    DiskTooSmall(u64),
    #[error(
        "queue {queue}: a {kind} came back with status {status} \
         (1: I/O error, 2: unsupported, 255: the backend wrote none)"
    )]
    RequestFailed {
        queue: usize,
        kind: &'static str,
        status: u8,
    },
    #[error(
        "queue {queue}: a read of {asked} bytes came back with used length {used}: \
         the backend says it wrote less than the data and status byte"
    )]
    ShortRead { queue: usize, asked: u32, used: u32 },
    #[error("the disk is read-only (VIRTIO_BLK_F_RO): only --op read runs on it")]
    ReadOnly,
    #[error("queue {0}")]
    Queue(usize, #[source] BlkError),
    #[error("queue {0}: no completion for {1:?}, the backend hung")]
    Stalled(usize, Duration),
    #[error("queue {0}: the worker thread panicked")]
    Panicked(usize),
}

#[derive(Debug, Default)]
pub struct Report {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Every request's latency.
    pub latencies: Latencies,
    /// The reads' latencies alone.
    pub read_latencies: Latencies,
    /// The writes' latencies alone.
    pub write_latencies: Latencies,
}

impl Report {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    /// Reads completed per second.
    pub fn read_iops(&self) -> f64 {
        self.read_latencies.count() as f64 / self.elapsed.as_secs_f64()
    }

    /// Writes completed per second.
    pub fn write_iops(&self) -> f64 {
        self.write_latencies.count() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p`-th percentile latency in microseconds (nearest rank).
    pub fn percentile_us(&self, p: f64) -> f64 {
        self.latencies.percentile_us(p)
    }
}

/// A small deterministic generator (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Every seed its own sequence: the seed is mixed (splitmix64's
    /// finalizer) into a state xorshift can use (any but zero).
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        Rng(if z == 0 { 0x9e37_79b9_7f4a_7c15 } else { z })
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Where the requests of one queue go: random or sequential blocks of the
/// request size, within the disk.
#[derive(Clone, Debug)]
pub struct Offsets {
    rng: Rng,
    random: bool,
    blocks: u64,
    next: u64,
    sectors_per_block: u64,
}

impl Offsets {
    /// Offsets for queue `queue` of `queues`: its own random stream, or
    /// its own starting point for sequential runs.
    pub fn new(spec: &LoadSpec, disk_bytes: u64, queue: usize) -> Self {
        // Aligned to the longest request, so that a mix draws both
        // directions from one stream.
        let blocks = disk_bytes / u64::from(spec.largest());
        let q = queue as u64;
        Offsets {
            rng: Rng::new(
                spec.seed
                    .wrapping_add(q.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            ),
            random: spec.random,
            blocks,
            next: blocks / spec.queues.max(1) as u64 * q,
            sectors_per_block: u64::from(spec.largest()) / 512,
        }
    }

    /// The next request's first sector.
    pub fn next_sector(&mut self) -> u64 {
        let block = if self.random {
            self.rng.next_u64() % self.blocks
        } else {
            let b = self.next;
            self.next = (self.next + 1) % self.blocks;
            b
        };
        block * self.sectors_per_block
    }
}

struct Worker {
    pipeline: Pipeline,
    offsets: Offsets,
    spec: LoadSpec,
}

struct WorkerResult {
    /// When its last request completed (or it stopped, if none was left).
    finished: Instant,
    reads: Latencies,
    writes: Latencies,
    bytes: u64,
}

impl Worker {
    fn run(
        mut self,
        measured_from: Instant,
        deadline: Instant,
        done_ops: &AtomicU64,
        stop: &AtomicBool,
    ) -> Result<WorkerResult, LoadError> {
        let queue = self.pipeline.index();
        let err = |e| LoadError::Queue(queue, e);
        let limit = self.spec.max_requests.unwrap_or(u64::MAX);
        let mut submitted = 0u64;
        let mut reads = Latencies::default();
        let mut writes = Latencies::default();
        let mut bytes = 0u64;
        let mut done: Vec<Done> = Vec::with_capacity(self.pipeline.depth());
        // A backend that signals without completing anything is as stuck
        // as one that never signals.
        let mut last_completion = Instant::now();
        loop {
            let running =
                submitted < limit && Instant::now() < deadline && !stop.load(Ordering::Relaxed);
            if !running && self.pipeline.in_flight() == 0 {
                break;
            }
            while running && submitted < limit {
                let (kind, len) = self.spec.request(submitted);
                let req = Request {
                    kind,
                    sector: self.offsets.next_sector(),
                    len,
                };
                if !self.pipeline.submit(req, submitted).map_err(err)? {
                    break;
                }
                submitted += 1;
            }
            self.pipeline.kick().map_err(err)?;
            done.clear();
            self.pipeline.reap(&mut done).map_err(err)?;
            let measured = Instant::now() >= measured_from;
            for d in &done {
                // The tag is the request's number.
                let (kind, len) = self.spec.request(d.tag);
                if d.status != S_OK {
                    // The first one ends the run: the rest would not be
                    // the load asked for.
                    return Err(LoadError::RequestFailed {
                        queue,
                        kind: if kind == T_OUT { "write" } else { "read" },
                        status: d.status,
                    });
                }
                if kind != T_OUT && d.used_len < len.saturating_add(1) {
                    // Counted as read, it would inflate the figures.
                    return Err(LoadError::ShortRead {
                        queue,
                        asked: len,
                        used: d.used_len,
                    });
                }
                if !measured {
                    continue;
                }
                let latency = u64::try_from(d.latency.as_nanos()).unwrap_or(u64::MAX);
                if kind == T_OUT {
                    writes.record(latency);
                } else {
                    reads.record(latency);
                }
                bytes += u64::from(len);
            }
            done_ops.fetch_add(done.len() as u64, Ordering::Relaxed);
            if !done.is_empty() {
                last_completion = Instant::now();
            } else if last_completion.elapsed() >= self.spec.stall_timeout
                || !self.pipeline.wait(self.spec.stall_timeout).map_err(err)?
            {
                return Err(LoadError::Stalled(queue, self.spec.stall_timeout));
            }
        }
        Ok(WorkerResult {
            finished: Instant::now(),
            reads,
            writes,
            bytes,
        })
    }
}

/// Guest memory the spec needs: rings and request buffers of every queue.
pub fn memory_needed(spec: &LoadSpec, queue_size: u16) -> u64 {
    let per_request = 4096 + u64::from(spec.largest()).next_multiple_of(4096);
    let per_queue = Layout::total_bytes(queue_size) + spec.depth as u64 * per_request;
    (spec.queues as u64 * per_queue + (1 << 20)).next_multiple_of(4096)
}

/// Runs the load; `progress` is called about five times a second with the
/// requests completed so far and the time since the start.
pub fn run(
    socket: &Path,
    spec: LoadSpec,
    mut progress: impl FnMut(u64, Duration),
) -> Result<Report, LoadError> {
    let sizes = match spec.op {
        Op::Mixed { write_size } => [spec.size, write_size],
        Op::Read | Op::Write => [spec.size; 2],
    };
    if let Some(&bad) = sizes.iter().find(|&&s| s == 0 || s % 512 != 0) {
        return Err(LoadError::Size(bad));
    }
    // Three descriptors a request.
    let queue_size = u16::try_from((spec.depth * 3).next_power_of_two().clamp(64, 32768))
        .expect("clamped to 32768");
    let needed = memory_needed(&spec, queue_size);
    let mem_size = match spec.mem_size {
        Some(given) if given < needed => return Err(LoadError::MemTooSmall { given, needed }),
        Some(given) => given,
        None => needed,
    };
    let options = Options {
        mem_size,
        num_queues: spec.queues,
        queues_without_mq: 1,
        queue_size,
        device_features: BLK_FEATURES,
        event_idx: true,
        hugepages: spec.hugepages,
    };
    // A backend that serves one frontend at a time may still be finishing
    // with the previous one (a benchmark script's previous run).
    let connect_deadline = Instant::now() + CONNECT_RETRY;
    let mut conn = loop {
        match Connection::connect(socket, options) {
            Err(e) if e.is_transient() && Instant::now() < connect_deadline => {
                log::debug!("{}: {e}; retrying", socket.display());
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(ConnectionError::Request("SET_VRING_NUM", source)) => {
                return Err(LoadError::QueueSize {
                    queue_size,
                    depth: spec.depth,
                    source,
                })
            }
            other => break other?,
        }
    };
    let config = conn.config.clone();
    let capacity = config
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .ok_or(BlkError::ShortConfig(config.len()))?;
    let disk_bytes = capacity.saturating_mul(512);
    if disk_bytes < u64::from(spec.largest()) {
        return Err(LoadError::DiskTooSmall(disk_bytes));
    }
    if !matches!(spec.op, Op::Read) && conn.features & (1 << VIRTIO_BLK_F_RO) != 0 {
        return Err(LoadError::ReadOnly);
    }
    let queues = std::mem::take(&mut conn.queues);
    let mut workers = Vec::with_capacity(queues.len());
    for (i, queue) in queues.into_iter().enumerate() {
        let mut pipeline = Pipeline::new(&mut conn, queue, spec.depth, spec.largest())?;
        pipeline.set_poll(spec.poll);
        workers.push(Worker {
            pipeline,
            offsets: Offsets::new(&spec, disk_bytes, i),
            spec,
        });
    }
    log::debug!(
        "load: {} queues of {queue_size}, depth {}, {} bytes of guest memory",
        spec.queues,
        spec.depth,
        mem_size
    );

    let done_ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let measured_from = start + spec.warmup;
    let deadline = measured_from + spec.duration;
    let handles: Vec<_> = workers
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let done_ops = done_ops.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                // A worker that panics stops the others too, rather than
                // leaving them to run to the deadline.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    w.run(measured_from, deadline, &done_ops, &stop)
                }))
                .unwrap_or(Err(LoadError::Panicked(i)));
                if result.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                result
            })
        })
        .collect();
    let mut next_progress = start;
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(10));
        if Instant::now() >= next_progress + Duration::from_millis(200) {
            next_progress = Instant::now();
            progress(done_ops.load(Ordering::Relaxed), start.elapsed());
        }
    }
    // The measured run lasts until the last request completed, not until
    // this thread next looked.
    let mut finished = measured_from;
    let mut report = Report::default();
    let mut first_error = None;
    for (i, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(r)) => {
                finished = finished.max(r.finished);
                report.read_latencies.merge(&r.reads);
                report.write_latencies.merge(&r.writes);
                report.bytes += r.bytes;
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(LoadError::Panicked(i));
            }
        }
    }
    drop(conn);
    if let Some(e) = first_error {
        return Err(e);
    }
    report.elapsed = finished.saturating_duration_since(measured_from);
    report.latencies.merge(&report.read_latencies);
    report.latencies.merge(&report.write_latencies);
    report.ops = report.latencies.count();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbouring_seeds_give_different_sequences() {
        let first = |seed| Rng::new(seed).next_u64();
        assert_ne!(first(0), first(1));
        assert_ne!(first(2), first(3));
        assert_eq!(first(7), first(7));
    }

    fn spec(random: bool, queues: usize) -> LoadSpec {
        LoadSpec {
            queues,
            depth: 4,
            size: 4096,
            random,
            op: Op::Read,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
            stall_timeout: STALL_TIMEOUT,
            max_requests: None,
            seed: 1,
            mem_size: None,
            hugepages: false,
            poll: Duration::ZERO,
        }
    }

    #[test]
    fn random_offsets_are_aligned_in_range_and_deterministic() {
        let disk = 10 * 4096 + 512;
        let mut a = Offsets::new(&spec(true, 1), disk, 0);
        let mut b = Offsets::new(&spec(true, 1), disk, 0);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let s = a.next_sector();
            assert_eq!(s, b.next_sector());
            assert_eq!(s % 8, 0);
            assert!(s * 512 + 4096 <= disk);
            seen[(s / 8) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s), "every block is reached");
        let mut other = Offsets::new(&spec(true, 2), disk, 1);
        let mut a = Offsets::new(&spec(true, 2), disk, 0);
        let same = (0..100)
            .filter(|_| a.next_sector() == other.next_sector())
            .count();
        assert!(same < 50, "queues draw different streams");
    }

    #[test]
    fn sequential_offsets_wrap_and_queues_start_apart() {
        let mut q0 = Offsets::new(&spec(false, 2), 4 * 4096, 0);
        let mut q1 = Offsets::new(&spec(false, 2), 4 * 4096, 1);
        let s0: Vec<u64> = (0..5).map(|_| q0.next_sector()).collect();
        let s1: Vec<u64> = (0..3).map(|_| q1.next_sector()).collect();
        assert_eq!(s0, [0, 8, 16, 24, 0]);
        assert_eq!(s1, [16, 24, 0]);
    }

    #[test]
    fn a_mix_takes_turns_and_aligns_to_its_longest_request() {
        let s = LoadSpec {
            op: Op::Mixed { write_size: 65536 },
            ..spec(true, 1)
        };
        let requests: Vec<_> = (0..4).map(|n| s.request(n)).collect();
        assert_eq!(
            requests,
            [(T_IN, 4096), (T_OUT, 65536), (T_IN, 4096), (T_OUT, 65536)]
        );
        assert_eq!(s.largest(), 65536);
        let disk = 3 * 65536 + 4096;
        let mut offsets = Offsets::new(&s, disk, 0);
        for _ in 0..100 {
            let sector = offsets.next_sector();
            assert_eq!(sector % 128, 0);
            assert!(sector * 512 + 65536 <= disk);
        }
        let plain = spec(true, 1);
        assert_eq!((plain.request(1), plain.largest()), ((T_IN, 4096), 4096));
        assert!(memory_needed(&s, 128) > memory_needed(&plain, 128) + 4 * 60000);
    }

    #[test]
    fn memory_fits_the_rings_and_buffers() {
        let s = LoadSpec {
            depth: 32,
            queues: 2,
            ..spec(true, 2)
        };
        let needed = memory_needed(&s, 128);
        assert!(needed >= 2 * (Layout::total_bytes(128) + 32 * 8192));
        assert_eq!(needed % 4096, 0);
    }
}
