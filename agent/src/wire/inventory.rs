//! The management plane's inventory shapes that native operations return
//! (`VmInstanceInventory` with `allVolumes`, `vmNics`, `vmCdRoms`; field names as in its API).

use schemars::JsonSchema;
use serde::Serialize;

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmInstanceInventory {
    pub uuid: String,
    pub name: String,
    /// `Running`, `Paused`, `Stopped` (defined, not running) or `Created` (volumes only).
    pub state: String,
    pub hypervisor_type: &'static str,
    #[serde(rename = "type")]
    pub vm_type: &'static str,
    pub memory_size: u64,
    pub cpu_num: u32,
    pub platform: String,
    pub architecture: String,
    pub internal_id: i64,
    pub root_volume_uuid: String,
    pub host_uuid: Option<String>,
    pub all_volumes: Vec<VolumeInventory>,
    pub vm_nics: Vec<VmNicInventory>,
    pub vm_cd_roms: Vec<VmCdRomInventory>,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeInventory {
    pub uuid: String,
    pub name: String,
    pub vm_instance_uuid: String,
    pub install_path: String,
    /// `Root` or `Data`.
    #[serde(rename = "type")]
    pub volume_type: &'static str,
    pub format: String,
    pub size: u64,
    pub actual_size: u64,
    pub device_id: u32,
    pub state: &'static str,
    pub status: &'static str,
    pub is_shareable: bool,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmNicInventory {
    pub uuid: String,
    pub vm_instance_uuid: String,
    pub mac: String,
    pub device_id: u32,
    pub internal_name: String,
    pub driver_type: String,
    #[serde(rename = "type")]
    pub nic_type: String,
}

#[derive(Debug, Clone, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VmCdRomInventory {
    pub uuid: String,
    pub vm_instance_uuid: String,
    pub device_id: u32,
    pub iso_install_path: Option<String>,
    pub name: String,
}
