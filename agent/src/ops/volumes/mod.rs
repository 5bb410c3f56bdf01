//! Where a VM volume lives — a local qcow2 file or an RBD image — and the operations VM-level
//! work (create, clone, change image, flatten) needs from it: one trait, one implementation per
//! kind of primary storage, chosen by the install path's [`Location`].

mod local;
mod rbd;

use std::future::Future;
use std::pin::Pin;

pub use rbd::{
    drop_backup_snapshots, drop_unused_snapshot, snapshot_rbd, BACKUP_SNAPSHOT_PREFIX, CLONE_SNAPSHOT_PREFIX,
};

use super::undo::UndoStep;
use crate::app::App;
use crate::error::AgentResult;
use crate::stop::Stop;
use crate::storage::local::Provisioning;
use crate::storage::location::Location;

pub type Fut<'a, T> = Pin<Box<dyn Future<Output = AgentResult<T>> + Send + 'a>>;

pub trait VolumeStore: Send + Sync {
    /// Fails unless `path` can take a new volume (a valid place, nothing there yet).
    fn check_free<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, ()>;
    /// Fails unless `image` can be built from (a confined chain, or an existing snapshot).
    fn check_image<'a>(&'a self, image: &'a str, stop: &'a Stop) -> Fut<'a, ()>;
    /// How to remove the volume that a make or clone call will put at `dst`: recorded before
    /// the call, so that a crash in the middle leaves nothing behind either.
    fn undo_for(&self, dst: &str) -> AgentResult<UndoStep>;
    /// A new volume at `dst` from `image`, grown to `size`.
    fn make_from_image<'a>(
        &'a self,
        image: &'a str,
        dst: &'a str,
        size: Option<u64>,
        prov: Provisioning,
        stop: &'a Stop,
    ) -> Fut<'a, ()>;
    /// A new empty volume of `size` bytes at `dst`.
    fn make_empty<'a>(&'a self, dst: &'a str, size: u64, prov: Provisioning, stop: &'a Stop) -> Fut<'a, ()>;
    /// One clone volume at `dst` from `src` (a frozen file, or a protected snapshot): linked or a
    /// full copy.
    fn clone_volume<'a>(&'a self, src: &'a str, dst: &'a str, linked: bool, stop: &'a Stop) -> Fut<'a, ()>;
    /// A flat volume at `dst` with the content of `chain_top`: the top of a backup chain that
    /// the caller has verified (it lies outside the storage roots).
    fn restore<'a>(&'a self, chain_top: &'a std::path::Path, dst: &'a str, stop: &'a Stop) -> Fut<'a, ()>;
    /// `(virtual size, bytes used)`.
    fn sizes<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, (u64, u64)>;
    /// Bytes flattening the volume would add, from allocation metadata only.
    fn flatten_estimate<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, u64>;
    /// Fails unless `path` can be read from: a file chain inside the roots, or an existing
    /// image or snapshot.
    fn check_source<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, ()>;
    /// Whether the volume has a backing file or parent to be cut loose from.
    fn has_parent<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, bool>;
    /// Flattens a volume no VM writes to (RBD: also a running VM's, librbd coordinates).
    fn flatten<'a>(&'a self, path: &'a str, stop: &'a Stop, progress: &'a (dyn Fn(u8) + Sync)) -> Fut<'a, ()>;
    /// Removes the volume unless something still uses it (a process has the file open, or
    /// clones depend on the image's snapshots); returns whether it was removed.
    fn remove_unless_in_use<'a>(&'a self, path: &'a str, stop: &'a Stop) -> Fut<'a, bool>;
    /// How `qemu-img` reads the volume: a name and a format.
    fn qemu_source(&self, path: &str) -> AgentResult<(String, &'static str)>;
}

/// The store that holds (or will hold) `path`.
pub fn store<'a>(app: &'a App, path: &str) -> AgentResult<Box<dyn VolumeStore + 'a>> {
    Ok(match Location::parse(path)? {
        Location::File(_) => Box::new(local::LocalStore(&app.storage)),
        Location::Rbd(_) => Box::new(rbd::RbdStore { rbd: app.rbd.as_ref(), qemu_img: app.qemu_img.as_ref() }),
    })
}

fn taken(path: &str) -> crate::error::AgentError {
    crate::error::AgentError::conflict(format!("volume {path} already exists; choose another installPath"))
}

fn mixed(image: &str, dst: &str) -> crate::error::AgentError {
    crate::error::AgentError::invalid(format!("{dst} and its image {image} must both be local or both on Ceph"))
}
