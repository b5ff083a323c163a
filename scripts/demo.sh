#!/usr/bin/env bash
# Builds everything and boots the demo VM: the project's test guest with
# 2 vCPUs, 512 MiB and a 64 MiB virtio-blk disk served by a separate
# vhost-blk process, console on this terminal. The guest reports what it
# found (CPUs, memory, ACPI tables, PCI devices, the disk), writes and reads
# back its disk, and powers off; the backend and its files are then removed.
# With --interactive the guest then waits for lines to echo back; type
# "poweroff" to end it (Ctrl-A x quits the VMM at any time).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CMDLINE="demo"
if [[ "${1:-}" == "--interactive" ]]; then
    CMDLINE="demo echo"
fi
echo "demo: building the vmm, vhost-blk and the test guest" >&2
(cd "$ROOT" && cargo build --release -p vmm -p vhost-blk)
"$ROOT/scripts/build-guest.sh" >/dev/null

WORK="$(mktemp -d)"
BACKEND=""
cleanup() {
    if [[ -n "$BACKEND" ]]; then
        kill "$BACKEND" 2>/dev/null || true
        wait "$BACKEND" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

truncate -s 64M "$WORK/disk0.img"
"$ROOT/target/release/vhost-blk" --socket "$WORK/disk0.sock" --image "$WORK/disk0.img" \
    --serial demo-disk0 2>"$WORK/vhost-blk.log" &
BACKEND=$!
for _ in $(seq 100); do [[ -S "$WORK/disk0.sock" ]] && break; sleep 0.05; done
[[ -S "$WORK/disk0.sock" ]] || { echo "demo: vhost-blk did not start:" >&2; cat "$WORK/vhost-blk.log" >&2; exit 1; }

echo "demo: booting target/guest/testguest.elf with a vhost-user disk" >&2
status=0
"$ROOT/target/release/vmm" --kernel "$ROOT/target/guest/testguest.elf" \
    --cpus 2 --memory 512M --cmdline "$CMDLINE" --serial stdio \
    --disk "socket=$WORK/disk0.sock" || status=$?
echo "demo: the VM exited with status $status" >&2
exit "$status"
