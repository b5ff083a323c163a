#!/usr/bin/env bash
# Builds everything and boots the demo VM: the project's test guest with
# 2 vCPUs and 512 MiB on our vmm, console on this terminal. The guest
# reports what it found (CPUs, memory, ACPI tables) and powers off.
# With --interactive it waits for lines to echo back; type "poweroff" to
# end it (Ctrl-A x quits the VMM at any time).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CMDLINE="demo"
if [[ "${1:-}" == "--interactive" ]]; then
    CMDLINE="demo echo"
fi
echo "demo: building the vmm and the test guest" >&2
(cd "$ROOT" && cargo build --release -p vmm)
"$ROOT/scripts/build-guest.sh" >/dev/null
echo "demo: booting target/guest/testguest.elf" >&2
exec "$ROOT/target/release/vmm" --kernel "$ROOT/target/guest/testguest.elf" \
    --cpus 2 --memory 512M --cmdline "$CMDLINE" --serial stdio
