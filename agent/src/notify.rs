//! systemd's notify protocol, spoken directly (one datagram per message, no libsystemd):
//! `READY=1` once the agent serves, `STOPPING=1` when it begins to stop, `STATUS=...`, and
//! `WATCHDOG=1` at half the interval systemd asks for, from a task on the async runtime — so a
//! runtime that stops turning (a deadlock, a blocked worker) gets the agent restarted.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket) and `WATCHDOG_USEC`
    /// (honoured only when `WATCHDOG_PID`, if set, is this process). Without them, a no-op.
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|name| {
            let addr = match name.strip_prefix('@') {
                Some(abs) => <SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(abs.as_bytes()),
                None => SocketAddr::from_pathname(&name),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(s), Ok(a)) => Some((s, a)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(socket = %name, error = %e, "cannot use NOTIFY_SOCKET");
                    None
                }
            }
        });
        let ours = std::env::var("WATCHDOG_PID").map_or(true, |p| p == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(|u| Duration::from_micros(u / 2));
        Notifier { socket, watchdog }
    }

    /// Sends `message` (`KEY=value` lines); failures are logged, never fatal.
    pub fn notify(&self, message: &str) {
        if let Some((s, addr)) = &self.socket {
            if let Err(e) = s.send_to_addr(message.as_bytes(), addr) {
                tracing::warn!(error = %e, "cannot notify the service manager");
            }
        }
    }

    /// How often to send `WATCHDOG=1`, when the service manager watches.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.filter(|_| self.socket.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            socket: Some((UnixDatagram::unbound().unwrap(), SocketAddr::from_pathname(&path).unwrap())),
            watchdog: None,
        };
        n.notify("READY=1\nSTATUS=serving");
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        assert_eq!(n.watchdog_interval(), None);
    }
}
