//! Flattening volumes. Local files: offline by a flat copy renamed over the volume, live by
//! libvirt's block pull on the running VM (polled for progress, aborted on cancel or deadline,
//! and verified from the qcow2 header before success is reported). RBD images: `rbd flatten`,
//! running or not, verified by the parent being gone.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::qemu_img;
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::native::{FlattenEstimateRsp, FlattenVmCmd, VolumeEstimate};

const POLL: Duration = Duration::from_millis(200);

/// The live disk target (e.g. `vda`) whose top file is `path`.
pub(super) async fn disk_of(app: &App, vm: &str, path: &Path) -> AgentResult<String> {
    let live = app.libvirt.xml(vm).await?;
    crate::domain::live_disks(&live)?
        .into_iter()
        .find(|d| d.file.as_deref().is_some_and(|f| std::fs::canonicalize(f).is_ok_and(|c| c == path)))
        .map(|d| d.target)
        .ok_or_else(|| AgentError::not_found(format!("VM {vm} has no disk on {}", path.display())))
}

/// Pulls the chain of `path` above `base` (everything when `None`) into it, on the running VM.
/// Returns once the job is done and the qcow2 header shows the expected backing file.
pub async fn pull_live(
    app: &App,
    ctx: &TaskCtx,
    vm: &str,
    path: &Path,
    base: Option<&Path>,
    progress: impl Fn(u8),
) -> AgentResult<()> {
    let disk = disk_of(app, vm, path).await?;
    // Commands on one volume never overlap, so a job already on the disk is the pull of a run
    // of this agent that was killed: it is re-attached and awaited (and verified like ours).
    if app.libvirt.block_job(vm, &disk).await?.is_some() {
        tracing::warn!(vm, disk = %disk, "re-attaching to the block job already running on the disk");
    } else {
        let base_str = base.map(|b| b.display().to_string());
        app.libvirt
            .block_pull(vm, &disk, base_str.as_deref())
            .await
            .map_err(|e| AgentError::from(e).context(format!("starting the block pull of {disk}")))?;
    }
    loop {
        tokio::select! {
            _ = ctx.stop.stopped() => {
                if let Err(e) = app.libvirt.block_job_abort(vm, &disk, false).await {
                    tracing::error!(vm, disk = %disk, error = %e, "cannot abort the block pull");
                }
                return Err(ctx.stop.error("flattening the running VM's disk"));
            }
            _ = tokio::time::sleep(POLL) => {}
        }
        match app.libvirt.block_job(vm, &disk).await? {
            Some(p) if p.end > 0 => progress((p.cur * 100 / p.end).min(99) as u8),
            Some(_) => {}
            None => break,
        }
    }
    // libvirt has reported jobs done that did not change the chain: trust the header only.
    let backing = qemu_img::read_header(path).map_err(|e| AgentError::internal(e.to_string()))?.backing_file;
    let now = backing.as_deref().map(|b| path.parent().unwrap_or(Path::new("/")).join(b));
    match (base, now) {
        (None, None) => Ok(()),
        (Some(want), Some(got)) if std::fs::canonicalize(&got).is_ok_and(|g| g == want) => Ok(()),
        (_, got) => Err(AgentError::failed(
            "the block pull did not leave the expected chain",
            format!("{} has backing file {got:?}, expected {base:?}; retry", path.display()),
        )),
    }
}

/// Flattens one volume of VM `vm`, live when the VM runs. Returns whether anything changed.
async fn flatten_volume(
    app: &App,
    ctx: &TaskCtx,
    vm: &str,
    running: bool,
    path: &str,
    progress: impl Fn(u8) + Sync,
) -> AgentResult<bool> {
    let _lock = app.volume_locks.write(path).await?;
    let store = super::volumes::store(app, path)?;
    if !store.has_parent(path, &ctx.stop).await? {
        return Ok(false);
    }
    match Location::confined(path, app.storage.roots())? {
        // A running VM's file is pulled by QEMU itself; anything else is flattened in place.
        Location::File(resolved) if running => pull_live(app, ctx, vm, &resolved, None, progress).await?,
        _ => store.flatten(path, &ctx.stop, &progress).await?,
    }
    Ok(true)
}

pub async fn flatten(app: &App, ctx: &TaskCtx, cmd: FlattenVmCmd) -> AgentResult<Value> {
    let owner = app.vms.lock(&cmd.vm_uuid).await?;
    let spec = owner.load()?;
    let vm = spec.uuid.clone();
    let volumes: Vec<_> = std::iter::once(spec.root()).chain(spec.data_volumes().iter().filter(|_| cmd.full)).collect();
    // Every local chain must stay inside the roots, and RBD paths be valid, before anything runs.
    for v in &volumes {
        super::volumes::store(app, &v.install_path())?.check_source(&v.install_path(), &ctx.stop).await?;
    }
    if cmd.dry_run {
        let mut out = Vec::new();
        for v in &volumes {
            let bytes_to_add =
                super::volumes::store(app, &v.install_path())?.flatten_estimate(&v.install_path(), &ctx.stop).await?;
            out.push(VolumeEstimate { uuid: v.uuid.clone(), install_path: v.install_path().clone(), bytes_to_add });
        }
        let total_bytes_to_add = out.iter().map(|v| v.bytes_to_add).sum();
        return serde_json::to_value(FlattenEstimateRsp { volumes: out, total_bytes_to_add })
            .map_err(|e| AgentError::internal(e.to_string()));
    }
    let state = app.libvirt.domain_state(&vm).await?;
    let running = state.is_some_and(|s| s.is_active());
    let n = volumes.len();
    for (i, v) in volumes.iter().enumerate() {
        let step = format!("flattening volume {}", v.uuid);
        let report = |p: u8| ctx.progress(((i * 100 + p as usize) / n) as u8, &step);
        flatten_volume(app, ctx, &vm, running, &v.install_path(), report)
            .await
            .map_err(|e| e.context(format!("flattening volume {}", v.uuid)))?;
    }
    ctx.progress(100, "flattened");
    let label = match state {
        Some(crate::libvirt::domains::VmState::Paused) => "Paused",
        Some(s) if s.is_active() => "Running",
        Some(_) => "Stopped",
        None => "Created",
    };
    let inv = super::inventory::of(app, &spec, label, ctx).await?;
    serde_json::to_value(inv).map_err(|e| AgentError::internal(e.to_string()))
}
