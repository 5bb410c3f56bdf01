//! A tiny HTTP/1.1 server on loopback that the tests start (for `/image/cache` downloads), and
//! the raw image bytes it serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::checks::file_sha256;

/// Bytes that are no image header (a raw image), the same for a given seed.
pub fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = crate::Rng(seed | 1);
    let mut v: Vec<u8> = (0..len / 8).flat_map(|_| rng.next_u64().to_le_bytes()).collect();
    v[0] = 0; // never the qcow2 magic
    v
}

/// The SHA-256 of `bytes`, hex.
pub fn sha256(bytes: &[u8]) -> String {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), bytes).unwrap();
    file_sha256(f.path()).unwrap()
}

/// How the HTTP server answers one path.
#[derive(Clone)]
pub enum Serve {
    /// The bytes, after a pause (so that concurrent requests overlap).
    Whole { body: Vec<u8>, delay: Duration },
    /// Announces all of `body` but sends only the first `sent` bytes, then closes.
    Truncated { body: Vec<u8>, sent: usize },
    /// The bytes, 64 KiB at a time with pauses: a download that takes a while.
    Drip { body: Vec<u8> },
    /// A 302 to another path of this server.
    Redirect { to: String },
}

/// A tiny HTTP/1.1 server on loopback that counts the requests per path.
pub struct HttpServer {
    pub port: u16,
    routes: Arc<Mutex<HashMap<String, Serve>>>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub async fn start() -> HttpServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<String, Serve>>> = Default::default();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Default::default();
        let (r, h) = (routes.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (r, h) = (r.clone(), h.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    *h.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let serve = r.lock().unwrap().get(&path).cloned();
                    let header =
                        |len: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n");
                    let _ = match serve {
                        None => {
                            conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .await
                        }
                        Some(Serve::Whole { body, delay }) => {
                            tokio::time::sleep(delay).await;
                            conn.write_all(header(body.len()).as_bytes()).await.and(conn.write_all(&body).await)
                        }
                        Some(Serve::Truncated { body, sent }) => {
                            conn.write_all(header(body.len()).as_bytes()).await.and(conn.write_all(&body[..sent]).await)
                        }
                        Some(Serve::Redirect { to }) => {
                            let head = format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                            conn.write_all(head.as_bytes()).await
                        }
                        Some(Serve::Drip { body }) => {
                            let mut r = conn.write_all(header(body.len()).as_bytes()).await;
                            for chunk in body.chunks(64 << 10) {
                                r = r.and(conn.write_all(chunk).await);
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            r
                        }
                    };
                    let _ = conn.shutdown().await;
                });
            }
        });
        HttpServer { port, routes, hits, task }
    }

    pub fn serve(&self, path: &str, how: Serve) -> String {
        self.routes.lock().unwrap().insert(path.to_owned(), how);
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
