//! Host admission, facts, capacity, VM state sync, and cancellation.

use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::host_identity::Identity;
use crate::host_info;
use crate::tasks::TaskCtx;
use crate::wire::host::*;

pub async fn connect(app: &App, _ctx: &TaskCtx, cmd: ConnectCmd) -> AgentResult<ConnectRsp> {
    if uuid::Uuid::try_parse(&cmd.host_uuid).is_err() {
        return Err(AgentError::invalid(format!("hostUuid {:?} is not a uuid", cmd.host_uuid)));
    }
    if let Some(url) = &cmd.send_command_url {
        crate::callbacks::client::parse_url(url).map_err(|e| AgentError::invalid(format!("sendCommandUrl: {e}")))?;
    }
    // Ask libvirt first: a connect that fails must leave the stored identity as it was.
    let (libvirt_version, qemu_version) = app.libvirt.versions().await?;
    let identity =
        Identity { host_uuid: Some(cmd.host_uuid), send_command_url: cmd.send_command_url, version: cmd.version };
    app.identity.set(identity).map_err(|e| {
        AgentError::failed(
            "cannot persist the host identity",
            format!("{e}; check that the state directory is writable"),
        )
    })?;
    Ok(ConnectRsp { libvirt_version, qemu_version })
}

pub async fn ping(app: &App, _ctx: &TaskCtx, _cmd: PingCmd) -> AgentResult<PingRsp> {
    let id = app.identity.get();
    Ok(PingRsp { host_uuid: id.host_uuid, send_command_url: id.send_command_url, version: id.version })
}

pub async fn fact(app: &App, ctx: &TaskCtx, _cmd: crate::wire::Empty) -> AgentResult<FactRsp> {
    let (libvirt_version, _) = app.libvirt.versions().await?;
    let qemu_img_version = host_info::qemu_img_version(&ctx.stop).await?;
    let cpu = host_info::cpu_info();
    let os = host_info::os_release();
    Ok(FactRsp {
        hvm_cpu_flag: cpu.hvm_flag,
        ept_flag: cpu.ept_flag,
        cpu_model_name: cpu.model_name,
        cpu_architecture: host_info::architecture(),
        os_distribution: os.distribution,
        os_version: os.version,
        os_release: os.release,
        libvirt_version,
        qemu_img_version,
        hostname: host_info::hostname(),
        libvirt_capabilities: vec!["incrementalSnapshot".into(), "blockCopy".into()],
    })
}

pub async fn capacity(_app: &App, _ctx: &TaskCtx, _cmd: crate::wire::Empty) -> AgentResult<CapacityRsp> {
    let cpu = host_info::cpu_info();
    let mem = host_info::memory();
    Ok(CapacityRsp {
        cpu_num: cpu.logical_cpus,
        cpu_speed: cpu.mhz,
        used_cpu: 0,
        total_memory: mem.total,
        used_memory: mem.total.saturating_sub(mem.available),
        cpu_sockets: cpu.sockets,
    })
}

pub async fn vm_sync(app: &App, _ctx: &TaskCtx, _cmd: crate::wire::Empty) -> AgentResult<VmSyncRsp> {
    let (states, vm_in_shutdowns) = app.libvirt.list_vm_states().await?;
    Ok(VmSyncRsp { states: states.into_iter().collect(), vm_in_shutdowns })
}

pub async fn cancel(app: &App, _ctx: &TaskCtx, cmd: CancelCmd) -> AgentResult<CancelRsp> {
    match app.tasks.cancel_by_api(&cmd.cancellation_api_id) {
        0 => Err(AgentError::not_found(format!(
            "no matched job to cancel: no running task carries api id {}",
            cmd.cancellation_api_id
        ))),
        n => Ok(CancelRsp { cancelled: n }),
    }
}
