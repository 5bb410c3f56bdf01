#!/usr/bin/env bash
# Starts/stops a real libvirtd (monolithic daemon, qemu:///system) on a Debian 12 host WITHOUT
# systemd, as the integration tests need it (run tests/host/install-deps.sh first).
#
# Usage: tests/host/libvirtd.sh start|stop|status|restart
#   start    prepare users/groups/dirs/qemu.conf, start `libvirtd -d -p $PIDFILE`, wait until
#            `virsh -c qemu:///system version` answers. No-op success if it already answers.
#   stop     SIGTERM the pid in $PIDFILE, wait for it to exit (SIGKILL after the timeout).
#   status   exit 0 and print the version if qemu:///system answers, exit 1 otherwise.
# Environment:
#   LIBVIRTD_PIDFILE      default /run/libvirtd.pid (libvirtd's own default, so a daemon started
#                         by hand without -p is found too)
#   LIBVIRTD_WAIT         seconds to wait for start/stop, default 60 (the first start probes
#                         QEMU capabilities: ~8 s; later starts use the cached probe: ~0.2 s)
#   LIBVIRTD_LOG          daemon log file, default /var/log/libvirt/libvirtd.log (shown on failure)
set -euo pipefail

PIDFILE=${LIBVIRTD_PIDFILE:-/run/libvirtd.pid}
WAIT=${LIBVIRTD_WAIT:-60}
LOG=${LIBVIRTD_LOG:-/var/log/libvirt/libvirtd.log}
URI=qemu:///system
QEMU_CONF=/etc/libvirt/qemu.conf

die() { echo "libvirtd.sh: $*" >&2; exit 1; }

answers() { virsh -c "$URI" version >/dev/null 2>&1; }

pid_alive() {
    local pid
    [ -s "$PIDFILE" ] || return 1
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# Set `key = value` in qemu.conf: replace an existing (active or commented-out) assignment of the
# key, else append. Other content is kept, so a host's own settings survive and reruns are no-ops.
# Debian ships qemu.conf only in libvirt-daemon-system (which we don't install), so usually the
# file does not exist and this just creates it with our five keys.
set_conf() {
    local key=$1 value=$2 line
    line="$key = $value"
    if grep -qE "^[[:space:]]*$key[[:space:]]*=" "$QEMU_CONF"; then
        grep -qxF "$line" "$QEMU_CONF" ||
            sed -i -E "s|^[[:space:]]*$key[[:space:]]*=.*|$line|" "$QEMU_CONF"
    elif grep -qE "^#[[:space:]]*$key[[:space:]]*=" "$QEMU_CONF"; then
        # Replace only the first commented example, leave the rest of the comment as it is.
        sed -i -E "0,/^#[[:space:]]*$key[[:space:]]*=.*/s||$line|" "$QEMU_CONF"
    else
        printf '%s\n' "$line" >>"$QEMU_CONF"
    fi
}

prepare() {
    command -v libvirtd >/dev/null || die "libvirtd not found (run tests/host/install-deps.sh)"
    command -v virsh >/dev/null || die "virsh not found (run tests/host/install-deps.sh)"
    # The QEMU driver resolves these names at load time, before it reads qemu.conf; without
    # libvirt-daemon-system nobody creates them.
    getent group kvm >/dev/null || groupadd --system kvm
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null ||
        useradd --system --gid libvirt-qemu --groups kvm --no-create-home \
            --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
    mkdir -p /var/log/libvirt/qemu /etc/libvirt "$(dirname "$PIDFILE")" "$(dirname "$LOG")"
    [ -e "$QEMU_CONF" ] ||
        printf '# Written by kvmagent tests/host/libvirtd.sh (libvirtd without systemd).\n' >"$QEMU_CONF"
    # root: no DAC relabelling/chown of test images and no privilege drop (containers, CI).
    set_conf user '"root"'
    set_conf group '"root"'
    set_conf swtpm_user '"root"'
    set_conf swtpm_group '"root"'
    # QEMU writes its stdout/stderr log (and <log file=> of chardevs) itself: no virtlogd needed.
    set_conf stdio_handler '"file"'
}

start() {
    if answers; then
        echo "libvirtd.sh: already running ($URI answers)"
        return 0
    fi
    prepare
    if pid_alive; then
        # Running but not answering yet (e.g. still probing capabilities): just wait below.
        echo "libvirtd.sh: libvirtd pid $(cat "$PIDFILE") is up, waiting for $URI"
    else
        # -d daemonizes; the pidfile is locked by libvirtd, a stale one is taken over.
        LIBVIRT_LOG_OUTPUTS="3:file:$LOG" libvirtd -d -p "$PIDFILE" ||
            die "libvirtd failed to start; last log lines:$(echo; tail -n 20 "$LOG" 2>/dev/null)"
    fi
    local t0 deadline=$((SECONDS + WAIT))
    t0=$(date +%s%N)
    until answers; do
        if ! pid_alive; then
            sleep 0.5
            pid_alive || answers ||
                die "libvirtd exited during startup; last log lines:$(echo; tail -n 20 "$LOG" 2>/dev/null)"
        fi
        [ $SECONDS -lt $deadline ] ||
            die "$URI did not answer within ${WAIT}s; last log lines:$(echo; tail -n 20 "$LOG" 2>/dev/null)"
        sleep 0.2
    done
    echo "libvirtd.sh: started (pid $(cat "$PIDFILE" 2>/dev/null || echo '?'), $URI answered after $(( ($(date +%s%N) - t0) / 1000000 )) ms)"
}

stop() {
    if ! pid_alive; then
        if answers; then
            die "libvirtd answers on $URI but $PIDFILE names no live process (not started by this script?)"
        fi
        echo "libvirtd.sh: not running"
        rm -f "$PIDFILE"
        return 0
    fi
    local pid deadline
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid"
    deadline=$((SECONDS + WAIT))
    while kill -0 "$pid" 2>/dev/null; do
        if [ $SECONDS -ge $deadline ]; then
            echo "libvirtd.sh: pid $pid did not exit within ${WAIT}s, sending SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
            break
        fi
        sleep 0.2
    done
    kill -0 "$pid" 2>/dev/null && die "could not stop libvirtd pid $pid"
    rm -f "$PIDFILE"
    echo "libvirtd.sh: stopped (pid $pid)"
}

status() {
    if answers; then
        echo "libvirtd.sh: running${PIDFILE:+ (pidfile $PIDFILE: $(cat "$PIDFILE" 2>/dev/null || echo none))}"
        virsh -c "$URI" version
    else
        echo "libvirtd.sh: not answering on $URI"
        return 1
    fi
}

[ "$(id -u)" = 0 ] || die "run as root"
case "${1:-}" in
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
