//! Host networking for ZStack's L2 networks: Linux bridges and VLAN devices. The kernel is
//! reached through one trait ([`Netlink`]); the real one ([`rtnl::RtNetlink`]) speaks rtnetlink
//! to the kernel of the agent's network namespace, and the in-memory [`fake`] lets the bridge
//! logic ([`bridge`]) be unit-tested without touching the host.

pub mod bridge;
#[cfg(test)]
pub mod fake;
pub mod rtnl;

use std::net::IpAddr;

use async_trait::async_trait;

use crate::error::AgentError;

/// Linux's limit on an interface name (`IFNAMSIZ` less the terminating NUL).
pub const IFNAME_MAX: usize = 15;

/// What a link is, as far as L2 networks care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkKind {
    Bridge,
    /// An 802.1Q device on link `parent` (an index) with VLAN id `id`.
    Vlan {
        parent: u32,
        id: u16,
    },
    /// Anything else (an Ethernet NIC, a veth, a bond...).
    Other,
}

/// One network interface of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: LinkKind,
    /// The bridge (or bond) this link is a port of, by index.
    pub master: Option<u32>,
    pub up: bool,
    pub mtu: u32,
    pub mac: Vec<u8>,
    pub alias: Option<String>,
}

/// An address of an interface, as `ip addr` shows it (`10.0.0.2/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IfAddr {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for IfAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// A route of the main table through a gateway (`default via 10.0.0.1 dev eth0`): what moves
/// with an interface's addresses. Routes without a gateway follow the addresses by themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayRoute {
    pub destination: IfAddr,
    pub gateway: IpAddr,
    pub metric: Option<u32>,
}

impl std::fmt::Display for GatewayRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {}", self.destination, self.gateway)?;
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        Ok(())
    }
}

/// One change to an existing link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    Up,
    Master(u32),
    Mtu(u32),
    Mac(Vec<u8>),
    Alias(String),
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot open a netlink socket: {0}; the agent needs CAP_NET_ADMIN")]
    Socket(std::io::Error),
    #[error("netlink refused {what}: {reason}")]
    Refused { what: String, reason: String },
}

impl From<NetError> for AgentError {
    fn from(e: NetError) -> Self {
        AgentError::failed("a host network change failed", e.to_string())
    }
}

/// The kernel's network interfaces, addresses and routes, as the L2 paths use them.
#[async_trait]
pub trait Netlink: Send + Sync {
    /// Every link of the namespace.
    async fn links(&self) -> Result<Vec<Link>, NetError>;
    /// Adds bridge `name` with STP off and no forwarding delay, and sets it up.
    async fn add_bridge(&self, name: &str) -> Result<(), NetError>;
    /// Adds 802.1Q device `name` with VLAN `id` on link `parent`, and sets it up.
    async fn add_vlan(&self, name: &str, parent: u32, id: u16) -> Result<(), NetError>;
    async fn change(&self, link: &Link, change: LinkChange) -> Result<(), NetError>;
    async fn delete(&self, link: &Link) -> Result<(), NetError>;
    /// The addresses of `link` that belong to the host's configuration: IPv4 ones and IPv6
    /// ones other than link-local (which the kernel makes for every link by itself).
    async fn addresses(&self, link: &Link) -> Result<Vec<IfAddr>, NetError>;
    async fn add_address(&self, link: &Link, addr: IfAddr) -> Result<(), NetError>;
    async fn del_address(&self, link: &Link, addr: IfAddr) -> Result<(), NetError>;
    /// The main table's routes out of `link` through a gateway.
    async fn gateway_routes(&self, link: &Link) -> Result<Vec<GatewayRoute>, NetError>;
    async fn add_route(&self, link: &Link, route: GatewayRoute) -> Result<(), NetError>;
    async fn del_route(&self, link: &Link, route: GatewayRoute) -> Result<(), NetError>;
}

/// Checks an interface name as the kernel would take it, and more strictly: 1 to 15 bytes of
/// ASCII letters, digits, `_`, `-` and `.`, and not `.` or `..`. `field` names it in the error.
pub fn check_ifname(field: &str, name: &str) -> Result<(), AgentError> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return Err(AgentError::invalid(format!(
            "{field} {name:?} must be 1 to {IFNAME_MAX} characters long (Linux's limit on an interface name)"
        )));
    }
    if name == "." || name == ".." || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
        return Err(AgentError::invalid(format!(
            "{field} {name:?} is not an interface name: use letters, digits, '_', '-' and '.'"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked_as_the_kernel_would_and_more() {
        for ok in ["eth0", "br_eth0_100", "enp0s31f6.4094", "l2_0123456789a", "bond-0"] {
            check_ifname("bridgeName", ok).unwrap();
        }
        for bad in ["", ".", "..", "br_0123456789abc", "br eth0", "br/0", "br:0", "brü", "a\nb"] {
            let e = check_ifname("bridgeName", bad).unwrap_err();
            assert!(e.to_string().contains("bridgeName"), "{bad:?}: {e}");
        }
    }
}
