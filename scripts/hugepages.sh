#!/usr/bin/env bash
# Makes sure PAGES 2 MiB huge pages are free (guest memory with
# `--memory size=...,hugepages=on`, `vhost-loadgen --hugepages`), adding what
# is missing to the 2 MiB pool. Prints how many pages it added, for
# `hugepages.sh --release ADDED` to take back out of the pool later (other
# users' pages stay). Needs root to change the pool.
#   scripts/hugepages.sh PAGES
#   scripts/hugepages.sh --release ADDED
set -euo pipefail
POOL=/sys/kernel/mm/hugepages/hugepages-2048kB
if [[ ! -d "$POOL" ]]; then
    echo "hugepages.sh: this kernel has no 2 MiB huge pages ($POOL)" >&2
    exit 1
fi
count() { # text -> the decimal count, or an error naming it
    [[ "$1" =~ ^[0-9]{1,7}$ ]] || { echo "hugepages.sh: ${1:-(nothing)}: not a page count" >&2; exit 1; }
    echo $((10#$1))
}
set_pool() {
    if ! { echo "$1" >"$POOL/nr_hugepages"; } 2>/dev/null; then
        echo "hugepages.sh: cannot write $POOL/nr_hugepages (not root?)" >&2
        exit 1
    fi
}
if [[ "${1:-}" == --release ]]; then
    added="$(count "${2:-}")"
    if (( added > 0 )); then
        total="$(cat "$POOL/nr_hugepages")"
        set_pool $(( total > added ? total - added : 0 ))
    fi
    exit 0
fi
want="$(count "${1:-}")"
total="$(cat "$POOL/nr_hugepages")"
free=$(( $(cat "$POOL/free_hugepages") - $(cat "$POOL/resv_hugepages") ))
if (( free >= want )); then
    echo 0
    exit 0
fi
set_pool $(( total + want - free ))
added=$(( $(cat "$POOL/nr_hugepages") - total ))
free=$(( $(cat "$POOL/free_hugepages") - $(cat "$POOL/resv_hugepages") ))
if (( free < want )); then
    set_pool "$total"
    echo "hugepages.sh: the kernel found only $free free 2 MiB pages of the $want asked for" >&2
    exit 1
fi
echo "$added"
