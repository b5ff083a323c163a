#!/usr/bin/env bash
# Pairs a VM with OVS-DPDK: starts a private Open vSwitch (its own database
# and ovs-vswitchd with DPDK, inside a network namespace made for it), a
# userspace (netdev) bridge with a dpdkvhostuserclient port, boots the vmm
# with server=on on that port's socket (OVS connects and reconnects to it),
# and tears everything down when the VM exits. The bridge's internal port
# gets the host address, so the test guest's ping crosses OVS.
#
# Usage: scripts/vm-ovs.sh [--host-ip CIDR] [--kernel PATH] [--cmdline TEXT]
#                          [-- VMM-ARGS...]
#   --host-ip CIDR  address of the bridge's internal port (default 192.0.2.1/24)
#   --kernel PATH   guest kernel (default: the test guest, which pings
#                   192.0.2.1 from 192.0.2.2)
#   --cmdline TEXT  guest command line
#
# OVS-DPDK settings for machines without hugepages (CI, containers):
#   other_config:dpdk-init=true
#   other_config:dpdk-extra="--no-huge --legacy-mem -m 1024 --no-pci --file-prefix=..."
# (--legacy-mem: without hugepages DPDK's dynamic memory mode does not start
# here). Needs the Debian package openvswitch-switch-dpdk (its
# ovs-vswitchd-dpdk binary is used directly; no system service is touched).
set -euo pipefail
# The OVS daemons live in /usr/sbin, which a user's PATH kept under sudo lacks.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HOST_IP="192.0.2.1/24"
KERNEL="$ROOT/target/guest/testguest.elf"
CMDLINE="ip=192.0.2.2 ping=192.0.2.1"
VMM_ARGS=()
while (($#)); do
    case "$1" in
        --netns|--host-ip|--kernel|--cmdline)
            [[ $# -ge 2 ]] || { echo "vm-ovs: $1 needs a value" >&2; exit 2; } ;;
    esac
    case "$1" in
        --host-ip) HOST_IP="$2"; shift ;;
        --kernel) KERNEL="$2"; shift ;;
        --cmdline) CMDLINE="$2"; shift ;;
        --) shift; VMM_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm-ovs: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
VSWITCHD=/usr/lib/openvswitch-switch-dpdk/ovs-vswitchd-dpdk
for tool in ovsdb-server ovsdb-tool ovs-vsctl "$VSWITCHD"; do
    command -v "$tool" >/dev/null || { echo "vm-ovs: $tool is missing (apt-get install openvswitch-switch-dpdk)" >&2; exit 1; }
done
VMM="${VMM_BIN:-$ROOT/target/release/vmm}"
[[ -x "$VMM" ]] || { echo "vm-ovs: $VMM is missing: cargo build --release -p vmm (or set VMM_BIN)" >&2; exit 1; }
[[ -f "$KERNEL" ]] || { echo "vm-ovs: kernel $KERNEL is missing (scripts/build-guest.sh)" >&2; exit 1; }

# The socket's path goes into option lists split at commas.
case "${TMPDIR:-/tmp}" in
    *,*) echo "vm-ovs: TMPDIR '$TMPDIR' has a comma, which would split the socket's path in the options" >&2; exit 1 ;;
esac
WORK="$(mktemp -d)"
NETNS="vmmovs$$"
PREFIX="vmovs$$"
DB="unix:$WORK/db.sock"
VM=""
export OVS_RUNDIR="$WORK" OVS_LOGDIR="$WORK" OVS_DBDIR="$WORK"
cleanup() {
    # A second Ctrl-C (or TERM, HUP) must not cut the cleanup short.
    trap '' INT TERM HUP
    set +e
    if [[ -n "$VM" ]]; then
        kill "$VM" 2>/dev/null
        wait "$VM" 2>/dev/null
    fi
    # A daemon that crashed leaves its pidfile, and its pid may since be
    # another process's: only a process started with that pidfile is
    # signalled.
    local daemons=() pidfile pid cmdline
    for pidfile in "$WORK/vswitchd.pid" "$WORK/ovsdb.pid"; do
        [[ -f "$pidfile" ]] || continue
        pid="$(cat "$pidfile")"
        cmdline="$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline")"
        [[ " $cmdline" == *" --pidfile=$pidfile "* ]] || continue
        kill "$pid" 2>/dev/null
        daemons+=("$pid")
    done
    for pid in "${daemons[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "vm-ovs: $(cat "/proc/$pid/comm" 2>/dev/null) (pid $pid) did not stop in 5 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    done
    ip netns del "$NETNS" 2>/dev/null
    rm -rf "$WORK" "/var/run/dpdk/$PREFIX"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

ip netns add "$NETNS"
ip -n "$NETNS" link set lo up
ovsdb-tool create "$WORK/conf.db" /usr/share/openvswitch/vswitch.ovsschema
ovsdb-server -vconsole:off --remote="punix:$WORK/db.sock" --unixctl="$WORK/ovsdb.ctl" \
    --pidfile="$WORK/ovsdb.pid" --detach --log-file="$WORK/ovsdb.log" "$WORK/conf.db"
ovs-vsctl --db="$DB" --no-wait init
ovs-vsctl --db="$DB" --no-wait set Open_vSwitch . other_config:dpdk-init=true \
    other_config:dpdk-extra="--no-huge --legacy-mem -m 1024 --no-pci --file-prefix=$PREFIX"
ip netns exec "$NETNS" "$VSWITCHD" "$DB" -vconsole:off --unixctl="$WORK/vswitchd.ctl" \
    --pidfile="$WORK/vswitchd.pid" --detach --log-file="$WORK/vswitchd.log"
SOCK="$WORK/vm.sock"
ovs-vsctl --db="$DB" --timeout=30 add-br br0 -- set bridge br0 datapath_type=netdev
ovs-vsctl --db="$DB" --timeout=30 add-port br0 vhu0 -- set Interface vhu0 \
    type=dpdkvhostuserclient options:vhost-server-path="$SOCK"
ip -n "$NETNS" addr add "$HOST_IP" dev br0
ip -n "$NETNS" link set br0 up
echo "vm-ovs: OVS-DPDK bridge br0 ($HOST_IP, netns $NETNS) with port vhu0 on $SOCK" >&2

"$VMM" --kernel "$KERNEL" --cmdline "$CMDLINE" --memory 256M \
    --net "socket=$SOCK,server=on" "${VMM_ARGS[@]}" <&0 &
VM=$!
# OVS dials the VMM's socket: give it 30 s, while both live.
connected=0
for _ in $(seq 600); do
    # Not grep -q: it would leave ss writing to a closed pipe, and pipefail
    # would read that as no match.
    if ss -xH state established 2>/dev/null | grep -F -- "$SOCK" >/dev/null; then connected=1; break; fi
    kill -0 "$VM" 2>/dev/null || break
    if ! kill -0 "$(cat "$WORK/vswitchd.pid" 2>/dev/null)" 2>/dev/null; then
        echo "vm-ovs: ovs-vswitchd exited before it connected to $SOCK; its log:" >&2
        tail -n 20 "$WORK/vswitchd.log" >&2 2>/dev/null
        exit 1
    fi
    sleep 0.05
done
if ((!connected)) && kill -0 "$VM" 2>/dev/null; then
    echo "vm-ovs: OVS did not connect to $SOCK within 30 s; ovs-vswitchd's log:" >&2
    tail -n 20 "$WORK/vswitchd.log" >&2 2>/dev/null
    exit 1
fi
status=0
wait "$VM" || status=$?
VM=""
echo "vm-ovs: the VM exited with status $status" >&2
exit "$status"
