//! `/ceph/primarystorage/*`: RBD images, snapshots and clones. ZStack serves these from a
//! separate agent on the monitors; this agent serves them on its own port.

use crate::app::App;
use crate::ceph::path::CephPath;
use crate::error::{AgentError, AgentResult};
use crate::tasks::TaskCtx;
use crate::wire::ceph::*;
use crate::wire::Empty;

fn image(p: &str) -> AgentResult<CephPath> {
    let p = CephPath::parse(p)?;
    p.require_image()?;
    Ok(p)
}

fn snapshot(p: &str) -> AgentResult<CephPath> {
    let p = CephPath::parse(p)?;
    p.require_snap()?;
    Ok(p)
}

async fn describe(app: &App, ctx: &TaskCtx, p: &CephPath) -> AgentResult<ImageRsp> {
    let size = app.rbd.info(p, &ctx.stop).await?.size;
    let actual_size = app.rbd.used(p, &ctx.stop).await?;
    Ok(ImageRsp { install_path: p.to_string(), size, actual_size })
}

/// The answer about image `p` that this command just made (`made`); should it fail, the image
/// goes again: a failed command leaves nothing it made.
async fn answer_made(
    app: &App,
    p: &CephPath,
    made: bool,
    answer: impl std::future::Future<Output = AgentResult<ImageRsp>>,
) -> AgentResult<ImageRsp> {
    let r = answer.await;
    if r.is_err() && made {
        if let Err(e) = app.rbd.remove(p, &crate::stop::Stop::new()).await {
            tracing::error!(image = %p, error = %e, "cannot remove the image a failed command made");
        }
    }
    r
}

async fn refuse_existing(app: &App, ctx: &TaskCtx, p: &CephPath) -> AgentResult<()> {
    if app.rbd.exists(p, &ctx.stop).await? {
        return Err(AgentError::conflict(format!("{p} already exists; delete it first or choose another path")));
    }
    Ok(())
}

pub async fn create_empty(app: &App, ctx: &TaskCtx, cmd: CreateEmptyCmd) -> AgentResult<ImageRsp> {
    let p = image(&cmd.install_path)?;
    if cmd.size == 0 {
        return Err(AgentError::invalid("size must be greater than 0"));
    }
    let _lock = app.volume_locks.write_rbd(&p).await;
    let made = !(cmd.skip_if_existing && app.rbd.exists(&p, &ctx.stop).await?);
    if made {
        refuse_existing(app, ctx, &p).await?;
        app.rbd.create(&p, cmd.size, &ctx.stop).await?;
    }
    answer_made(app, &p, made, describe(app, ctx, &p)).await
}

/// `rbd clone` of a snapshot; a v1-format cluster needs the snapshot protected first, which is
/// metadata only and done here when missing.
pub async fn clone(app: &App, ctx: &TaskCtx, cmd: CopyCmd) -> AgentResult<ImageRsp> {
    let src = snapshot(&cmd.src_path)?;
    let dst = image(&cmd.dst_path)?;
    let _lock = app.volume_locks.write_rbd(&dst).await;
    refuse_existing(app, ctx, &dst).await?;
    let snap = src.require_snap()?.to_owned();
    let snaps = app.rbd.snapshots(&src, &ctx.stop).await?;
    let found = snaps
        .iter()
        .find(|s| s.name == snap)
        .ok_or_else(|| AgentError::not_found(format!("snapshot {src} does not exist")))?;
    if found.protected.as_deref() != Some("true") {
        app.rbd.snap_protect(&src, &ctx.stop).await?;
    }
    app.rbd.clone_snapshot(&src, &dst, &ctx.stop).await?;
    answer_made(app, &dst, true, async {
        // ZStack reports the source's size for a clone.
        let mut rsp = describe(app, ctx, &dst).await?;
        rsp.size = app.rbd.info(&src, &ctx.stop).await?.size.max(rsp.size);
        Ok(rsp)
    })
    .await
}

pub async fn flatten(app: &App, ctx: &TaskCtx, cmd: PathCmd) -> AgentResult<Empty> {
    let p = image(&cmd.path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    if app.rbd.info(&p, &ctx.stop).await?.parent.is_some() {
        app.rbd.flatten(&p, &ctx.stop, &mut |pct| ctx.progress(pct, "flattening")).await.map_err(|e| {
            if e.was_stopped() {
                ctx.stop.error("flattening the image")
            } else {
                e.into()
            }
        })?;
    }
    Ok(Empty {})
}

pub async fn snapshot_create(app: &App, ctx: &TaskCtx, cmd: SnapshotCmd) -> AgentResult<ImageRsp> {
    let p = snapshot(&cmd.snapshot_path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    match app.rbd.snap_create(&p, &ctx.stop).await {
        Err(e) if e.is_exists() && cmd.skip_on_existing => {}
        other => other?,
    }
    describe(app, ctx, &p).await
}

pub async fn snapshot_protect(app: &App, ctx: &TaskCtx, cmd: SnapshotCmd) -> AgentResult<Empty> {
    let p = snapshot(&cmd.snapshot_path)?;
    match app.rbd.snap_protect(&p, &ctx.stop).await {
        Err(_) if cmd.ignore_error => Ok(Empty {}),
        other => other.map(|_| Empty {}).map_err(Into::into),
    }
}

/// Refuses while clones still depend on the snapshot.
async fn unprotect_if_unused(app: &App, ctx: &TaskCtx, p: &CephPath) -> AgentResult<()> {
    let kids = app.rbd.children(p, &ctx.stop).await?;
    if !kids.is_empty() {
        let names: Vec<String> = kids.iter().map(ToString::to_string).collect();
        return Err(AgentError::conflict(format!(
            "snapshot {p} still has clones {names:?}; flatten or delete them first"
        )));
    }
    let snap = p.require_snap()?;
    let protected =
        app.rbd.snapshots(p, &ctx.stop).await?.iter().any(|s| s.name == snap && s.protected.as_deref() == Some("true"));
    if protected {
        app.rbd.snap_unprotect(p, &ctx.stop).await?;
    }
    Ok(())
}

pub async fn snapshot_unprotect(app: &App, ctx: &TaskCtx, cmd: SnapshotCmd) -> AgentResult<Empty> {
    let p = snapshot(&cmd.snapshot_path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    unprotect_if_unused(app, ctx, &p).await.map(|_| Empty {})
}

pub async fn snapshot_delete(app: &App, ctx: &TaskCtx, cmd: SnapshotCmd) -> AgentResult<Empty> {
    let p = snapshot(&cmd.snapshot_path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    unprotect_if_unused(app, ctx, &p).await?;
    app.rbd.snap_remove(&p, &ctx.stop).await?;
    Ok(Empty {})
}

/// A full, independent copy; a failed copy leaves no destination image.
pub async fn copy(app: &App, ctx: &TaskCtx, cmd: CopyCmd) -> AgentResult<ImageRsp> {
    let src = CephPath::parse(&cmd.src_path)?;
    let dst = image(&cmd.dst_path)?;
    let _lock = app.volume_locks.write_rbd(&dst).await;
    app.rbd.info(&src, &ctx.stop).await?;
    refuse_existing(app, ctx, &dst).await?;
    if let Err(e) = app.rbd.deep_copy(&src, &dst, &ctx.stop).await {
        if let Err(rm) = app.rbd.remove(&dst, &crate::stop::Stop::new()).await {
            if !rm.is_not_found() {
                tracing::error!(image = %dst, error = %rm, "cannot remove the half-made copy");
            }
        }
        return Err(if e.was_stopped() { ctx.stop.error("copying the image") } else { e.into() });
    }
    describe(app, ctx, &dst).await
}

pub async fn get_size(app: &App, ctx: &TaskCtx, cmd: InstallPathCmd) -> AgentResult<ImageRsp> {
    let p = image(&cmd.install_path)?;
    let _lock = app.volume_locks.read_rbd(&p).await;
    describe(app, ctx, &p).await
}

/// Deletes an image; one that is already gone is success. Its snapshots must be deleted first.
pub async fn delete(app: &App, ctx: &TaskCtx, cmd: InstallPathCmd) -> AgentResult<Empty> {
    let p = image(&cmd.install_path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    if !app.rbd.exists(&p, &ctx.stop).await? {
        return Ok(Empty {});
    }
    let snaps = app.rbd.snapshots(&p, &ctx.stop).await?;
    if !snaps.is_empty() {
        let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
        return Err(AgentError::conflict(format!("{p} still has snapshots {names:?}; delete them first")));
    }
    let parent = app.rbd.info(&p, &ctx.stop).await?.parent;
    app.rbd.remove(&p, &ctx.stop).await?;
    // A snapshot this agent took for clones goes with its last clone.
    if let Some(parent) = parent.filter(|pa| pa.snapshot.starts_with(crate::ops::volumes::CLONE_SNAPSHOT_PREFIX)) {
        let snap = CephPath { pool: parent.pool, image: parent.image, snap: Some(parent.snapshot) };
        crate::ops::volumes::drop_unused_snapshot(app.rbd.as_ref(), &snap.to_string()).await;
    }
    Ok(Empty {})
}

pub async fn get_backing_chain(app: &App, ctx: &TaskCtx, cmd: InstallPathCmd) -> AgentResult<BackingChainRsp> {
    let mut current = image(&cmd.install_path)?;
    let mut backing_chain = Vec::new();
    let mut total_size = 0;
    for _ in 0..64 {
        let Some(parent) = app.rbd.info(&current, &ctx.stop).await?.parent else { break };
        let snap = CephPath { pool: parent.pool, image: parent.image, snap: Some(parent.snapshot) };
        total_size += app.rbd.used(&snap, &ctx.stop).await?;
        backing_chain.push(snap.to_string());
        current = CephPath { snap: None, ..snap };
    }
    Ok(BackingChainRsp { backing_chain, total_size })
}
