#!/usr/bin/env bash
# Runs the whole test suite: builds the test guest, fetches the Linux kernel
# for the early-boot check, builds the workspace, checks formatting and
# clippy, then runs every unit and integration test (the integration tests
# boot real guests on /dev/kvm and fail without it), builds the release
# binaries, runs the README's demo, checking what its guest reports, and
# last each benchmark script for one short round, checking that it prints
# every row of its table (not how fast: figures are for the benchmarks
# themselves). Each stage after the dependency install has a time limit.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

step() { echo; echo "=== $* (at ${SECONDS} s)"; }
# Runs one stage's command under a time limit, so a stage that hangs fails
# naming itself rather than at CI's overall limit. timeout(1) runs it in a
# process group of its own and signals the whole group (test binaries, the
# VMs and backends they started), killing it 30 s later if it is still
# there. Being in its own group, the stage misses a Ctrl-C or a signal to
# this script's group: `on_signal` hands those on. Stdin is /dev/null: from
# a terminal the stage is not in the foreground group.
stage_pid=""
limited() { # seconds command...
    local limit=$1 rc=0
    shift
    timeout --kill-after=30 "$limit" "$@" </dev/null &
    stage_pid=$!
    wait "$stage_pid" || rc=$?
    stage_pid=""
    if ((rc == 124)); then
        echo "test.sh: \"$*\" ran past its limit of $limit s and was stopped" >&2
    elif ((rc == 137)); then
        echo "test.sh: \"$*\" was killed (past its limit of $limit s, or by SIGKILL)" >&2
    fi
    return "$rc"
}
on_signal() { # exit-status
    trap - INT TERM HUP
    if [[ -n "$stage_pid" ]]; then
        # timeout passes the signal on to the stage's group.
        kill -TERM "$stage_pid" 2>/dev/null || true
        wait "$stage_pid" 2>/dev/null || true
    fi
    exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'on_signal 129' HUP

step "install what is missing (Debian packages, rustfmt, clippy)"
# Not limited: as a user, it may ask for sudo's password on the terminal.
scripts/install-deps.sh
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "test.sh: /dev/kvm is not usable: the KVM tests will fail" >&2
fi

step "reserve 2 MiB huge pages for the tests of guest memory on them"
# Given back at exit.
hugepages_added="$(scripts/hugepages.sh 64)"
demo_out=""
bench_out=""
cleanup() {
    scripts/hugepages.sh --release "$hugepages_added" || true
    if [[ -n "$demo_out" ]]; then rm -f "$demo_out"; fi
    if [[ -n "$bench_out" ]]; then rm -f "$bench_out"; fi
}
trap cleanup EXIT

step "build the test guest"
limited 900 scripts/build-guest.sh
step "fetch the Linux kernel for the early-boot check"
limited 600 scripts/fetch-linux.sh
step "build the workspace"
limited 2400 cargo build --workspace --all-targets
step "rustfmt"
limited 300 cargo fmt --all --check
limited 300 cargo fmt --manifest-path tests/guest/Cargo.toml --check
step "clippy"
limited 1800 cargo clippy --workspace --all-targets -- -D warnings
limited 900 cargo --config tests/guest/.cargo/config.toml clippy --release \
    --manifest-path tests/guest/Cargo.toml --target-dir target/guest-build -- -D warnings
step "tests"
limited 2400 cargo test --workspace
step "build the release binaries (the demo and the benchmarks run them)"
limited 2400 cargo build --release -p vmm -p vhost-blk -p vhost-net -p vhost-test-frontend
step "the README's demo (scripts/demo.sh)"
# The main command README.md gives: it must boot the guest with its
# vhost-user disk and NIC, and the guest's own checks must pass.
demo_out="$(mktemp)"
if ! limited 600 scripts/demo.sh >"$demo_out"; then
    echo "test.sh: the demo failed; its console:" >&2
    cat "$demo_out" >&2
    exit 1
fi
for line in "blk 00:01.0 write-read ok on queue 0" "net ping 192.0.2.1 3/3 replies" "poweroff"; do
    if ! grep -qx "testguest: $line" "$demo_out"; then
        echo "test.sh: the demo's guest did not report \"$line\":" >&2
        cat "$demo_out" >&2
        exit 1
    fi
done
if grep -q "testguest: FAIL" "$demo_out"; then
    echo "test.sh: the demo's guest reported a failure:" >&2
    cat "$demo_out" >&2
    exit 1
fi
echo "test.sh: the demo booted and its guest's checks passed"

step "the benchmarks, one round of 1 s runs (that they work, not how fast)"
# Each row must be there, and every figure in it (IOPS, ratios, times) must
# be more than zero.
expect_rows() { # script-output row-label...
    if ! python3 - "$@" <<'PY'; then
import re, sys
lines = open(sys.argv[1]).read().splitlines()
for label in sys.argv[2:]:
    # The label, then figures: "disk 4k randread q1" is not found in
    # "disk 4k randread q1 poll ...".
    rows = [line[len(label):] for line in lines
            if line.startswith(label + " ") and re.match(r"\s+\d", line[len(label):])]
    if not rows:
        sys.exit(f'test.sh: no row "{label}" in the benchmark\'s table')
    for row in rows:
        figures = [float(f) for f in re.findall(r"\d+(?:\.\d+)?", row)]
        if not figures or min(figures) == 0:
            sys.exit(f'test.sh: row "{label}" lacks a figure: {row.strip()}')
PY
        cat "$1" >&2
        exit 1
    fi
}
bench_out="$(mktemp)"
limited 900 scripts/bench-blk.sh 1 1 >"$bench_out"
expect_rows "$bench_out" \
    "tmpfs 4k randread q1" "tmpfs 4k randread q1 poll" "tmpfs 4k randread q2" "tmpfs 4k randread q2 poll" \
    "tmpfs 64k seqread q1" "tmpfs 64k seqwrite q1" \
    "disk 4k randread q1" "disk 4k randread q1 poll" "disk 4k randread q2" "disk 4k randread q2 poll" \
    "disk 64k seqread q1" "disk 64k seqwrite q1" \
    "vhost-blk" "qsd" "fio"
limited 600 scripts/bench-net.sh 1 1 >"$bench_out"
expect_rows "$bench_out" "tx 64B" "tx 1500B" "rx 64B" "rx 1500B"
limited 600 scripts/bench-boot.sh 1 >"$bench_out"
expect_rows "$bench_out" "first serial byte" "exit after poweroff" "peak RSS"
echo "test.sh: the benchmarks ran and printed every row"
