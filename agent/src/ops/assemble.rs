//! Making a new VM from a spec whose volumes do not exist yet, all or nothing: every volume is
//! made from its [`Source`], then the domain per strategy, then the record. Every step that
//! makes something records its undo; any failure (or a cancel, or the deadline) plays the undo
//! log back. `/vm/create`, `/vm/clone`, `/vm/createfromsnapshot` and `/vm/createfrombackup`
//! differ only in where the volumes come from.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::owner::VmGuard;
use super::undo::{UndoLog, UndoStep};
use super::volumes;
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::model::VmSpec;
use crate::storage::local::Provisioning;
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::inventory::VmInstanceInventory;
use crate::wire::native::Strategy;

/// What a new volume is made from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A cached image (a file chain, or a protected RBD snapshot), grown to `size`.
    Image {
        image: String,
        size: Option<u64>,
        provisioning: Provisioning,
    },
    Empty {
        size: u64,
        provisioning: Provisioning,
    },
    /// A frozen file or a protected RBD snapshot: an overlay/clone on it, or a full copy.
    Clone {
        from: String,
        linked: bool,
    },
    /// The top file of a verified backup chain, copied flat.
    Restore {
        chain_top: PathBuf,
    },
}

/// Locks the VM and its target volumes, checks that nothing is in the way, and makes the VM.
pub async fn create_vm(app: &App, ctx: &TaskCtx, new: NewVm<'_>) -> AgentResult<VmInstanceInventory> {
    let vm = app.vms.lock(&new.spec.uuid).await?;
    let paths: Vec<String> = new.spec.volumes.iter().map(|v| v.install_path().clone()).collect();
    let _volume_locks = app.volume_locks.write_all(&paths).await?;
    check_targets(app, ctx, new.spec).await?;
    make(app, ctx, &vm, new).await
}

/// Everything that can be known before making anything: the VM has no domain here, every
/// target volume is free, inside the roots and named once, and every other file the domain
/// opens (ISOs, kernel) is inside the roots.
pub async fn check_targets(app: &App, ctx: &TaskCtx, spec: &VmSpec) -> AgentResult<()> {
    let mut targets = HashSet::new();
    for v in spec.volumes.iter() {
        let path = v.install_path();
        if v.uuid.is_empty() {
            return Err(AgentError::invalid(format!("volume at {path} has an empty volumeUuid")));
        }
        volumes::store(app, &path)?.check_free(&path, &ctx.stop).await?;
        if !targets.insert(v.location.clone()) {
            return Err(AgentError::invalid(format!("installPath {path} is named twice")));
        }
    }
    for path in crate::domain::file_paths(spec) {
        if !targets.contains(&Location::File(path.to_path_buf())) {
            app.storage.roots().confine_existing(&path.display().to_string())?;
        }
    }
    super::nvram::check_firmware(&app.config.uefi, spec.firmware)?;
    let vm = &spec.uuid;
    if app.libvirt.domain_state(vm).await?.is_some() {
        return Err(AgentError::conflict(format!("VM {vm} already exists on this host")));
    }
    Ok(())
}

/// A VM to make: its spec, one source per volume (root first), the TPM state and the NVRAM
/// to copy (a UEFI VM without one gets the firmware's template).
pub struct NewVm<'a> {
    pub spec: &'a VmSpec,
    pub sources: &'a [Source],
    pub tpm_from: Option<&'a Path>,
    pub nvram_from: Option<&'a Path>,
    pub strategy: Strategy,
}

/// Makes the volumes, the TPM state, the NVRAM and the domain per strategy, records the VM (held by `vm`:
/// a VM with a record already is refused) and answers its inventory. On failure everything made
/// is removed.
pub async fn make(app: &App, ctx: &TaskCtx, vm: &VmGuard, new: NewVm<'_>) -> AgentResult<VmInstanceInventory> {
    if vm.uuid() != new.spec.uuid {
        return Err(AgentError::internal(format!("VM {} is made under the lock of {}", new.spec.uuid, vm.uuid())));
    }
    if vm.record()?.is_some() {
        return Err(AgentError::conflict(format!("VM {} already exists on this host", vm.uuid())));
    }
    let mut spec = new.spec.clone();
    super::nvram::assign(app, &mut spec, None)?;
    let new = NewVm { spec: &spec, ..new };
    let mut undo = UndoLog::journaled(app, &ctx.task_id);
    // The answer is read before the commit: a create that cannot answer leaves nothing.
    let made = async {
        let state = build(app, ctx, vm, &new, &mut undo).await?;
        super::inventory::of(app, &spec, state, ctx).await
    };
    match made.await {
        Ok(inventory) => {
            undo.commit();
            ctx.progress(100, "created");
            Ok(inventory)
        }
        Err(e) => {
            undo.rollback(app, vm).await;
            Err(e)
        }
    }
}

async fn build(
    app: &App,
    ctx: &TaskCtx,
    owner: &VmGuard,
    new: &NewVm<'_>,
    undo: &mut UndoLog,
) -> AgentResult<&'static str> {
    let NewVm { spec, sources, tpm_from, nvram_from, strategy } = *new;
    let stop = &ctx.stop;
    let vm = &spec.uuid;
    let steps = sources.len() as u32 + 1;
    for (i, (v, source)) in spec.volumes.iter().zip(sources).enumerate() {
        stop.check("creating the VM")?;
        let dst = &v.install_path();
        let store = volumes::store(app, dst)?;
        undo.push(store.undo_for(dst)?);
        match source {
            Source::Image { image, size, provisioning } => {
                store.make_from_image(image, dst, *size, *provisioning, stop).await
            }
            Source::Empty { size, provisioning } => store.make_empty(dst, *size, *provisioning, stop).await,
            Source::Clone { from, linked } => store.clone_volume(from, dst, *linked, stop).await,
            Source::Restore { chain_top } => store.restore(chain_top, dst, stop).await,
        }
        .map_err(|e| e.context(format!("step 'create volume {}' failed", v.uuid)))?;
        ctx.progress(((i as u32 + 1) * 100 / steps) as u8, "volume created");
    }
    if let Some(from) = tpm_from {
        let dst = super::tpm::state_dir(&app.config.libvirt.swtpm_dir, vm);
        if dst.exists() {
            return Err(AgentError::conflict(format!("TPM state {} already exists", dst.display())));
        }
        undo.push(UndoStep::RemoveTree { path: dst.clone() });
        super::tpm::copy_state(from, &dst, stop).await.map_err(|e| e.context("step 'copy TPM state' failed"))?;
    }
    if let Some(ci) = &spec.cloud_init {
        super::cloud_init::make_seed(app, spec, ci, undo, stop)
            .await
            .map_err(|e| e.context("step 'build cloud-init seed' failed"))?;
    }
    super::nvram::make(app, spec, nvram_from, undo).await?;
    stop.check("creating the VM")?;
    let state = match strategy {
        Strategy::JustCreate => "Created",
        Strategy::CreateStopped => {
            super::define_domain(app, spec, false, undo).await.map_err(|e| e.context("step 'define domain' failed"))?;
            "Stopped"
        }
        Strategy::InstantStart => {
            super::define_domain(app, spec, true, undo).await.map_err(|e| e.context("step 'start domain' failed"))?;
            if spec.create_paused {
                "Paused"
            } else {
                "Running"
            }
        }
    };
    // A cancel that arrived during the last step still undoes the whole VM.
    stop.check("creating the VM")?;
    undo.push(UndoStep::RemoveRecord { vm: vm.clone() });
    owner.save(spec)?;
    Ok(state)
}
