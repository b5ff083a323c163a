//! The console: a 16550 UART (vm-superio) at 0x3f8 whose interrupt is an
//! irqfd on GSI 4, a thread that writes its output to stdout or a file, and
//! a thread that forwards stdin into its receive FIFO.

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{lock, BusDevice};
use crate::exit::{ExitNotifier, VmExit};

/// Raises the UART's interrupt through an eventfd that KVM injects (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output finally goes (stdout, a file).
pub type ConsoleOut = Box<dyn Write + Send>;

pub fn stdout_sink() -> ConsoleOut {
    Box::new(std::io::stdout())
}

/// How much output may wait for a sink that does not take it (a terminal
/// stopped with Ctrl-S, a pipe no one reads) before output is dropped.
const OUTPUT_BACKLOG: usize = 1 << 20;

#[derive(Default)]
struct Backlog {
    bytes: Vec<u8>,
    /// Bytes dropped since the sink last took output.
    dropped: u64,
    /// No more output will come: write out the rest and stop.
    closed: bool,
    /// The sink failed: output is dropped from now on.
    failed: bool,
}

#[derive(Default)]
struct OutputQueue {
    backlog: Mutex<Backlog>,
    ready: Condvar,
}

/// The UART's output: appends to the backlog a thread of its own writes
/// out, so a vCPU writing to the UART never waits on the sink. Past
/// `OUTPUT_BACKLOG` unwritten bytes, output is dropped (as on a serial line
/// no one reads) and counted, and the writing thread logs it (a vCPU never
/// logs here: stderr may be the very pipe no one reads); a sink that fails
/// is logged once.
#[derive(Clone)]
pub struct ConsoleWriter(Arc<OutputQueue>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut backlog = lock(&self.0.backlog);
        if backlog.failed {
            return Ok(buf.len());
        }
        if backlog.bytes.len() + buf.len() > OUTPUT_BACKLOG {
            backlog.dropped += buf.len() as u64;
            return Ok(buf.len());
        }
        backlog.bytes.extend_from_slice(buf);
        drop(backlog);
        self.0.ready.notify_one();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The thread that writes the console output, flushing each batch so that
/// partial lines (prompts) show at once.
pub struct ConsoleOutput {
    queue: Arc<OutputQueue>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConsoleOutput {
    /// Starts the thread that writes to `sink`; the writer goes to the UART.
    pub fn spawn(sink: ConsoleOut) -> std::io::Result<(Self, ConsoleWriter)> {
        let queue = Arc::new(OutputQueue::default());
        let thread = {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name("console-out".into())
                .spawn(move || write_out(&queue, sink))?
        };
        let writer = ConsoleWriter(queue.clone());
        Ok((
            ConsoleOutput {
                queue,
                thread: Some(thread),
            },
            writer,
        ))
    }

    /// Writes out what the guest printed and stops the thread, waiting at
    /// most `timeout` for a sink that does not take it.
    pub fn finish(&mut self, timeout: Duration) {
        lock(&self.queue.backlog).closed = true;
        self.queue.ready.notify_one();
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + timeout;
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!(
                "console output: {} bytes were not written within {timeout:?}",
                lock(&self.queue.backlog).bytes.len()
            );
        }
    }
}

impl Drop for ConsoleOutput {
    fn drop(&mut self) {
        self.finish(Duration::from_secs(1));
    }
}

fn write_out(queue: &OutputQueue, mut sink: ConsoleOut) {
    let mut batch = Vec::new();
    loop {
        let dropped;
        {
            let mut backlog = lock(&queue.backlog);
            while backlog.bytes.is_empty() && !backlog.closed {
                backlog = queue
                    .ready
                    .wait(backlog)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if backlog.bytes.is_empty() {
                return;
            }
            std::mem::swap(&mut batch, &mut backlog.bytes);
            dropped = std::mem::take(&mut backlog.dropped);
        }
        // Logged without the lock, which vCPUs writing to the UART take.
        if dropped > 0 {
            log::warn!(
                "console output: {dropped} bytes were dropped ({OUTPUT_BACKLOG} bytes were \
                 waiting to be written)"
            );
        }
        if let Err(e) = sink.write_all(&batch).and_then(|()| sink.flush()) {
            log::warn!("console output failed, the rest is dropped: {e}");
            let mut backlog = lock(&queue.backlog);
            backlog.failed = true;
            backlog.bytes = Vec::new();
            return;
        }
        batch.clear();
    }
}

pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, ConsoleWriter>,
    /// What a reset builds the UART again from.
    irq: EventFd,
    out: ConsoleWriter,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: ConsoleWriter) -> std::io::Result<Self> {
        Ok(SerialConsole {
            uart: Serial::new(IrqTrigger(irq.try_clone()?), out.clone()),
            irq,
            out,
        })
    }

    /// The UART at its power-on state (registers, FIFOs; a reboot must not
    /// hand the next kernel the last one's loopback or line settings), on
    /// the same interrupt and output.
    pub fn reset(&mut self) -> std::io::Result<()> {
        self.uart = Serial::new(IrqTrigger(self.irq.try_clone()?), self.out.clone());
        Ok(())
    }

    /// Queues input bytes; returns how many fit in the receive FIFO.
    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                bytes.len()
            }
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::warn!("serial output failed: {e:?}");
            }
        }
    }
}

/// Ctrl-A, the console escape: Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A.
const ESCAPE: u8 = 0x01;

/// Splits terminal input into bytes for the guest and a quit request.
#[derive(Default)]
pub struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// Returns the bytes to forward and whether the user asked to quit.
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &byte in input {
            if self.pending {
                self.pending = false;
                match byte {
                    b'x' | b'X' => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if byte == ESCAPE {
                self.pending = true;
            } else {
                out.push(byte);
            }
        }
        (out, false)
    }
}

/// How long console input waits for the guest to take a byte before the
/// rest of what was typed is dropped.
const INPUT_STALL: Duration = Duration::from_secs(1);

/// Forwards stdin to the UART until EOF. With `escape`, Ctrl-A x stops the VM.
pub fn spawn_stdin_forwarder(
    serial: Arc<Mutex<SerialConsole>>,
    exit: Arc<ExitNotifier>,
    escape: bool,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut filter = EscapeFilter::default();
            let mut buf = [0u8; 256];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("console input stopped: {e}");
                        return;
                    }
                };
                let (bytes, quit) = if escape {
                    filter.filter(&buf[..n])
                } else {
                    (buf[..n].to_vec(), false)
                };
                if quit {
                    // Whatever the guest does with its UART.
                    exit.notify(VmExit::Interrupted);
                    return;
                }
                let mut rest = &bytes[..];
                let mut progress = Instant::now();
                while !rest.is_empty() {
                    let taken = lock(&serial).enqueue(rest);
                    rest = &rest[taken..];
                    if taken > 0 {
                        progress = Instant::now();
                    } else if progress.elapsed() > INPUT_STALL {
                        // A guest that stopped reading (or looped its
                        // UART back): overrun, as on a real UART, so
                        // that Ctrl-A x is still read.
                        log::debug!(
                            "console input: the guest reads none; {} bytes dropped",
                            rest.len()
                        );
                        break;
                    } else {
                        // The guest has not drained the FIFO yet.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ab"), (b"ab".to_vec(), false));
        assert_eq!(f.filter(b"a\x01"), (b"a".to_vec(), false));
        assert_eq!(f.filter(b"x"), (vec![], true));
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"\x01\x01z"), (b"\x01z".to_vec(), false));
        assert_eq!(f.filter(b"\x01q"), (b"\x01q".to_vec(), false));
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_sink_and_input_the_fifo() {
        let sink = Shared::default();
        let (mut output, writer) = ConsoleOutput::spawn(Box::new(sink.clone())).unwrap();
        let irq = EventFd::new(0).unwrap();
        let mut console = SerialConsole::new(irq.try_clone().unwrap(), writer).unwrap();
        for b in b"hi" {
            console.write(0, &[*b]);
        }
        output.finish(Duration::from_secs(5));
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the "data available" interrupt, then queue input.
        console.write(1, &[1]);
        assert_eq!(console.enqueue(b"ok"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0u8];
        console.read(0, &mut byte);
        assert_eq!(byte, *b"o");
    }

    /// A reset puts the registers back as a new UART has them: a loopback
    /// the last kernel set would swallow the next one's output.
    #[test]
    fn a_reset_clears_what_the_last_boot_set() {
        let (_output, writer) = ConsoleOutput::spawn(Box::new(Shared::default())).unwrap();
        let mut console = SerialConsole::new(EventFd::new(0).unwrap(), writer).unwrap();
        let register = |console: &mut SerialConsole, offset: u64| {
            let mut byte = [0u8];
            console.read(offset, &mut byte);
            byte[0]
        };
        let (mcr, lcr) = (register(&mut console, 4), register(&mut console, 3));
        console.write(4, &[0x10]); // loopback
        console.write(3, &[0x1b]); // 8 bits, 2 stop bits, even parity
        assert_ne!(register(&mut console, 4), mcr);
        console.reset().unwrap();
        assert_eq!(register(&mut console, 4), mcr);
        assert_eq!(register(&mut console, 3), lcr);
    }

    /// A sink that takes nothing until it is let go.
    struct Stalled {
        entered: std::sync::mpsc::Sender<()>,
        release: std::sync::mpsc::Receiver<()>,
        inner: Shared,
    }
    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            self.inner.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_does_not_stall_the_writer_and_output_past_the_backlog_is_dropped() {
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let inner = Shared::default();
        let sink = Stalled {
            entered: entered_tx,
            release: release_rx,
            inner: inner.clone(),
        };
        let (mut output, mut writer) = ConsoleOutput::spawn(Box::new(sink)).unwrap();
        writer.write_all(b"a").unwrap();
        entered.recv_timeout(Duration::from_secs(5)).unwrap();
        // The sink holds "a"; the backlog fills, and the rest is dropped,
        // without the writer waiting.
        let fill = vec![b'b'; OUTPUT_BACKLOG];
        writer.write_all(&fill).unwrap();
        writer.write_all(b"c").unwrap();
        drop(release);
        output.finish(Duration::from_secs(5));
        let written = inner.0.lock().unwrap();
        assert_eq!(written.len(), 1 + OUTPUT_BACKLOG);
        assert_eq!(written[0], b'a');
        assert!(written[1..].iter().all(|&b| b == b'b'));
    }

    struct Failing(Arc<std::sync::atomic::AtomicUsize>);
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_sink_is_tried_once_and_output_is_dropped_after() {
        let tries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (mut output, mut writer) =
            ConsoleOutput::spawn(Box::new(Failing(tries.clone()))).unwrap();
        writer.write_all(b"x").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lock(&output.queue.backlog).failed && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 0..100 {
            writer.write_all(b"y").unwrap();
        }
        output.finish(Duration::from_secs(5));
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(lock(&output.queue.backlog).bytes.is_empty());
    }
}
