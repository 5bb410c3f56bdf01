//! Primary storage: path confinement and local qcow2 volumes.

pub mod local;
pub mod roots;
