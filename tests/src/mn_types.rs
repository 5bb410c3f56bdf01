//! The management node's Java classes for what it reads from the agent, as Rust types with the
//! Java field types, to decode the agent's answers and reports as the node's Gson would. Gson
//! ignores unknown fields (so these do too) and fails the whole parse on a field of the wrong
//! JSON type (so do these: a `String` field never takes a number, a `long` never a string).
//! Java `String`, boxed numbers and objects are nullable (`Option`); primitives keep their Java
//! default when absent. Sources: zstackio/zstack at 5a29293b; `KAC` is
//! `plugin/kvm/src/main/java/org/zstack/kvm/KVMAgentCommands.java`.
//!
//! Shared by the agent's unit tests (`#[path]`) and the host tests.

use std::collections::HashMap;

use serde::Deserialize;

fn yes() -> bool {
    true
}

/// `KAC:43-68` `AgentResponse`: `boolean success = true; String error`.
#[derive(Debug, Deserialize)]
pub struct AgentResponse {
    #[serde(default = "yes")]
    pub success: bool,
    pub error: Option<String>,
}

/// `KAC:3403-3406` `VirtualizerInfoTO`.
#[derive(Debug, Deserialize)]
pub struct VirtualizerInfoTO {
    pub uuid: Option<String>,
    pub virtualizer: Option<String>,
    pub version: Option<String>,
}

/// `KAC:448-509` `HostFactResponse`: every field a `String` but `ipAddresses` and
/// `libvirtCapabilities` (`List<String>`) and `virtualizerInfo`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostFactResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub os_distribution: Option<String>,
    pub os_version: Option<String>,
    pub os_release: Option<String>,
    pub qemu_img_version: Option<String>,
    pub libvirt_version: Option<String>,
    pub hvm_cpu_flag: Option<String>,
    pub ept_flag: Option<String>,
    pub cpu_architecture: Option<String>,
    pub cpu_model_name: Option<String>,
    #[serde(rename = "cpuGHz")]
    pub cpu_ghz: Option<String>,
    pub cpu_processor_num: Option<String>,
    pub power_supply_model_name: Option<String>,
    pub power_supply_manufacturer: Option<String>,
    pub ipmi_address: Option<String>,
    pub power_supply_max_power_capacity: Option<String>,
    pub host_cpu_model_name: Option<String>,
    pub system_product_name: Option<String>,
    pub system_serial_number: Option<String>,
    pub system_manufacturer: Option<String>,
    #[serde(rename = "systemUUID")]
    pub system_uuid: Option<String>,
    pub bios_vendor: Option<String>,
    pub bios_version: Option<String>,
    pub bios_release_date: Option<String>,
    pub bmc_version: Option<String>,
    pub uptime: Option<String>,
    pub memory_slots_maximum: Option<String>,
    pub cpu_cache: Option<String>,
    pub ip_addresses: Option<Vec<String>>,
    pub libvirt_capabilities: Option<Vec<String>>,
    pub virtualizer_info: Option<VirtualizerInfoTO>,
    pub iscsi_initiator_name: Option<String>,
}

/// `KAC:331-333` `ConnectResponse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub libvirt_version: Option<String>,
    pub qemu_version: Option<String>,
}

/// `KAC:356-359` `PingResponse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub host_uuid: Option<String>,
    pub send_command_url: Option<String>,
    pub version: Option<String>,
}

/// `KAC:407` `UpdateHostConfigurationResponse`: the base response only.
pub type UpdateHostConfigurationResponse = AgentResponse;

/// `KAC:760-766` `HostCapacityResponse`: `long` × 5 and `int cpuSockets`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostCapacityResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    #[serde(default)]
    pub cpu_num: i64,
    #[serde(default)]
    pub cpu_speed: i64,
    #[serde(default)]
    pub used_cpu: i64,
    #[serde(default)]
    pub total_memory: i64,
    #[serde(default)]
    pub used_memory: i64,
    #[serde(default)]
    pub cpu_sockets: i32,
}

/// `KAC:3475-3478` `VmSyncResponse`: `HashMap<String,String> states`, `List<String>`
/// `vmInShutdowns` and `storagePaths`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSyncResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub states: Option<HashMap<String, String>>,
    pub vm_in_shutdowns: Option<Vec<String>>,
    pub storage_paths: Option<Vec<String>>,
}

/// `plugin/localstorage/.../LocalStorageKvmBackend.java:102-107,183-184` `InitRsp`: the local
/// storage `AgentResponse` (`Long totalCapacity, availableCapacity`) plus
/// `Long localStorageUsedCapacity`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalStorageInitRsp {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub total_capacity: Option<i64>,
    pub available_capacity: Option<i64>,
    pub local_storage_used_capacity: Option<i64>,
}

/// `core/src/main/java/org/zstack/core/progress/ProgressCommands.java:27-35`
/// `ProgressReportCmd`: `detail` is a `Map<String,String>`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReportCmd {
    pub thread_context_map: Option<HashMap<String, String>>,
    pub thread_context_stack: Option<Vec<String>>,
    pub server_uuid: Option<String>,
    pub server_type: Option<String>,
    pub resource_uuid: Option<String>,
    pub progress: Option<String>,
    pub process_type: Option<String>,
    pub detail: Option<HashMap<String, String>>,
}

/// Decodes `json` as the management node would, naming the field that fails.
pub fn decode<T: serde::de::DeserializeOwned>(json: &serde_json::Value) -> Result<T, String> {
    T::deserialize(json).map_err(|e| format!("{e} in {json}"))
}

/// `plugin/ceph/.../primary/CephPrimaryStorageBase.java:212-216` `AgentResponse` (over
/// `CephMonBase.AgentResponse`: `String error; boolean success = true`): `Long totalCapacity,
/// availableCapacity; String type`. Every Ceph primary-storage reply extends it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CephAgentResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub total_capacity: Option<i64>,
    pub available_capacity: Option<i64>,
    #[serde(rename = "type")]
    pub kind: Option<String>,
}

/// `CephPrimaryStorageMonBase.java:62-84` `PingRsp`: `boolean operationFailure;
/// PingOperationFailure failure` (an enum: Gson takes its constant's name).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CephPingRsp {
    #[serde(flatten)]
    pub base: CephAgentResponse,
    #[serde(default)]
    pub operation_failure: bool,
    pub failure: Option<CephPingFailure>,
}

/// `CephPrimaryStorageMonBase.java:62-65`.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub enum CephPingFailure {
    UnableToCreateFile,
    MonAddrChanged,
}

/// `CephPrimaryStorageBase.java:322-325` `InitRsp`: `String fsid, userKey, manufacturer`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CephInitRsp {
    #[serde(flatten)]
    pub base: CephAgentResponse,
    pub fsid: Option<String>,
    pub user_key: Option<String>,
    pub manufacturer: Option<String>,
}

/// `CephPrimaryStorageBase.java:472-475` `CloneRsp`: `Long size, actualSize; String installPath`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CephCloneRsp {
    #[serde(flatten)]
    pub base: CephAgentResponse,
    pub size: Option<i64>,
    pub actual_size: Option<i64>,
    pub install_path: Option<String>,
}

/// `CephPrimaryStorageBase.java:441-442` `DeleteRsp`: `boolean inUse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CephDeleteRsp {
    #[serde(flatten)]
    pub base: CephAgentResponse,
    #[serde(default)]
    pub in_use: bool,
}

/// `CephPrimaryStorageBase.java:1009-1012` `GetBackingChainRsp`: `List<String> backingChain;
/// long totalSize`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CephBackingChainRsp {
    #[serde(flatten)]
    pub base: CephAgentResponse,
    pub backing_chain: Option<Vec<String>>,
    #[serde(default)]
    pub total_size: i64,
}

/// `header/.../vm/devices/DeviceAddress.java:9-21`: every field a `String`.
#[derive(Debug, Deserialize)]
pub struct DeviceAddress {
    #[serde(rename = "type")]
    pub addr_type: Option<String>,
    pub bus: Option<String>,
    pub domain: Option<String>,
    pub slot: Option<String>,
    pub function: Option<String>,
    pub controller: Option<String>,
    pub target: Option<String>,
    pub unit: Option<String>,
}

/// `header/.../vm/devices/VirtualDeviceInfo.java:4-5`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualDeviceInfo {
    pub resource_uuid: Option<String>,
    pub device_address: Option<DeviceAddress>,
}

/// `KAC:2864-2866` `VmNicInfo`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmNicInfo {
    pub mac_address: Option<String>,
    pub device_address: Option<DeviceAddress>,
}

/// `KAC:2802` `StartVmResponse` is `KAC:2805-2813` `VmDevicesInfoResponse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartVmResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub nic_infos: Option<Vec<VmNicInfo>>,
    pub virtual_device_info_list: Option<Vec<VirtualDeviceInfo>>,
    pub mem_balloon_info: Option<VirtualDeviceInfo>,
    pub virtualizer_info: Option<VirtualizerInfoTO>,
}

/// `KAC:3257-3259` `RebootVmResponse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebootVmResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub virtualizer_info: Option<VirtualizerInfoTO>,
}

/// `KAC:1481-1483` `AttachDataVolumeResponse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachDataVolumeResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub virtual_device_info_list: Option<Vec<VirtualDeviceInfo>>,
}

/// `KAC:4143-4153` `TakeSnapshotResponse`: two `String`s and `long size` (validated non-zero).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TakeSnapshotResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub new_volume_install_path: Option<String>,
    pub snapshot_install_path: Option<String>,
    #[serde(default)]
    pub size: i64,
}

/// The replies with nothing but the base fields: `KAC:3167` `StopVmResponse`, `KAC:3193`
/// `PauseVmResponse`, `KAC:3220` `ResumeVmResponse`, `KAC:1442` `DetachDataVolumeResponse`,
/// `KAC:3838` `MergeSnapshotRsp`, `KAC:4289,4301` `AttachIsoRsp`/`DetachIsoRsp`, `KAC:933,996`
/// `CreateBridgeResponse`/`DeleteBridgeResponse`.
pub type EmptyResponse = AgentResponse;

/// `plugin/localstorage/.../LocalStorageKvmBackend.java:102-107` (`LSKB`) the local storage
/// `AgentResponse`: `Long totalCapacity, availableCapacity`, its own `success`/`error`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalStorageResponse {
    #[serde(flatten)]
    pub base: AgentResponse,
    pub total_capacity: Option<i64>,
    pub available_capacity: Option<i64>,
}

/// `LSKB:271-273` `CreateEmptyVolumeRsp` and `LSKB:332-334` `CreateVolumeFromCacheRsp`:
/// `Long actualSize, size`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalStorageVolumeRsp {
    #[serde(flatten)]
    pub base: LocalStorageResponse,
    pub actual_size: Option<i64>,
    pub size: Option<i64>,
}

/// `LSKB:824-826` `GetBackingChainRsp`: `List<String> backingChain; long totalSize`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetBackingChainRsp {
    #[serde(flatten)]
    pub base: LocalStorageResponse,
    pub backing_chain: Option<Vec<String>>,
    #[serde(default)]
    pub total_size: i64,
}

/// `LSKB:384-385` `DeleteBitsRsp`: `boolean inUse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteBitsRsp {
    #[serde(flatten)]
    pub base: LocalStorageResponse,
    #[serde(default)]
    pub in_use: bool,
}

/// `LSKB:553-555` `ReinitImageRsp`: `String newVolumeInstallPath` (`@Validation`: required).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReinitImageRsp {
    #[serde(flatten)]
    pub base: LocalStorageResponse,
    pub new_volume_install_path: String,
}
