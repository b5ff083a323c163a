#!/usr/bin/env bash
# Fetches Debian's linux-image-cloud-amd64 kernel WITHOUT installing it:
# downloads the versioned package the meta-package depends on, unpacks it,
# and produces
#   target/linux/bzImage   the distribution's /boot/vmlinuz-*
#   target/linux/vmlinux   the ELF inside the bzImage's LZ4 payload (it has
#                          a PVH entry note, so the vmm boots it through PVH)
#   target/linux/VERSION   the package version
# Idempotent: does nothing when the outputs exist.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$ROOT/target/linux"
CACHE="$ROOT/target/linux-cache"

if [[ -s "$OUT/bzImage" && -s "$OUT/vmlinux" && -s "$OUT/VERSION" ]]; then
    echo "fetch-linux: $OUT already has $(cat "$OUT/VERSION")" >&2
    exit 0
fi
for tool in apt-get apt-cache dpkg-deb lz4 readelf; do
    command -v "$tool" >/dev/null || { echo "fetch-linux: $tool is missing (apt-get install lz4 binutils)" >&2; exit 1; }
done

resolve() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
PKG="$(resolve)"
if [[ -z "$PKG" ]]; then
    echo "fetch-linux: updating the package lists" >&2
    apt-get update -qq
    PKG="$(resolve)"
fi
[[ -n "$PKG" ]] || { echo "fetch-linux: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }

mkdir -p "$CACHE" "$OUT"
echo "fetch-linux: downloading $PKG" >&2
if ! (cd "$CACHE" && apt-get download -q "$PKG" >&2); then
    # Old package lists name a version the mirror has dropped since.
    echo "fetch-linux: updating the package lists and trying again" >&2
    apt-get update -qq
    PKG="$(resolve)"
    [[ -n "$PKG" ]] || { echo "fetch-linux: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
    (cd "$CACHE" && apt-get download -q "$PKG" >&2)
fi
DEB="$(ls -t "$CACHE"/"$PKG"_*.deb | head -1)"
rm -rf "$CACHE/root"
dpkg-deb -x "$DEB" "$CACHE/root"
VMLINUZ="$(ls "$CACHE"/root/boot/vmlinuz-* | head -1)"

TMP="$(mktemp -d "$OUT/.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
cp "$VMLINUZ" "$TMP/bzImage"

# The compressed payload is a legacy LZ4 frame (magic 02 21 4c 18). lz4
# stops at the end of the frame and ignores the trailing bytes (it warns).
OFFSET="$(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$TMP/bzImage" | head -1 | cut -d: -f1)"
[[ -n "$OFFSET" ]] || { echo "fetch-linux: no LZ4 payload in $VMLINUZ" >&2; exit 1; }
tail -c +"$((OFFSET + 1))" "$TMP/bzImage" | lz4 -dc 2>/dev/null > "$TMP/vmlinux" || true
if ! readelf -h "$TMP/vmlinux" >/dev/null 2>&1; then
    echo "fetch-linux: the payload at offset $OFFSET is not an ELF" >&2
    exit 1
fi
if ! readelf -n "$TMP/vmlinux" | grep -q "Xen.*0x00000012\|PHYS32_ENTRY"; then
    echo "fetch-linux: vmlinux has no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note" >&2
    exit 1
fi
echo "$PKG $(dpkg-deb -f "$DEB" Version)" > "$TMP/VERSION"
mv "$TMP/bzImage" "$OUT/bzImage"
mv "$TMP/vmlinux" "$OUT/vmlinux"
mv "$TMP/VERSION" "$OUT/VERSION"
echo "fetch-linux: $OUT/{bzImage,vmlinux} from $(cat "$OUT/VERSION")" >&2
