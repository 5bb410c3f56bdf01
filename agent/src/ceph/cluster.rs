//! The Ceph cluster as ZStack's Ceph agent reports it to the management node: capacity, fsid,
//! pools, monitors, a heartbeat object and the cephx key of the hosts. One trait ([`Cluster`]);
//! the real one runs the `ceph` and `rados` command lines directly, each call bounded in time;
//! unit tests use [`super::fake::FakeCluster`].

use std::ffi::OsString;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::rbd::Connection;
use crate::error::{AgentError, ErrorKind};
use crate::process::{self, ProcessError};
use crate::stop::Stop;

/// A cluster command waits forever when no monitor answers; this is long enough for a busy one.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{what}: {source}")]
    Run { what: String, source: ProcessError },
    #[error("{what} did not answer within {CALL_TIMEOUT:?}; are the Ceph monitors reachable?")]
    Timeout { what: String },
    #[error("{what} printed output that is not understood: {reason}")]
    Parse { what: String, reason: String },
    /// Refused by the cluster for the reason given (a fake's answer; the tools give stderr).
    #[error("{what}: {reason}")]
    Refused { what: String, reason: String },
}

impl From<ClusterError> for AgentError {
    fn from(e: ClusterError) -> Self {
        let kind =
            if matches!(e, ClusterError::Timeout { .. }) { ErrorKind::Timeout } else { ErrorKind::OperationFailed };
        AgentError::new(kind, "Ceph cluster operation failed", e.to_string())
    }
}

/// Raw bytes of the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub total: u64,
    pub available: u64,
}

#[async_trait]
pub trait Cluster: Send + Sync {
    async fn capacity(&self) -> Result<Capacity, ClusterError>;
    async fn fsid(&self) -> Result<String, ClusterError>;
    async fn pools(&self) -> Result<Vec<String>, ClusterError>;
    /// A new replicated pool, ready for RBD images.
    async fn create_pool(&self, name: &str) -> Result<(), ClusterError>;
    /// The monitors' addresses as the monitor map gives them (`v2:ip:port/nonce` and the like).
    async fn mon_addrs(&self) -> Result<Vec<String>, ClusterError>;
    /// Writes the small object `name` into `pool` (a heartbeat: the cluster takes writes).
    async fn put_object(&self, pool: &str, name: &str) -> Result<(), ClusterError>;
    /// The cephx key of `client.<user>`, made (with RBD rights) when it does not exist.
    async fn user_key(&self, user: &str) -> Result<String, ClusterError>;
}

/// The `ceph` and `rados` command lines.
pub struct CephCli(pub Connection);

impl CephCli {
    pub(super) async fn run(&self, program: &str, args: &[&str]) -> Result<String, ClusterError> {
        let what = format!("{program} {}", args.join(" "));
        let mut all: Vec<OsString> = self.0.args();
        all.extend(args.iter().map(OsString::from));
        let out = tokio::time::timeout(CALL_TIMEOUT, process::run(program, &all, &Stop::new()))
            .await
            .map_err(|_| ClusterError::Timeout { what: what.clone() })?;
        out.map(|o| o.stdout).map_err(|source| ClusterError::Run { what, source })
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T, ClusterError> {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        let out = self.run("ceph", &a).await?;
        serde_json::from_str(&out)
            .map_err(|e| ClusterError::Parse { what: format!("ceph {}", args.join(" ")), reason: e.to_string() })
    }
}

#[derive(Deserialize)]
struct Df {
    stats: DfStats,
}

#[derive(Deserialize)]
struct DfStats {
    total_bytes: u64,
    total_avail_bytes: u64,
}

#[derive(Deserialize)]
struct Fsid {
    fsid: String,
}

#[derive(Deserialize)]
struct Pool {
    poolname: String,
}

#[derive(Deserialize)]
struct MonMap {
    mons: Vec<Mon>,
}

#[derive(Deserialize)]
struct Mon {
    #[serde(default)]
    addr: String,
    #[serde(default)]
    public_addr: String,
}

#[derive(Deserialize)]
struct AuthEntry {
    key: String,
}

#[async_trait]
impl Cluster for CephCli {
    async fn capacity(&self) -> Result<Capacity, ClusterError> {
        let df: Df = self.json(&["df"]).await?;
        if df.stats.total_bytes == 0 {
            // Usage statistics come from the manager daemon; without one `ceph df` says zeros.
            return Err(ClusterError::Refused {
                what: "ceph df".into(),
                reason: "the cluster reports no capacity; is a ceph-mgr daemon running?".into(),
            });
        }
        Ok(Capacity { total: df.stats.total_bytes, available: df.stats.total_avail_bytes })
    }

    async fn fsid(&self) -> Result<String, ClusterError> {
        self.json::<Fsid>(&["fsid"]).await.map(|f| f.fsid)
    }

    async fn pools(&self) -> Result<Vec<String>, ClusterError> {
        let pools: Vec<Pool> = self.json(&["osd", "lspools"]).await?;
        Ok(pools.into_iter().map(|p| p.poolname).collect())
    }

    async fn create_pool(&self, name: &str) -> Result<(), ClusterError> {
        self.run("ceph", &["osd", "pool", "create", name]).await?;
        self.run("rbd", &["pool", "init", name]).await.map(drop)
    }

    async fn mon_addrs(&self) -> Result<Vec<String>, ClusterError> {
        let map: MonMap = self.json(&["mon", "dump"]).await?;
        Ok(map.mons.into_iter().flat_map(|m| [m.addr, m.public_addr]).filter(|a| !a.is_empty()).collect())
    }

    async fn put_object(&self, pool: &str, name: &str) -> Result<(), ClusterError> {
        // `rados put` reads the object's content from a file; /dev/null makes an empty object.
        self.run("rados", &["-p", pool, "put", name, "/dev/null"]).await.map(drop)
    }

    async fn user_key(&self, user: &str) -> Result<String, ClusterError> {
        let entity = format!("client.{user}");
        let args = ["auth", "get-or-create", &entity, "mon", "profile rbd", "osd", "profile rbd"];
        let entries: Vec<AuthEntry> = self.json(&args).await?;
        entries.into_iter().next().map(|e| e.key).ok_or_else(|| ClusterError::Parse {
            what: format!("ceph auth get-or-create {entity}"),
            reason: "no key in the answer".into(),
        })
    }
}
