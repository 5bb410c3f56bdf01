//! What a running task's handler gets besides its command: its id, its stop signal and a way to
//! report progress.

use std::sync::Arc;

use crate::stop::Stop;

/// Receives progress updates of one task (the registry, which also forwards them to the
/// management node).
pub trait ProgressSink: Send + Sync {
    fn progress(&self, task_id: &str, percent: u8, detail: &str);
}

/// A new id for a detached context: 32 hexadecimal digits like a task uuid, a random half drawn
/// once per process and a counter. Every synchronous request (each `/host/echo`) makes one, and
/// a random uuid each cost a `getrandom` system call (4% of the agent's CPU answering echoes flat
/// out); the random half keeps ids of different runs apart, as files may be named after them.
fn detached_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PROCESS: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    format!("{process:016x}{:016x}", NEXT.fetch_add(1, Ordering::Relaxed))
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
        TaskCtx::new(detached_id(), path, None, Stop::new(), None)
    }

    /// Reports `percent` (clamped to 0..=100) done, with a short detail such as the volume.
    pub fn progress(&self, percent: u8, detail: &str) {
        if let Some(p) = &self.progress {
            p.progress(&self.task_id, percent.min(100), detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_ids_look_like_task_ids_and_never_repeat() {
        let ids: Vec<String> = (0..1000).map(|_| TaskCtx::detached("/host/echo").task_id).collect();
        assert!(ids.iter().all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())), "{ids:?}");
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "detached ids repeat");
    }
}
