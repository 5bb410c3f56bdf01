#!/usr/bin/env bash
# Stops the cluster tests/ceph/start.sh started in STATE_DIR and removes its files.
# Usage: tests/ceph/stop.sh [STATE_DIR]     (default /var/tmp/kvmagent-ceph)
set -uo pipefail
dir=${1:-/var/tmp/kvmagent-ceph}
[ -d "$dir" ] || exit 0
for pidfile in "$dir"/run/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null
done
# Daemons started with this conf but without a pid file in run_dir.
pkill -f "ceph-(mon|osd) -c $dir/ceph.conf" 2>/dev/null
sleep 0.5
rm -rf "$dir"
echo "ceph/stop.sh: stopped and removed $dir"
