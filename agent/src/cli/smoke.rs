//! `kvmagent smoke`: a real end-to-end pass against a running agent — create, clone, snapshot
//! group, flatten, change image, backup and restore, destroy — each step timed and printed.
//! Everything it makes is named `smoke-<id>` and lives in `smoke-<id>/` under the first storage
//! root; it is removed at the end, also after a failed step or a SIGINT/SIGTERM (the step in
//! flight is let finish, so that nothing the agent is still making is left behind).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value};

use super::call::{call, task_id, Wait};
use super::{CliError, Target};
use crate::config::Config;

const MIB: u64 = 1 << 20;

/// The steps, in order; each may use what the ones before made.
const STEPS: [Step; 9] = [
    Step::Create,
    Step::Clone,
    Step::SnapshotGroup,
    Step::FlattenDryRun,
    Step::FlattenLive,
    Step::ChangeImage,
    Step::Backup,
    Step::CreateFromBackup,
    Step::Destroy,
];

#[derive(Debug, Clone, Copy)]
enum Step {
    Create,
    Clone,
    SnapshotGroup,
    FlattenDryRun,
    FlattenLive,
    ChangeImage,
    Backup,
    CreateFromBackup,
    Destroy,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Create => "create (thin root, running)",
            Step::Clone => "clone x2 (linked)",
            Step::SnapshotGroup => "snapshot group",
            Step::FlattenDryRun => "flatten (dry run)",
            Step::FlattenLive => "flatten (live)",
            Step::ChangeImage => "change image (stopped clone)",
            Step::Backup => "backup (full)",
            Step::CreateFromBackup => "create from backup",
            Step::Destroy => "destroy",
        }
    }
}

/// What one pass makes: every name and path is chosen up front, so cleanup knows them all
/// whichever step failed.
struct Smoke {
    target: Target,
    prefix: String,
    dir: PathBuf,
    image: PathBuf,
    own_image: bool,
    source: String,
    source_root: String,
    clones: [String; 2],
    restored: String,
    snapshot_group: String,
    backup_group: String,
    backup_dir: Option<PathBuf>,
    state_dir: PathBuf,
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct SmokeOptions {
    /// The image the VMs are made from (default: a blank 64 MiB qcow2 made in the smoke directory).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Go on after a failed step (later steps may fail for want of what it should have made).
    #[arg(long)]
    pub keep_going: bool,
}

pub async fn run(target: Target, config: &Config, options: &SmokeOptions) -> ExitCode {
    let interrupted = Arc::new(AtomicBool::new(false));
    if let Err(e) = watch_signals(interrupted.clone()) {
        return CliError::Usage(format!("cannot catch SIGINT/SIGTERM: {e}")).exit();
    }
    let Some(root) = config.storage.roots.first() else {
        return CliError::Usage("the config has no storage.roots".into()).exit();
    };
    let id = &task_id()[..8];
    let prefix = format!("smoke-{id}");
    let dir = root.join(&prefix);
    let smoke = Smoke {
        target,
        dir: dir.clone(),
        image: options.image.clone().unwrap_or_else(|| dir.join("image.qcow2")),
        own_image: options.image.is_none(),
        source: task_id(),
        source_root: task_id(),
        clones: [task_id(), task_id()],
        restored: task_id(),
        snapshot_group: task_id(),
        backup_group: task_id(),
        backup_dir: config.backup.roots.first().cloned(),
        state_dir: config.state_dir.clone(),
        prefix,
    };
    println!("{}: vms {} in {}", smoke.prefix, smoke.vms().join(" "), smoke.dir.display());
    let mut all_passed = match smoke.prepare().await {
        Ok(()) => true,
        Err(e) => {
            println!("FAIL  {:<30} {e}", "prepare");
            false
        }
    };
    for step in STEPS {
        if !all_passed && !options.keep_going {
            break;
        }
        if interrupted.load(Ordering::SeqCst) {
            println!("interrupted: cleaning up");
            all_passed = false;
            break;
        }
        let started = Instant::now();
        let outcome = smoke.step(step).await;
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("PASS  {:<30} {secs:>6.2} s", step.name()),
            Err(e) => {
                println!("FAIL  {:<30} {secs:>6.2} s  {e}", step.name());
                all_passed = false;
            }
        }
    }
    let cleaned = smoke.cleanup().await;
    if let Err(e) = &cleaned {
        println!("FAIL  {:<30} {e}", "cleanup");
    }
    if interrupted.load(Ordering::SeqCst) {
        return ExitCode::from(130);
    }
    if all_passed && cleaned.is_ok() {
        println!("smoke: every step passed");
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// A signal sets `flag` (and no longer ends the process): the pass stops after its step.
fn watch_signals(flag: Arc<AtomicBool>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {},
                _ = term.recv() => {},
            }
            flag.store(true, Ordering::SeqCst);
            eprintln!("smoke: signal received; finishing the step in flight, then cleaning up");
        }
    });
    Ok(())
}

impl Smoke {
    fn vms(&self) -> Vec<&str> {
        vec![&self.source, &self.clones[0], &self.clones[1], &self.restored]
    }

    fn path(&self, vm: &str) -> String {
        self.dir.join(format!("{vm}/root.qcow2")).display().to_string()
    }

    async fn prepare(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        if self.own_image {
            let size = (64 * MIB).to_string();
            let mut cmd = tokio::process::Command::new("qemu-img");
            cmd.args(["create", "-q", "-f", "qcow2"]).arg(&self.image).arg(size);
            let out = cmd.output().await.map_err(|e| format!("cannot run qemu-img: {e}"))?;
            if !out.status.success() {
                return Err(format!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
        }
        Ok(())
    }

    /// Sends one command and requires success.
    async fn ok(&self, path: &str, body: Value) -> Result<Value, String> {
        let r = call(&self.target, path, &body, Wait::default()).await.map_err(|e| e.to_string())?;
        if r["success"] != Value::Bool(true) {
            return Err(format!("{path}: {}", r["error"].as_str().unwrap_or("failed without an error text")));
        }
        Ok(r)
    }

    async fn step(&self, step: Step) -> Result<(), String> {
        let name = |what: &str| format!("{}-{what}", self.prefix);
        match step {
            Step::Create => {
                let body = json!({
                    "vm": {"vmInstanceUuid": self.source, "vmName": name("source"), "memory": 64 * MIB, "cpuNum": 1},
                    "rootVolume": {"volumeUuid": self.source_root, "installPath": self.path(&self.source),
                                   "imagePath": self.image, "provisioning": "thin"},
                    "strategy": "InstantStart",
                });
                let r = self.ok("/vm/create", body).await?;
                expect(r["state"] == "Running", || format!("the VM is {} rather than Running", r["state"]))
            }
            Step::Clone => {
                let clones: Vec<Value> =
                    (self.clones.iter()).map(|c| json!({"uuid": c, "rootInstallPath": self.path(c)})).collect();
                let body = json!({"vmUuid": self.source, "names": [name("clone-1"), name("clone-2")],
                                  "mode": "linked", "strategy": "CreateStopped", "clones": clones});
                let r = self.ok("/vm/clone", body).await?;
                let failed: Vec<&Value> = (r["inventories"].as_array().into_iter().flatten())
                    .filter(|i| i.get("inventory").is_none())
                    .collect();
                expect(r["numberOfClonedVm"] == 2 && failed.is_empty(), || format!("clones failed: {failed:?}"))
            }
            Step::SnapshotGroup => {
                let body = json!({"vmUuid": self.source, "groupUuid": self.snapshot_group, "name": name("group")});
                let r = self.ok("/vm/snapshotgroup/take", body).await?;
                let n = r["snapshots"].as_array().map_or(0, Vec::len);
                expect(n == 1, || format!("the group holds {n} snapshots, not 1"))
            }
            Step::FlattenDryRun => {
                let r = self.ok("/vm/flatten", json!({"vmUuid": self.source, "dryRun": true})).await?;
                expect(r["totalBytesToAdd"].is_u64(), || format!("no totalBytesToAdd in {r}"))
            }
            Step::FlattenLive => self.ok("/vm/flatten", json!({"vmUuid": self.source})).await.map(drop),
            Step::ChangeImage => {
                let body = json!({"vmUuid": self.clones[0], "imagePath": self.image});
                self.ok("/vm/changeimage", body).await.map(drop)
            }
            Step::Backup => {
                let body = json!({"vmUuid": self.source, "mode": "full", "groupUuid": self.backup_group});
                self.ok("/vm/backup", body).await.map(drop)
            }
            Step::CreateFromBackup => {
                let body = json!({
                    "groupUuid": self.backup_group,
                    "vm": {"vmInstanceUuid": self.restored, "vmName": name("restored")},
                    "rootVolume": {"sourceVolumeUuid": self.source_root, "installPath": self.path(&self.restored)},
                    "strategy": "CreateStopped",
                });
                self.ok("/vm/createfrombackup", body).await.map(drop)
            }
            Step::Destroy => {
                for vm in self.vms() {
                    self.ok("/vm/destroy", json!({"uuid": vm})).await?;
                }
                Ok(())
            }
        }
    }

    /// Destroys every VM of the pass (destroying one that is gone succeeds) and removes its
    /// directory, its backup group, the snapshot group's record (the agent has no path that
    /// deletes either) and the VMs' console logs.
    async fn cleanup(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        for vm in self.vms() {
            if let Err(e) = self.ok("/vm/destroy", json!({"uuid": vm})).await {
                problems.push(format!("destroying {vm}: {e}"));
            }
        }
        let mut leftovers = vec![
            self.dir.clone(),
            self.state_dir.join("snapshot-groups").join(format!("{}.json", self.snapshot_group)),
            self.state_dir.join("snapshot-group-state").join(&self.snapshot_group),
        ];
        leftovers.extend(self.backup_dir.as_ref().map(|d| d.join(&self.backup_group)));
        // The agent keeps a destroyed VM's console log for post-mortems; a smoke VM needs none.
        leftovers.extend(self.vms().iter().map(|vm| self.state_dir.join("console").join(format!("{vm}.log"))));
        for path in leftovers {
            if let Err(e) = remove(&path) {
                problems.push(format!("removing {}: {e}", path.display()));
            }
        }
        if problems.is_empty() {
            println!("cleanup: removed {} and everything of {}", self.dir.display(), self.prefix);
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

fn expect(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(why())
    }
}

/// Removes a file or a directory tree; one already gone is fine.
fn remove(path: &Path) -> std::io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
