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

use crate::app::App;
use crate::error::AgentResult;
use crate::tasks::TaskCtx;

/// Runs `make`, which puts a new volume (a file or an RBD image) at `dst` (its caller holds its lock), with the
/// volume's removal journaled first: a failure, or a kill after the volume is in place but
/// before the task's result is recorded (the task is then reported interrupted), removes it
/// again. The removal is journaled only when `dst` is free, so it can never remove a file that
/// was there before (a retry's leftover that `make` replaces stays the caller's business).
pub(crate) async fn journaled_make<T>(
    app: &App,
    ctx: &TaskCtx,
    dst: &str,
    make: impl std::future::Future<Output = AgentResult<T>>,
) -> AgentResult<T> {
    let store = crate::ops::volumes::store(app, dst)?;
    let removal = match store.check_free(dst, &ctx.stop).await {
        Ok(()) => Some(store.undo_for(dst)?),
        Err(_) => None,
    };
    crate::ops::undo::journaled(app, &ctx.task_id, removal, make).await
}
