//! Ceph RBD primary storage: validated paths, and RBD through librbd or the `rbd` command line.

pub mod clients;
pub mod cluster;
#[cfg(test)]
pub mod fake;
pub mod health;
pub mod librbd;
pub mod path;
pub mod rbd;
