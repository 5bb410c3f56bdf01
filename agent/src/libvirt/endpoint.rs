//! Where `libvirt.uri` leads: the daemon's unix socket and the URI opened there, chosen as
//! libvirt's own client does for a local URI. Remote transports (ssh, tcp, tls) and SASL are
//! not spoken by the agent: such a URI is refused when the configuration is read.

use std::path::{Path, PathBuf};

/// The socket of the modular QEMU daemon, used when it exists.
const VIRTQEMUD_SOCKET: &str = "/run/libvirt/virtqemud-sock";
/// The socket of the monolithic libvirtd.
const LIBVIRTD_SOCKET: &str = "/run/libvirt/libvirt-sock";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `?socket=` of the URI, when given.
    socket: Option<PathBuf>,
    /// The URI the daemon opens: the driver and path, without transport or client parameters.
    pub name: String,
}

impl Endpoint {
    pub fn parse(uri: &str) -> Result<Endpoint, String> {
        let supported = "the agent speaks to the local daemon over its unix socket only: \
                         use qemu:///system, optionally with ?socket=<path>";
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| format!("libvirt.uri {uri:?} is not a URI"))?;
        let (driver, transport) = scheme.split_once('+').unwrap_or((scheme, "unix"));
        if driver != "qemu" {
            return Err(format!("libvirt.uri {uri:?} names the {driver:?} driver; {supported}"));
        }
        if transport != "unix" {
            return Err(format!("libvirt.uri {uri:?} asks for the {transport} transport; {supported}"));
        }
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') {
            return Err(format!("libvirt.uri {uri:?} names a remote host; {supported}"));
        }
        if path != "/system" {
            return Err(format!("libvirt.uri {uri:?}: only the system instance (/system) is supported"));
        }
        let mut socket = None;
        for param in query.split('&').filter(|p| !p.is_empty()) {
            match param.split_once('=') {
                Some(("socket", p)) if Path::new(p).is_absolute() => socket = Some(PathBuf::from(p)),
                Some(("socket", p)) => {
                    return Err(format!("libvirt.uri {uri:?}: socket {p:?} is not an absolute path"))
                }
                _ => return Err(format!("libvirt.uri {uri:?}: parameter {param:?} is not supported; {supported}")),
            }
        }
        Ok(Endpoint { socket, name: format!("{driver}:///system") })
    }

    /// The socket to connect to: `?socket=`, else the modular daemon's when it is there, else
    /// libvirtd's.
    pub fn socket(&self) -> PathBuf {
        match &self.socket {
            Some(s) => s.clone(),
            None if Path::new(VIRTQEMUD_SOCKET).exists() => VIRTQEMUD_SOCKET.into(),
            None => LIBVIRTD_SOCKET.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn local_uris_lead_to_a_socket() {
        let e = Endpoint::parse("qemu:///system").unwrap();
        assert_eq!(e.name, "qemu:///system");
        assert!(e.socket().starts_with("/run/libvirt/"));
        let e = Endpoint::parse("qemu+unix:///system?socket=/tmp/x.sock").unwrap();
        assert_eq!((e.name.as_str(), e.socket()), ("qemu:///system", "/tmp/x.sock".into()));
    }

    #[test]
    fn remote_and_unsupported_uris_are_refused_saying_what_works() {
        for (uri, says) in [
            ("qemu+ssh://root@host/system", "ssh transport"),
            ("qemu+tcp://host/system", "tcp transport"),
            ("qemu+tls://host/system", "tls transport"),
            ("qemu://host/system", "remote host"),
            ("qemu:///session", "system instance"),
            ("lxc:///system", "\"lxc\" driver"),
            ("qemu:///system?socket=rel.sock", "absolute path"),
            ("qemu:///system?auth=sasl", "\"auth=sasl\""),
            ("system", "not a URI"),
        ] {
            let e = Endpoint::parse(uri).unwrap_err();
            assert!(e.contains(says), "{uri}: {e}");
        }
    }
}
