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

fn volumes_mut(spec: &mut StartVmCmd) -> impl Iterator<Item = &mut VolumeTo> {
    std::iter::once(&mut spec.root_volume).chain(spec.data_volumes.iter_mut())
}

/// Freezes the root (and the data volumes when `with_data`) of the VM whose record is `spec`,
/// updating and saving the record. The caller holds the VM's lock.
pub async fn freeze(app: &App, spec: &mut StartVmCmd, with_data: bool, stop: &Stop) -> AgentResult<Vec<Frozen>> {
    let vm = spec.vm_instance_uuid.clone();
    let chosen: Vec<(String, String)> = volumes_mut(spec)
        .enumerate()
        .filter(|(i, _)| *i == 0 || with_data)
        .map(|(_, v)| (v.volume_uuid.clone(), v.install_path.clone()))
        .collect();
    if let Some((_, p)) = chosen.iter().find(|(_, p)| p.starts_with("ceph://")) {
        return Err(AgentError::invalid(format!("volume {p} is on Ceph; this host freezes file volumes only")));
    }

    let mut undo = UndoLog::default();
    let result = async {
        let mut frozen = Vec::new();
        for (uuid, current) in &chosen {
            let dir = std::path::Path::new(current).parent().unwrap_or(std::path::Path::new("/"));
            let top = dir.join(format!("{}.qcow2", uuid::Uuid::new_v4().simple()));
            let made = app
                .storage
                .create_empty(
                    &top.to_string_lossy(),
                    0,
                    Some(current),
                    Provisioning::Thin,
                    CreateOptions::default(),
                    stop,
                )
                .await
                .map_err(|e| e.context(format!("creating the new top of volume {uuid}")))?;
            undo.push(UndoStep::RemoveFile { path: made.clone() });
            frozen.push(Frozen { volume_uuid: uuid.clone(), snapshot_path: current.into(), install_path: made });
        }
        stop.check("freezing the volumes")?;
        let state = app.libvirt.domain_state(&vm).await?;
        if state.is_some_and(|s| s.is_active()) {
            let live = app.libvirt.xml(&vm).await?;
            let disks = crate::domain::live_disks(&live)?
                .into_iter()
                .map(|d| {
                    let new = d.file.as_deref().and_then(|f| frozen.iter().find(|z| z.snapshot_path.as_os_str() == f));
                    (d.target, new.map(|z| z.install_path.display().to_string()))
                })
                .collect();
            app.libvirt
                .snapshot_disks(&vm, disks)
                .await
                .map_err(|e| AgentError::from(e).context("switching the running VM to the new tops"))?;
        }
        Ok::<_, AgentError>((frozen, state))
    }
    .await;
    let (frozen, state) = match result {
        Ok(r) => r,
        Err(e) => {
            undo.rollback(app).await;
            return Err(e);
        }
    };
    undo.commit();
    // From here the VM uses the new tops: record them, whatever happens next.
    for v in volumes_mut(spec) {
        if let Some(z) = frozen.iter().find(|z| z.snapshot_path.as_os_str() == v.install_path.as_str()) {
            v.install_path = z.install_path.display().to_string();
            v.format = "qcow2".into();
        }
    }
    app.vm_records.save(spec)?;
    if state.is_some_and(|s| !s.is_active()) {
        let xml = crate::domain::render(spec, &super::settings(app, &vm))?;
        app.libvirt.define(xml).await?;
    }
    Ok(frozen)
}
