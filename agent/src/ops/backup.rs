//! VM backups into backup groups (see [`crate::backup_group`]) and VMs restored from them.
//!
//! `/vm/backup` captures the VM's volumes at one instant (a running VM's files are frozen for
//! the copy and committed back afterwards; RBD volumes get a snapshot, kept as the point's when
//! every volume is on Ceph, see [`super::rbd_backup`]), then writes one qcow2 file per volume:
//! a flat copy for the full point, or for an incremental the clusters that differ from the
//! previous point (read through dirty bitmaps or RBD snapshot diffs where they can be, else an
//! overlay on the instant, safely rebased onto the previous file). Files are built beside their
//! final names and the manifest is replaced last, so a failed backup leaves the group as it was.
//!
//! `/vm/createfrombackup` verifies every file of the chosen point's chains, then makes the VM
//! like `/vm/create`, each volume a flat copy of its chain; the group is only read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::assemble::{self, NewVm, Source};
use super::bitmap_backup::{self, Incremental};
use super::capture::{self, capture, Freeze};
use super::derived;
use super::owner::VmGuard;
use super::rbd_backup;
use super::undo::{UndoLog, UndoStep};
use super::volumes;
use crate::app::App;
use crate::backup_group::{self, BackupFile, BackupVolume, Group, Manifest, Point, PointKind};
use crate::error::{AgentError, AgentResult};
use crate::model::VmSpec;
use crate::qemu_img::{Convert, CreateOptions};
use crate::stop::Stop;
use crate::storage::local::Building;
use crate::tasks::TaskCtx;
use crate::wire::inventory::VmInstanceInventory;
use crate::wire::native::{
    BackupMode, BackupVmCmd, BackupVmRsp, CreateFromBackupCmd, IncrementalBy, NewVolume, Quiesce,
};

/// Runs blocking file work (hashing) off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> AgentResult<T> + Send + 'static) -> AgentResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| AgentError::internal(format!("blocking task failed: {e}")))?
}

/// The manifest a backup adds to, after checking that the VM's volumes still match it.
fn previous(group: &Group, spec: &VmSpec) -> AgentResult<Manifest> {
    let m = group.manifest()?;
    if m.vm_uuid != spec.uuid {
        return Err(AgentError::invalid(format!(
            "backup group {} holds VM {}, not VM {}",
            group.uuid, m.vm_uuid, spec.uuid
        )));
    }
    let mut have: Vec<&str> = m.volumes.iter().map(|v| v.volume_uuid.as_str()).collect();
    let mut now: Vec<&str> = spec.volumes.iter().map(|v| v.uuid.as_str()).collect();
    have.sort();
    now.sort();
    if have != now {
        return Err(AgentError::conflict(format!(
            "the volumes of VM {} changed since backup group {} was started; take a full backup into a new group",
            spec.uuid, group.uuid
        )));
    }
    for v in &m.volumes {
        if let Some(f) = v.chain.iter().find(|f| !group.path(&f.file).is_file()) {
            return Err(AgentError::not_found(format!(
                "backup group {}: file {} is missing; take a full backup into a new group",
                group.uuid, f.file
            )));
        }
    }
    Ok(m)
}

/// `/vm/backup`.
pub async fn backup(app: &Arc<App>, ctx: &TaskCtx, cmd: BackupVmCmd) -> AgentResult<BackupVmRsp> {
    let owner = app.vms.lock(&cmd.vm_uuid).await?;
    let mut spec = owner.load()?;
    let group_uuid = match (cmd.mode, &cmd.group_uuid) {
        (BackupMode::Full, g) => g.clone().unwrap_or_else(derived::random_uuid),
        (BackupMode::Incremental, Some(g)) => g.clone(),
        (BackupMode::Incremental, None) => return Err(AgentError::invalid("an incremental backup needs groupUuid")),
    };
    let group = Group::locate(&app.backup_roots, cmd.backup_root.as_deref(), &group_uuid)?;
    let manifest = match cmd.mode {
        BackupMode::Full if group.dir.exists() => {
            return Err(AgentError::conflict(format!("backup group {} already exists", group.dir.display())))
        }
        BackupMode::Full => None,
        BackupMode::Incremental => Some(previous(&group, &spec)?),
    };
    let point = manifest.as_ref().map_or(0, |m| m.points.len());
    let before = spec.clone();
    let running = app.libvirt.domain_state(&before.uuid).await?.is_some_and(|s| s.is_active());
    // Whether the point can make and read dirty bitmaps (qcow2 files), or why not.
    let unsupported = bitmap_backup::unsupported(&before);
    let local = unsupported.is_none();
    // Whether the point keeps RBD snapshots to diff the next one against.
    let on_ceph = rbd_backup::all_on_ceph(&before);

    // What the point writes goes again should it fail or be killed: the whole group for the
    // first point, else what write_point records, and the TPM state copied at the instant.
    let mut made = UndoLog::journaled(app, &ctx.task_id);
    let tpm_dir = group.path(&backup_group::tpm_dir_name(point));
    made.push(UndoStep::RemoveTree { path: if point == 0 { group.dir.clone() } else { tpm_dir.clone() } });
    // An encrypted TPM's state is useless without its key, which the agent does not keep.
    let tpm_to = Some(tpm_dir.as_path()).filter(|_| !spec.tpm_encrypted);
    let taken = if local && running {
        let req = bitmap_backup::RunningRequest { group: &group, spec: &before, point, quiesce: cmd.quiesce, tpm_to };
        match bitmap_backup::take_running(app, ctx, &owner, req, &mut made).await {
            Ok(r) => {
                Taken { files: Ok(r.files), quiesced: r.quiesced, tpm_copied: r.tpm_copied, incremental: r.incremental }
            }
            Err(e) => Taken { files: Err(e), quiesced: false, tpm_copied: false, incremental: None },
        }
    } else {
        let req = CapturedRequest { group: &group, point, unsupported, on_ceph, quiesce: cmd.quiesce, tpm_to };
        match take_captured(app, ctx, &owner, &mut spec, req, &mut made).await {
            Ok(t) => t,
            Err(e) => {
                made.rollback(app, &owner).await;
                return Err(e);
            }
        }
    };
    let written = taken.files;
    let captured = CapturedFlags { quiesced: taken.quiesced, tpm_copied: taken.tpm_copied };

    let result = async {
        let files = written?;
        let nvram_sha256 = write_nvram(&group, &before, point, &mut made).await?;
        let mut m = manifest.unwrap_or_else(|| Manifest {
            format_version: backup_group::FORMAT_VERSION,
            group_uuid: group.uuid.clone(),
            vm_uuid: before.uuid.clone(),
            points: Vec::new(),
            volumes: Vec::new(),
        });
        let kind = if point == 0 { PointKind::Full } else { PointKind::Incremental };
        m.points.push(Point {
            index: point,
            kind,
            taken_at: crate::tasks::journal::now_ms() / 1000,
            vm: crate::wire::vm::StartVmCmd::from_spec(&before),
            quiesced: captured.quiesced,
            nvram_sha256,
            tpm: captured.tpm_copied,
        });
        for (v, file) in before.volumes.iter().zip(files) {
            let entry = match m.volumes.iter_mut().find(|b| b.volume_uuid == v.uuid) {
                Some(e) => e,
                None => {
                    m.volumes.push(BackupVolume {
                        volume_uuid: v.uuid.clone(),
                        volume_type: if v.device_id == 0 { "Root" } else { "Data" }.into(),
                        device_id: v.device_id,
                        virtual_size: 0,
                        chain: Vec::new(),
                    });
                    m.volumes.last_mut().expect("just pushed")
                }
            };
            entry.virtual_size = file.virtual_size;
            entry.chain.push(file);
        }
        if point > 0 {
            // The manifest is replaced last; a kill before the task's result is recorded
            // takes the point out of it again, as its files go.
            made.push(UndoStep::TruncateBackupGroup {
                dir: group.dir.clone(),
                group: group.uuid.clone(),
                points: point,
            });
        }
        group.write_manifest(&m)?;
        Ok::<_, AgentError>(m)
    }
    .await;
    match result {
        Ok(m) => {
            made.commit();
            if local {
                bitmap_backup::drop_older(app, &before, &group.uuid, point, running).await;
            } else if on_ceph {
                // The older points' snapshots go after the reply (removing one waits on the
                // cluster's monitors, most of an incremental's time), with the VM still held;
                // journaled, so that a kill before they are gone leaves the removal to recovery.
                let mut cleanup = UndoLog::cleanup(app, &ctx.task_id);
                cleanup.push_all(rbd_backup::older(app, &before, &group.uuid, point).await);
                let app = app.clone();
                tokio::spawn(async move {
                    cleanup.rollback_storage(&app).await;
                    drop(owner);
                });
            }
            let group_path = group.dir.display().to_string();
            let (incremental_by, incremental_reason) =
                taken.incremental.map_or((None, None), |i| (Some(i.by), i.reason));
            Ok(BackupVmRsp {
                group_uuid,
                group_path,
                point,
                manifest: m,
                quiesced: captured.quiesced,
                incremental_by,
                incremental_reason,
            })
        }
        Err(e) => {
            made.rollback(app, &owner).await;
            Err(e)
        }
    }
}

/// What a point captured: its files (or why they could not be written) and how.
struct Taken {
    files: AgentResult<Vec<BackupFile>>,
    quiesced: bool,
    tpm_copied: bool,
    incremental: Option<Incremental>,
}

struct CapturedFlags {
    quiesced: bool,
    tpm_copied: bool,
}

struct CapturedRequest<'a> {
    group: &'a Group,
    point: usize,
    /// Why the volumes cannot carry dirty bitmaps, when they cannot.
    unsupported: Option<String>,
    /// Every volume is on Ceph: the point keeps its snapshots, incrementals diff them.
    on_ceph: bool,
    quiesce: Quiesce,
    tpm_to: Option<&'a Path>,
}

/// A point taken from a captured instant (see [`capture`]): of a stopped VM, whose qcow2
/// volumes also get the point's bitmap, of a VM on Ceph, whose images keep the point's
/// snapshot, or of a VM whose volumes cannot have bitmaps.
async fn take_captured(
    app: &App,
    ctx: &TaskCtx,
    owner: &VmGuard,
    spec: &mut VmSpec,
    req: CapturedRequest<'_>,
    made: &mut UndoLog,
) -> AgentResult<Taken> {
    let (group, point, quiesce, tpm_to) = (req.group, req.point, req.quiesce, req.tpm_to);
    let before = spec.clone();
    let incremental = match req.unsupported {
        None => bitmap_backup::mark_stopped(app, &before, group, point, made, &ctx.stop).await?,
        Some(_) if req.on_ceph => {
            rbd_backup::incremental(app.rbd.as_ref(), &before, &group.uuid, point, &ctx.stop).await
        }
        Some(why) => (point > 0).then(|| Incremental::compare(why)),
    };
    let rbd_snapshot = if req.on_ceph {
        // The point's own snapshots stay with it; until it is recorded, they go should it fail.
        let name = bitmap_backup::checkpoint_name(&group.uuid, point);
        for v in &before.volumes {
            let image = crate::ceph::path::CephPath::parse(&v.install_path())?;
            made.push(UndoStep::RemoveRbdSnapshot { path: image.with_snap(&name).to_string() });
        }
        name
    } else {
        format!("{}{}", volumes::BACKUP_SNAPSHOT_PREFIX, derived::random_uuid())
    };
    let opts = capture::Options {
        with_data: true,
        freeze: Freeze::WhenRunning,
        rbd_snapshot: &rbd_snapshot,
        rbd_snapshot_temporary: !req.on_ceph,
        tpm_to,
        task_id: &ctx.task_id,
        quiesce,
    };
    let captured = capture(app, owner, spec, opts, &ctx.stop).await?;
    // The instant is released whatever happens (temporary tops committed back into the volumes,
    // temporary snapshots dropped), and after a crash too: both logs are journaled.
    let mut release = UndoLog::journaled(app, &ctx.task_id);
    if !captured.frozen.is_empty() {
        release.push(UndoStep::Thaw { vm: before.uuid.clone(), frozen: captured.frozen.clone() });
    }
    for (_, snap) in captured.rbd_snapshots.iter().filter(|_| !req.on_ceph) {
        release.push(UndoStep::RemoveRbdSnapshot { path: snap.clone() });
    }
    let since = point.checked_sub(1).map(|p| bitmap_backup::checkpoint_name(&group.uuid, p));
    let changes = match (incremental.as_ref().map(|i| i.by), since.as_deref()) {
        (Some(IncrementalBy::Bitmap), Some(since)) => Changes::Bitmap(since),
        (Some(IncrementalBy::SnapshotDiff), Some(since)) => Changes::SnapshotDiff(since),
        _ => Changes::Compare,
    };
    let target = PointTarget { group, spec: &before, point, changes };
    let files = write_point(app, ctx, &target, &captured, made).await;
    release.rollback(app, owner).await;
    Ok(Taken { files, quiesced: captured.quiesced, tpm_copied: captured.tpm_copied, incremental })
}

/// How an incremental point's files find what changed since the previous point.
#[derive(Debug, Clone, Copy)]
enum Changes<'a> {
    /// A compare of the whole disk with the previous point's file.
    Compare,
    /// The extents the volume's bitmap of this name marks dirty.
    Bitmap(&'a str),
    /// The byte ranges that differ from the image's snapshot of this name.
    SnapshotDiff(&'a str),
}

/// The files a point writes: of VM `spec`'s volumes at `point` of `group`, incrementals from
/// `changes`.
struct PointTarget<'a> {
    group: &'a Group,
    spec: &'a VmSpec,
    point: usize,
    changes: Changes<'a>,
}

/// Writes every volume's file of the point, in volume order.
async fn write_point(
    app: &App,
    ctx: &TaskCtx,
    target: &PointTarget<'_>,
    captured: &capture::Captured,
    made: &mut UndoLog,
) -> AgentResult<Vec<BackupFile>> {
    let PointTarget { group, spec, point, changes } = *target;
    let total = spec.volumes.len();
    let mut files = Vec::new();
    for (i, v) in spec.volumes.iter().enumerate() {
        ctx.stop.check("backing up the VM")?;
        let from = captured.point(&v.uuid, &v.install_path());
        let dst = group.path(&backup_group::file_name(&v.uuid, point));
        let previous = (point > 0).then(|| format!("{}.qcow2", point - 1));
        made.push(UndoStep::RemoveFile { path: dst.clone() });
        let previous = previous.as_deref().map(|p| (p, changes));
        write_file(app, &from, previous, &dst, &ctx.stop)
            .await
            .map_err(|e| e.context(format!("step 'back up volume {}' failed", v.uuid)))?;
        files.push(recorded(group, &v.uuid, point).await?);
        ctx.progress(((i + 1) * 100 / total) as u8, "volume backed up");
    }
    Ok(files)
}

/// The manifest's entry for the published file of volume `volume_uuid` at `point`.
pub(super) async fn recorded(group: &Group, volume_uuid: &str, point: usize) -> AgentResult<BackupFile> {
    let file = backup_group::file_name(volume_uuid, point);
    let dst = group.path(&file);
    let path = dst.clone();
    // The file is the agent's own qcow2: its size is read from the header, without a process.
    let (virtual_size, sha256) = blocking(move || {
        let header = crate::qemu_img::read_header(&path).map_err(|e| AgentError::internal(e.to_string()))?;
        Ok::<_, AgentError>((header.virtual_size, backup_group::sha256_file(&path)?))
    })
    .await?;
    let bytes = std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
    Ok(BackupFile { point, file, virtual_size, bytes, sha256 })
}

/// Copies the VM's NVRAM into the group as that of `point` (after the volumes: the guest
/// rarely writes variables, and a running VM's store cannot be frozen); answers its SHA-256.
async fn write_nvram(group: &Group, spec: &VmSpec, point: usize, made: &mut UndoLog) -> AgentResult<Option<String>> {
    let Some(src) = spec.nvram.clone().filter(|p| p.is_file()) else { return Ok(None) };
    let dst = group.path(&backup_group::nvram_file_name(point));
    made.push(UndoStep::RemoveFile { path: dst.clone() });
    blocking(move || {
        super::nvram::copy_into_place(&src, &dst).map_err(|e| e.context("step 'back up NVRAM' failed"))?;
        backup_group::sha256_file(&dst)
    })
    .await
    .map(Some)
}

/// Writes the instant `from` (a file chain, or an RBD snapshot) to `dst`: flat, or — with
/// `previous`, the name of the previous point's file beside `dst` — only what differs from it,
/// found as `Changes` says.
async fn write_file(
    app: &App,
    from: &str,
    previous: Option<(&str, Changes<'_>)>,
    dst: &Path,
    stop: &Stop,
) -> AgentResult<()> {
    let (src, src_fmt) = volumes::store(app, from)?.qemu_source(from)?;
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::failed("cannot create the backup directory", format!("{}: {e}", dir.display())))?;
    }
    let stopped = |e| stop.or_error(e, "backing up the volume");
    let building = Building::beside(dst);
    let tmp = building.path();
    match previous {
        None => {
            let c = Convert {
                src: src.as_ref(),
                src_fmt,
                dst: tmp.as_os_str(),
                dst_fmt: "qcow2",
                opts: &CreateOptions::default(),
                into_zeroed: false,
            };
            app.qemu_img.convert(c, stop, &mut |_| {}).await.map_err(stopped)?;
        }
        Some((prev, Changes::Bitmap(bitmap))) => {
            // A bitmap is only read from a local qcow2 file: its header has the size.
            let size = crate::qemu_img::read_header(Path::new(&src))
                .map_err(|e| AgentError::failed("cannot read the volume's qcow2 header", e.to_string()))?
                .virtual_size;
            app.qemu_img
                .create_overlay(Path::new(prev), "qcow2", tmp, Some(size), &CreateOptions::default(), stop)
                .await
                .map_err(stopped)?;
            app.qemu_img.copy_dirty(Path::new(&src), bitmap, tmp, stop).await.map_err(stopped)?;
        }
        Some((prev, Changes::SnapshotDiff(since))) => {
            rbd_backup::write_changes(app, from, since, prev, tmp, stop).await?
        }
        Some((prev, Changes::Compare)) => compare_into(app, Path::new(&src), src_fmt, prev, tmp, stop).await?,
    }
    stop.check("backing up the volume")?;
    building.publish(dst)
}

/// Writes into new file `dst` the clusters where image `src` differs from `previous` (a file
/// name beside `dst`), as an overlay on `previous`.
pub(super) async fn compare_into(
    app: &App,
    src: &Path,
    src_fmt: &str,
    previous: &str,
    dst: &Path,
    stop: &Stop,
) -> AgentResult<()> {
    // An empty overlay on the instant reads as the instant; a safe rebase onto the previous
    // point writes into it exactly the clusters where the two differ.
    app.qemu_img
        .create_overlay(src, src_fmt, dst, None, &CreateOptions::default(), stop)
        .await
        .map_err(|e| stop.or_error(e, "backing up the volume"))?;
    app.qemu_img
        .rebase(dst, Path::new(previous), "qcow2", stop)
        .await
        .map_err(|e| stop.or_error(e, "backing up the volume"))
}

/// `/vm/createfrombackup`.
pub async fn create_from(app: &App, ctx: &TaskCtx, cmd: CreateFromBackupCmd) -> AgentResult<VmInstanceInventory> {
    let group = Group::locate(&app.backup_roots, cmd.backup_root.as_deref(), &cmd.group_uuid)?;
    let m = group.manifest()?;
    let newest = m.points.len().checked_sub(1).ok_or_else(|| AgentError::invalid("the backup group has no point"))?;
    let point = cmd.point.unwrap_or(newest);
    let at = m.points.get(point).ok_or_else(|| {
        AgentError::not_found(format!("backup group {} has points 0 to {newest}, not {point}", group.uuid))
    })?;
    let identify = |req: &NewVolume| -> AgentResult<Option<String>> {
        if req.snapshot_path.is_some() {
            return Err(AgentError::invalid("snapshotPath does not name a backup; use sourceVolumeUuid"));
        }
        match &req.source_volume_uuid {
            Some(v) if m.volumes.iter().any(|b| &b.volume_uuid == v) => Ok(Some(v.clone())),
            Some(v) => Err(AgentError::not_found(format!("volume {v} is not in backup group {}", group.uuid))),
            None => Ok(None),
        }
    };
    let (mut spec, origins) = derived::derive(&at.vm.to_spec()?, &cmd.target, identify)?;
    super::cloud_init::for_new_vm(app, &mut spec, cmd.target.cloud_init.as_ref())?;
    let (g, manifest, roots) = (group.clone(), m.clone(), app.backup_roots.clone());
    let tops: Vec<(String, PathBuf)> = blocking(move || g.verify(&manifest, point, &roots)).await?;
    let sources = origins
        .iter()
        .map(|o| {
            let (_, top) = tops.iter().find(|(v, _)| v == o).ok_or_else(|| {
                AgentError::invalid(format!("backup group {} has no chain for volume {o}", group.uuid))
            })?;
            Ok(Source::Restore { chain_top: top.clone() })
        })
        .collect::<AgentResult<Vec<_>>>()?;
    // The point's NVRAM (checked against the manifest) suits the same firmware only; its TPM
    // state, a VM with a TPM.
    let nvram = group.path(&backup_group::nvram_file_name(point));
    let same_firmware = at.vm.to_spec()?.firmware == spec.firmware;
    let nvram_from = match &at.nvram_sha256 {
        Some(want) if same_firmware => {
            let path = nvram.clone();
            let have = blocking(move || backup_group::sha256_file(&path)).await?;
            if &have != want {
                return Err(AgentError::failed(
                    "the backup is damaged",
                    format!("{} has SHA-256 {have}, the manifest says {want}", nvram.display()),
                ));
            }
            Some(nvram.as_path())
        }
        _ => None,
    };
    let tpm = group.path(&backup_group::tpm_dir_name(point));
    let tpm_from = Some(tpm.as_path()).filter(|t| at.tpm && spec.tpm.is_some() && t.is_dir());
    let new = NewVm { spec: &spec, sources: &sources, tpm_from, nvram_from, strategy: cmd.target.strategy };
    assemble::create_vm(app, ctx, new).await
}
