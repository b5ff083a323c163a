//! Time from the time-stamp counter, for timeouts and pacing, in
//! microseconds. The counter's rate comes from the hypervisor's timing
//! leaf (CPUID 0x4000_0010, EAX: kHz), which our VMM and QEMU give; without
//! it the rate is taken as 2 GHz (hosts run the TSC at 1-4 GHz), which is
//! close enough for "about a second".

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Microseconds in a second: what `Deadline::after` counts in.
pub const SECOND: u64 = 1_000_000;

/// The rate taken when the hypervisor does not say.
const ASSUMED_KHZ: u64 = 2_000_000;
/// KVM's hypervisor leaves: the signature leaf, and the timing leaf.
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_TIMING: u32 = 0x4000_0010;
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x4d];

static TSC_KHZ: AtomicU64 = AtomicU64::new(ASSUMED_KHZ);

/// Learns the counter's rate from the hypervisor: its kHz, or `None` if the
/// hypervisor does not say (the assumed 2 GHz stays).
pub fn init() -> Option<u64> {
    let [max, sig_b, sig_c, sig_d] = cpuid(LEAF_HYPERVISOR);
    if [sig_b, sig_c, sig_d] != KVM_SIGNATURE || max < LEAF_TIMING {
        return None;
    }
    let khz = u64::from(cpuid(LEAF_TIMING)[0]);
    if khz == 0 {
        return None;
    }
    TSC_KHZ.store(khz, Ordering::Relaxed);
    Some(khz)
}

/// CPUID `leaf` (subleaf 0): EAX, EBX, ECX, EDX.
fn cpuid(leaf: u32) -> [u32; 4] {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: CPUID only writes the four registers; rbx (reserved by LLVM)
    // is moved out and restored.
    unsafe {
        asm!("mov {saved:r}, rbx", "cpuid", "xchg {saved:r}, rbx", saved = out(reg) ebx,
             inout("eax") leaf => eax, inout("ecx") 0 => ecx, out("edx") edx,
             options(nomem, nostack, preserves_flags))
    };
    [eax, ebx, ecx, edx]
}

pub fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// A point in time.
pub struct Deadline(u64);

impl Deadline {
    /// `micros` microseconds from now.
    pub fn after(micros: u64) -> Self {
        let ticks = micros.saturating_mul(TSC_KHZ.load(Ordering::Relaxed)) / 1000;
        Deadline(tsc().saturating_add(ticks))
    }

    pub fn passed(&self) -> bool {
        tsc() >= self.0
    }
}
