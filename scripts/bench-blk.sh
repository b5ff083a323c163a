#!/usr/bin/env bash
# Block data-path benchmark, no VM: the vhost-loadgen frontend drives
#   - our vhost-blk, and
#   - qemu-storage-daemon's vhost-user-blk export,
# side by side on the same image, with fio on the host against the same file
# as the ceiling. Two images: a file on tmpfs (measures the backends, not the
# disk) and a file on disk opened with O_DIRECT (vhost-blk --direct,
# qemu-storage-daemon cache.direct=on, fio --direct=1).
# Workloads: 4k random read at depth 32 on 1 and 2 queues, 64k sequential
# read and 64k sequential write at depth 32 on 1 queue. The load generator
# plays Linux's virtio-blk driver: it sleeps until the backend's call as
# soon as its used rings are empty. The 4k random reads run a second time
# with it playing a polling driver ("poll" rows: it watches its used rings
# for 10 us before it sleeps, giving up the core between looks), which
# spares the backends a frontend's wake-up on every round trip. Its guest
# memory is on 2 MiB huge
# pages, as vhost-user is deployed with DPDK or SPDK and as
# `vmm --memory size=...,hugepages=on` gives it; PAGES=4k puts it on
# ordinary shared memory (a memfd) instead. The script reserves the huge
# pages it needs (scripts/hugepages.sh; root) and takes them out of the
# pool again at exit.
# The three take turns for ROUNDS rounds (figures on a shared machine move
# by 10-30% between runs); the table shows medians and the range of ratios.
# For the image on disk, a second table shows how many requests each tool
# kept in the disk's queue on average (its IOPS times the block layer's
# latency, from the block device's counters): how well it keeps the disk
# busy, a figure the disk's own speed, which drifts between runs, does not
# move. It also shows the disk's average request size: the block layer
# merges adjacent transfers that wait for the device.
# "fio vs qsd" is how far the ceiling itself is above qemu-storage-daemon: no
# backend behind a frontend beats fio on the same disk, so on disk it bounds
# what "vs qsd" can reach.
# Last, on disk, a mix: 4k random reads taking turns with 64k random writes
# on one queue (fio: randrw, half reads). A third table shows the reads'
# latency beside the writes': vhost-blk returns requests in the order the
# guest gave them (so that a restarted backend repeats and skips nothing),
# and a read queued behind a write cannot come back before it, while
# qemu-storage-daemon returns each as it finishes.
# Each run first warms up for WARMUP seconds (default 1) that no figure counts:
# the load generator's --warmup, fio's --ramp_time.
# Usage: [PAGES=2m|4k] [WARMUP=s] scripts/bench-blk.sh [SECONDS per run, default 5] [ROUNDS, default 3]
set -euo pipefail
# A failing tool inside $(...) fails the script too, not just its subshell.
shopt -s inherit_errexit
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SECS="${1:-5}"
ROUNDS="${2:-3}"
WARMUP="${WARMUP:-1}"
[[ "$WARMUP" =~ ^[0-9]+$ ]] ||
    { echo "bench-blk: WARMUP '$WARMUP': expected a whole number of seconds" >&2; exit 1; }
for value in "SECONDS per run:$SECS" "ROUNDS:$ROUNDS"; do
    [[ "${value#*:}" =~ ^[1-9][0-9]*$ ]] ||
        { echo "bench-blk: ${value%%:*} '${value#*:}': expected a whole number, 1 or more" >&2; exit 1; }
done
SIZE=1G
PAGES="${PAGES:-2m}"
case "$PAGES" in
    2m) LOADGEN_MEM=(--hugepages) ;;
    4k) LOADGEN_MEM=() ;;
    *) echo "bench-blk: PAGES=$PAGES: expected 2m or 4k" >&2; exit 1 ;;
esac
for tool in qemu-storage-daemon fio python3; do
    command -v "$tool" >/dev/null || { echo "bench-blk: $tool not found (apt-get install qemu-system-common fio)" >&2; exit 1; }
done
echo "bench-blk: building (release)" >&2
(cd "$ROOT" && cargo build --release -q -p vhost-blk -p vhost-test-frontend)
BLK="$ROOT/target/release/vhost-blk"
LOADGEN="$ROOT/target/release/vhost-loadgen"

# qemu-storage-daemon's options and fio's file names give ',' and ':' a
# meaning of their own.
case "$ROOT" in
    *[,:]*) echo "bench-blk: the checkout's path '$ROOT' has a ',' or ':', which qemu-storage-daemon or fio would split" >&2; exit 1 ;;
esac
WORK="$(mktemp -d "$ROOT/target/bench-blk.XXXXXX")"
SHM="$(mktemp -d /dev/shm/bench-blk.XXXXXX)"
PIDS=()
HUGEPAGES_ADDED=0
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK" "$SHM"
    "$ROOT/scripts/hugepages.sh" --release "$HUGEPAGES_ADDED" || true
}
# A signal ends the script (and so runs cleanup): a trap that only cleaned
# up would let the next case start.
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ "$PAGES" == 2m ]]; then
    # Two queues of 32 64k buffers and their rings fit in 3 pages.
    HUGEPAGES_ADDED="$("$ROOT/scripts/hugepages.sh" 8)"
fi

wait_socket() { # socket pid: up to 10 s, while the backend lives
    for _ in $(seq 200); do
        [[ -S "$1" ]] && return 0
        kill -0 "$2" 2>/dev/null || break
        sleep 0.05
    done
    echo "bench-blk: $1 did not appear; the backend's log:" >&2
    tail -n 20 "$WORK/backend.log" >&2
    return 1
}

start_backend() { # kind image direct queues socket
    local kind="$1" image="$2" direct="$3" queues="$4" sock="$5"
    rm -f "$sock"
    if [[ "$kind" == vhost-blk ]]; then
        local extra=()
        [[ "$direct" == 1 ]] && extra+=(--direct)
        "$BLK" --socket "$sock" --image "$image" --num-queues "$queues" "${extra[@]}" 2>>"$WORK/backend.log" &
    else
        local cache="cache.direct=off"
        [[ "$direct" == 1 ]] && cache="cache.direct=on,aio=native"
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=file0,filename=$image,$cache" \
            --blockdev driver=raw,node-name=disk0,file=file0 \
            --export "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=$sock,writable=on,num-queues=$queues" \
            2>>"$WORK/backend.log" &
    fi
    PIDS+=($!)
    wait_socket "$sock" "$!"
}

stop_backend() {
    local pid="${PIDS[-1]}"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset 'PIDS[-1]'
}

loadgen() { # socket queues size pattern op poll-us -> "iops mbps"
    "$LOADGEN" --socket "$1" --queues "$2" --depth 32 --size "$3" --pattern "$4" \
        --op "$5" --poll-us "$6" --warmup "$WARMUP" --time "$SECS" "${LOADGEN_MEM[@]}" --json --quiet |
        python3 -c 'import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(d["iops"], d["mbps"])'
}

loadgen_mixed() { # socket -> "read-IOPS read-p50 read-p99 write-p50" (us)
    "$LOADGEN" --socket "$1" --queues 1 --depth 32 --op mixed --size 4k --write-size 64k \
        --pattern rand --warmup "$WARMUP" --time "$SECS" "${LOADGEN_MEM[@]}" --json --quiet |
        python3 -c 'import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(d["read_iops"], d["read_p50_us"], d["read_p99_us"], d["write_p50_us"])'
}

fio_mixed() { # image -> as loadgen_mixed
    fio --name=mixed --filename="$1" --direct=1 --bs=4k,64k --rw=randrw --rwmixread=50 \
        --iodepth=32 --ioengine=io_uring --ramp_time="$WARMUP" --runtime="$SECS" --time_based --lat_percentiles=1 \
        --output-format=json 2>>"$WORK/fio.log" |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; p=lambda d,q: round(d["lat_ns"]["percentile"][q]/1000,1); r,w=j["read"],j["write"]; print(round(r["iops"]), p(r,"50.000000"), p(r,"99.000000"), p(w,"50.000000"))'
}

fio_ceiling() { # image direct jobs size rw -> "iops mbps"
    fio --name=ceiling --filename="$1" --direct="$2" --numjobs="$3" --bs="$4" --rw="$5" \
        --iodepth=32 --ioengine=io_uring --ramp_time="$WARMUP" --runtime="$SECS" --time_based --group_reporting \
        --output-format=json 2>>"$WORK/fio.log" |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; d=j["read"] if j["read"]["io_bytes"] else j["write"]; print(round(d["iops"]), round(d["bw_bytes"]/1e6,1))'
}

# The block device's counters file under an image, or nothing (tmpfs).
disk_stat_of() {
    local dev
    dev="$(stat -c '%Hd:%Ld' "$1")"
    if [[ -r "/sys/dev/block/$dev/stat" ]]; then echo "/sys/dev/block/$dev/stat"; fi
}

disk_counters() { # stat-file -> "requests done, ms they spent queued, sectors" (reads and writes)
    if [[ -n "$1" ]]; then awk '{printf "%.0f %.0f %.0f\n", $1 + $5, $4 + $8, $3 + $7}' "$1"; else echo "0 0 0"; fi
}

ran() { # command... -> its output; a failure names the command and shows the logs
    local out
    if ! out="$("$@")"; then
        echo "bench-blk: '$*' failed; the logs:" >&2
        tail -n 20 "$WORK"/*.log >&2 || true
        return 1
    fi
    echo "$out"
}

measured() { # stat-file command... -> "iops mbps requests-in-queue KiB-per-request" ("-" without a disk)
    local stat_file="$1" before out after
    shift
    before="$(disk_counters "$stat_file")"
    out="$(ran "$@")"
    after="$(disk_counters "$stat_file")"
    python3 - "$out" "$before" "$after" "$*" <<'PY'
import sys
iops, mbps = sys.argv[1].split()
if float(iops) <= 0:
    sys.exit(f"bench-blk: '{sys.argv[4]}' completed nothing (0 IOPS)")
(n0, t0, s0), (n1, t1, s1) = (map(int, a.split()) for a in sys.argv[2:4])
in_queue = f"{float(iops) * (t1 - t0) / 1000 / (n1 - n0):.1f}" if n1 > n0 else "-"
kib = f"{(s1 - s0) / 2 / (n1 - n0):.0f}" if n1 > n0 else "-"
print(iops, mbps, in_queue, kib)
PY
}

# One line per run: label|kind|round|iops mbps requests-in-queue.
RESULTS="$WORK/results"
run_case() { # label image direct queues size pattern op fio_rw frontend-poll-us
    local label="$1" image="$2" direct="$3" queues="$4" size="$5" pattern="$6" op="$7" rw="$8" poll="$9"
    local sock="$WORK/b.sock" ours qsd ceil round stat_file
    stat_file="$(disk_stat_of "$image")"
    for round in $(seq "$ROUNDS"); do
        start_backend vhost-blk "$image" "$direct" "$queues" "$sock"
        ours="$(measured "$stat_file" loadgen "$sock" "$queues" "$size" "$pattern" "$op" "$poll")"
        stop_backend
        start_backend qsd "$image" "$direct" "$queues" "$sock"
        qsd="$(measured "$stat_file" loadgen "$sock" "$queues" "$size" "$pattern" "$op" "$poll")"
        stop_backend
        ceil="$(measured "$stat_file" fio_ceiling "$image" "$direct" "$queues" "$size" "$rw")"
        printf '%s|vhost-blk|%s|%s\n%s|qsd|%s|%s\n%s|fio|%s|%s\n' \
            "$label" "$round" "$ours" "$label" "$round" "$qsd" "$label" "$round" "$ceil" >>"$RESULTS"
        echo "bench-blk: round $round/$ROUNDS: $label: vhost-blk $ours, qsd $qsd, fio $ceil (IOPS MB/s in-queue KiB/request)" >&2
    done
}

# One line per run: kind|round|read-IOPS read-p50 read-p99 write-p50.
MIXED="$WORK/mixed"
mixed_case() { # image
    local image="$1" sock="$WORK/b.sock" ours qsd ceil round
    for round in $(seq "$ROUNDS"); do
        start_backend vhost-blk "$image" 1 1 "$sock"
        ours="$(ran loadgen_mixed "$sock")"
        stop_backend
        start_backend qsd "$image" 1 1 "$sock"
        qsd="$(ran loadgen_mixed "$sock")"
        stop_backend
        ceil="$(ran fio_mixed "$image")"
        printf 'vhost-blk|%s|%s\nqsd|%s|%s\nfio|%s|%s\n' "$round" "$ours" "$round" "$qsd" "$round" "$ceil" >>"$MIXED"
        echo "bench-blk: round $round/$ROUNDS: disk 4k randread + 64k randwrite: vhost-blk $ours, qsd $qsd, fio $ceil (read IOPS, read p50 p99, write p50 us)" >&2
    done
}

for medium in tmpfs disk; do
    if [[ "$medium" == tmpfs ]]; then image="$SHM/disk.img"; direct=0; else image="$WORK/disk.img"; direct=1; fi
    echo "bench-blk: preparing a $SIZE image on $medium" >&2
    # Written through before the first run, so no write-back competes with it.
    dd if=/dev/urandom of="$image" bs=1M count=1024 conv=fsync status=none
    run_case "$medium 4k randread q1"      "$image" "$direct" 1 4k  rand read  randread 0
    run_case "$medium 4k randread q1 poll" "$image" "$direct" 1 4k  rand read  randread 10
    run_case "$medium 4k randread q2"      "$image" "$direct" 2 4k  rand read  randread 0
    run_case "$medium 4k randread q2 poll" "$image" "$direct" 2 4k  rand read  randread 10
    run_case "$medium 64k seqread q1"      "$image" "$direct" 1 64k seq  read  read     0
    run_case "$medium 64k seqwrite q1"     "$image" "$direct" 1 64k seq  write write    0
    if [[ "$medium" == disk ]]; then mixed_case "$image"; fi
    rm -f "$image"
done

python3 - "$RESULTS" "$PAGES" "$MIXED" <<'PY'
import statistics, sys
runs, labels = {}, []
for line in open(sys.argv[1]):
    label, kind, rnd, figures = line.strip().split("|")
    iops, mbps, in_queue, kib = figures.split()
    if label not in labels:
        labels.append(label)
    in_queue = None if in_queue == "-" else float(in_queue)
    kib = None if kib == "-" else float(kib)
    runs.setdefault((label, kind), {})[rnd] = (float(iops), float(mbps), in_queue, kib)
rounds = len(runs[(labels[0], "fio")])
print()
pages = "2 MiB huge pages" if sys.argv[2] == "2m" else "4 KiB pages (a memfd)"
print(f"{rounds} rounds; the load generator's memory on {pages}; medians, and the lowest and highest ratio of a round")
print(f"{'workload':29s} {'vhost-blk IOPS':>14s} {'qsd IOPS':>10s} {'fio IOPS':>10s} {'vs qsd':>7s} {'range':>12s} {'vs fio':>7s} {'range':>12s} {'fio vs qsd':>10s} {'vhost-blk MB/s':>15s}")
for label in labels:
    ours, qsd, fio = (runs[(label, k)] for k in ("vhost-blk", "qsd", "fio"))
    med = lambda r, i=0: statistics.median(v[i] for v in r.values())
    vs_qsd = [ours[r][0] / qsd[r][0] for r in ours]
    vs_fio = [ours[r][0] / fio[r][0] for r in ours]
    print(f"{label:29s} {med(ours):14.0f} {med(qsd):10.0f} {med(fio):10.0f} "
          f"{med(ours) / med(qsd):6.2f}x {min(vs_qsd):5.2f}-{max(vs_qsd):.2f}x "
          f"{med(ours) / med(fio):6.2f}x {min(vs_fio):5.2f}-{max(vs_fio):.2f}x "
          f"{med(fio) / med(qsd):9.2f}x {med(ours, 1):15.1f}")
on_disk = [l for l in labels if all(v[2] is not None for k in ("vhost-blk", "qsd", "fio") for v in runs[(l, k)].values())]
if on_disk:
    print()
    print("requests in the disk's queue, mean over a run (IOPS x the block layer's latency; the load keeps 32 per queue in flight),")
    print("and KiB per request the disk saw")
    print(f"{'workload':29s} {'vhost-blk':>10s} {'qsd':>10s} {'fio':>10s} {'vs qsd':>7s} {'vs fio':>7s} {'KiB: vhost-blk':>15s} {'qsd':>6s} {'fio':>6s}")
    for label in on_disk:
        ours, qsd, fio = (statistics.median(v[2] for v in runs[(label, k)].values()) for k in ("vhost-blk", "qsd", "fio"))
        kib = [statistics.median(v[3] for v in runs[(label, k)].values()) for k in ("vhost-blk", "qsd", "fio")]
        print(f"{label:29s} {ours:10.1f} {qsd:10.1f} {fio:10.1f} {ours / qsd:6.2f}x {ours / fio:6.2f}x "
              f"{kib[0]:15.0f} {kib[1]:6.0f} {kib[2]:6.0f}")
mixed = {}
for line in open(sys.argv[3]):
    kind, rnd, figures = line.strip().split("|")
    mixed.setdefault(kind, []).append([float(f) for f in figures.split()])
print()
print("disk: 4k random reads taking turns with 64k random writes, 1 queue, 32 in flight (fio: randrw, half reads); medians")
print(f"{'tool':10s} {'read IOPS':>10s} {'read p50 us':>12s} {'read p99 us':>12s} {'write p50 us':>13s}")
for kind in ("vhost-blk", "qsd", "fio"):
    med = [statistics.median(r[i] for r in mixed[kind]) for i in range(4)]
    print(f"{kind:10s} {med[0]:10.0f} {med[1]:12.1f} {med[2]:12.1f} {med[3]:13.1f}")
PY
