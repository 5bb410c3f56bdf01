//! Host admission and sync paths (spec §2) and `/job/cancel`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::libvirt::domains::VmState;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectCmd {
    pub host_uuid: String,
    #[serde(default)]
    pub send_command_url: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    /// Rules the management node wants in the host's firewall: left to the operator.
    #[serde(default)]
    pub iptables_rules: Option<Vec<String>>,
    /// The `kvm` module's `ignore_msrs`.
    #[serde(default)]
    pub ignore_msrs: bool,
    /// EPT off in `kvm_intel` (only checked: changing it means reloading the module).
    #[serde(default)]
    pub page_table_extension_disabled: bool,
    /// Where the management node listens for the TCP liveness counter: not opened.
    #[serde(default)]
    pub tcp_server_port: Option<u32>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectRsp {
    pub libvirt_version: String,
    pub qemu_version: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingCmd {
    #[serde(default)]
    pub host_uuid: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PingRsp {
    pub host_uuid: Option<String>,
    pub send_command_url: Option<String>,
    pub version: Option<String>,
}

/// `/host/update/configuration` (ZStack's `UpdateHostConfigurationCmd`): a management node that
/// took the host over names where agent-initiated commands go now.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateConfigurationCmd {
    #[serde(default)]
    pub host_uuid: Option<String>,
    #[serde(default)]
    pub send_command_url: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct UpdateConfigurationRsp {}

/// ZStack's `HostFactResponse`: every field a `String` (or list of them) on the management
/// node's side, so numbers go as strings; an unknown value is absent, never empty.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FactRsp {
    /// `vmx` or `svm`; absent when the CPU offers neither (the management node then refuses
    /// the host and says to enable virtualization in the BIOS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hvm_cpu_flag: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ept_flag: Option<&'static str>,
    /// libvirt's name for the host CPU model (`<host><cpu><model>`), e.g. `EPYC-Rome`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_model_name: Option<String>,
    /// The processor's own name, from `/proc/cpuinfo`.
    pub host_cpu_model_name: String,
    #[serde(rename = "cpuGHz")]
    pub cpu_ghz: String,
    pub cpu_processor_num: String,
    pub cpu_architecture: String,
    pub os_distribution: String,
    pub os_version: String,
    pub os_release: String,
    pub libvirt_version: String,
    pub qemu_img_version: String,
    pub hostname: String,
    pub libvirt_capabilities: Vec<String>,
    pub virtualizer_info: VirtualizerInfo,
    pub system_product_name: String,
    pub system_serial_number: String,
    pub system_manufacturer: String,
    #[serde(rename = "systemUUID")]
    pub system_uuid: String,
    pub bios_vendor: String,
    pub bios_version: String,
    pub bios_release_date: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_slots_maximum: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uptime: Option<String>,
    pub ip_addresses: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iscsi_initiator_name: Option<String>,
}

/// ZStack's `VirtualizerInfoTO`, which the management node dereferences unconditionally.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VirtualizerInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    pub virtualizer: &'static str,
    pub version: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CapacityRsp {
    pub cpu_num: u32,
    pub cpu_speed: u64,
    pub used_cpu: u32,
    pub total_memory: u64,
    pub used_memory: u64,
    pub cpu_sockets: u32,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSyncRsp {
    pub states: BTreeMap<String, VmState>,
    pub vm_in_shutdowns: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelCmd {
    pub cancellation_api_id: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelRsp {
    pub cancelled: usize,
}
