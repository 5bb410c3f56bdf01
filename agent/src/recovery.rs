//! What a start of the agent does about the work a previous run left, as it starts serving:
//!
//! - the Ceph clients of the previous run are blocklisted (before any RBD step is undone), so
//!   that the watches they left on images go at once (see [`crate::ceph::clients`]);
//! - every journaled undo log of a task that never recorded its result is played back, so
//!   half-made volumes, images, domains and backup points are removed, and temporary tops are
//!   committed back;
//! - each task the journal shows as running is either resumed — flattens, whose libvirt block
//!   job may still be running and is then re-attached and awaited, or whose offline copy simply
//!   starts again — or finished as failed with what was rolled back; either way the management
//!   node gets the final result for that taskuuid;
//! - the storage and backup roots are searched for the agent's own temporary files (never
//!   published, so always safe to remove), and libvirt for domains of VMs the agent has no
//!   record of (reported only: the management node may own them).
//!
//! What was found is logged and answered by `GET /recovery`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::Value;

use crate::app::App;
use crate::error::{AgentError, ErrorKind};
use crate::ops::undo;
use crate::tasks::journal::{TaskRecord, TaskState};
use crate::wire;

/// What recovery needs from the task runner, which lives above it (with the command table).
pub trait Runner: Send + Sync {
    /// Runs an interrupted task again under its taskuuid; false when its command cannot be read.
    fn resume(&self, app: &Arc<App>, record: &TaskRecord) -> bool;
    /// Posts a finished task's result to its callback, in the background.
    fn deliver(&self, app: &Arc<App>, task_id: String, url: String, result: Value);
}

/// Paths whose command can simply run again after an interruption: they converge on the same
/// end state, and re-attach to a block job the interrupted run started.
const RESUMABLE: &[&str] = &["/vm/flatten", "/vm/volume/mergesnapshot", "/localstorage/snapshot/offlinemerge"];

/// Whether a task on `path` is run again after an interruption (so its command must be kept
/// while it runs; other tasks' commands are never needed again).
pub fn is_resumable(path: &str) -> bool {
    RESUMABLE.contains(&path)
}

/// The tasks a previous run left behind (from the task journal).
#[derive(Debug, Default)]
pub struct Inherited {
    /// Finished, but the result never reached its callback.
    pub undelivered: Vec<TaskRecord>,
    /// Still running when the agent stopped.
    pub interrupted: Vec<TaskRecord>,
    /// The Ceph clients the previous runs connected as (see [`crate::ceph::clients`]).
    pub ceph_clients: Vec<crate::ceph::clients::Recorded>,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub resumed: Vec<String>,
    pub rolled_back: Vec<RolledBack>,
    /// Temporary files of the agent's that were removed.
    pub removed: Vec<PathBuf>,
    /// Domains named as VM uuids that the agent has no record of.
    pub unknown_domains: Vec<String>,
    /// Running VMs whose record was made to name the files they really use.
    pub records_updated: Vec<String>,
    /// The previous runs' Ceph client addresses that were blocklisted.
    pub blocklisted_clients: Vec<String>,
    /// Tasks whose cleanup after their result ([`undo::UndoLog::cleanup`]) a kill cut short,
    /// and that was finished.
    pub cleaned_up: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RolledBack {
    pub task_uuid: String,
    pub path: Option<String>,
    pub steps_undone: usize,
    /// Steps that could not be undone (their resources were kept).
    pub failures: Vec<String>,
    /// What the operation had put in place past its point of no return, kept.
    pub kept: Vec<String>,
}

/// Runs the recovery; results of resumed tasks arrive later, through `runner`.
pub async fn recover(app: &Arc<App>, inherited: Inherited, runner: &dyn Runner) -> Report {
    let started = SystemTime::now();
    let mut report = Report::default();
    let leftovers = undo::leftovers(&app.config.state_dir);
    let interrupted = |task_id: &str| inherited.interrupted.iter().any(|r| r.task_id == task_id);
    // Before RBD steps are undone, so that the watches a killed run left on its half-made images
    // do not hold up their removal; otherwise last (nothing waits on it, and an unreachable
    // cluster would only hold up the rest).
    let to_play = |l: &undo::Leftover| l.cleanup || interrupted(&l.task_id);
    let rbd_undo = leftovers.iter().any(|l| to_play(l) && l.steps.iter().any(undo::UndoStep::touches_rbd));
    let mut previous_clients = Some(inherited.ceph_clients);
    if rbd_undo {
        report.blocklisted_clients = blocklist_previous(app, &mut previous_clients).await;
    }
    let mut late_defines = Vec::new();
    for l in leftovers {
        if !to_play(&l) {
            // Its task finished and recorded its result: what it committed stays.
            let _ = std::fs::remove_file(&l.file);
            continue;
        }
        if l.cleanup {
            let failed = undo::replay(app, l.steps, &[]).await.failed;
            let _ = std::fs::remove_file(&l.file);
            tracing::warn!(task = %l.task_id, failed = failed.len(), "finished the cleanup an earlier run left");
            report.cleaned_up.push(l.task_id);
            continue;
        }
        let n = l.steps.len();
        late_defines.extend(l.steps.iter().filter_map(|s| match s {
            undo::UndoStep::RemoveDomain { vm } => Some(vm.clone()),
            _ => None,
        }));
        // The VMs the steps name are taken first: recovery runs while the agent serves.
        let vms = l.steps.iter().filter_map(undo::UndoStep::vm).map(str::to_owned);
        let held = app.vms.lock_all(vms.filter(|vm| crate::domain::check_uuid(vm).is_ok())).await.unwrap_or_default();
        let replayed = undo::replay(app, l.steps, &held.iter().collect::<Vec<_>>()).await;
        drop(held);
        let _ = std::fs::remove_file(&l.file);
        let path = inherited.interrupted.iter().find(|r| r.task_id == l.task_id).map(|r| r.path.clone());
        let (failures, kept) = (replayed.failed, replayed.kept);
        tracing::warn!(task = %l.task_id, steps = n, failed = failures.len(), kept = kept.len(),
            "rolled back an interrupted operation");
        report.rolled_back.push(RolledBack {
            task_uuid: l.task_id,
            path,
            steps_undone: n - kept.len(),
            failures,
            kept,
        });
    }
    report.removed = remove_temporaries(app, started);
    for record in inherited.interrupted {
        if is_resumable(&record.path) && runner.resume(app, &record) {
            tracing::warn!(task = %record.task_id, path = %record.path, "resuming an interrupted task");
            report.resumed.push(record.task_id);
            continue;
        }
        let undone: Vec<&RolledBack> = report.rolled_back.iter().filter(|r| r.task_uuid == record.task_id).collect();
        let steps: usize = undone.iter().map(|r| r.steps_undone).sum();
        let failed: Vec<&String> = undone.iter().flat_map(|r| &r.failures).collect();
        let kept: Vec<&String> = undone.iter().flat_map(|r| &r.kept).collect();
        let details = format!(
            "the agent stopped while {} was running; {steps} step(s) of its partial work were rolled back{}{}",
            record.path,
            if failed.is_empty() { String::new() } else { format!(" and these could not be: {failed:?}") },
            if kept.is_empty() {
                "; send the command again with a new taskuuid".to_owned()
            } else {
                format!("; it had got past its point of no return, and that stays: {kept:?}; the change is made")
            }
        );
        let result = wire::envelope(&Err(AgentError::new(ErrorKind::OperationFailed, "task interrupted", details)));
        if let Some(url) = app.tasks.finish(&record.task_id, TaskState::Failed, result.clone()).await {
            runner.deliver(app, record.task_id.clone(), url, result);
        }
    }
    for record in inherited.undelivered {
        if let (Some(url), Some(result)) = (record.callback_url.clone(), record.result_value()) {
            runner.deliver(app, record.task_id, url, result);
        }
    }
    (report.unknown_domains, report.records_updated) = reconcile_domains(app).await;
    let rolled_back: std::collections::HashSet<&str> =
        report.rolled_back.iter().map(|r| r.task_uuid.as_str()).collect();
    crate::metrics::recovered(report.resumed.len(), rolled_back.len());
    if previous_clients.is_some() {
        report.blocklisted_clients = blocklist_previous(app, &mut previous_clients).await;
    }
    if !late_defines.is_empty() {
        tokio::spawn(remove_late_defines(app.clone(), late_defines));
    }
    report
}

/// Blocklists the previous runs' Ceph clients, once (see [`crate::ceph::clients`]).
async fn blocklist_previous(app: &App, clients: &mut Option<Vec<crate::ceph::clients::Recorded>>) -> Vec<String> {
    crate::ceph::clients::blocklist_previous(app, clients.take().unwrap_or_default()).await
}

/// When the undo of a killed task's domains should be checked again (after recovery).
const LATE_DEFINE_CHECKS: [Duration; 7] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
    Duration::from_secs(32),
];

/// A `define` the killed agent had sent may still be queued in libvirtd and run after its
/// domain was undone: for a while, a domain of these VMs that appears while the VM still has
/// no record (no later command made it) is removed again.
async fn remove_late_defines(app: Arc<App>, mut vms: Vec<String>) {
    for delay in LATE_DEFINE_CHECKS {
        tokio::time::sleep(delay).await;
        let mut pending = Vec::new();
        for vm in vms {
            let Ok(owner) = app.vms.lock(&vm).await else { continue };
            if !matches!(owner.record(), Ok(None)) {
                continue; // a later command made the VM: its domain is that command's
            }
            if !app.libvirt.domain_state(&vm).await.is_ok_and(|s| s.is_some()) {
                pending.push(vm);
                continue;
            }
            tracing::warn!(vm = %vm, "removing a domain the killed agent's define left in libvirtd after its undo");
            undo::replay(&app, vec![undo::UndoStep::RemoveDomain { vm: vm.clone() }], &[&owner]).await;
        }
        vms = pending;
    }
}

/// One pass over libvirt's domains. A domain named as a VM uuid without a record here is
/// reported, not touched (the management node may own it). A running VM the kill caught between
/// switching to new tops and recording them runs on files its record does not name; the record
/// follows what the VM really uses (matched by disk serial, which is the volume uuid). Returns
/// the unknown domains and the VMs whose record changed.
async fn reconcile_domains(app: &App) -> (Vec<String>, Vec<String>) {
    let Ok((states, _)) = app.libvirt.list_vm_states().await else { return Default::default() };
    let (mut unknown, mut updated) = (Vec::new(), Vec::new());
    for (vm, state) in states {
        let Ok(owner) = app.vms.lock(&vm).await else { continue };
        let Ok(Some(mut spec)) = owner.record() else {
            unknown.push(vm);
            continue;
        };
        if !state.is_active() {
            continue;
        }
        let Ok(xml) = app.libvirt.xml(&vm).await else { continue };
        let Ok(disks) = crate::domain::live_disks(&xml) else { continue };
        let mut changed = false;
        for v in spec.volumes.iter_mut() {
            let live = disks.iter().find(|d| d.serial.as_deref() == Some(v.uuid.as_str()));
            // libvirt's view of a pivot in flight (a killed run's) may still name a top the
            // VM left and recovery removed: only a file some process (QEMU) holds is followed.
            let held =
                |f: &String| std::fs::canonicalize(f).is_ok_and(|p| crate::storage::local::is_open_by_any_process(&p));
            if let Some(file) = live.and_then(|d| d.file.clone()).filter(|f| *f != v.install_path() && held(f)) {
                tracing::warn!(vm = %vm, ?state, volume = %v.uuid, from = %v.install_path(), to = %file,
                    "the VM runs on another file than its record names; the record follows it");
                v.location = crate::storage::location::Location::File(file.into());
                changed = true;
            }
        }
        if changed && owner.save(&spec).is_ok() {
            updated.push(vm);
        }
    }
    if !unknown.is_empty() {
        tracing::info!(domains = ?unknown, "domains this agent has no record of (left alone)");
    }
    (unknown, updated)
}

/// The agent's temporary files — volumes being built (`.<name>.kvmagent-tmp-<run>-<id>`), TPM
/// state staged for clones, torn state files and backup manifests, NBD socket directories —
/// that a killed run left. Nothing else ever has such names; the
/// volumes this run is building (it serves while it recovers) carry its own run id and stay,
/// the staged state younger than this start too.
fn remove_temporaries(app: &App, started: SystemTime) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let old = |p: &Path| p.symlink_metadata().and_then(|m| m.modified()).is_ok_and(|t| t < started);
    let ours = crate::storage::local::temporary_infix();
    // Backup manifests a kill caught half-written (`.manifest.json.tmp-<id>`, see
    // `atomic_file`): the manifest itself still holds its previous content.
    let torn_manifest = format!(".{}.tmp-", crate::backup_group::MANIFEST);
    let storage = app.storage.roots().roots().iter().map(|r| (r, false));
    for (root, backup) in storage.chain(app.backup_roots.roots().iter().map(|r| (r, true))) {
        walk(root, 0, &mut |p: &Path| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let left = name.contains(".kvmagent-tmp-") && !name.contains(ours);
            let torn = backup && name.starts_with(&torn_manifest) && old(p);
            if (left || torn) && std::fs::remove_file(p).is_ok() {
                removed.push(p.to_path_buf());
            }
        });
    }
    // State files a kill caught half-written (`.<name>.tmp-<id>`): likewise.
    walk(&app.config.state_dir, 0, &mut |p: &Path| {
        let torn = p.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with('.') && n.contains(".tmp-")
        });
        if torn && old(p) && std::fs::remove_file(p).is_ok() {
            removed.push(p.to_path_buf());
        }
    });
    for e in std::fs::read_dir(app.config.state_dir.join("staging")).into_iter().flatten().flatten() {
        if old(&e.path()) && std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed.extend(crate::qemu_img::nbd::remove_abandoned_dirs());
    for p in &removed {
        tracing::warn!(path = %p.display(), "removed a temporary file an interrupted run left");
    }
    removed
}

/// Calls `f` on every regular file under `dir`, a few levels deep (volumes live at most at
/// `<root>/<kind>/<account>/<volume>/<file>`), without following symlinks.
fn walk(dir: &Path, depth: usize, f: &mut impl FnMut(&Path)) {
    const MAX_DEPTH: usize = 8;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() && depth < MAX_DEPTH {
            walk(&e.path(), depth + 1, f);
        } else if t.is_file() {
            f(&e.path());
        }
    }
}

/// `GET /recovery`: what the last start found.
pub fn report_json(report: &Report) -> Value {
    serde_json::to_value(report).unwrap_or(Value::Null)
}
