//! Bridges for ZStack's L2 networks, as its Python agent makes them (zstacklib `linux.py`:
//! `create_bridge`, `create_vlan_eth`, `delete_novlan_bridge`, `delete_vlan_bridge`):
//!
//! * a bridge named by the management node, STP off, no forwarding delay, up;
//! * the physical interface (or its VLAN device `<iface>.<vlan>`) up and enslaved to it;
//! * the bridge takes the port's MAC address, and the port's addresses and gateway routes move
//!   to the bridge, so the host stays reachable over an interface that became a bridge port;
//! * every step is skipped when already so: a second call changes nothing.
//!
//! Callers check names first ([`super::check_ifname`]); nothing here panics on input.

use super::{Link, LinkChange, LinkKind, NetError, Netlink};
use crate::error::{AgentError, AgentResult};

/// What a bridge is made from.
#[derive(Debug, Clone, Copy)]
pub struct BridgeSpec<'a> {
    pub bridge: &'a str,
    pub physical_interface: &'a str,
    /// 802.1Q id: the port is the VLAN device `<iface>.<vlan>`.
    pub vlan: Option<u16>,
    /// The port's MTU is raised to this (never lowered, as the Python agent does).
    pub mtu: Option<u32>,
    /// Recorded in the port's alias (`uuid: <l2NetworkUuid>`), as the Python agent does.
    pub l2_network_uuid: Option<&'a str>,
}

/// The VLAN device name the Python agent uses: `<iface>.<vlan>`.
pub fn vlan_device_name(iface: &str, vlan: u16) -> String {
    format!("{iface}.{vlan}")
}

fn find<'a>(links: &'a [Link], name: &str) -> Option<&'a Link> {
    links.iter().find(|l| l.name == name)
}

fn name_of(links: &[Link], index: u32) -> String {
    links.iter().find(|l| l.index == index).map_or_else(|| format!("#{index}"), |l| l.name.clone())
}

async fn lookup(net: &dyn Netlink, name: &str) -> AgentResult<Link> {
    find(&net.links().await?, name)
        .cloned()
        .ok_or_else(|| AgentError::internal(format!("link {name} is gone right after it was made")))
}

fn missing_interface(iface: &str) -> AgentError {
    AgentError::not_found(format!(
        "physical interface {iface} does not exist on this host; check the L2 network's physicalInterface"
    ))
}

/// Checks everything a create could trip on before anything is changed.
fn plan(links: &[Link], spec: &BridgeSpec<'_>) -> AgentResult<()> {
    let iface = find(links, spec.physical_interface).ok_or_else(|| missing_interface(spec.physical_interface))?;
    let bridge = find(links, spec.bridge);
    if let Some(b) = bridge.filter(|b| b.kind != LinkKind::Bridge) {
        return Err(AgentError::conflict(format!(
            "{} already exists and is not a bridge; rename or remove it, or name another bridge",
            b.name
        )));
    }
    let port = match spec.vlan {
        None => iface,
        Some(id) => {
            let name = vlan_device_name(spec.physical_interface, id);
            match find(links, &name) {
                Some(v) if v.kind != (LinkKind::Vlan { parent: iface.index, id }) => {
                    return Err(AgentError::conflict(format!(
                        "{name} already exists and is not VLAN {id} of {}; remove it first",
                        spec.physical_interface
                    )))
                }
                Some(v) => v,
                None => return Ok(()),
            }
        }
    };
    if port.kind == LinkKind::Bridge {
        return Err(AgentError::conflict(format!(
            "{} is itself a bridge; an L2 network needs a physical interface",
            port.name
        )));
    }
    if let Some(m) = port.master.filter(|m| !matches!(bridge, Some(b) if b.index == *m)) {
        return Err(AgentError::conflict(format!(
            "{} is already a port of {}; it cannot also be a port of {}",
            port.name,
            name_of(links, m),
            spec.bridge
        )));
    }
    Ok(())
}

/// Makes (or completes) the bridge of `spec`. Idempotent.
pub async fn realize(net: &dyn Netlink, spec: &BridgeSpec<'_>) -> AgentResult<()> {
    let mut made = Vec::new();
    let r = build(net, spec, &mut made).await;
    if r.is_err() {
        remove_made(net, &made).await;
    }
    r
}

/// Removes the links a failed [`realize`] made, newest first (the bridge before its VLAN port),
/// unless one carries addresses by then: the host's, moved onto it, are never taken down.
async fn remove_made(net: &dyn Netlink, made: &[String]) {
    let Ok(links) = net.links().await else { return };
    for name in made.iter().rev() {
        let Some(link) = find(&links, name) else { continue };
        if net.addresses(link).await.map_or(true, |a| !a.is_empty()) {
            continue;
        }
        if let Err(e) = net.delete(link).await {
            tracing::warn!(link = %name, error = %e, "cannot remove a link a failed bridge creation made");
        }
    }
}

/// The steps of [`realize`]; each link it creates is named in `made`.
async fn build(net: &dyn Netlink, spec: &BridgeSpec<'_>, made: &mut Vec<String>) -> AgentResult<()> {
    let links = net.links().await?;
    plan(&links, spec)?;
    let iface = find(&links, spec.physical_interface).ok_or_else(|| missing_interface(spec.physical_interface))?;
    // The VLAN device first: a kernel without 802.1Q refuses it before anything changed.
    let port = match spec.vlan {
        None => iface.clone(),
        Some(id) => {
            let name = vlan_device_name(spec.physical_interface, id);
            match find(&links, &name) {
                Some(v) => v.clone(),
                None => {
                    net.add_vlan(&name, iface.index, id).await?;
                    made.push(name.clone());
                    lookup(net, &name).await?
                }
            }
        }
    };
    if !iface.up {
        net.change(iface, LinkChange::Up).await?;
    }
    if port.index != iface.index && !port.up {
        net.change(&port, LinkChange::Up).await?;
    }
    if let Some(mtu) = spec.mtu.filter(|m| *m > port.mtu) {
        net.change(&port, LinkChange::Mtu(mtu)).await?;
    }
    let bridge = match find(&links, spec.bridge) {
        Some(b) => b.clone(),
        None => {
            net.add_bridge(spec.bridge).await?;
            made.push(spec.bridge.to_owned());
            lookup(net, spec.bridge).await?
        }
    };
    if !bridge.up {
        net.change(&bridge, LinkChange::Up).await?;
    }
    if port.master != Some(bridge.index) {
        net.change(&port, LinkChange::Master(bridge.index)).await?;
    }
    // The bridge keeps the port's MAC even when other ports (VM NICs) come and go.
    if !port.mac.is_empty() && bridge.mac != port.mac {
        net.change(&bridge, LinkChange::Mac(port.mac.clone())).await?;
    }
    move_addresses(net, &port, &bridge).await?;
    let alias = format!("phy_nic: {}", spec.physical_interface);
    if bridge.alias.as_deref() != Some(alias.as_str()) {
        net.change(&bridge, LinkChange::Alias(alias)).await?;
    }
    if let Some(uuid) = spec.l2_network_uuid {
        let alias = format!("uuid: {uuid}");
        if port.alias.as_deref() != Some(alias.as_str()) {
            net.change(&port, LinkChange::Alias(alias)).await?;
        }
    }
    Ok(())
}

/// Moves the addresses of `from` and its gateway routes to `to`. Should a step fail, what was
/// moved goes back, so the host keeps its addresses somewhere.
async fn move_addresses(net: &dyn Netlink, from: &Link, to: &Link) -> AgentResult<()> {
    let addrs = net.addresses(from).await?;
    if addrs.is_empty() {
        return Ok(());
    }
    let routes = net.gateway_routes(from).await?;
    let present = net.addresses(to).await?;
    let result: Result<(), NetError> = async {
        for a in &addrs {
            net.del_address(from, *a).await?;
            if !present.contains(a) {
                net.add_address(to, *a).await?;
            }
        }
        for r in &routes {
            // Deleting the address took the route with it; a route that stayed goes now.
            if net.gateway_routes(from).await?.contains(r) {
                net.del_route(from, *r).await?;
            }
            net.add_route(to, *r).await?;
        }
        Ok(())
    }
    .await;
    let Err(e) = result else {
        tracing::info!(from = %from.name, to = %to.name, addresses = ?addrs, routes = routes.len(), "moved the addresses to the bridge");
        return Ok(());
    };
    restore(net, from, to, &addrs, &routes, &present).await;
    Err(AgentError::from(e).context(format!("cannot move the addresses of {} to bridge {}", from.name, to.name)))
}

/// Puts addresses and routes back on `from` after a failed move (best effort, logged).
async fn restore(
    net: &dyn Netlink,
    from: &Link,
    to: &Link,
    addrs: &[super::IfAddr],
    routes: &[super::GatewayRoute],
    present: &[super::IfAddr],
) {
    let on_from = net.addresses(from).await.unwrap_or_default();
    let on_to = net.addresses(to).await.unwrap_or_default();
    for a in addrs {
        if on_to.contains(a) && !present.contains(a) {
            if let Err(e) = net.del_address(to, *a).await {
                tracing::error!(link = %to.name, address = %a, error = %e, "cannot take a moved address back off the bridge");
            }
        }
        if !on_from.contains(a) {
            if let Err(e) = net.add_address(from, *a).await {
                tracing::error!(link = %from.name, address = %a, error = %e, "cannot put an address back");
            }
        }
    }
    let routes_now = net.gateway_routes(from).await.unwrap_or_default();
    for r in routes.iter().filter(|r| !routes_now.contains(r)) {
        if let Err(e) = net.add_route(from, *r).await {
            tracing::error!(link = %from.name, route = %r, error = %e, "cannot put a route back");
        }
    }
}

/// Whether `bridge` exists and is a bridge; the physical interface is set up, as the Python
/// agent's check does.
pub async fn check(net: &dyn Netlink, bridge: &str, iface: &str) -> AgentResult<()> {
    let links = net.links().await?;
    match find(&links, bridge) {
        None => {
            return Err(AgentError::not_found(format!(
                "can not find bridge {bridge}; the management node realizes it with createbridge"
            )))
        }
        Some(b) if b.kind != LinkKind::Bridge => {
            return Err(AgentError::conflict(format!("{bridge} exists but is not a bridge")))
        }
        Some(_) => {}
    }
    let iface = find(&links, iface).ok_or_else(|| missing_interface(iface))?;
    if !iface.up {
        net.change(iface, LinkChange::Up).await?;
    }
    Ok(())
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// There was no such bridge.
    Absent,
    /// The bridge carries addresses (the host's own, moved there at create): it is left in
    /// place, as the Python agent leaves it, so the host stays reachable.
    KeptInUse(Vec<super::IfAddr>),
    /// The bridge was deleted (and the VLAN device, when it was the bridge's port).
    Removed,
}

/// Deletes the bridge of `spec` and, for a VLAN network, its VLAN device when that is a port
/// of the bridge. The physical interface is left up.
pub async fn delete(net: &dyn Netlink, spec: &BridgeSpec<'_>) -> AgentResult<Deleted> {
    let links = net.links().await?;
    let Some(bridge) = find(&links, spec.bridge) else { return Ok(Deleted::Absent) };
    if bridge.kind != LinkKind::Bridge {
        return Err(AgentError::conflict(format!("{} is not a bridge; it is left alone", spec.bridge)));
    }
    let addrs = net.addresses(bridge).await?;
    if !addrs.is_empty() {
        return Ok(Deleted::KeptInUse(addrs));
    }
    net.delete(bridge).await?;
    if let Some(id) = spec.vlan {
        let vlan = find(&links, &vlan_device_name(spec.physical_interface, id));
        if let Some(v) = vlan.filter(|v| v.master == Some(bridge.index)) {
            net.delete(v).await?;
        }
    } else if let Some(iface) = find(&links, spec.physical_interface).filter(|i| !i.up) {
        net.change(iface, LinkChange::Up).await?;
    }
    Ok(Deleted::Removed)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::error::ErrorKind;
    use crate::network::fake::FakeNet;
    use crate::network::{GatewayRoute, IfAddr};

    fn addr(s: &str) -> IfAddr {
        let (ip, prefix) = s.split_once('/').unwrap();
        IfAddr { ip: ip.parse().unwrap(), prefix: prefix.parse().unwrap() }
    }

    fn default_via(gw: &str) -> GatewayRoute {
        GatewayRoute { destination: addr("0.0.0.0/0"), gateway: gw.parse::<IpAddr>().unwrap(), metric: Some(100) }
    }

    fn spec<'a>(bridge: &'a str, iface: &'a str, vlan: Option<u16>) -> BridgeSpec<'a> {
        BridgeSpec { bridge, physical_interface: iface, vlan, mtu: None, l2_network_uuid: Some("l2uuid") }
    }

    fn host() -> FakeNet {
        let net = FakeNet::default();
        let eth0 = net.add_nic("eth0", false);
        net.put_address(eth0, addr("10.0.0.2/24"));
        net.put_address(eth0, addr("fd00::2/64"));
        net.put_route(eth0, default_via("10.0.0.1"));
        net.add_nic("eth1", true);
        net
    }

    #[tokio::test]
    async fn a_bridge_takes_the_nic_its_mac_addresses_and_routes() {
        let net = host();
        realize(&net, &spec("br_eth0", "eth0", None)).await.unwrap();
        let (br, eth0) = (net.link("br_eth0").unwrap(), net.link("eth0").unwrap());
        assert_eq!(br.kind, LinkKind::Bridge);
        assert!(br.up && eth0.up);
        assert_eq!(eth0.master, Some(br.index));
        assert_eq!(br.mac, eth0.mac);
        assert_eq!(net.addresses_of("br_eth0"), [addr("10.0.0.2/24"), addr("fd00::2/64")]);
        assert!(net.addresses_of("eth0").is_empty());
        assert_eq!(net.routes_of("br_eth0"), [default_via("10.0.0.1")]);
        assert!(net.routes_of("eth0").is_empty());
        assert_eq!(br.alias.as_deref(), Some("phy_nic: eth0"));
        assert_eq!(eth0.alias.as_deref(), Some("uuid: l2uuid"));
    }

    #[tokio::test]
    async fn a_second_create_changes_nothing() {
        let net = host();
        realize(&net, &spec("br_eth0", "eth0", None)).await.unwrap();
        realize(&net, &spec("br_eth0_7", "eth0", Some(7))).await.unwrap();
        let (links, changes) = (net.snapshot(), net.changes());
        realize(&net, &spec("br_eth0", "eth0", None)).await.unwrap();
        realize(&net, &spec("br_eth0_7", "eth0", Some(7))).await.unwrap();
        assert_eq!(net.snapshot(), links);
        assert_eq!(net.changes(), changes, "no call changed anything");
    }

    #[tokio::test]
    async fn a_vlan_bridge_is_made_on_the_vlan_device() {
        let net = host();
        let mut s = spec("br_eth1_100", "eth1", Some(100));
        s.mtu = Some(9000);
        realize(&net, &s).await.unwrap();
        let (br, vlan, eth1) =
            (net.link("br_eth1_100").unwrap(), net.link("eth1.100").unwrap(), net.link("eth1").unwrap());
        assert_eq!(vlan.kind, LinkKind::Vlan { parent: eth1.index, id: 100 });
        assert_eq!(vlan.master, Some(br.index));
        assert_eq!(eth1.master, None, "the NIC itself stays free for other VLANs");
        assert_eq!(vlan.mtu, 9000);
        assert!(vlan.up && br.up);
    }

    #[tokio::test]
    async fn a_kernel_that_refuses_the_vlan_device_is_left_as_it_was() {
        let net = host();
        net.set_down("eth1");
        let before = net.snapshot();
        net.fail_next("add_vlan");
        realize(&net, &spec("br_eth1_9", "eth1", Some(9))).await.unwrap_err();
        assert_eq!(net.snapshot(), before);
    }

    #[tokio::test]
    async fn a_failed_creation_removes_the_bridge_and_vlan_device_it_made() {
        for s in [spec("br_eth1_9", "eth1", Some(9)), spec("br_eth1", "eth1", None)] {
            let net = host();
            let before = net.snapshot();
            // The first link change: the new VLAN device up, or the new bridge up.
            net.fail_next("change");
            realize(&net, &s).await.unwrap_err();
            assert_eq!(net.snapshot(), before, "{s:?}");
        }
    }

    #[tokio::test]
    async fn the_mtu_is_raised_never_lowered() {
        let net = host();
        let mut s = spec("br_eth1", "eth1", None);
        s.mtu = Some(1400);
        realize(&net, &s).await.unwrap();
        assert_eq!(net.link("eth1").unwrap().mtu, 1500);
    }

    #[tokio::test]
    async fn conflicts_are_refused_before_anything_changes() {
        let net = host();
        realize(&net, &spec("br_eth0", "eth0", None)).await.unwrap();
        net.add_nic("eth0.5", true);
        let before = net.snapshot();
        for (s, kind, says) in [
            (spec("br_other", "eth0", None), ErrorKind::Conflict, "already a port of br_eth0"),
            (spec("eth1", "eth0", None), ErrorKind::Conflict, "not a bridge"),
            (spec("br_x", "br_eth0", None), ErrorKind::Conflict, "itself a bridge"),
            (spec("br_x", "eth9", None), ErrorKind::NotFound, "eth9 does not exist"),
            (spec("br_x", "eth0", Some(5)), ErrorKind::Conflict, "not VLAN 5 of eth0"),
        ] {
            let e = realize(&net, &s).await.unwrap_err();
            assert_eq!(e.kind, kind, "{s:?}: {e}");
            assert!(e.to_string().contains(says), "{s:?}: {e}");
            assert_eq!(net.snapshot(), before, "{s:?} changed nothing");
        }
    }

    #[tokio::test]
    async fn a_failed_address_move_puts_the_addresses_back() {
        let net = host();
        net.fail_next("add_route");
        let e = realize(&net, &spec("br_eth0", "eth0", None)).await.unwrap_err();
        assert!(e.to_string().contains("cannot move the addresses of eth0"), "{e}");
        assert_eq!(net.addresses_of("eth0"), [addr("10.0.0.2/24"), addr("fd00::2/64")]);
        assert!(net.addresses_of("br_eth0").is_empty());
        assert_eq!(net.routes_of("eth0"), [default_via("10.0.0.1")]);
        realize(&net, &spec("br_eth0", "eth0", None)).await.unwrap();
        assert_eq!(net.routes_of("br_eth0"), [default_via("10.0.0.1")], "a retry completes it");
    }

    #[tokio::test]
    async fn check_finds_the_bridge_and_sets_the_nic_up() {
        let net = host();
        let e = check(&net, "br_eth0", "eth0").await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("can not find bridge br_eth0"), "{e}");
        realize(&net, &spec("br_eth0", "eth0", None)).await.unwrap();
        net.set_down("eth0");
        check(&net, "br_eth0", "eth0").await.unwrap();
        assert!(net.link("eth0").unwrap().up);
        assert_eq!(check(&net, "eth1", "eth0").await.unwrap_err().kind, ErrorKind::Conflict);
    }

    #[tokio::test]
    async fn delete_keeps_a_bridge_with_the_hosts_addresses_and_removes_one_without() {
        let net = host();
        realize(&net, &spec("br_eth0", "eth0", None)).await.unwrap();
        realize(&net, &spec("br_eth1_100", "eth1", Some(100))).await.unwrap();
        let kept = delete(&net, &spec("br_eth0", "eth0", None)).await.unwrap();
        assert_eq!(kept, Deleted::KeptInUse(vec![addr("10.0.0.2/24"), addr("fd00::2/64")]));
        assert!(net.link("br_eth0").is_some());
        assert_eq!(delete(&net, &spec("br_eth1_100", "eth1", Some(100))).await.unwrap(), Deleted::Removed);
        assert!(net.link("br_eth1_100").is_none() && net.link("eth1.100").is_none());
        assert!(net.link("eth1").unwrap().up);
        assert_eq!(delete(&net, &spec("br_eth1_100", "eth1", Some(100))).await.unwrap(), Deleted::Absent);
        assert_eq!(delete(&net, &spec("eth1", "eth1", None)).await.unwrap_err().kind, ErrorKind::Conflict);
        assert!(net.link("eth1").is_some(), "a NIC named as the bridge is not deleted");
    }
}
