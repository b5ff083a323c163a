//! The virtio-net control queue, served by the VMM: network backends only
//! move packets, so the queue-pair count the driver asks for
//! (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) is applied here by turning the
//! backend's rings on and off. The worker thread sleeps on the queue's kick
//! eventfd (a KVM ioeventfd, like every other queue).

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::frontend::RingSwitch;
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

/// The running control-queue worker; stopped on device reset or drop.
pub struct ControlQueue {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

/// Applies control commands: the queue-pair count.
pub struct Controller {
    pub name: String,
    pub max_pairs: u16,
    pub rings: RingSwitch,
}

impl Controller {
    /// Executes one command; returns the ack byte.
    fn execute(&mut self, command: &[u8]) -> u8 {
        match command {
            [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, lo, hi, ..] => {
                let pairs = u16::from_le_bytes([*lo, *hi]);
                if pairs == 0 || pairs > self.max_pairs {
                    log::warn!(
                        "{}: the driver asked for {pairs} queue pairs of {}",
                        self.name,
                        self.max_pairs
                    );
                    return VIRTIO_NET_ERR;
                }
                let mut ok = true;
                for pair in 0..self.max_pairs {
                    for ring in [2 * pair, 2 * pair + 1] {
                        ok &= self.rings.set(usize::from(ring), pair < pairs);
                    }
                }
                log::info!("{}: {pairs} queue pair(s) in use", self.name);
                if ok {
                    VIRTIO_NET_OK
                } else {
                    VIRTIO_NET_ERR
                }
            }
            [class, cmd, ..] => {
                log::debug!("{}: unsupported control command {class}.{cmd}", self.name);
                VIRTIO_NET_ERR
            }
            _ => VIRTIO_NET_ERR,
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
    ) -> Result<ControlQueue, String> {
        let mut queue = Queue::new(ring.size).map_err(|e| format!("control queue: {e}"))?;
        queue
            .try_set_size(ring.size)
            .and_then(|()| queue.try_set_desc_table_address(GuestAddress(ring.desc)))
            .and_then(|()| queue.try_set_avail_ring_address(GuestAddress(ring.avail)))
            .and_then(|()| queue.try_set_used_ring_address(GuestAddress(ring.used)))
            .map_err(|e| format!("control queue: {e}"))?;
        queue.set_event_idx(ring.event_idx);
        queue.set_ready(true);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let stop_worker = stop.try_clone().map_err(|e| format!("eventfd: {e}"))?;
        let thread = std::thread::Builder::new()
            .name(format!("{}-ctrl", controller.name))
            .spawn(move || {
                while wait(&kick, &stop_worker) {
                    let _ = kick.read();
                    serve(&mut queue, &mem, call.as_ref(), &mut controller);
                }
            })
            .map_err(|e| format!("cannot start the control queue thread: {e}"))?;
        Ok(ControlQueue {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlQueue {
    fn drop(&mut self) {
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

/// Executes every command on the ring, then signals the driver.
fn serve(queue: &mut Queue, mem: &GuestMemory, call: Option<&EventFd>, ctl: &mut Controller) {
    loop {
        if queue.disable_notification(mem).is_err() {
            return;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let written = handle(chain, mem, ctl);
            if let Err(e) = queue.add_used(mem, head, written) {
                log::warn!("{}: control queue: {e}", ctl.name);
                return;
            }
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(_) => return,
        }
    }
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Some(call) = call {
            let _ = call.write(1);
        }
    }
}

/// Reads the command from the readable descriptors, writes the ack into the
/// first writable byte. Returns the number of bytes written (0 or 1).
fn handle(chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory, ctl: &mut Controller) -> u32 {
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
            log::warn!("{}: control command outside guest memory", ctl.name);
            return 0;
        }
    }
    let Some(ack_at) = ack_at else {
        log::warn!("{}: control command without room for the ack", ctl.name);
        return 0;
    };
    let ack = ctl.execute(&command);
    match mem.write_obj(ack, ack_at) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}
