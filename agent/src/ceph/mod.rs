//! Ceph RBD primary storage: validated paths and the `rbd` command line.

pub mod path;
pub mod rbd;
