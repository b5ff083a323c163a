#!/usr/bin/env bash
# Runs the whole test suite: builds the test guest, fetches the Linux kernel
# for the early-boot check, builds the workspace, checks formatting and
# clippy, then runs every unit and integration test (the integration tests
# boot real guests on /dev/kvm and fail without it).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

step() { echo; echo "=== $*"; }

step "install what is missing (Debian packages, rustfmt, clippy)"
scripts/install-deps.sh
if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
    echo "test.sh: /dev/kvm is not usable: the KVM tests will fail" >&2
fi

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
step "tests"
cargo test --workspace
