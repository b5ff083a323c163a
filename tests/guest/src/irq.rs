// Register fields are cut out of wider words on purpose.
#![allow(clippy::cast_possible_truncation)]
//! Just enough interrupt handling to see MSI-X messages arrive: an IDT
//! whose only gates are the queue vectors (`VECTOR` and the
//! `QUEUE_VECTORS - 1` after it: each device's queue completions come on
//! their own, so one sent on another device's MSI-X entry shows) and
//! `CONFIG_VECTOR` (configuration changes), each with a handler that counts
//! and sends EOI, the local APIC enabled, and the legacy 8259s masked.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

use crate::port::outb;

/// The first queue vector (a device's queue completions are sent with
/// `queue_vector(its index)`).
pub const VECTOR: u8 = 0x40;
/// How many queue vectors there are, from `VECTOR` on.
pub const QUEUE_VECTORS: u8 = 8;
/// The vector configuration changes are sent with: counted apart, so an
/// interrupt sent on the wrong MSI-X entry is not taken for the right one.
pub const CONFIG_VECTOR: u8 = 0x48;
/// Where the IDT lives: a free page of RAM below the scratch area.
const IDT_ADDR: u64 = 0x3f_f000;
const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = LAPIC_BASE + 0xf0;
const LAPIC_TPR: u64 = LAPIC_BASE + 0x80;

/// Interrupts taken on each queue vector and on `CONFIG_VECTOR`; the
/// handlers increment them.
#[no_mangle]
static IRQ_COUNTS: [AtomicU64; QUEUE_VECTORS as usize] =
    [const { AtomicU64::new(0) }; QUEUE_VECTORS as usize];
#[no_mangle]
static CONFIG_IRQ_COUNT: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .text
    .irp n,0,1,2,3,4,5,6,7
    .globl testguest_irq\n
testguest_irq\n:
    push %rax
    lock incq IRQ_COUNTS+8*\n(%rip)
    mov $0xfee000b0, %eax
    movl $0, (%rax)                 /* LAPIC EOI */
    pop %rax
    iretq
    .endr

    .globl testguest_config_irq
testguest_config_irq:
    push %rax
    lock incq CONFIG_IRQ_COUNT(%rip)
    mov $0xfee000b0, %eax
    movl $0, (%rax)                 /* LAPIC EOI */
    pop %rax
    iretq
"#,
    options(att_syntax)
);

extern "C" {
    fn testguest_irq0();
    fn testguest_irq1();
    fn testguest_irq2();
    fn testguest_irq3();
    fn testguest_irq4();
    fn testguest_irq5();
    fn testguest_irq6();
    fn testguest_irq7();
    fn testguest_config_irq();
}

/// The queue vector of the device found `index`-th.
pub fn queue_vector(index: u8) -> u8 {
    VECTOR + index % QUEUE_VECTORS
}

/// Interrupts taken on queue vector `vector` (none on any other vector).
pub fn count_on(vector: u8) -> u64 {
    vector
        .checked_sub(VECTOR)
        .and_then(|slot| IRQ_COUNTS.get(usize::from(slot)))
        .map_or(0, |n| n.load(Ordering::SeqCst))
}

/// Interrupts taken on the queue vectors other than `vector`.
pub fn count_except(vector: u8) -> u64 {
    let slot = vector.checked_sub(VECTOR).map(usize::from);
    IRQ_COUNTS
        .iter()
        .enumerate()
        .filter(|&(i, _)| Some(i) != slot)
        .map(|(_, n)| n.load(Ordering::SeqCst))
        .sum()
}

/// Interrupts taken on `CONFIG_VECTOR`.
pub fn config_count() -> u64 {
    CONFIG_IRQ_COUNT.load(Ordering::SeqCst)
}

/// Installs the IDT, enables the LAPIC, masks the 8259s, and enables interrupts.
pub fn init() {
    // The 8259s may have been programmed by firmware (QEMU's SeaBIOS): mask them.
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    init_trusting_acpi();
}

/// `init`, but the 8259s are left as they were: the ACPI tables say there
/// are none, and a guest that believes them never touches them.
pub fn init_trusting_acpi() {
    let cs: u16;
    // SAFETY: reads the code segment selector; no memory access.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    // SAFETY: IDT_ADDR is free RAM that nothing else uses; the identity map
    // covers it; the page is within the 4 KiB IDT.
    unsafe { core::ptr::write_bytes(IDT_ADDR as *mut u8, 0, 4096) };
    let handlers: [(u8, unsafe extern "C" fn()); 9] = [
        (VECTOR, testguest_irq0),
        (VECTOR + 1, testguest_irq1),
        (VECTOR + 2, testguest_irq2),
        (VECTOR + 3, testguest_irq3),
        (VECTOR + 4, testguest_irq4),
        (VECTOR + 5, testguest_irq5),
        (VECTOR + 6, testguest_irq6),
        (VECTOR + 7, testguest_irq7),
        (CONFIG_VECTOR, testguest_config_irq),
    ];
    for (vector, handler) in handlers {
        let handler = handler as *const () as u64;
        let gate_lo = (handler & 0xffff)
            | u64::from(cs) << 16
            | 0x8e00u64 << 32 // present, DPL 0, 64-bit interrupt gate
            | ((handler >> 16) & 0xffff) << 48;
        let gate_hi = handler >> 32;
        let entry = IDT_ADDR + u64::from(vector) * 16;
        // SAFETY: as above; a vector's 16-byte gate is within the IDT.
        unsafe {
            core::ptr::write_volatile(entry as *mut u64, gate_lo);
            core::ptr::write_volatile((entry + 8) as *mut u64, gate_hi);
        }
    }
    let descriptor: [u16; 5] = [
        4095,
        IDT_ADDR as u16,
        (IDT_ADDR >> 16) as u16,
        (IDT_ADDR >> 32) as u16,
        (IDT_ADDR >> 48) as u16,
    ];
    // SAFETY: the descriptor points at the IDT written above; the LAPIC
    // registers are MMIO in the identity map; enabling interrupts is safe
    // because every source that can fire now has a gate (only the queue
    // vectors and CONFIG_VECTOR are unmasked anywhere).
    unsafe {
        asm!("lidt [{0}]", in(reg) descriptor.as_ptr(), options(nostack));
        core::ptr::write_volatile(LAPIC_TPR as *mut u32, 0);
        core::ptr::write_volatile(LAPIC_SVR as *mut u32, 0x1ff);
        asm!("sti", options(nomem, nostack));
    }
}
