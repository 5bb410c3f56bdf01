//! The command line's HTTP: one connection per request to the agent (plain or TLS), and the
//! tiny callback server the agent POSTs results to.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

use super::CliError;

/// Where the agent is and how to talk to it.
#[derive(Clone)]
pub struct Target {
    /// `http://host:port` or `https://host:port`, no trailing slash.
    pub base: String,
    pub token: Option<String>,
    pub tls: Option<TlsConnector>,
}

impl Target {
    /// `method path` with optional headers and body; answers status and body.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(StatusCode, Bytes), CliError> {
        let url = format!("{}{path}", self.base);
        let transport = |reason: String| CliError::Transport { url: url.clone(), reason };
        let uri: Uri = url.parse().map_err(|e| transport(format!("not a URL: {e}")))?;
        let host = uri.host().ok_or_else(|| transport("the URL names no host".into()))?.to_owned();
        let port = uri.port_u16().unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(|e| transport(e.to_string()))?;
        let mut req = Request::builder().method(method).uri(uri.path()).header("Host", format!("{host}:{port}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let req = req.body(Full::new(body)).map_err(|e| transport(e.to_string()))?;
        let resp = match &self.tls {
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| transport(format!("{host} is not a TLS server name: {e}")))?;
                let stream = connector.connect(name, tcp).await.map_err(|e| transport(format!("TLS: {e}")))?;
                send(TokioIo::new(stream), req).await
            }
            None => send(TokioIo::new(tcp), req).await,
        }
        .map_err(transport)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| transport(e.to_string()))?.to_bytes();
        Ok((status, body))
    }
}

async fn send<S>(io: TokioIo<S>, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

type Waiting = Arc<Mutex<HashMap<String, oneshot::Sender<Value>>>>;

/// Receives results on `http://127.0.0.1:<ephemeral>/`; each is handed to whoever waits for
/// its `taskuuid`.
pub struct Callbacks {
    pub url: String,
    waiting: Waiting,
    server: tokio::task::JoinHandle<()>,
}

impl Callbacks {
    pub async fn start() -> Result<Callbacks, CliError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| CliError::Usage(format!("cannot listen for results on 127.0.0.1: {e}")))?;
        let port = listener.local_addr().map_err(|e| CliError::Usage(e.to_string()))?.port();
        let waiting: Waiting = Default::default();
        let shared = waiting.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let waiting = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| deliver(waiting.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Callbacks { url: format!("http://127.0.0.1:{port}/result"), waiting, server })
    }

    /// Registers interest in `task` before its command is sent.
    pub fn expect(&self, task: &str) -> oneshot::Receiver<Value> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(task.to_owned(), tx);
        rx
    }
}

impl Drop for Callbacks {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn deliver(waiting: Waiting, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let task = req.headers().get("taskuuid").and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(tx) = task.and_then(|t| waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&t)) {
        let _ = tx.send(value);
    }
    Ok(Response::new(Full::new(Bytes::new())))
}
