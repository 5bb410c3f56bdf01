//! Images over HTTP(S): one GET, streamed to the cache's temporary file, with redirects
//! followed (a few), the connection, the response headers and every gap between bytes bounded
//! in time, and the stop signal honoured. HTTPS verifies the server against the host's CA
//! bundle.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{Receiver, STALL};
use crate::error::{AgentError, AgentResult};
use crate::stop::Stop;

const CONNECT: Duration = Duration::from_secs(30);
const HEADERS: Duration = Duration::from_secs(60);
const MAX_REDIRECTS: usize = 5;
const MAX_URL: usize = 2048;
/// Where Debian, Red Hat and Alpine keep the CA bundle.
const CA_BUNDLES: &[&str] =
    &["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("url {0:?} is not an http:// or https:// URL with a host (and no user or password)")]
    BadUrl(String),
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("TLS to {url} failed: {reason}")]
    Tls { url: String, reason: String },
    #[error("GET {url} failed: {reason}")]
    Request { url: String, reason: String },
    #[error("GET {url} answered {status}; the image is not there or the server refuses it")]
    Status { url: String, status: StatusCode },
    #[error("GET {url} redirected more than {MAX_REDIRECTS} times, or to a location that is not a URL ({location:?})")]
    Redirect { url: String, location: String },
    #[error("{url} sent no data for {secs} s; the download was abandoned", secs = STALL.as_secs())]
    Stalled { url: String },
}

impl From<HttpError> for AgentError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::BadUrl(_) => AgentError::invalid(e.to_string()),
            _ => AgentError::failed("the image download failed", e.to_string()),
        }
    }
}

/// An `http://` or `https://` URL.
#[derive(Debug, Clone)]
pub struct HttpSource {
    uri: Uri,
}

impl HttpSource {
    pub fn parse(url: &str) -> Result<HttpSource, HttpError> {
        let bad = || HttpError::BadUrl(url.chars().take(300).collect());
        if url.len() > MAX_URL {
            return Err(bad());
        }
        let uri: Uri = url.parse().map_err(|_| bad())?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?;
        if authority.as_str().contains('@') || !uri.host().is_some_and(|h| !h.is_empty()) {
            return Err(bad());
        }
        if !crate::callbacks::client::port_is_valid(&uri) {
            return Err(bad());
        }
        Ok(HttpSource { uri })
    }

    pub fn describe(&self) -> String {
        self.uri.to_string()
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The client TLS configuration: the host's CA bundle, read once.
fn tls() -> Result<tokio_rustls::TlsConnector, String> {
    static TLS: OnceLock<Result<tokio_rustls::TlsConnector, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        let bundle = CA_BUNDLES
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| format!("no CA bundle at any of {CA_BUNDLES:?}; install ca-certificates"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut bundle.as_slice()).flatten() {
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            return Err(format!("the CA bundle of this host ({CA_BUNDLES:?}) holds no usable certificate"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    })
    .clone()
}

/// One GET of `uri` on a fresh connection; the response headers within [`HEADERS`].
async fn get(uri: &Uri) -> Result<hyper::Response<Incoming>, HttpError> {
    let url = uri.to_string();
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let connect = |reason: String| HttpError::Connect { url: url.clone(), reason };
    let tcp = tokio::time::timeout(CONNECT, TcpStream::connect((bare, port)))
        .await
        .map_err(|_| connect(format!("no connection within {CONNECT:?}")))?
        .map_err(|e| connect(e.to_string()))?;
    let io: Box<dyn Io> = if https {
        let tls_err = |reason: String| HttpError::Tls { url: url.clone(), reason };
        let name = rustls::pki_types::ServerName::try_from(bare.to_owned()).map_err(|e| tls_err(e.to_string()))?;
        let stream = tokio::time::timeout(CONNECT, tls().map_err(tls_err)?.connect(name, tcp))
            .await
            .map_err(|_| tls_err(format!("no handshake within {CONNECT:?}")))?
            .map_err(|e| tls_err(e.to_string()))?;
        Box::new(stream)
    } else {
        Box::new(tcp)
    };
    let request = |reason: String| HttpError::Request { url: url.clone(), reason };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(|e| request(e.to_string()))?;
    // Ends when the response has been read or dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
    let target = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = hyper::Request::get(target)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, concat!("kvmagent/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| request(e.to_string()))?;
    tokio::time::timeout(HEADERS, sender.send_request(req))
        .await
        .map_err(|_| request(format!("no response within {HEADERS:?}")))?
        .map_err(|e| request(e.to_string()))
}

/// Where a redirect from `from` leads: an absolute URL, or an absolute path on the same server.
fn redirect(from: &Uri, location: &str) -> Option<Uri> {
    if location.starts_with('/') && !location.starts_with("//") {
        let base = format!("{}://{}", from.scheme_str()?, from.authority()?);
        return HttpSource::parse(&format!("{base}{location}")).ok().map(|s| s.uri);
    }
    HttpSource::parse(location).ok().map(|s| s.uri)
}

/// Downloads `src` into `rx`.
pub async fn download(src: &HttpSource, rx: &mut Receiver<'_>, stop: &Stop) -> AgentResult<()> {
    let what = format!("downloading {}", src.describe());
    let mut uri = src.uri.clone();
    for _ in 0..=MAX_REDIRECTS {
        let resp = tokio::select! {
            r = get(&uri) => r?,
            _ = stop.stopped() => return Err(stop.error(&what)),
        };
        let status = resp.status();
        if status.is_redirection() {
            let location = resp.headers().get(http::header::LOCATION).and_then(|l| l.to_str().ok()).unwrap_or("");
            uri = redirect(&uri, location)
                .ok_or_else(|| HttpError::Redirect { url: uri.to_string(), location: location.to_owned() })?;
            continue;
        }
        if status != StatusCode::OK {
            return Err(HttpError::Status { url: uri.to_string(), status }.into());
        }
        let length = resp.headers().get(http::header::CONTENT_LENGTH).and_then(|l| l.to_str().ok()?.parse().ok());
        if let Some(n) = length {
            rx.expect(n)?;
        }
        let mut body = resp.into_body();
        loop {
            let frame = tokio::select! {
                f = tokio::time::timeout(STALL, body.frame()) => f,
                _ = stop.stopped() => return Err(stop.error(&what)),
            };
            let frame = match frame {
                Err(_) => return Err(HttpError::Stalled { url: uri.to_string() }.into()),
                Ok(None) => return Ok(()),
                Ok(Some(f)) => f.map_err(|e| HttpError::Request {
                    url: uri.to_string(),
                    reason: format!("reading the body: {e}"),
                })?,
            };
            if let Ok(data) = frame.into_data() {
                rx.write(&data).await?;
            }
        }
    }
    Err(HttpError::Redirect { url: src.describe(), location: uri.to_string() }.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_with_a_host() {
        for ok in ["http://10.0.0.1:8080/images/a.qcow2", "https://images.example/a?x=1", "http://[::1]/i"] {
            assert!(HttpSource::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "ftp://h/i",
            "file:///etc/passwd",
            "http://",
            "http://user:pw@h/i",
            "http://h:99999/i",
            "http://h:0/i",
            "/relative",
            "not a url",
        ] {
            assert!(HttpSource::parse(bad).is_err(), "{bad}");
        }
        assert!(HttpSource::parse(&format!("http://h/{}", "a".repeat(MAX_URL))).is_err());
    }

    #[test]
    fn redirects_resolve_absolute_urls_and_paths() {
        let from: Uri = "https://a.example:8443/x/y".parse().unwrap();
        assert_eq!(redirect(&from, "/z?q").unwrap().to_string(), "https://a.example:8443/z?q");
        assert_eq!(redirect(&from, "http://b/c").unwrap().to_string(), "http://b/c");
        for bad in ["relative", "//b/c", "ftp://b/c", ""] {
            assert!(redirect(&from, bad).is_none(), "{bad}");
        }
    }
}
