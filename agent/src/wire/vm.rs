//! `/vm/start`, `/vm/stop`, `/vm/destroy` (ZStack's StartVmCmd and friends, reference §3.1).
//!
//! ZStack sends `null` for absent boxed values, so every optional field accepts `null` as its
//! default (`nullable`).

use std::borrow::Cow;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{json, Map, Value};

/// Deserializes `null` as the type's default.
pub(super) fn nullable<'de, D: Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Deserializes a list of strings, one string (a list of one) or `null` (empty).
pub(super) fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(vec![s]),
        v @ Value::Array(_) => serde_json::from_value(v).map_err(serde::de::Error::custom),
        other => Err(serde::de::Error::custom(format!("{other} is neither a list of names nor one name"))),
    }
}

/// The schema side of `nullable`: a field that may be left out may also be `null`.
fn nullable_schema(schema: &mut Schema) {
    let required = schema.get("required").cloned().unwrap_or_else(|| json!([]));
    let Some(Value::Object(properties)) = schema.get_mut("properties") else { return };
    let is_required = |name: &str| required.as_array().is_some_and(|r| r.iter().any(|n| n == name));
    for (name, property) in properties.iter_mut() {
        if is_required(name) || accepts_null(property) {
            continue;
        }
        if let Some(Value::String(t)) = property.get("type").cloned() {
            property["type"] = json!([t, "null"]);
        } else {
            let description = property.as_object_mut().and_then(|p| p.remove("description"));
            *property = json!({"anyOf": [property.take(), {"type": "null"}]});
            if let Some(d) = description {
                property["description"] = d;
            }
        }
    }
}

fn accepts_null(schema: &Value) -> bool {
    match schema.get("type") {
        Some(Value::String(t)) => t == "null",
        Some(Value::Array(types)) => types.contains(&json!("null")),
        _ => schema.get("anyOf").and_then(Value::as_array).is_some_and(|branches| branches.iter().any(accepts_null)),
    }
}

/// The schema side of `one_or_many`.
fn one_or_many_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}, {"type": "null"}]})
}

/// The schema of the `vm` object of a native command: StartVmCmd's fields, none of them
/// required (`/vm/create` fills in the volumes; a new VM's overlay names only what changes).
pub struct VmFields;

impl JsonSchema for VmFields {
    fn schema_name() -> Cow<'static, str> {
        "VmFields".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = StartVmCmd::json_schema(generator);
        schema.remove("required");
        schema.insert(
            "description".into(),
            json!("Fields of ZStack's StartVmCmd (see the README), decoded with ZStack's leniency: unknown fields are ignored, null is the default."),
        );
        schema
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = nullable_schema)]
pub struct StartVmCmd {
    pub vm_instance_uuid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub vm_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub vm_internal_id: i64,
    /// Bytes.
    pub memory: u64,
    pub cpu_num: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub max_vcpu_num: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub socket_num: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub cpu_on_socket: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub threads_per_core: Option<u32>,
    #[serde(default, deserialize_with = "nullable")]
    pub use_numa: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub machine_type: String,
    /// `Legacy` (or empty): BIOS; `UEFI`, `UEFI_WITH_CSM`: OVMF (which has no CSM).
    #[serde(default, deserialize_with = "nullable")]
    pub boot_mode: String,
    /// Ours: with a UEFI `bootMode`, OVMF with Secure Boot (Microsoft's keys enrolled).
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "std::ops::Not::not")]
    pub secure_boot: bool,
    /// Firmware boot order (`hd`, `cdrom`, `network`): a list, as the management node sends it,
    /// or one name.
    #[serde(default, deserialize_with = "one_or_many")]
    #[schemars(schema_with = "one_or_many_schema")]
    pub boot_dev: Vec<String>,
    pub root_volume: VolumeTo,
    #[serde(default, deserialize_with = "nullable")]
    pub data_volumes: Vec<VolumeTo>,
    #[serde(default, deserialize_with = "nullable")]
    pub cd_roms: Vec<CdRomTo>,
    #[serde(default, deserialize_with = "nullable")]
    pub nics: Vec<NicTo>,
    #[serde(default, deserialize_with = "nullable")]
    pub create_paused: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub host_management_ip: String,
    #[serde(default, deserialize_with = "nullable")]
    pub clock: String,
    #[serde(default, deserialize_with = "nullable")]
    pub system_serial_number: String,
    #[serde(default, deserialize_with = "nullable")]
    pub chassis_asset_tag: String,
    #[serde(default, deserialize_with = "nullable")]
    pub console_password: String,
    #[serde(default, deserialize_with = "nullable")]
    pub video_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub image_platform: String,
    #[serde(default, deserialize_with = "nullable")]
    pub addons: Map<String, Value>,
    /// Ours: a TPM 2.0 device backed by swtpm.
    #[serde(default, deserialize_with = "nullable")]
    pub tpm: Option<TpmSpec>,
    /// Ours: boot this kernel and initramfs directly (appliances, host tests).
    #[serde(default, deserialize_with = "nullable")]
    pub kernel_boot: Option<KernelBoot>,
    /// `none` (or absent), `host-model`, `host-passthrough` or `custom` (with `vmCpuModelName`).
    #[serde(default, deserialize_with = "nullable")]
    pub nested_virtualization: String,
    /// The named CPU model of `custom` (alone, it implies `custom`).
    #[serde(default, alias = "vmCpuModel", deserialize_with = "nullable")]
    pub vm_cpu_model_name: String,
    /// Ours: iothreads of the VM, which volumes name in `ioThreadId`.
    #[serde(default, deserialize_with = "nullable")]
    pub io_threads: u32,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = nullable_schema)]
pub struct TpmSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub enable: bool,
    /// `tpm-crb` (default) or `tpm-tis`.
    #[serde(default, deserialize_with = "nullable")]
    pub model: String,
    /// Encrypt the TPM's state with this key: base64 of 32 bytes (AES-256), kept in a libvirt
    /// secret of usage `vtpm`. Never answered back.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub key: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = nullable_schema)]
pub struct KernelBoot {
    pub kernel: String,
    #[serde(default, deserialize_with = "nullable")]
    pub initrd: String,
    #[serde(default, deserialize_with = "nullable")]
    pub cmdline: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = nullable_schema)]
pub struct VolumeTo {
    pub install_path: String,
    #[serde(default, deserialize_with = "nullable")]
    pub device_id: u32,
    /// `file` (default) or `ceph`.
    #[serde(default = "file_type", deserialize_with = "nullable_file")]
    pub device_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub volume_uuid: String,
    #[serde(default = "yes", deserialize_with = "nullable_yes")]
    pub use_virtio: bool,
    /// ZStack spells it `useVirtioSCSI`; files written before this fix spell it `useVirtioScsi`.
    #[serde(default, rename = "useVirtioSCSI", alias = "useVirtioScsi", deserialize_with = "nullable")]
    pub use_virtio_scsi: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub shareable: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub cache_mode: String,
    #[serde(default, deserialize_with = "nullable")]
    pub boot_order: u32,
    /// Filled in by the agent from the file itself for file volumes.
    #[serde(default, deserialize_with = "nullable")]
    pub format: String,
    #[serde(default, deserialize_with = "nullable")]
    pub secret_uuid: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub mon_info: Vec<MonInfo>,
    /// Ours: `virtio`, `scsi`, `sata` or `ide`; when given, it overrides `useVirtio` and
    /// `useVirtioSCSI`.
    #[serde(default, deserialize_with = "nullable")]
    pub bus: String,
    /// Ours: `native`, `threads` or `io_uring`.
    #[serde(default, deserialize_with = "nullable")]
    pub io_mode: String,
    /// The VM's iothread serving this disk (from 1; 0 or absent: none).
    #[serde(default, deserialize_with = "nullable")]
    pub io_thread_id: u32,
    /// Ours: I/O limits (ZStack sends them as `addons.VolumeQos`).
    #[serde(default, deserialize_with = "nullable")]
    pub iotune: Option<crate::model::IoTune>,
}

/// ZStack's `addons.VolumeQos[volumeUuid]`: 0 or absent is no limit.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeQos {
    #[serde(default, deserialize_with = "nullable")]
    pub total_bandwidth: u64,
    #[serde(default, deserialize_with = "nullable")]
    pub total_iops: u64,
}

fn file_type() -> String {
    "file".into()
}
fn nullable_file<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.filter(|s| !s.is_empty()).unwrap_or_else(file_type))
}
fn yes() -> bool {
    true
}
fn nullable_yes<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(true))
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = nullable_schema)]
pub struct MonInfo {
    pub hostname: String,
    #[serde(default, deserialize_with = "nullable")]
    pub port: u16,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = nullable_schema)]
pub struct NicTo {
    pub mac: String,
    #[serde(default, deserialize_with = "nullable")]
    pub uuid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub device_id: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub nic_internal_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub bridge_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub mtu: Option<u32>,
    #[serde(default = "yes", deserialize_with = "nullable_yes")]
    pub use_virtio: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub driver_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub boot_order: u32,
    /// `VNIC` (bridge, default) or ours: `user` for user-mode networking on hosts without bridges.
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub nic_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub state: String,
    /// Multi-queue and ring sizes of a virtio NIC.
    #[serde(default, deserialize_with = "nullable")]
    pub v_host_add_on: Option<VHostAddOn>,
}

/// ZStack's `VHostAddOn` (KVMAgentCommands.java): the ring sizes are strings there.
#[derive(Debug, Clone, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = nullable_schema)]
pub struct VHostAddOn {
    #[serde(default, deserialize_with = "nullable")]
    pub queue_num: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub rx_buffer_size: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub tx_buffer_size: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = nullable_schema)]
pub struct CdRomTo {
    #[serde(default, deserialize_with = "nullable")]
    pub resource_uuid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub path: String,
    #[serde(default, deserialize_with = "nullable")]
    pub device_id: u32,
    #[serde(default, deserialize_with = "nullable")]
    pub is_empty: bool,
    #[serde(default, deserialize_with = "nullable")]
    pub boot_order: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopVmCmd {
    pub uuid: String,
    /// `grace` (default: ACPI shutdown, then power off after `timeout`), `cold` or `force`.
    #[serde(default, rename = "type", deserialize_with = "nullable")]
    pub stop_type: String,
    /// Seconds.
    #[serde(default = "default_stop_timeout", deserialize_with = "nullable_timeout")]
    pub timeout: u64,
}

fn default_stop_timeout() -> u64 {
    60
}

/// The longest graceful stop a command may ask for; the VM's lock is held that long at most.
pub const MAX_STOP_TIMEOUT_SECS: u64 = 3600;

/// How `/vm/stop` stops a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// ACPI shutdown, then a hard power-off when the guest has not stopped within the timeout.
    Grace(std::time::Duration),
    /// Hard power-off at once (`cold` and `force`).
    PowerOff,
}

impl StopVmCmd {
    /// The stop asked for; an unknown `type` or a timeout past the bound is refused, named.
    pub fn mode(&self) -> Result<StopMode, crate::error::AgentError> {
        match self.stop_type.as_str() {
            "" | "grace" => grace_period(self.timeout).map(StopMode::Grace),
            "cold" | "force" => Ok(StopMode::PowerOff),
            other => Err(crate::error::AgentError::invalid(format!(
                "type {other:?} is not a stop type (grace, cold or force)"
            ))),
        }
    }
}

/// How long a guest is given to shut down (`timeout` seconds, at least one); a timeout past the
/// bound is refused, named.
pub fn grace_period(timeout: u64) -> Result<std::time::Duration, crate::error::AgentError> {
    if timeout > MAX_STOP_TIMEOUT_SECS {
        return Err(crate::error::AgentError::invalid(format!(
            "timeout {timeout} s is longer than the {MAX_STOP_TIMEOUT_SECS} s a graceful stop may take"
        )));
    }
    Ok(std::time::Duration::from_secs(timeout.max(1)))
}
fn nullable_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Option::<u64>::deserialize(d)?.unwrap_or_else(default_stop_timeout))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestroyVmCmd {
    pub uuid: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StartVmRsp {
    pub nic_infos: Vec<NicInfo>,
    pub virtual_device_info_list: Vec<VirtualDeviceInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_balloon_info: Option<VirtualDeviceInfo>,
    /// The QEMU the VM runs on, as the Python agent's `collect_vm_virtualizer_info` fills it
    /// (`VmDevicesInfoResponse.virtualizerInfo`, KVMAgentCommands.java:2812; the MN saves it in
    /// `KvmHypervisorInfoExtensions.afterReceiveVmDeviceInfoResponse`). Only `/vm/start` sets it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtualizer_info: Option<super::host::VirtualizerInfo>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NicInfo {
    pub mac_address: String,
    pub device_address: DeviceAddress,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VirtualDeviceInfo {
    pub resource_uuid: String,
    pub device_address: DeviceAddress,
}

/// A device address as libvirt reports it (attribute strings, absent ones omitted).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DeviceAddress {
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub addr_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// `/vm/volume/takesnapshot`: the volume's current file becomes the snapshot and a new overlay
/// on it becomes the volume (live on a running VM, by qemu-img otherwise).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TakeSnapshotCmd {
    /// Absent for a detached volume.
    #[serde(default, deserialize_with = "nullable")]
    pub vm_uuid: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub volume_uuid: String,
    /// The new top file (may have been pre-created by the management node).
    pub install_path: String,
    /// The volume's current top file.
    pub volume_install_path: String,
    #[serde(default, deserialize_with = "nullable")]
    pub new_volume_install_path: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub full_snapshot: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TakeSnapshotRsp {
    pub new_volume_install_path: String,
    pub snapshot_install_path: String,
    /// Bytes the snapshot file holds.
    pub size: u64,
}

/// `/vm/volume/mergesnapshot`: on the running VM, pull `destPath`'s chain into it — all of it
/// (`fullRebase`) or down to `srcPath`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MergeSnapshotCmd {
    pub vm_uuid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub src_path: Option<String>,
    pub dest_path: String,
    #[serde(default, deserialize_with = "nullable")]
    pub full_rebase: bool,
}

/// `/vm/createcephsecret`: the libvirt secret RBD disks authenticate with.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateCephSecretCmd {
    /// The cephx key, base64 as Ceph prints it.
    pub user_key: String,
    /// The secret's uuid, which RBD `VolumeTO.secretUuid` names.
    pub uuid: String,
}
