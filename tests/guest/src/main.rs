//! testguest: a freestanding x86_64 guest for testing the VMM.
//!
//! Booted through PVH (see `boot.rs`), it reports over COM1, one
//! `testguest: ...` line per fact: hello, the command line, RAM from the PVH
//! memory map and that both ends of each RAM range keep a word written
//! (`touch_ram`), the RSDP, each ACPI table, the enabled CPU count and how
//! many CPUs ran its code (`smp`); in `echo` mode it echoes serial input
//! lines; in `count` mode it prints a counter about five times a second; it
//! drives every virtio-blk disk (`virtio_blk`) and virtio-net NIC
//! (`virtio_net`: `ip=`, `ping=`, `respond=`, `linkwatch`) it finds on PCI (with `diskwait`, each disk
//! waits for a line on the serial port between its first read and its
//! writes, while the test swaps the backend; with `movebars`, it first
//! moves each virtio device's BAR); then it powers off through ACPI, or
//! with `reset` on the command line resets the machine, or with
//! `triplefault` crashes it, or with `resetonce` resets it once and powers
//! off after the reboot. With `x2apic` (and `nopci`) it starts the other
//! processors in x2APIC mode. With `picquiet` (and `nopci`) it leaves the
//! 8259s alone, as the ACPI tables say there are none, and has the serial
//! port raise an interrupt with interrupts enabled.
//! Any failure prints `testguest: FAIL <reason>` and powers off.
//!
//! It runs under emulating nested KVM at about a million instructions per
//! second and without SSE, so it uses integer code only and does little work.

#![no_std]
#![no_main]

mod acpi;
mod boot;
mod clock;
mod irq;
mod mem;
mod pcicfg;
mod phys;
mod port;
mod power;
mod pvh;
mod serial;
mod smp;
mod virtio_blk;
mod virtio_net;
mod virtio_pci;

use core::arch::asm;
use core::fmt;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use acpi::{Fadt, Madt, Table};
use serial::{say, Bytes};

/// With `movebars`, each virtio device's BAR 0 moves to 64 KiB apart from
/// here before its driver runs, as a firmware or OS that assigns PCI
/// resources itself does.
const MOVED_BARS: u64 = 0xd000_0000;

/// Longest echoed line; the rest of a longer line is dropped.
const ECHO_LINE_MAX: usize = 256;

/// Why the guest gave up, printed as `testguest: FAIL <reason>[ at <addr>]`.
pub struct Fail {
    reason: &'static str,
    addr: Option<u64>,
}

impl Fail {
    pub const fn new(reason: &'static str) -> Self {
        Self { reason, addr: None }
    }

    pub const fn at(reason: &'static str, addr: u64) -> Self {
        Self {
            reason,
            addr: Some(addr),
        }
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)?;
        match self.addr {
            Some(addr) => write!(f, " at {addr:#x}"),
            None => Ok(()),
        }
    }
}

/// Writes a word at the first and the last 8 bytes of every RAM range of
/// the memory map (above 4 GiB too, through `phys::window`), each its own
/// value, all of them before any is read back: two ranges backed by the
/// same memory would overwrite each other. Below 4 GiB each is read back
/// through the identity map as well. Then the old values go back. Returns
/// the number of ranges and the last byte of the highest.
fn touch_ram(info: &pvh::StartInfo) -> Result<(u32, u64), Fail> {
    const MAX_PROBES: usize = 64;
    let pattern = |addr: u64| addr ^ 0x5a5a_a5a5_5a5a_a5a5;
    // (address, the value it held)
    let mut probes = [(0u64, 0u64); MAX_PROBES];
    let mut n = 0;
    let (mut count, mut top) = (0u32, 0u64);
    for (start, len) in info.ram_ranges()?.ok_or(Fail::new("no memory map"))? {
        if len < 8 {
            continue;
        }
        let first = (start + 7) & !7;
        let last = (start + len - 8) & !7;
        for addr in [first, last] {
            if n > 0 && probes[n - 1].0 == addr {
                continue;
            }
            if n == MAX_PROBES {
                return Err(Fail::new("more RAM ranges than the RAM check holds"));
            }
            probes[n] = (addr, 0);
            n += 1;
        }
        count += 1;
        top = top.max(start + len - 1);
    }
    // Nothing at these addresses is touched meanwhile (one CPU, interrupts
    // off, none of them in the guest's stack or data), and every old value
    // goes back before this returns.
    for probe in &mut probes[..n] {
        // SAFETY: RAM the memory map names, 8-byte aligned; the pointer is
        // used before the next `window` call.
        unsafe {
            let word = phys::window(probe.0);
            probe.1 = core::ptr::read_volatile(word);
            core::ptr::write_volatile(word, pattern(probe.0));
        }
    }
    let mut bad = None;
    for &(addr, _) in &probes[..n] {
        // SAFETY: as above.
        let seen = unsafe { core::ptr::read_volatile(phys::window(addr)) };
        let direct = if addr != 0 && addr + 8 <= phys::MAPPED_END {
            // SAFETY: non-null, below 4 GiB: identity-mapped RAM.
            unsafe { core::ptr::read_volatile(addr as *const u64) }
        } else {
            seen
        };
        if seen != pattern(addr) || direct != seen {
            bad = Some(addr);
            break;
        }
    }
    for &(addr, old) in &probes[..n] {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(phys::window(addr), old) };
    }
    match bad {
        Some(addr) => Err(Fail::at("RAM did not keep a word written", addr)),
        None => Ok((count, top)),
    }
}

/// Called by the `boot.rs` trampoline in 64-bit mode with the physical
/// address of `hvm_start_info`.
#[no_mangle]
pub extern "C" fn testguest_main(start_info: u32) -> ! {
    serial::init();
    say!("hello");
    match clock::init() {
        Some(khz) => say!("tsc {khz} kHz from the hypervisor"),
        None => say!("tsc rate not given; taken as 2 GHz"),
    }
    if let Err(fail) = run(u64::from(start_info)) {
        say!("FAIL {fail}");
    }
    power::off()
}

fn run(start_info: u64) -> Result<(), Fail> {
    let info = pvh::StartInfo::read(start_info)?;
    let cmdline = info.cmdline();
    say!("cmdline {}", Bytes(cmdline));

    let ram = info.ram_bytes()?.ok_or(Fail::new("no memory map"))?;
    // Rounded to the nearest MiB: firmware holes (640 KiB..1 MiB) keep the
    // exact sum just under the configured size. The exact figure follows.
    say!("memory {} MiB ({} KiB)", (ram + (1 << 19)) >> 20, ram >> 10);
    let (ranges, top) = touch_ram(&info)?;
    say!("ram written and read back at both ends of {ranges} ranges, top {top:#x}");

    let rsdp = acpi::Rsdp::find(info.rsdp_paddr)?;
    say!("rsdp {:#x} {}", rsdp.addr, rsdp.source);

    let madt = walk_acpi(&rsdp)?;
    say!("cpus {}", madt.enabled_cpus()?);
    let has_word = |wanted: &[u8]| cmdline.split(u8::is_ascii_whitespace).any(|w| w == wanted);
    // `x2apic` starts the processors through the x2APIC ICR instead of the
    // xAPIC registers. The interrupt code uses the xAPIC registers, so it
    // goes with `nopci`.
    if has_word(b"x2apic") {
        if has_word(b"nopci") {
            enter_x2apic_mode()?;
        } else {
            return Err(Fail::new("x2apic needs nopci"));
        }
    }
    let running = smp::start_others(&madt)?;
    say!("cpus running {}", running.count());
    if has_word(b"picquiet") {
        if has_word(b"nopci") {
            legacy_pics_quiet();
        } else {
            return Err(Fail::new("picquiet needs nopci"));
        }
    }

    // `nopci` skips PCI discovery (the boot benchmark powers off at once).
    if !has_word(b"nopci") {
        irq::init();
        let mut disks = 0u8;
        let mut nics = 0u8;
        let mut result = Ok(());
        pcicfg::scan(|f, vendor, device| {
            const VIRTIO_VENDOR: u16 = 0x1af4;
            const VIRTIO_NET_MODERN: u16 = 0x1041;
            const VIRTIO_BLK_MODERN: u16 = 0x1042;
            if vendor == VIRTIO_VENDOR && has_word(b"movebars") {
                // Where nothing else is in the window the ACPI tables give.
                let to = MOVED_BARS + u64::from(f.slot) * 0x1_0000;
                f.move_bar64(0, to);
                // Where the BAR reads back, not where it was asked to go.
                let at = f.bar_address(0);
                say!("pci 00:{:02x}.{} bar0 moved to {at:#x}", f.slot, f.function);
            }
            if vendor == VIRTIO_VENDOR && device == VIRTIO_BLK_MODERN && !has_word(b"noblk") {
                if result.is_ok() {
                    let extra = virtio_blk::Extra {
                        wait: has_word(b"diskwait"),
                        resize: has_word(b"diskresize"),
                    };
                    result = virtio_blk::test_disk(f, disks, extra);
                }
                disks += 1;
            }
            if vendor == VIRTIO_VENDOR && device == VIRTIO_NET_MODERN && !has_word(b"nonet") {
                if result.is_ok() {
                    result = virtio_net::test_nic(f, nics, cmdline);
                }
                nics += 1;
            }
        });
        result?;
    }
    if has_word(b"count") {
        count(has_word(b"busymmio"));
    }
    if has_word(b"flood") {
        flood();
    }
    if has_word(b"stringio") {
        string_io();
    }
    if has_word(b"echo") {
        echo();
    }
    if has_word(b"reset") {
        power::reset();
    }
    if has_word(b"resetonce") {
        reset_once();
    }
    if has_word(b"triplefault") {
        power::triple_fault();
    }
    Ok(())
}

/// Checks and names every table of the RSDT/XSDT (and the FADT's DSDT right
/// after the FADT); hands the FADT to `power` and returns the MADT.
fn walk_acpi(rsdp: &acpi::Rsdp) -> Result<Madt, Fail> {
    let root = rsdp.root()?;
    let mut have_fadt = false;
    let mut madt = None;
    for addr in root.entries() {
        let table = Table::load(addr)?;
        let signature = table.signature();
        say!("acpi {}", Bytes(&signature));
        match signature {
            Fadt::SIGNATURE => {
                let fadt = Fadt(table);
                power::set_fadt(&fadt);
                have_fadt = true;
                let dsdt = fadt.dsdt()?;
                say!("acpi {}", Bytes(&dsdt.signature()));
                if let Some(register) = acpi::ged_event_register(&dsdt) {
                    GED_REGISTER.store(register, Ordering::Relaxed);
                }
            }
            Madt::SIGNATURE => madt = Some(Madt(table)),
            _ => {}
        }
    }
    if !have_fadt {
        return Err(Fail::new("no FADT (FACP) table"));
    }
    madt.ok_or(Fail::new("no MADT (APIC) table"))
}

/// Prints `FLOOD_LINES` lines of 64 bytes (128 KiB, twice what a pipe
/// holds) as fast as the UART takes them.
fn flood() {
    const FLOOD_LINES: u32 = 2048;
    for n in 0..FLOOD_LINES {
        say!("flood {n:05} ........................................");
    }
}

/// Writes a line to the UART with one `rep outsb` and reads its line status
/// register eight times with one `rep insb`: string port I/O, which exits
/// once for all of its accesses.
fn string_io() {
    const LINE: &[u8] = b"testguest: rep outsb reached the console\n";
    let mut status = [0u8; 8];
    // SAFETY: `rep outsb` reads LINE.len() bytes from LINE and `rep insb`
    // writes status.len() bytes into `status`, both forwards (the direction
    // flag is clear, as the ABI guarantees); the ports are the UART's.
    unsafe {
        asm!("rep outsb dx, byte ptr [rsi]", in("dx") serial::DATA,
             inout("rsi") LINE.as_ptr() => _, inout("rcx") LINE.len() => _,
             options(nostack, readonly, preserves_flags));
        asm!("rep insb byte ptr [rdi], dx", in("dx") serial::LSR,
             inout("rdi") status.as_mut_ptr() => _, inout("rcx") status.len() => _,
             options(nostack, preserves_flags));
    }
    say!("rep insb line status {:02x?}", status);
}

/// Prints `count N` about five times a second (by the time-stamp counter,
/// so a paused VM prints nothing), up to `COUNT_MAX`, or until the ACPI
/// power button is pressed (looked at about a hundred times a second).
/// With `busy_mmio` it waits reading the host bridge's ID through ECAM, so
/// the vCPU is nearly always in an MMIO exit (a reset must find it there).
fn count(busy_mmio: bool) {
    const COUNT_MAX: u32 = 3000;
    const ECAM_HOST_BRIDGE_ID: usize = 0xe000_0000;
    for n in 1..=COUNT_MAX {
        say!("count {n}");
        for _ in 0..20 {
            let next = clock::Deadline::after(clock::SECOND / 100);
            while !next.passed() {
                if busy_mmio {
                    // SAFETY: ECAM, identity-mapped like all of the low
                    // 4 GiB; reading a register has no side effect.
                    let _ = unsafe { core::ptr::read_volatile(ECAM_HOST_BRIDGE_ID as *const u32) };
                } else {
                    core::hint::spin_loop();
                }
            }
            if power_button_pressed() {
                say!("power button");
                return;
            }
        }
    }
}

/// A word of RAM that survives a reset (the VMM reloads the kernel image,
/// not this page): set before the guest resets itself.
const RESET_MARKER_ADDR: u64 = 0x3f_e000;
const RESET_MARKER: u64 = 0x7465_7374_7265_7365; // "testrese"

/// Resets the machine on the first boot; on the next one, reports that
/// the reset brought it back and carries on (to power-off).
fn reset_once() {
    // The IOAPIC and the boot processor's local APIC must come back from a
    // reboot as at power-on: report their state on each boot, and change it
    // before the reset (an IOAPIC entry and the LAPIC timer, still masked;
    // the LAPIC switched to x2APIC mode).
    say!("ioapic pin15 {:#010x}", ioapic_redirection_low(15));
    let apic_base = rdmsr(MSR_APIC_BASE);
    // In x2APIC mode the MMIO page is gone: report no LVT then.
    let lvt_timer = if apic_base & APIC_BASE_X2APIC == 0 {
        // SAFETY: the LAPIC's registers, identity-mapped like all of the
        // low 4 GiB, in xAPIC mode (checked above).
        unsafe { core::ptr::read_volatile(LAPIC_LVT_TIMER as *const u32) }
    } else {
        0xffff_ffff
    };
    say!("lapic base {apic_base:#x} lvt timer {lvt_timer:#010x}");
    let marker = RESET_MARKER_ADDR as *mut u64;
    // SAFETY: the page is free RAM below the scratch areas, identity-mapped.
    let seen = unsafe { core::ptr::read_volatile(marker) };
    if seen == RESET_MARKER {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(marker, 0) };
        say!("rebooted after reset");
        return;
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(marker, RESET_MARKER) };
    set_ioapic_redirection_low(15, 1 << 16 | 0x35);
    // SAFETY: as for the read above (the LAPIC is still in xAPIC mode).
    unsafe { core::ptr::write_volatile(LAPIC_LVT_TIMER as *mut u32, 1 << 16 | 0x41) };
    if cpuid_ecx(1) & CPUID_1_ECX_X2APIC != 0 {
        wrmsr(MSR_APIC_BASE, apic_base | APIC_BASE_X2APIC);
        say!("lapic x2apic mode {:#x}", rdmsr(MSR_APIC_BASE));
    }
    say!("resetting");
    power::reset();
}

/// `picquiet`: believes the ACPI tables (no 8259), so leaves the 8259s as
/// the VMM set them up, enables interrupts with a gate for the test vector
/// only, and has the serial port raise its interrupt (GSI 4). An 8259 left
/// unmasked at vector base 0 would deliver it as exception 4, which has no
/// gate: the guest would triple-fault instead of reporting. Then the
/// IOAPIC's pin 4 is pointed at the test vector and the port raises its
/// interrupt again: it must arrive there, once, so the first quiet was not
/// a port that raises nothing.
fn legacy_pics_quiet() {
    const SERIAL_PIN: u32 = 4;
    irq::init_trusting_acpi();
    serial::raise_interrupt();
    settle();
    let quiet = irq::count_on(irq::VECTOR);
    // Edge-triggered, fixed delivery to APIC 0, unmasked.
    set_ioapic_redirection_high(SERIAL_PIN, 0);
    set_ioapic_redirection_low(SERIAL_PIN, u32::from(irq::VECTOR));
    serial::raise_interrupt();
    // The injection may wait for a host kernel worker: up to a second for
    // it, then a moment more for a second one that must not come.
    let arrival = clock::Deadline::after(clock::SECOND);
    while irq::count_on(irq::VECTOR) == quiet && !arrival.passed() {
        core::hint::spin_loop();
    }
    settle();
    let routed = irq::count_on(irq::VECTOR) - quiet;
    set_ioapic_redirection_low(SERIAL_PIN, 1 << 16);
    say!("8259s quiet, {quiet} interrupts at the test vector, {routed} through the ioapic");
}

/// Gives an interrupt raised just now time to arrive.
fn settle() {
    let settle = clock::Deadline::after(clock::SECOND / 100);
    while !settle.passed() {
        core::hint::spin_loop();
    }
}

/// Switches the boot processor's local APIC from xAPIC to x2APIC mode.
fn enter_x2apic_mode() -> Result<(), Fail> {
    if cpuid_ecx(1) & CPUID_1_ECX_X2APIC == 0 {
        return Err(Fail::new("the CPU has no x2APIC (CPUID.1:ECX bit 21)"));
    }
    wrmsr(MSR_APIC_BASE, rdmsr(MSR_APIC_BASE) | APIC_BASE_X2APIC);
    say!("lapic x2apic mode {:#x}", rdmsr(MSR_APIC_BASE));
    Ok(())
}

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const CPUID_1_ECX_X2APIC: u32 = 1 << 21;
const LAPIC_LVT_TIMER: u64 = 0xfee0_0320;

pub(crate) fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads an architectural MSR the VMM provides; no memory access.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

// The MSR is written as two 32-bit halves.
#[allow(clippy::cast_possible_truncation)]
pub(crate) fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller writes an architectural MSR with a valid value.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

fn cpuid_ecx(leaf: u32) -> u32 {
    // rbx is reserved by LLVM: save it around CPUID.
    let ecx: u32;
    // SAFETY: CPUID only writes the four registers; rbx is restored.
    unsafe {
        asm!("mov {saved:r}, rbx", "cpuid", "mov rbx, {saved:r}", saved = out(reg) _,
             inout("eax") leaf => _, inout("ecx") 0 => ecx, out("edx") _,
             options(nomem, nostack, preserves_flags))
    }
    ecx
}

/// The IOAPIC's registers: the index (IOREGSEL) and the window (IOWIN).
const IOAPIC_SELECT: u64 = 0xfec0_0000;
const IOAPIC_WINDOW: u64 = 0xfec0_0010;

/// The low half of the IOAPIC redirection entry for `pin`.
fn ioapic_redirection_low(pin: u32) -> u32 {
    // SAFETY: the IOAPIC's registers, identity-mapped like all of the low
    // 4 GiB; the index write selects the register the window then reads.
    unsafe {
        core::ptr::write_volatile(IOAPIC_SELECT as *mut u32, 0x10 + 2 * pin);
        core::ptr::read_volatile(IOAPIC_WINDOW as *const u32)
    }
}

fn set_ioapic_redirection_low(pin: u32, value: u32) {
    // SAFETY: as in `ioapic_redirection_low`.
    unsafe {
        core::ptr::write_volatile(IOAPIC_SELECT as *mut u32, 0x10 + 2 * pin);
        core::ptr::write_volatile(IOAPIC_WINDOW as *mut u32, value);
    }
}

/// Sets the high half of `pin`'s entry (the destination, in bits 24-31).
fn set_ioapic_redirection_high(pin: u32, value: u32) {
    // SAFETY: as in `ioapic_redirection_low`.
    unsafe {
        core::ptr::write_volatile(IOAPIC_SELECT as *mut u32, 0x11 + 2 * pin);
        core::ptr::write_volatile(IOAPIC_WINDOW as *mut u32, value);
    }
}

/// Echoes serial input line by line until the line `poweroff` (or `reset`,
/// which resets the machine).
fn echo() {
    say!("echo ready");
    let mut line = [0u8; ECHO_LINE_MAX];
    let mut len = 0;
    loop {
        match serial::read_byte() {
            b'\r' | b'\n' => {
                if len == 0 {
                    continue;
                }
                say!("echo {}", Bytes(&line[..len]));
                if line[..len] == *b"poweroff" {
                    return;
                }
                if line[..len] == *b"reset" {
                    power::reset();
                }
                len = 0;
            }
            byte if len < line.len() => {
                line[len] = byte;
                len += 1;
            }
            _ => {}
        }
    }
}

static PANICKING: AtomicBool = AtomicBool::new(false);
/// The ACPI Generic Event Device's event register, 0 if the DSDT has none.
static GED_REGISTER: AtomicU64 = AtomicU64::new(0);

/// True if the power button was pressed since the last look (reading the
/// GED's event register clears it).
fn power_button_pressed() -> bool {
    let register = GED_REGISTER.load(Ordering::Relaxed);
    if register == 0 {
        return false;
    }
    // SAFETY: the register lies in the MMIO hole, identity-mapped below
    // 4 GiB; the DSDT says the device decodes it.
    let events = unsafe { core::ptr::read_volatile(register as *const u32) };
    events & 1 != 0
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        power::halt();
    }
    match info.location() {
        Some(at) => say!("PANIC at {}:{}: {}", at.file(), at.line(), info.message()),
        None => say!("PANIC {}", info.message()),
    }
    power::off()
}
