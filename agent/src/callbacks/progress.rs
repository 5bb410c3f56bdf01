//! Forwards task progress to the management node: `POST <sendCommandUrl>` with header
//! `commandpath: /progress/report`, as ZStack's agent does. Best effort: a lost progress report
//! does not affect the task.
//!
//! The body is the management node's `ProgressReportCmd` (`core/.../progress/ProgressCommands.java`):
//! every field a string, `detail` a string map, `threadContextMap` and `threadContextStack` the
//! command's own `threadContext` and `threadContextStack` handed back. The percentage is scaled
//! into the task's stage (`threadContext["task-stage"]`, e.g. `"10-90"`), as ZStack's
//! `report.py` does, so that a step of a longer job moves the job's bar only over its part.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::client::Poster;
use crate::host_identity::HostIdentity;
use crate::tasks::registry::ProgressEvent;

pub fn spawn_forwarder(
    mut events: mpsc::UnboundedReceiver<ProgressEvent>,
    identity: Arc<HostIdentity>,
    poster: Poster,
) {
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            let id = identity.get();
            let Some(url) = id.send_command_url else {
                continue;
            };
            let body = report_body(&ev, id.host_uuid.as_deref());
            let bytes = Bytes::from(body.to_string());
            if let Err(e) = poster.post_json(&url, &[("commandpath", "/progress/report")], bytes).await {
                tracing::debug!(task = %ev.task_id, error = %e, "progress report not delivered");
            }
        }
    });
}

/// `percent` of a step placed in its stage `"start-end"` (`report.get_exact_percent`); no
/// stage, or one that does not read as two percentages in order, is the whole range.
fn scale(percent: u8, stage: Option<&str>) -> u8 {
    let (start, end) = stage
        .and_then(|s| s.split_once('-'))
        .and_then(|(a, b)| Some((a.trim().parse::<u8>().ok()?, b.trim().parse::<u8>().ok()?)))
        .filter(|(a, b)| a <= b && *b <= 100)
        .unwrap_or((0, 100));
    (u32::from(start) + u32::from(percent.min(100)) * u32::from(end - start) / 100) as u8
}

/// The `ProgressReportCmd` for `ev`. The command's thread context goes back only when it has
/// the management node's shape (a string map, a string list), which the node parses strictly.
fn report_body(ev: &ProgressEvent, host_uuid: Option<&str>) -> Value {
    let thread_context = ev.thread_context.as_object().filter(|m| m.values().all(Value::is_string));
    let stack = ev.thread_context_stack.as_array().filter(|a| a.iter().all(Value::is_string));
    let stage = thread_context.and_then(|m| m.get("task-stage")).and_then(Value::as_str);
    let mut body = Map::new();
    let mut put = |k: &str, v: Value| {
        body.insert(k.to_owned(), v);
    };
    if let Some(h) = host_uuid {
        put("serverUuid", h.into());
    }
    put("processType", ev.path.as_str().into());
    put("progress", scale(ev.percent, stage).to_string().into());
    put("resourceUuid", ev.task_id.as_str().into());
    if let Some(m) = thread_context {
        put("threadContextMap", Value::Object(m.clone()));
    }
    if let Some(a) = stack {
        put("threadContextStack", Value::Array(a.clone()));
    }
    let mut detail = Map::new();
    detail.insert("step".into(), ev.detail.as_str().into());
    detail.insert("stepProgress".into(), ev.percent.to_string().into());
    put("detail", Value::Object(detail));
    Value::Object(body)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::testing::mn_types::{self, ProgressReportCmd};

    fn event(percent: u8, thread_context: Value, stack: Value) -> ProgressEvent {
        ProgressEvent {
            task_id: "0123456789abcdef0123456789abcdef".into(),
            path: "/localstorage/volume/flatten".into(),
            percent,
            detail: "flattening".into(),
            thread_context,
            thread_context_stack: stack,
        }
    }

    #[test]
    fn percentages_are_scaled_into_the_stage_as_report_py_does() {
        assert_eq!(scale(50, Some("10-90")), 50);
        assert_eq!(scale(0, Some("10-90")), 10);
        assert_eq!(scale(100, Some("10-90")), 90);
        assert_eq!(scale(33, Some("0-10")), 3, "int() truncates");
        assert_eq!(scale(40, None), 40);
        for odd in ["90-10", "a-b", "10", "0-200", ""] {
            assert_eq!(scale(40, Some(odd)), 40, "{odd:?} is the whole range");
        }
    }

    #[test]
    fn the_report_has_the_management_nodes_types() {
        let ctx = json!({"api": "a1b2", "task-stage": "20-40", "task-name": "flatten"});
        let body = report_body(&event(50, ctx.clone(), json!(["x", "y"])), Some("host-1"));
        assert_eq!(body["progress"], "30");
        assert_eq!(body["serverUuid"], "host-1");
        assert_eq!(body["threadContextMap"], ctx);
        assert_eq!(body["threadContextStack"], json!(["x", "y"]));
        assert_eq!(body["detail"], json!({"step": "flattening", "stepProgress": "50"}));
        let cmd: ProgressReportCmd = mn_types::decode(&body).unwrap();
        assert_eq!(cmd.thread_context_map.unwrap()["api"], "a1b2");
    }

    #[test]
    fn a_thread_context_of_another_shape_is_left_out_rather_than_sent_to_fail_the_parse() {
        let body = report_body(&event(5, json!({"api": 7}), json!([{"a": 1}])), None);
        for absent in ["threadContextMap", "threadContextStack", "serverUuid"] {
            assert!(body.get(absent).is_none(), "{absent}: {body}");
        }
        assert_eq!(body["progress"], "5");
        let _: ProgressReportCmd = mn_types::decode(&body).unwrap();
    }
}
