//! The load generator's engine: one thread per queue keeps `depth` requests
//! in flight against a vhost-user-blk backend and records each latency.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::blk::{BlkError, Slot, BLK_FEATURES, S_OK, T_IN, T_OUT};
use crate::connection::{Connection, ConnectionError, Options};
use crate::memory::Memory;
use crate::virtqueue::{Buf, VirtQueue};

#[derive(Clone, Copy, Debug)]
pub struct LoadSpec {
    pub queues: usize,
    pub depth: usize,
    pub size: u32,
    pub random: bool,
    pub write: bool,
    pub duration: Duration,
    pub seed: u64,
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Blk(#[from] BlkError),
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("request size {0} is not a multiple of 512")]
    Size(u32),
    #[error("the disk ({0} bytes) is smaller than one request")]
    DiskTooSmall(u64),
    #[error("{0} requests failed (status not OK)")]
    Failed(u64),
    #[error("queue {0}: {1}")]
    Queue(usize, String),
}

#[derive(Debug, Default)]
pub struct Report {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Sorted request latencies in nanoseconds.
    pub latencies: Vec<u64>,
}

impl Report {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    pub fn mbps(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
    /// The `p`-th percentile latency in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)] as f64 / 1000.0
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct Worker {
    queue: VirtQueue,
    mem: Memory,
    slots: Vec<Slot>,
    spec: LoadSpec,
    blocks: u64,
    rng: Rng,
    next_block: u64,
}

impl Worker {
    fn next_sector(&mut self) -> u64 {
        let block = if self.spec.random {
            self.rng.next() % self.blocks
        } else {
            let b = self.next_block;
            self.next_block = (self.next_block + 1) % self.blocks;
            b
        };
        block * u64::from(self.spec.size) / 512
    }

    fn run(
        mut self,
        deadline: Instant,
        done_ops: &AtomicU64,
        stop: &AtomicBool,
    ) -> Result<(Vec<u64>, u64), String> {
        let kind = if self.spec.write { T_OUT } else { T_IN };
        let size = usize::from(self.queue.size);
        let mut started: Vec<Option<(usize, Instant)>> = vec![None; size];
        let mut free: Vec<usize> = (0..self.slots.len()).collect();
        let mut latencies = Vec::with_capacity(1 << 16);
        let mut failed = 0u64;
        let mut inflight = 0usize;
        let mut done = Vec::with_capacity(self.slots.len());
        loop {
            let now = Instant::now();
            let running = now < deadline && !stop.load(Ordering::Relaxed);
            if !running && inflight == 0 {
                break;
            }
            let mut added = 0u16;
            while let Some(index) = if running { free.pop() } else { None } {
                let slot = self.slots[index];
                let sector = self.next_sector();
                let _ = self.mem.write_obj(kind, GuestAddress(slot.header));
                let _ = self.mem.write_obj(0u32, GuestAddress(slot.header + 4));
                let _ = self.mem.write_obj(sector, GuestAddress(slot.header + 8));
                let bufs = [
                    Buf {
                        addr: slot.header,
                        len: 16,
                        write: false,
                    },
                    Buf {
                        addr: slot.data,
                        len: self.spec.size,
                        write: !self.spec.write,
                    },
                    Buf {
                        addr: slot.status,
                        len: 1,
                        write: true,
                    },
                ];
                let Some(head) = self.queue.add(&self.mem, &bufs) else {
                    free.push(index);
                    break;
                };
                started[usize::from(head)] = Some((index, Instant::now()));
                inflight += 1;
                added += 1;
            }
            if added > 0 {
                self.queue
                    .kick(&self.mem, added)
                    .map_err(|e| format!("kick: {e}"))?;
            }
            done.clear();
            self.queue.reap(&self.mem, &mut done);
            let now = Instant::now();
            for &(head, _) in &done {
                let Some((index, t0)) = started[usize::from(head)].take() else {
                    return Err(format!("completion for unknown head {head}"));
                };
                let status: u8 = self
                    .mem
                    .read_obj(GuestAddress(self.slots[index].status))
                    .unwrap_or(0xff);
                if status != S_OK {
                    failed += 1;
                }
                latencies.push((now - t0).as_nanos() as u64);
                free.push(index);
                inflight -= 1;
            }
            done_ops.fetch_add(done.len() as u64, Ordering::Relaxed);
            if done.is_empty() && inflight > 0 && !self.queue.has_used(&self.mem) {
                let ok = self
                    .queue
                    .wait(Duration::from_secs(5))
                    .map_err(|e| format!("wait: {e}"))?;
                if !ok && !self.queue.has_used(&self.mem) {
                    return Err("no completion for 5 s: the backend hung".into());
                }
            }
        }
        Ok((latencies, failed))
    }
}

/// Runs the load; `progress` is called about once a second with the
/// operations completed so far.
pub fn run(
    socket: &Path,
    spec: LoadSpec,
    mut progress: impl FnMut(u64, Duration),
) -> Result<Report, LoadError> {
    if spec.size == 0 || spec.size % 512 != 0 {
        return Err(LoadError::Size(spec.size));
    }
    let queue_size = (spec.depth * 3).next_power_of_two().clamp(64, 32768) as u16;
    let per_queue = spec.depth as u64 * (u64::from(spec.size).next_multiple_of(4096) + 4096)
        + VirtQueue::layout_size(queue_size)
        + 8192;
    let mut conn = Connection::connect(
        socket,
        Options {
            mem_size: (spec.queues as u64 * per_queue + (4 << 20)).next_multiple_of(4096),
            num_queues: spec.queues,
            queue_size,
            device_features: BLK_FEATURES,
            event_idx: true,
        },
    )?;
    let config = conn.get_config(8)?;
    let mut capacity = [0u8; 8];
    capacity.copy_from_slice(&config[..8]);
    let disk_bytes = u64::from_le_bytes(capacity) * 512;
    let blocks = disk_bytes / u64::from(spec.size);
    if blocks == 0 {
        return Err(LoadError::DiskTooSmall(disk_bytes));
    }
    let mut workers = Vec::new();
    let queues = std::mem::take(&mut conn.queues);
    for (i, queue) in queues.into_iter().enumerate() {
        let mut slots = Vec::with_capacity(spec.depth);
        for _ in 0..spec.depth {
            slots.push(Slot::alloc(&mut conn, spec.size)?);
        }
        workers.push(Worker {
            queue,
            mem: conn.memory.mem.clone(),
            slots,
            spec,
            blocks,
            rng: Rng(spec.seed.wrapping_add(i as u64 * 0x9e37_79b9_7f4a_7c15) | 1),
            next_block: (blocks / spec.queues as u64) * i as u64,
        });
    }

    let done_ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let handles: Vec<_> = workers
        .into_iter()
        .map(|w| {
            let done_ops = done_ops.clone();
            let stop = stop.clone();
            std::thread::spawn(move || w.run(deadline, &done_ops, &stop))
        })
        .collect();
    while Instant::now() < deadline && !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(200).min(deadline - Instant::now()));
        progress(done_ops.load(Ordering::Relaxed), start.elapsed());
    }
    let mut report = Report::default();
    let mut failed = 0;
    let mut first_error = None;
    for (i, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok((latencies, f))) => {
                report.latencies.extend(latencies);
                failed += f;
            }
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                first_error.get_or_insert(LoadError::Queue(i, e));
            }
            Err(_) => {
                first_error.get_or_insert(LoadError::Queue(i, "worker panicked".into()));
            }
        }
    }
    report.elapsed = start.elapsed();
    drop(conn);
    if let Some(e) = first_error {
        return Err(e);
    }
    if failed > 0 {
        return Err(LoadError::Failed(failed));
    }
    report.ops = report.latencies.len() as u64;
    report.bytes = report.ops * u64::from(spec.size);
    report.latencies.sort_unstable();
    Ok(report)
}
