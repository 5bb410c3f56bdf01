//! The HTTP server (spec §1): sync paths answer inline, async paths are acknowledged with an
//! empty 200 and answered by callback; `GET /task/<taskuuid>`, `GET /metrics` and
//! `GET /recovery` and `GET /api` (the OpenAPI document of the native API) are ours.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::routes::{self, Style};
use super::runner;
use crate::app::App;
use crate::callbacks::client;
use crate::error::AgentError;
use crate::tasks::registry::{Admission, Intake};
use crate::tasks::TaskCtx;
use crate::wire::{self, CommonFields};

/// Commands are small JSON documents (ZStack's StartVmCmd is a few KiB); the largest a
/// management node sends lists every volume of a host (`/localstorage/volume/batchgetsize`: some
/// 200 bytes a volume, so 20,000 volumes in 4 MiB). Anything larger is refused (413) before it
/// is buffered.
const MAX_BODY: usize = 4 << 20;
/// How much of a body over the limit is read and dropped before the refusal, and for how long.
const DRAIN_MAX: usize = 64 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

type Resp = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Resp {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json_resp(status: StatusCode, v: &Value) -> Resp {
    respond(status, "application/json", v.to_string())
}

/// A transport-level refusal, still as a JSON envelope.
fn refuse(status: StatusCode, message: impl Into<String>) -> Resp {
    json_resp(status, &wire::envelope(&Err(AgentError::invalid(message))))
}

/// The request body, at most [`MAX_BODY`] bytes. A longer one is refused, but first read on and
/// dropped (up to [`DRAIN_MAX`] bytes, for at most [`DRAIN_TIME`]) so that the client, still
/// sending, gets to read the refusal rather than a reset connection.
async fn read_body(mut body: Incoming) -> Result<Bytes, String> {
    let mut kept = Vec::new();
    let mut seen = 0usize;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(format!("cannot read the request body: {e}")),
            Err(_) => break,
        };
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len());
        if seen <= MAX_BODY {
            kept.extend_from_slice(&data);
        } else if seen > DRAIN_MAX {
            break;
        }
    }
    if seen > MAX_BODY {
        return Err(format!("the request body is larger than the limit of {MAX_BODY} bytes"));
    }
    Ok(Bytes::from(kept))
}

fn empty_ok() -> Resp {
    respond(StatusCode::OK, "application/json", Bytes::new())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty())
}

fn is_task_id(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Which paths a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every path (the agent's own port).
    All,
    /// What ZStack's Ceph agent serves on its own port: `/ceph/primarystorage/*`, and cancel.
    CephAgent,
}

impl Scope {
    fn serves(self, path: &str) -> bool {
        self == Scope::All || path.starts_with("/ceph/primarystorage/") || path == "/job/cancel"
    }
}

/// One port the agent serves: plain TCP or, with `tls`, TLS (a failed handshake just ends the
/// connection).
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub scope: Scope,
}

/// Serves every listener until `shutdown` resolves, then refuses new async work (503), stops
/// running tasks and gives them the configured grace period, and closes connections.
pub async fn serve(app: Arc<App>, listeners: Vec<Listener>, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let (accepted_tx, mut accepted_rx) = tokio::sync::mpsc::channel(64);
    let acceptors: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let tx = accepted_tx.clone();
            tokio::spawn(async move {
                loop {
                    match l.tcp.accept().await {
                        Ok(accepted) => {
                            if tx.send((accepted, l.tls.clone(), l.scope)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        })
        .collect();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(((stream, peer), tls, scope)) = accepted_rx.recv() => {
                let (app, watcher) = (app.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let served = match tls {
                        None => connection(app, stream, watcher, peer.ip(), scope).await,
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => connection(app, stream, watcher, peer.ip(), scope).await,
                            Err(e) => {
                                tracing::info!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                        },
                    };
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    for a in acceptors {
        a.abort();
    }
    tracing::info!("shutting down: refusing new tasks, stopping running ones");
    app.begin_shutdown();
    let grace = Duration::from_secs(app.config.server.shutdown_grace_secs);
    app.tasks.shutdown(grace).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

/// Serves one HTTP/1 connection over `stream` (plain TCP or TLS).
async fn connection<S>(
    app: Arc<App>,
    stream: S,
    watcher: Watcher,
    peer: IpAddr,
    scope: Scope,
) -> Result<(), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let app = app.clone();
        async move {
            if !scope.serves(req.uri().path()) {
                let path = req.uri().path();
                return Ok::<_, Infallible>(refuse(
                    StatusCode::NOT_FOUND,
                    format!("{path} is not served on the Ceph agent port"),
                ));
            }
            Ok::<_, Infallible>(handle(app, req, peer).await)
        }
    });
    watcher.watch(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service)).await
}

/// Whether the request carries the configured token (compared in constant time).
fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(token) = app.config.server.token.as_deref() else { return true };
    let given = header(headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| header(headers, "x-kvmagent-token"))
        .unwrap_or_default();
    given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn handle(app: Arc<App>, req: Request<Incoming>, peer: IpAddr) -> Resp {
    let path = req.uri().path().to_owned();
    if !authorized(&app, req.headers()) {
        let e = AgentError::new(
            crate::error::ErrorKind::InvalidArgument,
            "not authorized",
            "this agent requires its token: send Authorization: Bearer <token>",
        );
        return json_resp(StatusCode::UNAUTHORIZED, &wire::envelope(&Err(e)));
    }
    match *req.method() {
        Method::GET if path == "/metrics" => {
            respond(StatusCode::OK, "text/plain; version=0.0.4", crate::metrics::render())
        }
        Method::GET if path == "/api" => json_resp(StatusCode::OK, &super::openapi::document()),
        Method::GET if path == "/recovery" => {
            let report = app.recovery.get().map(crate::recovery::report_json).unwrap_or(Value::Null);
            json_resp(StatusCode::OK, &report)
        }
        Method::GET if path.starts_with("/task/") => {
            task_status(&app, path.trim_start_matches("/task/").trim_end_matches('/'))
        }
        Method::POST => command(app, req, &path, peer).await,
        _ => refuse(StatusCode::METHOD_NOT_ALLOWED, format!("{} {path}: commands are POSTed", req.method())),
    }
}

fn task_status(app: &App, task_id: &str) -> Resp {
    match app.tasks.status(task_id) {
        Some(s) => json_resp(StatusCode::OK, &serde_json::to_value(s).unwrap_or(Value::Null)),
        None => json_resp(
            StatusCode::NOT_FOUND,
            &wire::envelope(&Err(AgentError::not_found(format!("no task {task_id} is known to this agent")))),
        ),
    }
}

/// Paths anyone may call: they only say the agent is there.
const OPEN: &[&str] = &["/host/echo", "/ceph/primarystorage/echo"];

/// Paths a management node this host does not know yet may send when their `hostUuid` is this
/// host's: another management node of the same deployment pings the host, points it at itself
/// (`/host/update/configuration`) or reconnects it. The node is learned by the last two.
const ADMISSION: &[&str] = &["/host/connect", "/host/ping", "/host/update/configuration"];

fn forbidden(why: String) -> Resp {
    let e = AgentError::new(crate::error::ErrorKind::InvalidArgument, "not a management node", why);
    json_resp(StatusCode::FORBIDDEN, &wire::envelope(&Err(e)))
}

fn body_str<'a>(body: &'a Result<Value, AgentError>, field: &str) -> Option<&'a str> {
    body.as_ref().ok()?.get(field)?.as_str()
}

async fn command(app: Arc<App>, req: Request<Incoming>, path: &str, peer: IpAddr) -> Resp {
    let Some(route) = routes::find(path) else {
        return refuse(StatusCode::NOT_FOUND, format!("no command is served at {path}"));
    };
    let mut refused = None;
    if !OPEN.contains(&route.path) {
        if let Err(why) = app.sources.check(peer, &app.config.server.management_hosts).await {
            // Without configured hosts, an admission path may still vouch for itself (below).
            if !(ADMISSION.contains(&route.path) && app.config.server.management_hosts.is_empty()) {
                tracing::warn!(%peer, path, "command refused: {why}");
                return forbidden(why);
            }
            refused = Some(why);
        }
    }
    // One normal form: the same task id in capitals is the same task.
    let task_id = header(req.headers(), "taskuuid").map(str::to_ascii_lowercase);
    match (route.style, &task_id) {
        (Style::Sync, Some(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!("{path} is synchronous and must not carry a taskuuid header"),
            )
        }
        (Style::Async, None) => return refuse(StatusCode::BAD_REQUEST, "taskuuid missing in request header"),
        (Style::Async, Some(id)) if !is_task_id(id) => {
            return refuse(StatusCode::BAD_REQUEST, format!("taskuuid {id:?} is not 32 hexadecimal characters"))
        }
        _ => {}
    }
    let callback_url = header(req.headers(), "callbackurl").map(str::to_owned);
    if let Some(url) = &callback_url {
        if let Err(e) = client::parse_url(url) {
            return refuse(StatusCode::BAD_REQUEST, format!("callbackurl: {e}"));
        }
        // A node about to vouch for itself (below) names its own callback; otherwise results go
        // only to known nodes.
        if refused.is_none() {
            if let Err(e) = app.callback_allowed(url) {
                return refuse(StatusCode::BAD_REQUEST, format!("callbackurl: {e}"));
            }
        }
    }
    if route.style == Style::Async && app.is_shutting_down() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the agent is shutting down; retry when it is back");
    }
    let raw = match read_body(req.into_body()).await {
        Ok(b) => b,
        Err(e) => {
            // The connection carries no further request (part of the body may be unread): say
            // so, or a client would send its next request on a connection about to close.
            let mut r = refuse(StatusCode::PAYLOAD_TOO_LARGE, e);
            r.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            return r;
        }
    };
    let body = wire::parse_body(&raw);
    if let Some(why) = refused {
        let known = app.identity.get().host_uuid;
        if known.is_none() || body_str(&body, "hostUuid") != known.as_deref() {
            tracing::warn!(%peer, path, "command refused: {why}");
            return forbidden(why);
        }
        tracing::info!(%peer, path, "a management node not known before names this host's uuid: taken");
        if route.path == "/host/update/configuration" {
            if let Err(e) = app.sources.learn(peer) {
                tracing::error!(error = %e, "cannot remember the management node");
            }
        }
    }

    if route.style == Style::Sync {
        let result = match body {
            Ok(b) => (route.handler)(app.clone(), TaskCtx::detached(route.path), b).await,
            Err(e) => Err(e),
        };
        if route.path == "/host/connect" && result.is_ok() {
            if let Err(e) = app.sources.learn(peer) {
                tracing::error!(error = %e, "cannot remember the management node; commands stay open to any address");
            }
        }
        // Echo paths answer an empty body.
        if matches!(result, Ok(Value::Null)) {
            return empty_ok();
        }
        return json_resp(StatusCode::OK, &wire::envelope(&result));
    }

    let task_id = task_id.expect("async routes have a checked taskuuid");
    let common: CommonFields =
        body.as_ref().ok().and_then(|b| serde_json::from_value(b.clone()).ok()).unwrap_or_default();
    let (thread_context, stack) = body
        .as_ref()
        .map(|b| {
            (
                b.get("threadContext").cloned().unwrap_or(Value::Null),
                b.get("threadContextStack").cloned().unwrap_or(Value::Null),
            )
        })
        .unwrap_or((Value::Null, Value::Null));
    let intake = Intake {
        task_id: &task_id,
        path: route.path,
        callback_url: callback_url.clone(),
        // Only a task recovery may run again needs its command journaled.
        raw_body: if crate::recovery::is_resumable(route.path) { &raw } else { b"" },
        api_id: common.api_id().map(str::to_owned),
        thread_context,
        thread_context_stack: stack,
    };
    match app.tasks.admit(intake).await {
        Ok(Admission::Start(ctx)) => runner::spawn(app.clone(), route, ctx, body, common),
        Ok(Admission::AlreadyRunning) => {
            tracing::info!(task = %task_id, "duplicate of a running task; not run again")
        }
        Ok(Admission::Busy { running }) => {
            let e = AgentError::new(
                crate::error::ErrorKind::OperationFailed,
                "busy",
                format!(
                    "{running} commands are running or waiting; at most tasks.max_running may; send it again later"
                ),
            );
            return json_resp(StatusCode::SERVICE_UNAVAILABLE, &wire::envelope(&Err(e)));
        }
        Ok(Admission::Finished(result)) => {
            tracing::info!(task = %task_id, "duplicate of a finished task; posting its stored result again");
            if let Some(url) = callback_url {
                tokio::spawn(async move { runner::deliver(&app, &task_id, &url, &result).await });
            }
        }
        Err(e) => {
            return json_resp(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"success": false, "error": format!("cannot record the task in the journal: {e}")}),
            )
        }
    }
    empty_ok()
}
