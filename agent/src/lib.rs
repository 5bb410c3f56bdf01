//! kvmagent: a per-host KVM agent. The management plane POSTs commands over HTTP; the agent
//! carries them out with libvirt, QEMU and qemu-img and reports the result back.

/// A hash of the sources this build was made from (see `build.rs`).
pub const SOURCE_ID: &str = env!("KVMAGENT_SOURCE_ID");

pub mod app;
pub mod atomic_file;
pub mod backup_group;
pub mod callbacks;
pub mod ceph;
pub mod check_host;
pub mod cli;
pub mod compat;
pub mod config;
pub mod domain;
pub mod error;
pub mod faults;
pub mod host_identity;
pub mod host_info;
pub mod http;
pub mod hypervisor;
pub mod image_cache;
pub mod iso;
pub mod kvm_params;
pub mod libvirt;
pub mod locks;
pub mod metrics;
pub mod model;
pub mod network;
pub mod notify;
pub mod ops;
pub mod process;
pub mod qemu_img;
pub mod recovery;
pub mod stop;
pub mod storage;
pub mod tasks;
#[cfg(test)]
pub mod testing;
pub mod trusted_sources;
pub mod wire;
