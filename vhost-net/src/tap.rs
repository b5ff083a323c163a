//! The host side: a tap interface opened through /dev/net/tun, one file
//! descriptor (tap queue) per queue pair, frames preceded by a virtio-net
//! header. Knows nothing of virtqueues; every `unsafe` ioctl of the backend
//! is here.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use thiserror::Error;

use crate::iovec::IoVecs;
use crate::uring::BatchWriter;
use crate::worker::FrameIo;

const TUN_PATH: &str = "/dev/net/tun";

#[derive(Debug, Error)]
pub enum TapError {
    #[error("--tap {0:?}: cannot open {TUN_PATH}")]
    Open(String, #[source] io::Error),
    #[error("--tap {name:?}: cannot attach to the tap (TUNSETIFF{hint})")]
    Attach {
        name: String,
        hint: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("tap {name:?}: cannot set its new queue up ({what})")]
    Setup {
        name: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl TapError {
    fn is_einval(&self) -> bool {
        matches!(self, TapError::Attach { source, .. } if source.raw_os_error() == Some(libc::EINVAL))
    }
}

/// One queue of a tap interface.
pub struct Tap {
    file: File,
    name: String,
    multi_queue: AtomicBool,
    /// The tap's only queue, which may belong to a tap of either kind.
    lone: bool,
    /// Whether the kernel steers frames to this queue (TUNSETQUEUE).
    attached: AtomicBool,
    /// What the frontend asked the tap for, applied to a tap made again
    /// under the same name (`reattach`); its lock keeps a setting from
    /// landing on the old queue while `reattach` swaps it.
    settings: Mutex<Settings>,
    /// Writes batches of frames with one system call; used by the queue
    /// pair's worker only, so the lock is never contended.
    writer: Mutex<BatchWriter>,
}

/// The tap's settings the frontend's features decide.
#[derive(Default)]
struct Settings {
    vnet_hdr_len: Option<libc::c_int>,
    offload: Option<libc::c_uint>,
}

impl Settings {
    /// Applies every setting made so far to the tap queue `fd`.
    fn apply(&self, fd: RawFd) -> Result<(), (&'static str, io::Error)> {
        if let Some(len) = self.vnet_hdr_len {
            ioctl_int_ptr(fd, libc::TUNSETVNETHDRSZ, len).map_err(|e| ("TUNSETVNETHDRSZ", e))?;
        }
        if let Some(offload) = self.offload {
            ioctl_int(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(offload))
                .map_err(|e| ("TUNSETOFFLOAD", e))?;
        }
        Ok(())
    }
}

/// `struct ifreq` with the name and the flags (the only member used here).
fn ifreq(name: &str, flags: libc::c_int) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name was checked to be at most 15 bytes, so the NUL stays.
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    // The kernel's flags are a short; every IFF_ flag used fits.
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    req
}

/// The index of the network interface `name`, 0 if there is none.
fn interface_index(name: &str) -> libc::c_uint {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: a NUL-terminated string that lives across the call.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An ioctl whose argument is an `int` passed by value.
fn ioctl_int(fd: RawFd, request: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: these tun ioctls (TUNSETOFFLOAD) take their argument by
    // value and touch no memory of ours; `fd` is an open descriptor.
    let rc = unsafe { libc::ioctl(fd, request, value) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An ioctl whose argument points to an `int`.
fn ioctl_int_ptr(fd: RawFd, request: libc::Ioctl, value: libc::c_int) -> io::Result<()> {
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
    // points to a live local for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, request, &value as *const libc::c_int) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl_ifreq(fd: RawFd, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: TUNSETIFF and TUNSETQUEUE read (and TUNSETIFF writes back)
    // one `struct ifreq`, which `req` is, exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(fd, request, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// Opens `pairs` queues of the tap `name`, creating the interface if
    /// it does not exist (it then lasts as long as the queues are open).
    /// More than one queue needs a multi-queue tap; a single queue also
    /// attaches to an existing multi-queue tap.
    pub fn open_queues(name: &str, pairs: usize) -> Result<Vec<Tap>, TapError> {
        let multi_queue = pairs > 1;
        let mut taps = Vec::with_capacity(pairs);
        let (file, multi_queue) = Self::attach_any(name, multi_queue, pairs == 1)?;
        taps.push(Tap::new(name, file, multi_queue, pairs == 1));
        for _ in 1..pairs {
            taps.push(Tap::new(
                name,
                Self::attach(name, multi_queue)?,
                multi_queue,
                false,
            ));
        }
        log::info!(
            "attached to tap {name}: {pairs} queue{}{}",
            if pairs == 1 { "" } else { "s" },
            if multi_queue { ", multi-queue" } else { "" }
        );
        Ok(taps)
    }

    fn new(name: &str, file: File, multi_queue: bool, lone: bool) -> Tap {
        Tap {
            file,
            name: name.to_string(),
            multi_queue: AtomicBool::new(multi_queue),
            lone,
            attached: AtomicBool::new(true),
            settings: Mutex::new(Settings::default()),
            writer: Mutex::new(BatchWriter::default()),
        }
    }

    /// `attach`; for a `lone` queue, to a tap of the other kind if the tap
    /// is that (an existing multi-queue tap refuses a single-queue attach,
    /// and the other way round). Returns the kind it attached as. If the
    /// other kind is refused too, for the same reason (not a tap at all),
    /// the first refusal is the error; for another reason (EBUSY, EPERM),
    /// that one.
    fn attach_any(name: &str, multi_queue: bool, lone: bool) -> Result<(File, bool), TapError> {
        match Self::attach(name, multi_queue) {
            Ok(file) => Ok((file, multi_queue)),
            Err(e) if lone && e.is_einval() => match Self::attach(name, !multi_queue) {
                Ok(file) => Ok((file, !multi_queue)),
                Err(other) if other.is_einval() => Err(e),
                Err(other) => Err(other),
            },
            Err(e) => Err(e),
        }
    }

    /// A new descriptor of /dev/net/tun attached to (a new queue of) the
    /// tap `name`, which is created if it does not exist.
    fn attach(name: &str, multi_queue: bool) -> Result<File, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|e| TapError::Open(name.to_string(), e))?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut req = ifreq(name, flags);
        ioctl_ifreq(file.as_raw_fd(), libc::TUNSETIFF, &mut req).map_err(|source| {
            let hint = match source.raw_os_error() {
                Some(libc::EPERM) => {
                    ": CAP_NET_ADMIN is needed to create it, or to attach to a tap of another owner or group"
                }
                Some(libc::EINVAL) if multi_queue => {
                    ": not a tap, or a tap created without multi_queue"
                }
                Some(libc::EINVAL) => ": not a tap",
                Some(libc::EBUSY) => ": another process holds its queue",
                _ => "",
            };
            TapError::Attach {
                name: name.to_string(),
                hint,
                source,
            }
        })?;
        Ok(file)
    }

    /// Whether an error of this queue's reads or writes says the queue was
    /// detached from its interface for good: the tap was deleted (the
    /// descriptor stays open but leads nowhere).
    pub fn is_gone(e: &io::Error) -> bool {
        e.raw_os_error() == Some(libc::EBADFD)
    }

    /// After the tap was deleted (`is_gone`): attaches this queue to the
    /// interface of the same name if there is one again, with the settings
    /// the frontend made, under the same descriptor number (so `as_raw_fd`
    /// holds). Ok(false) while there is no such interface. A deleted tap is
    /// not made again here: if the interface went away in the instant
    /// between the look and the attach, the attach made a tap of our own,
    /// under another index, and dropping its only queue deletes it again.
    /// One queue reattaches at a time in the process, so no other pair
    /// finds that tap of our own in the meantime and keeps it.
    pub fn reattach(&self) -> Result<bool, TapError> {
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _turn = lock(&ONE_AT_A_TIME);
        let index = || interface_index(&self.name);
        let seen = index();
        if seen == 0 {
            return Ok(false);
        }
        let settings = lock(&self.settings);
        let (file, multi_queue) = Self::attach_any(
            &self.name,
            self.multi_queue.load(Ordering::Relaxed),
            self.lone,
        )?;
        if index() != seen {
            log::debug!(
                "tap {}: went away again while this queue attached",
                self.name
            );
            return Ok(false);
        }
        let setup = |(what, source)| TapError::Setup {
            name: self.name.clone(),
            what,
            source,
        };
        settings.apply(file.as_raw_fd()).map_err(setup)?;
        // SAFETY: both descriptors are open and owned (`file` here,
        // `self.file` by this queue, which goes on owning the number and
        // closes it on drop); dup3 swaps what the number refers to in one
        // step, so a concurrent user of the number sees the old queue or
        // the new one, never a closed or foreign descriptor.
        let rc = unsafe { libc::dup3(file.as_raw_fd(), self.file.as_raw_fd(), libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(setup(("dup3", io::Error::last_os_error())));
        }
        // The batch writer's io_uring holds the old queue as its fixed
        // file: a ring made afresh on the next batch registers the new one.
        *lock(&self.writer) = BatchWriter::default();
        self.multi_queue.store(multi_queue, Ordering::Relaxed);
        self.attached.store(true, Ordering::Relaxed);
        Ok(true)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the length of the virtio-net header that precedes each frame
    /// (10 or 12 bytes); it applies to every queue of the tap.
    /// Kept for a tap made again if it took (or the tap is gone).
    pub fn set_vnet_hdr_len(&self, len: usize) -> io::Result<()> {
        let len = libc::c_int::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let mut settings = lock(&self.settings);
        let result = ioctl_int_ptr(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, len);
        if Self::keep(&result) {
            settings.vnet_hdr_len = Some(len);
        }
        result
    }

    /// Whether a setting's result leaves it for a tap made again: one the
    /// tap took, or one for a tap that is gone (not one a live tap refused,
    /// which would fail every attach to the next).
    fn keep(result: &io::Result<()>) -> bool {
        result.as_ref().map_or_else(Self::is_gone, |()| true)
    }

    /// Sets the offloads (TUN_F_*) the reader of the tap accepts: which
    /// frames may arrive with a partial checksum or as one large segment.
    /// Kept for a tap made again if it took (or the tap is gone).
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        let mut settings = lock(&self.settings);
        let result = ioctl_int(
            self.file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        );
        if Self::keep(&result) {
            settings.offload = Some(flags);
        }
        result
    }

    pub fn is_attached(&self) -> bool {
        self.attached.load(Ordering::Relaxed)
    }

    /// Whether this queue can leave the tap (a multi-queue tap's can).
    pub fn detachable(&self) -> bool {
        self.multi_queue.load(Ordering::Relaxed)
    }

    /// Attaches or detaches this queue of a multi-queue tap, so that the
    /// kernel stops steering frames to a queue pair the guest has turned
    /// off. A single-queue tap is always attached.
    pub fn set_attached(&self, attach: bool) -> io::Result<()> {
        if !self.detachable() || self.attached.load(Ordering::Relaxed) == attach {
            return Ok(());
        }
        let flags = if attach {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = ifreq("", flags);
        ioctl_ifreq(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut req).map_err(|e| {
            // A multi-queue tap's queue refuses EINVAL once its tap is
            // gone (or when already in the state asked for, which the
            // `attached` flag rules out): with no interface of its name,
            // said as the reads and writes say it (`is_gone`).
            if e.raw_os_error() == Some(libc::EINVAL) && interface_index(&self.name) == 0 {
                io::Error::from_raw_os_error(libc::EBADFD)
            } else {
                e
            }
        })?;
        self.attached.store(attach, Ordering::Relaxed);
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameIo for Tap {
    fn read_frame(&self, iov: &IoVecs<'_>) -> io::Result<Option<usize>> {
        let raw = iov.as_raw();
        loop {
            // SAFETY: every iovec points to memory valid for writes of its
            // length while `iov` lives (IoVecs's invariant), and the count
            // is that of the slice (at most MAX_IOVECS, which fits a c_int).
            let n = unsafe {
                libc::readv(
                    self.file.as_raw_fd(),
                    raw.as_ptr(),
                    raw.len() as libc::c_int,
                )
            };
            match usize::try_from(n) {
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(Some(n)),
                Err(_) => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::WouldBlock => return Ok(None),
                        _ => return Err(e),
                    }
                }
            }
        }
    }

    fn write_frame(&self, iov: &IoVecs<'_>) -> io::Result<usize> {
        let raw = iov.as_raw();
        loop {
            // SAFETY: every iovec points to memory valid for reads of its
            // length while `iov` lives (IoVecs's invariant), and the count
            // is that of the slice (at most MAX_IOVECS, which fits a c_int).
            let n = unsafe {
                libc::writev(
                    self.file.as_raw_fd(),
                    raw.as_ptr(),
                    raw.len() as libc::c_int,
                )
            };
            match usize::try_from(n) {
                Ok(n) => return Ok(n),
                Err(_) => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn write_frames(&self, frames: &[IoVecs<'_>], results: &mut Vec<io::Result<usize>>) {
        results.clear();
        if frames.len() > 1 {
            let mut writer = lock(&self.writer);
            if writer.write(self.file.as_raw_fd(), frames, results) {
                return;
            }
        }
        results.extend(frames.iter().map(|f| self.write_frame(f)));
    }
}
