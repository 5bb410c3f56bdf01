//! Local primary-storage paths (reference §3.3). Every response also carries the storage's
//! `totalCapacity` and `availableCapacity`, which the management node uses to track the host.

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
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateTemplateCmd {
    pub volume_path: String,
    pub install_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReinitImageCmd {
    pub image_path: String,
    pub volume_path: String,
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

/// `/localstorage/sftp/download`: an image from ZStack's SFTP backup storage into the cache
/// (`LocalStorageKvmSftpBackupStorageMediatorImpl.SftpDownloadBitsCmd`). `sshKey` is the
/// private key the backup storage accepts; ZStack sends no checksum and no host key.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SftpDownloadCmd {
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

/// `/localstorage/sftp/upload`: a file of the local storage (a template made from a volume) to
/// the SFTP backup storage (`SftpUploadBitsCmd`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SftpUploadCmd {
    pub ssh_key: String,
    #[serde(default)]
    pub username: Option<String>,
    pub hostname: String,
    #[serde(default)]
    pub ssh_port: u32,
    pub backup_storage_install_path: String,
    pub primary_storage_install_path: String,
}
