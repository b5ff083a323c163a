//! Starting the other processors, so that the CPU count the guest reports is
//! of processors that ran its code, not of the MADT's entries.
//!
//! For each enabled local APIC in the MADT but the boot processor's, the
//! boot processor sends INIT and then STARTUP through its local APIC (and
//! STARTUP once more if the processor has not marked itself 200 us later,
//! as the MP specification asks). The processor wakes in real
//! mode at `TRAMPOLINE`, sets the bit of its initial APIC ID (CPUID leaf 1)
//! in a bitmap there, and halts with interrupts off for good: it touches no
//! other memory, so the rest of the guest still runs on one processor.

use core::arch::{asm, global_asm};
use core::ptr;

use crate::acpi::Madt;
use crate::clock::{Deadline, SECOND};
use crate::Fail;

/// Where the processors start, as the STARTUP vector gives it: the page
/// number of the trampoline, below 1 MiB, in RAM the VMM leaves alone (the
/// PVH start info is at 0x6000, the command line at 0x20000).
const STARTUP_VECTOR: u32 = 0x10;
const TRAMPOLINE: u64 = (STARTUP_VECTOR as u64) << 12;
/// APIC IDs the bitmap has room for: xAPIC IDs are 8 bits.
const MAX_APIC_IDS: u32 = 256;
const BITMAP_BYTES: usize = (MAX_APIC_IDS / 8) as usize;

/// How long the processors get to mark themselves: each runs a dozen
/// instructions, but on an emulating host a vCPU thread may take a while to
/// be scheduled.
const START_TIMEOUT: u64 = 10 * SECOND;

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ADDRESS: u64 = 0xf_ffff_f000;
/// The x2APIC ICR (one 64-bit MSR: destination in the high half).
const MSR_X2APIC_ICR: u32 = 0x830;
/// xAPIC register offsets from the base.
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
/// Delivery modes, with the level "assert" bit.
const ICR_INIT: u32 = 0b101 << 8 | 1 << 14;
const ICR_STARTUP: u32 = 0b110 << 8 | 1 << 14;

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_trampoline_seen: u8;
}

// Real mode: CS is TRAMPOLINE >> 4 and IP 0, so with DS = CS an offset from
// `ap_trampoline_start` addresses the copy. `bts` with a register bit
// offset reaches past its operand, to the ID's bit of the bitmap.
global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a", @progbits
    .globl ap_trampoline_start, ap_trampoline_end, ap_trampoline_seen
    .code16
ap_trampoline_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    mov $1, %eax
    xor %ecx, %ecx
    cpuid
    shr $24, %ebx
    lock btsl %ebx, ap_trampoline_seen - ap_trampoline_start
1:
    cli
    hlt
    jmp 1b
    .balign 4
ap_trampoline_seen:
    .fill 32, 1, 0
ap_trampoline_end:
    .code64
    .text
"#,
    options(att_syntax)
);

/// Which processors ran the trampoline, by APIC ID.
pub struct Running {
    seen: [u8; BITMAP_BYTES],
}

impl Running {
    pub fn count(&self) -> u32 {
        self.seen.iter().map(|b| b.count_ones()).sum()
    }
}

/// Starts every processor the MADT lists and waits until each has marked
/// itself (or `START_TIMEOUT` passes). The boot processor counts as running.
pub fn start_others(madt: &Madt) -> Result<Running, Fail> {
    let bsp = initial_apic_id();
    let mut wanted = [0u8; BITMAP_BYTES];
    let mut bad = None;
    madt.for_each_enabled_apic(|id| match usize::try_from(id) {
        Ok(i) if id < MAX_APIC_IDS => wanted[i / 8] |= 1 << (i % 8),
        _ => bad = Some(id),
    })?;
    if let Some(id) = bad {
        return Err(Fail::at("MADT APIC ID above 255", u64::from(id)));
    }
    let bitmap = install_trampoline();
    // The boot processor's own bit: it is running this.
    // SAFETY: `bitmap` is in the copied trampoline, which only the
    // processors started below write, with locked bit sets.
    unsafe { set_bit(bitmap, bsp) };
    let apic = Apic::new();
    if !apic.x2apic && apic.base >= crate::phys::MAPPED_END {
        return Err(Fail::at("the local APIC is above 4 GiB", apic.base));
    }
    for id in (0..MAX_APIC_IDS).filter(|&id| id != bsp && bit(&wanted, id)) {
        apic.send(id, ICR_INIT)?;
        pause(SECOND / 100);
        let startup = ICR_STARTUP | STARTUP_VECTOR;
        apic.send(id, startup)?;
        pause(SECOND / 5000);
        if !bit(&read_bitmap(bitmap), id) {
            apic.send(id, startup)?;
        }
    }
    let deadline = Deadline::after(START_TIMEOUT);
    loop {
        let seen = read_bitmap(bitmap);
        let all = (0..MAX_APIC_IDS).all(|id| !bit(&wanted, id) || bit(&seen, id));
        if let Some(stray) = (0..MAX_APIC_IDS).find(|&id| bit(&seen, id) && !bit(&wanted, id)) {
            return Err(Fail::at(
                "a processor the MADT does not list ran",
                u64::from(stray),
            ));
        }
        if all || deadline.passed() {
            return Ok(Running { seen });
        }
        core::hint::spin_loop();
    }
}

/// Copies the trampoline to `TRAMPOLINE` with a clear bitmap; returns the
/// bitmap's address there.
fn install_trampoline() -> *mut u8 {
    // Labels in one section of the image (above), in order; only their
    // addresses are taken.
    let (start, end, seen) = (
        ptr::addr_of!(ap_trampoline_start),
        ptr::addr_of!(ap_trampoline_end),
        ptr::addr_of!(ap_trampoline_seen),
    );
    let len = end as usize - start as usize;
    let dst = TRAMPOLINE as *mut u8;
    // SAFETY: TRAMPOLINE is identity-mapped RAM that no Rust object uses and
    // the VMM writes nothing to; `len` bytes of the image are readable.
    unsafe { ptr::copy_nonoverlapping(start, dst, len) };
    // The image's bitmap is all zeroes, so the copy's is clear.
    // SAFETY: `seen` lies between `start` and `end`.
    unsafe { dst.add(seen as usize - start as usize) }
}

/// # Safety
/// `bitmap` points to `BITMAP_BYTES` bytes that only locked bit sets write.
unsafe fn set_bit(bitmap: *mut u8, id: u32) {
    // SAFETY: in the bitmap (id < MAX_APIC_IDS); a locked OR, as the
    // processors' own `lock bts`.
    unsafe {
        asm!("lock bts dword ptr [{0}], {1:e}", in(reg) bitmap, in(reg) id,
             options(nostack))
    };
}

fn read_bitmap(bitmap: *const u8) -> [u8; BITMAP_BYTES] {
    let mut out = [0u8; BITMAP_BYTES];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: the bitmap's bytes (see `install_trampoline`); other
        // processors may be setting bits, so each is read afresh.
        *b = unsafe { ptr::read_volatile(bitmap.add(i)) };
    }
    out
}

fn bit(bitmap: &[u8; BITMAP_BYTES], id: u32) -> bool {
    let i = id as usize;
    bitmap[i / 8] & 1 << (i % 8) != 0
}

/// The boot processor's local APIC, in whichever mode it is in.
struct Apic {
    x2apic: bool,
    base: u64,
}

impl Apic {
    /// Where the APIC base MSR says it is (the MADT's address may be
    /// overridden by a later entry; the MSR is what the processor uses).
    fn new() -> Self {
        let base = crate::rdmsr(MSR_APIC_BASE);
        Apic {
            x2apic: base & APIC_BASE_X2APIC != 0,
            base: base & APIC_BASE_ADDRESS,
        }
    }

    /// Sends the interprocessor interrupt `command` to APIC `id` and waits
    /// (in xAPIC mode) until the local APIC has sent it.
    fn send(&self, id: u32, command: u32) -> Result<(), Fail> {
        if self.x2apic {
            crate::wrmsr(MSR_X2APIC_ICR, u64::from(id) << 32 | u64::from(command));
            return Ok(());
        }
        let high = (self.base + ICR_HIGH) as *mut u32;
        let low = (self.base + ICR_LOW) as *mut u32;
        // SAFETY: the local APIC's registers (from the base MSR), below
        // 4 GiB (checked in `start_others`) and so identity-mapped; in
        // xAPIC mode (checked in `new`).
        unsafe {
            ptr::write_volatile(high, id << 24);
            ptr::write_volatile(low, command);
        }
        let deadline = Deadline::after(SECOND);
        // SAFETY: as above.
        while unsafe { ptr::read_volatile(low) } & ICR_DELIVERY_PENDING != 0 {
            if deadline.passed() {
                return Err(Fail::at(
                    "the local APIC did not send an IPI to",
                    u64::from(id),
                ));
            }
            core::hint::spin_loop();
        }
        Ok(())
    }
}

fn pause(micros: u64) {
    let deadline = Deadline::after(micros);
    while !deadline.passed() {
        core::hint::spin_loop();
    }
}

/// This processor's initial APIC ID (CPUID leaf 1, EBX bits 31..24).
fn initial_apic_id() -> u32 {
    let ebx: u32;
    // SAFETY: CPUID only writes the four registers; rbx (reserved by LLVM)
    // is moved out and restored.
    unsafe {
        asm!("mov {saved:r}, rbx", "cpuid", "xchg {saved:r}, rbx", saved = out(reg) ebx,
             inout("eax") 1 => _, inout("ecx") 0 => _, out("edx") _,
             options(nomem, nostack, preserves_flags))
    };
    ebx >> 24
}
