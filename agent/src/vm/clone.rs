//! Native `/vm/clone`: one VM into N copies, in parallel. Linked clones are overlays on a
//! frozen snapshot of the source (see [`super::freeze`]); copies are flat, independent files.
//! The source keeps running and sees the same data. Each clone is all-or-nothing on its own:
//! one failing does not undo the others, and leaves nothing behind.

use std::collections::HashSet;
use std::path::Path;

use futures::StreamExt;
use serde_json::{json, Value};

use super::freeze::freeze;
use super::undo::{UndoLog, UndoStep};
use super::volumes;
use crate::api::native::{CloneMode, CloneSpec, CloneVmCmd, CloneVmRsp, Strategy};
use crate::api::vm::{NicTo, StartVmCmd};
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::tasks::TaskCtx;

const MAX_CLONES: usize = 1000;

/// One clone to make: its spec (volumes already pointing at their targets) and, per volume,
/// the file it is made from.
struct Plan {
    spec: StartVmCmd,
    sources: Vec<String>,
}

fn random_uuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A locally administered unicast MAC in QEMU's range.
fn random_mac() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// `<...>/vol-<old>/<file>` → `<...>/vol-<new>/<new>.qcow2`: ZStack's layout, beside the source.
fn path_beside(source: &str, new_volume: &str) -> String {
    if let Some(p) = source.starts_with("ceph://").then(|| crate::ceph::path::CephPath::parse(source).ok()).flatten() {
        return format!("ceph://{}/{new_volume}", p.pool);
    }
    let p = Path::new(source);
    let base = p.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
    base.join(format!("vol-{new_volume}")).join(format!("{new_volume}.qcow2")).display().to_string()
}

fn clone_nics(source: &[NicTo], given: Option<&Vec<Value>>) -> AgentResult<Vec<NicTo>> {
    match given {
        Some(nics) => crate::api::decode(&Value::Array(nics.clone())).map_err(|e| e.context("clones[].nics")),
        None => Ok(source
            .iter()
            .map(|n| NicTo { mac: random_mac(), uuid: random_uuid(), nic_internal_name: String::new(), ..n.clone() })
            .collect()),
    }
}

/// Works out every clone's spec and target paths, and checks them all before anything is made.
fn plan(app: &App, cmd: &CloneVmCmd, source: &StartVmCmd) -> AgentResult<Vec<Plan>> {
    let n = cmd.names.len().max(cmd.clones.len());
    if n == 0 {
        return Err(AgentError::invalid("give at least one clone in `names` or `clones`"));
    }
    if n > MAX_CLONES {
        return Err(AgentError::invalid(format!("{n} clones requested; at most {MAX_CLONES} per call")));
    }
    if !cmd.names.is_empty() && !cmd.clones.is_empty() && cmd.names.len() != cmd.clones.len() {
        return Err(AgentError::invalid(format!(
            "`names` has {} entries but `clones` has {}",
            cmd.names.len(),
            cmd.clones.len()
        )));
    }
    let mut uuids = HashSet::new();
    let mut targets = HashSet::new();
    let mut plans = Vec::with_capacity(n);
    let empty = CloneSpec::default();
    for i in 0..n {
        let c = cmd.clones.get(i).unwrap_or(&empty);
        let uuid = c.uuid.clone().unwrap_or_else(random_uuid);
        crate::domain::check_uuid(&uuid).map_err(|e| e.context(format!("clones[{i}].uuid")))?;
        if uuid == source.vm_instance_uuid || !uuids.insert(uuid.clone()) {
            return Err(AgentError::invalid(format!("clone uuid {uuid} is used twice")));
        }
        if app.vm_records.load(&uuid).is_ok() {
            return Err(AgentError::conflict(format!("VM {uuid} already exists on this host")));
        }
        let mut spec = source.clone();
        spec.vm_instance_uuid = uuid.clone();
        spec.vm_name = cmd
            .names
            .get(i)
            .cloned()
            .or_else(|| c.name.clone())
            .unwrap_or_else(|| format!("{}-clone-{}", source.vm_name, i + 1));
        spec.system_serial_number = uuid::Uuid::new_v4().to_string();
        spec.nics = clone_nics(&source.nics, c.nics.as_ref())?;
        if !cmd.full {
            spec.data_volumes.clear();
        }
        if c.data_install_paths.len() > spec.data_volumes.len() {
            return Err(AgentError::invalid(format!(
                "clones[{i}].dataInstallPaths names more volumes than are cloned"
            )));
        }
        let mut sources = Vec::new();
        let volumes = std::iter::once(&mut spec.root_volume).chain(spec.data_volumes.iter_mut());
        for (k, v) in volumes.enumerate() {
            let given = if k == 0 { c.root_install_path.clone() } else { c.data_install_paths.get(k - 1).cloned() };
            let new_volume = random_uuid();
            let target = given.unwrap_or_else(|| path_beside(&v.install_path, &new_volume));
            let target = if target.starts_with("ceph://") {
                crate::ceph::path::CephPath::parse(&target)?.require_image()?;
                target
            } else {
                let confined = app.storage.roots().confine(&target)?;
                if confined.symlink_metadata().is_ok() {
                    return Err(AgentError::conflict(format!(
                        "clones[{i}]: volume {} already exists",
                        confined.display()
                    )));
                }
                confined.display().to_string()
            };
            if !targets.insert(target.clone()) {
                return Err(AgentError::invalid(format!("clones[{i}]: install path {target} is named twice")));
            }
            sources.push(v.install_path.clone());
            v.install_path = target;
            v.volume_uuid = new_volume;
            if !v.install_path.starts_with("ceph://") {
                v.format = "qcow2".into();
            }
        }
        crate::domain::validate(&spec).map_err(|e| e.context(format!("clones[{i}]")))?;
        plans.push(Plan { spec, sources });
    }
    Ok(plans)
}

pub async fn clone(app: &App, ctx: &TaskCtx, cmd: CloneVmCmd) -> AgentResult<CloneVmRsp> {
    let mut source = app.vm_records.load(&cmd.vm_uuid)?;
    let vm = source.vm_instance_uuid.clone();
    let _source_lock = app.vm_locks.write(&vm).await;
    let mut plans = plan(app, &cmd, &source)?;
    check_plans(app, ctx, &plans).await?;
    let state = app.libvirt.domain_state(&vm).await?;
    let running = state.is_some_and(|s| s.is_active());
    let tpm = source.tpm.as_ref().is_some_and(|t| t.enable);
    let staging = app.config.state_dir.join("staging").join(format!("tpm-{}", ctx.task_id));

    // Freeze what the clones are built from, with the source paused for that instant when it
    // runs and has a TPM, so that disks and TPM state are taken at the same moment.
    let needs_freeze = cmd.mode == CloneMode::Linked || running;
    let rbd_images: Vec<String> = std::iter::once(&source.root_volume)
        .chain(source.data_volumes.iter().filter(|_| cmd.full))
        .map(|v| v.install_path.clone())
        .filter(|p| p.starts_with("ceph://"))
        .collect();
    // Pause a running source while disks (several, or with a TPM) are taken, so they are
    // consistent with each other.
    let paused_here = (tpm || rbd_images.len() > 1) && state == Some(crate::libvirt::domains::VmState::Running);
    if paused_here {
        app.libvirt.suspend(&vm).await?;
    }
    let taken = async {
        let frozen = if needs_freeze { freeze(app, &mut source, cmd.full, &ctx.stop).await? } else { Vec::new() };
        let snapshots = volumes::snapshot_rbd(&app.rbd, &rbd_images, &ctx.stop).await?;
        let tpm_copied = if tpm {
            super::tpm::copy_state(&super::tpm::state_dir(&app.config.libvirt.swtpm_dir, &vm), &staging, &ctx.stop)
                .await?
        } else {
            false
        };
        Ok::<_, AgentError>((frozen, snapshots, tpm_copied))
    }
    .await;
    if paused_here {
        if let Err(e) = app.libvirt.resume(&vm).await {
            tracing::error!(vm = %vm, error = %e, "cannot resume the source VM after freezing it");
        }
    }
    // The plans' sources are what the source used until now: after a freeze, the read-only
    // snapshots; for copies of a stopped VM, its unchanged files; on RBD, the new snapshots.
    let (frozen, snapshots, tpm_copied) = taken.map_err(|e| e.context("step 'freeze source' failed"))?;
    for p in &mut plans {
        for s in &mut p.sources {
            if let Some((_, snap)) = snapshots.iter().find(|(image, _)| image == s) {
                *s = snap.clone();
            }
        }
    }

    let tpm_source = tpm_copied.then_some(staging.as_path());
    let cmd = &cmd;
    let total = plans.len();
    let results: Vec<Value> = futures::stream::iter(plans.into_iter().enumerate())
        .map(|(i, p)| async move {
            let name = p.spec.vm_name.clone();
            let uuid = p.spec.vm_instance_uuid.clone();
            let r = make_one(app, ctx, &cmd, p, tpm_source).await;
            ctx.progress(((i + 1) * 100 / total) as u8, "clone finished");
            match r {
                Ok(inv) => json!({ "inventory": inv }),
                Err(e) => json!({ "uuid": uuid, "name": name, "error": e.error_code(), "message": e.to_string() }),
            }
        })
        .buffered(app.config.clone.parallelism)
        .collect()
        .await;
    let _ = std::fs::remove_dir_all(&staging);
    for (_, snap) in &snapshots {
        volumes::drop_unused_snapshot(&app.rbd, snap).await;
    }
    let rbd_sources = snapshots.iter().map(|(image, snap)| json!({"installPath": image, "snapshotPath": snap}));
    Ok(CloneVmRsp {
        number_of_cloned_vm: results.iter().filter(|r| r.get("inventory").is_some()).count(),
        inventories: results,
        source_volumes: frozen.iter().map(|z| json!(z)).chain(rbd_sources).collect(),
    })
}

/// The checks that need the host or the cluster: no clone's domain exists, every source is
/// usable (each checked once) and every RBD target is free (checked concurrently: a call each).
async fn check_plans(app: &App, ctx: &TaskCtx, plans: &[Plan]) -> AgentResult<()> {
    let mut sources = HashSet::new();
    let mut rbd_targets = Vec::new();
    for p in plans {
        if app.libvirt.domain_state(&p.spec.vm_instance_uuid).await?.is_some() {
            return Err(AgentError::conflict(format!(
                "a domain for VM {} already exists on this host",
                p.spec.vm_instance_uuid
            )));
        }
        for (s, v) in p.sources.iter().zip(std::iter::once(&p.spec.root_volume).chain(&p.spec.data_volumes)) {
            if v.install_path.starts_with("ceph://") {
                rbd_targets.push(v.install_path.clone());
            }
            if !sources.insert(s.as_str()) {
                continue;
            }
            if s.starts_with("ceph://") {
                volumes::store(app, s)?.sizes(s, &ctx.stop).await?;
            } else {
                app.storage.roots().confine_chain(s)?;
            }
        }
    }
    let checks: Vec<AgentResult<()>> = futures::stream::iter(rbd_targets)
        .map(|t: String| async move { volumes::store(app, &t)?.check_free(&t, &ctx.stop).await })
        .buffer_unordered(app.config.clone.parallelism)
        .collect()
        .await;
    checks.into_iter().collect()
}

/// Makes one clone; on failure removes everything it made.
async fn make_one(
    app: &App,
    ctx: &TaskCtx,
    cmd: &CloneVmCmd,
    p: Plan,
    tpm_source: Option<&Path>,
) -> AgentResult<crate::api::inventory::VmInstanceInventory> {
    let vm = p.spec.vm_instance_uuid.clone();
    let _lock = app.vm_locks.write(&vm).await;
    let mut undo = UndoLog::default();
    let result = async {
        let new_volumes = std::iter::once(&p.spec.root_volume).chain(&p.spec.data_volumes);
        for (v, src) in new_volumes.zip(&p.sources) {
            ctx.stop.check("cloning the VM")?;
            let made = volumes::store(app, &v.install_path)?
                .clone_volume(src, &v.install_path, cmd.mode == CloneMode::Linked, &ctx.stop)
                .await
                .map_err(|e| e.context(format!("step 'create volume {}' failed", v.volume_uuid)))?;
            undo.push(made);
        }
        if let Some(staged) = tpm_source {
            let dst = super::tpm::state_dir(&app.config.libvirt.swtpm_dir, &vm);
            super::tpm::copy_state(staged, &dst, &ctx.stop)
                .await
                .map_err(|e| e.context("step 'copy TPM state' failed"))?;
            undo.push(UndoStep::RemoveTree { path: dst });
        }
        let state = match cmd.strategy {
            Strategy::JustCreate => "Created",
            Strategy::CreateStopped => {
                super::define(app, &p.spec, false, &mut undo)
                    .await
                    .map_err(|e| e.context("step 'define domain' failed"))?;
                "Stopped"
            }
            Strategy::InstantStart => {
                super::define(app, &p.spec, true, &mut undo)
                    .await
                    .map_err(|e| e.context("step 'start domain' failed"))?;
                if p.spec.create_paused {
                    "Paused"
                } else {
                    "Running"
                }
            }
        };
        ctx.stop.check("cloning the VM")?;
        app.vm_records.save(&p.spec)?;
        Ok::<_, AgentError>(state)
    }
    .await;
    match result {
        Ok(state) => {
            undo.commit();
            super::inventory::of(app, &p.spec, state, ctx).await
        }
        Err(e) => {
            undo.rollback(app).await;
            app.vm_records.remove(&vm);
            Err(e)
        }
    }
}
