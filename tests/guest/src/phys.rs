//! Access to guest physical memory through the boot identity map.
//!
//! The entry trampoline maps 0..4 GiB one-to-one, so a physical address
//! below 4 GiB is also a valid virtual address.

/// End of the identity map built by `boot.rs`.
pub const MAPPED_END: u64 = 1 << 32;

/// Virtual base of the window `boot.rs` leaves at 4 GiB (one PDPT entry,
/// its page directory empty until `window` fills its first entry).
const WINDOW: u64 = 1 << 32;
const TWO_MIB: u64 = 2 << 20;

extern "C" {
    /// The window's page directory (`boot.rs`).
    static mut boot_window_pd: [u64; 512];
}

/// A pointer to the u64 at physical `addr` (8-byte aligned), through the
/// window: its 2 MiB page is mapped at WINDOW, so any physical address
/// works, the RAM above 4 GiB among them. Valid until the next call.
///
/// # Safety
/// Only the boot processor runs the guest (the others halt in `smp`'s
/// trampoline), and nothing else uses the window while the
/// pointer is in use; what lies at `addr` must be safe to access.
pub unsafe fn window(addr: u64) -> *mut u64 {
    let page = addr & !(TWO_MIB - 1);
    // SAFETY: the window's page directory is only written here, by the one
    // CPU; a present, writable 2 MiB page (0x83) at `page`.
    unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!(boot_window_pd[0]), page | 0x83);
        // The old translation of the window may be cached.
        core::arch::asm!("invlpg [{0}]", in(reg) WINDOW, options(nostack, preserves_flags));
    }
    (WINDOW + (addr - page)) as *mut u64
}

/// Returns the `len` bytes at physical address `addr`, or `None` if `addr` is
/// 0 or the range does not lie entirely below `MAPPED_END`.
///
/// The bytes are firmware or VMM data (ACPI tables, start_info, ROM) that
/// nothing changes while the guest runs.
pub fn bytes(addr: u64, len: u64) -> Option<&'static [u8]> {
    let end = addr.checked_add(len)?;
    if addr == 0 || end > MAPPED_END {
        return None;
    }
    let len = usize::try_from(len).ok()?;
    // SAFETY: the range is non-null and below 4 GiB, so the identity map
    // covers it for the whole life of the guest; the guest never writes these
    // bytes and no other vCPU runs, so no mutation aliases the 'static slice.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

/// Little-endian u32 at `off` (panics if out of bounds).
#[inline]
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut v = [0; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

/// Little-endian u64 at `off` (panics if out of bounds).
#[inline]
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// Stores `value` at physical address `addr` with a volatile write (for a
/// memory-mapped device register). Returns false if `addr` is not mapped.
///
/// # Safety
/// `addr` must be a device register or memory that no Rust reference covers.
pub unsafe fn write_u8(addr: u64, value: u8) -> bool {
    if addr == 0 || addr >= MAPPED_END {
        return false;
    }
    // SAFETY: mapped (checked above); the caller guarantees no Rust object
    // lives there; a byte store needs no alignment.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) };
    true
}

/// As `write_u8`, for a 16-bit little-endian register.
///
/// # Safety
/// As for `write_u8`, for both bytes.
pub unsafe fn write_u16(addr: u64, value: u16) -> bool {
    if addr == 0 || addr >= MAPPED_END - 1 {
        return false;
    }
    // SAFETY: as in `write_u8`; a `[u8; 2]` store needs no alignment (and
    // such registers are naturally aligned anyway).
    unsafe { core::ptr::write_volatile(addr as *mut [u8; 2], value.to_le_bytes()) };
    true
}
