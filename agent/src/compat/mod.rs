//! Command handlers, one module per family of paths. Each is an async fn taking the app, the
//! task context and the typed command, and returning the typed response.

pub mod ceph;
pub mod host;
pub mod localstorage;
pub mod localstorage_files;
pub mod network;
pub mod snapshot;
pub mod vm;
pub mod vm_devices;

#[cfg(test)]
mod localstorage_tests;
#[cfg(test)]
mod tests;
