//! The compat `/vm/*` paths. `/vm/start`, `/vm/stop`, `/vm/destroy`: domains are defined from the
//! command, persistent while running, and undefined when stopped or destroyed (ZStack's model).

use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::ops;
use crate::tasks::TaskCtx;
use crate::wire::vm::{
    CreateCephSecretCmd, DestroyVmCmd, MergeSnapshotCmd, StartVmCmd, StartVmRsp, StopMode, StopVmCmd, TakeSnapshotCmd,
    TakeSnapshotRsp,
};
use crate::wire::Empty;

pub async fn start(app: &App, ctx: &TaskCtx, cmd: StartVmCmd) -> AgentResult<StartVmRsp> {
    let owner = app.vms.lock(&cmd.vm_instance_uuid).await?;
    ops::start(app, ctx, &owner, cmd).await
}

pub async fn stop(app: &App, _ctx: &TaskCtx, cmd: StopVmCmd) -> AgentResult<Empty> {
    let mode = cmd.mode()?;
    let _owner = app.vms.lock(&cmd.uuid).await?;
    if let StopMode::Grace(timeout) = mode {
        if !app.libvirt.shutdown_and_wait(&cmd.uuid, timeout).await.or_else(missing_is_stopped)? {
            tracing::info!(vm = %cmd.uuid, "guest did not shut down in time; powering it off");
        }
    }
    power_off_and_undefine(app, &cmd.uuid).await
}

pub async fn destroy(app: &App, _ctx: &TaskCtx, cmd: DestroyVmCmd) -> AgentResult<Empty> {
    let owner = app.vms.lock(&cmd.uuid).await?;
    power_off_and_undefine(app, &cmd.uuid).await?;
    owner.remove();
    Ok(Empty {})
}

/// Hard power-off, then undefine keeping TPM state (libvirt would otherwise delete it: the VM
/// may be started again under the same uuid).
async fn power_off_and_undefine(app: &App, vm: &str) -> AgentResult<Empty> {
    app.libvirt.destroy(vm).await.map(|_| true).or_else(missing_is_stopped)?;
    app.libvirt.undefine(vm, false).await?;
    Ok(Empty {})
}

/// Stopping a VM that does not exist is success: the end state is what was asked for.
fn missing_is_stopped(e: crate::libvirt::LibvirtError) -> AgentResult<bool> {
    if e.is_no_domain() {
        Ok(true)
    } else {
        Err(AgentError::from(e))
    }
}

/// `/vm/volume/takesnapshot` (ZStack): the volume's current file becomes the snapshot; the VM
/// (running or not) continues on a new overlay, which is reused when already created.
pub async fn take_snapshot(app: &App, ctx: &TaskCtx, cmd: TakeSnapshotCmd) -> AgentResult<TakeSnapshotRsp> {
    ops::check_uuid(&cmd.vm_uuid)?;
    if cmd.full_snapshot {
        return Err(AgentError::invalid("full snapshots are not supported by this agent; take an incremental one"));
    }
    let owner = app.vms.lock(&cmd.vm_uuid).await?;
    let new_top =
        cmd.new_volume_install_path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| cmd.install_path.clone());
    let target =
        ops::freeze::Target { volume_uuid: cmd.volume_uuid.clone(), current: cmd.volume_install_path.clone(), new_top };
    let frozen = ops::freeze::freeze_to(app, &owner, std::slice::from_ref(&target), &ctx.task_id, &ctx.stop).await?;
    if let Some(mut spec) = owner.record()? {
        ops::freeze::record(app, &owner, &mut spec, &frozen).await?;
    }
    let z = &frozen[0];
    let size = app.qemu_img.info(&z.snapshot_path, &ctx.stop).await?.actual_size;
    Ok(TakeSnapshotRsp {
        new_volume_install_path: z.install_path.display().to_string(),
        snapshot_install_path: z.snapshot_path.display().to_string(),
        size,
    })
}

/// `/vm/volume/mergesnapshot` (ZStack): a live block pull on the running VM, verified from the
/// qcow2 header before success is reported.
pub async fn merge_snapshot(app: &App, ctx: &TaskCtx, cmd: MergeSnapshotCmd) -> AgentResult<Empty> {
    let _owner = app.vms.lock(&cmd.vm_uuid).await?;
    let _volume = app.volume_locks.write(&cmd.dest_path).await?;
    let dest = app.storage.roots().confine_chain(&cmd.dest_path)?;
    let base = match (cmd.full_rebase, cmd.src_path.as_deref().filter(|p| !p.is_empty())) {
        (true, _) => None,
        (false, Some(src)) => Some(app.storage.roots().confine_existing(src)?),
        (false, None) => return Err(AgentError::invalid("srcPath is required unless fullRebase is true")),
    };
    if base.is_none()
        && crate::qemu_img::read_header(&dest).map_err(|e| AgentError::invalid(e.to_string()))?.backing_file.is_none()
    {
        return Ok(Empty {});
    }
    if !app.libvirt.domain_state(&cmd.vm_uuid).await?.is_some_and(|s| s.is_active()) {
        return Err(AgentError::conflict(format!("VM {} is not running; merge offline instead", cmd.vm_uuid)));
    }
    ops::flatten::pull_live(app, ctx, &cmd.vm_uuid, &dest, base.as_deref(), |p| ctx.progress(p, "pulling")).await?;
    Ok(Empty {})
}

pub async fn create_ceph_secret(app: &App, _ctx: &TaskCtx, cmd: CreateCephSecretCmd) -> AgentResult<Empty> {
    use base64::Engine;
    if uuid::Uuid::parse_str(&cmd.uuid).is_err() {
        return Err(AgentError::invalid(format!("uuid {:?} is not a UUID", cmd.uuid)));
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(cmd.user_key.trim())
        .map_err(|e| AgentError::invalid(format!("userKey is not a base64 cephx key: {e}")))?;
    if key.is_empty() {
        return Err(AgentError::invalid(
            "userKey is empty; give the cephx key (base64, as `ceph auth get-key` prints it)",
        ));
    }
    app.libvirt.set_ceph_secret(&cmd.uuid, key).await?;
    Ok(Empty {})
}
