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
# Each backend runs in turn in one network namespace, with its own tap (no
# addresses; the test frames use a local EtherType the host stack drops).
# DPDK runs without hugepages (--no-huge -m 1024), as in scripts/vm-dpdk.sh.
# Nothing is pinned by default: the frontend, its injecting thread (rx) and
# the backend share the CPUs, and DPDK's forwarding lcore polls one busy.
# PIN=1 gives the backend CPU 1 (vhost-net's threads; DPDK's forwarding
# lcore, its main lcore on 0) and the frontend CPU 0. Either way the rx
# figures are bound by the frontend: its injecting thread sends flat out.
# Only one backend runs at a time. Figures on a shared machine move by 10-20%
# from one run to the next, so the backends take turns for ROUNDS rounds and
# the table shows each one's median, with the lowest and highest ratio.
# Usage: [PIN=1] scripts/bench-net.sh [SECONDS per run, default 5] [ROUNDS, default 3]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECS="${1:-5}"
ROUNDS="${2:-3}"
for value in "SECONDS per run:$SECS" "ROUNDS:$ROUNDS"; do
    [[ "${value#*:}" =~ ^[1-9][0-9]*$ ]] ||
        { echo "bench-net: ${value%%:*} '${value#*:}': expected a whole number, 1 or more" >&2; exit 1; }
done
PIN="${PIN:-0}"
case "$PIN" in
    0) FRONTEND_PIN=() BACKEND_PIN=() DPDK_LCORES=() ;;
    1) [[ "$(nproc)" -ge 2 ]] ||
           { echo "bench-net: PIN=1 needs 2 CPUs (one for the frontend, one for the backend); nproc says $(nproc)" >&2; exit 1; }
       FRONTEND_PIN=(taskset -c 0) BACKEND_PIN=(taskset -c 1) DPDK_LCORES=(-l 0,1) ;;
    *) echo "bench-net: PIN=$PIN: expected 0 or 1" >&2; exit 1 ;;
esac
for tool in dpdk-testpmd ip python3 taskset; do
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
# A signal ends the script (and so runs cleanup): a trap that only cleaned
# up would let the next case start.
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
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
        ip netns exec "$NS" "${BACKEND_PIN[@]}" "$NET" --socket "$sock" --tap "$tap" \
            2>"$WORK/vhost-net.log" &
    else
        ip netns exec "$NS" dpdk-testpmd "${DPDK_LCORES[@]}" --no-pci --no-huge -m 1024 \
            --file-prefix="$PREFIX" \
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

# One line per run: round kind direction size pps.
RESULTS="$WORK/results"
run() { # round kind direction size socket tap
    local round="$1" kind="$2" dir="$3" size="$4" sock="$5" tap="$6" json pps
    json="$(ip netns exec "$NS" "${FRONTEND_PIN[@]}" "$LOAD" --socket "$sock" --iface "$tap" --direction "$dir" \
        --frame-size "$size" --time "$SECS" --json | tail -n 1)"
    pps="$(python3 -c 'import json,sys; print(int(json.loads(sys.argv[1])["pps"]))' "$json")"
    if [[ "$pps" -le 0 ]]; then
        echo "bench-net: $kind $dir ${size}B moved no frames; the logs:" >&2
        tail -n 20 "$WORK"/*.log >&2 || true
        exit 1
    fi
    echo "$round $kind $dir $size $pps" >>"$RESULTS"
    echo "bench-net: round $round/$ROUNDS: $kind $dir ${size}B: $pps pps" >&2
}

for round in $(seq "$ROUNDS"); do
    for kind in vhost-net dpdk; do
        sock="$WORK/$kind.sock"
        tap="bn$kind"
        tap="${tap:0:15}"
        start_backend "$kind" "$sock" "$tap"
        for dir in tx rx; do
            for size in 64 1500; do
                run "$round" "$kind" "$dir" "$size" "$sock" "$tap"
            done
        done
        stop_backends
    done
done

python3 - "$RESULTS" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    rnd, kind, d, size, pps = line.split()
    runs.setdefault((kind, d, int(size)), {})[rnd] = int(pps)
rounds = len(next(iter(runs.values())))
print(f"{rounds} rounds; medians, and the lowest and highest ratio of a round")
print(f"{'workload':<10} {'vhost-net pps':>14} {'dpdk pps':>10} {'vs dpdk':>8} {'range':>12} {'vhost Gb/s':>11} {'dpdk Gb/s':>10}")
for d in ("tx", "rx"):
    for size in (64, 1500):
        ours, theirs = runs[("vhost-net", d, size)], runs[("dpdk", d, size)]
        mo, mt = statistics.median(ours.values()), statistics.median(theirs.values())
        ratios = [ours[r] / theirs[r] for r in ours if r in theirs]
        gb = lambda pps: pps * size * 8 / 1e9
        print(f"{d + ' ' + str(size) + 'B':<10} {mo:>14.0f} {mt:>10.0f} {mo / mt:>7.2f}x "
              f"{min(ratios):>5.2f}-{max(ratios):.2f}x {gb(mo):>11.3f} {gb(mt):>10.3f}")
PY
