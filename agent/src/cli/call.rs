//! `kvmagent call PATH`: one command to a running agent, waited for like the management plane
//! waits (a fresh `taskuuid`, results to our own `callbackurl`), or by polling `GET /task/<id>`.
//! Progress is not sent to a callback URL (the agent reports it to the management node's
//! `sendCommandUrl`), so it is read from the task's status while waiting.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

use super::transport::{Callbacks, Target};
use super::CliError;
use crate::http::routes::{self, Style};

const POLL_EVERY: Duration = Duration::from_millis(500);

/// How to wait for an asynchronous command.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wait {
    /// Poll `GET /task/<id>` instead of receiving the result by callback.
    pub poll: bool,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

/// A fresh task id, as the management plane makes them (32 hex digits).
pub fn task_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Sends `body` to `path` and answers the result envelope (`success`, `error`, fields...). A
/// synchronous path's answer is returned as it is (an empty answer as `{"success": true}`).
pub async fn call(target: &Target, path: &str, body: &Value, wait: Wait) -> Result<Value, CliError> {
    let bytes = Bytes::from(body.to_string());
    let sync = routes::find(path).is_some_and(|r| r.style == Style::Sync);
    if sync {
        let (status, answer) = target.request(Method::POST, path, &[], bytes).await?;
        let value = parse_answer(path, status, &answer)?;
        return Ok(if value.is_null() { serde_json::json!({"success": true}) } else { value });
    }
    let task = task_id();
    let callbacks = if wait.poll { None } else { Some(Callbacks::start().await?) };
    let mut delivered = callbacks.as_ref().map(|c| c.expect(&task));
    let mut headers = vec![("taskuuid", task.as_str())];
    if let Some(c) = &callbacks {
        headers.push(("callbackurl", c.url.as_str()));
    }
    let (status, ack) = target.request(Method::POST, path, &headers, bytes).await?;
    if status != StatusCode::OK || !ack.is_empty() {
        let answer = parse_answer(path, status, &ack)?;
        return Err(refused(path, status, &answer));
    }
    let mut bar = Bar::new(path, wait.progress && std::io::stderr().is_terminal());
    let result = loop {
        let polled = async {
            tokio::time::sleep(POLL_EVERY).await;
            poll(target, &task).await
        };
        tokio::select! {
            Ok(v) = async { delivered.as_mut().expect("guarded").await }, if delivered.is_some() => break v,
            status = polled => match status? {
                (_, Some(result)) => break result,
                (progress, None) => bar.show(progress),
            },
        }
    };
    bar.finish();
    Ok(result)
}

/// The task's progress and, once it ended, its result.
async fn poll(target: &Target, task: &str) -> Result<(u8, Option<Value>), CliError> {
    let path = format!("/task/{task}");
    let (status, body) = target.request(Method::GET, &path, &[], Bytes::new()).await?;
    let value = parse_answer(&path, status, &body)?;
    let progress = value["progress"].as_u64().unwrap_or(0).min(100) as u8;
    let done = value["state"].as_str().is_some_and(|s| s != "running");
    Ok((progress, value.get("result").filter(|_| done).cloned()))
}

fn parse_answer(path: &str, status: StatusCode, body: &[u8]) -> Result<Value, CliError> {
    let value = if body.is_empty() { Value::Null } else { serde_json::from_slice(body).unwrap_or(Value::Null) };
    if status != StatusCode::OK {
        return Err(refused(path, status, &value));
    }
    if value.is_null() && !body.is_empty() {
        let text = String::from_utf8_lossy(body).chars().take(200).collect::<String>();
        return Err(CliError::Refused { path: path.to_owned(), status: status.as_u16(), message: text });
    }
    Ok(value)
}

fn refused(path: &str, status: StatusCode, answer: &Value) -> CliError {
    let mut message = answer["error"].as_str().map(str::to_owned).unwrap_or_else(|| answer.to_string());
    if status == StatusCode::FORBIDDEN {
        // Once a management node is known, the agent takes commands only from it.
        message.push_str("; to drive the agent from its own host, add \"127.0.0.1\" to server.management_hosts");
    }
    CliError::Refused { path: path.to_owned(), status: status.as_u16(), message }
}

/// A one-line progress bar on stderr, redrawn in place.
struct Bar {
    label: String,
    on: bool,
    drawn: bool,
}

impl Bar {
    fn new(label: &str, on: bool) -> Bar {
        Bar { label: label.to_owned(), on, drawn: false }
    }

    fn show(&mut self, percent: u8) {
        if !self.on {
            return;
        }
        const WIDTH: usize = 30;
        let filled = usize::from(percent) * WIDTH / 100;
        let mut err = std::io::stderr();
        let _ = write!(err, "\r{} [{}{}] {percent:>3}%", self.label, "#".repeat(filled), "-".repeat(WIDTH - filled));
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            self.show(100);
            eprintln!();
        }
    }
}

/// `kvmagent call` and the `vm` shorthands: sends, waits with a progress bar, prints.
pub fn run(connect: &super::Connect, path: &str, body: &Value, poll: bool, json: bool) -> std::process::ExitCode {
    let target = match connect.load_config().and_then(|c| connect.target(&c)) {
        Ok(t) => t,
        Err(e) => return e.exit(),
    };
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    let wait = Wait { poll, progress: true };
    match super::runtime().block_on(call(&target, &path, body, wait)) {
        Ok(result) => super::output::print_result(&result, json),
        Err(e) => e.exit(),
    }
}
