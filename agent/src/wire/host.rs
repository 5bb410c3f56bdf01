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

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FactRsp {
    /// `vmx`, `svm`, or empty when the CPU offers neither (never null: the management node
    /// refuses a host without it).
    pub hvm_cpu_flag: String,
    pub ept_flag: String,
    pub cpu_model_name: String,
    pub cpu_architecture: String,
    pub os_distribution: String,
    pub os_version: String,
    pub os_release: String,
    pub libvirt_version: String,
    pub qemu_img_version: String,
    pub hostname: String,
    pub libvirt_capabilities: Vec<String>,
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
