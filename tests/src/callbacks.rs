//! A callback receiver: the management node's side of async commands. Collects every POST by its
//! `taskuuid` header (and progress reports by `commandpath`), and lets tests wait for them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::Notify;

#[derive(Default)]
struct Inbox {
    /// Every result received, per task, in arrival order (duplicates are kept: tests check them).
    results: HashMap<String, Vec<Value>>,
    progress: Vec<Value>,
}

#[derive(Clone)]
pub struct Callbacks {
    addr: std::net::SocketAddr,
    inbox: Arc<Mutex<Inbox>>,
    arrived: Arc<Notify>,
}

impl Callbacks {
    pub async fn start() -> Result<Callbacks> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let cb =
            Callbacks { addr: listener.local_addr()?, inbox: Default::default(), arrived: Arc::new(Notify::new()) };
        let server = cb.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let server = server.clone();
                        async move {
                            let task = req.headers().get("taskuuid").and_then(|v| v.to_str().ok()).map(str::to_owned);
                            let command =
                                req.headers().get("commandpath").and_then(|v| v.to_str().ok()).map(str::to_owned);
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let value: Value = serde_json::from_slice(&body)
                                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
                            server.record(task, command, value);
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Ok(cb)
    }

    fn record(&self, task: Option<String>, command: Option<String>, value: Value) {
        let mut inbox = self.inbox.lock().unwrap();
        match (task, command.as_deref()) {
            (_, Some("/progress/report")) => inbox.progress.push(value),
            (Some(t), _) => inbox.results.entry(t).or_default().push(value),
            (None, _) => inbox.progress.push(value),
        }
        drop(inbox);
        self.arrived.notify_waiters();
    }

    pub fn url(&self) -> String {
        format!("http://{}/zstack/asyncrest/callback", self.addr)
    }

    pub fn send_command_url(&self) -> String {
        format!("http://{}/zstack/asyncrest/sendcommand", self.addr)
    }

    /// Waits for the first result of `task`.
    pub async fn wait(&self, task: &str, timeout: Duration) -> Result<Value> {
        self.wait_count(task, 1, timeout).await.map(|mut v| v.remove(0))
    }

    /// Waits until `n` results of `task` arrived; returns all received so far.
    pub async fn wait_count(&self, task: &str, n: usize, timeout: Duration) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.arrived.notified();
            if let Some(v) = self.results(task).filter(|v| v.len() >= n) {
                return Ok(v);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("no callback #{n} for task {task} within {timeout:?}");
            }
        }
    }

    pub fn results(&self, task: &str) -> Option<Vec<Value>> {
        self.inbox.lock().unwrap().results.get(task).cloned()
    }

    pub fn progress_reports(&self) -> Vec<Value> {
        self.inbox.lock().unwrap().progress.clone()
    }
}
