#!/usr/bin/env bash
# Network data-path benchmark, no VM. The vhost-netload frontend plays the
# guest of two vhost-user-net backends, each with a tap on its host side
# (the same topology):
#   - our vhost-net on a tap, and
#   - dpdk-testpmd's vhost PMD forwarding (io mode) to a net_tap port.
# For 64-byte and 1500-byte frames, in both directions:
#   tx  the frontend keeps its tx ring full; counted: frames that reached the
#       host (the tap's rx_packets);
#   rx  a thread injects frames into the tap through an AF_PACKET socket;
#       counted: frames that arrived in the frontend's rx ring.
# Each backend runs in its own network namespace with its own tap (no
# addresses; the test frames use a local EtherType the host stack drops).
# DPDK runs without hugepages (--no-huge -m 1024), as in scripts/vm-dpdk.sh;
# its forwarding core polls, so it keeps one of the cores busy throughout.
# Usage: scripts/bench-net.sh [SECONDS per run, default 5]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECS="${1:-5}"
for tool in dpdk-testpmd ip python3; do
    command -v "$tool" >/dev/null || { echo "bench-net: $tool not found (apt-get install dpdk-dev iproute2)" >&2; exit 1; }
done
echo "bench-net: building (release)" >&2
(cd "$ROOT" && cargo build --release -q -p vhost-net -p vhost-test-frontend)
NET="$ROOT/target/release/vhost-net"
LOAD="$ROOT/target/release/vhost-netload"

WORK="$(mktemp -d)"
NS="vmmbench$$"
PREFIX="benchnet$$"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$WORK" "/var/run/dpdk/$PREFIX"
}
trap cleanup EXIT INT TERM
ip netns add "$NS"

wait_for() { # what command...
    local what="$1"; shift
    for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.05; done
    echo "bench-net: $what did not appear; logs:" >&2
    tail -n 20 "$WORK"/*.log >&2
    exit 1
}

start_backend() { # kind socket tap
    local kind="$1" sock="$2" tap="$3"
    if [[ "$kind" == vhost-net ]]; then
        ip netns exec "$NS" "$NET" --socket "$sock" --tap "$tap" 2>"$WORK/vhost-net.log" &
    else
        ip netns exec "$NS" dpdk-testpmd --no-pci --no-huge -m 1024 --file-prefix="$PREFIX" \
            --vdev "net_vhost0,iface=$sock,queues=1" --vdev "net_tap0,iface=$tap" -- \
            --no-mlockall --total-num-mbufs=16384 --forward-mode=io --auto-start \
            --stats-period=60 </dev/null >"$WORK/testpmd.log" 2>&1 &
    fi
    PIDS+=($!)
    wait_for "$sock" test -S "$sock"
    wait_for "tap $tap" ip -n "$NS" link show "$tap"
    ip -n "$NS" link set "$tap" up
}

stop_backends() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
}

declare -A PPS GBPS
run() { # kind direction size socket tap
    local kind="$1" dir="$2" size="$3" sock="$4" tap="$5" json
    json="$(ip netns exec "$NS" "$LOAD" --socket "$sock" --iface "$tap" --direction "$dir" \
        --frame-size "$size" --time "$SECS" --json | tail -n 1)"
    PPS["$kind,$dir,$size"]="$(python3 -c 'import json,sys; print(int(json.loads(sys.argv[1])["pps"]))' "$json")"
    GBPS["$kind,$dir,$size"]="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["gbps"])' "$json")"
    echo "bench-net: $kind $dir ${size}B: ${PPS["$kind,$dir,$size"]} pps" >&2
}

for kind in vhost-net dpdk; do
    sock="$WORK/$kind.sock"
    tap="bn$kind"
    tap="${tap:0:15}"
    start_backend "$kind" "$sock" "$tap"
    for dir in tx rx; do
        for size in 64 1500; do
            run "$kind" "$dir" "$size" "$sock" "$tap"
        done
    done
    stop_backends
done

printf '%-14s %14s %14s %9s %12s %12s\n' workload "vhost-net pps" "dpdk pps" "vs dpdk" "vhost Gb/s" "dpdk Gb/s"
for dir in tx rx; do
    for size in 64 1500; do
        ours="${PPS["vhost-net,$dir,$size"]}"
        theirs="${PPS["dpdk,$dir,$size"]}"
        ratio="$(python3 -c "print(f'{$ours / max($theirs, 1):.2f}x')")"
        printf '%-14s %14s %14s %9s %12.3f %12.3f\n' "$dir ${size}B" "$ours" "$theirs" "$ratio" \
            "${GBPS["vhost-net,$dir,$size"]}" "${GBPS["dpdk,$dir,$size"]}"
    done
done
