//! The compat `/vm/*` paths. `/vm/start`, `/vm/stop`, `/vm/destroy`: domains are defined from the
//! command, persistent while running, and undefined when stopped or destroyed (ZStack's model).

use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::ops;
use crate::tasks::TaskCtx;
use crate::wire::host::VirtualizerInfo;
use crate::wire::vm::{CreateCephSecretCmd, DestroyVmCmd, StartVmCmd, StartVmRsp, StopMode, StopVmCmd};
use crate::wire::Empty;

pub async fn start(app: &App, ctx: &TaskCtx, cmd: StartVmCmd) -> AgentResult<StartVmRsp> {
    let secret = addon_ceph_secret(&cmd)?;
    let owner = app.vms.lock(&cmd.vm_instance_uuid).await?;
    if let Some((uuid, key)) = secret {
        app.libvirt.set_ceph_secret(uuid, key).await?;
    }
    let vm = cmd.vm_instance_uuid.clone();
    let mut rsp = ops::start(app, ctx, &owner, cmd).await?;
    rsp.virtualizer_info = Some(virtualizer_info(app, vm).await?);
    Ok(rsp)
}

/// What the management node records of the QEMU VM `vm` runs on (the answers of `/vm/start` and
/// `/vm/reboot`): libvirt's hypervisor version.
pub async fn virtualizer_info(app: &App, vm: String) -> AgentResult<VirtualizerInfo> {
    let (_, version) = app.libvirt.versions().await?;
    Ok(VirtualizerInfo { uuid: Some(vm), virtualizer: "qemu-kvm", version })
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
    // The seed is the agent's own; an unreadable record leaves it for the operator.
    if let Ok(Some(spec)) = owner.record() {
        ops::cloud_init::remove_seed(&spec).await?;
        crate::ops::nvram::remove(&spec)?;
    }
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

pub async fn create_ceph_secret(app: &App, _ctx: &TaskCtx, cmd: CreateCephSecretCmd) -> AgentResult<Empty> {
    let key = ceph_key("uuid", &cmd.uuid, "userKey", &cmd.user_key)?;
    app.libvirt.set_ceph_secret(&cmd.uuid, key).await?;
    Ok(Empty {})
}

/// The cephx secret a Ceph VM's `/vm/start` carries in `addons` (`ceph_secret_uuid`,
/// `ceph_secret_key`), which ZStack's agent (re)defines before it starts the VM; checked before
/// anything is done.
fn addon_ceph_secret(cmd: &StartVmCmd) -> AgentResult<Option<(&str, Vec<u8>)>> {
    let text = |k: &str| cmd.addons.get(k).and_then(|v| v.as_str()).filter(|s| !s.is_empty());
    match (text("ceph_secret_uuid"), text("ceph_secret_key")) {
        (Some(uuid), Some(key)) => {
            Ok(Some((uuid, ceph_key("addons.ceph_secret_uuid", uuid, "addons.ceph_secret_key", key)?)))
        }
        (None, None) => Ok(None),
        _ => Err(AgentError::invalid(
            "addons has only one of ceph_secret_uuid and ceph_secret_key; give both or neither",
        )),
    }
}

/// Checks a secret's uuid and decodes its cephx key (base64, as Ceph prints it).
fn ceph_key(uuid_field: &str, uuid: &str, key_field: &str, key: &str) -> AgentResult<Vec<u8>> {
    use base64::Engine;
    if uuid::Uuid::parse_str(uuid).is_err() {
        return Err(AgentError::invalid(format!("{uuid_field} {uuid:?} is not a UUID")));
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(key.trim())
        .map_err(|e| AgentError::invalid(format!("{key_field} is not a base64 cephx key: {e}")))?;
    if key.is_empty() {
        return Err(AgentError::invalid(format!(
            "{key_field} is empty; give the cephx key (base64, as `ceph auth get-key` prints it)"
        )));
    }
    Ok(key)
}
