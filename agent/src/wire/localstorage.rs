//! Local primary-storage paths (reference §3.3). Every response also carries the storage's
//! `totalCapacity` and `availableCapacity`, which the management node uses to track the host.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WithCapacity<T: Serialize> {
    #[serde(flatten)]
    pub rsp: T,
    pub total_capacity: u64,
    pub available_capacity: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitCmd {
    pub path: String,
    /// A flag file the management node checks on reconnect (`check/initializedfile`).
    #[serde(default)]
    pub init_file_path: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRsp {
    pub local_storage_used_capacity: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckBitsCmd {
    pub path: String,
}

#[derive(Debug, Serialize)]
pub struct CheckBitsRsp {
    pub existing: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateVolumeFromCacheCmd {
    pub template_path_in_cache: String,
    pub install_url: String,
    #[serde(default)]
    pub volume_uuid: Option<String>,
    /// 0 keeps the image's size.
    #[serde(default)]
    pub virtual_size: Option<u64>,
    #[serde(default)]
    pub kvm_host_addons: Option<KvmHostAddons>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct KvmHostAddons {
    pub qcow2_options: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateEmptyVolumeCmd {
    pub install_url: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub volume_uuid: Option<String>,
    #[serde(default)]
    pub backing_file: Option<String>,
    #[serde(default)]
    pub kvm_host_addons: Option<KvmHostAddons>,
}

/// `size` is the virtual size, `actualSize` the bytes allocated on disk.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeSizeRsp {
    pub size: u64,
    pub actual_size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumePathCmd {
    pub install_path: String,
    #[serde(default)]
    pub volume_uuid: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingChainRsp {
    /// Parent first, base last.
    pub backing_chain: Vec<String>,
    pub total_size: u64,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteBitsCmd {
    pub path: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteBitsRsp {
    pub in_use: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateWithBackingCmd {
    pub template_path_in_cache: String,
    pub install_path: String,
    #[serde(default)]
    pub volume_uuid: Option<String>,
    #[serde(default)]
    pub kvm_host_addons: Option<KvmHostAddons>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTemplateCmd {
    pub volume_path: String,
    pub install_path: String,
    #[serde(default)]
    pub kvm_host_addons: Option<KvmHostAddons>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReinitImageCmd {
    pub image_path: String,
    /// The volume being replaced, or (ending in `/`) its directory.
    pub volume_path: String,
    #[serde(default)]
    pub kvm_host_addons: Option<KvmHostAddons>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReinitImageRsp {
    pub new_volume_install_path: String,
}

/// `/localstorage/snapshot/offlinemerge`: `fullRebase` flattens `destPath`; otherwise rebases it
/// (safely) onto `srcPath`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfflineMergeCmd {
    #[serde(default)]
    pub src_path: Option<String>,
    pub dest_path: String,
    #[serde(default)]
    pub full_rebase: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EstimateTemplateSizeCmd {
    pub volume_path: String,
}

/// `/localstorage/getphysicalcapacity`: the capacity of the storage directory.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoragePathCmd {
    pub storage_path: String,
}

/// `/localstorage/volume/createfolder`: makes the directory `installUrl` is in (as the Python
/// agent does: `os.path.dirname(installUrl)`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateFolderCmd {
    pub install_url: String,
}

/// `/localstorage/snapshot/revert`: a new volume on the snapshot, beside it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevertSnapshotCmd {
    pub snapshot_install_path: String,
    #[serde(default)]
    pub kvm_host_addons: Option<KvmHostAddons>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevertSnapshotRsp {
    pub new_volume_install_path: String,
    /// Virtual size.
    pub size: u64,
}

/// `/localstorage/snapshot/merge`: a flat copy of the snapshot and its chain at
/// `workspaceInstallPath` (a volume or template from a snapshot).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MergeSnapshotCmd {
    pub snapshot_install_path: String,
    pub workspace_install_path: String,
    #[serde(default)]
    pub volume_uuid: Option<String>,
    #[serde(default)]
    pub kvm_host_addons: Option<KvmHostAddons>,
}

/// `/localstorage/getqcow2reference`: which files under `searchingDir` have `path` as their
/// backing file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Qcow2ReferenceCmd {
    pub path: String,
    pub searching_dir: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Qcow2ReferenceRsp {
    pub reference_paths: Vec<String>,
}

/// `/localstorage/volume/hardlink`: the files of `srcDir` linked into `dstDir`, and every file
/// under `storagePath` backed by one of them renamed onto the new link (a volume changes type).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HardlinkCmd {
    pub src_dir: String,
    pub dst_dir: String,
    pub storage_path: String,
    #[serde(default)]
    pub volume_uuid: Option<String>,
}

/// `/localstorage/check/initializedfile` and `/localstorage/create/initializedfile`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitializedFileCmd {
    #[serde(default)]
    pub file_path: Option<String>,
    #[serde(default)]
    pub storage_path: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct InitializedFileRsp {
    pub existed: bool,
}

/// `/localstorage/unlink`: drops the file's (or each file's under the directory) link when it
/// has another one.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UnlinkCmd {
    pub install_path: String,
}

/// `/localstorage/volume/batchgetsize`: volume uuid → install path.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchSizeCmd {
    pub volume_uuid_install_paths: BTreeMap<String, String>,
}

/// Volume uuid → bytes allocated; a volume whose size cannot be read is left out.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchSizeRsp {
    pub actual_sizes: BTreeMap<String, u64>,
}

/// One file of a chain the management node moves (`/localstorage/snapshot/verifychain`,
/// `/localstorage/snapshot/rebasebackingfiles`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotTo {
    pub path: String,
    #[serde(default)]
    pub parent_path: Option<String>,
    #[serde(default)]
    pub snapshot_uuid: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotChainCmd {
    pub snapshots: Vec<SnapshotTo>,
}

/// `/localstorage/volume/getbaseimagepath`: which cached images the volume's files are on.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseImagePathCmd {
    pub volume_uuid: String,
    pub image_cache_dir: String,
    pub volume_install_dir: String,
    pub volume_install_path: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BaseImagePathRsp {
    /// The cached image the volume itself is on, if any.
    pub path: Option<String>,
    /// Cached images other files of the volume's directory (snapshots) are on.
    pub other_paths: Vec<String>,
    /// Bytes the chain of `path` takes on disk.
    pub size: Option<u64>,
}

/// `/localstorage/sftp/download` and `/localstorage/sftp/upload`: an image from ZStack's SFTP
/// backup storage into the cache, or a file of the local storage (a template made from a volume)
/// to it (`LocalStorageKvmSftpBackupStorageMediatorImpl`'s `SftpDownloadBitsCmd` and
/// `SftpUploadBitsCmd`, the same fields). `sshKey` is the private key the backup storage accepts;
/// ZStack sends no checksum and no host key.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SftpBitsCmd {
    pub ssh_key: String,
    #[serde(default)]
    pub username: Option<String>,
    pub hostname: String,
    /// 0 (absent) is ssh's default, 22.
    #[serde(default)]
    pub ssh_port: u32,
    pub backup_storage_install_path: String,
    pub primary_storage_install_path: String,
}
