#!/usr/bin/env bash
# Build the PVH test guest (tests/guest) and check that it uses no
# instruction the emulating nested KVM lacks.
#
# Usage: scripts/build-guest.sh        (from any directory)
# Output: target/guest/testguest.elf (the path is printed on success)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# The guest's target (bare metal, no SSE in its ABI; see
# tests/guest/.cargo/config.toml) needs its own standard library, which a
# toolchain installed for the host alone lacks: it is there when rustc's
# library directory for the target holds libcore.
target=x86_64-unknown-none
libdir="$(rustc --print target-libdir --target "$target" 2>/dev/null || true)"
if [[ -z "$libdir" ]] || ! compgen -G "$libdir/libcore-*.rlib" >/dev/null; then
    if ! command -v rustup >/dev/null; then
        echo "build-guest: the Rust target $target is not installed, and there is no rustup to add it: install its standard library for this rustc" >&2
        exit 1
    fi
    echo "build-guest: adding the Rust target $target (rustup target add $target)" >&2
    if ! rustup target add "$target" >&2; then
        echo "build-guest: the Rust target $target is missing and rustup could not add it: run 'rustup target add $target' where rustup can download" >&2
        exit 1
    fi
fi

cargo --config tests/guest/.cargo/config.toml build --release \
    --manifest-path tests/guest/Cargo.toml \
    --target-dir target/guest-build

built=target/guest-build/$target/release/testguest
out=target/guest/testguest.elf
mkdir -p target/guest
cp "$built" "$out"

# Instruction lines only; the 32-bit trampoline (.boot32) is decoded as
# i386, everything else as x86_64.
disasm="$( {
    objdump -d --no-show-raw-insn -M i386 -j .boot32 "$out"
    objdump -d --no-show-raw-insn -j .text "$out"
} | grep -E '^ *[0-9a-f]+:' )"
# What the guest must not contain: SSE/AVX/MMX registers and x87 instructions
# (mnemonics starting with "f"; no FPU state is set up and the host may lack
# XSAVE), and instructions the emulating nested KVM does not implement.
forbidden='%([xyz]mm[0-9]+|mm[0-7]|st(\([0-7]\))?)\b|:[[:space:]]+f[a-z0-9]*([[:space:]]|$)|\b(cmpxchg16b|xsave[a-z0-9]*|xrstor[a-z0-9]*|int3)\b'
if bad="$(grep -E "$forbidden" <<<"$disasm")"; then
    echo "build-guest: $out uses instructions the test guest must not use:" >&2
    echo "$bad" | head -20 >&2
    echo "build-guest: (no SSE/AVX/x87 registers, cmpxchg16b, xsave, xrstor or int3)" >&2
    exit 1
fi

# Nothing may be kept below the stack pointer (the red zone): an interrupt
# pushes its frame there. Generic code from core is compiled with the
# guest's flags; a precompiled core function that used it would show here.
if bad="$(grep -E -- '-0x[0-9a-f]+\(%rsp\)' <<<"$disasm")"; then
    echo "build-guest: $out keeps data below the stack pointer, where interrupts write:" >&2
    echo "$bad" | head -20 >&2
    exit 1
fi

echo "$root/$out"
