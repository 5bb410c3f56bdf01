//! Volumes as RBD images: roots are clones of an image's protected snapshot, clones are clones
//! of a temporary snapshot (removed once unused), full copies are flattened clones.

use super::{mixed, taken, Fut, VolumeStore};
use crate::ceph::path::CephPath;
use crate::ceph::rbd::Rbd;
use crate::error::{AgentError, AgentResult};
use crate::ops::undo::UndoStep;
use crate::qemu_img::{Convert, QemuImg};
use crate::stop::Stop;
use crate::storage::local::Provisioning;

/// Names of the snapshots this agent takes for clones; they are removed once unused.
pub const CLONE_SNAPSHOT_PREFIX: &str = "kvmagent-clone-";

/// Names of the snapshots backups keep (the newest point's) and took (earlier versions).
pub const BACKUP_SNAPSHOT_PREFIX: &str = "kvmagent-backup-";

pub struct RbdStore<'a> {
    pub rbd: &'a dyn Rbd,
    pub qemu_img: &'a dyn QemuImg,
}

impl RbdStore<'_> {
    /// Clones the protected snapshot `src` to `to`; thick flattens the clone so it stands alone
    /// (`rbd cp` would skip a clone's parent data, `rbd deep cp` would carry the source's
    /// snapshot history). A failed flatten leaves no image.
    async fn clone_from(&self, src: &CephPath, to: &CephPath, thick: bool, stop: &Stop) -> AgentResult<()> {
        self.rbd.clone_snapshot(src, to, stop).await?;
        if thick {
            if let Err(e) = flatten_rbd(self.rbd, to, stop, |_| {}).await {
                let _ = self.rbd.remove(to, &Stop::new()).await;
                return Err(e);
            }
        }
        Ok(())
    }

    async fn grow(&self, p: &CephPath, size: u64, stop: &Stop) -> AgentResult<()> {
        let current = self.rbd.info(p, stop).await?.size;
        if size < current {
            return Err(AgentError::invalid(format!(
                "size {size} is smaller than the image's {current} bytes; volumes cannot shrink"
            )));
        }
        if size > current {
            self.rbd.resize(p, size, stop).await?;
        }
        Ok(())
    }
}

impl VolumeStore for RbdStore<'_> {
    fn undo_for(&self, dst: &str) -> AgentResult<UndoStep> {
        let p = CephPath::parse(dst)?;
        p.require_image()?;
        Ok(UndoStep::RemoveRbdImage { path: p.to_string() })
    }

    fn check_free<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move {
            let p = CephPath::parse(path)?;
            p.require_image()?;
            if self.rbd.exists(&p, stop).await? {
                return Err(taken(path));
            }
            Ok(())
        })
    }

    fn check_image<'a>(&'a self, image: &'a str, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move {
            let p = CephPath::parse(image)?;
            let snap = p.require_snap()?;
            if self.rbd.snapshots(&p, stop).await?.iter().any(|s| s.name == snap) {
                Ok(())
            } else {
                Err(AgentError::not_found(format!("image snapshot {p} does not exist")))
            }
        })
    }

    fn make_from_image<'a>(
        &'a self,
        image: &'a str,
        dst: &'a str,
        size: Option<u64>,
        prov: Provisioning,
        stop: &'a Stop,
    ) -> Fut<'a, ()> {
        Box::pin(async move {
            if !crate::storage::location::Location::is_rbd(image) {
                return Err(mixed(image, dst));
            }
            let (src, to) = (CephPath::parse(image)?, CephPath::parse(dst)?);
            let snap = src.require_snap()?;
            let protected = self
                .rbd
                .snapshots(&src, stop)
                .await?
                .iter()
                .any(|s| s.name == snap && s.protected.as_deref() == Some("true"));
            if !protected {
                self.rbd.snap_protect(&src, stop).await?;
            }
            self.clone_from(&src, &to, prov == Provisioning::Thick, stop).await?;
            if let Some(s) = size.filter(|s| *s > 0) {
                if let Err(e) = self.grow(&to, s, stop).await {
                    let _ = self.rbd.remove(&to, &Stop::new()).await;
                    return Err(e);
                }
            }
            Ok(())
        })
    }

    fn make_empty<'a>(&'a self, dst: &'a str, size: u64, _prov: Provisioning, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move {
            let p = CephPath::parse(dst)?;
            if size == 0 {
                return Err(AgentError::invalid("size must be greater than 0"));
            }
            self.rbd.create(&p, size, stop).await.map_err(Into::into)
        })
    }

    /// `src` is a snapshot this operation took and protected: cloned directly.
    fn clone_volume<'a>(&'a self, src: &'a str, dst: &'a str, linked: bool, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move { self.clone_from(&CephPath::parse(src)?, &CephPath::parse(dst)?, !linked, stop).await })
    }

    /// A new image of the chain's virtual size, written by qemu-img through librbd (data only:
    /// the new image reads as zeros). A failed write leaves no image.
    fn restore<'a>(&'a self, chain_top: &'a std::path::Path, dst: &'a str, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move {
            let to = CephPath::parse(dst)?;
            to.require_image()?;
            let size = self.qemu_img.info(chain_top, stop).await?.virtual_size;
            self.rbd.create(&to, size, stop).await?;
            let name = self.rbd.qemu_name(&to);
            let c = Convert {
                src: chain_top.as_os_str(),
                src_fmt: "qcow2",
                dst: std::ffi::OsStr::new(&name),
                dst_fmt: "raw",
                opts: &Default::default(),
                into_zeroed: true,
            };
            if let Err(e) = self.qemu_img.convert(c, stop, &mut |_| {}).await {
                let _ = self.rbd.remove(&to, &Stop::new()).await;
                return Err(stop.or_error(e, "restoring the volume"));
            }
            Ok(())
        })
    }

    fn sizes<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, (u64, u64)> {
        Box::pin(async move {
            let p = CephPath::parse(path)?;
            Ok(self.rbd.size_and_used(&p, stop).await?)
        })
    }

    /// After a flatten the image owns every object that holds data in it or its parents: the
    /// object map says which, without reading data.
    fn flatten_estimate<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, u64> {
        Box::pin(async move {
            let p = CephPath::parse(path)?;
            let info = self.rbd.info(&p, stop).await?;
            if info.parent.is_none() {
                return Ok(0);
            }
            let after = self.rbd.data_objects(&p, info.object_size, stop).await? * info.object_size;
            Ok(after.saturating_sub(self.rbd.used(&p, stop).await?))
        })
    }

    fn check_source<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move { self.sizes(path, stop).await.map(drop) })
    }

    fn has_parent<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, bool> {
        Box::pin(async move { Ok(self.rbd.info(&CephPath::parse(path)?, stop).await?.parent.is_some()) })
    }

    fn flatten<'a>(&'a self, path: &'a str, stop: &'a Stop, progress: &'a (dyn Fn(u8) + Sync)) -> Fut<'a, ()> {
        Box::pin(async move { flatten_rbd(self.rbd, &CephPath::parse(path)?, stop, progress).await.map(drop) })
    }

    fn remove_unless_in_use<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, bool> {
        Box::pin(async move {
            let p = CephPath::parse(path)?;
            let snaps = self.rbd.snapshots(&p, stop).await?;
            if snaps.iter().any(|s| !s.name.starts_with(BACKUP_SNAPSHOT_PREFIX)) {
                return Ok(false);
            }
            // A backup point's snapshot does not keep the image (the group's next point
            // compares); one a clone depends on does.
            drop_backup_snapshots(self.rbd, &p, stop).await?;
            if !self.rbd.snapshots(&p, stop).await?.is_empty() {
                return Ok(false);
            }
            self.rbd.remove(&p, stop).await?;
            Ok(true)
        })
    }

    fn qemu_source(&self, path: &str) -> AgentResult<(String, &'static str)> {
        Ok((self.rbd.qemu_name(&CephPath::parse(path)?), "raw"))
    }
}

/// Flattens an RBD volume (running or not: librbd hands the work to the VM's lock holder) and
/// checks that the parent is gone. Returns false when it had none.
async fn flatten_rbd(
    rbd: &dyn Rbd,
    p: &CephPath,
    stop: &Stop,
    mut progress: impl FnMut(u8) + Send,
) -> AgentResult<bool> {
    if rbd.info(p, stop).await?.parent.is_none() {
        return Ok(false);
    }
    rbd.flatten(p, stop, &mut progress).await.map_err(|e| stop.or_error(e, "flattening the image"))?;
    if let Some(parent) = rbd.info(p, stop).await?.parent {
        return Err(AgentError::failed(
            "rbd flatten did not detach the image",
            format!("{p} still has parent {}/{}@{}; retry", parent.pool, parent.image, parent.snapshot),
        ));
    }
    Ok(true)
}

/// Takes a protected snapshot `name` of each RBD image in `images`; returns `(image, snapshot)`
/// paths. On failure the snapshots already taken are removed again.
pub async fn snapshot_rbd(
    rbd: &dyn Rbd,
    images: &[String],
    name: &str,
    stop: &Stop,
) -> AgentResult<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for i in images {
        let snap = CephPath::parse(i)?.with_snap(name);
        let taken = async {
            rbd.snap_create(&snap, stop).await?;
            out.push((i.clone(), snap.to_string()));
            rbd.snap_protect(&snap, stop).await
        }
        .await;
        if let Err(e) = taken {
            for (_, s) in &out {
                drop_unused_snapshot(rbd, s).await;
            }
            return Err(e.into());
        }
    }
    Ok(out)
}

/// Removes the backup snapshots of image `p` (an image being removed: a backup point's
/// snapshot must not keep it), each unless a clone depends on it.
pub async fn drop_backup_snapshots(rbd: &dyn Rbd, p: &CephPath, stop: &Stop) -> AgentResult<()> {
    for s in rbd.snapshots(p, stop).await?.iter().filter(|s| s.name.starts_with(BACKUP_SNAPSHOT_PREFIX)) {
        drop_unused_snapshot(rbd, &p.with_snap(&s.name).to_string()).await;
    }
    Ok(())
}

/// Removes a temporary snapshot once no clone depends on it; it stays otherwise.
pub async fn drop_unused_snapshot(rbd: &dyn Rbd, snap: &str) {
    let stop = Stop::new();
    let Ok(p) = CephPath::parse(snap) else { return };
    match rbd.children(&p, &stop).await {
        Ok(kids) if kids.is_empty() => {
            let _ = rbd.snap_unprotect(&p, &stop).await;
            if let Err(e) = rbd.snap_remove(&p, &stop).await {
                tracing::warn!(snapshot = %p, error = %e, "cannot remove a temporary snapshot");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(snapshot = %p, error = %e, "cannot list the clones of a temporary snapshot"),
    }
}
