//! The console: a 16550 UART (vm-superio) at 0x3f8 whose interrupt is an
//! irqfd on GSI 4, its output written unbuffered to stdout or a file, and
//! a thread that forwards stdin into its receive FIFO.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
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

/// Flushes after every write, so that partial lines (prompts) show at once.
struct Unbuffered<W: Write>(W);

impl<W: Write> Write for Unbuffered<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Where the guest's console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

pub fn stdout_sink() -> ConsoleOut {
    Box::new(Unbuffered(std::io::stdout()))
}

pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, ConsoleOut>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), out),
        }
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

    #[test]
    fn output_reaches_the_sink_and_input_the_fifo() {
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
        let sink = Shared::default();
        let irq = EventFd::new(0).unwrap();
        let mut console = SerialConsole::new(irq.try_clone().unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            console.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        // Enable the "data available" interrupt, then queue input.
        console.write(1, &[1]);
        assert_eq!(console.enqueue(b"ok"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        let mut byte = [0u8];
        console.read(0, &mut byte);
        assert_eq!(byte, *b"o");
    }
}
