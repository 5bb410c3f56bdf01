//! Where a VM volume lives — a local qcow2 file or an RBD image — decided by its install path,
//! and the few operations VM-level work needs from either.

use super::undo::UndoStep;
use crate::app::App;
use crate::ceph::path::CephPath;
use crate::error::{AgentError, AgentResult};
use crate::qemu_img::CreateOptions;
use crate::stop::Stop;
use crate::storage::local::Provisioning;

/// Names of the snapshots this agent takes for clones; they are removed once unused.
pub const CLONE_SNAPSHOT_PREFIX: &str = "kvmagent-clone-";

pub enum Place {
    Local,
    Rbd(CephPath),
}

pub fn place(path: &str) -> AgentResult<Place> {
    if path.starts_with("ceph://") {
        let p = CephPath::parse(path)?;
        Ok(Place::Rbd(p))
    } else {
        Ok(Place::Local)
    }
}

async fn rbd_exists(app: &App, p: &CephPath, stop: &Stop) -> AgentResult<bool> {
    match app.rbd.info(p, stop).await {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Fails unless `path` can take a new volume (inside the roots / a valid image name, free).
pub async fn check_free(app: &App, path: &str, stop: &Stop) -> AgentResult<()> {
    let taken = match place(path)? {
        Place::Local => app.storage.roots().confine(path)?.symlink_metadata().is_ok(),
        Place::Rbd(p) => {
            p.require_image()?;
            rbd_exists(app, &p, stop).await?
        }
    };
    if taken {
        return Err(AgentError::conflict(format!("volume {path} already exists; choose another installPath")));
    }
    Ok(())
}

/// Fails unless `image` can be built from: a confined local chain, or an existing RBD snapshot.
pub async fn check_image(app: &App, image: &str, stop: &Stop) -> AgentResult<()> {
    match place(image)? {
        Place::Local => app.storage.roots().confine_chain(image).map(|_| ()).map_err(Into::into),
        Place::Rbd(p) => {
            let snap = p.require_snap()?;
            let snaps = app.rbd.snapshots(&p, stop).await?;
            if snaps.iter().any(|s| s.name == snap) {
                Ok(())
            } else {
                Err(AgentError::not_found(format!("image snapshot {p} does not exist")))
            }
        }
    }
}

/// A new volume at `dst` from `image`; returns how to undo it. On RBD the root is a clone of the
/// image's (protected) snapshot; thick means a full copy instead.
pub async fn make_from_image(
    app: &App,
    image: &str,
    dst: &str,
    size: Option<u64>,
    prov: Provisioning,
    stop: &Stop,
) -> AgentResult<UndoStep> {
    match (place(image)?, place(dst)?) {
        (Place::Local, Place::Local) => {
            let made = app.storage.create_from_image(image, dst, size, prov, stop).await?;
            Ok(UndoStep::RemoveFile { path: made })
        }
        (Place::Rbd(src), Place::Rbd(to)) => {
            let protected = app
                .rbd
                .snapshots(&src, stop)
                .await?
                .iter()
                .any(|s| Some(s.name.as_str()) == src.snap.as_deref() && s.protected.as_deref() == Some("true"));
            if !protected {
                app.rbd.snap_protect(&src, stop).await?;
            }
            app.rbd.clone(&src, &to, stop).await?;
            // Thick: the clone is flattened to stand alone (`rbd cp` would skip a clone's parent
            // data, `rbd deep cp` would carry the source's snapshot history).
            if prov == Provisioning::Thick {
                if let Err(e) = flatten_rbd(app, &to, stop, |_| {}).await {
                    let _ = app.rbd.remove(&to, &Stop::new()).await;
                    return Err(e);
                }
            }
            let undo = UndoStep::RemoveRbdImage { path: to.to_string() };
            if let Some(s) = size.filter(|s| *s > 0) {
                if let Err(e) = grow(app, &to, s, stop).await {
                    let _ = app.rbd.remove(&to, &Stop::new()).await;
                    return Err(e);
                }
            }
            Ok(undo)
        }
        _ => Err(AgentError::invalid(format!("{dst} and its image {image} must both be local or both on Ceph"))),
    }
}

async fn grow(app: &App, p: &CephPath, size: u64, stop: &Stop) -> AgentResult<()> {
    let current = app.rbd.info(p, stop).await?.size;
    if size < current {
        return Err(AgentError::invalid(format!(
            "size {size} is smaller than the image's {current} bytes; volumes cannot shrink"
        )));
    }
    if size > current {
        app.rbd.resize(p, size, stop).await?;
    }
    Ok(())
}

/// A new empty volume of `size` bytes at `dst`; returns how to undo it.
pub async fn make_empty(app: &App, dst: &str, size: u64, prov: Provisioning, stop: &Stop) -> AgentResult<UndoStep> {
    match place(dst)? {
        Place::Local => {
            let made = app.storage.create_empty(dst, size, None, prov, CreateOptions::default(), stop).await?;
            Ok(UndoStep::RemoveFile { path: made })
        }
        Place::Rbd(p) => {
            if size == 0 {
                return Err(AgentError::invalid("size must be greater than 0"));
            }
            app.rbd.create(&p, size, stop).await?;
            Ok(UndoStep::RemoveRbdImage { path: p.to_string() })
        }
    }
}

/// `(virtual size, bytes used)` of a volume.
pub async fn sizes(app: &App, path: &str, stop: &Stop) -> AgentResult<(u64, u64)> {
    match place(path)? {
        Place::Local => app.storage.sizes(path, stop).await,
        Place::Rbd(p) => Ok((app.rbd.info(&p, stop).await?.size, app.rbd.used(&p, stop).await?)),
    }
}

/// Bytes flattening the volume would add, from metadata (allocation maps) only.
pub async fn flatten_estimate(app: &App, path: &str, stop: &Stop) -> AgentResult<u64> {
    match place(path)? {
        Place::Local => Ok(app.storage.estimate_flatten(path, stop).await?.bytes_to_add),
        Place::Rbd(p) => {
            let info = app.rbd.info(&p, stop).await?;
            if info.parent.is_none() {
                return Ok(0);
            }
            let after = app.rbd.data_objects(&p, info.object_size, stop).await? * info.object_size;
            Ok(after.saturating_sub(app.rbd.used(&p, stop).await?))
        }
    }
}

/// Flattens an RBD volume (running or not: librbd hands the work to the VM's lock holder) and
/// checks that the parent is gone.
pub async fn flatten_rbd(app: &App, p: &CephPath, stop: &Stop, progress: impl FnMut(u8)) -> AgentResult<bool> {
    if app.rbd.info(p, stop).await?.parent.is_none() {
        return Ok(false);
    }
    app.rbd.flatten(p, stop, progress).await.map_err(|e| {
        if e.was_stopped() {
            stop.error("flattening the image")
        } else {
            e.into()
        }
    })?;
    if let Some(parent) = app.rbd.info(p, stop).await?.parent {
        return Err(AgentError::failed(
            "rbd flatten did not detach the image",
            format!("{p} still has parent {}/{}@{}; retry", parent.pool, parent.image, parent.snapshot),
        ));
    }
    Ok(true)
}

/// One clone volume at `dst` from `src` (a frozen local file, or an RBD snapshot): linked (an
/// overlay / an rbd clone) or a full copy. Returns how to undo it.
pub async fn clone_volume(app: &App, src: &str, dst: &str, linked: bool, stop: &Stop) -> AgentResult<UndoStep> {
    match place(src)? {
        Place::Local if linked => {
            let made =
                app.storage.create_empty(dst, 0, Some(src), Provisioning::Thin, CreateOptions::default(), stop).await?;
            Ok(UndoStep::RemoveFile { path: made })
        }
        Place::Local => {
            let made = app.storage.create_flat_copy(src, dst, stop, |_| {}).await?;
            Ok(UndoStep::RemoveFile { path: made })
        }
        // `src` is a snapshot this operation took and protected: clone it directly.
        Place::Rbd(snap) => {
            let to = CephPath::parse(dst)?;
            app.rbd.clone(&snap, &to, stop).await?;
            if !linked {
                if let Err(e) = flatten_rbd(app, &to, stop, |_| {}).await {
                    let _ = app.rbd.remove(&to, &Stop::new()).await;
                    return Err(e);
                }
            }
            Ok(UndoStep::RemoveRbdImage { path: to.to_string() })
        }
    }
}

/// Takes a protected snapshot of each RBD image in `images`, named for this operation; returns
/// `(image, snapshot)` paths.
pub async fn snapshot_rbd(app: &App, images: &[String], stop: &Stop) -> AgentResult<Vec<(String, String)>> {
    let name = format!("{CLONE_SNAPSHOT_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let mut out = Vec::new();
    for i in images {
        let snap = CephPath::parse(i)?.with_snap(&name);
        app.rbd.snap_create(&snap, stop).await?;
        app.rbd.snap_protect(&snap, stop).await?;
        out.push((i.clone(), snap.to_string()));
    }
    Ok(out)
}

/// Removes a temporary snapshot once no clone depends on it; it stays otherwise.
pub async fn drop_unused_snapshot(app: &App, snap: &str) {
    let stop = Stop::new();
    let Ok(p) = CephPath::parse(snap) else { return };
    match app.rbd.children(&p, &stop).await {
        Ok(kids) if kids.is_empty() => {
            let _ = app.rbd.snap_unprotect(&p, &stop).await;
            if let Err(e) = app.rbd.snap_remove(&p, &stop).await {
                tracing::warn!(snapshot = %p, error = %e, "cannot remove a temporary snapshot");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(snapshot = %p, error = %e, "cannot list the clones of a temporary snapshot"),
    }
}
