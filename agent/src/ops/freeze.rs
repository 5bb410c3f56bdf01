//! Freezing a VM's volumes: each volume's current file becomes a read-only base and the VM goes
//! on writing to a new thin overlay on it. A running VM switches all the chosen disks at one
//! instant (one atomic libvirt snapshot, so the bases are consistent with each other); a
//! stopped VM switches in its record and definition. Linked clones are then built on the
//! bases, which nothing writes any more.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::owner::VmGuard;
use super::undo::{UndoLog, UndoStep};
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::model::{DiskFormat, VmSpec};
use crate::qemu_img::CreateOptions;
use crate::stop::Stop;
use crate::storage::local::Provisioning;
use crate::storage::location::Location;

/// One frozen volume.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Frozen {
    pub volume_uuid: String,
    /// The former top file: now a read-only base.
    pub snapshot_path: PathBuf,
    /// The volume's new install path: an overlay on the snapshot.
    pub install_path: PathBuf,
}

/// Whether `path` names `resolved` (a canonical path), whatever symlinks it goes through.
pub(super) fn same_file(path: &str, resolved: &std::path::Path) -> bool {
    std::fs::canonicalize(path).is_ok_and(|p| p == resolved)
}

/// A volume to freeze: its current top file and where its new top goes.
pub struct Target {
    pub volume_uuid: String,
    pub current: String,
    pub new_top: String,
}

/// Freezes the root (and the data volumes when `with_data`) of VM `vm`, whose record is `spec`,
/// with new tops beside the current ones, and updates the record.
pub async fn freeze(
    app: &App,
    vm: &VmGuard,
    spec: &mut VmSpec,
    with_data: bool,
    task_id: &str,
    stop: &Stop,
) -> AgentResult<Vec<Frozen>> {
    // RBD volumes are not frozen: their snapshots are immutable already.
    let targets: Vec<Target> = spec
        .volumes
        .iter_mut()
        .enumerate()
        .filter(|(i, v)| (*i == 0 || with_data) && !v.is_rbd())
        .map(|(_, v)| {
            let current = v.install_path();
            let dir = std::path::Path::new(&current).parent().unwrap_or(std::path::Path::new("/"));
            let new_top = dir.join(format!("{}.qcow2", uuid::Uuid::new_v4().simple())).display().to_string();
            Target { volume_uuid: v.uuid.clone(), current, new_top }
        })
        .collect();
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let frozen = freeze_to(app, vm, &targets, task_id, stop).await?;
    record(app, vm, spec, &frozen).await?;
    Ok(frozen)
}

/// Freezes `targets` of VM `vm`: a new top that does not exist yet is created as a thin overlay
/// on the current file (one that exists — pre-created by the management node — is reused, as
/// libvirt's REUSE_EXT); a running VM is switched to the new tops atomically. On failure the
/// tops this call created are removed and the VM is as before.
pub async fn freeze_to(
    app: &App,
    owner: &VmGuard,
    targets: &[Target],
    task_id: &str,
    stop: &Stop,
) -> AgentResult<Vec<Frozen>> {
    let vm = owner.uuid();
    if let Some(t) = targets.iter().find(|t| Location::is_rbd(&t.current)) {
        return Err(AgentError::invalid(format!(
            "volume {} is on Ceph; this host freezes file volumes only",
            t.current
        )));
    }
    let mut undo = UndoLog::journaled(app, task_id);
    let result = async {
        let mut frozen = Vec::new();
        for t in targets {
            let current = app.storage.roots().confine_chain(&t.current)?;
            let top = app.storage.roots().confine(&t.new_top)?;
            if !is_precreated_overlay(&top, &current)? {
                undo.push(UndoStep::RemoveTop { vm: vm.to_owned(), top: top.clone(), base: current.clone() });
                app.storage
                    .create_empty(&t.new_top, 0, Some(&t.current), Provisioning::Thin, CreateOptions::default(), stop)
                    .await
                    .map_err(|e| e.context(format!("creating the new top of volume {}", t.volume_uuid)))?;
            }
            frozen.push(Frozen { volume_uuid: t.volume_uuid.clone(), snapshot_path: current, install_path: top });
        }
        stop.check("freezing the volumes")?;
        if app.libvirt.domain_state(vm).await?.is_some_and(|s| s.is_active()) {
            let live = app.libvirt.xml(vm).await?;
            let disks = crate::domain::live_disks(&live)?
                .into_iter()
                .map(|d| {
                    let new = d.file.as_deref().and_then(|f| frozen.iter().find(|z| same_file(f, &z.snapshot_path)));
                    (d.target, new.map(|z| z.install_path.display().to_string()))
                })
                .collect();
            app.libvirt
                .snapshot_disks(vm, disks)
                .await
                .map_err(|e| AgentError::from(e).context("switching the running VM to the new tops"))?;
        }
        Ok::<_, AgentError>(frozen)
    }
    .await;
    match result {
        Ok(frozen) => {
            undo.commit();
            Ok(frozen)
        }
        Err(e) => {
            undo.rollback(app, owner).await;
            Err(e)
        }
    }
}

/// Whether `top` exists already as an overlay on `current` (pre-created by the management node,
/// to be reused as libvirt's REUSE_EXT does). Any other file there is a conflict.
pub fn is_precreated_overlay(top: &Path, current: &Path) -> AgentResult<bool> {
    if !top.exists() {
        return Ok(false);
    }
    let backing = crate::qemu_img::read_header(top).map_err(|e| AgentError::invalid(e.to_string()))?.backing_file;
    if backing.as_deref().map(Path::new) != Some(current) {
        return Err(AgentError::conflict(format!(
            "{} exists and is not an overlay on {}",
            top.display(),
            current.display()
        )));
    }
    Ok(true)
}

/// Points the VM's record (and its definition, when defined but stopped) at the new tops.
pub async fn record(app: &App, vm: &VmGuard, spec: &mut VmSpec, frozen: &[Frozen]) -> AgentResult<()> {
    for v in spec.volumes.iter_mut() {
        if let Some(z) = frozen.iter().find(|z| same_file(&v.install_path(), &z.snapshot_path)) {
            v.location = Location::File(z.install_path.clone());
            v.format = DiskFormat::Qcow2;
        }
    }
    save_and_redefine(app, vm, spec).await
}

async fn save_and_redefine(app: &App, owner: &VmGuard, spec: &VmSpec) -> AgentResult<()> {
    owner.save(spec)?;
    super::redefine_if_stopped(app, owner, spec).await
}

/// Points the volume whose install path is `top` at `base` (the file it froze) again.
fn repoint(spec: &mut VmSpec, top: &Path, base: &Path) -> bool {
    let mut changed = false;
    for v in spec.volumes.iter_mut().filter(|v| v.location == Location::File(top.to_path_buf())) {
        v.location = Location::File(base.to_path_buf());
        v.format = DiskFormat::of_file(base).unwrap_or(DiskFormat::Qcow2);
        changed = true;
    }
    changed
}

/// Points the VM back at `base` where its record names `top` (a freeze undone).
pub async fn point_back(app: &App, vm: &VmGuard, spec: &mut VmSpec, top: &Path, base: &Path) -> AgentResult<()> {
    if repoint(spec, top, base) {
        save_and_redefine(app, vm, spec).await?;
    }
    Ok(())
}

/// How long committing a new top back may take before it is given up (the top then stays).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(600);

/// Undoes a freeze that was only needed for an instant (a backup): each new top is committed
/// back into the file it froze — on a running VM by an active block commit and a pivot, on a
/// stopped one by `qemu-img commit` — and removed, and the record points at the old files
/// again. A top that cannot be committed stays: the VM's data is intact, its chain one layer
/// longer.
pub async fn thaw(app: &App, owner: &VmGuard, spec: &mut VmSpec, frozen: &[Frozen]) {
    let vm = owner.uuid().to_owned();
    let mut thawed = Vec::new();
    for z in frozen {
        match commit_back(app, &vm, z).await {
            Ok(()) => thawed.push(z),
            Err(e) => tracing::warn!(vm = %vm, top = %z.install_path.display(), error = %e,
                "cannot commit a temporary top back; the VM keeps running on it"),
        }
    }
    for z in &thawed {
        repoint(spec, &z.install_path, &z.snapshot_path);
    }
    if let Err(e) = save_and_redefine(app, owner, spec).await {
        tracing::error!(vm = %vm, error = %e, "cannot record the VM after committing its temporary tops back");
    }
    for z in thawed {
        if let Err(e) = std::fs::remove_file(&z.install_path) {
            tracing::warn!(top = %z.install_path.display(), error = %e, "cannot remove a committed temporary top");
        }
    }
}

async fn commit_back(app: &App, vm: &str, z: &Frozen) -> AgentResult<()> {
    if !app.libvirt.domain_state(vm).await?.is_some_and(|s| s.is_active()) {
        return app.qemu_img.commit(&z.install_path, &Stop::new()).await.map_err(Into::into);
    }
    let disk = super::flatten::disk_of(app, vm, &z.install_path).await?;
    app.libvirt.block_commit_active(vm, &disk).await?;
    let deadline = Instant::now() + COMMIT_TIMEOUT;
    // Polled at once first: a small top is often copied by then.
    for attempt in 0.. {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let job = app.libvirt.block_job(vm, &disk).await?;
        let Some(p) = job else {
            return Err(AgentError::failed("the commit job ended before the pivot", format!("VM {vm} disk {disk}")));
        };
        // Once everything is copied the job becomes ready; until then a pivot is refused.
        if p.end > 0 && p.cur == p.end && app.libvirt.block_job_abort(vm, &disk, true).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let _ = app.libvirt.block_job_abort(vm, &disk, false).await;
            return Err(AgentError::failed("committing the temporary top timed out", format!("VM {vm} disk {disk}")));
        }
    }
    // The pivot succeeded only if the VM now writes to the old file again.
    super::flatten::disk_of(app, vm, &z.snapshot_path).await.map(|_| ())
}
