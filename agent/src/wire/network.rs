//! L2 network paths (`/network/l2novlan/*`, `/network/l2vlan/*`,
//! `/network/checkphysicalnetworkinterface`): the management node's `CreateBridgeCmd`,
//! `CreateVlanBridgeCmd`, `CheckBridgeCmd`, `CheckVlanBridgeCmd`, `DeleteBridgeCmd`,
//! `DeleteVlanBridgeCmd` and `CheckPhysicalNetworkInterfaceCmd` (`KVMAgentCommands.java`).
//! The VLAN check is sent the whole `CreateVlanBridgeCmd`; unknown fields are ignored.

use serde::{Deserialize, Serialize};

/// Create, check or delete a bridge; `vlan` is present on the `l2vlan` paths only.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgeCmd {
    pub physical_interface_name: String,
    pub bridge_name: String,
    #[serde(default)]
    pub l2_network_uuid: Option<String>,
    /// Java `Integer`: absent when the management node has none.
    #[serde(default)]
    pub mtu: Option<i64>,
    /// Java `int` on the VLAN commands; absent on the others.
    #[serde(default)]
    pub vlan: Option<i64>,
    /// Java `Boolean`s the Python agent applies with iptables/sysctl; see the README.
    #[serde(default)]
    pub disable_iptables: Option<bool>,
    #[serde(default)]
    pub isolated: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckInterfacesCmd {
    #[serde(default)]
    pub interface_names: Vec<String>,
}

/// `CheckPhysicalNetworkInterfaceResponse`: on failure, the names not found.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckInterfacesRsp {
    pub failed_interface_names: Vec<String>,
}
