//! Polled 16550 UART on COM1 (I/O port 0x3f8) and the `say!` line macro.

use core::fmt;

use crate::port::{inb, outb};

const BASE: u16 = 0x3f8;
/// Receive buffer (read) / transmit holding register (write).
pub const DATA: u16 = BASE;
const IER: u16 = BASE + 1;
const IIR: u16 = BASE + 2;
const LCR: u16 = BASE + 3;
pub const LSR: u16 = BASE + 5;
const LSR_DATA_READY: u8 = 1 << 0;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Interrupts off (we poll) and 8N1 framing. The FIFO control register is
/// left alone: clearing the FIFOs could drop input that already arrived.
pub fn init() {
    outb(IER, 0);
    outb(LCR, 0x03);
}

/// Enables the "transmitter empty" interrupt, which a 16550 raises at once
/// (its holding register is empty), and disables it again: one interrupt
/// on the port's line (GSI 4). Reading IIR then acknowledges it, so the
/// next call raises another.
pub fn raise_interrupt() {
    const IER_THR_EMPTY: u8 = 1 << 1;
    outb(IER, IER_THR_EMPTY);
    outb(IER, 0);
    inb(IIR);
}

/// Sends one byte once the transmit holding register is empty.
pub fn write_byte(b: u8) {
    while inb(LSR) & LSR_THR_EMPTY == 0 {}
    outb(DATA, b);
}

/// Waits for and returns one received byte.
pub fn read_byte() -> u8 {
    while inb(LSR) & LSR_DATA_READY == 0 {}
    inb(DATA)
}

/// The UART as a `core::fmt` sink.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(write_byte);
        Ok(())
    }
}

/// Writes one protocol line: `testguest: <args>\n`.
pub fn say_args(args: fmt::Arguments) {
    // Serial::write_str never fails.
    let _ = fmt::write(&mut Serial, format_args!("testguest: {args}\n"));
}

/// `say!("fmt", args...)` prints `testguest: ...` and a newline.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::serial::say_args(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// Displays raw bytes (command line, table signatures, echoed input) as text,
/// with `?` for anything that is not UTF-8.
pub struct Bytes<'a>(pub &'a [u8]);

impl fmt::Display for Bytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            f.write_str(chunk.valid())?;
            if !chunk.invalid().is_empty() {
                f.write_str("?")?;
            }
        }
        Ok(())
    }
}
