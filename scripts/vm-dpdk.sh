#!/usr/bin/env bash
# Pairs a VM with DPDK: starts dpdk-testpmd with a vhost-user port and a tap
# port (io forwarding between them), boots the vmm with a NIC on that
# vhost-user port, and tears everything down when the VM exits.
#
# Usage: scripts/vm-dpdk.sh [--client] [--netns NAME] [--host-ip CIDR]
#                           [--kernel PATH] [--cmdline TEXT] [-- VMM-ARGS...]
#   --client        DPDK connects to the VMM (vmm server=on, DPDK client=1,
#                   the way round that survives a DPDK restart); default:
#                   DPDK listens and the VMM connects.
#   --netns NAME    run testpmd (and so its tap) in this network namespace,
#                   created and deleted by the script (default: a fresh
#                   "vmmdpdk<pid>"), so the tap's address cannot clash with
#                   the host's own networks.
#   --host-ip CIDR  address given to the tap (default 192.0.2.1/24).
#   --kernel PATH   guest kernel (default: the project's test guest, which
#                   then pings 192.0.2.1 from 192.0.2.2 across DPDK).
#   --cmdline TEXT  guest command line.
#
# DPDK settings, for machines without hugepages (CI, containers):
#   EAL: --no-pci --no-huge -m 1024 (1 GiB of ordinary memory instead of
#        hugepages; no PCI devices probed), --file-prefix per run so that
#        several instances coexist;
#   testpmd: --no-mlockall --total-num-mbufs=8192 (fits in the 1 GiB),
#        --forward-mode=io --auto-start, and --stats-period so that it runs
#        until signalled instead of reading commands from stdin.
# With hugepages mounted, drop --no-huge and -m (or use --socket-mem).
# The guest's RAM is a shared memfd, which DPDK's vhost library maps as it
# is: no hugepage-backed guest memory is needed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

CLIENT=0
NETNS="vmmdpdk$$"
HOST_IP="192.0.2.1/24"
KERNEL="$ROOT/target/guest/testguest.elf"
CMDLINE="ip=192.0.2.2 ping=192.0.2.1"
VMM_ARGS=()
while (($#)); do
    case "$1" in
        --netns|--host-ip|--kernel|--cmdline)
            [[ $# -ge 2 ]] || { echo "vm-dpdk: $1 needs a value" >&2; exit 2; } ;;
    esac
    case "$1" in
        --client) CLIENT=1 ;;
        --netns) NETNS="$2"; shift ;;
        --host-ip) HOST_IP="$2"; shift ;;
        --kernel) KERNEL="$2"; shift ;;
        --cmdline) CMDLINE="$2"; shift ;;
        --) shift; VMM_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm-dpdk: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
command -v dpdk-testpmd >/dev/null || { echo "vm-dpdk: dpdk-testpmd is missing (apt-get install dpdk-dev)" >&2; exit 1; }
VMM="${VMM_BIN:-$ROOT/target/release/vmm}"
[[ -x "$VMM" ]] || { echo "vm-dpdk: $VMM is missing: cargo build --release -p vmm (or set VMM_BIN)" >&2; exit 1; }
[[ -f "$KERNEL" ]] || { echo "vm-dpdk: kernel $KERNEL is missing (scripts/build-guest.sh)" >&2; exit 1; }

# The socket's path goes into option lists split at commas.
case "${TMPDIR:-/tmp}" in
    *,*) echo "vm-dpdk: TMPDIR '$TMPDIR' has a comma, which would split the socket's path in the options" >&2; exit 1 ;;
esac
WORK="$(mktemp -d)"
SOCK="$WORK/vhost-user.sock"
TAP="dpdk$$"
TAP="${TAP:0:15}"
PREFIX="vmdpdk$$"
TESTPMD=""
VM=""
MADE_NETNS=0
cleanup() {
    # A second Ctrl-C (or TERM, HUP) must not cut the cleanup short.
    trap '' INT TERM HUP
    set +e
    if [[ -n "$VM" ]]; then
        kill "$VM" 2>/dev/null
        wait "$VM" 2>/dev/null
    fi
    if [[ -n "$TESTPMD" ]]; then
        kill "$TESTPMD" 2>/dev/null
        wait "$TESTPMD" 2>/dev/null
    fi
    if ((MADE_NETNS)); then
        ip netns del "$NETNS" 2>/dev/null
    fi
    rm -rf "$WORK" "/var/run/dpdk/$PREFIX"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if ! ip netns list | awk '{print $1}' | grep -qxF -- "$NETNS"; then
    ip netns add "$NETNS"
    MADE_NETNS=1
fi

testpmd() {
    local vhost="net_vhost0,iface=$SOCK,queues=1"
    ((CLIENT)) && vhost+=",client=1"
    ip netns exec "$NETNS" dpdk-testpmd --no-pci --no-huge -m 1024 --file-prefix="$PREFIX" \
        --vdev "$vhost" --vdev "net_tap0,iface=$TAP" -- \
        --no-mlockall --total-num-mbufs=8192 --forward-mode=io --auto-start --stats-period=10 \
        </dev/null >"$WORK/testpmd.log" 2>&1 &
    TESTPMD=$!
}
wait_for() {  # wait_for WHAT TEST...: up to 30 s, while the VM and testpmd live
    local what="$1"; shift
    for _ in $(seq 600); do
        "$@" >/dev/null 2>&1 && return 0
        if [[ -n "$VM" ]] && ! kill -0 "$VM" 2>/dev/null; then
            VM_STATUS=0
            wait "$VM" || VM_STATUS=$?
            VM=""
            echo "vm-dpdk: the vmm exited with status $VM_STATUS before $what appeared" >&2
            exit 1
        fi
        if [[ -n "$TESTPMD" ]] && ! kill -0 "$TESTPMD" 2>/dev/null; then
            echo "vm-dpdk: testpmd exited before $what appeared; its log:" >&2
            cat "$WORK/testpmd.log" >&2 2>/dev/null
            exit 1
        fi
        sleep 0.05
    done
    echo "vm-dpdk: $what did not appear within 30 s; testpmd log:" >&2
    cat "$WORK/testpmd.log" >&2 2>/dev/null
    exit 1
}
configure_tap() {
    wait_for "the tap $TAP" ip -n "$NETNS" link show "$TAP"
    ip -n "$NETNS" addr add "$HOST_IP" dev "$TAP"
    ip -n "$NETNS" link set "$TAP" up
    echo "vm-dpdk: testpmd (pid $TESTPMD) forwards between $SOCK and tap $TAP ($HOST_IP) in netns $NETNS" >&2
}

if ((CLIENT)); then
    "$VMM" --kernel "$KERNEL" --cmdline "$CMDLINE" --memory 256M \
        --net "socket=$SOCK,server=on" "${VMM_ARGS[@]}" <&0 &
    VM=$!
    wait_for "the vmm's socket" test -S "$SOCK"
    testpmd
    configure_tap
else
    testpmd
    wait_for "testpmd's socket" test -S "$SOCK"
    configure_tap
    "$VMM" --kernel "$KERNEL" --cmdline "$CMDLINE" --memory 256M \
        --net "socket=$SOCK" "${VMM_ARGS[@]}" <&0 &
    VM=$!
fi
status=0
wait "$VM" || status=$?
VM=""
echo "vm-dpdk: the VM exited with status $status" >&2
exit "$status"
