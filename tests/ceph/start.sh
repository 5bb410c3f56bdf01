#!/usr/bin/env bash
# Starts a real single-node Ceph cluster (1 mon + 1 OSD + 1 mgr, cephx on, everything on 127.0.0.1)
# for the RBD tests, installing Ceph from Debian's packages if missing. No systemd. rbd work needs
# no mgr; the capacity the agent reports (`ceph df`) does. Prints the environment the tests read; `tests/ceph/stop.sh` removes it all.
#
# Usage: tests/ceph/start.sh [STATE_DIR]     (default /var/tmp/kvmagent-ceph)
# Writes STATE_DIR/ceph.conf, STATE_DIR/ceph.client.admin.keyring and STATE_DIR/env with
# CEPH_CONF, CEPH_KEYRING, CEPH_POOL. Idempotent: a healthy cluster in STATE_DIR is reused.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "ceph/start.sh: run as root" >&2; exit 1; }
dir=${1:-/var/tmp/kvmagent-ceph}
pool=rbd
mon_port=${KVMAGENT_CEPH_MON_PORT:-6789}
mon_v2_port=${KVMAGENT_CEPH_MON_V2_PORT:-3300}

# Every ceph/rbd call gets a timeout: without a mgr some commands wait forever.
ceph_() { timeout 30 ceph -c "$dir/ceph.conf" "$@"; }

install_packages() {
    local need=()
    for bin in ceph-mon ceph-osd ceph-mgr ceph rbd monmaptool ceph-authtool; do
        command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
    done
    # qemu's rbd driver must match the installed QEMU (backports).
    [ -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ] || need+=(qemu-block-extra)
    [ ${#need[@]} -eq 0 ] && return 0
    echo "ceph/start.sh: installing Ceph (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    export TMPDIR; TMPDIR=$(mktemp -d /var/tmp/kvmagent-apt.XXXXXX)
    local qemu_ver
    qemu_ver=$(dpkg-query -W -f='${Version}' qemu-system-common 2>/dev/null || true)
    local extra=qemu-block-extra
    [ -n "$qemu_ver" ] && extra="qemu-block-extra=$qemu_ver"
    apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends ceph-mon ceph-osd ceph-mgr ceph-common "$extra" \
        || { apt-get -q -o DPkg::Lock::Timeout=300 update && \
             apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends ceph-mon ceph-osd ceph-mgr ceph-common "$extra"; }
    rm -rf "$TMPDIR"
}

healthy() {
    [ -f "$dir/ceph.conf" ] && ceph_ osd stat 2>/dev/null | grep -q "1 up.*1 in"
}

install_packages
if healthy; then
    echo "ceph/start.sh: cluster in $dir is already up"
else
    bash "$(dirname "$0")/stop.sh" "$dir" >/dev/null 2>&1 || true
    mkdir -p "$dir"/{mon,osd,run,log}
    fsid=$(cat /proc/sys/kernel/random/uuid)
    # Admin sockets only for the daemons: clients (the agent, QEMU, the rbd command line, many
    # at once) keep Ceph's default of one socket per process instead of fighting over one path.
    cat > "$dir/ceph.conf" <<CONF
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$mon_v2_port,v1:127.0.0.1:$mon_port]
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = $dir/ceph.client.admin.keyring
run_dir = $dir/run
log_file = $dir/log/\$name.log
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_autoscale_mode = off
mon_data_avail_warn = 2
mon_mgr_mkfs_grace = 31536000
auth_allow_insecure_global_id_reclaim = false
ms_bind_ipv4 = true
ms_bind_ipv6 = false
[mon.a]
admin_socket = $dir/run/\$name.asok
mon_data = $dir/mon
public_addr = 127.0.0.1
[osd.0]
admin_socket = $dir/run/\$name.asok
osd_data = $dir/osd
osd_objectstore = bluestore
bluestore_block_path = $dir/osd-block
bluestore_block_create = true
bluestore_block_size = ${KVMAGENT_CEPH_OSD_BYTES:-4294967296}
osd_memory_target = 536870912
CONF
    ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$mon_v2_port,v1:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$dir/ceph.conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
    ceph-mon -c "$dir/ceph.conf" -i a
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    osd_secret=$(ceph-authtool --gen-print-key)
    echo "{\"cephx_secret\": \"$osd_secret\"}" > "$dir/osd-secret.json"
    id=$(ceph_ osd new "$osd_uuid" -i "$dir/osd-secret.json")
    ceph-authtool --create-keyring "$dir/osd/keyring" --name "osd.$id" --add-key "$osd_secret" >/dev/null
    ceph-osd -c "$dir/ceph.conf" -i "$id" --mkfs --osd-uuid "$osd_uuid" --keyring "$dir/osd/keyring" >/dev/null 2>&1
    ceph-osd -c "$dir/ceph.conf" -i "$id" --keyring "$dir/osd/keyring"
    for _ in $(seq 120); do healthy && break; sleep 0.5; done
    healthy || { echo "ceph/start.sh: the OSD did not come up; see $dir/log" >&2; exit 1; }
    ceph_ osd pool create "$pool" 8 8 >/dev/null
    timeout 60 rbd -c "$dir/ceph.conf" pool init "$pool"
fi

# The mgr: usage statistics (`ceph df`) come from it. Started when missing, also on a reused cluster.
mgr_running() { pgrep -f "ceph-mgr -c $dir/ceph.conf" >/dev/null; }
if ! mgr_running; then
    mkdir -p "$dir/mgr"
    ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' > "$dir/mgr/keyring"
    ceph-mgr -c "$dir/ceph.conf" -i x --keyring "$dir/mgr/keyring" --mgr-data "$dir/mgr"
fi
for _ in $(seq 120); do
    ceph_ df --format json 2>/dev/null | grep -q '"total_bytes":[1-9]' && break
    sleep 0.5
done
ceph_ df --format json | grep -q '"total_bytes":[1-9]' \
    || { echo "ceph/start.sh: the mgr reports no usage; see $dir/log" >&2; exit 1; }

cat > "$dir/env" <<ENV
CEPH_CONF=$dir/ceph.conf
CEPH_KEYRING=$dir/ceph.client.admin.keyring
CEPH_POOL=$pool
ENV
echo "ceph/start.sh: cluster up; environment in $dir/env"
