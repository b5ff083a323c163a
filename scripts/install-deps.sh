#!/usr/bin/env bash
# Installs what the build and the tests need on a Debian 12 machine with
# rustup's Rust: Debian packages (iasl, lz4, QEMU, qemu-storage-daemon,
# DPDK's testpmd, iproute2 for taps and bridges, ...) and the
# rustfmt/clippy components. Does nothing that is already there.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

packages=(acpica-tools lz4 binutils time qemu-system-x86 qemu-system-common dpdk-dev iproute2)
need=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "install-deps: installing ${need[*]}" >&2
    SUDO=""
    [[ $(id -u) -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
