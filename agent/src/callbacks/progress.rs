//! Forwards task progress to the management node: `POST <sendCommandUrl>` with header
//! `commandpath: /progress/report`, as ZStack's agent does. Best effort: a lost progress report
//! does not affect the task.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::json;
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
            let body = json!({
                "serverUuid": id.host_uuid,
                "processType": ev.path,
                "progress": ev.percent.to_string(),
                "resourceUuid": ev.task_id,
                "threadContextMap": ev.thread_context,
                "threadContextStack": ev.thread_context_stack,
                "detail": ev.detail,
            });
            let bytes = Bytes::from(body.to_string());
            if let Err(e) = poster.post_json(&url, &[("commandpath", "/progress/report")], bytes).await {
                tracing::debug!(task = %ev.task_id, error = %e, "progress report not delivered");
            }
        }
    });
}
