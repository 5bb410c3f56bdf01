//! Primary storage: where volumes live (local qcow2 files or RBD images), path confinement,
//! and the locks that keep two commands off one volume.

pub mod local;
pub mod local_files;
pub mod location;
pub mod roots;
pub mod volume_locks;
