//! The real [`Netlink`]: rtnetlink requests to the kernel of the agent's network namespace
//! (the `rtnetlink` crate; no `ip` command is run). Each call opens its own socket, which
//! closes when the call returns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use async_trait::async_trait;
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    BridgeStpState, InfoData, InfoKind, InfoVlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{AddressMessageBuilder, Handle, LinkBridge, LinkUnspec, LinkVlan, RouteMessageBuilder};

use super::{GatewayRoute, IfAddr, Link, LinkChange, LinkKind, NetError, Netlink};

#[derive(Debug, Default)]
pub struct RtNetlink;

fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

fn refused(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |e| {
        let reason = match e {
            rtnetlink::Error::NetlinkError(m) => m.to_io().to_string(),
            other => other.to_string(),
        };
        NetError::Refused { what, reason }
    }
}

fn parse_link(m: &LinkMessage) -> Option<Link> {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        kind: LinkKind::Other,
        master: None,
        up: m.header.flags.contains(LinkFlags::Up),
        mtu: 0,
        mac: Vec::new(),
        alias: None,
    };
    let mut parent = None;
    let mut vlan_id = None;
    let mut kind = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name.clone_from(n),
            LinkAttribute::Controller(c) => link.master = Some(*c),
            LinkAttribute::Mtu(v) => link.mtu = *v,
            LinkAttribute::Address(mac) => link.mac.clone_from(mac),
            LinkAttribute::IfAlias(s) => link.alias = Some(s.clone()),
            LinkAttribute::Link(p) => parent = Some(*p),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    match i {
                        LinkInfo::Kind(k) => kind = Some(k.clone()),
                        LinkInfo::Data(InfoData::Vlan(v)) => {
                            vlan_id = v.iter().find_map(|x| if let InfoVlan::Id(id) = x { Some(*id) } else { None })
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link.kind = match (kind, parent, vlan_id) {
        (Some(InfoKind::Bridge), _, _) => LinkKind::Bridge,
        (Some(InfoKind::Vlan), Some(parent), Some(id)) => LinkKind::Vlan { parent, id },
        _ => LinkKind::Other,
    };
    (!link.name.is_empty()).then_some(link)
}

fn is_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn parse_address(m: &AddressMessage) -> Option<IfAddr> {
    // IPv4 names the address in Local (Address is the peer on point-to-point links).
    let local = m.attributes.iter().find_map(|a| if let AddressAttribute::Local(ip) = a { Some(*ip) } else { None });
    let addr = m.attributes.iter().find_map(|a| if let AddressAttribute::Address(ip) = a { Some(*ip) } else { None });
    let ip = local.or(addr)?;
    (!is_link_local(&ip)).then_some(IfAddr { ip, prefix: m.header.prefix_len })
}

fn address_message(index: u32, a: IfAddr) -> AddressMessage {
    match a.ip {
        IpAddr::V4(v4) => AddressMessageBuilder::<Ipv4Addr>::new().index(index).address(v4, a.prefix).build(),
        IpAddr::V6(v6) => AddressMessageBuilder::<Ipv6Addr>::new().index(index).address(v6, a.prefix).build(),
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn parse_route(m: &RouteMessage, index: u32) -> Option<GatewayRoute> {
    let table = m
        .attributes
        .iter()
        .find_map(|a| if let RouteAttribute::Table(t) = a { Some(*t) } else { None })
        .unwrap_or(u32::from(m.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || m.header.kind != RouteType::Unicast {
        return None;
    }
    let mut oif = None;
    let mut gateway = None;
    let mut destination = None;
    let mut metric = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = route_ip(g),
            RouteAttribute::Destination(d) => destination = route_ip(d),
            RouteAttribute::Priority(p) => metric = Some(*p),
            _ => {}
        }
    }
    let gateway = gateway.filter(|_| oif == Some(index))?;
    let unspecified =
        if gateway.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
    let destination = IfAddr { ip: destination.unwrap_or(unspecified), prefix: m.header.destination_prefix_length };
    Some(GatewayRoute { destination, gateway, metric })
}

fn route_message(index: u32, r: &GatewayRoute) -> Result<RouteMessage, NetError> {
    fn bad(r: &GatewayRoute, e: impl std::fmt::Display) -> NetError {
        NetError::Refused { what: format!("route {r}"), reason: e.to_string() }
    }
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(r.destination.ip, r.destination.prefix)
        .map_err(|e| bad(r, e))?
        .gateway(r.gateway)
        .map_err(|e| bad(r, e))?
        .output_interface(index);
    if let Some(m) = r.metric {
        b = b.priority(m);
    }
    Ok(b.build())
}

#[async_trait]
impl Netlink for RtNetlink {
    async fn links(&self) -> Result<Vec<Link>, NetError> {
        let h = connect()?;
        let msgs: Vec<LinkMessage> = h.link().get().execute().try_collect().await.map_err(refused("listing links"))?;
        Ok(msgs.iter().filter_map(parse_link).collect())
    }

    async fn add_bridge(&self, name: &str) -> Result<(), NetError> {
        let h = connect()?;
        let msg = LinkBridge::new(name).stp_state(BridgeStpState::Disabled).forward_delay(0).up().build();
        h.link().add(msg).execute().await.map_err(refused(format!("adding bridge {name}")))
    }

    async fn add_vlan(&self, name: &str, parent: u32, id: u16) -> Result<(), NetError> {
        let h = connect()?;
        let msg = LinkVlan::new(name, parent, id).up().build();
        h.link().add(msg).execute().await.map_err(refused(format!("adding VLAN device {name}")))
    }

    async fn change(&self, link: &Link, change: LinkChange) -> Result<(), NetError> {
        let h = connect()?;
        let b = LinkUnspec::new_with_index(link.index);
        let (what, msg) = match &change {
            LinkChange::Up => ("setting up", b.up().build()),
            LinkChange::Master(m) => ("enslaving", b.controller(*m).build()),
            LinkChange::Mtu(m) => ("setting the MTU of", b.mtu(*m).build()),
            LinkChange::Mac(mac) => ("setting the MAC address of", b.address(mac.clone()).build()),
            LinkChange::Alias(a) => ("setting the alias of", b.alias(a.clone()).build()),
        };
        h.link().set(msg).execute().await.map_err(refused(format!("{what} {} ({change:?})", link.name)))
    }

    async fn delete(&self, link: &Link) -> Result<(), NetError> {
        let h = connect()?;
        h.link().del(link.index).execute().await.map_err(refused(format!("deleting {}", link.name)))
    }

    async fn addresses(&self, link: &Link) -> Result<Vec<IfAddr>, NetError> {
        let h = connect()?;
        let msgs: Vec<AddressMessage> = h
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(refused(format!("listing the addresses of {}", link.name)))?;
        Ok(msgs.iter().filter(|m| m.header.index == link.index).filter_map(parse_address).collect())
    }

    async fn add_address(&self, link: &Link, addr: IfAddr) -> Result<(), NetError> {
        let h = connect()?;
        h.address()
            .add(link.index, addr.ip, addr.prefix)
            .execute()
            .await
            .map_err(refused(format!("adding {addr} to {}", link.name)))
    }

    async fn del_address(&self, link: &Link, addr: IfAddr) -> Result<(), NetError> {
        let h = connect()?;
        h.address()
            .del(address_message(link.index, addr))
            .execute()
            .await
            .map_err(refused(format!("deleting {addr} from {}", link.name)))
    }

    async fn gateway_routes(&self, link: &Link) -> Result<Vec<GatewayRoute>, NetError> {
        let h = connect()?;
        let mut out = Vec::new();
        for query in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
            let msgs: Vec<RouteMessage> = h
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(refused(format!("listing the routes of {}", link.name)))?;
            out.extend(msgs.iter().filter_map(|m| parse_route(m, link.index)));
        }
        Ok(out)
    }

    async fn add_route(&self, link: &Link, route: GatewayRoute) -> Result<(), NetError> {
        let h = connect()?;
        let msg = route_message(link.index, &route)?;
        h.route().add(msg).execute().await.map_err(refused(format!("adding route {route} on {}", link.name)))
    }

    async fn del_route(&self, link: &Link, route: GatewayRoute) -> Result<(), NetError> {
        let h = connect()?;
        let mut msg = route_message(link.index, &route)?;
        // Match the route whoever added it (`ip route` adds with protocol "boot").
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        match h.route().del(msg).execute().await {
            // Gone already: the kernel drops routes with the addresses they depend on.
            Err(rtnetlink::Error::NetlinkError(m)) if m.to_io().raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other.map_err(refused(format!("deleting route {route} from {}", link.name))),
        }
    }
}
