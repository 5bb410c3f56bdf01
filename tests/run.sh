#!/usr/bin/env bash
# The whole test suite: installs and starts what the tests drive (libvirtd + QEMU, the test
# guest), builds, then runs unit tests and the host-level integration tests against the real
# daemons. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "host packages"
bash tests/host/install-deps.sh
step "libvirtd"
bash tests/host/libvirtd.sh start
step "test guest"
bash tests/guest/build.sh
bash tests/guest/build-esp.sh
step "Ceph (one mon, one OSD, on loopback)"
bash tests/ceph/start.sh
trap 'bash tests/ceph/stop.sh >/dev/null 2>&1 || true' EXIT

step "build"
cargo build --workspace --all-targets --locked

step "tests"
# Host tests boot TCG guests; two at a time keeps a 2-core machine responsive.
cargo test --workspace --locked -- --test-threads="${KVMAGENT_TEST_THREADS:-2}"
