//! The librados clients this agent connected as, remembered so that the next start can
//! blocklist them. A client killed with an image open leaves its watch on the image until the
//! OSDs time it out (about 30 s), and until then the image cannot be removed: the rollback of
//! the killed run's half-made images would wait. Each connection of the in-process client
//! records `state_dir/ceph-clients/<fsid>-<instance>.json` as it opens; the next start lists
//! these before it connects itself ([`recorded`]), and recovery blocklists exactly those
//! addresses ([`blocklist_previous`]) before it rolls back: the OSDs then drop the dead
//! watches at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::app::App;
use crate::atomic_file;
use crate::stop::Stop;

/// How long a previous run's address stays blocklisted: far longer than any watch of its
/// could live, and it never comes back (a new connection gets a new address).
pub const BLOCKLIST_EXPIRY: Duration = Duration::from_secs(3600);

/// One connection of the agent to a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Client {
    /// The cluster's fsid.
    pub fsid: String,
    /// The client's address (`ip:port/nonce`), as watchers and the blocklist show it.
    pub addr: String,
    /// The client's instance id in the cluster (`client.<instance>`).
    pub instance: u64,
}

/// A client recorded by a previous run, and the file that records it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub file: PathBuf,
    pub client: Client,
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("ceph-clients")
}

/// Records a new connection (atomically: a kill leaves the file whole or absent).
pub fn record(state_dir: &Path, client: &Client) -> std::io::Result<()> {
    let file = dir(state_dir).join(format!("{}-{}.json", client.fsid, client.instance));
    atomic_file::write_json(&file, client)
}

/// The clients recorded so far; at start, before this run connects, those of previous runs.
/// Unreadable records are logged and skipped (a torn write's temporary is not a record).
pub fn recorded(state_dir: &Path) -> Vec<Recorded> {
    let Ok(entries) = std::fs::read_dir(dir(state_dir)) else { return Vec::new() };
    let mut out = Vec::new();
    for file in entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")) {
        match atomic_file::read_json::<Client>(&file) {
            Ok(Some(client)) => out.push(Recorded { file, client }),
            Ok(None) => {}
            Err(e) => tracing::error!(file = %file.display(), error = %e, "unreadable Ceph client record skipped"),
        }
    }
    out
}

/// Blocklists the clients of previous runs on the cluster the agent is connected to, so that
/// their watches go at once; a client that cannot be blocklisted (no permission, the cluster
/// unreachable) is logged, and removals of images it had open wait for its watches to time out
/// (bounded, see [`crate::ops::undo`]). Each record is done with after its attempt, except
/// when the cluster's fsid cannot be read (then they wait for the next start). Returns the
/// addresses blocklisted.
pub async fn blocklist_previous(app: &App, previous: Vec<Recorded>) -> Vec<String> {
    let mut blocklisted = Vec::new();
    if previous.is_empty() {
        return blocklisted;
    }
    let fsid = match app.ceph.fsid().await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the Ceph cluster's fsid; the previous run's clients are not \
                blocklisted, and images they had open are removed once the cluster times their watches out");
            return blocklisted;
        }
    };
    let stop = Stop::new();
    for Recorded { file, client } in previous {
        if client.fsid != fsid {
            tracing::info!(?client, "a previous run's client of another cluster; its record is dropped");
        } else {
            match app.rbd.blocklist(&client.addr, BLOCKLIST_EXPIRY, &stop).await {
                Ok(()) => {
                    tracing::info!(?client, expiry = ?BLOCKLIST_EXPIRY,
                        "blocklisted the previous run's Ceph client: the watches it left are dropped");
                    blocklisted.push(client.addr);
                }
                Err(e) => tracing::warn!(?client, error = %e,
                    "cannot blocklist the previous run's Ceph client; removing images it had open waits \
                     until the cluster times its watches out (give the agent's Ceph user the monitors' \
                     `profile rbd` cap, which allows it)"),
            }
        }
        let _ = std::fs::remove_file(&file);
    }
    blocklisted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_read_back_and_a_torn_write_is_not_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(recorded(dir.path()).is_empty(), "no directory yet");
        let a = Client { fsid: "f1".into(), addr: "127.0.0.1:0/11".into(), instance: 4100 };
        let b = Client { fsid: "f2".into(), addr: "127.0.0.1:0/12".into(), instance: 4100 };
        record(dir.path(), &a).unwrap();
        record(dir.path(), &b).unwrap();
        // What a kill in the middle of the atomic write leaves beside the records.
        std::fs::write(super::dir(dir.path()).join(".f1-4101.json.tmp-x"), b"{\"fsid\"").unwrap();
        let mut got: Vec<Client> = recorded(dir.path()).into_iter().map(|r| r.client).collect();
        got.sort_by(|x, y| x.fsid.cmp(&y.fsid));
        assert_eq!(got, [a, b], "one record per cluster and instance");
    }
}
