//! Backup points that read only what changed, through persistent dirty bitmaps in the VM's
//! qcow2 volumes, one per point, named after the group and point ([`checkpoint_name`]).
//!
//! - A running VM's point is one libvirt push-mode backup job over all its disks (one
//!   instant) that also creates the point's checkpoint. Full points use a full job too rather
//!   than the freeze-and-copy of other backups: the checkpoint must be made at exactly the
//!   instant the copy is of, which only the job gives. An incremental point's job writes the
//!   clusters dirty since the previous point's checkpoint into a pre-created overlay on the
//!   previous point's file.
//! - A stopped VM's point adds the bitmap with `qemu-img bitmap` (QEMU keeps persistent bitmaps
//!   up to date while the VM later runs; the checkpoint's metadata is redefined in libvirt so
//!   that a later running point finds it), and an incremental copies only the extents the
//!   previous point's bitmap marks (see [`crate::qemu_img::bitmaps`]).
//! - When the chain is broken (the previous bitmap or checkpoint is missing or was left
//!   in-use), the point compares the whole disk with the previous point as before, and says why.
//!
//! Only the newest point's bitmap is kept: older ones of any group go once a point succeeds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::owner::VmGuard;
use super::undo::{UndoLog, UndoStep};
use crate::app::App;
use crate::backup_group::{self, BackupFile, Group};
use crate::domain::xml_escape;
use crate::error::{AgentError, AgentResult};
use crate::hypervisor::Hypervisor;
use crate::libvirt::backup::BackupJobState;
use crate::model::VmSpec;
use crate::qemu_img::CreateOptions;
use crate::stop::Stop;
use crate::storage::local::Building;
use crate::tasks::TaskCtx;
use crate::wire::native::{IncrementalBy, Quiesce};

const CHECKPOINT_PREFIX: &str = "kvmagent-backup-";

/// How often a running backup job is looked at.
const JOB_POLL: Duration = Duration::from_millis(200);
/// How long an aborted backup job is waited for.
const ABORT_WAIT: Duration = Duration::from_secs(60);

/// The checkpoint (and bitmap) of `point` of group `group`.
pub fn checkpoint_name(group: &str, point: usize) -> String {
    format!("{CHECKPOINT_PREFIX}{group}-{point}")
}

/// How an incremental point was made, for the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incremental {
    pub by: IncrementalBy,
    /// Why the bitmaps could not be used, when they were not.
    pub reason: Option<String>,
}

impl Incremental {
    pub fn compare(reason: impl Into<String>) -> Self {
        Incremental { by: IncrementalBy::Compare, reason: Some(reason.into()) }
    }
}

/// Whether a running VM's previous point can be the base of an incremental job: libvirt must
/// know its checkpoint (a VM redefined without its checkpoint metadata, or a point taken by
/// another agent, has none). `None` when it can.
pub async fn running_chain_broken(hv: &dyn Hypervisor, vm: &str, previous: &str) -> Option<String> {
    match hv.checkpoint_names(vm).await {
        Ok(names) if names.iter().any(|n| n == previous) => None,
        Ok(_) => Some(format!("VM {vm} has no checkpoint {previous}")),
        Err(e) => Some(format!("the checkpoints of VM {vm} cannot be listed: {e}")),
    }
}

/// Whether every file has a consistent bitmap `previous` (one left `in-use` by a QEMU that
/// died, or missing after the volume was replaced, is not). `None` when they all do.
pub async fn stopped_chain_broken(app: &App, files: &[PathBuf], previous: &str, stop: &Stop) -> Option<String> {
    for f in files {
        match app.qemu_img.bitmaps(f, stop).await {
            Ok(list) => match list.iter().find(|b| b.name == previous) {
                Some(b) if b.is_consistent() => {}
                Some(b) => return Some(format!("bitmap {previous} of {} is {:?}", f.display(), b.flags)),
                None => return Some(format!("{} has no bitmap {previous}", f.display())),
            },
            Err(e) => return Some(e.to_string()),
        }
    }
    None
}

/// Why the VM's volumes cannot carry dirty bitmaps (only qcow2 files can), or `None`.
pub fn unsupported(spec: &VmSpec) -> Option<String> {
    spec.volumes.iter().find_map(|v| match v.format {
        _ if v.is_rbd() => Some(format!("volume {} is on Ceph, whose points are compared", v.uuid)),
        crate::model::DiskFormat::Qcow2 => None,
        _ => Some(format!("volume {} is not qcow2 and keeps no dirty bitmap", v.uuid)),
    })
}

/// The files of the VM's volumes, in volume order (local volumes only).
pub fn volume_files(spec: &VmSpec) -> Vec<PathBuf> {
    spec.volumes.iter().map(|v| PathBuf::from(v.install_path())).collect()
}

/// The disk target of each volume of running VM `spec`, in volume order, and the targets of
/// its other disks (CD-ROMs), from the live XML.
async fn disk_targets(app: &App, spec: &VmSpec) -> AgentResult<(Vec<String>, Vec<String>)> {
    let live = crate::domain::live_disks(&app.libvirt.xml(&spec.uuid).await?)?;
    let mut ours = Vec::new();
    for v in &spec.volumes {
        let resolved = std::fs::canonicalize(v.install_path()).map_err(|e| {
            AgentError::failed("cannot back up the VM", format!("volume {} at {}: {e}", v.uuid, v.install_path()))
        })?;
        let d = live.iter().find(|d| d.file.as_deref().is_some_and(|f| super::freeze::same_file(f, &resolved)));
        let d = d.ok_or_else(|| {
            AgentError::conflict(format!(
                "volume {} is not a disk of running VM {}; is the VM redefined?",
                v.uuid, spec.uuid
            ))
        })?;
        ours.push(d.target.clone());
    }
    let others = live.iter().map(|d| d.target.clone()).filter(|t| !ours.contains(t)).collect();
    Ok((ours, others))
}

fn checkpoint_xml(name: &str, ours: &[String], others: &[String], redefine: bool) -> String {
    let mut x = format!("<domaincheckpoint><name>{}</name>", xml_escape(name));
    if redefine {
        x.push_str(&format!("<creationTime>{}</creationTime>", crate::tasks::journal::now_ms() / 1000));
    }
    x.push_str("<disks>");
    for t in ours {
        x.push_str(&format!("<disk name='{}' checkpoint='bitmap' bitmap='{}'/>", xml_escape(t), xml_escape(name)));
    }
    for t in others {
        x.push_str(&format!("<disk name='{}' checkpoint='no'/>", xml_escape(t)));
    }
    x.push_str("</disks></domaincheckpoint>");
    x
}

fn backup_xml(incremental: Option<&str>, targets: &[(String, PathBuf)], others: &[String]) -> String {
    let mut x = String::from("<domainbackup mode='push'>");
    if let Some(cp) = incremental {
        x.push_str(&format!("<incremental>{}</incremental>", xml_escape(cp)));
    }
    x.push_str("<disks>");
    for (t, file) in targets {
        x.push_str(&format!(
            "<disk name='{}' backup='yes' type='file'><target file='{}'/><driver type='qcow2'/></disk>",
            xml_escape(t),
            xml_escape(&file.display().to_string())
        ));
    }
    for t in others {
        x.push_str(&format!("<disk name='{}' backup='no'/>", xml_escape(t)));
    }
    x.push_str("</disks></domainbackup>");
    x
}

/// What a running VM's point captured besides its files.
pub struct RunningPoint {
    pub files: Vec<BackupFile>,
    pub quiesced: bool,
    pub tpm_copied: bool,
    pub incremental: Option<Incremental>,
}

/// Everything a running point needs to know.
pub struct RunningRequest<'a> {
    pub group: &'a Group,
    pub spec: &'a VmSpec,
    pub point: usize,
    pub quiesce: Quiesce,
    pub tpm_to: Option<&'a Path>,
}

/// Takes point `req.point` of running VM `owner` with one backup job; what it makes is in
/// `made`, to be undone should the point fail.
pub async fn take_running(
    app: &App,
    ctx: &TaskCtx,
    owner: &VmGuard,
    req: RunningRequest<'_>,
    made: &mut UndoLog,
) -> AgentResult<RunningPoint> {
    let (spec, group, point, stop) = (req.spec, req.group, req.point, &ctx.stop);
    let vm = spec.uuid.as_str();
    let (ours, others) = disk_targets(app, spec).await?;
    let name = checkpoint_name(&group.uuid, point);
    let previous = point.checked_sub(1).map(|p| checkpoint_name(&group.uuid, p));
    let mut incremental = match &previous {
        None => None,
        Some(p) => Some(match running_chain_broken(app.libvirt.as_ref(), vm, p).await {
            None => Incremental { by: IncrementalBy::Bitmap, reason: None },
            Some(why) => Incremental::compare(why),
        }),
    };
    made.push(UndoStep::RemoveBitmap { vm: vm.to_owned(), name: name.clone(), files: volume_files(spec) });

    // Per volume: the point's file being built, and (for a full job under an incremental
    // point, the fallback) the full copy it is compared from.
    let mut building = Vec::new();
    let mut full_copies = Vec::new();
    for v in &spec.volumes {
        let dst = group.path(&backup_group::file_name(&v.uuid, point));
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                AgentError::failed("cannot create the backup directory", format!("{}: {e}", dir.display()))
            })?;
        }
        let b = Building::beside(&dst);
        made.push(UndoStep::RemoveFile { path: dst.clone() });
        made.push(UndoStep::RemoveFile { path: b.path().to_owned() });
        building.push((dst, b));
    }
    let sizes = volume_sizes(app, spec, stop).await?;
    let by_bitmap = incremental.as_ref().is_some_and(|i| i.by == IncrementalBy::Bitmap);
    let overlays =
        if by_bitmap { Some(overlays_on_previous(app, &building, point, &sizes, stop).await?) } else { None };
    let state = app.libvirt.domain_state(vm).await?;
    let quiesced = super::quiesce::quiesce(app, owner, req.quiesce, state, &ctx.task_id).await?;
    let checkpoint = checkpoint_xml(&name, &ours, &others, false);
    let begun = async {
        if let Some(targets) = overlays {
            let xml = backup_xml(previous.as_deref(), &ours.iter().cloned().zip(targets).collect::<Vec<_>>(), &others);
            // Undone before the targets are removed (undo runs newest first).
            made.push(UndoStep::EndBackupJob { vm: vm.to_owned() });
            match begin(app, owner, spec, &xml, &checkpoint, req.tpm_to).await {
                Ok(tpm) => return Ok(tpm),
                // The previous checkpoint exists, but libvirt cannot use it (its bitmap is gone
                // from a replaced volume): compare instead.
                Err(e) => {
                    let why = format!("the backup job from {previous:?} failed to start: {e}");
                    incremental = Some(Incremental::compare(why));
                }
            }
            for (_, b) in &building {
                let _ = std::fs::remove_file(b.path());
            }
        }
        // A full job: straight into the point's files, or into full copies to compare from.
        let mut targets = Vec::new();
        for ((dst, b), size) in building.iter().zip(&sizes) {
            let target = if point == 0 {
                b.path().to_owned()
            } else {
                let full = Building::beside(&dst.with_file_name(format!("{point}.full.qcow2")));
                made.push(UndoStep::RemoveFile { path: full.path().to_owned() });
                let p = full.path().to_owned();
                full_copies.push(full);
                p
            };
            app.qemu_img.create(&target, *size, &CreateOptions::default(), stop).await?;
            targets.push(target);
        }
        let xml = backup_xml(None, &ours.iter().cloned().zip(targets).collect::<Vec<_>>(), &others);
        made.push(UndoStep::EndBackupJob { vm: vm.to_owned() });
        begin(app, owner, spec, &xml, &checkpoint, req.tpm_to).await
    }
    .await;
    let quiesced_now = quiesced.is_some();
    if let Some(q) = quiesced {
        q.thaw(app, owner).await;
    }
    let step = |e: AgentError| {
        let uuids: Vec<&str> = spec.volumes.iter().map(|v| v.uuid.as_str()).collect();
        e.context(format!("step 'back up volumes {}' failed", uuids.join(", ")))
    };
    let tpm_copied = begun.map_err(step)?;
    wait_for_job(app, vm, stop).await.map_err(step)?;

    let mut files = Vec::new();
    for (i, ((dst, b), v)) in building.into_iter().zip(&spec.volumes).enumerate() {
        if let Some(full) = full_copies.get(i) {
            let prev_file = format!("{}.qcow2", point - 1);
            super::backup::compare_into(app, full.path(), "qcow2", &prev_file, b.path(), stop).await?;
        }
        b.publish(&dst)?;
        files.push(super::backup::recorded(group, &v.uuid, point).await?);
        ctx.progress(((i + 1) * 100 / spec.volumes.len()) as u8, "volume backed up");
    }
    Ok(RunningPoint { files, quiesced: quiesced_now, tpm_copied, incremental })
}

/// The targets of an incremental job, made before the instant (a quiesced guest waits on
/// nothing but the job's start): empty overlays on the previous point's file.
async fn overlays_on_previous(
    app: &App,
    building: &[(PathBuf, Building)],
    point: usize,
    sizes: &[u64],
    stop: &Stop,
) -> AgentResult<Vec<PathBuf>> {
    let previous = format!("{}.qcow2", point - 1);
    let mut targets = Vec::new();
    for ((_, b), size) in building.iter().zip(sizes) {
        let opts = CreateOptions::default();
        app.qemu_img.create_overlay(Path::new(&previous), "qcow2", b.path(), Some(*size), &opts, stop).await?;
        targets.push(b.path().to_owned());
    }
    Ok(targets)
}

async fn volume_sizes(app: &App, spec: &VmSpec, stop: &Stop) -> AgentResult<Vec<u64>> {
    let mut sizes = Vec::new();
    for f in volume_files(spec) {
        sizes.push(app.qemu_img.info(&f, stop).await?.virtual_size);
    }
    Ok(sizes)
}

/// Starts the job; with a TPM to copy, the VM is paused around the start so that the copy is
/// of the job's instant. Answers whether the TPM state was copied.
async fn begin(
    app: &App,
    owner: &VmGuard,
    spec: &VmSpec,
    backup_xml: &str,
    checkpoint_xml: &str,
    tpm_to: Option<&Path>,
) -> AgentResult<bool> {
    let vm = owner.uuid();
    let tpm_to = tpm_to.filter(|_| spec.tpm.is_some());
    let pause =
        tpm_to.is_some() && app.libvirt.domain_state(vm).await? == Some(crate::libvirt::domains::VmState::Running);
    if pause {
        app.libvirt.suspend(vm).await?;
    }
    let result = async {
        app.libvirt.backup_begin(vm, backup_xml.to_owned(), checkpoint_xml.to_owned(), true).await?;
        match tpm_to {
            Some(to) => {
                let from = super::tpm::state_dir(&app.config.libvirt.swtpm_dir, vm);
                super::tpm::copy_state(&from, to, &Stop::new()).await
            }
            None => Ok(false),
        }
    }
    .await;
    if pause {
        if let Err(e) = app.libvirt.resume(vm).await {
            tracing::error!(vm = %vm, error = %e, "cannot resume the VM after starting its backup job");
        }
    }
    result
}

/// Ends a backup job of running VM `vm` that a failed or killed point left: aborted if libvirt
/// still runs it (it may still be writing the files the undo removes), and waited for.
pub async fn end_job(app: &App, vm: &str) {
    if is_running(app, vm).await {
        end_running_job(app, vm).await;
    }
}

async fn is_running(app: &App, vm: &str) -> bool {
    app.libvirt.domain_state(vm).await.ok().flatten().is_some_and(|s| s.is_active())
}

/// [`end_job`] for a VM known to run.
async fn end_running_job(app: &App, vm: &str) {
    if matches!(app.libvirt.backup_job(vm).await, Ok(BackupJobState::Running)) {
        abort_job(app, vm).await;
    }
}

/// Aborts the backup job of `vm` and waits, up to a minute, for it to end: libvirt tears an
/// aborted job down after `abortJob` has answered, and a checkpoint deleted meanwhile has
/// crashed libvirtd 9.0 (a NULL dereference in its QEMU driver).
async fn abort_job(app: &App, vm: &str) {
    if let Err(e) = app.libvirt.abort_job(vm).await {
        tracing::warn!(vm = %vm, error = %e, "cannot abort the backup job");
        return;
    }
    let deadline = tokio::time::Instant::now() + ABORT_WAIT;
    while matches!(app.libvirt.backup_job(vm).await, Ok(BackupJobState::Running)) {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(vm = %vm, "the aborted backup job has not ended within a minute");
            return;
        }
        tokio::time::sleep(JOB_POLL).await;
    }
}

/// Waits for the backup job of `vm` to end; on stop it is aborted.
async fn wait_for_job(app: &App, vm: &str, stop: &Stop) -> AgentResult<()> {
    loop {
        if stop.is_stopped() {
            abort_job(app, vm).await;
            return Err(stop.error("backing up the VM"));
        }
        match app.libvirt.backup_job(vm).await? {
            BackupJobState::Running => tokio::time::sleep(JOB_POLL).await,
            BackupJobState::Completed => return Ok(()),
            other => {
                return Err(AgentError::failed(
                    format!("the backup job of VM {vm} did not complete"),
                    format!("libvirt reports it {other:?}; see the libvirt log of the VM"),
                ))
            }
        }
    }
}

/// A stopped VM's point: adds its bitmap to every volume (undone should the point fail) and
/// records the checkpoint in libvirt. For an incremental, answers whether the previous
/// point's bitmaps can be read (checked first: the new bitmap changes nothing in them).
pub async fn mark_stopped(
    app: &App,
    spec: &VmSpec,
    group: &Group,
    point: usize,
    made: &mut UndoLog,
    stop: &Stop,
) -> AgentResult<Option<Incremental>> {
    let files = volume_files(spec);
    let incremental = match point.checked_sub(1) {
        None => None,
        Some(p) => Some(match stopped_chain_broken(app, &files, &checkpoint_name(&group.uuid, p), stop).await {
            None => Incremental { by: IncrementalBy::Bitmap, reason: None },
            Some(why) => Incremental::compare(why),
        }),
    };
    let name = checkpoint_name(&group.uuid, point);
    made.push(UndoStep::RemoveBitmap { vm: spec.uuid.clone(), name: name.clone(), files: files.clone() });
    for f in &files {
        app.qemu_img.change_bitmap(f, &name, true, stop).await?;
    }
    // Best effort: without the metadata a later running point compares instead.
    if let Ok(xml) = app.libvirt.xml(&spec.uuid).await {
        let disks = crate::domain::live_disks(&xml).unwrap_or_default();
        let ours: Vec<String> = disks
            .iter()
            .filter(|d| d.file.as_deref().is_some_and(|f| files.iter().any(|v| Path::new(f) == v)))
            .map(|d| d.target.clone())
            .collect();
        let others: Vec<String> = disks.iter().map(|d| d.target.clone()).filter(|t| !ours.contains(t)).collect();
        if let Err(e) = app.libvirt.checkpoint_redefine(&spec.uuid, checkpoint_xml(&name, &ours, &others, true)).await {
            tracing::warn!(vm = %spec.uuid, error = %e, "cannot record the backup checkpoint in libvirt");
        }
    }
    Ok(incremental)
}

/// Once point `point` is recorded: removes every other backup bitmap of the VM (older points,
/// other groups), so that they do not pile up in its volumes.
pub async fn drop_older(app: &App, spec: &VmSpec, group: &str, point: usize, running: bool) {
    let keep = checkpoint_name(group, point);
    let vm = spec.uuid.as_str();
    let names = app.libvirt.checkpoint_names(vm).await.unwrap_or_default();
    for n in names.iter().filter(|n| n.starts_with(CHECKPOINT_PREFIX) && **n != keep) {
        remove_checkpoint(app.libvirt.as_ref(), vm, n, running).await;
    }
    if running {
        return;
    }
    let stop = Stop::new();
    for f in volume_files(spec) {
        for b in app.qemu_img.bitmaps(&f, &stop).await.unwrap_or_default() {
            if b.name.starts_with(CHECKPOINT_PREFIX) && b.name != keep {
                if let Err(e) = app.qemu_img.change_bitmap(&f, &b.name, false, &stop).await {
                    tracing::warn!(file = %f.display(), error = %e, "cannot remove an old backup bitmap");
                }
            }
        }
    }
}

/// Deletes a checkpoint with its bitmaps when the VM runs, else (or when libvirt cannot find
/// its bitmaps) its metadata only.
async fn remove_checkpoint(hv: &dyn Hypervisor, vm: &str, name: &str, running: bool) {
    if running && hv.checkpoint_delete(vm, name, false).await.is_ok() {
        return;
    }
    if let Err(e) = hv.checkpoint_delete(vm, name, true).await {
        if !e.is_no_domain() {
            tracing::warn!(vm = %vm, checkpoint = %name, error = %e, "cannot remove an old backup checkpoint");
        }
    }
}

/// Undoes a point's bitmap `name`: its checkpoint in libvirt, and the bitmap in files nothing
/// has open (a stopped VM's), whose leaked clusters are freed too: a `qemu-img bitmap` of the
/// point (adding its bitmap, or dropping older ones) killed with the agent leaves some.
pub async fn undo_bitmap(app: &App, vm: &str, name: &str, files: &[PathBuf]) -> Result<(), String> {
    let running = is_running(app, vm).await;
    if running {
        end_running_job(app, vm).await;
    }
    remove_checkpoint(app.libvirt.as_ref(), vm, name, running).await;
    let stop = Stop::new();
    for f in files.iter().filter(|f| !crate::storage::local::is_open_by_any_process(f)) {
        if app.qemu_img.bitmaps(f, &stop).await.is_ok_and(|l| l.iter().any(|b| b.name == name)) {
            app.qemu_img.change_bitmap(f, name, false, &stop).await.map_err(|e| e.to_string())?;
        }
        app.qemu_img.repair_leaks(f, &stop).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::Faults;
    use crate::hypervisor::fake::FakeHypervisor;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_running_point_falls_back_to_compare_without_the_previous_checkpoint() {
        let hv = FakeHypervisor::new(Arc::new(Faults::default()));
        let vm = "0123456789abcdef0123456789abcdef";
        hv.define(format!("<domain><name>{vm}</name><devices/></domain>")).await.unwrap();
        let prev = checkpoint_name("g", 0);
        let why = running_chain_broken(&hv, vm, &prev).await.expect("no checkpoint: broken");
        assert!(why.contains(&prev), "{why}");
        hv.checkpoint_redefine(vm, checkpoint_xml(&prev, &["vda".into()], &[], true)).await.unwrap();
        assert_eq!(running_chain_broken(&hv, vm, &prev).await, None);
        hv.checkpoint_delete(vm, &prev, true).await.unwrap();
        assert!(running_chain_broken(&hv, vm, &prev).await.is_some(), "a redefined VM lost its checkpoint");
    }

    #[test]
    fn the_job_xml_names_every_disk() {
        let x = backup_xml(Some("cp"), &[("vda".into(), PathBuf::from("/b/0.qcow2"))], &["hdc".into()]);
        assert!(x.contains("<incremental>cp</incremental>") && x.contains("file='/b/0.qcow2'"), "{x}");
        assert!(x.contains("<disk name='hdc' backup='no'/>"), "{x}");
        let c = checkpoint_xml("cp", &["vda".into()], &["hdc".into()], false);
        assert!(c.contains("checkpoint='bitmap'") && c.contains("<disk name='hdc' checkpoint='no'/>"), "{c}");
    }
}
