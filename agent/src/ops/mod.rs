//! VM operations shared by the compat `/vm/*` paths and the native operations: checking a VM
//! spec against the host, defining and starting its domain, and undoing that on failure.

pub mod assemble;
pub mod backup;
pub mod bitmap_backup;
pub mod capture;
pub mod change_image;
pub mod clone;
pub mod cloud_init;
pub mod create;
pub mod derived;
pub mod flatten;
pub mod freeze;
pub mod inventory;
pub mod nvram;
pub mod owner;
pub mod quiesce;
pub mod rbd_backup;
pub mod snapshot_group;
pub mod tpm;
pub mod undo;
pub mod volumes;

use crate::app::App;
use crate::domain::{self, DomainSettings};
use crate::error::{AgentError, AgentResult};
use crate::model::{DiskFormat, VmSpec, Volume};
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::vm::{StartVmCmd, StartVmRsp};
use undo::{UndoLog, UndoStep};

pub use crate::domain::check_uuid;

/// How this host renders domains for VM `vm`.
pub fn settings(app: &App, vm: &str) -> DomainSettings {
    let c = &app.config;
    DomainSettings {
        domain_type: c.libvirt.domain_type.clone(),
        emulator: Some(c.libvirt.emulator.clone()).filter(|e| !e.is_empty()),
        console_log: Some(c.state_dir.join("console").join(format!("{vm}.log"))),
        ceph_user: c.ceph.id.clone(),
        uefi: c.uefi.clone(),
        ..DomainSettings::default()
    }
}

/// Checks `spec` against this host: every file it names, and every backing file of every
/// disk, lies inside the storage roots and exists; disk formats are taken from the files
/// themselves (never from the command: a raw file declared qcow2, or the reverse, is how
/// backing-file tricks start).
pub async fn check_against_host(app: &App, spec: &mut VmSpec) -> AgentResult<()> {
    for path in domain::file_paths(spec) {
        app.storage.roots().confine_existing(&path.display().to_string())?;
    }
    nvram::check_firmware(&app.config.uefi, spec.firmware)?;
    spec.volumes.iter_mut().try_for_each(|vol| check_volume(app, vol))
}

/// Checks one volume against this host: a file, and every backing file of it, lies inside the
/// storage roots and exists; its format is read from the file itself.
pub fn check_volume(app: &App, vol: &mut Volume) -> AgentResult<()> {
    if let Location::File(p) = &vol.location {
        let path = app.storage.roots().confine_chain(&p.display().to_string())?;
        vol.format =
            DiskFormat::of_file(&path).map_err(|e| AgentError::invalid(format!("volume {}: {e}", p.display())))?;
    }
    Ok(())
}

/// Defines the domain of `spec` and, when `start` is set, starts it (paused if the spec says
/// so). The domain is recorded in `undo` (before it is defined: callers have checked that none
/// exists), so a failure, here or later in the caller, removes it.
pub async fn define(app: &App, spec: &VmSpec, start: bool, undo: &mut UndoLog) -> AgentResult<StartVmRsp> {
    define_domain(app, spec, start, undo).await?;
    let live = app.libvirt.xml(&spec.uuid).await?;
    domain::device_info(&live)
}

/// Defines VM `owner`'s domain from `spec` again when it is defined and stopped (a running
/// domain keeps the definition it runs with).
pub async fn redefine_if_stopped(app: &App, owner: &owner::VmGuard, spec: &VmSpec) -> AgentResult<()> {
    let vm = owner.uuid();
    if app.libvirt.domain_state(vm).await?.is_some_and(|s| !s.is_active()) {
        let xml = domain::render(spec, &settings(app, vm))?;
        app.libvirt.define(xml).await?;
    }
    Ok(())
}

/// [`define`] without reading back the devices libvirt placed (the native operations answer
/// with an inventory, which does not name them).
pub async fn define_domain(app: &App, spec: &VmSpec, start: bool, undo: &mut UndoLog) -> AgentResult<()> {
    let vm = &spec.uuid;
    let xml = domain::render(spec, &settings(app, vm))?;
    check_cpu(app, spec).await?;
    if let Some(dir) = settings(app, vm).console_log.as_deref().and_then(std::path::Path::parent) {
        std::fs::create_dir_all(dir).map_err(|e| {
            AgentError::failed("cannot create the console log directory", format!("{}: {e}", dir.display()))
        })?;
    }
    undo.push(UndoStep::RemoveDomain { vm: vm.clone() });
    tpm::set_secret(app, spec).await?;
    app.libvirt.define(xml).await.map_err(|e| AgentError::from(e).context(format!("defining domain {vm}")))?;
    if start {
        app.libvirt
            .start(vm, spec.create_paused)
            .await
            .map_err(|e| AgentError::from(e).context(format!("starting domain {vm}")))?;
    }
    Ok(())
}

/// Refuses a CPU mode this host cannot give (libvirt would only fail at start, or quietly
/// give another CPU).
async fn check_cpu(app: &App, spec: &VmSpec) -> AgentResult<()> {
    let Some(mode) = &spec.cpu.mode else { return Ok(()) };
    let caps = app.libvirt.domain_capabilities(&app.config.libvirt.domain_type, spec.machine.as_str()).await?;
    domain::check_cpu_mode(mode, &domain::cpu_offer(&caps)?)
}

/// `/vm/start`: a running (or paused) VM is left as it is; otherwise its domain is (re)defined
/// from the command and started. A start that fails leaves no domain behind.
pub async fn start(app: &App, _ctx: &TaskCtx, owner: &owner::VmGuard, cmd: StartVmCmd) -> AgentResult<StartVmRsp> {
    let mut spec = cmd.to_spec()?;
    // What ZStack's command does not carry stays as the agent made it. (An unreadable record
    // is replaced, as before.)
    if let Ok(Some(recorded)) = owner.record() {
        spec.genid = recorded.genid;
        spec.cloud_init = recorded.cloud_init;
    }
    check_against_host(app, &mut spec).await?;
    tpm::keep_encryption(owner, &mut spec);
    // The VM keeps the NVRAM it has (ZStack's command does not name one).
    let recorded = owner.record()?.and_then(|r| r.nvram);
    nvram::assign(app, &mut spec, recorded.as_deref())?;
    let vm = spec.uuid.clone();
    if app.libvirt.domain_state(&vm).await?.is_some_and(|s| s.is_active()) {
        return domain::device_info(&app.libvirt.xml(&vm).await?);
    }
    define_and_start(app, owner, &spec).await
}

/// (Re)defines the domain of `spec` and starts it, and records `spec` as the VM's. A start that
/// fails leaves no domain behind.
pub async fn define_and_start(app: &App, owner: &owner::VmGuard, spec: &VmSpec) -> AgentResult<StartVmRsp> {
    let vm = spec.uuid.clone();
    let mut undo = UndoLog::default();
    // A first start (no record yet) that fails leaves nothing: the NVRAM it made, the domain,
    // its TPM state and that state's secret go. A VM that ran before keeps them: they are its own.
    let first = matches!(owner.record(), Ok(None));
    // A VM that runs without its record could not be cloned or changed: both, or neither.
    let started = async {
        nvram::make(app, spec, None, &mut undo).await?;
        define(app, spec, true, &mut undo).await.and_then(|rsp| owner.save(spec).map(|_| rsp))
    };
    match started.await {
        Ok(rsp) => {
            undo.commit();
            Ok(rsp)
        }
        Err(e) if first => {
            undo.rollback(app, owner).await;
            Err(e)
        }
        Err(e) => {
            // Keep TPM state that an earlier life of this VM left: only the definition goes.
            undo.commit();
            let _ = app.libvirt.destroy(&vm).await;
            if let Err(u) = app.libvirt.undefine(&vm, false).await {
                tracing::error!(vm = %vm, error = %u, "cannot undefine the domain of a failed start");
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests;
