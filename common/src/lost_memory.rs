//! Guest memory that goes away under a backend: a frontend that shrinks
//! (truncates) the file behind a memory region after sending it, or a
//! hugetlbfs region whose pages cannot be had when first touched. Touching
//! such a page raises SIGBUS, whose default action ends the whole backend
//! process: every queue, and the next frontend with it.
//!
//! Instead, a SIGBUS on an address in one of the current frontend's
//! memory regions replaces that region's mapping with anonymous zero pages
//! (the access then completes, on memory that is no longer the guest's)
//! and ends that frontend's connection: its memory is not what it said.
//! Any other SIGBUS keeps its default action.
//!
//! The vhost crate maps a new memory table and hands it to the workers
//! before the backend can watch it (`update_memory` comes after). So the
//! relay says when a table is on its way (`table_coming`), and a fault
//! outside every watched region meanwhile waits, in the handler, for the
//! tables on their way to be watched (`watch`), up to `TABLE_WAIT`, then
//! looks again.
//!
//! A signal handler can take no lock, so the regions it checks sit in a
//! fixed table behind a sequence counter (a seqlock): the writer makes the
//! counter odd, rewrites the table and makes it even again; the handler
//! reads the table between two equal, even readings of the counter.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// More regions than vhost-user's memory table can hold (8) without the
/// memory-slots protocol feature, which neither backend offers.
const SLOTS: usize = 32;

/// One watched region: where it is mapped here and where the guest sees it.
struct Slot {
    host_addr: AtomicUsize,
    len: AtomicUsize,
    guest_addr: AtomicU64,
}

static TABLE: [Slot; SLOTS] = [const {
    Slot {
        host_addr: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        guest_addr: AtomicU64::new(0),
    }
}; SLOTS];
/// Odd while the table is being rewritten.
static SEQUENCE: AtomicUsize = AtomicUsize::new(0);
/// Serializes writers of the table.
static WRITER: Mutex<()> = Mutex::new(());
/// The eventfd the handler writes when it has replaced a region.
static LOST_EVENT: AtomicI32 = AtomicI32::new(-1);
/// The guest address and length of the region replaced last (for the log).
static LOST_GUEST_ADDR: AtomicU64 = AtomicU64::new(0);
static LOST_LEN: AtomicUsize = AtomicUsize::new(0);
/// The connection the handler's loss belongs to (`end_on_loss` counts
/// them), so a loss reported late cannot end the next connection.
static LOST_CONNECTION: AtomicU64 = AtomicU64::new(0);
/// Memory tables (and added regions) passed to the vhost crate, and how
/// many of them were watched since: while fewer were watched, one is on
/// its way (counts, not a flag, so that watching one table does not end
/// the wait for the next one right behind it).
static TABLES_SENT: AtomicU64 = AtomicU64::new(0);
static TABLES_WATCHED: AtomicU64 = AtomicU64::new(0);
/// How long a fault outside the watched regions waits for a table on its
/// way (mapping one takes microseconds).
const TABLE_WAIT: Duration = Duration::from_secs(2);
/// The current connection's number, as the handler reads it.
static CURRENT_CONNECTION: AtomicU64 = AtomicU64::new(0);
/// The current frontend's connection and its number, shut down when its
/// memory is lost.
static CONNECTION: Mutex<Option<(u64, UnixStream)>> = Mutex::new(None);
/// The memory the table lists, oldest first, held so that none of it is
/// unmapped while listed (the vhost crate drops the old memory before the
/// backend hears of the new). The newest is the frontend's current table;
/// older ones stay listed while a worker still uses them (a pass that
/// started before the table changed), and go once only this list holds
/// them.
static WATCHED: Mutex<Vec<Arc<GuestMemoryMmap>>> = Mutex::new(Vec::new());
/// How often memory no worker uses any more is let go of.
const PRUNE_EVERY_MS: libc::c_int = 1000;
static INSTALLED: Mutex<bool> = Mutex::new(false);

/// Installs the SIGBUS handler and starts the thread that ends a
/// connection whose memory was lost. Once per process; later calls do
/// nothing.
pub fn install() -> io::Result<()> {
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if *installed {
        return Ok(());
    }
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let event = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw_event = event.as_raw_fd();
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as extern "C" fn(_, _, _) as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a sigset_t owned here.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // The thread first, so a handler that reports a loss has a reader.
    LOST_EVENT.store(raw_event, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("lost-memory".into())
        .spawn(move || end_connections(event))?;
    // SAFETY: installs a handler that only touches atomics and makes
    // system calls that are safe in a handler (mmap, write, sched_yield,
    // signal, raise); `action` outlives the call and no old action is
    // asked for.
    if unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    *installed = true;
    Ok(())
}

/// Watches the regions of `mem` (the frontend's memory table just mapped)
/// and keeps it mapped while it is watched. The tables watched before stay
/// watched while something besides this module still holds them.
pub fn watch(mem: Arc<GuestMemoryMmap>) {
    let mut watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    watched.push(mem);
    let gone = relist(&mut watched);
    // Listed: a fault waiting for it looks again.
    TABLES_WATCHED.fetch_add(1, Ordering::AcqRel);
    drop(watched);
    // Unmapped only now, off the table.
    drop(gone);
}

/// A memory table (or an added region) passes to the vhost crate next,
/// which maps it and lets the workers use it before `watch` lists it.
pub fn table_coming() {
    TABLES_SENT.fetch_add(1, Ordering::AcqRel);
}

/// Whether a table passed to the vhost crate is not watched yet.
fn table_on_its_way() -> bool {
    TABLES_WATCHED.load(Ordering::Acquire) < TABLES_SENT.load(Ordering::Acquire)
}

/// Lets go of the earlier tables nothing else uses any more.
fn prune() {
    let mut watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    if watched.len() < 2 {
        return;
    }
    let gone = relist(&mut watched);
    drop(watched);
    drop(gone);
}

/// Drops from `watched` the earlier tables only it holds, lists the
/// regions of the rest (the newest first) in the table, and hands back the
/// dropped ones, to be unmapped once off the table.
fn relist(watched: &mut Vec<Arc<GuestMemoryMmap>>) -> Vec<Arc<GuestMemoryMmap>> {
    let newest = watched.len().saturating_sub(1);
    let mut gone = Vec::new();
    let mut index = 0;
    watched.retain(|mem| {
        let keep = index == newest || Arc::strong_count(mem) > 1;
        index += 1;
        if !keep {
            gone.push(mem.clone());
        }
        keep
    });
    let regions: Vec<(usize, usize, u64)> = watched
        .iter()
        .rev()
        .flat_map(|mem| {
            mem.iter()
                .map(|r| (r.as_ptr() as usize, r.len() as usize, r.start_addr().0))
        })
        .collect();
    if regions.len() > SLOTS {
        log::warn!(
            "{} memory regions: only the first {SLOTS} are guarded against being taken away",
            regions.len()
        );
    }
    write_table(&regions);
    gone
}

/// Watches no region (the connection is over: nothing touches its memory
/// any more) and lets go of its memory.
pub fn forget() {
    let mut watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    write_table(&[]);
    // A table the vhost crate refused was never watched; none is coming
    // for this connection any more.
    TABLES_WATCHED.store(TABLES_SENT.load(Ordering::Acquire), Ordering::Release);
    let gone = std::mem::take(&mut *watched);
    drop(watched);
    drop(gone);
    *CONNECTION.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

/// `frontend` is the connection to end when a watched region is lost.
pub fn end_on_loss(frontend: &UnixStream) -> io::Result<()> {
    let stream = frontend.try_clone()?;
    let mut connection = CONNECTION.lock().unwrap_or_else(|p| p.into_inner());
    let number = CURRENT_CONNECTION.load(Ordering::Relaxed) + 1;
    CURRENT_CONNECTION.store(number, Ordering::Relaxed);
    *connection = Some((number, stream));
    Ok(())
}

fn write_table(regions: &[(usize, usize, u64)]) {
    let _writer = WRITER.lock().unwrap_or_else(|p| p.into_inner());
    let sequence = SEQUENCE.load(Ordering::Relaxed);
    SEQUENCE.store(sequence.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    for (index, slot) in TABLE.iter().enumerate() {
        let (host_addr, len, guest_addr) = regions.get(index).copied().unwrap_or((0, 0, 0));
        slot.host_addr.store(host_addr, Ordering::Relaxed);
        slot.len.store(len, Ordering::Relaxed);
        slot.guest_addr.store(guest_addr, Ordering::Relaxed);
    }
    SEQUENCE.store(sequence.wrapping_add(2), Ordering::Release);
}

/// The watched region holding `addr`: host address, length, guest address.
/// Async-signal-safe (atomics, and sched_yield while the table is being
/// rewritten: the writer never touches guest memory, so it is not the
/// thread the handler interrupted, and it finishes).
fn region_holding(addr: usize) -> Option<(usize, usize, u64)> {
    for spin in 0u32.. {
        let before = SEQUENCE.load(Ordering::Acquire);
        if before % 2 == 1 {
            if spin % 1024 == 1023 {
                // SAFETY: sched_yield takes no arguments.
                unsafe { libc::sched_yield() };
            } else {
                std::hint::spin_loop();
            }
            continue;
        }
        let found = TABLE.iter().find_map(|slot| {
            let start = slot.host_addr.load(Ordering::Relaxed);
            let len = slot.len.load(Ordering::Relaxed);
            let guest_addr = slot.guest_addr.load(Ordering::Relaxed);
            (len != 0 && addr >= start && addr - start < len).then_some((start, len, guest_addr))
        });
        fence(Ordering::Acquire);
        if SEQUENCE.load(Ordering::Relaxed) == before {
            return found;
        }
    }
    None
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // The calls below may set errno; the interrupted code may be about
    // to read it.
    // SAFETY: __errno_location returns this thread's errno, valid for the
    // thread's life.
    let errno = unsafe { *libc::__errno_location() };
    handle_sigbus(info);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// `on_sigbus`'s work, errno aside.
fn handle_sigbus(info: *mut libc::siginfo_t) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo; for
    // SIGBUS its address field is the faulting address.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    if code == libc::BUS_ADRERR {
        if let Some((start, len, guest_addr)) = region_holding(addr).or_else(|| coming_region(addr))
        {
            // SAFETY: replaces exactly the range the region's own mapping
            // covers (vm-memory unmaps the same range when the region
            // goes), with private anonymous memory; nothing else is mapped
            // there.
            let mapped = unsafe {
                libc::mmap(
                    start as *mut libc::c_void,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                LOST_CONNECTION.store(
                    CURRENT_CONNECTION.load(Ordering::Relaxed),
                    Ordering::Relaxed,
                );
                LOST_GUEST_ADDR.store(guest_addr, Ordering::Relaxed);
                LOST_LEN.store(len, Ordering::Relaxed);
                let one = 1u64;
                // SAFETY: writes 8 bytes from a local to the eventfd made
                // in `install` (which stays open for the process's life).
                unsafe {
                    libc::write(
                        LOST_EVENT.load(Ordering::Relaxed),
                        (&one as *const u64).cast(),
                        8,
                    )
                };
                return;
            }
        }
    }
    // Not guest memory, or it could not be replaced: the default action.
    // A fault (these codes) happens again when the access is retried once
    // this returns, and is then fatal. Any other SIGBUS (sent by a
    // process, or a memory error reported ahead of any access) would not
    // come back: it is raised again here, and delivered once this returns.
    let refaults = matches!(
        code,
        libc::BUS_ADRALN | libc::BUS_ADRERR | libc::BUS_OBJERR | BUS_MCEERR_AR
    );
    // SAFETY: signal(2) with SIG_DFL and raise(3) are async-signal-safe
    // and take no pointers.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        if !refaults {
            libc::raise(libc::SIGBUS);
        }
    }
}

/// Waits (up to `TABLE_WAIT`) for a memory table on its way to be
/// watched, then looks `addr` up in it. Async-signal-safe: atomics,
/// clock_gettime and sched_yield. The thread that lists the table (the
/// vhost crate's) takes no lock a worker holds on its way there.
fn coming_region(addr: usize) -> Option<(usize, usize, u64)> {
    let now = || {
        // SAFETY: an all-zero timespec is a valid value to fill.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: clock_gettime writes one timespec into a local.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let start = now();
    // Past the limit it looks all the same: the table it waited for may be
    // watched with another still on its way.
    while table_on_its_way() && now().saturating_sub(start) < TABLE_WAIT {
        // SAFETY: sched_yield takes no arguments.
        unsafe { libc::sched_yield() };
    }
    region_holding(addr)
}

/// A memory error in a page the faulting access needed
/// (include/uapi/asm-generic/siginfo.h).
const BUS_MCEERR_AR: libc::c_int = 4;

fn events_failed(e: &io::Error) {
    log::error!("lost-memory events: {e}; a frontend whose memory goes away will not be dropped");
}

/// Ends the current connection each time the handler reports a loss, and
/// lets go of memory no worker uses any more meanwhile.
fn end_connections(event: OwnedFd) {
    let mut pruned = std::time::Instant::now();
    loop {
        let mut poll = libc::pollfd {
            fd: event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one pollfd, a local that outlives the call.
        let ready = unsafe { libc::poll(&mut poll, 1, PRUNE_EVERY_MS) };
        if pruned.elapsed().as_millis() >= PRUNE_EVERY_MS as u128 {
            prune();
            pruned = std::time::Instant::now();
        }
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return events_failed(&e);
        }
        if ready == 0 || poll.revents & libc::POLLIN == 0 {
            continue;
        }
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer from the eventfd owned
        // by this thread.
        let n = unsafe { libc::read(event.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
        if n != 8 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return events_failed(&e);
        }
        let (guest_addr, len) = (
            LOST_GUEST_ADDR.load(Ordering::Relaxed),
            LOST_LEN.load(Ordering::Relaxed),
        );
        log::warn!(
            "the frontend's memory region at guest address {guest_addr:#x} ({len:#x} bytes) went away \
             under the backend (its file was shrunk, or its huge pages ran out); ending the connection"
        );
        let lost = LOST_CONNECTION.load(Ordering::Relaxed);
        match CONNECTION
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some((number, stream)) if *number == lost => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            // That connection has ended already.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::sync::Arc;
    use std::time::Duration;

    use vm_memory::{Bytes, FileOffset, GuestAddress};

    use super::*;

    /// One test, as the table is the process's.
    fn map_at(at: u64) -> Arc<GuestMemoryMmap> {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(at), 64 << 10)]);
        Arc::new(mem.expect("map"))
    }

    fn memfd_of(len: u64) -> std::fs::File {
        // SAFETY: a NUL-terminated name; the call takes no other memory.
        let fd = unsafe { libc::memfd_create(c"lost".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: a new descriptor nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len).expect("size the memfd");
        file
    }

    #[test]
    fn a_shrunk_region_reads_as_zeros_and_ends_the_connection() {
        // Lookups: only addresses inside a watched region are found.
        write_table(&[(0x1000, 0x2000, 0x0), (0x8000, 0x1000, 0x10_0000)]);
        assert_eq!(region_holding(0xfff), None);
        assert_eq!(region_holding(0x1000), Some((0x1000, 0x2000, 0)));
        assert_eq!(region_holding(0x2fff), Some((0x1000, 0x2000, 0)));
        assert_eq!(region_holding(0x3000), None);
        assert_eq!(region_holding(0x8fff), Some((0x8000, 0x1000, 0x10_0000)));
        write_table(&[]);
        assert_eq!(region_holding(0x1000), None);

        // A region whose file is cut to nothing after it was mapped.
        install().expect("install");
        let file = Arc::new(memfd_of(64 << 10));
        let guest = GuestAddress(0x10_0000);
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            guest,
            64 << 10,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])
        .expect("map");
        let word = GuestAddress(guest.0 + 0x8000);
        mem.write_obj(0xabcd_u32, word).expect("write");
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        end_on_loss(&ours).expect("end_on_loss");
        let mem = Arc::new(mem);
        watch(mem.clone());

        file.set_len(0).expect("shrink the memfd");
        let read: u32 = mem.read_obj(word).expect("read");
        assert_eq!(read, 0, "the region reads as zero pages");
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        assert_eq!(theirs.read(&mut byte).expect("read the connection"), 0);
        assert_eq!(LOST_GUEST_ADDR.load(Ordering::Relaxed), guest.0);
        forget();

        // A table the vhost crate has mapped but the backend not watched
        // yet: a fault in it waits for the watch, then is a loss like any.
        let file = Arc::new(memfd_of(64 << 10));
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            guest,
            64 << 10,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])
        .expect("map");
        let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        end_on_loss(&ours).expect("end_on_loss");
        // Two tables sent back to back; the fault is in the second, and
        // watching the first does not end its wait.
        table_coming();
        table_coming();
        file.set_len(0).expect("shrink the memfd");
        let mem = Arc::new(mem);
        let later = mem.clone();
        let first = map_at(0x4000_0000);
        let watcher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            watch(first);
            std::thread::sleep(Duration::from_millis(200));
            watch(later);
        });
        let read: u32 = mem.read_obj(word).expect("read");
        assert_eq!(read, 0, "the region reads as zero pages");
        assert_eq!(theirs.read(&mut byte).expect("read the connection"), 0);
        watcher.join().expect("watcher");
        forget();

        // A table replaced while a worker still uses it stays watched until
        // it is let go of.
        let map = map_at;
        let host = |mem: &GuestMemoryMmap| mem.iter().next().expect("a region").as_ptr() as usize;
        let (old, new) = (map(0), map(0x10_0000));
        let in_use = old.clone();
        watch(old);
        watch(new.clone());
        assert!(region_holding(host(&in_use)).is_some(), "still in use");
        assert!(region_holding(host(&new)).is_some());
        prune();
        assert!(region_holding(host(&in_use)).is_some(), "still in use");
        let old_addr = host(&in_use);
        drop(in_use);
        prune();
        assert_eq!(region_holding(old_addr), None, "let go of");
        assert!(
            region_holding(host(&new)).is_some(),
            "the current table stays"
        );
        forget();
        assert_eq!(region_holding(host(&new)), None);
    }
}
