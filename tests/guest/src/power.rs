//! Powering the machine off (ACPI S5, then QEMU's isa-debug-exit, then
//! halt), resetting it (the FADT reset register, then port 0xCF9), and
//! crashing it on purpose (a triple fault).

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::{self, Fadt, Gas, Table};
use crate::phys;
use crate::port::{outb, outw};
use crate::serial::say;

/// Address of the checked FADT, or 0 before one was found.
static FADT_ADDR: AtomicU64 = AtomicU64::new(0);

/// Sleep type for S5 (soft off) in the hardware-reduced SLEEP_CONTROL_REG.
const HW_REDUCED_SLP_TYP_S5: u8 = 5;
const SLEEP_CONTROL_SLP_TYP_SHIFT: u8 = 2;
const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
const PM1_CNT_SLP_EN: u16 = 1 << 13;
/// QEMU's isa-debug-exit device (if the machine has one).
const DEBUG_EXIT_PORT: u16 = 0xf4;
/// `pause` iterations to wait for the ACPI power-off to take effect.
const SPIN: u32 = 100_000;

/// Remembers the FADT for `off`.
pub fn set_fadt(fadt: &Fadt) {
    FADT_ADDR.store(fadt.0.addr, Ordering::Relaxed);
}

/// Prints `poweroff` and turns the machine off.
pub fn off() -> ! {
    say!("poweroff");
    let fadt_addr = FADT_ADDR.load(Ordering::Relaxed);
    if fadt_addr != 0 {
        if let Ok(table) = Table::load(fadt_addr) {
            acpi_off(&Fadt(table));
        }
        spin();
    }
    outb(DEBUG_EXIT_PORT, 0);
    halt()
}

/// PCI reset control register: "reset CPU" with "full reset".
const RESET_CONTROL_PORT: u16 = 0xcf9;
const RESET_CONTROL_FULL: u8 = 0x6;

/// Prints `reset` and resets the machine.
pub fn reset() -> ! {
    say!("reset");
    let fadt_addr = FADT_ADDR.load(Ordering::Relaxed);
    if fadt_addr != 0 {
        if let Ok(table) = Table::load(fadt_addr) {
            if let Some((reg, value)) = Fadt(table).reset_register() {
                write8(&reg, value);
            }
        }
        spin();
    }
    outb(RESET_CONTROL_PORT, RESET_CONTROL_FULL);
    halt()
}

/// Prints `triplefault`, then loads an empty IDT and raises #UD: with no
/// handler for the exception nor for the double fault, the CPU shuts down.
pub fn triple_fault() -> ! {
    say!("triplefault");
    let empty_idt = [0u16; 5];
    // SAFETY: deliberately crashes the machine; `empty_idt` is a valid
    // 10-byte IDT descriptor (limit 0, base 0) for `lidt` to read.
    unsafe {
        asm!("lidt [{0}]", "ud2", in(reg) empty_idt.as_ptr(), options(noreturn, nostack));
    }
}

fn spin() {
    for _ in 0..SPIN {
        // SAFETY: `pause` is a spin-wait hint with no other effect.
        unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
    }
}

/// Enters S5 through the FADT: SLEEP_CONTROL_REG on hardware-reduced ACPI,
/// otherwise PM1a_CNT with SLP_TYP from the DSDT's `\_S5`.
fn acpi_off(fadt: &Fadt) {
    if fadt.hw_reduced() {
        if let Some(reg) = fadt.sleep_control() {
            let value = HW_REDUCED_SLP_TYP_S5 << SLEEP_CONTROL_SLP_TYP_SHIFT | SLEEP_CONTROL_SLP_EN;
            write8(&reg, value);
        }
    } else if let Some(reg) = fadt.pm1a_control() {
        if let Some(typ) = fadt.dsdt().ok().and_then(|dsdt| acpi::s5_sleep_type(&dsdt)) {
            write16(
                &reg,
                u16::from(typ) << PM1_CNT_SLP_TYP_SHIFT | PM1_CNT_SLP_EN,
            );
        }
    }
}

fn write8(reg: &Gas, value: u8) {
    match reg.space {
        acpi::SPACE_IO => {
            if let Ok(port) = u16::try_from(reg.address) {
                outb(port, value);
            }
        }
        acpi::SPACE_MEMORY => {
            // SAFETY: the address is the FADT's sleep control register, a
            // device register outside any memory the guest uses.
            unsafe { phys::write_u8(reg.address, value) };
        }
        _ => {}
    }
}

fn write16(reg: &Gas, value: u16) {
    match reg.space {
        acpi::SPACE_IO => {
            if let Ok(port) = u16::try_from(reg.address) {
                outw(port, value);
            }
        }
        acpi::SPACE_MEMORY => {
            // SAFETY: the address is the FADT's PM1a control register, a
            // device register outside any memory the guest uses.
            unsafe { phys::write_u16(reg.address, value) };
        }
        _ => {}
    }
}

/// Stops this CPU for good.
pub fn halt() -> ! {
    loop {
        // SAFETY: with interrupts off, `hlt` just stops the CPU; touches no memory.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}
