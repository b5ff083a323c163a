#!/usr/bin/env bash
# Installs what the build and the tests need on a Debian 12 machine with
# rustup's Rust: Debian packages (iasl, lz4, QEMU, qemu-storage-daemon,
# DPDK's testpmd, fio for the disk benchmark's ceiling, iproute2 for taps
# and bridges, losetup, socat, ...), the
# rustfmt/clippy components, and a Python venv in target/qmp-venv with
# QEMU's qemu.qmp client library (from PyPI) for the QMP tests. Does
# nothing that is already there.
# With --demo, only what scripts/demo.sh needs besides Rust: iproute2 for
# its tap and namespace, python3 for scripts/launch.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

demo_only=0
case "${1:-}" in
    "") ;;
    --demo) demo_only=1 ;;
    *) echo "install-deps: unknown argument '$1' (only --demo)" >&2; exit 2 ;;
esac
if ((demo_only)); then
    # By command: a machine may have them without dpkg knowing.
    packages=()
    command -v ip >/dev/null || packages+=(iproute2)
    command -v python3 >/dev/null || packages+=(python3)
    if ((${#packages[@]} == 0)); then
        exit 0
    fi
else
    packages=(acpica-tools lz4 binutils time qemu-system-x86 qemu-system-common dpdk-dev fio iproute2
              socat python3 python3-venv openvswitch-switch-dpdk mount)
fi
need=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    echo "install-deps: installing ${need[*]}" >&2
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
        command -v sudo >/dev/null || { echo "install-deps: installing ${need[*]} needs root, and there is no sudo: run it as root" >&2; exit 1; }
        SUDO="sudo"
    fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if ((demo_only)); then
    exit 0
fi
for component in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/qmp-venv"
if ! "$venv/bin/python3" -c "import qemu.qmp" 2>/dev/null; then
    echo "install-deps: creating $venv with qemu.qmp" >&2
    rm -rf "$venv"
    mkdir -p "$root/target"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check qemu.qmp
fi
