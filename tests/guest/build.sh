#!/usr/bin/env bash
# Builds the tiny bootable test guest used by kvmagent's host integration tests: Debian 12's generic
# kernel (the cloud flavour has no AHCI, so no SATA disks) + a busybox initramfs whose /init (tests/guest/init) dumps bytes of every virtio disk to
# the serial port and powers off. Boots in a few seconds under TCG. Needs root, apt and dpkg;
# nothing is installed (the .debs are only unpacked).
#
# Usage: tests/guest/build.sh [OUTDIR]        (OUTDIR default /var/cache/kvmagent/test-guest)
#   Writes OUTDIR/vmlinuz, OUTDIR/initrd.img, OUTDIR/stamp (version=<hash of build.sh + init>,
#   kernel, busybox, cmdline). Cached: exits at once if the stamp matches this script version.
#   KVMAGENT_GUEST_KERNEL_PKG=linux-image-...-amd64 overrides the kernel package.
#
# Boot it with direct kernel boot, serial console logged to a file, and <on_poweroff>destroy
# </on_poweroff> (+ <on_reboot>destroy</on_reboot>: a failed power-off panics, panic=-1 reboots):
#   <os><type arch='x86_64' machine='pc'>hvm</type>      (q35 works too)
#     <kernel>OUTDIR/vmlinuz</kernel><initrd>OUTDIR/initrd.img</initrd>
#     <cmdline>console=ttyS0 quiet panic=-1 no_timer_check kvmagent.offsets=0,1048576</cmdline></os>
#   <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
#     <source file='/path/top.qcow2'/><target dev='vda' bus='virtio'/></disk>
#   <serial type='file'><source path='/path/serial.log'/><target port='0'/></serial>
# (also works with libvirt 9 + stdio_handler=file: <serial type='pty'><log file='/path/serial.log'
#  append='off'/><target port='0'/></serial> + <console type='pty'><target type='serial' port='0'/>)
# Cmdline parameters (see tests/guest/init): kvmagent.offsets=<byte offsets, comma-separated,
# default 0>, kvmagent.disks=<N to wait for>, kvmagent.wait=<max s, default 10>, kvmagent.debug=1,
# kvmagent.cidata=1 (print the cloud-init seed's hostname, see tests/guest/init),
# kvmagent.qga=1 (a guest agent responder; the guest stays up), kvmagent.sata=1 (load the AHCI
# driver: SATA disks show as sd*).
# kvmagent.efivar=<NAME> (UEFI: writes an EFI variable, prints KVMAGENT-SECUREBOOT and -EFIVAR).
#
# Serial output:
#   KVMAGENT-GUEST-BOOTED
#   KVMAGENT-TPM tpm0                        TPM devices the guest sees, or "none"
#   KVMAGENT-DISK vda 0 41414141...          <dev> <offset> <128 lowercase hex chars = 64 bytes>
#   KVMAGENT-DISK vda 1048576 0000...        one line per disk (vd* and sd*, sorted by name) and offset
#   KVMAGENT-GUEST-DONE                      then `poweroff -f`: the domain goes to shut off
# A short hex (or "-") means the read hit the end of the disk. virtio-scsi disks show as sdX.
# Lines end in \n; kernel messages (only emergencies and the final "reboot: Power down") in \r\n.
#
# How a test uses it: write a known pattern into the base image, e.g.
#   qemu-img create -f qcow2 base.qcow2 64M
#   qemu-io -f qcow2 -c 'write -P 0x41 0 64' -c 'write -P 0x42 1M 64' base.qcow2
#   qemu-img create -f qcow2 -F qcow2 -b base.qcow2 top.qcow2
# (or printf/dd bytes into a raw file and `qemu-img convert -O qcow2`), boot a domain on top.qcow2
# with kvmagent.offsets=0,1048576, wait (bounded, ~60 s under TCG) for KVMAGENT-GUEST-DONE in the
# serial log, and expect "KVMAGENT-DISK vda 0 " followed by "41" x 64 and
# "KVMAGENT-DISK vda 1048576 " followed by "42" x 64.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUTDIR=${1:-/var/cache/kvmagent/test-guest}
CMDLINE="console=ttyS0 quiet panic=-1 no_timer_check kvmagent.offsets=0"
# Modules needed to see virtio disks on pc/q35 (virtio-blk and virtio-scsi), with insmod
# parameters, and virtio_console for the guest agent's virtio-serial port (kvmagent.qga=1).
# Dependencies come from modules.dep; built-in ones are skipped.
# efivarfs: the init writes EFI variables (kvmagent.efivar) on UEFI boots.
WANT_MODULES=(virtio_pci virtio_blk "scsi_mod scan=sync" virtio_scsi sd_mod virtio_console efivarfs)
# cloud-init seed (kvmagent.cidata=1): the IDE CD-ROM of machine pc, ISO 9660. Listed apart
# (etc/kvmagent-cidata-modules) and loaded only on request: libata would turn IDE disks into sd*.
CIDATA_MODULES=(ata_piix sr_mod isofs)
# SATA disks (kvmagent.sata=1): AHCI, on q35 and pc (hence the generic kernel: the cloud one has
# no AHCI driver). Loaded only on request, as the CD-ROM modules, for the same reason.
SATA_MODULES=(ahci)

die() { echo "build.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (apt-get download, device nodes)"
for bin in apt-get apt-cache dpkg gzip sha256sum flock; do
    command -v "$bin" >/dev/null || die "$bin not found"
done
[ -f "$here/init" ] || die "$here/init missing"

version=$(cat "$here/build.sh" "$here/init" | sha256sum | cut -c1-16)
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
# Parallel test jobs may call this at the same time: one builds, the others wait and reuse it.
exec 9>"$OUTDIR/.lock"
flock -w 900 9 || die "timed out waiting for the lock on $OUTDIR/.lock"
if [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.img" ] &&
    [ "$(head -n1 "$OUTDIR/stamp" 2>/dev/null)" = "version=$version" ]; then
    echo "build.sh: $OUTDIR is up to date (version $version)"
    exit 0
fi
t0=$(date +%s)

# /var/tmp, not /tmp: a shared /tmp has been cleaned under a running job before.
tmp=$(mktemp -d /var/tmp/kvmagent-guest.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"

apt_update() {
    echo "build.sh: apt-get update"
    apt-get -q -o DPkg::Lock::Timeout=300 update >/dev/null || die "apt-get update failed"
}
resolve_kernel() {
    if [ -n "${KVMAGENT_GUEST_KERNEL_PKG:-}" ]; then
        echo "$KVMAGENT_GUEST_KERNEL_PKG"
        return
    fi
    # The metapackage depends on exactly one concrete linux-image-<abi>-amd64.
    { apt-cache depends linux-image-amd64 2>/dev/null || true; } |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ {print $2; exit}'
}
download() {
    # Sandbox user root: apt's _apt user cannot write into our private temp dir.
    apt-get -q -o APT::Sandbox::User=root download "$@" >/dev/null 2>&1
}

kpkg=$(resolve_kernel)
if [ -z "$kpkg" ]; then
    apt_update
    kpkg=$(resolve_kernel)
    [ -n "$kpkg" ] || die "cannot resolve linux-image-amd64 to a kernel package (apt-cache depends)"
fi
if ! download "$kpkg" busybox-static; then
    apt_update
    kpkg=$(resolve_kernel)
    download "$kpkg" busybox-static || die "apt-get download $kpkg busybox-static failed"
fi
echo "build.sh: downloaded $(ls ./*.deb | xargs -n1 basename | tr '\n' ' ')"

mkdir kernel bb root
dpkg -x ./"$kpkg"_*.deb kernel
dpkg -x ./busybox-static_*.deb bb
busybox=$tmp/bb/bin/busybox
[ -x "$busybox" ] || die "busybox-static has no bin/busybox"
kver=$(ls kernel/lib/modules)
[ "$(echo "$kver" | wc -l)" = 1 ] || die "expected one module tree in $kpkg, got: $kver"
moddir=kernel/lib/modules/$kver
vmlinuz=kernel/boot/vmlinuz-$kver
[ -f "$vmlinuz" ] || die "$vmlinuz missing in $kpkg"

# The package has no modules.dep (depmod runs at install time): generate it with busybox depmod.
"$busybox" depmod -b "$tmp/kernel" "$kver" || die "depmod failed"

# Resolve the wanted modules to an ordered list (dependencies first) for /init's insmod loop.
declare -A deps=() seen=() params=() byname=()
while IFS= read -r line; do
    key=${line%%:*}
    deps[$key]=${line#*:}
    name=${key##*/}; name=${name%%.ko*}; name=${name//-/_}
    byname[$name]=$key
done <"$moddir/modules.dep"
visit() {
    local path=$1 d
    [ -z "${seen[$path]:-}" ] || return 0
    seen[$path]=1
    for d in ${deps[$path]}; do visit "$d"; done
    order+=("$path")
}
# resolve NAME...: sets order=() to the modules to load for NAMEs (dependencies first), leaving
# out built-in ones and those an earlier call already ordered.
resolve() {
    local spec name args path
    order=()
    for spec in "$@"; do
        read -r name args <<<"$spec"
        if grep -qE "/$name\.ko(\..*)?$" "$moddir/modules.builtin"; then
            echo "build.sh: $name is built in"
            continue
        fi
        path=${byname[$name]:-}
        [ -n "$path" ] || die "module $name is neither built in nor in modules.dep of $kver"
        params[$path]=$args
        visit "$path"
    done
}

# Initramfs tree: busybox + all applet symlinks, the modules, the module list, /init.
mkdir -p root/bin root/sbin root/usr/bin root/usr/sbin root/proc root/sys root/dev root/tmp \
    root/etc "root/lib/modules/$kver"
cp "$busybox" root/bin/busybox
"$busybox" --list-full | while read -r applet; do
    [ -e "root/$applet" ] || ln -s /bin/busybox "root/$applet"
done
# Device nodes for the time before /init mounts devtmpfs (the kernel opens /dev/console itself).
mknod -m 600 root/dev/console c 5 1 2>/dev/null || true
mknod -m 666 root/dev/null c 1 3 2>/dev/null || true
# install_modules LIST: copies the modules in order=() into the tree and lists them in LIST.
install_modules() {
    local path
    : >"$1"
    for path in "${order[@]}"; do
        case "$path" in
            *.ko) ;;
            *) die "compressed module $path: not supported (busybox insmod needs plain .ko)" ;;
        esac
        mkdir -p "root/lib/modules/$kver/$(dirname "$path")"
        cp "$moddir/$path" "root/lib/modules/$kver/$path"
        echo "$kver/$path ${params[$path]:-}" >>"$1"
    done
}
resolve "${WANT_MODULES[@]}"
install_modules root/etc/kvmagent-modules
common=("${order[@]}")
# cloud-init seed: its own list, after the common one (shared dependencies are loaded there).
resolve "${CIDATA_MODULES[@]}"
install_modules root/etc/kvmagent-cidata-modules
# SATA: its own list after the common one; what it shares with the CD-ROM list (libata) is in both.
seen=()
for path in "${common[@]}"; do seen[$path]=1; done
resolve "${SATA_MODULES[@]}"
install_modules root/etc/kvmagent-sata-modules
install -m 755 "$here/init" root/init
echo "$version" >root/etc/kvmagent-guest-version

(cd root && find . | sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >initrd.img
[ -s initrd.img ] || die "initramfs is empty"

# Replace the outputs; the stamp goes last so an interrupted build is never taken as cached.
rm -f "$OUTDIR/stamp"
cp "$vmlinuz" "$OUTDIR/vmlinuz.new" && mv -f "$OUTDIR/vmlinuz.new" "$OUTDIR/vmlinuz"
cp initrd.img "$OUTDIR/initrd.img.new" && mv -f "$OUTDIR/initrd.img.new" "$OUTDIR/initrd.img"
bbver=$(dpkg-deb -f ./busybox-static_*.deb Version)
kpver=$(dpkg-deb -f ./"$kpkg"_*.deb Version)
printf 'version=%s\nkernel=%s %s (%s)\nbusybox=%s\nmodules=%s\ncmdline=%s\n' \
    "$version" "$kpkg" "$kpver" "$kver" "$bbver" \
    "$(sed 's|^[^ ]*/||; s| *$||' root/etc/kvmagent-modules | tr '\n' ' ' | sed 's/ $//')" \
    "$CMDLINE" >"$OUTDIR/stamp.new"
mv -f "$OUTDIR/stamp.new" "$OUTDIR/stamp"
echo "build.sh: built $OUTDIR (vmlinuz $(stat -c %s "$OUTDIR/vmlinuz") B, initrd.img $(stat -c %s "$OUTDIR/initrd.img") B, kernel $kver) in $(($(date +%s) - t0)) s"
