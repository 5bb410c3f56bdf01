//! Native one-call operations (spec §4): all-or-nothing, answered with the management plane's
//! inventory shapes. Unlike ZStack's commands, native ones refuse a field they do not know
//! ([`NativeCommand`]): a misspelt or unsupported option must not be silently dropped. The `vm`
//! objects are ZStack StartVmCmd fields and keep ZStack's leniency.

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::cloud_init::CloudInitSpec;
use super::vm::{StartVmCmd, VmFields};
use crate::error::{AgentError, AgentResult};
use crate::model::{Bus, CacheMode, Firmware, IoMode, IoTune, VmSpec};
use crate::storage::location::Location;

/// `/vm/create`: volumes from an image (or empty), then the domain, per `strategy`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateVmCmd {
    /// A StartVmCmd without its volumes: the agent fills in `rootVolume` and `dataVolumes`
    /// from the specs below before decoding it.
    #[schemars(with = "VmFields")]
    pub vm: Map<String, Value>,
    pub root_volume: VolumeSpec,
    #[serde(default)]
    pub data_volumes: Vec<VolumeSpec>,
    /// The CPU the guest sees (`vm.nestedVirtualization` in ZStack's words); by default the
    /// hypervisor's model.
    #[serde(default)]
    pub cpu_mode: Option<NativeCpuMode>,
    /// The model of `cpuMode` `custom` (`vm.vmCpuModelName`).
    #[serde(default)]
    pub cpu_model: Option<String>,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub tpm: Option<Value>,
    /// How the VM reaches RBD volumes (`ceph://` install paths).
    #[serde(default)]
    pub ceph: Option<CephAccess>,
    /// Guest setup by cloud-init: a NoCloud seed ISO made with the VM.
    #[serde(default)]
    pub cloud_init: Option<CloudInitSpec>,
    /// `bios`, `uefi` or `uefi-secure`; instead of the `vm` object's `bootMode`/`secureBoot`.
    #[serde(default)]
    pub firmware: Option<Firmware>,
}

#[derive(Debug, Default, Clone, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CephAccess {
    /// The libvirt secret `/vm/createcephsecret` defined.
    #[serde(default)]
    pub secret_uuid: Option<String>,
    /// Monitors: `[{hostname, port}]`.
    #[serde(default)]
    pub mon_info: Vec<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NativeCpuMode {
    None,
    HostModel,
    HostPassthrough,
    Custom,
}

/// A new volume of `/vm/create` (the root or a data volume) and how the guest sees it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    pub volume_uuid: String,
    pub install_path: String,
    /// The cached image to build the volume from; without it, an empty volume of `size` bytes.
    #[serde(default)]
    pub image_path: Option<String>,
    /// Virtual size; for an image-based volume, grows it beyond the image's size.
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub provisioning: Provisioning,
    /// By default virtio.
    #[serde(default)]
    pub bus: Option<Bus>,
    /// By default none.
    #[serde(default)]
    pub cache: Option<CacheMode>,
    /// By default the hypervisor's.
    #[serde(default)]
    pub io: Option<IoMode>,
    /// The VM's iothread (from 1, up to `vm.ioThreads`) serving the disk.
    #[serde(default)]
    pub iothread: Option<u32>,
    #[serde(default)]
    pub iotune: Option<IoTune>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    /// An overlay on the cached image (root) or a sparse qcow2 (data).
    #[default]
    Thin,
    /// A full copy of the image (root) or a fully allocated qcow2.
    Thick,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
pub enum Strategy {
    /// Volumes, domain defined and started.
    #[default]
    InstantStart,
    /// Volumes and a defined domain, not started.
    CreateStopped,
    /// Volumes only; no domain.
    JustCreate,
}

/// `/vm/changeimage`: replace a stopped VM's root disk with a new one built from another image.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeImageCmd {
    pub vm_uuid: String,
    pub image_path: String,
    /// Where the new root goes; by default a fresh name beside the old root.
    #[serde(default)]
    pub new_root_install_path: Option<String>,
    /// Ceph placement tags (`ceph::rootPoolName::<pool>`); local storage has no use for them.
    #[serde(default)]
    pub system_tags: Vec<String>,
    /// The new root's volume uuid (its disk serial); by default the old root's.
    #[serde(default)]
    pub volume_uuid: Option<String>,
    /// The new image's platform (`imagePlatform`); by default the VM's stays.
    #[serde(default)]
    pub platform: Option<String>,
}

/// `/vm/clone`: one VM into N named copies.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneVmCmd {
    pub vm_uuid: String,
    /// One clone per name (or per entry of `clones`).
    #[serde(default)]
    pub names: Vec<String>,
    /// Also clone the data volumes (the management plane's `full`); otherwise root only.
    #[serde(default)]
    pub full: bool,
    /// `linked` (default): overlays on a frozen snapshot of the source; `copy`: independent
    /// flat copies.
    #[serde(default)]
    pub mode: CloneMode,
    #[serde(default)]
    pub strategy: Strategy,
    /// Per-clone choices; anything left out is generated.
    #[serde(default)]
    pub clones: Vec<CloneSpec>,
    /// cloud-init settings for every clone, over the source's (no `hostname`: each clone has
    /// its own, in `clones[i].cloudInit`, by default its name).
    #[serde(default)]
    pub cloud_init: Option<CloudInitSpec>,
    #[serde(default)]
    pub quiesce: Quiesce,
    /// `bios`, `uefi` or `uefi-secure`; by default the source's. A clone with the source's
    /// firmware gets a copy of its NVRAM, one with another a fresh one.
    #[serde(default)]
    pub firmware: Option<Firmware>,
}

/// Whether a capture of a running VM (snapshot group, clone, backup) first freezes the guest's
/// filesystems through its guest agent, so that the capture is what a clean shutdown would
/// leave rather than what a power cut would.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Quiesce {
    /// When the guest agent answers; otherwise the capture is crash-consistent.
    #[default]
    Auto,
    /// A running VM whose guest agent does not answer is not captured: the call fails.
    Required,
    /// Never: crash-consistent.
    Off,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CloneMode {
    #[default]
    Linked,
    Copy,
}

#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloneSpec {
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub root_install_path: Option<String>,
    #[serde(default)]
    pub data_install_paths: Vec<String>,
    /// The clone's root volume uuid (its disk serial); by default a new one.
    #[serde(default)]
    pub root_volume_uuid: Option<String>,
    /// The clone's data volume uuids, in the source's data-volume order, one per cloned data
    /// volume; by default new ones.
    #[serde(default)]
    pub data_volume_uuids: Option<Vec<String>>,
    /// NicTO objects for the clone; by default the source's NICs with fresh MACs and uuids.
    #[serde(default)]
    pub nics: Option<Vec<Value>>,
    /// This clone's cloud-init settings, over the call's and the source's.
    #[serde(default)]
    pub cloud_init: Option<CloudInitSpec>,
}

#[derive(Debug, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloneVmRsp {
    pub number_of_cloned_vm: usize,
    /// One entry per requested clone, in request order: `{inventory}` or `{uuid, name, error}`.
    pub inventories: Vec<Value>,
    /// The source volumes frozen for linked clones: their new install paths and the snapshot
    /// files the clones are built on.
    pub source_volumes: Vec<Value>,
    /// Whether the guest's filesystems were frozen for the capture the clones are made from.
    pub quiesced: bool,
}

/// `/vm/flatten`: cut volumes loose from their backing chains.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlattenVmCmd {
    pub vm_uuid: String,
    /// All volumes (the management plane's default) or the root only.
    #[serde(default = "all_volumes")]
    pub full: bool,
    /// Change nothing; answer what the flatten would add.
    #[serde(default)]
    pub dry_run: bool,
}

fn all_volumes() -> bool {
    true
}

#[derive(Debug, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlattenEstimateRsp {
    pub volumes: Vec<VolumeEstimate>,
    pub total_bytes_to_add: u64,
}

#[derive(Debug, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeEstimate {
    pub uuid: String,
    pub install_path: String,
    pub bytes_to_add: u64,
}

/// The new VM of `/vm/createfromsnapshot` and `/vm/createfrombackup`: made from the source VM's
/// recorded spec, with these changes.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewVmTarget {
    /// StartVmCmd fields that replace the source's (`vmInstanceUuid`, `vmName`, `cpuNum`,
    /// `memory`, `nics`, `imagePlatform`...). Left out: a fresh uuid and serial, the source's
    /// NICs with fresh MACs, everything else as the source had it.
    #[serde(default)]
    #[schemars(with = "VmFields")]
    pub vm: Map<String, Value>,
    /// Where the root goes; by default a new volume beside the source's.
    #[serde(default)]
    pub root_volume: Option<NewVolume>,
    /// Which data volumes to make, and where; by default all of the source's, beside them.
    #[serde(default)]
    pub data_volumes: Option<Vec<NewVolume>>,
    #[serde(default)]
    pub strategy: Strategy,
    /// How the VM reaches RBD volumes, when they go to Ceph.
    #[serde(default)]
    pub ceph: Option<CephAccess>,
    /// Guest setup by cloud-init for the new VM (the source's, if it had any, is not kept).
    #[serde(default)]
    pub cloud_init: Option<CloudInitSpec>,
    /// `bios`, `uefi` or `uefi-secure`; by default the source's. With the source's firmware the
    /// new VM gets a copy of the NVRAM the group or backup point kept; otherwise a fresh one.
    #[serde(default)]
    pub firmware: Option<Firmware>,
}

#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewVolume {
    /// The source volume this one is made from.
    #[serde(default)]
    pub source_volume_uuid: Option<String>,
    /// Or the snapshot it is made from (`/vm/createfromsnapshot` only).
    #[serde(default)]
    pub snapshot_path: Option<String>,
    #[serde(default)]
    pub volume_uuid: Option<String>,
    #[serde(default)]
    pub install_path: Option<String>,
}

/// `/vm/snapshotgroup/take`: one snapshot of every volume of a VM, at one instant.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TakeSnapshotGroupCmd {
    pub vm_uuid: String,
    /// By default a new one.
    #[serde(default)]
    pub group_uuid: Option<String>,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub quiesce: Quiesce,
}

/// `/vm/snapshotgroup/get`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotGroupRef {
    pub group_uuid: String,
}

/// A snapshot group, as recorded by the agent and answered by the snapshot paths.
#[derive(Debug, Clone, serde::Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotGroup {
    pub group_uuid: String,
    pub vm_uuid: String,
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The VM's spec at the instant, its volumes at the paths they had then.
    pub vm: crate::wire::vm::StartVmCmd,
    pub snapshots: Vec<GroupSnapshot>,
    /// Whether the guest's filesystems were frozen for the instant (false in groups recorded
    /// before this field existed).
    #[serde(default)]
    pub quiesced: bool,
}

#[derive(Debug, Clone, serde::Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshot {
    pub volume_uuid: String,
    /// `Root` or `Data`.
    pub volume_type: String,
    pub device_id: u32,
    /// A read-only qcow2 file (the volume's former top), or `ceph://pool/image@snap`.
    pub snapshot_path: String,
    pub size: u64,
    /// Where the volume is after the snapshot: the new top a file volume goes on writing to,
    /// or the RBD image itself. (Absent in groups recorded before this field existed.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_install_path: Option<String>,
}

/// `/vm/createfromsnapshot`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
// `unknown` refuses what the flattened fields leave: as `deny_unknown_fields` would.
#[schemars(extend("additionalProperties" = false))]
pub struct CreateFromSnapshotCmd {
    pub group_uuid: String,
    #[serde(flatten)]
    pub target: NewVmTarget,
    /// `thin` (default): overlays on the snapshots (RBD clones); `thick`: full copies.
    #[serde(default)]
    pub provisioning: Provisioning,
    /// What no field above took (last, so it sees only the leftovers): refused.
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: Map<String, Value>,
}

/// `/vm/backup`: a point of a backup group — the first (full) one, or an incremental on the
/// group's newest point.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackupVmCmd {
    pub vm_uuid: String,
    #[serde(default)]
    pub mode: BackupMode,
    /// A new group's uuid (by default a new one), or the group an incremental adds to.
    #[serde(default)]
    pub group_uuid: Option<String>,
    /// A directory inside one of the configured backup roots; by default the first root.
    #[serde(default)]
    pub backup_root: Option<String>,
    #[serde(default)]
    pub quiesce: Quiesce,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackupMode {
    #[default]
    Full,
    Incremental,
}

#[derive(Debug, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupVmRsp {
    pub group_uuid: String,
    pub group_path: String,
    /// The point this call added.
    pub point: usize,
    pub manifest: crate::backup_group::Manifest,
    /// Whether the guest's filesystems were frozen for the point's instant.
    pub quiesced: bool,
    /// For an incremental point: `bitmap` when only the clusters written since the previous
    /// point were read, `compare` when the whole disk was compared with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incremental_by: Option<IncrementalBy>,
    /// Why an incremental point compared instead of reading its bitmaps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incremental_reason: Option<String>,
}

/// How an incremental backup point found what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IncrementalBy {
    /// Dirty bitmaps of local qcow2 volumes.
    Bitmap,
    /// The difference between the previous and the new point's RBD snapshots.
    #[serde(rename = "snapshot-diff")]
    SnapshotDiff,
    Compare,
}

/// `/vm/createfrombackup`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
// `unknown` refuses what the flattened fields leave: as `deny_unknown_fields` would.
#[schemars(extend("additionalProperties" = false))]
pub struct CreateFromBackupCmd {
    pub group_uuid: String,
    #[serde(default)]
    pub backup_root: Option<String>,
    /// The point to restore; by default the newest.
    #[serde(default)]
    pub point: Option<usize>,
    #[serde(flatten)]
    pub target: NewVmTarget,
    /// What no field above took (last, so it sees only the leftovers): refused.
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: Map<String, Value>,
}

impl CreateVmCmd {
    /// The new VM: the caller's `vm` object (StartVmCmd fields) with the volumes filled in, in
    /// the model.
    pub fn to_spec(&self) -> AgentResult<VmSpec> {
        let mut vm = self.vm.clone();
        vm.insert("rootVolume".into(), self.volume_to(&self.root_volume, 0));
        let data: Vec<Value> = (self.data_volumes.iter().enumerate()).map(|(i, d)| self.volume_to(d, i + 1)).collect();
        vm.insert("dataVolumes".into(), Value::Array(data));
        if let Some(tpm) = &self.tpm {
            vm.insert("tpm".into(), tpm.clone());
        }
        if let Some(mode) = self.cpu_mode {
            let mode = match mode {
                NativeCpuMode::None => "none",
                NativeCpuMode::HostModel => "host-model",
                NativeCpuMode::HostPassthrough => "host-passthrough",
                NativeCpuMode::Custom => "custom",
            };
            vm.insert("nestedVirtualization".into(), json!(mode));
        }
        if let Some(model) = &self.cpu_model {
            vm.insert("vmCpuModelName".into(), json!(model));
        }
        if let Some(f) = self.firmware {
            set_firmware(&mut vm, f);
        }
        let wire: StartVmCmd =
            super::decode(&Value::Object(vm)).map_err(|e| AgentError::invalid(format!("vm: {}", e.details)))?;
        let mut spec = wire.to_spec()?;
        spec.renew_genid();
        Ok(spec)
    }

    /// The VolumeTO of a new volume: a qcow2 file, or an RBD image reached as `ceph` says.
    fn volume_to(&self, v: &VolumeSpec, device_id: usize) -> Value {
        let (path, uuid) = (&v.install_path, &v.volume_uuid);
        let mut to = if Location::is_rbd(path) {
            let ceph = self.ceph.clone().unwrap_or_default();
            json!({"installPath": path, "volumeUuid": uuid, "deviceId": device_id, "deviceType": "ceph",
                   "format": "raw", "secretUuid": ceph.secret_uuid, "monInfo": ceph.mon_info})
        } else {
            json!({"installPath": path, "volumeUuid": uuid, "deviceId": device_id, "deviceType": "file",
                   "format": "qcow2"})
        };
        let guest = json!({"bus": v.bus.map(Bus::as_str), "cacheMode": v.cache.map(CacheMode::as_str),
                           "ioMode": v.io.map(IoMode::as_str), "ioThreadId": v.iothread, "iotune": v.iotune});
        if let (Value::Object(to), Value::Object(guest)) = (&mut to, guest) {
            to.extend(guest);
        }
        to
    }
}

impl NewVmTarget {
    /// The new VM's spec: `base` with a fresh uuid and serial number and this target's `vm`
    /// fields (StartVmCmd fields, laid over the base's wire form). NICs and volumes are the
    /// caller's to set.
    pub fn overlay(&self, base: &VmSpec) -> AgentResult<VmSpec> {
        let mut vm = serde_json::to_value(StartVmCmd::from_spec(base))
            .map_err(|e| AgentError::internal(format!("cannot encode the source spec: {e}")))?
            .as_object()
            .cloned()
            .unwrap_or_default();
        vm.insert("systemSerialNumber".into(), Value::String(uuid::Uuid::new_v4().to_string()));
        vm.insert("vmInstanceUuid".into(), Value::String(uuid::Uuid::new_v4().simple().to_string()));
        vm.extend(self.vm.clone());
        if let Some(f) = self.firmware {
            set_firmware(&mut vm, f);
        }
        vm.remove("nics");
        let wire: StartVmCmd = super::decode(&Value::Object(vm)).map_err(|e| e.context("vm"))?;
        let mut spec = wire.to_spec().map_err(|e| e.context("vm"))?;
        spec.renew_genid();
        Ok(spec)
    }

    /// The NicTOs the target gives, if any.
    pub fn nics(&self) -> Option<&Vec<Value>> {
        self.vm.get("nics").and_then(Value::as_array)
    }
}

/// The StartVmCmd fields that say `firmware`, set in a `vm` object.
fn set_firmware(vm: &mut Map<String, Value>, firmware: Firmware) {
    vm.insert("bootMode".into(), json!(if firmware.is_uefi() { "UEFI" } else { "Legacy" }));
    vm.insert("secureBoot".into(), json!(firmware == Firmware::UefiSecure));
}

/// `/image/cache`: an image into the local-storage cache from an `http://`, `https://` or
/// `sftp://[user@]host[:port]/path` URL, verified against its SHA-256.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheImageCmd {
    pub url: String,
    /// 64 hex digits.
    pub sha256: String,
    pub install_path: String,
    /// For `sftp://`: the private key (OpenSSH or PEM form) the server accepts.
    #[serde(default)]
    pub ssh_key: Option<String>,
    /// For `sftp://`: the server's public host key (`<type> <base64>`, as in `known_hosts`);
    /// with it, any other key is refused. Without it, any host key is accepted.
    #[serde(default)]
    pub host_key: Option<String>,
}

#[derive(Debug, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheImageRsp {
    pub install_path: String,
    pub size: u64,
    pub sha256: String,
    /// False when the image was already in the cache (or another request fetched it meanwhile).
    pub downloaded: bool,
}

/// A native command: decoded strictly by [`crate::wire::decode_native`].
pub trait NativeCommand: serde::de::DeserializeOwned {
    /// Top-level keys a catch-all collected (commands that flatten a shared part cannot use
    /// serde's `deny_unknown_fields`).
    fn unknown_keys(&self) -> Vec<&str> {
        Vec::new()
    }
}

impl NativeCommand for CreateVmCmd {}
impl NativeCommand for ChangeImageCmd {}
impl NativeCommand for CloneVmCmd {}
impl NativeCommand for FlattenVmCmd {}
impl NativeCommand for TakeSnapshotGroupCmd {}
impl NativeCommand for SnapshotGroupRef {}
impl NativeCommand for BackupVmCmd {}
impl NativeCommand for CacheImageCmd {}

impl NativeCommand for CreateFromSnapshotCmd {
    fn unknown_keys(&self) -> Vec<&str> {
        self.unknown.keys().map(String::as_str).collect()
    }
}

impl NativeCommand for CreateFromBackupCmd {
    fn unknown_keys(&self) -> Vec<&str> {
        self.unknown.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::decode_native;
    use serde_json::json;

    fn refused<T: NativeCommand + std::fmt::Debug>(body: Value, field: &str) {
        let e = decode_native::<T>(&body).expect_err(&body.to_string());
        assert!(e.details.contains(field), "{body}: {}", e.details);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let create = json!({"vm": {}, "rootVolume": {"volumeUuid": "a", "installPath": "/r/a", "size": 1},
                            "dataVolumes": [{"volumeUuid": "d", "installPath": "/r/d", "size": 1, "imageUrl": "/i"}]});
        refused::<CreateVmCmd>(create, "imageUrl");
        refused::<CloneVmCmd>(json!({"vmUuid": "v", "names": ["a"], "linked": true}), "linked");
        refused::<CloneVmCmd>(json!({"vmUuid": "v", "clones": [{"rootUuid": "x"}]}), "rootUuid");
        refused::<FlattenVmCmd>(json!({"vmUuid": "v", "dryrun": true}), "dryrun");
        refused::<ChangeImageCmd>(json!({"vmUuid": "v", "imagePath": "/i", "newRootUuid": "x"}), "newRootUuid");
        for (volume, field) in [
            (json!({"bus": "usb"}), "bus"),
            (json!({"cache": "fast"}), "cache"),
            (json!({"io": "aio"}), "io"),
            (json!({"iothread": -1}), "iothread"),
            (json!({"iotune": {"totalBytesSec": "lots"}}), "totalBytesSec"),
            (json!({"iotune": {"total_bytes_sec": 1}}), "total_bytes_sec"),
        ] {
            let mut root = json!({"volumeUuid": "a", "installPath": "/r/a", "size": 1});
            root.as_object_mut().unwrap().extend(volume.as_object().unwrap().clone());
            refused::<CreateVmCmd>(json!({"vm": {}, "rootVolume": root}), field);
        }
        refused::<CreateVmCmd>(
            json!({"vm": {}, "rootVolume": {"volumeUuid": "a", "installPath": "/r/a"}, "cpuMode": "max"}),
            "cpuMode",
        );
        refused::<TakeSnapshotGroupCmd>(json!({"vmUuid": "v", "quiesce": true}), "quiesce");
        refused::<BackupVmCmd>(json!({"vmUuid": "v", "mode": "full", "compress": true}), "compress");
        refused::<CacheImageCmd>(
            json!({"url": "http://h/i", "sha256": "00", "installPath": "/r/i", "md5sum": "x"}),
            "md5sum",
        );
        refused::<CreateFromSnapshotCmd>(
            json!({"groupUuid": "g", "provisioning": "thin", "bootloader": "uefi"}),
            "bootloader",
        );
        refused::<CreateFromSnapshotCmd>(json!({"groupUuid": "g", "rootVolume": {"size": 1}}), "size");
        refused::<CreateFromBackupCmd>(json!({"groupUuid": "g", "point": 0, "provisioning": "thin"}), "provisioning");
        refused::<CloneVmCmd>(json!({"vmUuid": "v", "cloudInit": {"hostnme": "a"}}), "hostnme");
        refused::<CloneVmCmd>(json!({"vmUuid": "v", "clones": [{"cloudInit": {"sshkeys": []}}]}), "sshkeys");
        refused::<CreateFromSnapshotCmd>(
            json!({"groupUuid": "g", "cloudInit": {"network": [{"mac": "x", "ip": 1}]}}),
            "ip",
        );
    }

    #[test]
    fn volume_and_cpu_choices_reach_the_spec() {
        use crate::model::{CpuMode, IoTune};
        let body = json!({
            "vm": {"vmInstanceUuid": "0123456789abcdef0123456789abcdef", "memory": 1 << 30, "cpuNum": 1,
                   "ioThreads": 2, "machineType": "pc"},
            "cpuMode": "custom", "cpuModel": "qemu64",
            "rootVolume": {"volumeUuid": "a", "installPath": "/r/a", "size": 1, "bus": "ide", "cache": "directsync",
                           "io": "native"},
            "dataVolumes": [{"volumeUuid": "d", "installPath": "/r/d", "imagePath": "/i", "bus": "scsi",
                             "iothread": 2, "io": "io_uring", "iotune": {"readBytesSec": 7}}],
        });
        let spec = decode_native::<CreateVmCmd>(&body).unwrap().to_spec().unwrap();
        assert_eq!(spec.cpu.mode, Some(CpuMode::Custom("qemu64".into())));
        assert_eq!(spec.iothreads, 2);
        let (root, data) = (&spec.volumes[0], &spec.volumes[1]);
        assert_eq!((root.bus, root.cache, root.io), (Bus::Ide, CacheMode::Directsync, Some(IoMode::Native)));
        assert_eq!((data.bus, data.iothread, data.io), (Bus::Scsi, Some(2), Some(IoMode::IoUring)));
        assert_eq!(data.iotune, Some(IoTune { read_bytes_sec: Some(7), ..IoTune::default() }));
        let mut q35 = body.clone();
        q35["vm"]["machineType"] = json!("q35");
        let e = decode_native::<CreateVmCmd>(&q35).unwrap().to_spec().unwrap_err();
        assert!(e.to_string().contains("bus ide needs machine type pc"), "{e}");
    }

    #[test]
    fn known_and_common_fields_pass() {
        let common = json!({"threadContext": {"api": "x"}, "taskContext": {}, "kvmHostAddons": {}});
        let mut body = json!({"groupUuid": "g", "point": 1, "vm": {"anyStartVmField": 1}, "strategy": "JustCreate"});
        body.as_object_mut().unwrap().extend(common.as_object().unwrap().clone());
        let cmd = decode_native::<CreateFromBackupCmd>(&body).unwrap();
        assert_eq!((cmd.point, cmd.target.strategy), (Some(1), Strategy::JustCreate));
        let mut flatten = json!({"vmUuid": "v", "dryRun": true});
        flatten.as_object_mut().unwrap().extend(common.as_object().unwrap().clone());
        assert!(decode_native::<FlattenVmCmd>(&flatten).unwrap().dry_run);
    }
}
