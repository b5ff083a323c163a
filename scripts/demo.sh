#!/usr/bin/env bash
# Builds everything and boots the demo VM through scripts/launch: the
# project's test guest with 2 vCPUs, 512 MiB, a 64 MiB virtio-blk disk served
# by a vhost-blk process and a virtio-net NIC served by a vhost-net process
# on a tap, console on this terminal. The tap lives in a network namespace
# made for the demo, with the host side at 192.0.2.1/24, so nothing touches
# this machine's own networks. The guest reports what it found (CPUs,
# memory, ACPI tables, PCI devices, the disk, the NIC), writes and reads back
# its disk, pings 192.0.2.1 from 192.0.2.2, and powers off; the launcher then
# stops the backends and removes their sockets, and this script removes the
# namespace and the image.
# With --interactive the guest then waits for lines to echo back; type
# "poweroff" to end it (Ctrl-A x quits the VMM at any time).
# Needs root (network namespaces and taps) and /dev/kvm; installs iproute2
# and python3 if they are missing (scripts/install-deps.sh --demo).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CMDLINE="demo ip=192.0.2.2 ping=192.0.2.1"
case "${1:-}" in
    "") ;;
    --interactive) [[ $# -eq 1 ]] || { echo "demo: unexpected argument '$2'" >&2; exit 2; } ;;&
    --interactive) CMDLINE="$CMDLINE echo" ;;
    *) echo "demo: unknown argument '$1' (the only one is --interactive)" >&2; exit 2 ;;
esac
if [[ $(id -u) -ne 0 ]]; then
    echo "demo: the NIC's tap and namespace need root: run it with sudo env PATH=\"\$PATH\" RUSTUP_HOME=\"\$HOME/.rustup\" (sudo drops ~/.cargo/bin and your home)" >&2
    exit 1
fi
# Run, not just found: under sudo, rustup's cargo finds no toolchain in
# root's home unless RUSTUP_HOME says where the user's is.
if ! cargo --version >/dev/null 2>&1; then
    echo "demo: cargo does not run (PATH=$PATH, RUSTUP_HOME=${RUSTUP_HOME:-unset}): install Rust 1.85 or later with rustup, and under sudo keep your PATH and toolchains (sudo env PATH=\"\$PATH\" RUSTUP_HOME=\"\$HOME/.rustup\" scripts/demo.sh)" >&2
    exit 1
fi
# An open, not a permission test: root passes those even where a device
# cgroup refuses the device.
if ! { : <>/dev/kvm; } 2>/dev/null; then
    echo "demo: cannot open /dev/kvm: the VM needs KVM" >&2
    exit 1
fi
"$ROOT/scripts/install-deps.sh" --demo
echo "demo: building the vmm, vhost-blk, vhost-net and the test guest" >&2
(cd "$ROOT" && cargo build --release -p vmm -p vhost-blk -p vhost-net)
"$ROOT/scripts/build-guest.sh" >/dev/null

WORK="$(mktemp -d)"
NS="vmmdemo$$"
cleanup() {
    # A second Ctrl-C (or TERM, HUP) must not cut the cleanup short.
    trap '' INT TERM HUP
    set +e
    # The launcher (a running job, even if a signal came before its pid
    # was kept) stops the VM and its backends on SIGTERM.
    for pid in $(jobs -p); do
        kill -TERM "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    ip netns del "$NS" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

truncate -s 64M "$WORK/disk0.img"
ip netns add "$NS"
ip -n "$NS" tuntap add dev demotap0 mode tap
ip -n "$NS" addr add 192.0.2.1/24 dev demotap0
ip -n "$NS" link set demotap0 up

echo "demo: booting target/guest/testguest.elf with a vhost-user disk and NIC" >&2
status=0
# In the background, so that a signal to this script is acted on at once
# (bash runs traps only between commands); stdin stays the console's.
"$ROOT/scripts/launch" --kernel "$ROOT/target/guest/testguest.elf" \
    --cpus 2 --memory 512M --cmdline "$CMDLINE" \
    --disk "$WORK/disk0.img" --net "demotap0,netns=$NS" \
    --log-dir "$WORK/logs" <&0 &
LAUNCH=$!
wait "$LAUNCH" || status=$?
echo "demo: the VM exited with status $status" >&2
exit "$status"
