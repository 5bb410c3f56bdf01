//! Freezing a VM's volumes: each volume's current file becomes a read-only base and the VM goes
//! on writing to a new thin overlay on it. A running VM switches all the chosen disks at one
//! instant (one atomic libvirt snapshot, so the bases are consistent with each other); a
//! stopped VM switches in its record and definition. Linked clones are then built on the
//! bases, which nothing writes any more.

use std::path::PathBuf;

use super::undo::{UndoLog, UndoStep};
use crate::api::vm::{StartVmCmd, VolumeTo};
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::qemu_img::CreateOptions;
use crate::stop::Stop;
use crate::storage::local::Provisioning;

/// One frozen volume.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Frozen {
    pub volume_uuid: String,
    /// The former top file: now a read-only base.
    pub snapshot_path: PathBuf,
    /// The volume's new install path: an overlay on the snapshot.
    pub install_path: PathBuf,
}

/// Whether `path` names `resolved` (a canonical path), whatever symlinks it goes through.
fn same_file(path: &str, resolved: &std::path::Path) -> bool {
    std::fs::canonicalize(path).is_ok_and(|p| p == resolved)
}

fn volumes_mut(spec: &mut StartVmCmd) -> impl Iterator<Item = &mut VolumeTo> {
    std::iter::once(&mut spec.root_volume).chain(spec.data_volumes.iter_mut())
}

/// A volume to freeze: its current top file and where its new top goes.
pub struct Target {
    pub volume_uuid: String,
    pub current: String,
    pub new_top: String,
}

/// Freezes the root (and the data volumes when `with_data`) of the VM whose record is `spec`,
/// with new tops beside the current ones, and updates the record. The caller holds the VM's lock.
pub async fn freeze(app: &App, spec: &mut StartVmCmd, with_data: bool, stop: &Stop) -> AgentResult<Vec<Frozen>> {
    // RBD volumes are not frozen: their snapshots are immutable already.
    let targets: Vec<Target> = volumes_mut(spec)
        .enumerate()
        .filter(|(i, v)| (*i == 0 || with_data) && !v.install_path.starts_with("ceph://"))
        .map(|(_, v)| {
            let dir = std::path::Path::new(&v.install_path).parent().unwrap_or(std::path::Path::new("/"));
            let new_top = dir.join(format!("{}.qcow2", uuid::Uuid::new_v4().simple())).display().to_string();
            Target { volume_uuid: v.volume_uuid.clone(), current: v.install_path.clone(), new_top }
        })
        .collect();
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let frozen = freeze_to(app, &spec.vm_instance_uuid.clone(), &targets, stop).await?;
    record(app, spec, &frozen).await?;
    Ok(frozen)
}

/// Freezes `targets` of VM `vm`: a new top that does not exist yet is created as a thin overlay
/// on the current file (one that exists — pre-created by the management node — is reused, as
/// libvirt's REUSE_EXT); a running VM is switched to the new tops atomically. On failure the
/// tops this call created are removed and the VM is as before.
pub async fn freeze_to(app: &App, vm: &str, targets: &[Target], stop: &Stop) -> AgentResult<Vec<Frozen>> {
    if let Some(t) = targets.iter().find(|t| t.current.starts_with("ceph://")) {
        return Err(AgentError::invalid(format!(
            "volume {} is on Ceph; this host freezes file volumes only",
            t.current
        )));
    }
    let mut undo = UndoLog::default();
    let result = async {
        let mut frozen = Vec::new();
        for t in targets {
            let current = app.storage.roots().confine_chain(&t.current)?;
            let top = app.storage.roots().confine(&t.new_top)?;
            if top.exists() {
                let backing =
                    crate::qemu_img::read_header(&top).map_err(|e| AgentError::invalid(e.to_string()))?.backing_file;
                if backing.as_deref().map(std::path::Path::new) != Some(current.as_path()) {
                    return Err(AgentError::conflict(format!(
                        "{} exists and is not an overlay on {}",
                        top.display(),
                        current.display()
                    )));
                }
            } else {
                let made = app
                    .storage
                    .create_empty(&t.new_top, 0, Some(&t.current), Provisioning::Thin, CreateOptions::default(), stop)
                    .await
                    .map_err(|e| e.context(format!("creating the new top of volume {}", t.volume_uuid)))?;
                undo.push(UndoStep::RemoveFile { path: made });
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
            undo.rollback(app).await;
            Err(e)
        }
    }
}

/// Points the VM's record (and its definition, when defined but stopped) at the new tops.
pub async fn record(app: &App, spec: &mut StartVmCmd, frozen: &[Frozen]) -> AgentResult<()> {
    for v in volumes_mut(spec) {
        if let Some(z) = frozen.iter().find(|z| same_file(&v.install_path, &z.snapshot_path)) {
            v.install_path = z.install_path.display().to_string();
            v.format = "qcow2".into();
        }
    }
    app.vm_records.save(spec)?;
    let vm = &spec.vm_instance_uuid;
    if app.libvirt.domain_state(vm).await?.is_some_and(|s| !s.is_active()) {
        let xml = crate::domain::render(spec, &super::settings(app, vm))?;
        app.libvirt.define(xml).await?;
    }
    Ok(())
}
