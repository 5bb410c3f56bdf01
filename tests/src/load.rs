//! Load: many mixed commands at once across many VMs — reads (ping, vmsync, volume sizes, flatten
//! dry runs) and writes (snapshot groups, linked clones, backups, offline flattens) that contend
//! for the same VM and volume locks — each of which must be answered by exactly one callback
//! within the time limit (a deadlock or a lost callback fails the run), a success or a conflict
//! (any other failure fails the run). Afterwards the host must be consistent (see
//! [`crate::consistency`]): records match domains, chains are clean, no volume file is orphaned.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::consistency::{self, Tally};
use crate::images::{root_volume_path, BaseImage};
use crate::{uuid, Host};

const MIB: u64 = 1 << 20;

pub struct Vm {
    pub uuid: String,
    pub root: PathBuf,
    /// A backup group holding a full backup of the VM, for the incrementals of the mix.
    pub backup_group: String,
}

/// `n` defined, stopped VMs with thin roots on `base`, each backed up once.
pub async fn vms(h: &Host, base: &BaseImage, n: usize) -> Result<Vec<Vm>> {
    let mut out = Vec::new();
    for i in 0..n {
        let vm = uuid();
        h.track_vm(&vm);
        let (root_uuid, root) = root_volume_path(h);
        let cmd = json!({
            "vm": {"vmInstanceUuid": vm, "vmName": format!("load-{i}"), "memory": 128 * MIB, "cpuNum": 1},
            "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
            "strategy": "CreateStopped",
        });
        h.call_ok("/vm/create", &cmd).await?;
        let backup_group = uuid();
        h.call_ok("/vm/backup", &json!({"vmUuid": vm, "groupUuid": backup_group})).await?;
        out.push(Vm { uuid: vm, root, backup_group });
    }
    Ok(out)
}

/// The `i`-th command of a run over `vms`: a mix in which every VM gets reads and writes.
fn command(i: usize, vms: &[Vm]) -> (&'static str, Value) {
    let vm = &vms[i % vms.len()];
    let round = i / vms.len();
    match round % 8 {
        0 => ("/host/ping", json!({})),
        1 => ("/vm/vmsync", json!({})),
        2 => ("/vm/flatten", json!({"vmUuid": vm.uuid, "dryRun": true})),
        3 => ("/localstorage/volume/getsize", json!({"installPath": vm.root})),
        // A few snapshot groups and linked clones per VM (each freezes the VM's files: a layer
        // the flattens then remove). Clones are volumes only: no domain to clean up.
        4 if round < 24 => ("/vm/snapshotgroup/take", json!({"vmUuid": vm.uuid})),
        6 if round < 24 => {
            ("/vm/clone", json!({"vmUuid": vm.uuid, "mode": "linked", "strategy": "JustCreate", "names": ["load"]}))
        }
        4 | 6 => ("/localstorage/volume/getsize", json!({"installPath": vm.root})),
        // Half the VMs get full backups into new groups, half incrementals into their group.
        7 if (i % vms.len()).is_multiple_of(2) => ("/vm/backup", json!({"vmUuid": vm.uuid, "groupUuid": uuid()})),
        7 => ("/vm/backup", json!({"vmUuid": vm.uuid, "mode": "incremental", "groupUuid": vm.backup_group})),
        _ => ("/vm/flatten", json!({"vmUuid": vm.uuid})),
    }
}

pub struct Stats {
    pub commands: usize,
    pub elapsed: Duration,
    /// Successes and conflicts per command path (no other failure passes a run).
    pub tally: Tally,
}

/// Sends `n` commands at once and waits up to `limit` for all their callbacks; then checks that
/// the host is consistent.
pub async fn run(h: &Host, vms: &[Vm], n: usize, limit: Duration) -> Result<Stats> {
    let start = Instant::now();
    let sends = (0..n).map(|i| {
        let (path, body) = command(i, vms);
        async move { h.send(path, &body).await.map(|task| (path, task)) }
    });
    let tasks: Vec<(&str, String)> = futures::future::try_join_all(sends).await?;
    let deadline = start + limit;
    let mut tally = Tally::default();
    for (path, task) in &tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let result = h.callbacks.wait(task, left).await?;
        tally.add(path, task, &result);
    }
    let elapsed = start.elapsed();
    if !tally.failures.is_empty() {
        bail!(
            "{} command(s) failed under load, not by a conflict:\n  {}",
            tally.failures.len(),
            tally.failures.join("\n  ")
        );
    }
    // Every command answered exactly once.
    for (path, task) in &tasks {
        let n = h.callbacks.results(task).map_or(0, |r| r.len());
        if n != 1 {
            bail!("{path} (task {task}) got {n} callbacks");
        }
    }
    consistency::assert_consistent(h)?;
    Ok(Stats { commands: n, elapsed, tally })
}

/// The `i`-th command alone, awaited: the sequential baseline. Returns its round-trip time.
pub async fn run_one(h: &Host, vms: &[Vm], i: usize, limit: Duration) -> Result<Duration> {
    let (path, body) = command(i, vms);
    let start = Instant::now();
    let result = h.call_within(path, &body, limit).await?;
    if let consistency::Outcome::Failed(e) = consistency::Outcome::of(&result) {
        bail!("{path} failed: {e}");
    }
    Ok(start.elapsed())
}
