//! What a running task's handler gets besides its command: its id, its stop signal and a way to
//! report progress.

use std::sync::Arc;

use crate::stop::Stop;

/// Receives progress updates of one task (the registry, which also forwards them to the
/// management node).
pub trait ProgressSink: Send + Sync {
    fn progress(&self, task_id: &str, percent: u8, detail: &str);
}

#[derive(Clone)]
pub struct TaskCtx {
    pub task_id: String,
    /// The path the command arrived on, e.g. `/vm/start`.
    pub path: String,
    /// `threadContext.api` of the command: what `/job/cancel` matches on.
    pub api_id: Option<String>,
    pub stop: Stop,
    progress: Option<Arc<dyn ProgressSink>>,
}

impl TaskCtx {
    pub fn new(
        task_id: impl Into<String>,
        path: impl Into<String>,
        api_id: Option<String>,
        stop: Stop,
        progress: Option<Arc<dyn ProgressSink>>,
    ) -> Self {
        TaskCtx { task_id: task_id.into(), path: path.into(), api_id, stop, progress }
    }

    /// A context for work that is not a management-plane task (tests, sync paths).
    pub fn detached(path: &str) -> Self {
        TaskCtx::new(uuid::Uuid::new_v4().simple().to_string(), path, None, Stop::new(), None)
    }

    /// Reports `percent` (clamped to 0..=100) done, with a short detail such as the volume.
    pub fn progress(&self, percent: u8, detail: &str) {
        if let Some(p) = &self.progress {
            p.progress(&self.task_id, percent.min(100), detail);
        }
    }
}
