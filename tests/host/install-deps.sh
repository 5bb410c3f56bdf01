#!/usr/bin/env bash
# Installs what kvmagent drives on a Debian 12 host: libvirt 9 (bookworm), QEMU + qemu-img from
# bookworm-backports (qemu-utils 10 breaks bookworm's QEMU 7.2, so both come from backports),
# swtpm, OVMF (UEFI guests), xorriso (cloud-init seed ISOs), and what the tests use besides
# (openssl and curl for TLS, systemd-analyze for the unit file, sshd for the image-cache tests'
# SFTP source, Debian's signed shim + GRUB and mtools for the Secure Boot test guest's ESP,
# virt-firmware to read NVRAM files, xmllint for virt-xml-validate), and librbd/librados, which
# the agent's in-process RBD client loads on first use. The build needs no system library: the
# agent speaks libvirt's RPC protocol itself, and Ceph's functions are resolved at run time.
# Idempotent; safe to run again.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "install-deps.sh: run as root" >&2; exit 1; }

need=()
for bin in libvirtd virsh qemu-system-x86_64 qemu-img swtpm systemd-analyze openssl curl busybox /usr/sbin/sshd ssh \
    xorriso mformat xmllint virt-fw-vars /usr/share/OVMF/OVMF_CODE_4M.secboot.fd /usr/lib/shim/shimx64.efi.signed \
    /usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed /usr/lib/x86_64-linux-gnu/librbd.so.1 /usr/lib/x86_64-linux-gnu/librados.so.2; do
    [ -e "$bin" ] && continue
    command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then
    echo "install-deps: everything present"
    exit 0
fi
echo "install-deps: missing ${need[*]}; installing"

export DEBIAN_FRONTEND=noninteractive
# apt's temporary files get their own directory: a shared /tmp was once cleaned mid-install.
export TMPDIR; TMPDIR=$(mktemp -d /var/tmp/kvmagent-apt.XXXXXX)
trap 'rm -rf "$TMPDIR"' EXIT

# Enable bookworm-backports with the same mirror as the main suite.
src=/etc/apt/sources.list.d/debian.sources
bpo=/etc/apt/sources.list.d/kvmagent-backports.sources
if [ ! -e "$bpo" ]; then
    uris=$(awk '/^URIs:/ && !/security/ {print; exit}' "$src" 2>/dev/null || true)
    [ -n "$uris" ] || uris="URIs: http://deb.debian.org/debian"
    printf 'Types: deb\n%s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$uris" > "$bpo"
fi

apt_opts=(-y -q -o DPkg::Lock::Timeout=300 --no-install-recommends)
apt-get -q -o DPkg::Lock::Timeout=300 update
apt-get install "${apt_opts[@]}" \
    libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
    swtpm swtpm-tools \
    qemu-system-x86/bookworm-backports qemu-system-common/bookworm-backports \
    qemu-system-data/bookworm-backports seabios/bookworm-backports \
    qemu-utils/bookworm-backports \
    busybox-static systemd openssl curl openssh-server openssh-client \
    ovmf xorriso mtools libxml2-utils python3-virt-firmware shim-signed grub-efi-amd64-signed \
    librbd1 librados2
echo "install-deps: done"
