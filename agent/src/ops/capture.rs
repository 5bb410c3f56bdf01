//! One consistent instant of a VM's volumes, to build from while the VM goes on: file volumes
//! are frozen (see [`super::freeze`]), RBD volumes get a protected snapshot, and the TPM state
//! may be copied. When that takes more than one action on a running VM (file and RBD disks,
//! several RBD disks, or a TPM), the VM is paused for the instant so that all of them agree.
//! A running VM's guest is quiesced for the instant when it can be (see [`super::quiesce`]).
//! Clones, snapshot groups and backups are all built from a capture.

use std::path::Path;

use super::freeze::{freeze, Frozen};
use super::owner::VmGuard;
use super::quiesce::quiesce;
use super::undo::{UndoLog, UndoStep};
use super::volumes;
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::libvirt::domains::VmState;
use crate::model::VmSpec;
use crate::stop::Stop;
use crate::storage::location::Location;
use crate::wire::native::Quiesce;

/// When file volumes are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// Always: the frozen files are kept (linked clones, snapshot groups).
    Always,
    /// Only while the VM runs; a stopped VM's files are read as they are, under its lock.
    WhenRunning,
}

pub struct Options<'a> {
    /// Data volumes too, not only the root.
    pub with_data: bool,
    pub freeze: Freeze,
    /// The name of the RBD snapshots taken.
    pub rbd_snapshot: &'a str,
    /// Whether those snapshots are temporary (clones, backups): a kill before the task's result
    /// is recorded then removes each one no clone depends on. A snapshot group's are kept.
    pub rbd_snapshot_temporary: bool,
    /// Copy the TPM state here (when the VM has one).
    pub tpm_to: Option<&'a Path>,
    /// The task capturing, for its journaled undo log.
    pub task_id: &'a str,
    pub quiesce: Quiesce,
}

#[derive(Debug, Default)]
pub struct Captured {
    pub frozen: Vec<Frozen>,
    /// `(image, image@snapshot)` per RBD volume.
    pub rbd_snapshots: Vec<(String, String)>,
    pub tpm_copied: bool,
    /// Whether the guest's filesystems were frozen for the instant.
    pub quiesced: bool,
}

impl Captured {
    /// Where the captured instant of the volume that was at `install_path` can be read: its
    /// frozen file, its RBD snapshot, or (a stopped VM, not frozen) the volume itself.
    pub fn point(&self, volume_uuid: &str, install_path: &str) -> String {
        if let Some(z) = self.frozen.iter().find(|z| z.volume_uuid == volume_uuid) {
            return z.snapshot_path.display().to_string();
        }
        match self.rbd_snapshots.iter().find(|(image, _)| image == install_path) {
            Some((_, snap)) => snap.clone(),
            None => install_path.to_owned(),
        }
    }

    /// Removes the RBD snapshots that no clone depends on (temporary ones); those in
    /// `depended_on` are known to have a clone and stay unasked.
    pub async fn drop_unused_rbd_snapshots(&self, app: &App, depended_on: &std::collections::HashSet<&str>) {
        for (_, snap) in self.rbd_snapshots.iter().filter(|(_, snap)| !depended_on.contains(snap.as_str())) {
            volumes::drop_unused_snapshot(app.rbd.as_ref(), snap).await;
        }
    }
}

/// Captures VM `owner`, whose record is `spec` (its record is updated when files are frozen).
pub async fn capture(
    app: &App,
    owner: &VmGuard,
    spec: &mut VmSpec,
    opts: Options<'_>,
    stop: &Stop,
) -> AgentResult<Captured> {
    let vm = owner.uuid().to_owned();
    let state = app.libvirt.domain_state(&vm).await?;
    let running = state.is_some_and(|s| s.is_active());
    let chosen = || std::iter::once(spec.root()).chain(spec.data_volumes().iter().filter(|_| opts.with_data));
    let rbd_images: Vec<String> = chosen().map(|v| v.install_path().clone()).filter(|p| Location::is_rbd(p)).collect();
    let has_files = chosen().any(|v| !Location::is_rbd(&v.install_path()));
    let tpm = spec.tpm.is_some() && opts.tpm_to.is_some();
    let freezing = has_files && (opts.freeze == Freeze::Always || running);
    let actions = usize::from(freezing) + rbd_images.len() + usize::from(tpm);
    let pause = actions > 1 && state == Some(VmState::Running);
    // The guest is frozen before the pause: a paused guest's agent cannot answer.
    let quiesced = quiesce(app, owner, opts.quiesce, state, opts.task_id).await?;
    let suspended = if pause { app.libvirt.suspend(&vm).await.map_err(AgentError::from) } else { Ok(()) };
    let paused = pause && suspended.is_ok();
    let taken = async {
        suspended?;
        let mut captured = Captured { quiesced: quiesced.is_some(), ..Captured::default() };
        if freezing {
            captured.frozen = freeze(app, owner, spec, opts.with_data, opts.task_id, stop).await?;
        }
        let mut journal = opts.rbd_snapshot_temporary.then(|| UndoLog::journaled(app, opts.task_id));
        if let Some(log) = journal.as_mut() {
            for image in &rbd_images {
                if let Ok(Location::Rbd(p)) = Location::parse(image) {
                    log.push(UndoStep::RemoveRbdSnapshot { path: p.with_snap(opts.rbd_snapshot).to_string() });
                }
            }
        }
        let taken = volumes::snapshot_rbd(app.rbd.as_ref(), &rbd_images, opts.rbd_snapshot, stop).await;
        // The log stays journaled until the task's result is recorded (see `undo`).
        if let Some(log) = journal {
            log.commit();
        }
        captured.rbd_snapshots = taken?;
        if let Some(to) = opts.tpm_to.filter(|_| tpm) {
            let from = super::tpm::state_dir(&app.config.libvirt.swtpm_dir, &vm);
            let copied = super::tpm::copy_state(&from, to, stop).await;
            if copied.is_err() {
                // The capture fails: the snapshots it took go (no clone is on them yet).
                for (_, snap) in &captured.rbd_snapshots {
                    volumes::drop_unused_snapshot(app.rbd.as_ref(), snap).await;
                }
            }
            captured.tpm_copied = copied?;
        }
        Ok::<_, AgentError>(captured)
    }
    .await;
    if paused {
        if let Err(e) = app.libvirt.resume(&vm).await {
            tracing::error!(vm = %vm, error = %e, "cannot resume the VM after capturing its volumes");
        }
    }
    if let Some(q) = quiesced {
        q.thaw(app, owner).await;
    }
    taken.map_err(|e| e.context(format!("capturing the volumes of VM {vm}")))
}
