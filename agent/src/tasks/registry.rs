//! The task registry: admits each async command once per `taskuuid`, tracks it while it runs,
//! keeps its result, and answers cancel and status requests.

use schemars::JsonSchema;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, Notify};

use super::ctx::{ProgressSink, TaskCtx};
use super::journal::{now_ms, Journal, TaskRecord, TaskState};
use crate::stop::{Stop, StopReason};

/// A progress update to forward to the management node.
#[derive(Debug, Clone)]
pub struct ProgressEvent {
    pub task_id: String,
    pub path: String,
    pub percent: u8,
    pub detail: String,
    pub thread_context: Value,
    pub thread_context_stack: Value,
}

/// What to do with an incoming request.
pub enum Admission {
    /// New task: run it with this context.
    Start(TaskCtx),
    /// The same `taskuuid` is running: acknowledge and do nothing.
    AlreadyRunning,
    /// The same `taskuuid` finished: post its stored result again.
    Finished(Value),
    /// Too many tasks run already: refused, nothing recorded.
    Busy { running: usize },
}

/// How much the registry holds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Tasks running (or waiting on a lock) at once.
    pub max_running: usize,
    /// Finished tasks kept; past it the oldest are forgotten first.
    pub max_finished: usize,
    /// Bytes the finished tasks' records may hold together (their results as JSON, ids, paths
    /// and callback URLs); past it the oldest are forgotten first. The newest always stays.
    pub max_finished_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_running: 1024, max_finished: 10_000, max_finished_bytes: 16 << 20 }
    }
}

/// The answer to `GET /task/<taskuuid>`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TaskStatus {
    #[serde(rename = "taskUuid")]
    pub task_id: String,
    pub path: String,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub state: &'static str,
    /// Percent.
    pub progress: u8,
    /// Once the task ended: the body posted to its callback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

struct Entry {
    record: TaskRecord,
    stop: Stop,
    api_id: Option<String>,
    progress: u8,
    thread_context: Value,
    thread_context_stack: Value,
}

pub struct TaskRegistry {
    journal: Journal,
    entries: Mutex<HashMap<String, Entry>>,
    idle: Notify,
    progress_out: Option<mpsc::UnboundedSender<ProgressEvent>>,
    limits: Limits,
}

/// What the command carried that the registry needs besides its body.
pub struct Intake<'a> {
    pub task_id: &'a str,
    pub path: &'a str,
    pub callback_url: Option<String>,
    pub raw_body: &'a [u8],
    pub api_id: Option<String>,
    pub thread_context: Value,
    pub thread_context_stack: Value,
}

impl TaskRegistry {
    /// Opens the journal and loads its tasks. Returns, besides the registry, the finished tasks
    /// whose result was not delivered, and the tasks the journal shows as still running: a
    /// previous run of the agent was stopped or killed in them. Those stay running here until
    /// [`crate::recovery`] resumes them or rolls them back and finishes them.
    pub fn open(
        journal: Journal,
        progress_out: Option<mpsc::UnboundedSender<ProgressEvent>>,
        limits: Limits,
    ) -> std::io::Result<(Arc<Self>, Vec<TaskRecord>, Vec<TaskRecord>)> {
        let mut entries = HashMap::new();
        let (mut undelivered, mut interrupted) = (Vec::new(), Vec::new());
        for record in journal.load_all()? {
            if record.state == TaskState::Running {
                interrupted.push(record.clone());
            } else if !record.delivered {
                undelivered.push(record.clone());
            }
            let progress = if record.state == TaskState::Running { 0 } else { 100 };
            entries.insert(
                record.task_id.clone(),
                Entry {
                    record,
                    stop: Stop::new(),
                    api_id: None,
                    progress,
                    thread_context: Value::Null,
                    thread_context_stack: Value::Null,
                },
            );
        }
        let registry =
            Arc::new(TaskRegistry { journal, entries: Mutex::new(entries), idle: Notify::new(), progress_out, limits });
        Ok((registry, undelivered, interrupted))
    }

    /// The context to run again a task that [`open`](Self::open) found interrupted.
    pub fn resume(self: &Arc<Self>, task_id: &str) -> Option<TaskCtx> {
        let (path, stop) = {
            let map = self.lock();
            let e = map.get(task_id).filter(|e| e.record.state == TaskState::Running)?;
            (e.record.path.clone(), e.stop.clone())
        };
        let sink: Arc<dyn ProgressSink> = self.clone();
        Some(TaskCtx::new(task_id, path, None, stop, Some(sink)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // field updates), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn admit(self: &Arc<Self>, intake: Intake<'_>) -> std::io::Result<Admission> {
        let record = TaskRecord {
            task_id: intake.task_id.to_owned(),
            path: intake.path.to_owned(),
            callback_url: intake.callback_url,
            command: String::from_utf8_lossy(intake.raw_body).into_owned(),
            state: TaskState::Running,
            result: None,
            started_ms: now_ms(),
            finished_ms: None,
            delivered: false,
        };
        let stop = Stop::new();
        {
            let mut map = self.lock();
            if let Some(e) = map.get(intake.task_id) {
                return Ok(match e.record.result_value() {
                    Some(result) => Admission::Finished(result),
                    None => Admission::AlreadyRunning,
                });
            }
            let running = map.values().filter(|e| e.record.state == TaskState::Running).count();
            if running >= self.limits.max_running {
                return Ok(Admission::Busy { running });
            }
            map.insert(
                record.task_id.clone(),
                Entry {
                    record: record.clone(),
                    stop: stop.clone(),
                    api_id: intake.api_id.clone(),
                    progress: 0,
                    thread_context: intake.thread_context,
                    thread_context_stack: intake.thread_context_stack,
                },
            );
        }
        if let Err(e) = self.persist(record).await {
            self.lock().remove(intake.task_id);
            return Err(e);
        }
        let sink: Arc<dyn ProgressSink> = self.clone();
        Ok(Admission::Start(TaskCtx::new(intake.task_id, intake.path, intake.api_id, stop, Some(sink))))
    }

    async fn persist(&self, record: TaskRecord) -> std::io::Result<()> {
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || journal.save(&record)).await.map_err(std::io::Error::other)?
    }

    /// Records the result of a finished task and returns its callback URL.
    pub async fn finish(&self, task_id: &str, state: TaskState, result: Value) -> Option<String> {
        let (record, running_left) = {
            let mut map = self.lock();
            let e = map.get_mut(task_id)?;
            e.record.state = state;
            e.record.result = serde_json::value::to_raw_value(&result).ok();
            // The command is needed only to run it again, the thread context only for progress
            // reports: a finished task keeps its result.
            e.record.command = String::new();
            e.thread_context = Value::Null;
            e.thread_context_stack = Value::Null;
            e.record.finished_ms = Some(now_ms());
            e.record.delivered = e.record.callback_url.is_none();
            e.progress = 100;
            let record = e.record.clone();
            let running = map.values().filter(|e| e.record.state == TaskState::Running).count();
            (record, running)
        };
        let url = record.callback_url.clone();
        if let Err(e) = self.persist(record).await {
            tracing::error!(task = task_id, error = %e, "cannot record the task's result in the journal");
        }
        if running_left == 0 {
            self.idle.notify_waiters();
        }
        self.evict_past_limit().await;
        url
    }

    /// Forgets the oldest finished tasks (delivered ones first) past `max_finished` or
    /// `max_finished_bytes`.
    async fn evict_past_limit(&self) {
        let evicted: Vec<String> = {
            let mut map = self.lock();
            let mut finished: Vec<(bool, u64, &str, usize)> = map
                .values()
                .filter(|e| e.record.state != TaskState::Running)
                .map(|e| {
                    (
                        !e.record.delivered,
                        e.record.finished_ms.unwrap_or(0),
                        e.record.task_id.as_str(),
                        e.record.bytes(),
                    )
                })
                .collect();
            finished.sort_unstable();
            let (mut count, mut bytes) = (finished.len(), finished.iter().map(|f| f.3).sum::<usize>());
            let mut evicted = Vec::new();
            for (_, _, id, held) in finished {
                if count <= 1 || (count <= self.limits.max_finished && bytes <= self.limits.max_finished_bytes) {
                    break;
                }
                evicted.push(id.to_owned());
                count -= 1;
                bytes -= held;
            }
            for id in &evicted {
                map.remove(id);
            }
            evicted
        };
        if evicted.is_empty() {
            return;
        }
        let journal = self.journal.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in evicted {
                if let Err(e) = journal.remove(&id) {
                    tracing::warn!(task = %id, error = %e, "cannot remove an evicted task record");
                }
            }
        })
        .await;
    }

    pub async fn mark_delivered(&self, task_id: &str) {
        let record = {
            let mut map = self.lock();
            let Some(e) = map.get_mut(task_id) else {
                return;
            };
            e.record.delivered = true;
            e.record.clone()
        };
        if let Err(e) = self.persist(record).await {
            tracing::warn!(task = task_id, error = %e, "cannot record callback delivery");
        }
    }

    pub fn status(&self, task_id: &str) -> Option<TaskStatus> {
        let map = self.lock();
        let e = map.get(task_id)?;
        Some(TaskStatus {
            task_id: e.record.task_id.clone(),
            path: e.record.path.clone(),
            state: e.record.state.as_str(),
            progress: e.progress,
            result: e.record.result_value(),
        })
    }

    /// Fires the stop of every running task whose command carried `threadContext.api == api_id`.
    pub fn cancel_by_api(&self, api_id: &str) -> usize {
        let map = self.lock();
        let mut n = 0;
        for e in map.values().filter(|e| e.record.state == TaskState::Running && e.api_id.as_deref() == Some(api_id)) {
            e.stop.fire(StopReason::Cancelled);
            n += 1;
        }
        n
    }

    pub fn running(&self) -> usize {
        self.lock().values().filter(|e| e.record.state == TaskState::Running).count()
    }

    /// Stops every running task and waits up to `grace` for them to wind down.
    pub async fn shutdown(&self, grace: Duration) {
        for e in self.lock().values().filter(|e| e.record.state == TaskState::Running) {
            e.stop.fire(StopReason::ShuttingDown);
        }
        let deadline = tokio::time::Instant::now() + grace;
        while self.running() > 0 {
            let notified = self.idle.notified();
            if self.running() == 0 || tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
    }

    /// Drops finished tasks older than `retention` from memory and the journal.
    pub async fn prune(&self, retention: Duration) {
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
        let old: Vec<String> = {
            let mut map = self.lock();
            let old: Vec<String> = map
                .values()
                .filter(|e| e.record.delivered && e.record.finished_ms.is_some_and(|f| f < cutoff))
                .map(|e| e.record.task_id.clone())
                .collect();
            for id in &old {
                map.remove(id);
            }
            old
        };
        let journal = self.journal.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for id in old {
                if let Err(e) = journal.remove(&id) {
                    tracing::warn!(task = %id, error = %e, "cannot remove an old task record");
                }
            }
        })
        .await;
    }
}

impl ProgressSink for TaskRegistry {
    fn progress(&self, task_id: &str, percent: u8, detail: &str) {
        let event = {
            let mut map = self.lock();
            let Some(e) = map.get_mut(task_id) else {
                return;
            };
            if percent <= e.progress && percent != 100 {
                return;
            }
            e.progress = percent;
            ProgressEvent {
                task_id: task_id.to_owned(),
                path: e.record.path.clone(),
                percent,
                detail: detail.to_owned(),
                thread_context: e.thread_context.clone(),
                thread_context_stack: e.thread_context_stack.clone(),
            }
        };
        if let Some(tx) = &self.progress_out {
            let _ = tx.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intake<'a>(id: &'a str, body: &'a [u8]) -> Intake<'a> {
        Intake {
            task_id: id,
            path: "/host/ping",
            callback_url: Some("http://127.0.0.1:1/cb".into()),
            raw_body: body,
            api_id: Some("api1".into()),
            thread_context: Value::Null,
            thread_context_stack: Value::Null,
        }
    }

    #[tokio::test]
    async fn duplicate_while_running_is_not_started_again_and_after_finish_gets_stored_result() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _, _) = TaskRegistry::open(Journal::open(dir.path()).unwrap(), None, Limits::default()).unwrap();
        let id = "0123456789abcdef0123456789abcdef";
        assert!(matches!(reg.admit(intake(id, b"{}")).await.unwrap(), Admission::Start(_)));
        assert!(matches!(reg.admit(intake(id, b"{}")).await.unwrap(), Admission::AlreadyRunning));
        reg.finish(id, TaskState::Succeeded, serde_json::json!({"success": true})).await;
        match reg.admit(intake(id, b"{}")).await.unwrap() {
            Admission::Finished(v) => assert_eq!(v["success"], true),
            _ => panic!("expected the stored result"),
        }
    }

    #[tokio::test]
    async fn finished_results_survive_reopen_and_running_ones_are_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let done = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let cut = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        {
            let (reg, _, _) = TaskRegistry::open(Journal::open(dir.path()).unwrap(), None, Limits::default()).unwrap();
            let _ = reg.admit(intake(done, b"{}")).await.unwrap();
            reg.finish(done, TaskState::Succeeded, serde_json::json!({"success": true, "x": 1})).await;
            reg.mark_delivered(done).await;
            let _ = reg.admit(intake(cut, b"{}")).await.unwrap();
        }
        let (reg, undelivered, interrupted) =
            TaskRegistry::open(Journal::open(dir.path()).unwrap(), None, Limits::default()).unwrap();
        assert_eq!(reg.status(done).unwrap().result.unwrap()["x"], 1);
        assert!(undelivered.is_empty());
        assert_eq!(interrupted.len(), 1);
        assert_eq!(interrupted[0].task_id, cut);
        assert_eq!(reg.status(cut).unwrap().state, "running", "running until recovery decides");
        assert!(matches!(reg.admit(intake(cut, b"{}")).await.unwrap(), Admission::AlreadyRunning));
        assert!(reg.resume(cut).is_some() && reg.resume(done).is_none());
        reg.finish(cut, TaskState::Failed, serde_json::json!({"success": false})).await;
        let (_, undelivered, interrupted) =
            TaskRegistry::open(Journal::open(dir.path()).unwrap(), None, Limits::default()).unwrap();
        assert_eq!((undelivered.len(), interrupted.len()), (1, 0));
    }

    #[tokio::test]
    async fn cancel_fires_only_matching_running_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _, _) = TaskRegistry::open(Journal::open(dir.path()).unwrap(), None, Limits::default()).unwrap();
        let Admission::Start(ctx) = reg.admit(intake("cccccccccccccccccccccccccccccccc", b"{}")).await.unwrap() else {
            panic!()
        };
        assert_eq!(reg.cancel_by_api("other"), 0);
        assert!(!ctx.stop.is_stopped());
        assert_eq!(reg.cancel_by_api("api1"), 1);
        assert_eq!(ctx.stop.reason(), Some(StopReason::Cancelled));
    }

    #[tokio::test]
    async fn the_oldest_finished_tasks_go_once_their_results_pass_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { max_finished_bytes: 10_000, ..Limits::default() };
        let (reg, _, _) = TaskRegistry::open(Journal::open(dir.path()).unwrap(), None, limits).unwrap();
        let ids: Vec<String> = (0..6).map(|i| format!("{i:032x}")).collect();
        for id in &ids {
            assert!(matches!(reg.admit(intake(id, b"{}")).await.unwrap(), Admission::Start(_)));
            let error = "e".repeat(3000);
            reg.finish(id, TaskState::Failed, serde_json::json!({"success": false, "error": error})).await;
            reg.mark_delivered(id).await;
        }
        let kept: Vec<bool> = ids.iter().map(|id| reg.status(id).is_some()).collect();
        assert_eq!(kept, [false, false, false, true, true, true], "three results of ~3 KB fit in 10 KB");
        let files = std::fs::read_dir(dir.path().join("tasks")).unwrap().count();
        assert_eq!(files, 3, "the journal forgets them too");

        let huge = "h".repeat(20_000);
        let last = "f".repeat(32);
        assert!(matches!(reg.admit(intake(&last, b"{}")).await.unwrap(), Admission::Start(_)));
        reg.finish(&last, TaskState::Failed, serde_json::json!({"error": huge})).await;
        assert!(reg.status(&last).is_some(), "the newest result stays, even past the limit alone");
        assert!(ids.iter().all(|id| reg.status(id).is_none()));
    }

    #[tokio::test]
    async fn finished_tasks_keep_their_result_not_their_command_and_the_oldest_go_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits { max_running: 2, max_finished: 3, ..Limits::default() };
        let (reg, _, _) = TaskRegistry::open(Journal::open(dir.path()).unwrap(), None, limits).unwrap();
        let big = vec![b'x'; 1 << 20];
        let ids: Vec<String> = (0..5).map(|i| format!("{i:032x}")).collect();
        for id in &ids {
            assert!(matches!(reg.admit(intake(id, &big)).await.unwrap(), Admission::Start(_)));
            reg.finish(id, TaskState::Failed, serde_json::json!({"success": false})).await;
            reg.mark_delivered(id).await;
        }
        let on_disk: u64 =
            std::fs::read_dir(dir.path().join("tasks")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(on_disk < 4096, "no command is kept once its task finished: {on_disk} bytes");
        assert!(reg.status(&ids[0]).is_none() && reg.status(&ids[1]).is_none(), "the oldest are forgotten");
        assert!(ids[2..].iter().all(|id| reg.status(id).is_some()), "the newest stay");

        let (a, b, c) = ("a".repeat(32), "b".repeat(32), "c".repeat(32));
        assert!(matches!(reg.admit(intake(&a, b"{}")).await.unwrap(), Admission::Start(_)));
        assert!(matches!(reg.admit(intake(&b, b"{}")).await.unwrap(), Admission::Start(_)));
        assert!(matches!(reg.admit(intake(&c, b"{}")).await.unwrap(), Admission::Busy { running: 2 }));
        assert!(reg.status(&c).is_none(), "a busy refusal records nothing");
    }
}
