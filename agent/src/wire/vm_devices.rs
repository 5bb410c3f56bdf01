//! The ZStack paths around a running VM (reference: `KVMAgentCommands.java`): reboot, pause,
//! resume, hot-plugged volumes, ISOs and NICs, the console port, states and volume sync. Field
//! types follow the Java ones exactly (the management node decodes the answers with Gson).

use std::collections::BTreeMap;

use super::vm::{nullable, one_or_many, NicTo, VirtualDeviceInfo, VolumeTo};
use serde::{Deserialize, Serialize};

/// `/vm/reboot`: stop the guest (gracefully for `timeout` seconds, then by force) and start it
/// again, booting from `bootDev` (`hd`, `cdrom`, `network`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RebootVmCmd {
    pub uuid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub timeout: u64,
    #[serde(default, deserialize_with = "one_or_many")]
    pub boot_dev: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RebootVmRsp {
    pub virtualizer_info: super::host::VirtualizerInfo,
}

/// `/vm/pause` and `/vm/resume` (`timeout` is sent, and not needed: both return at once).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseVmCmd {
    pub uuid: String,
}

/// `/vm/attachdatavolume` and `/vm/detachdatavolume`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeCmd {
    pub vm_instance_uuid: String,
    pub volume: VolumeTo,
}

/// The address of what was plugged, as libvirt placed it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachDeviceRsp {
    pub virtual_device_info_list: Vec<VirtualDeviceInfo>,
}

/// `/vm/iso/attach`: insert the ISO into the CD-ROM drive `iso.deviceId`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachIsoCmd {
    pub vm_uuid: String,
    pub iso: IsoTo,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IsoTo {
    pub path: String,
    #[serde(default, deserialize_with = "nullable")]
    pub image_uuid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub device_id: u32,
}

/// `/vm/iso/detach`: eject the medium of the CD-ROM drive `deviceId`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DetachIsoCmd {
    pub vm_uuid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub iso_uuid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub device_id: u32,
}

/// `/vm/attachnic` and `/vm/detachnic`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NicCmd {
    pub vm_uuid: String,
    pub nic: NicTo,
}

/// `/vm/getvncport`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GetVncPortCmd {
    pub vm_uuid: String,
}

/// `GetVncPortResponse`: `port` is an `int`; `vncPort` an `Integer` (no SPICE here, so
/// `spicePort` and `spiceTlsPort` stay absent).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GetVncPortRsp {
    pub port: i32,
    pub protocol: String,
    pub vnc_port: i32,
}

/// `/vm/checkstate`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckVmStateCmd {
    #[serde(default, deserialize_with = "nullable")]
    pub vm_uuids: Vec<String>,
}

/// `states`: VM uuid → `KvmVmState` name.
#[derive(Debug, Serialize)]
pub struct CheckVmStateRsp {
    pub states: BTreeMap<String, crate::libvirt::domains::VmState>,
}

/// `/vm/volumesync`: which volume files under each storage path no running VM uses.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSyncCmd {
    #[serde(default, deserialize_with = "nullable")]
    pub storage_paths: Vec<String>,
}

/// `inactiveVolumePaths`: storage path → the files found unused by this sync and the one
/// before it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSyncRsp {
    pub inactive_volume_paths: BTreeMap<String, Vec<String>>,
}
