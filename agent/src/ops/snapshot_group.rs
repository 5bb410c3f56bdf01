//! Snapshot groups: one snapshot of every volume of a VM at one instant (see [`super::capture`];
//! file volumes are frozen and keep running on an overlay, RBD volumes get a protected
//! snapshot), recorded in `state_dir/snapshot-groups/<group>.json` so that a VM can be made
//! from the group later. The VM's TPM state (taken at the same instant as the disks) and NVRAM
//! are kept in `state_dir/snapshot-group-state/<group>/` (`tpm/`, `nvram.fd`); a VM made from
//! the group starts with copies of them. Neither the snapshots nor the source VM are ever
//! written by that.

use std::path::PathBuf;

use super::assemble::{self, NewVm, Source};
use super::capture::{self, capture, Freeze};
use super::derived;
use super::undo::{UndoLog, UndoStep};
use super::volumes;
use crate::app::App;
use crate::atomic_file;
use crate::error::{AgentError, AgentResult};
use crate::model::VmSpec;
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::inventory::VmInstanceInventory;
use crate::wire::native::{
    CreateFromSnapshotCmd, GroupSnapshot, NewVolume, Provisioning, SnapshotGroup, SnapshotGroupRef,
    TakeSnapshotGroupCmd,
};

/// Names of the RBD snapshots of a group: `kvmagent-group-<group uuid>`.
const RBD_SNAPSHOT_PREFIX: &str = "kvmagent-group-";

struct Groups {
    dir: PathBuf,
}

/// A group as kept in `state_dir/snapshot-groups/`: the wire answer's fields, the VM in the
/// model, and the model's format version. Files of the first format (the wire answer itself)
/// are read too.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredGroup {
    format_version: u32,
    group_uuid: String,
    vm_uuid: String,
    name: String,
    created_at: u64,
    vm: VmSpec,
    snapshots: Vec<GroupSnapshot>,
    #[serde(default)]
    quiesced: bool,
}

impl StoredGroup {
    fn to_wire(&self) -> SnapshotGroup {
        SnapshotGroup {
            group_uuid: self.group_uuid.clone(),
            vm_uuid: self.vm_uuid.clone(),
            name: self.name.clone(),
            created_at: self.created_at,
            vm: crate::wire::vm::StartVmCmd::from_spec(&self.vm),
            snapshots: self.snapshots.clone(),
            quiesced: self.quiesced,
        }
    }

    fn read(path: &std::path::Path) -> AgentResult<Option<StoredGroup>> {
        let bad = |e: String| AgentError::failed("cannot read the snapshot group", format!("{}: {e}", path.display()));
        let Some(v) = atomic_file::read_json::<serde_json::Value>(path).map_err(|e| bad(e.to_string()))? else {
            return Ok(None);
        };
        if v.get("formatVersion").is_some() {
            return serde_json::from_value(v).map(Some).map_err(|e| bad(e.to_string()));
        }
        let g: SnapshotGroup = crate::wire::decode(&v)?;
        Ok(Some(StoredGroup {
            format_version: crate::model::FORMAT_VERSION,
            vm: g.vm.to_spec()?,
            group_uuid: g.group_uuid,
            vm_uuid: g.vm_uuid,
            name: g.name,
            created_at: g.created_at,
            snapshots: g.snapshots,
            quiesced: g.quiesced,
        }))
    }
}

impl Groups {
    fn of(app: &App) -> Groups {
        Groups { dir: app.config.state_dir.join("snapshot-groups") }
    }

    fn file(&self, group: &str) -> PathBuf {
        self.dir.join(format!("{group}.json"))
    }

    /// Where the group keeps the VM's TPM state (`tpm/`) and NVRAM (`nvram.fd`).
    fn kept_state(&self, group: &str) -> PathBuf {
        self.dir.with_file_name("snapshot-group-state").join(group)
    }

    fn load(&self, group: &str) -> AgentResult<StoredGroup> {
        crate::domain::check_uuid(group).map_err(|e| e.context("groupUuid"))?;
        StoredGroup::read(&self.file(group))?
            .ok_or_else(|| AgentError::not_found(format!("snapshot group {group} is not known to this host")))
    }

    fn save(&self, g: &StoredGroup) -> AgentResult<()> {
        atomic_file::write_json(&self.file(&g.group_uuid), g)
            .map_err(|e| AgentError::failed("cannot record the snapshot group", format!("{}: {e}", self.dir.display())))
    }

    /// The group (other than `except`) that holds snapshot `path`, if any.
    fn holding(&self, path: &str, except: &str) -> Option<StoredGroup> {
        let entries = std::fs::read_dir(&self.dir).ok()?;
        entries
            .flatten()
            .filter_map(|e| StoredGroup::read(&e.path()).ok().flatten())
            .find(|g| g.group_uuid != except && g.snapshots.iter().any(|s| s.snapshot_path == path))
    }
}

/// `/vm/snapshotgroup/take`.
pub async fn take(app: &App, ctx: &TaskCtx, cmd: TakeSnapshotGroupCmd) -> AgentResult<SnapshotGroup> {
    let groups = Groups::of(app);
    let group_uuid = cmd.group_uuid.clone().unwrap_or_else(derived::random_uuid);
    crate::domain::check_uuid(&group_uuid).map_err(|e| e.context("groupUuid"))?;
    crate::domain::xml_safe("name", &cmd.name)?;
    let owner = app.vms.lock(&cmd.vm_uuid).await?;
    let mut spec = owner.load()?;
    if groups.file(&group_uuid).exists() {
        return Err(AgentError::conflict(format!("snapshot group {group_uuid} already exists")));
    }
    let before = spec.clone();
    let rbd_snapshot = format!("{RBD_SNAPSHOT_PREFIX}{group_uuid}");
    // Until the group is recorded and the task's result with it, a failure or a kill gives the
    // instant back: the group's record and kept state go, the frozen tops are committed back,
    // the RBD snapshots removed (undone newest first, so no group ever names a thawed file).
    let mut undo = UndoLog::journaled(app, &ctx.task_id);
    let kept = groups.kept_state(&group_uuid);
    undo.push(UndoStep::RemoveTree { path: kept.clone() });
    let tpm = kept.join("tpm");
    let opts = capture::Options {
        with_data: true,
        freeze: Freeze::Always,
        rbd_snapshot: &rbd_snapshot,
        rbd_snapshot_temporary: false,
        // An encrypted TPM's state is useless without its key, which the agent does not keep.
        tpm_to: Some(tpm.as_path()).filter(|_| !spec.tpm_encrypted),
        task_id: &ctx.task_id,
        quiesce: cmd.quiesce,
    };
    let captured = match capture(app, &owner, &mut spec, opts, &ctx.stop).await {
        Ok(c) => c,
        Err(e) => {
            undo.rollback(app, &owner).await;
            return Err(e);
        }
    };
    if !captured.frozen.is_empty() {
        undo.push(UndoStep::Thaw { vm: before.uuid.clone(), frozen: captured.frozen.clone() });
    }
    for (_, snap) in &captured.rbd_snapshots {
        undo.push(UndoStep::RemoveRbdSnapshot { path: snap.clone() });
    }
    undo.push(UndoStep::RemoveFile { path: groups.file(&group_uuid) });
    let recorded = async {
        if let Some(nvram) = before.nvram.clone().filter(|p| p.is_file()) {
            let to = kept.join("nvram.fd");
            tokio::task::spawn_blocking(move || super::nvram::copy_into_place(&nvram, &to))
                .await
                .map_err(|e| AgentError::internal(format!("copying the NVRAM: {e}")))??;
        }
        let mut snapshots = Vec::new();
        for v in before.volumes.iter() {
            let snapshot_path = captured.point(&v.uuid, &v.install_path());
            let (size, _) = volumes::store(app, &snapshot_path)?.sizes(&snapshot_path, &ctx.stop).await?;
            let now = spec.volumes.iter().find(|n| n.uuid == v.uuid).map(|n| n.install_path());
            snapshots.push(GroupSnapshot {
                volume_uuid: v.uuid.clone(),
                volume_type: v.volume_type().into(),
                device_id: v.device_id,
                snapshot_path,
                size,
                new_install_path: now,
            });
        }
        let group = StoredGroup {
            format_version: crate::model::FORMAT_VERSION,
            group_uuid: group_uuid.clone(),
            vm_uuid: before.uuid.clone(),
            name: cmd.name,
            created_at: crate::tasks::journal::now_ms() / 1000,
            vm: before,
            snapshots,
            quiesced: captured.quiesced,
        };
        groups.save(&group)?;
        Ok::<_, AgentError>(group)
    }
    .await;
    match recorded {
        Ok(group) => {
            undo.commit();
            Ok(group.to_wire())
        }
        Err(e) => {
            undo.rollback(app, &owner).await;
            Err(e)
        }
    }
}

/// `/vm/snapshotgroup/get`.
pub async fn get(app: &App, _ctx: &TaskCtx, cmd: SnapshotGroupRef) -> AgentResult<SnapshotGroup> {
    Groups::of(app).load(&cmd.group_uuid).map(|g| g.to_wire())
}

/// `/vm/createfromsnapshot`: a new VM whose volumes are made from the group's snapshots.
pub async fn create_from(app: &App, ctx: &TaskCtx, cmd: CreateFromSnapshotCmd) -> AgentResult<VmInstanceInventory> {
    let groups = Groups::of(app);
    let group = groups.load(&cmd.group_uuid)?;
    // A request entry names its snapshot by source volume or by path; a path must be one of
    // this group's (a snapshot of another VM, or another instant, would mix disks).
    let identify = |req: &NewVolume| -> AgentResult<Option<String>> {
        if let Some(volume) = &req.source_volume_uuid {
            return match group.snapshots.iter().find(|s| &s.volume_uuid == volume) {
                Some(s) => Ok(Some(s.volume_uuid.clone())),
                None => {
                    Err(AgentError::not_found(format!("volume {volume} has no snapshot in group {}", group.group_uuid)))
                }
            };
        }
        let Some(path) = &req.snapshot_path else { return Ok(None) };
        if let Some(s) = group.snapshots.iter().find(|s| &s.snapshot_path == path) {
            return Ok(Some(s.volume_uuid.clone()));
        }
        Err(match groups.holding(path, &group.group_uuid) {
            Some(other) => AgentError::invalid(format!(
                "snapshot {path} belongs to group {} of VM {}, not to group {}; a VM is made from one group",
                other.group_uuid, other.vm_uuid, group.group_uuid
            )),
            None => AgentError::not_found(format!("snapshot {path} is not known to this host")),
        })
    };
    let (mut spec, origins) = derived::derive(&group.vm, &cmd.target, identify)?;
    super::cloud_init::for_new_vm(app, &mut spec, cmd.target.cloud_init.as_ref())?;
    let kept = groups.kept_state(&group.group_uuid);
    let (tpm, nvram) = (kept.join("tpm"), kept.join("nvram.fd"));

    let linked = cmd.provisioning == Provisioning::Thin;
    let mut sources = Vec::new();
    for (origin, v) in origins.iter().zip(spec.volumes.iter()) {
        let snap =
            group.snapshots.iter().find(|s| &s.volume_uuid == origin).ok_or_else(|| {
                AgentError::internal(format!("group {} lost the snapshot of {origin}", group.group_uuid))
            })?;
        let from = &snap.snapshot_path;
        if Location::is_rbd(from) != v.is_rbd() {
            return Err(AgentError::invalid(format!(
                "volume {} and its snapshot {from} must both be local or both on Ceph",
                v.install_path()
            )));
        }
        volumes::store(app, from)?.check_source(from, &ctx.stop).await?;
        sources.push(Source::Clone { from: from.clone(), linked });
    }
    let new = NewVm {
        spec: &spec,
        sources: &sources,
        tpm_from: Some(tpm.as_path()).filter(|t| spec.tpm.is_some() && t.is_dir()),
        // The source's variables only suit the same firmware; another gets a fresh store.
        nvram_from: Some(nvram.as_path()).filter(|n| spec.firmware == group.vm.firmware && n.is_file()),
        strategy: cmd.target.strategy,
    };
    assemble::create_vm(app, ctx, new).await
}
