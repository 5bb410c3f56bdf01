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
