//! The virtio-net control queue, served by the VMM: network backends only
//! move packets, so the queue-pair count the driver asks for
//! (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) is applied here by turning the
//! backend's rings on and off. The worker thread sleeps on the queue's kick
//! eventfd (a KVM ioeventfd, like every other queue).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::deadline::{REPLY_TIMEOUT, RESET_LIMIT};
use super::frontend::RingSwitch;
use crate::guest_warnings::GuestWarnings;
use crate::vstate::memory::GuestMemory;

const VIRTIO_NET_CTRL_MQ: u8 = 4;
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;
/// Longest command we read: class, command and a u16 argument, with room.
const MAX_COMMAND: usize = 64;

/// Where the control queue lives in guest memory, as the driver set it up.
pub struct ControlRing {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub event_idx: bool,
}

impl ControlRing {
    /// A ready queue over the ring.
    fn queue(&self) -> Result<Queue, String> {
        let mut queue = Queue::new(self.size).map_err(|e| format!("control queue: {e}"))?;
        queue
            .try_set_size(self.size)
            .and_then(|()| queue.try_set_desc_table_address(GuestAddress(self.desc)))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(self.avail)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(self.used)))
            .map_err(|e| format!("control queue: {e}"))?;
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        Ok(queue)
    }
}

/// The running control-queue worker; stopped on device reset or drop.
pub struct ControlQueue {
    stop: EventFd,
    /// Set before `stop` is signalled, so a worker busy with a driver that
    /// keeps adding commands stops too.
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Applies control commands: the queue-pair count.
pub struct Controller {
    pub name: String,
    pub max_pairs: u16,
    /// The data rings the driver set up (the backend has only these).
    pub set_up: Vec<u16>,
    pub rings: RingSwitch,
}

/// What the queue's commands act on.
trait Commands {
    /// The device's name, for the log.
    fn name(&self) -> &str;
    /// Executes one command.
    fn execute(&mut self, command: &[u8]) -> Ack;
}

/// What a command's ack says.
#[derive(Debug, PartialEq)]
enum Ack {
    Ok,
    /// A command the device does not implement (drivers probe them).
    Unsupported,
    /// The driver got it wrong: why, for the log.
    Refused(String),
}

impl Commands for Controller {
    fn name(&self) -> &str {
        &self.name
    }

    fn execute(&mut self, command: &[u8]) -> Ack {
        match command {
            [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, lo, hi, ..] => {
                let pairs = u16::from_le_bytes([*lo, *hi]);
                if pairs == 0 || pairs > self.max_pairs {
                    return Ack::Refused(format!(
                        "the driver asked for {pairs} queue pairs of {}",
                        self.max_pairs
                    ));
                }
                // A ring the driver left alone was never handed to the
                // backend: it cannot carry traffic, and turning it on would
                // reach a backend ring set up by no one.
                if let Some(ring) = (0..2 * pairs).find(|r| !self.set_up.contains(r)) {
                    return Ack::Refused(format!(
                        "the driver asked for {pairs} queue pairs without setting up ring {ring}"
                    ));
                }
                // Each backend that serves a command gets as long to
                // answer as a reset does, however many rings it switches:
                // past that, it is cut off. A backend that is away or cut
                // off midway leaves the next one its own time, and time
                // spent waiting for a reconnect to hand over the rings is
                // not counted.
                let mut answering = Duration::ZERO;
                let mut reached = true;
                for pair in 0..self.max_pairs {
                    for ring in [2 * pair, 2 * pair + 1] {
                        if !self.set_up.contains(&ring) {
                            continue;
                        }
                        let mut asked = None;
                        let answered = self.rings.set(usize::from(ring), pair < pairs, || {
                            asked = Some(Instant::now());
                            RESET_LIMIT.saturating_sub(answering).min(REPLY_TIMEOUT)
                        });
                        answering = if answered {
                            answering + asked.map_or(Duration::ZERO, |at| at.elapsed())
                        } else {
                            // Away or cut off: a backend that comes back
                            // before the next ring has its own time.
                            Duration::ZERO
                        };
                        reached &= answered;
                    }
                }
                if reached {
                    log::info!("{}: {pairs} queue pair(s) in use", self.name);
                } else {
                    log::info!(
                        "{}: {pairs} queue pair(s) in use from the next backend on",
                        self.name
                    );
                }
                // Acked either way: the driver's count is what every backend
                // from now on gets, and a driver told ERR would keep its old
                // count and leave the new receive rings empty.
                Ack::Ok
            }
            [class, cmd, ..] => {
                log::debug!("{}: unsupported control command {class}.{cmd}", self.name);
                Ack::Unsupported
            }
            _ => Ack::Refused(format!("a control command of {} bytes", command.len())),
        }
    }
}

impl ControlQueue {
    /// Starts serving the ring. `call` is the queue's MSI-X irqfd, if any.
    pub fn start(
        ring: &ControlRing,
        mem: GuestMemory,
        kick: EventFd,
        call: Option<EventFd>,
        mut controller: Controller,
        warnings: Arc<Mutex<GuestWarnings>>,
    ) -> Result<ControlQueue, String> {
        let mut queue = ring.queue()?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let stop_worker = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stopping_worker = Arc::clone(&stopping);
        let thread = std::thread::Builder::new()
            .name(format!("{}-ctrl", controller.name))
            .spawn(move || {
                // Shared with the device's earlier and later workers, so a
                // driver that breaks the queue and resets in a loop cannot
                // flood the log.
                let mut warnings = warnings.lock().unwrap_or_else(|p| p.into_inner());
                while wait(&kick, &stop_worker) {
                    let _ = kick.read();
                    let served = serve(
                        &mut queue,
                        &mem,
                        call.as_ref(),
                        &mut controller,
                        &mut warnings,
                        &stopping_worker,
                    );
                    if !served {
                        break;
                    }
                }
            })
            .map_err(|e| format!("cannot start the control queue thread: {e}"))?;
        Ok(ControlQueue {
            stop,
            stopping,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlQueue {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sleeps until a kick (true) or a stop request (false).
fn wait(kick: &EventFd, stop: &EventFd) -> bool {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds whose eventfds are
        // owned by the caller for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if fds[1].revents != 0 {
            return false;
        }
        if fds[0].revents != 0 {
            return true;
        }
    }
}

/// Executes every command on the ring, then signals the driver. False
/// once the ring is broken (an available index the ring cannot hold, or a
/// used ring outside guest memory): the queue then serves nothing until
/// the driver resets the device. Returns early, true, once `stopping` is
/// set.
fn serve(
    queue: &mut Queue,
    mem: &GuestMemory,
    call: Option<&EventFd>,
    ctl: &mut impl Commands,
    warnings: &mut GuestWarnings,
    stopping: &AtomicBool,
) -> bool {
    while !stopping.load(Ordering::Acquire) {
        if let Err(e) = queue.disable_notification(mem) {
            log::log!(
                warnings.level(ctl.name()),
                "{}: control queue broken: {e}",
                ctl.name()
            );
            return false;
        }
        // At most one ring's worth: `iter` refuses an index more than the
        // ring size ahead.
        let chains: Vec<_> = match queue.iter(mem) {
            Ok(available) => available.collect(),
            Err(e) => {
                log::log!(
                    warnings.level(ctl.name()),
                    "{}: control queue broken: {e}",
                    ctl.name()
                );
                return false;
            }
        };
        for chain in chains {
            if stopping.load(Ordering::Acquire) {
                // The device is being reset: its rings are the driver's
                // again, and the rest is not run.
                return true;
            }
            let head = chain.head_index();
            let written = handle(chain, mem, ctl, warnings);
            if let Err(e) = queue.add_used(mem, head, written) {
                log::log!(
                    warnings.level(ctl.name()),
                    "{}: control queue broken: {e}",
                    ctl.name()
                );
                return false;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                log::log!(
                    warnings.level(ctl.name()),
                    "{}: control queue broken: {e}",
                    ctl.name()
                );
                return false;
            }
        }
    }
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Some(call) = call {
            let _ = call.write(1);
        }
    }
    true
}

/// Reads the command from the readable descriptors, writes the ack into the
/// first writable byte. Returns the number of bytes written (0 or 1). The
/// driver's mistakes are logged through `warnings`: a driver that makes
/// them in a loop does not flood the log.
fn handle(
    chain: DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    ctl: &mut impl Commands,
    warnings: &mut GuestWarnings,
) -> u32 {
    let name = ctl.name().to_string();
    let mut warn = |what: &str| {
        let level = warnings.level(&name);
        log::log!(level, "{name}: {what}");
    };
    let mut command = Vec::with_capacity(MAX_COMMAND);
    let mut ack_at = None;
    for desc in chain {
        if desc.is_write_only() {
            if ack_at.is_none() && desc.len() > 0 {
                ack_at = Some(desc.addr());
            }
            continue;
        }
        let room = MAX_COMMAND - command.len();
        let take = (desc.len() as usize).min(room);
        let start = command.len();
        command.resize(start + take, 0);
        if mem.read_slice(&mut command[start..], desc.addr()).is_err() {
            warn("control command outside guest memory");
            return 0;
        }
    }
    let Some(ack_at) = ack_at else {
        warn("control command without room for the ack");
        return 0;
    };
    let ack = match ctl.execute(&command) {
        Ack::Ok => VIRTIO_NET_OK,
        Ack::Unsupported => VIRTIO_NET_ERR,
        Ack::Refused(why) => {
            warn(&why);
            VIRTIO_NET_ERR
        }
    };
    match mem.write_obj(ack, ack_at) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::{Address, GuestMemoryMmap};

    use super::*;

    const RING: ControlRing = ControlRing {
        size: 4,
        desc: 0x1000,
        avail: 0x2000,
        used: 0x3000,
        event_idx: false,
    };
    const COMMAND_AT: u64 = 0x4000;
    const ACK_AT: u64 = 0x5000;
    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;

    /// Records the commands and acks them all.
    struct Recorder(Vec<Vec<u8>>);

    impl Commands for Recorder {
        fn name(&self) -> &str {
            "net0"
        }

        fn execute(&mut self, command: &[u8]) -> Ack {
            self.0.push(command.to_vec());
            Ack::Ok
        }
    }

    fn memory() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn put_desc(mem: &GuestMemory, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(RING.desc + 16 * index);
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, at.unchecked_add(8)).unwrap();
        mem.write_obj(flags, at.unchecked_add(12)).unwrap();
        mem.write_obj(next, at.unchecked_add(14)).unwrap();
    }

    /// Makes chain `head` available as the ring's `slot`-th entry and sets
    /// the available index to `idx`.
    fn make_available(mem: &GuestMemory, slot: u64, head: u16, idx: u16) {
        mem.write_obj(head, GuestAddress(RING.avail + 4 + 2 * slot))
            .unwrap();
        mem.write_obj(idx, GuestAddress(RING.avail + 2)).unwrap();
    }

    /// Runs `serve` on another thread; its result, or None if it has not
    /// returned within 5 s.
    fn serve_within(mem: GuestMemory) -> Option<(bool, Recorder)> {
        let (done, result) = mpsc::channel();
        std::thread::spawn(move || {
            let mut queue = RING.queue().unwrap();
            let mut recorder = Recorder(Vec::new());
            let stopping = AtomicBool::new(false);
            let mut warnings = GuestWarnings::default();
            let served = serve(
                &mut queue,
                &mem,
                None,
                &mut recorder,
                &mut warnings,
                &stopping,
            );
            let _ = done.send((served, recorder));
        });
        result.recv_timeout(Duration::from_secs(5)).ok()
    }

    #[test]
    fn a_command_is_executed_and_acked_in_the_used_ring() {
        let mem = memory();
        let command = [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 2, 0];
        mem.write_slice(&command, GuestAddress(COMMAND_AT)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(ACK_AT)).unwrap();
        put_desc(&mem, 0, COMMAND_AT, 4, VRING_DESC_F_NEXT, 1);
        put_desc(&mem, 1, ACK_AT, 1, VRING_DESC_F_WRITE, 0);
        make_available(&mem, 0, 0, 1);
        let check = mem.clone();

        let (served, recorder) = serve_within(mem).expect("serve returns");
        assert!(served);
        assert_eq!(recorder.0, vec![command.to_vec()]);
        assert_eq!(
            check.read_obj::<u8>(GuestAddress(ACK_AT)).unwrap(),
            VIRTIO_NET_OK
        );
        let used_idx: u16 = check.read_obj(GuestAddress(RING.used + 2)).unwrap();
        let used_id: u32 = check.read_obj(GuestAddress(RING.used + 4)).unwrap();
        let used_len: u32 = check.read_obj(GuestAddress(RING.used + 8)).unwrap();
        assert_eq!((used_idx, used_id, used_len), (1, 0, 1));
    }

    #[test]
    fn an_available_index_the_ring_cannot_hold_breaks_the_queue_instead_of_spinning() {
        let mem = memory();
        put_desc(&mem, 0, COMMAND_AT, 4, VRING_DESC_F_NEXT, 1);
        put_desc(&mem, 1, ACK_AT, 1, VRING_DESC_F_WRITE, 0);
        make_available(&mem, 0, 0, RING.size + 1);

        let (served, recorder) = serve_within(mem).expect("serve returns");
        assert!(!served, "the queue is broken");
        assert!(recorder.0.is_empty(), "no command ran");
    }

    /// VQ_PAIRS_SET for `pairs` queue pairs.
    fn set(pairs: u8) -> [u8; 4] {
        [
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            pairs,
            0,
        ]
    }

    /// A pair count set while the backend is away is recorded for the next
    /// one and acked: a driver told ERR keeps its old count and would leave
    /// the rings the next backend serves without buffers.
    #[test]
    fn a_pair_count_set_while_the_backend_is_away_is_acked() {
        let mut controller = Controller {
            name: "net9".into(),
            max_pairs: 2,
            set_up: vec![0, 1, 2, 3],
            rings: RingSwitch::without_backend(4),
        };
        assert_eq!(controller.execute(&set(1)), Ack::Ok);
        let refused = |ack| matches!(ack, Ack::Refused(_));
        assert!(refused(controller.execute(&set(0))));
        assert!(refused(controller.execute(&set(3))));
        assert_eq!(controller.execute(&set(2)), Ack::Ok);
    }

    /// Pairs whose rings the driver did not set up are refused: the
    /// backend never got those rings.
    #[test]
    fn pairs_whose_rings_were_not_set_up_are_refused() {
        let mut controller = Controller {
            name: "net9".into(),
            max_pairs: 2,
            set_up: vec![0, 1, 2],
            rings: RingSwitch::without_backend(4),
        };
        assert_eq!(controller.execute(&set(1)), Ack::Ok);
        assert!(matches!(controller.execute(&set(2)), Ack::Refused(e) if e.contains("ring 3")));
    }
}
