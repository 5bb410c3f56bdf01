//! Load: many mixed commands at once across many VMs — reads (ping, vmsync, volume sizes, flatten
//! dry runs) and writes (snapshot groups, offline flattens) that contend for the same VM and
//! volume locks — each of which must be answered by exactly one callback, successfully, within
//! the time limit (a deadlock or a lost callback fails the run).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::images::{root_volume_path, BaseImage};
use crate::{uuid, Host};

const MIB: u64 = 1 << 20;

pub struct Vm {
    pub uuid: String,
    pub root: PathBuf,
}

/// `n` defined, stopped VMs with thin roots on `base`.
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
        out.push(Vm { uuid: vm, root });
    }
    Ok(out)
}

/// The `i`-th command of a run over `vms`: a mix in which every VM gets reads and writes.
fn command(i: usize, vms: &[Vm]) -> (&'static str, Value) {
    let vm = &vms[i % vms.len()];
    let round = i / vms.len();
    match round % 6 {
        0 => ("/host/ping", json!({})),
        1 => ("/vm/vmsync", json!({})),
        2 => ("/vm/flatten", json!({"vmUuid": vm.uuid, "dryRun": true})),
        3 => ("/localstorage/volume/getsize", json!({"installPath": vm.root})),
        // A few snapshot groups per VM (each adds a layer the flattens then remove).
        4 if round < 12 => ("/vm/volumes/takesnapshot", json!({"vmUuid": vm.uuid})),
        4 => ("/localstorage/volume/getsize", json!({"installPath": vm.root})),
        _ => ("/vm/flatten", json!({"vmUuid": vm.uuid})),
    }
}

pub struct Stats {
    pub commands: usize,
    pub elapsed: Duration,
}

/// Sends `n` commands at once and waits up to `limit` for all their callbacks.
pub async fn run(h: &Host, vms: &[Vm], n: usize, limit: Duration) -> Result<Stats> {
    let start = Instant::now();
    let sends = (0..n).map(|i| {
        let (path, body) = command(i, vms);
        async move { h.send(path, &body).await.map(|task| (path, task)) }
    });
    let tasks: Vec<(&str, String)> = futures::future::try_join_all(sends).await?;
    let deadline = start + limit;
    for (path, task) in &tasks {
        let left = deadline.saturating_duration_since(Instant::now());
        let result = h.callbacks.wait(task, left).await?;
        if result["success"] != true {
            bail!("{path} (task {task}) failed under load: {result}");
        }
    }
    let elapsed = start.elapsed();
    // Every command answered exactly once.
    for (path, task) in &tasks {
        let n = h.callbacks.results(task).map_or(0, |r| r.len());
        if n != 1 {
            bail!("{path} (task {task}) got {n} callbacks");
        }
    }
    Ok(Stats { commands: n, elapsed })
}

/// The `i`-th command alone, awaited: the sequential baseline. Returns its round-trip time.
pub async fn run_one(h: &Host, vms: &[Vm], i: usize, limit: Duration) -> Result<Duration> {
    let (path, body) = command(i, vms);
    let start = Instant::now();
    let result = h.call_within(path, &body, limit).await?;
    if result["success"] != true {
        bail!("{path} failed: {result}");
    }
    Ok(start.elapsed())
}
