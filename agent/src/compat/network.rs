//! L2 networks as the management node realizes them on a host (`KVMRealizeL2NoVlanNetworkBackend`,
//! `KVMRealizeL2VlanNetworkBackend`, `KVMConnectExtensionForL2Network`): Linux bridges, made
//! through [`crate::network`]. One bridge command runs at a time, as in the Python agent.
//! Network services the agent does not provide (flat DHCP, user data, EIP, security groups)
//! are answered by [`unsupported`].

use crate::app::App;
use crate::error::{AgentError, AgentResult, ErrorKind};
use crate::network::bridge::{self, BridgeSpec, Deleted};
use crate::network::{check_ifname, LinkChange, IFNAME_MAX};
use crate::tasks::TaskCtx;
use crate::wire::network::*;
use crate::wire::Empty;

/// Whether the command came on an `l2vlan` path (`vlan` required) or an `l2novlan` one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NoVlan,
    Vlan,
}

/// The bridge the command names, checked before anything is looked at or changed.
fn spec(cmd: &BridgeCmd, kind: Kind) -> AgentResult<BridgeSpec<'_>> {
    check_ifname("bridgeName", &cmd.bridge_name)?;
    check_ifname("physicalInterfaceName", &cmd.physical_interface_name)?;
    let vlan = match (kind, cmd.vlan) {
        (Kind::NoVlan, _) => None,
        (Kind::Vlan, None) => return Err(AgentError::invalid("vlan is missing: an L2 VLAN network needs its VLAN id")),
        (Kind::Vlan, Some(v)) => match u16::try_from(v) {
            Ok(id @ 1..=4094) => Some(id),
            _ => return Err(AgentError::invalid(format!("vlan {v} is not a VLAN id: use 1 to 4094"))),
        },
    };
    if let Some(id) = vlan {
        let name = bridge::vlan_device_name(&cmd.physical_interface_name, id);
        if name.len() > IFNAME_MAX {
            return Err(AgentError::invalid(format!(
                "the VLAN device {name} (physicalInterfaceName.vlan) would be longer than {IFNAME_MAX} characters, Linux's limit"
            )));
        }
    }
    let mtu = match cmd.mtu {
        None | Some(0) => None,
        Some(m @ 68..=65535) => Some(m as u32),
        Some(m) => return Err(AgentError::invalid(format!("mtu {m} is out of range: use 68 to 65535"))),
    };
    if let Some(u) = &cmd.l2_network_uuid {
        if u.is_empty() || u.len() > 64 || !u.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(AgentError::invalid(format!("l2NetworkUuid {u:?} is not a uuid")));
        }
    }
    Ok(BridgeSpec {
        bridge: &cmd.bridge_name,
        physical_interface: &cmd.physical_interface_name,
        vlan,
        mtu,
        l2_network_uuid: cmd.l2_network_uuid.as_deref(),
    })
}

async fn create(app: &App, cmd: BridgeCmd, kind: Kind) -> AgentResult<Empty> {
    let s = spec(&cmd, kind)?;
    if cmd.isolated == Some(true) {
        return Err(AgentError::invalid(format!(
            "isolated L2 networks (private VLAN, enforced with ipset and iptables) are not supported by kvmagent; bridge {} was not made",
            s.bridge
        )));
    }
    if cmd.disable_iptables.is_some() {
        tracing::debug!(bridge = s.bridge, "disableIptables is left to the host's sysctl configuration");
    }
    let _one = app.bridges.lock().await;
    bridge::realize(app.net.as_ref(), &s)
        .await
        .map_err(|e| e.context(format!("cannot create bridge {} from device {}", s.bridge, s.physical_interface)))?;
    tracing::info!(bridge = s.bridge, interface = s.physical_interface, vlan = ?s.vlan, "bridge realized");
    Ok(Empty {})
}

async fn check(app: &App, cmd: BridgeCmd, kind: Kind) -> AgentResult<Empty> {
    let s = spec(&cmd, kind)?;
    let _one = app.bridges.lock().await;
    bridge::check(app.net.as_ref(), s.bridge, s.physical_interface).await?;
    Ok(Empty {})
}

async fn delete(app: &App, cmd: BridgeCmd, kind: Kind) -> AgentResult<Empty> {
    let s = spec(&cmd, kind)?;
    let _one = app.bridges.lock().await;
    let done = bridge::delete(app.net.as_ref(), &s)
        .await
        .map_err(|e| e.context(format!("cannot delete bridge {}", s.bridge)))?;
    match done {
        Deleted::Absent => tracing::info!(bridge = s.bridge, "no such bridge to delete"),
        Deleted::Removed => tracing::info!(bridge = s.bridge, vlan = ?s.vlan, "bridge deleted"),
        Deleted::KeptInUse(addrs) => tracing::warn!(
            bridge = s.bridge,
            addresses = ?addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "bridge carries the host's addresses and is left in place (as ZStack's agent does); move them off and delete it by hand"
        ),
    }
    Ok(Empty {})
}

pub async fn create_novlan(app: &App, _ctx: &TaskCtx, cmd: BridgeCmd) -> AgentResult<Empty> {
    create(app, cmd, Kind::NoVlan).await
}

pub async fn create_vlan(app: &App, _ctx: &TaskCtx, cmd: BridgeCmd) -> AgentResult<Empty> {
    create(app, cmd, Kind::Vlan).await
}

pub async fn check_novlan(app: &App, _ctx: &TaskCtx, cmd: BridgeCmd) -> AgentResult<Empty> {
    check(app, cmd, Kind::NoVlan).await
}

pub async fn check_vlan(app: &App, _ctx: &TaskCtx, cmd: BridgeCmd) -> AgentResult<Empty> {
    check(app, cmd, Kind::Vlan).await
}

pub async fn delete_novlan(app: &App, _ctx: &TaskCtx, cmd: BridgeCmd) -> AgentResult<Empty> {
    delete(app, cmd, Kind::NoVlan).await
}

pub async fn delete_vlan(app: &App, _ctx: &TaskCtx, cmd: BridgeCmd) -> AgentResult<Empty> {
    delete(app, cmd, Kind::Vlan).await
}

/// `/network/checkphysicalnetworkinterface`: every named interface exists (and is set up, as
/// the Python agent does); otherwise fails naming the first missing one in
/// `failedInterfaceNames`.
pub async fn check_interfaces(app: &App, _ctx: &TaskCtx, cmd: CheckInterfacesCmd) -> AgentResult<CheckInterfacesRsp> {
    let links = app.net.links().await?;
    let found: Vec<_> = cmd.interface_names.iter().map(|n| (n, links.iter().find(|l| &l.name == n))).collect();
    if let Some((missing, _)) = found.iter().find(|(_, l)| l.is_none()) {
        return Err(AgentError::not_found(format!(
            "physical interface {missing:?} does not exist on this host; check the L2 network's physicalInterface"
        ))
        .with_field("failedInterfaceNames", vec![missing.to_string()]));
    }
    let _one = app.bridges.lock().await;
    for l in found.into_iter().filter_map(|(_, l)| l).filter(|l| !l.up) {
        app.net.change(l, LinkChange::Up).await?;
    }
    Ok(CheckInterfacesRsp { failed_interface_names: Vec::new() })
}

/// The answer on a path of a network service this agent does not provide.
pub fn unsupported(service: &str, path: &str) -> AgentError {
    AgentError::new(
        ErrorKind::OperationFailed,
        format!("{service} is not provided by kvmagent"),
        format!(
            "{path} belongs to ZStack's {service}, which kvmagent does not implement; attach L3 networks that need no such service to this host's cluster (see the README, \"Network services\")"
        ),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::TestHost;
    use crate::wire::decode;

    fn ctx() -> TaskCtx {
        TaskCtx::detached("/network/l2vlan/createbridge")
    }

    #[tokio::test]
    async fn bad_bridge_commands_are_refused_naming_the_field_and_change_nothing() {
        let h = TestHost::start();
        h.net.add_nic("eth0", true);
        let before = h.net.snapshot();
        for (body, says) in [
            (json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0_0123456789", "vlan": 10}), "bridgeName"),
            (json!({"physicalInterfaceName": "eth0", "bridgeName": "br;reboot", "vlan": 10}), "bridgeName"),
            (json!({"physicalInterfaceName": "../eth0", "bridgeName": "br_eth0", "vlan": 10}), "physicalInterfaceName"),
            (json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0"}), "vlan is missing"),
            (json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0", "vlan": 0}), "vlan 0"),
            (json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0", "vlan": 4095}), "vlan 4095"),
            (json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0", "vlan": -1}), "vlan -1"),
            (json!({"physicalInterfaceName": "eth01234567", "bridgeName": "br_x", "vlan": 1000}), "longer than 15"),
            (json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0", "vlan": 10, "mtu": 10}), "mtu 10"),
            (
                json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0", "vlan": 10, "l2NetworkUuid": "a b"}),
                "l2NetworkUuid",
            ),
            (
                json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0", "vlan": 10, "isolated": true}),
                "isolated",
            ),
        ] {
            let e = create_vlan(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{body}: {e}");
            assert!(e.to_string().contains(says), "{body}: {e}");
            assert_eq!(h.net.snapshot(), before, "{body} changed nothing");
        }
        let missing = json!({"physicalInterfaceName": "eth9", "bridgeName": "br_eth9"});
        let e = create_novlan(&h.app, &ctx(), decode(&missing).unwrap()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("cannot create bridge br_eth9 from device eth9"), "{e}");
        assert_eq!(h.net.snapshot(), before);
    }

    #[tokio::test]
    async fn the_management_nodes_commands_make_check_and_delete_bridges() {
        let h = TestHost::start();
        h.net.add_nic("eth0", false);
        // As Gson sends them: Java primitives present, nulls absent, the extra keys.
        let novlan = json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0", "l2NetworkUuid": "4b0e1d1ff6a84e6c9c1c3b0a7f3f8a8e",
            "disableIptables": false, "mtu": 1500, "isolated": false, "kvmHostAddons": {}});
        let vlan = json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0_10", "vlan": 10, "mtu": 1500,
            "l2NetworkUuid": "5b0e1d1ff6a84e6c9c1c3b0a7f3f8a8e", "kvmHostAddons": {}});
        create_novlan(&h.app, &ctx(), decode(&novlan).unwrap()).await.unwrap();
        create_vlan(&h.app, &ctx(), decode(&vlan).unwrap()).await.unwrap();
        check_novlan(&h.app, &ctx(), decode(&novlan).unwrap()).await.unwrap();
        check_vlan(&h.app, &ctx(), decode(&vlan).unwrap()).await.unwrap();
        assert!(h.net.link("eth0.10").is_some());
        delete_vlan(&h.app, &ctx(), decode(&vlan).unwrap()).await.unwrap();
        assert!(h.net.link("br_eth0_10").is_none() && h.net.link("eth0.10").is_none());
        let e = check_vlan(&h.app, &ctx(), decode(&vlan).unwrap()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
        delete_novlan(&h.app, &ctx(), decode(&novlan).unwrap()).await.unwrap();
        assert!(h.net.link("br_eth0").is_none());
    }

    #[tokio::test]
    async fn a_missing_interface_is_named_in_failed_interface_names() {
        let h = TestHost::start();
        h.net.add_nic("eth0", false);
        let body = json!({"interfaceNames": ["eth0", "eth7"]});
        let e = check_interfaces(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
        assert_eq!(e.fields["failedInterfaceNames"], json!(["eth7"]));
        assert!(!h.net.link("eth0").unwrap().up, "nothing is set up when one is missing");
        check_interfaces(&h.app, &ctx(), decode(&json!({"interfaceNames": ["eth0"]})).unwrap()).await.unwrap();
        assert!(h.net.link("eth0").unwrap().up);
    }

    #[test]
    fn an_unsupported_service_is_named() {
        let e = unsupported("flat DHCP", "/flatnetworkprovider/dhcp/connect");
        assert!(e.to_string().contains("flat DHCP is not provided by kvmagent"), "{e}");
        assert!(e.to_string().contains("/flatnetworkprovider/dhcp/connect"), "{e}");
    }
}
