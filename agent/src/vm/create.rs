//! Native `/vm/create`: root volume (thin overlay on a cached image, thick copy, or empty), data
//! volumes, then the domain per strategy — all or nothing. Everything is checked before the
//! first file is made; every step that makes something records its undo; any failure (or a
//! cancel, or the deadline) plays the undo log back.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::undo::UndoLog;
use super::volumes;
use crate::api::inventory::VmInstanceInventory;
use crate::api::native::{CreateVmCmd, Provisioning as WireProvisioning, Strategy};
use crate::api::vm::StartVmCmd;
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::storage::local::Provisioning;
use crate::tasks::TaskCtx;

fn provisioning(p: WireProvisioning) -> Provisioning {
    match p {
        WireProvisioning::Thin => Provisioning::Thin,
        WireProvisioning::Thick => Provisioning::Thick,
    }
}

/// The VolumeTO of a new volume: a qcow2 file, or an RBD image reached as `cmd.ceph` says.
fn volume_to(cmd: &CreateVmCmd, path: &str, uuid: &str, device_id: usize) -> Value {
    if path.starts_with("ceph://") {
        let ceph = cmd.ceph.clone().unwrap_or_default();
        json!({"installPath": path, "volumeUuid": uuid, "deviceId": device_id, "deviceType": "ceph", "format": "raw",
               "secretUuid": ceph.secret_uuid, "monInfo": ceph.mon_info})
    } else {
        json!({"installPath": path, "volumeUuid": uuid, "deviceId": device_id, "deviceType": "file", "format": "qcow2"})
    }
}

/// The StartVmCmd of the new VM: the caller's `vm` object with the volumes filled in.
fn vm_spec(cmd: &CreateVmCmd) -> AgentResult<StartVmCmd> {
    let mut vm = cmd.vm.clone();
    vm.insert("rootVolume".into(), volume_to(cmd, &cmd.root_volume.install_path, &cmd.root_volume.volume_uuid, 0));
    let data: Vec<Value> = cmd
        .data_volumes
        .iter()
        .enumerate()
        .map(|(i, d)| volume_to(cmd, &d.install_path, &d.volume_uuid, i + 1))
        .collect();
    vm.insert("dataVolumes".into(), Value::Array(data));
    if let Some(tpm) = &cmd.tpm {
        vm.insert("tpm".into(), tpm.clone());
    }
    crate::api::decode(&Value::Object(vm)).map_err(|e| AgentError::invalid(format!("vm: {}", e.details)))
}

/// Everything that can be known before making anything: the spec is valid, targets are free and
/// inside the roots, the image and every other file the domain opens are too.
async fn check(app: &App, ctx: &TaskCtx, cmd: &CreateVmCmd, spec: &StartVmCmd) -> AgentResult<()> {
    crate::domain::validate(spec)?;
    let roots = app.storage.roots();
    let mut targets = HashSet::new();
    let all = std::iter::once((&cmd.root_volume.install_path, &cmd.root_volume.volume_uuid))
        .chain(cmd.data_volumes.iter().map(|d| (&d.install_path, &d.volume_uuid)));
    for (path, uuid) in all {
        if uuid.is_empty() {
            return Err(AgentError::invalid(format!("volume at {path} has an empty volumeUuid")));
        }
        volumes::store(app, path)?.check_free(path, &ctx.stop).await?;
        if !targets.insert(path.clone()) {
            return Err(AgentError::invalid(format!("installPath {path} is named twice")));
        }
    }
    match (&cmd.root_volume.image_path, cmd.root_volume.size) {
        (Some(image), _) => volumes::store(app, image)?
            .check_image(image, &ctx.stop)
            .await
            .map_err(|e| e.context("rootVolume.imagePath"))?,
        (None, Some(s)) if s > 0 => {}
        (None, _) => return Err(AgentError::invalid("rootVolume needs imagePath or a size > 0")),
    }
    if let Some((i, _)) = cmd.data_volumes.iter().enumerate().find(|(_, d)| d.size == 0) {
        return Err(AgentError::invalid(format!("dataVolumes[{i}].size must be greater than 0")));
    }
    let volume_paths: HashSet<&str> = std::iter::once(spec.root_volume.install_path.as_str())
        .chain(spec.data_volumes.iter().map(|v| v.install_path.as_str()))
        .collect();
    for path in crate::domain::file_paths(spec).into_iter().filter(|p| !volume_paths.contains(p)) {
        roots.confine_existing(path)?;
    }
    if app.libvirt.domain_state(&spec.vm_instance_uuid).await?.is_some() {
        return Err(AgentError::conflict(format!(
            "a domain for VM {} already exists on this host",
            spec.vm_instance_uuid
        )));
    }
    Ok(())
}

pub async fn create(app: &App, ctx: &TaskCtx, cmd: CreateVmCmd) -> AgentResult<VmInstanceInventory> {
    let spec = vm_spec(&cmd)?;
    let _vm_lock = app.vm_locks.write(&spec.vm_instance_uuid).await;
    let paths: Vec<String> = std::iter::once(cmd.root_volume.install_path.clone())
        .chain(cmd.data_volumes.iter().map(|d| d.install_path.clone()))
        .collect();
    let _volume_locks = app.volume_locks.write_all(&paths).await;
    check(app, ctx, &cmd, &spec).await?;

    let mut undo = UndoLog::default();
    match build(app, ctx, &cmd, &spec, &mut undo).await {
        Ok(state) => {
            undo.commit();
            app.vm_records.save(&spec)?;
            ctx.progress(100, "created");
            super::inventory::of(app, &spec, state, ctx).await
        }
        Err(e) => {
            undo.rollback(app).await;
            Err(e)
        }
    }
}

/// Makes the volumes and the domain; returns the VM's resulting state.
async fn build(
    app: &App,
    ctx: &TaskCtx,
    cmd: &CreateVmCmd,
    spec: &StartVmCmd,
    undo: &mut UndoLog,
) -> AgentResult<&'static str> {
    let stop = &ctx.stop;
    let steps = 2 + cmd.data_volumes.len() as u32;
    let progress = |done: u32, what: &str| ctx.progress((done * 100 / steps) as u8, what);

    let root = &cmd.root_volume;
    let prov = provisioning(root.provisioning);
    let made = match &root.image_path {
        Some(image) => {
            volumes::store(app, &root.install_path)?
                .make_from_image(image, &root.install_path, root.size, prov, stop)
                .await
        }
        None => {
            volumes::store(app, &root.install_path)?
                .make_empty(&root.install_path, root.size.unwrap_or(0), prov, stop)
                .await
        }
    }
    .map_err(|e| e.context("step 'create root volume' failed"))?;
    undo.push(made);
    progress(1, "root volume created");

    for (i, d) in cmd.data_volumes.iter().enumerate() {
        stop.check("creating the VM")?;
        let made = volumes::store(app, &d.install_path)?
            .make_empty(&d.install_path, d.size, provisioning(d.provisioning), stop)
            .await
            .map_err(|e| e.context(format!("step 'create data volume {i}' failed")))?;
        undo.push(made);
        progress(2 + i as u32, "data volume created");
    }
    stop.check("creating the VM")?;

    let state = match cmd.strategy {
        Strategy::JustCreate => "Created",
        Strategy::CreateStopped => {
            super::define(app, spec, false, undo).await.map_err(|e| e.context("step 'define domain' failed"))?;
            "Stopped"
        }
        Strategy::InstantStart => {
            super::define(app, spec, true, undo).await.map_err(|e| e.context("step 'start domain' failed"))?;
            if spec.create_paused {
                "Paused"
            } else {
                "Running"
            }
        }
    };
    // A cancel that arrived during the last step still undoes the whole VM.
    stop.check("creating the VM")?;
    Ok(state)
}
