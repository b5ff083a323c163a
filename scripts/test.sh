#!/usr/bin/env bash
# Runs the whole test suite: builds the test guest, fetches the Linux kernel
# for the early-boot check, builds the workspace, checks formatting and
# clippy, then runs every unit and integration test (the integration tests
# boot real guests on /dev/kvm and fail without it), and finally the
# README's demo, checking what its guest reports.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

step() { echo; echo "=== $*"; }

step "install what is missing (Debian packages, rustfmt, clippy)"
scripts/install-deps.sh
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "test.sh: /dev/kvm is not usable: the KVM tests will fail" >&2
fi

step "reserve 2 MiB huge pages for the tests of guest memory on them"
# Given back at exit.
hugepages_added="$(scripts/hugepages.sh 64)"
demo_out=""
cleanup() {
    scripts/hugepages.sh --release "$hugepages_added" || true
    if [[ -n "$demo_out" ]]; then rm -f "$demo_out"; fi
}
trap cleanup EXIT

step "build the test guest"
scripts/build-guest.sh
step "fetch the Linux kernel for the early-boot check"
scripts/fetch-linux.sh
step "build the workspace"
cargo build --workspace --all-targets
step "rustfmt"
cargo fmt --all --check
cargo fmt --manifest-path tests/guest/Cargo.toml --check
step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo --config tests/guest/.cargo/config.toml clippy --release \
    --manifest-path tests/guest/Cargo.toml --target-dir target/guest-build -- -D warnings
step "tests"
cargo test --workspace
step "the README's demo (scripts/demo.sh)"
# The main command README.md gives: it must boot the guest with its
# vhost-user disk and NIC, and the guest's own checks must pass.
demo_out="$(mktemp)"
scripts/demo.sh >"$demo_out"
for line in "blk 00:01.0 write-read ok" "net ping 192.0.2.1 3/3 replies" "poweroff"; do
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
