#!/usr/bin/env bash
# Boot-time benchmark: our vmm against QEMU microvm, booting the same test
# guest ELF (PVH) side by side. For each, the median over RUNS runs of
#   - the time from process start to the guest's first serial byte,
#   - the time from process start to process exit (the guest powers off
#     at once after its report),
# and the peak RSS of the process (GNU time's %M: measured from a small
# parent, so the fork of this Python script does not inflate it). Prints
# both medians and the ratio vmm/QEMU. Usage: scripts/bench-boot.sh [RUNS]
# (default 7).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${1:-7}"
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] ||
    { echo "bench-boot: RUNS '$RUNS': expected a whole number, 1 or more" >&2; exit 1; }
VMM="${VMM_BIN:-$ROOT/target/release/vmm}"
GUEST="$ROOT/target/guest/testguest.elf"
QEMU="${QEMU_BIN:-qemu-system-x86_64}"

[[ -e /dev/kvm ]] || { echo "bench-boot: /dev/kvm is missing" >&2; exit 1; }
# Built every time (nothing to do when up to date): a stale binary would
# be timed otherwise.
echo "bench-boot: building the vmm (release) and the test guest" >&2
(cd "$ROOT" && cargo build --release -p vmm >&2)
"$ROOT/scripts/build-guest.sh" >&2
[[ -x /usr/bin/time ]] || { echo "bench-boot: /usr/bin/time not found (apt-get install time)" >&2; exit 1; }
command -v "$QEMU" >/dev/null || { echo "bench-boot: $QEMU not found (apt-get install qemu-system-x86)" >&2; exit 1; }

exec python3 - "$RUNS" "$VMM" "$GUEST" "$QEMU" <<'PY'
import os, statistics, subprocess, sys, tempfile, time

runs, vmm, guest, qemu = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
MEM = "512M"
# "nopci": the guest reports its CPUs, RAM and ACPI tables, then powers off
# at once (no PCI discovery, which would differ between the two machines).
commands = {
    "vmm": [vmm, "--kernel", guest, "--memory", MEM, "--serial", "stdio", "--cmdline", "nopci"],
    "qemu-microvm": [qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "max,-arch-capabilities", "-m", MEM, "-smp", "1",
                     "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
                     "-serial", "stdio", "-kernel", guest, "-append", "nopci", "-no-reboot",
                     "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"],
}

def one_run(cmd):
    with tempfile.NamedTemporaryFile(mode="r") as rss_file:
        start = time.monotonic()
        proc = subprocess.Popen(["/usr/bin/time", "-q", "-f", "%M", "-o", rss_file.name] + cmd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        first = proc.stdout.read(1)
        t_first = time.monotonic() - start
        out = first + proc.stdout.read()
        proc.wait()
        t_exit = time.monotonic() - start
        rss_kib = int(rss_file.read().split()[-1])
    err = proc.stderr.read().decode(errors="replace")
    text = out.decode(errors="replace")
    if not first or "testguest: poweroff" not in text or "FAIL" in text or "PANIC" in text:
        sys.exit(f"bench-boot: {cmd[0]} did not boot the guest cleanly (exit {proc.returncode}):\n{text}\n{err}")
    return t_first, t_exit, rss_kib

results = {}
for name, cmd in commands.items():
    one_run(cmd)  # warm-up: page cache, KVM module state
    samples = [one_run(cmd) for _ in range(runs)]
    results[name] = {
        "first": statistics.median(s[0] for s in samples),
        "exit": statistics.median(s[1] for s in samples),
        "rss": max(s[2] for s in samples),
    }
    print(f"{name:13s} runs={runs} first-byte median {results[name]['first']*1000:8.1f} ms   "
          f"exit median {results[name]['exit']*1000:8.1f} ms   peak RSS {results[name]['rss']/1024:6.1f} MiB",
          flush=True)

v, q = results["vmm"], results["qemu-microvm"]
print()
print(f"{'metric':22s} {'vmm':>12s} {'qemu-microvm':>14s} {'vmm/qemu':>10s}")
print(f"{'first serial byte':22s} {v['first']*1000:10.1f}ms {q['first']*1000:12.1f}ms {v['first']/q['first']:10.2f}")
print(f"{'exit after poweroff':22s} {v['exit']*1000:10.1f}ms {q['exit']*1000:12.1f}ms {v['exit']/q['exit']:10.2f}")
print(f"{'peak RSS':22s} {v['rss']/1024:10.1f}MiB {q['rss']/1024:11.1f}MiB {v['rss']/q['rss']:10.2f}")
PY
