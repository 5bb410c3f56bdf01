#!/usr/bin/env bash
# Stops the cluster tests/ceph/start.sh started in STATE_DIR and removes its files.
# Usage: tests/ceph/stop.sh [STATE_DIR]     (default /var/tmp/kvmagent-ceph)
set -uo pipefail
dir=${1:-/var/tmp/kvmagent-ceph}
[ -d "$dir" ] || exit 0
# The daemons are found by the config file they were started with.
pattern="ceph-(mon|osd|mgr) -c $dir/ceph.conf"
pkill -f "$pattern" 2>/dev/null
for _ in $(seq 50); do pgrep -f "$pattern" >/dev/null || break; sleep 0.2; done
pkill -9 -f "$pattern" 2>/dev/null
for _ in $(seq 25); do pgrep -f "$pattern" >/dev/null || break; sleep 0.2; done
rm -rf "$dir"
echo "ceph/stop.sh: stopped and removed $dir"
