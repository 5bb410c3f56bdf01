//! Runs one admitted async task: arms its deadline, runs the handler in its own tokio task (so a
//! panic becomes an error result, not a lost callback), records the result, and delivers it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tracing::Instrument;

use super::routes::Route;
use crate::app::App;
use crate::error::{AgentError, AgentResult, ErrorKind};
use crate::metrics;
use crate::stop::{Stop, StopReason};
use crate::tasks::journal::{now_ms, TaskState};
use crate::tasks::TaskCtx;
use crate::wire::{self, CommonFields};

/// How long until the task must stop, from `taskContext` (`__messagetimeout__` is a duration,
/// `__messagedeadline__` an absolute epoch time, both in ms); the sooner wins.
pub fn deadline(common: &CommonFields) -> Option<Duration> {
    let by_timeout = common.task_context_ms("__messagetimeout__").filter(|ms| *ms > 0);
    let by_deadline =
        common.task_context_ms("__messagedeadline__").filter(|ms| *ms > 0).map(|at| at.saturating_sub(now_ms()));
    by_timeout.into_iter().chain(by_deadline).min().map(Duration::from_millis)
}

pub fn spawn(app: Arc<App>, route: &'static Route, ctx: TaskCtx, body: AgentResult<Value>, common: CommonFields) {
    let span = tracing::info_span!("task", task = %ctx.task_id, path = %ctx.path);
    tokio::spawn(
        async move {
            let timer = metrics::task_started(route.path);
            let watchdog = deadline(&common).map(|d| {
                let stop = ctx.stop.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    stop.fire(StopReason::DeadlineExceeded);
                })
            });
            tracing::info!("task started");
            let result = match body {
                Err(e) => Err(e),
                Ok(body) => match tokio::spawn((route.handler)(app.clone(), ctx.clone(), body)).await {
                    Ok(r) => r,
                    Err(join) => {
                        tracing::error!(error = %join, "handler panicked");
                        Err(AgentError::internal(format!(
                            "the handler of {} failed unexpectedly; see the agent log",
                            route.path
                        )))
                    }
                },
            };
            if let Some(w) = watchdog {
                w.abort();
            }
            let result = result.map_err(|e| as_reported(e, &ctx.stop, route.path));
            let state = match &result {
                Ok(_) => TaskState::Succeeded,
                Err(e) if matches!(e.kind, ErrorKind::Cancelled | ErrorKind::Timeout) => TaskState::Cancelled,
                Err(_) => TaskState::Failed,
            };
            match &result {
                Ok(_) => tracing::info!("task succeeded"),
                Err(e) => tracing::warn!(error = %e, "task failed"),
            }
            let envelope = wire::envelope(&result);
            timer.finish(state.as_str());
            let url = app.tasks.finish(&ctx.task_id, state, envelope.clone()).await;
            // The result is recorded: what the task committed stays, even if the agent dies now.
            crate::ops::undo::discard_journal(&app.config.state_dir, &ctx.task_id);
            if let Some(url) = url {
                deliver(&app, &ctx.task_id, &url, &envelope).await;
            }
        }
        .instrument(span),
    );
}

/// `e` as the task reports it: a failure its stop caused (a step's `?` on a killed child or an
/// interrupted librbd call) says why the task stopped, with that step's error as the cause.
fn as_reported(e: AgentError, stop: &Stop, path: &str) -> AgentError {
    if !e.stopped || !stop.is_stopped() {
        return e;
    }
    let mut reported = stop.error(&format!("the {path} task"));
    reported.cause = Some(Box::new(e));
    reported
}

/// The runner as crash recovery uses it.
pub struct TaskRunner;

impl crate::recovery::Runner for TaskRunner {
    fn resume(&self, app: &Arc<App>, record: &crate::tasks::journal::TaskRecord) -> bool {
        let route = super::routes::find(&record.path);
        let (Some(route), Ok(body)) = (route, wire::parse_body(record.command.as_bytes())) else { return false };
        let Some(ctx) = app.tasks.resume(&record.task_id) else { return false };
        let common: CommonFields = serde_json::from_value(body.clone()).unwrap_or_default();
        spawn(app.clone(), route, ctx, Ok(body), common);
        true
    }

    fn deliver(&self, app: &Arc<App>, task_id: String, url: String, result: Value) {
        let app = app.clone();
        tokio::spawn(async move { deliver(&app, &task_id, &url, &result).await });
    }
}

/// Posts a result to its callback URL, retrying with backoff; records delivery on success.
pub async fn deliver(app: &App, task_id: &str, url: &str, envelope: &Value) {
    let body = Bytes::from(envelope.to_string());
    let retry_for = Duration::from_secs(app.config.tasks.callback_retry_secs);
    let posted = app.poster.post_with_retry(url, &[("taskuuid", task_id)], body, retry_for).await;
    crate::metrics::callback(posted.is_ok());
    match posted {
        Ok(()) => app.tasks.mark_delivered(task_id).await,
        Err(e) => {
            tracing::error!(task = task_id, error = %e, "result not delivered; it stays available at GET /task/<taskuuid>")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(ctx: Value) -> CommonFields {
        serde_json::from_value(serde_json::json!({ "taskContext": ctx })).unwrap()
    }

    #[test]
    fn sooner_of_timeout_and_deadline_wins() {
        let d = deadline(&common(
            serde_json::json!({"__messagetimeout__": 5000, "__messagedeadline__": now_ms() + 60_000}),
        ))
        .unwrap();
        assert_eq!(d, Duration::from_millis(5000));
        let d = deadline(&common(
            serde_json::json!({"__messagetimeout__": 600_000, "__messagedeadline__": now_ms() + 2_000}),
        ))
        .unwrap();
        assert!(d <= Duration::from_millis(2_000));
        assert!(deadline(&common(serde_json::json!({}))).is_none());
    }

    #[test]
    fn a_past_deadline_is_zero() {
        let d = deadline(&common(serde_json::json!({"__messagedeadline__": 1000}))).unwrap();
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn a_step_failure_the_stop_caused_is_reported_as_the_stop_and_others_as_themselves() {
        use crate::ceph::rbd::RbdError;
        let stop = Stop::new();
        let step = |what: &str| -> AgentError { RbdError::Stopped { what: what.into() }.into() };
        let e = as_reported(step("snap create rbd/a@s"), &stop, "/ceph/x");
        assert_eq!(e.kind, ErrorKind::OperationFailed, "no stop fired, the step's own error: {e}");

        stop.fire(StopReason::DeadlineExceeded);
        let e = as_reported(step("snap create rbd/a@s").context("taking the snapshot"), &stop, "/ceph/x");
        assert_eq!(e.kind, ErrorKind::Timeout, "{e}");
        assert!(e.to_string().contains("/ceph/x task did not finish before the deadline"), "{e}");
        assert!(e.cause.as_ref().is_some_and(|c| c.to_string().contains("snap create rbd/a@s")), "{e:?}");

        let other: AgentError = RbdError::Refused { what: "info rbd/a".into(), reason: "no cluster".into() }.into();
        let e = as_reported(other, &stop, "/ceph/x");
        assert!(e.kind == ErrorKind::OperationFailed && e.to_string().contains("no cluster"), "{e}");
    }
}
