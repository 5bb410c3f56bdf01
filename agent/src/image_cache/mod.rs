//! The image cache of local storage: images fetched into files under the storage roots, from
//! ZStack's SFTP backup storage (`/localstorage/sftp/download`) or from an `http://`,
//! `https://` or `sftp://` URL (`/image/cache`, for management planes other than ZStack).
//!
//! - The bytes arrive in a temporary file beside the target (`.<name>.kvmagent-tmp-<run>-<id>`, the
//!   name [`Building`] gives; the start-up recovery removes such files a killed agent left), are
//!   counted and hashed as they arrive, and are never more than the storage has free. The image
//!   is published (linked to its name) only when complete: as many bytes as the source
//!   announced, the SHA-256 asked for (when one is), and, for a qcow2, a header that parses and
//!   names no backing or external data file (a cached image stands alone). Otherwise the
//!   temporary file is removed and nothing is published.
//! - One image, one fetch: a request takes the target's volume lock; a second request for the
//!   same image waits for it, then finds the published image and answers with it (after checking
//!   its SHA-256, when it asks for one) instead of fetching it again.
//! - An image already in place is never overwritten; one with another SHA-256 than asked for is
//!   a conflict.

pub mod http;
pub mod ssh;

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::storage::local::Building;
use crate::tasks::TaskCtx;
use crate::wire::native::{CacheImageCmd, CacheImageRsp};

/// How long a transfer may go without a byte before it is abandoned.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("sha256 {0:?} is not 64 hexadecimal digits")]
    BadSha256(String),
    #[error("{from} announced {expected} bytes but sent {received}; the transfer was cut short or the file changed while it was read; nothing was kept, try again")]
    Truncated { from: String, expected: u64, received: u64 },
    #[error("{from} sends {size} bytes, more than the {available} bytes free on the storage of {target}; free space there or cache the image elsewhere")]
    TooLarge { from: String, size: u64, available: u64, target: String },
    #[error("the image from {from} has SHA-256 {actual}, not the {expected} asked for: it is corrupt or another image; nothing was kept")]
    Checksum { from: String, expected: String, actual: String },
    #[error("the image from {from} is not usable: {reason}; nothing was kept")]
    BadImage { from: String, reason: String },
    #[error("{target} is already cached with SHA-256 {actual}, not the {expected} asked for; delete it first or choose another install path")]
    OtherImage { target: String, expected: String, actual: String },
    #[error("{target} exists and is not a regular file; choose another install path")]
    NotAFile { target: String },
    #[error("{what} {path} failed: {source}")]
    Io { what: &'static str, path: String, source: std::io::Error },
}

impl From<CacheError> for AgentError {
    fn from(e: CacheError) -> Self {
        match e {
            CacheError::BadSha256(_) => AgentError::invalid(e.to_string()),
            CacheError::OtherImage { .. } | CacheError::NotAFile { .. } => AgentError::conflict(e.to_string()),
            _ => AgentError::failed("the image could not be cached", e.to_string()),
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io { what, path: path.display().to_string(), source }
}

/// Where an image comes from.
pub enum Source {
    Http(http::HttpSource),
    Ssh(ssh::SshSource),
}

impl Source {
    /// An `/image/cache` URL with its credentials (which only `sftp://` takes).
    pub fn from_url(url: &str, ssh_key: Option<&str>, host_key: Option<&str>) -> AgentResult<Source> {
        if url.starts_with("sftp://") {
            let key = ssh_key.ok_or_else(|| AgentError::invalid("sshKey is required for an sftp:// url"))?;
            return Ok(Source::Ssh(ssh::SshSource::from_url(url, key, host_key)?));
        }
        if ssh_key.is_some() || host_key.is_some() {
            return Err(AgentError::invalid("sshKey and hostKey are for sftp:// urls only"));
        }
        Ok(Source::Http(http::HttpSource::parse(url)?))
    }

    fn describe(&self) -> String {
        match self {
            Source::Http(h) => h.describe(),
            Source::Ssh(s) => s.describe(),
        }
    }
}

/// A SHA-256 as 64 lower-case hex digits.
pub fn parse_sha256(s: &str) -> Result<String, CacheError> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(CacheError::BadSha256(s.chars().take(80).collect()))
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A cached image: where, how big, its SHA-256 (when it was computed), and whether this request
/// fetched it.
#[derive(Debug)]
pub struct Cached {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: Option<String>,
    pub downloaded: bool,
}

/// Where the bytes of a transfer go: the temporary file beside the target, counted and hashed
/// as they arrive, never beyond what the storage has free. Transports call [`expect`] with the
/// size the source announces (if it does) and [`write`] with each chunk.
///
/// [`expect`]: Receiver::expect
/// [`write`]: Receiver::write
pub struct Receiver<'a> {
    building: Building,
    /// Batched: HTTP frames are small, and every write of a `tokio::fs::File` is a blocking task.
    file: tokio::io::BufWriter<tokio::fs::File>,
    hasher: Sha256,
    received: u64,
    expected: Option<u64>,
    available: u64,
    target: &'a Path,
    from: String,
    ctx: &'a TaskCtx,
    percent: Option<u8>,
}

impl<'a> Receiver<'a> {
    async fn new(target: &'a Path, from: String, ctx: &'a TaskCtx, available: u64) -> Result<Receiver<'a>, CacheError> {
        let building = Building::beside(target);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(building.path())
            .await
            .map_err(io("creating", building.path()))?;
        Ok(Receiver {
            building,
            file: tokio::io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            received: 0,
            expected: None,
            available,
            target,
            from,
            ctx,
            percent: None,
        })
    }

    fn too_large(&self, size: u64) -> CacheError {
        CacheError::TooLarge {
            from: self.from.clone(),
            size,
            available: self.available,
            target: self.target.display().to_string(),
        }
    }

    /// The size the source announces; refused at once when the storage cannot hold it.
    pub fn expect(&mut self, size: u64) -> Result<(), CacheError> {
        if size > self.available {
            return Err(self.too_large(size));
        }
        self.expected = Some(size);
        Ok(())
    }

    /// Appends `chunk`; more than announced, or than fits, fails.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), CacheError> {
        let received = self.received + chunk.len() as u64;
        if let Some(expected) = self.expected.filter(|e| received > *e) {
            return Err(CacheError::Truncated { from: self.from.clone(), expected, received });
        }
        if received > self.available {
            return Err(self.too_large(received));
        }
        self.file.write_all(chunk).await.map_err(io("writing", self.building.path()))?;
        self.hasher.update(chunk);
        self.received = received;
        if let Some(total) = self.expected.filter(|t| *t > 0) {
            let percent = (received.saturating_mul(100) / total).min(99) as u8;
            if self.percent != Some(percent) {
                self.percent = Some(percent);
                self.ctx.progress(percent, &format!("downloading {}", self.from));
            }
        }
        Ok(())
    }

    /// The complete temporary file, its size and SHA-256.
    async fn finish(mut self) -> Result<(Building, u64, String), CacheError> {
        self.file.flush().await.map_err(io("writing", self.building.path()))?;
        if let Some(expected) = self.expected.filter(|e| *e != self.received) {
            return Err(CacheError::Truncated { from: self.from, expected, received: self.received });
        }
        Ok((self.building, self.received, hex(&self.hasher.finalize())))
    }
}

/// A qcow2 must have a header that parses and name no other file: the cache's images are the
/// bottom of every chain built on them.
fn check_image(path: &Path, from: &str) -> Result<(), CacheError> {
    let bad = |reason: String| CacheError::BadImage { from: from.to_owned(), reason };
    let header = crate::qemu_img::read_header(path).map_err(|e| bad(e.to_string()))?;
    if let Some(b) = header.backing_file {
        return Err(bad(format!("it is a qcow2 with backing file {b:?}; a cached image must stand alone")));
    }
    if header.external_data {
        return Err(bad("it is a qcow2 keeping its data in an external file".to_owned()));
    }
    Ok(())
}

/// The SHA-256 of a file, read off the async runtime.
async fn sha256_of(path: PathBuf) -> Result<String, CacheError> {
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&path).map_err(io("reading", &path))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match f.read(&mut buf).map_err(io("reading", &path))? {
                0 => return Ok(hex(&hasher.finalize())),
                n => hasher.update(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|e| Err(CacheError::Io { what: "hashing", path: String::new(), source: std::io::Error::other(e) }))
}

/// The image from `source` at `target` (inside the storage roots), fetched unless it is there
/// already; see the module documentation.
pub async fn fetch(
    app: &App,
    ctx: &TaskCtx,
    source: &Source,
    target: &str,
    sha256: Option<&str>,
) -> AgentResult<Cached> {
    let dst = app.storage.roots().confine(target)?;
    let from = source.describe();
    let _lock = tokio::select! {
        l = app.volume_locks.write(target) => l?,
        _ = ctx.stop.stopped() => return Err(ctx.stop.error(&format!("waiting for another download of {target}"))),
    };
    if let Ok(m) = dst.symlink_metadata() {
        // Published images are complete: they are linked into place only once they are.
        if !m.is_file() {
            return Err(CacheError::NotAFile { target: dst.display().to_string() }.into());
        }
        let actual = match sha256 {
            Some(expected) => {
                let actual = sha256_of(dst.clone()).await?;
                if actual != expected {
                    let (target, expected) = (dst.display().to_string(), expected.to_owned());
                    return Err(CacheError::OtherImage { target, expected, actual }.into());
                }
                Some(actual)
            }
            None => None,
        };
        return Ok(Cached { path: dst, size: m.len(), sha256: actual, downloaded: false });
    }
    let dir = dst.parent().ok_or_else(|| AgentError::invalid(format!("{target} has no directory")))?;
    // A failed (or killed) download also removes the directories it made for the image.
    let removal = crate::ops::volumes::store(app, target)?.undo_for(target)?;
    crate::ops::undo::journaled(app, &ctx.task_id, Some(removal), async {
        std::fs::create_dir_all(dir).map_err(io("creating the directory", dir))?;
        let available = app.storage.capacity(Some(dir)).available;
        let mut rx = Receiver::new(&dst, from.clone(), ctx, available).await?;
        match source {
            Source::Http(h) => http::download(h, &mut rx, &ctx.stop).await?,
            Source::Ssh(s) => s.download(&app.config.state_dir, &mut rx, &ctx.stop).await?,
        }
        let (building, size, actual) = rx.finish().await?;
        if let Some(expected) = sha256.filter(|e| *e != actual) {
            return Err(CacheError::Checksum { from: from.clone(), expected: expected.to_owned(), actual }.into());
        }
        check_image(building.path(), &from)?;
        building.publish(&dst)?;
        ctx.progress(100, &format!("downloaded {from}"));
        tracing::info!(image = %dst.display(), from = %from, size, "image cached");
        Ok(Cached { path: dst.clone(), size, sha256: Some(actual), downloaded: true })
    })
    .await
}

/// `/image/cache`.
pub async fn cache(app: &App, ctx: &TaskCtx, cmd: CacheImageCmd) -> AgentResult<CacheImageRsp> {
    let sha256 = parse_sha256(&cmd.sha256)?;
    let source = Source::from_url(&cmd.url, cmd.ssh_key.as_deref(), cmd.host_key.as_deref())?;
    let cached = fetch(app, ctx, &source, &cmd.install_path, Some(&sha256)).await?;
    Ok(CacheImageRsp {
        install_path: cached.path.display().to_string(),
        size: cached.size,
        sha256: cached.sha256.unwrap_or(sha256),
        downloaded: cached.downloaded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::testing::TestHost;

    #[tokio::test]
    async fn the_receiver_refuses_more_than_announced_or_than_fits() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("i.raw");
        let ctx = TaskCtx::detached("/image/cache");
        let mut rx = Receiver::new(&target, "src".into(), &ctx, 10).await.unwrap();
        assert!(matches!(rx.expect(11), Err(CacheError::TooLarge { .. })));
        rx.expect(4).unwrap();
        rx.write(b"abc").await.unwrap();
        assert!(matches!(rx.write(b"de").await, Err(CacheError::Truncated { expected: 4, received: 5, .. })));
        assert!(matches!(rx.finish().await, Err(CacheError::Truncated { expected: 4, received: 3, .. })));
        let mut rx = Receiver::new(&target, "src".into(), &ctx, 10).await.unwrap();
        rx.write(&[0; 10]).await.unwrap();
        assert!(matches!(rx.write(b"x").await, Err(CacheError::TooLarge { .. })), "no size announced: the free space");
        drop(rx);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the temporary file went with it");
        assert!(parse_sha256(&"A".repeat(64)).is_ok_and(|s| s == "a".repeat(64)));
        assert!(parse_sha256("abc").is_err() && parse_sha256(&"g".repeat(64)).is_err());
    }

    #[tokio::test]
    async fn a_cancelled_download_leaves_nothing() {
        let h = TestHost::start();
        // A server that takes the request and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/i.raw", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = listener.accept().await {
                held.push(c);
            }
        });
        let ctx = h.task("/image/cache").await;
        let stop = ctx.stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            stop.fire(crate::stop::StopReason::Cancelled);
        });
        let source = Source::from_url(&url, None, None).unwrap();
        let e = fetch(&h.app, &ctx, &source, &h.path("cache/i.raw"), Some(&"0".repeat(64))).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
        assert!(h.files().is_empty(), "{:?}", h.files());
        assert!(!h.root.join("cache").exists(), "nor the directory it made for the image");
    }

    #[tokio::test]
    async fn a_published_image_is_the_answer_and_another_checksum_a_conflict() {
        let h = TestHost::start();
        let path = h.path("cache/i.raw");
        std::fs::create_dir_all(Path::new(&path).parent().unwrap()).unwrap();
        std::fs::write(&path, b"image").unwrap();
        let sha = sha256_of(path.clone().into()).await.unwrap();
        // Nobody listens on port 9: the image is not fetched again.
        let source = Source::from_url("http://127.0.0.1:9/i", None, None).unwrap();
        let ctx = TaskCtx::detached("/image/cache");
        let c = fetch(&h.app, &ctx, &source, &path, Some(&sha)).await.unwrap();
        assert_eq!((c.size, c.downloaded, c.sha256.as_deref()), (5, false, Some(sha.as_str())));
        assert!(fetch(&h.app, &ctx, &source, &path, None).await.is_ok_and(|c| !c.downloaded));
        let e = fetch(&h.app, &ctx, &source, &path, Some(&"0".repeat(64))).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"image");
        let e = Source::from_url("http://127.0.0.1:9/i", Some("k"), None).err().unwrap();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }
}
