//! The C memory functions the compiler may call (`no_std` has no libc).
//!
//! `memcpy`, `memmove` and `memset` are single `rep movsb`/`rep stosb`
//! instructions, which are cheap under an emulating hypervisor and cannot be
//! turned back into calls to themselves by the optimiser.

use core::arch::asm;

/// Copies `n` bytes from `src` to `dest`.
///
/// # Safety
/// `src` must be valid for `n` byte reads, `dest` for `n` byte writes, and
/// the two ranges must not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid for `n` bytes; DF is
    // clear (ABI), so `rep movsb` copies forwards over exactly those ranges.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// Copies `n` bytes from `src` to `dest`; the ranges may overlap.
///
/// # Safety
/// `src` must be valid for `n` byte reads and `dest` for `n` byte writes.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // `dest` is below `src` or past its end: a forward copy is safe.
        // SAFETY: the caller's guarantees, and a forward copy never reads a
        // byte it has already overwritten in this case.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: `dest` lies inside (src, src + n), so n > 0 and both
    // `+ n - 1` pointers are the last bytes of ranges the caller vouched for.
    // With DF set `rep movsb` copies backwards, last byte first, which is
    // correct for this overlap; DF is cleared again before returning.
    unsafe {
        asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dest.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dest
}

/// Fills `n` bytes at `dest` with the low byte of `c`.
///
/// # Safety
/// `dest` must be valid for `n` byte writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dest` is valid for `n` bytes; DF is
    // clear, so `rep stosb` writes exactly that range.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c.to_le_bytes()[0],
            options(nostack, preserves_flags),
        );
    }
    dest
}

/// Compares `n` bytes; returns the difference of the first unequal pair.
///
/// # Safety
/// `a` and `b` must both be valid for `n` byte reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n and the caller guarantees `n` readable bytes at each.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// Like `memcmp`, but only zero versus non-zero matters.
///
/// # Safety
/// As for `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as `memcmp`.
    unsafe { memcmp(a, b, n) }
}
