//! Ceph primary-storage paths (reference §3.5), served on the agent's own port.

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateEmptyCmd {
    pub install_path: String,
    pub size: u64,
    #[serde(default)]
    pub skip_if_existing: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CopyCmd {
    pub src_path: String,
    pub dst_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathCmd {
    pub path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstallPathCmd {
    pub install_path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotCmd {
    pub snapshot_path: String,
    #[serde(default)]
    pub skip_on_existing: bool,
    #[serde(default)]
    pub ignore_error: bool,
}

/// `size` virtual bytes, `actualSize` bytes used in the cluster.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageRsp {
    pub install_path: String,
    pub size: u64,
    pub actual_size: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingChainRsp {
    /// Parent snapshots first, the base last.
    pub backing_chain: Vec<String>,
    pub total_size: u64,
}

/// `/ceph/primarystorage/connect` (`CephPrimaryStorageMonBase.ConnectCmd`): nothing to read.
#[derive(Debug, Deserialize)]
pub struct ConnectCmd {}

/// `/ceph/primarystorage/ping`: the monitor the MN knows (`ip:port`) and the pool object to write
/// as a heartbeat (`pool/name`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingCmd {
    pub mon_addr: String,
    pub test_image_path: String,
    #[serde(default)]
    pub mon_uuid: Option<String>,
}

/// Why a ping failed, in the MN's `PingOperationFailure` names.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum PingFailure {
    UnableToCreateFile,
    MonAddrChanged,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PingRsp {
    pub operation_failure: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<PingFailure>,
}

/// One pool of `/ceph/primarystorage/init`: created unless `predefined` (then it must exist).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitPool {
    pub name: String,
    #[serde(default)]
    pub predefined: bool,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitCmd {
    #[serde(default)]
    pub pools: Vec<InitPool>,
    #[serde(default)]
    pub nocephx: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InitRsp {
    pub fsid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_key: Option<String>,
    pub manufacturer: &'static str,
}

/// `/ceph/primarystorage/delete`: `expirationTime` seconds in the trash before the cluster may
/// purge the image (0: removed at once).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteCmd {
    pub install_path: String,
    #[serde(default)]
    pub expiration_time: u64,
}

/// `/ceph/primarystorage/volume/getbackingchain`: the MN sends `volumePath`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackingChainCmd {
    #[serde(alias = "installPath")]
    pub volume_path: String,
}
