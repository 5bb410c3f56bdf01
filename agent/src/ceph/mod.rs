//! Ceph RBD primary storage: validated paths and the `rbd` command line.

pub mod cluster;
#[cfg(test)]
pub mod fake;
pub mod path;
pub mod rbd;
