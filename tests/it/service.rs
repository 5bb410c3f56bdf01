//! Running under systemd: the agent speaks the notify protocol (READY, WATCHDOG, STOPPING) to
//! the socket systemd names, as `Type=notify` with `WatchdogSec=` expects.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use kvmagent_host_tests::Host;

/// The messages received on `socket` within `wait`, each split into its `KEY=value` lines.
fn receive(socket: &UnixDatagram, wait: Duration) -> Vec<String> {
    let mut lines = Vec::new();
    let end = Instant::now() + wait;
    let mut buf = [0u8; 512];
    while Instant::now() < end {
        socket
            .set_read_timeout(Some(end.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv(&mut buf) {
            Ok(n) => lines.extend(String::from_utf8_lossy(&buf[..n]).lines().map(str::to_owned)),
            Err(_) => break,
        }
    }
    lines
}

#[tokio::test]
async fn ready_watchdog_and_stopping_reach_the_notify_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    let env = [("NOTIFY_SOCKET", path.to_str().unwrap()), ("WATCHDOG_USEC", "200000")];
    let mut h = Host::start_with_env("", &env).await.unwrap();

    let first = receive(&socket, Duration::from_secs(2));
    assert!(first.iter().any(|l| l == "READY=1"), "{first:?}");
    assert!(first.iter().any(|l| l.starts_with("STATUS=serving on")), "{first:?}");
    // Every 100 ms (half of WATCHDOG_USEC): about 20 in 2 s; at least 5 however loaded.
    let pings = first.iter().filter(|l| *l == "WATCHDOG=1").count();
    assert!(pings >= 5, "{pings} watchdog pings in 2 s: {first:?}");

    h.stop_agent().unwrap();
    let last = receive(&socket, Duration::from_millis(500));
    assert!(last.iter().any(|l| l == "STOPPING=1"), "{last:?}");
}

#[test]
fn the_unit_file_verifies() {
    // `verify` wants ExecStart's binary to exist: point it at the one under test.
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/kvmagent.service")).unwrap();
    let binary = kvmagent_host_tests::agent_binary();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kvmagent.service");
    std::fs::write(&path, unit.replace("/usr/bin/kvmagent", binary.to_str().unwrap())).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze (tests/host/install-deps.sh installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}
