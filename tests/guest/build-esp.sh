#!/usr/bin/env bash
# Builds a UEFI-bootable disk image of the test guest (tests/guest/build.sh) for kvmagent's
# UEFI host tests: one FAT file system over the whole disk (an EFI system "superfloppy", which
# OVMF boots like any removable medium) holding
#   EFI/BOOT/BOOTX64.EFI     Debian's signed shim (Microsoft-signed: boots under Secure Boot)
#   EFI/BOOT/grubx64.efi     Debian's signed GRUB (shim loads it from beside itself)
#   EFI/debian/grub.cfg      where the signed GRUB's built-in prefix looks (EFI/BOOT/grub.cfg too)
#   vmlinuz, initrd.img      the test guest; the Debian kernel is signed, so shim lets GRUB boot it
# GRUB boots the guest with "console=ttyS0 quiet panic=-1 kvmagent.offsets=0
# kvmagent.efivar=KvmagentTest": it writes an EFI variable and prints KVMAGENT-EFIVAR (see init).
#
# Usage: tests/guest/build-esp.sh [GUESTDIR] [OUT]
#   GUESTDIR default /var/cache/kvmagent/test-guest (built by build.sh), OUT default
#   GUESTDIR/esp.raw. Cached: exits at once if OUT's stamp matches this script and the guest.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUESTDIR=${1:-/var/cache/kvmagent/test-guest}
OUT=${2:-$GUESTDIR/esp.raw}
SHIM=${KVMAGENT_SHIM:-/usr/lib/shim/shimx64.efi.signed}
GRUB=${KVMAGENT_GRUB:-/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed}
CMDLINE="console=ttyS0 quiet panic=-1 kvmagent.offsets=0 kvmagent.efivar=KvmagentTest"
SIZE_MIB=64

die() { echo "build-esp.sh: $*" >&2; exit 1; }
for bin in mformat mmd mcopy sha256sum flock truncate; do
    command -v "$bin" >/dev/null || die "$bin not found (install mtools, coreutils, util-linux)"
done
for f in "$SHIM" "$GRUB" "$GUESTDIR/vmlinuz" "$GUESTDIR/initrd.img"; do
    [ -s "$f" ] || die "$f missing (shim-signed, grub-efi-amd64-signed, tests/guest/build.sh)"
done

version=$(cat "$here/build-esp.sh" "$GUESTDIR/stamp" "$SHIM" "$GRUB" | sha256sum | cut -c1-16)
exec 9>"$OUT.lock"
flock -w 900 9 || die "timed out waiting for the lock on $OUT.lock"
if [ -s "$OUT" ] && [ "$(cat "$OUT.stamp" 2>/dev/null)" = "version=$version" ]; then
    echo "build-esp.sh: $OUT is up to date (version $version)"
    exit 0
fi

tmp=$(mktemp -d /var/tmp/kvmagent-esp.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/grub.cfg" <<CFG
set timeout=0
set default=0
menuentry "kvmagent test guest" {
    linux /vmlinuz $CMDLINE
    initrd /initrd.img
}
CFG
img=$tmp/esp.raw
truncate -s "${SIZE_MIB}M" "$img"
mformat -i "$img" -F -v KVMAGENTESP ::
mmd -i "$img" ::/EFI ::/EFI/BOOT ::/EFI/debian
mcopy -i "$img" "$SHIM" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$img" "$GRUB" ::/EFI/BOOT/grubx64.efi
mcopy -i "$img" "$tmp/grub.cfg" ::/EFI/debian/grub.cfg
mcopy -i "$img" "$tmp/grub.cfg" ::/EFI/BOOT/grub.cfg
mcopy -i "$img" "$GUESTDIR/vmlinuz" ::/vmlinuz
mcopy -i "$img" "$GUESTDIR/initrd.img" ::/initrd.img

rm -f "$OUT.stamp"
cp "$img" "$OUT.new" && mv -f "$OUT.new" "$OUT"
echo "version=$version" >"$OUT.stamp"
echo "build-esp.sh: built $OUT (${SIZE_MIB} MiB FAT, shim + GRUB + guest)"
