//! Outbound HTTP: result callbacks to `callbackurl` and progress reports to `sendCommandUrl`.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum PostError {
    #[error("{url} is not a usable http:// URL")]
    BadUrl { url: String },
    #[error("POST to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("POST to {url} answered {status}")]
    Status { url: String, status: StatusCode },
}

impl PostError {
    /// Whether trying again can help: a 4xx (other than 408/429) means the receiver refuses this
    /// body for good, e.g. the management node forgot the task (404).
    fn is_final(&self) -> bool {
        match self {
            PostError::BadUrl { .. } => true,
            PostError::Transport { .. } => false,
            PostError::Status { status, .. } => {
                status.is_client_error()
                    && *status != StatusCode::REQUEST_TIMEOUT
                    && *status != StatusCode::TOO_MANY_REQUESTS
            }
        }
    }
}

/// Callback URLs longer than this are refused: no management node needs one, and the agent
/// keeps every task's URL.
const MAX_URL: usize = 2048;

/// Checks that `url` is an absolute `http://host[:port]/...` URL of a sane length.
pub fn parse_url(url: &str) -> Result<Uri, PostError> {
    if url.len() > MAX_URL {
        let start: String = url.chars().take(64).collect();
        return Err(PostError::BadUrl { url: format!("{start}... ({} bytes, at most {MAX_URL})", url.len()) });
    }
    let uri: Uri = url.parse().map_err(|_| PostError::BadUrl { url: url.to_owned() })?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() || !port_is_valid(&uri) {
        return Err(PostError::BadUrl { url: url.to_owned() });
    }
    Ok(uri)
}

/// `Uri` keeps a port it cannot read as a number (`:99999`) and reports none: such a URL would
/// be accepted here and fail at every delivery.
pub(crate) fn port_is_valid(uri: &Uri) -> bool {
    let Some(authority) = uri.authority() else { return false };
    let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
    let after_host = host_port.rsplit(']').next().unwrap_or_default();
    match authority.port_u16() {
        Some(port) => port > 0,
        None => authority.port().is_none() && !after_host.contains(':'),
    }
}

#[derive(Clone)]
pub struct Poster {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Poster {
    fn default() -> Self {
        Poster { client: Client::builder(TokioExecutor::new()).build_http() }
    }
}

impl Poster {
    /// One JSON POST with the given extra headers.
    pub async fn post_json(&self, url: &str, headers: &[(&str, &str)], body: Bytes) -> Result<(), PostError> {
        let uri = parse_url(url)?;
        let mut req = Request::post(uri).header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).map_err(|_| PostError::BadUrl { url: url.to_owned() })?;
        let transport = |reason: String| PostError::Transport { url: url.to_owned(), reason };
        let resp = tokio::time::timeout(ATTEMPT_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| transport(format!("no answer within {ATTEMPT_TIMEOUT:?}")))?
            .map_err(|e| transport(e.to_string()))?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(PostError::Status { url: url.to_owned(), status: resp.status() })
        }
    }

    /// POSTs until it succeeds, backing off from 250 ms to 8 s between attempts, for at most
    /// `retry_for`. Gives up early on an answer that retrying cannot change.
    pub async fn post_with_retry(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        retry_for: Duration,
    ) -> Result<(), PostError> {
        let deadline = tokio::time::Instant::now() + retry_for;
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.post_json(url, headers, body.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_final() || tokio::time::Instant::now() + backoff > deadline => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "POST failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(8));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_urls_with_a_host_are_accepted() {
        assert!(parse_url(&format!("http://h/{}", "é".repeat(2000))).is_err(), "too long, cut on a character");
        assert!(parse_url("http://10.0.0.1:8080/zstack/asyncrest/callback").is_ok());
        assert!(parse_url("http://user:pw@[::1]:8080/cb").is_ok());
        for bad in [
            "https://x/y",
            "ftp://x",
            "/relative",
            "http://",
            "not a url",
            "http://127.0.0.1:99999/cb",
            "http://127.0.0.1:0/cb",
            "http://[::1]:x/",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn retry_stops_at_deadline_when_nobody_listens() {
        // Port 9 on loopback: nothing listens there in a test sandbox; connection refused.
        let t = std::time::Instant::now();
        let err = Poster::default()
            .post_with_retry("http://127.0.0.1:9/cb", &[], Bytes::from_static(b"{}"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, PostError::Transport { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
