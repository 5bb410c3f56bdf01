//! Volumes as qcow2 files under the storage roots.

use std::path::Path;

use super::{mixed, taken, Fut, VolumeStore};
use crate::error::{AgentError, AgentResult};
use crate::ops::undo::UndoStep;
use crate::qemu_img::CreateOptions;
use crate::stop::Stop;
use crate::storage::local::{FromImage, LocalStorage, Provisioning};

pub struct LocalStore<'a>(pub &'a LocalStorage);

impl VolumeStore for LocalStore<'_> {
    fn undo_for(&self, dst: &str) -> AgentResult<UndoStep> {
        let path = self.0.roots().confine(dst)?;
        // The directories making the volume will create: the topmost one that does not exist.
        let new_dirs = path.ancestors().skip(1).take_while(|d| !d.exists()).last().map(Path::to_path_buf);
        Ok(UndoStep::RemoveVolumeFile { path, new_dirs })
    }

    fn check_free<'a>(&'a self, path: &'a str, _stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move {
            if self.0.roots().confine(path)?.symlink_metadata().is_ok() {
                return Err(taken(path));
            }
            Ok(())
        })
    }

    fn check_image<'a>(&'a self, image: &'a str, _stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move { self.0.roots().confine_chain(image).map(|_| ()).map_err(Into::into) })
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
            if crate::storage::location::Location::is_rbd(image) {
                return Err(mixed(image, dst));
            }
            let spec = FromImage { size, provisioning: prov, ..FromImage::THIN };
            self.0.create_from_image(image, dst, &spec, stop).await.map(drop)
        })
    }

    fn make_empty<'a>(&'a self, dst: &'a str, size: u64, prov: Provisioning, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(
            async move { self.0.create_empty(dst, size, None, prov, CreateOptions::default(), stop).await.map(drop) },
        )
    }

    fn clone_volume<'a>(&'a self, src: &'a str, dst: &'a str, linked: bool, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move {
            if linked {
                self.0.create_empty(dst, 0, Some(src), Provisioning::Thin, CreateOptions::default(), stop).await?;
            } else {
                self.0.create_flat_copy(src, dst, &CreateOptions::default(), stop, &mut |_| {}).await?;
            }
            Ok(())
        })
    }

    fn restore<'a>(&'a self, chain_top: &'a std::path::Path, dst: &'a str, stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move {
            self.0.copy_flat(chain_top, dst, &CreateOptions::default(), stop, &mut |_| {}).await.map(drop)
        })
    }

    fn sizes<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, (u64, u64)> {
        Box::pin(self.0.sizes(path, stop))
    }

    fn flatten_estimate<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, u64> {
        Box::pin(async move { Ok(self.0.estimate_flatten(path, stop).await?.bytes_to_add) })
    }

    fn check_source<'a>(&'a self, path: &'a str, _stop: &'a Stop) -> Fut<'a, ()> {
        Box::pin(async move { self.0.roots().confine_chain(path).map(drop).map_err(Into::into) })
    }

    fn has_parent<'a>(&'a self, path: &'a str, _stop: &'a Stop) -> Fut<'a, bool> {
        Box::pin(async move {
            let resolved = self.0.roots().confine_chain(path)?;
            let header = crate::qemu_img::read_header(&resolved).map_err(|e| AgentError::invalid(e.to_string()))?;
            Ok(header.backing_file.is_some())
        })
    }

    fn flatten<'a>(&'a self, path: &'a str, stop: &'a Stop, progress: &'a (dyn Fn(u8) + Sync)) -> Fut<'a, ()> {
        Box::pin(async move { self.0.flatten_offline(path, stop, &mut |p| progress(p)).await.map(drop) })
    }

    fn remove_unless_in_use<'a>(&'a self, path: &'a str, _stop: &'a Stop) -> Fut<'a, bool> {
        Box::pin(async move { self.0.delete(path) })
    }

    fn qemu_source(&self, path: &str) -> AgentResult<(String, &'static str)> {
        let resolved = self.0.roots().confine_chain(path)?;
        let fmt = crate::qemu_img::read_header(&resolved).map_err(|e| AgentError::invalid(e.to_string()))?.format;
        Ok((resolved.display().to_string(), fmt))
    }
}
