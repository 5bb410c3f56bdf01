//! RBD as the agent uses it: one trait ([`Rbd`]) for every image and snapshot operation, and
//! the real one, [`RbdCli`]: the `rbd` command line, run directly with `--format json` where it
//! answers, every call bounded in time (some Ceph commands wait forever when a daemon is
//! missing). Unit tests use the in-memory [`super::fake`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::mpsc::SyncSender;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::health::{Health, HEALTH_TIMEOUT};
use super::path::CephPath;
use crate::error::{AgentError, ErrorKind};
use crate::process::{self, Priority, ProcessError};
use crate::qemu_img::bitmaps;
use crate::qemu_img::nbd::{Chunk, Extent};
use crate::stop::{Stop, Stoppable};

/// How long one quick RBD call may take by default (flatten and copies are bounded by the task
/// instead); `[ceph] call_timeout_secs` sets it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error("rbd {what}: {source}")]
    Run { what: String, source: ProcessError },
    /// `health` is what the monitors reported afterwards, when they answered.
    #[error("rbd {what} did not answer within {after:?}; {}", Health::explain(health.as_ref()))]
    Timeout { what: String, after: Duration, health: Option<Health> },
    #[error("rbd {what} printed output that is not understood: {reason}")]
    Parse { what: String, reason: String },
    /// What `rbd` says as "No such file or directory", from a back end that says it directly.
    #[error("rbd {what}: no such image or snapshot")]
    NotFound { what: String },
    /// What `rbd` says as "File exists".
    #[error("rbd {what}: it already exists")]
    Exists { what: String },
    /// The image is open by a client (a fake's answer; `rbd` says "image still has watchers").
    #[error("rbd {what}: the image still has watchers")]
    Busy { what: String },
    /// Refused by the cluster for the reason given (a fake's answer; `rbd` gives stderr).
    #[error("rbd {what}: {reason}")]
    Refused { what: String, reason: String },
    /// librbd or librados failed `step` of `what` with the negative errno `errno`.
    #[error("rbd {what}: {step}: {}", std::io::Error::from_raw_os_error(-errno))]
    Lib { what: String, step: String, errno: i32 },
    /// librbd or librados is not installed (or too old) on this host: `reason` says which and
    /// what to install.
    #[error("rbd {what}: {reason}")]
    NoLibrary { what: String, reason: String },
    /// A size no image can have (its whole MiB overflow 64 bits of bytes).
    #[error("rbd {what}: a size of {size} bytes is more than an image can hold; give a smaller size")]
    TooLarge { what: String, size: u64 },
    /// The task was stopped before or during the call (librbd's in-process client).
    #[error("rbd {what} was stopped")]
    Stopped { what: String },
}

impl RbdError {
    fn stderr(&self) -> &str {
        match self {
            RbdError::Run { source: ProcessError::Failed { stderr, .. }, .. } => stderr,
            _ => "",
        }
    }

    fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Lib { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, RbdError::NotFound { .. })
            || self.errno() == Some(-libc::ENOENT)
            || self.stderr().contains("No such file or directory")
    }

    pub fn is_exists(&self) -> bool {
        matches!(self, RbdError::Exists { .. })
            || self.errno() == Some(-libc::EEXIST)
            || self.stderr().contains("File exists")
    }

    /// The image is still open somewhere (possibly by a killed client, until Ceph times its
    /// watch out).
    pub fn is_busy(&self) -> bool {
        matches!(self, RbdError::Busy { .. })
            || self.errno() == Some(-libc::EBUSY)
            || self.stderr().contains("image still has watchers")
    }

    fn is_timeout(&self) -> bool {
        matches!(self, RbdError::Timeout { .. }) || self.errno() == Some(-libc::ETIMEDOUT)
    }
}

impl Stoppable for RbdError {
    fn was_stopped(&self) -> bool {
        matches!(self, RbdError::Stopped { .. } | RbdError::Run { source: ProcessError::Stopped { .. }, .. })
    }
}

impl From<RbdError> for AgentError {
    fn from(e: RbdError) -> Self {
        let kind = if matches!(e, RbdError::TooLarge { .. }) {
            ErrorKind::InvalidArgument
        } else if e.is_not_found() {
            ErrorKind::NotFound
        } else if e.is_exists() {
            ErrorKind::Conflict
        } else if e.is_timeout() {
            ErrorKind::Timeout
        } else {
            ErrorKind::OperationFailed
        };
        AgentError::new(kind, "Ceph RBD operation failed", e.to_string()).stopped_if(e.was_stopped())
    }
}

/// Image sizes are whole MiB, as `rbd create --size <n>M` makes them (at least one). A size
/// whose whole MiB do not fit in 64 bits of bytes is refused: it would wrap to an empty image.
pub(super) fn whole_mib(p: &CephPath, size: u64) -> Result<u64, RbdError> {
    let mib = size.div_ceil(1 << 20).max(1);
    match mib.checked_mul(1 << 20) {
        Some(_) => Ok(mib),
        None => Err(RbdError::TooLarge { what: p.spec(), size }),
    }
}

/// `rbd flatten` prints `Image flatten: 42% complete...`.
fn flatten_progress(line: &str) -> Option<u8> {
    line.trim().strip_prefix("Image flatten: ")?.split('%').next()?.trim().parse().ok()
}

#[derive(Debug, Clone, Deserialize)]
pub struct Parent {
    pub pool: String,
    pub image: String,
    pub snapshot: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    pub size: u64,
    #[serde(default = "default_object_size")]
    pub object_size: u64,
    #[serde(default)]
    pub parent: Option<Parent>,
}

fn default_object_size() -> u64 {
    4 << 20
}

/// One extent of `rbd diff --format json`.
#[derive(Debug, Clone, Deserialize)]
struct DiffExtent {
    offset: u64,
    length: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Snapshot {
    pub name: String,
    #[serde(default)]
    pub protected: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Child {
    pool: String,
    image: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Status {
    #[serde(default)]
    watchers: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct Du {
    images: Vec<DuImage>,
}

#[derive(Debug, Clone, Deserialize)]
struct DuImage {
    #[serde(default)]
    snapshot: Option<String>,
    used_size: u64,
}

/// Every RBD operation the agent makes.
#[async_trait]
pub trait Rbd: Send + Sync {
    /// How QEMU (and qemu-img) name `p`.
    fn qemu_name(&self, p: &CephPath) -> String;
    async fn info(&self, p: &CephPath, stop: &Stop) -> Result<ImageInfo, RbdError>;
    /// Bytes the image (without its snapshots) uses in the cluster.
    async fn used(&self, p: &CephPath, stop: &Stop) -> Result<u64, RbdError>;
    /// How many objects of the image hold data, its parent's included. After a flatten the
    /// image owns exactly these.
    async fn data_objects(&self, p: &CephPath, object_size: u64, stop: &Stop) -> Result<u64, RbdError>;
    /// A new image of at least `size` bytes.
    async fn create(&self, p: &CephPath, size: u64, stop: &Stop) -> Result<(), RbdError>;
    /// Grows an image to at least `size` bytes.
    async fn resize(&self, p: &CephPath, size: u64, stop: &Stop) -> Result<(), RbdError>;
    /// A clone of snapshot `src` at `dst`.
    async fn clone_snapshot(&self, src: &CephPath, dst: &CephPath, stop: &Stop) -> Result<(), RbdError>;
    /// A copy with the source's snapshots and parent link (ZStack's volume/cp).
    async fn deep_copy(&self, src: &CephPath, dst: &CephPath, stop: &Stop) -> Result<(), RbdError>;
    /// Copies the parent's data into the image and cuts the link; `on_progress` gets percentages.
    async fn flatten(
        &self,
        p: &CephPath,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> Result<(), RbdError>;
    async fn snap_create(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError>;
    async fn snap_protect(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError>;
    async fn snap_unprotect(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError>;
    async fn snap_remove(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError>;
    async fn snapshots(&self, p: &CephPath, stop: &Stop) -> Result<Vec<Snapshot>, RbdError>;
    /// The byte ranges of snapshot `p` (`image@snap`) that differ from its image's older
    /// snapshot `from_snap`: written or discarded since, exact within objects that held data
    /// then (an object made since is one range up to its end), oldest offset first.
    async fn changed_since(&self, p: &CephPath, from_snap: &str, stop: &Stop) -> Result<Vec<(u64, u64)>, RbdError>;
    /// Reads the byte ranges `extents` of `p` (an image or its snapshot) and sends them to
    /// `chunks`, in the order given; a receiver that hangs up ends the read.
    async fn read_extents(
        &self,
        p: &CephPath,
        extents: Vec<Extent>,
        chunks: SyncSender<Chunk>,
        stop: &Stop,
    ) -> Result<(), RbdError>;
    /// Images cloned from the snapshot `p`.
    async fn children(&self, p: &CephPath, stop: &Stop) -> Result<Vec<CephPath>, RbdError>;
    async fn remove(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError>;
    /// How many clients have the image open (watch it).
    async fn watchers(&self, p: &CephPath, stop: &Stop) -> Result<usize, RbdError>;
    /// Moves the image to the pool's trash, from which the cluster may purge it once
    /// `delay_secs` have passed (and from which it can be restored until then).
    async fn trash_move(&self, p: &CephPath, delay_secs: u64, stop: &Stop) -> Result<(), RbdError>;
    /// Blocklists the client at `addr` (a killed run of this agent, see [`super::clients`]) for
    /// `expiry`: the OSDs drop its watches and refuse its requests. Clusters older than Pacific
    /// know the command as `blacklist`.
    async fn blocklist(&self, addr: &str, expiry: Duration, stop: &Stop) -> Result<(), RbdError>;
    /// When every client watching image `p` is blocklisted (dead), removes the image's header
    /// object so that [`remove`](Self::remove) can proceed, and answers true. An OSD may keep
    /// such a watch for good: a client killed while registering it leaves it recorded on the
    /// header with no live session to time out, and the blocklist does not drop it. Only for
    /// images being removed.
    async fn drop_dead_watch(&self, p: &CephPath, stop: &Stop) -> Result<bool, RbdError>;

    /// `info(p).size` and `used(p)` together (a client may answer both from one open image).
    async fn size_and_used(&self, p: &CephPath, stop: &Stop) -> Result<(u64, u64), RbdError> {
        Ok((self.info(p, stop).await?.size, self.used(p, stop).await?))
    }

    /// Whether the image (or snapshot) exists.
    async fn exists(&self, p: &CephPath, stop: &Stop) -> Result<bool, RbdError> {
        match self.info(p, stop).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// How the Ceph command lines reach the cluster.
#[derive(Debug, Clone)]
pub struct Connection {
    pub conf: PathBuf,
    pub id: String,
    pub keyring: Option<PathBuf>,
    /// How long a quick RBD call may take ([`CALL_TIMEOUT`] unless configured).
    pub call_timeout: Duration,
}

impl Connection {
    /// How the `[ceph]` table says to reach the cluster.
    pub fn configured(c: &crate::config::CephConfig) -> Connection {
        Connection {
            conf: c.conf.clone(),
            id: c.id.clone(),
            keyring: c.keyring.clone(),
            call_timeout: Duration::from_secs(c.call_timeout_secs),
        }
    }

    /// `-c <conf> --id <id> [--keyring <keyring>]`, which `rbd`, `ceph` and `rados` all take.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["-c".into(), self.conf.clone().into(), "--id".into(), self.id.clone().into()];
        if let Some(k) = &self.keyring {
            a.extend(["--keyring".into(), k.clone().into()]);
        }
        a
    }

    /// How QEMU (and qemu-img) names `p`: `rbd:pool/image[@snap]:id=..:conf=..[:keyring=..]`,
    /// with `:` and `\\` in the paths escaped as QEMU's option syntax wants.
    pub fn qemu_name(&self, p: &CephPath) -> String {
        let esc = |s: &std::path::Path| s.display().to_string().replace('\\', "\\\\").replace(':', "\\:");
        let mut n = format!("rbd:{}:id={}:conf={}", p.spec(), self.id, esc(&self.conf));
        if let Some(k) = &self.keyring {
            n.push_str(&format!(":keyring={}", esc(k)));
        }
        n
    }
}

/// The `rbd` command line.
#[derive(Debug, Clone)]
pub struct RbdCli(pub Connection);

impl RbdCli {
    async fn run(&self, args: &[&str], stop: &Stop, bounded: bool) -> Result<String, RbdError> {
        self.run_program("rbd", args, stop, bounded).await
    }

    async fn run_program(&self, program: &str, args: &[&str], stop: &Stop, bounded: bool) -> Result<String, RbdError> {
        let what = args.join(" ");
        let mut all = self.0.args();
        all.extend(args.iter().map(OsString::from));
        // The unbounded calls are the copies (deep cp).
        let priority = if bounded { Priority::Normal } else { Priority::Copy };
        let fut = process::run_with_lines_as(program, &all, stop, priority, |_| {});
        let out = if bounded {
            let after = self.0.call_timeout;
            match tokio::time::timeout(after, fut).await {
                Ok(out) => out,
                Err(_) => return Err(RbdError::Timeout { what, after, health: self.health().await }),
            }
        } else {
            fut.await
        };
        out.map(|o| o.stdout).map_err(|source| RbdError::Run { what, source })
    }

    /// What the monitors report as wrong (`ceph health`), to explain a call that timed out.
    async fn health(&self) -> Option<Health> {
        let cluster = super::cluster::CephCli(self.0.clone());
        let asked = cluster.run("ceph", &["health", "--format", "json"]);
        Health::parse(&tokio::time::timeout(HEALTH_TIMEOUT, asked).await.ok()?.ok()?)
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str], stop: &Stop) -> Result<T, RbdError> {
        let mut a = args.to_vec();
        a.extend(["--format", "json"]);
        let out = self.run(&a, stop, true).await?;
        serde_json::from_str(&out).map_err(|e| RbdError::Parse { what: args.join(" "), reason: e.to_string() })
    }
}

#[async_trait]
impl Rbd for RbdCli {
    fn qemu_name(&self, p: &CephPath) -> String {
        self.0.qemu_name(p)
    }

    async fn info(&self, p: &CephPath, stop: &Stop) -> Result<ImageInfo, RbdError> {
        self.json(&["info", &p.spec()], stop).await
    }

    /// Bytes the image (without its snapshots) uses in the cluster.
    async fn used(&self, p: &CephPath, stop: &Stop) -> Result<u64, RbdError> {
        let du: Du = self.json(&["du", &p.image_spec()], stop).await?;
        Ok(du.images.iter().filter(|i| i.snapshot.is_none()).map(|i| i.used_size).sum())
    }

    /// How many objects of the image hold data, its parent's included (from the object map:
    /// no data is read). After a flatten the image owns exactly these.
    async fn data_objects(&self, p: &CephPath, object_size: u64, stop: &Stop) -> Result<u64, RbdError> {
        let extents: Vec<DiffExtent> = self.json(&["diff", "--whole-object", &p.spec()], stop).await?;
        let mut objects = std::collections::BTreeSet::new();
        for e in extents.iter().filter(|e| e.length > 0) {
            objects.extend(e.offset / object_size..=(e.offset + e.length - 1) / object_size);
        }
        Ok(objects.len() as u64)
    }

    /// A new image of at least `size` bytes (rbd sizes are in MiB).
    async fn create(&self, p: &CephPath, size: u64, stop: &Stop) -> Result<(), RbdError> {
        let mib = whole_mib(p, size)?;
        self.run(&["create", "--size", &format!("{mib}M"), &p.image_spec()], stop, true).await.map(|_| ())
    }

    /// Grows an image to at least `size` bytes.
    async fn resize(&self, p: &CephPath, size: u64, stop: &Stop) -> Result<(), RbdError> {
        let mib = whole_mib(p, size)?;
        self.run(&["resize", "--no-progress", "--size", &format!("{mib}M"), &p.image_spec()], stop, true)
            .await
            .map(|_| ())
    }

    async fn clone_snapshot(&self, src: &CephPath, dst: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        self.run(&["clone", &src.spec(), &dst.image_spec()], stop, true).await.map(|_| ())
    }

    /// `rbd deep cp`: a copy with the source's snapshots and parent link (ZStack's volume/cp).
    async fn deep_copy(&self, src: &CephPath, dst: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        self.run(&["deep", "cp", "--no-progress", &src.spec(), &dst.image_spec()], stop, false).await.map(|_| ())
    }

    /// `rbd flatten`; `on_progress` gets the percentages rbd prints ("Image flatten: 42% complete").
    async fn flatten(
        &self,
        p: &CephPath,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> Result<(), RbdError> {
        let what = format!("flatten {}", p.image_spec());
        let mut args = self.0.args();
        args.extend(["flatten".into(), p.image_spec().into()]);
        process::run_with_lines_as("rbd", &args, stop, Priority::Copy, |line| {
            if let Some(pct) = flatten_progress(line) {
                on_progress(pct);
            }
        })
        .await
        .map(|_| ())
        .map_err(|source| RbdError::Run { what, source })
    }

    async fn snap_create(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        self.run(&["snap", "create", &p.spec()], stop, true).await.map(|_| ())
    }

    async fn snap_protect(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        self.run(&["snap", "protect", &p.spec()], stop, true).await.map(|_| ())
    }

    async fn snap_unprotect(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        self.run(&["snap", "unprotect", &p.spec()], stop, true).await.map(|_| ())
    }

    async fn snap_remove(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        self.run(&["snap", "rm", "--no-progress", &p.spec()], stop, true).await.map(|_| ())
    }

    async fn snapshots(&self, p: &CephPath, stop: &Stop) -> Result<Vec<Snapshot>, RbdError> {
        self.json(&["snap", "ls", &p.image_spec()], stop).await
    }

    async fn changed_since(&self, p: &CephPath, from_snap: &str, stop: &Stop) -> Result<Vec<(u64, u64)>, RbdError> {
        let extents: Vec<DiffExtent> = self.json(&["diff", "--from-snap", from_snap, &p.spec()], stop).await?;
        Ok(extents.into_iter().filter(|e| e.length > 0).map(|e| (e.offset, e.length)).collect())
    }

    /// Through a `qemu-nbd` of its own: the command line has no ranged read.
    async fn read_extents(
        &self,
        p: &CephPath,
        extents: Vec<Extent>,
        chunks: SyncSender<Chunk>,
        stop: &Stop,
    ) -> Result<(), RbdError> {
        bitmaps::send_extents(&self.qemu_name(p), "raw", &extents, chunks, stop)
            .await
            .map_err(|e| RbdError::Refused { what: format!("read {}", p.spec()), reason: e.to_string() })
    }

    /// Images cloned from the snapshot `p`, as `ceph://` paths.
    async fn children(&self, p: &CephPath, stop: &Stop) -> Result<Vec<CephPath>, RbdError> {
        let kids: Vec<Child> = self.json(&["children", &p.spec()], stop).await?;
        Ok(kids.into_iter().map(|c| CephPath { pool: c.pool, image: c.image, snap: None }).collect())
    }

    async fn remove(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        self.run(&["rm", "--no-progress", &p.image_spec()], stop, true).await.map(|_| ())
    }

    async fn watchers(&self, p: &CephPath, stop: &Stop) -> Result<usize, RbdError> {
        let status: Status = self.json(&["status", &p.image_spec()], stop).await?;
        Ok(status.watchers.len())
    }

    async fn drop_dead_watch(&self, p: &CephPath, stop: &Stop) -> Result<bool, RbdError> {
        let status: Status = self.json(&["status", &p.image_spec()], stop).await?;
        let watchers: Vec<&str> = status.watchers.iter().filter_map(|w| w["address"].as_str()).collect();
        let listed = self.run_program("ceph", &["osd", "blocklist", "ls", "--format", "json"], stop, true).await?;
        if !all_dead(&watchers, &blocklisted_addrs(&listed)) {
            return Ok(false);
        }
        let info: serde_json::Value = self.json(&["info", &p.image_spec()], stop).await?;
        let id = info["id"].as_str().unwrap_or_default();
        let header = format!("rbd_header.{id}");
        self.run_program("rados", &["-p", &p.pool, "rm", &header], stop, true).await.map(drop)?;
        Ok(true)
    }

    async fn trash_move(&self, p: &CephPath, delay_secs: u64, stop: &Stop) -> Result<(), RbdError> {
        let expires = format!("{delay_secs} seconds");
        self.run(&["trash", "mv", "--expires-at", &expires, &p.image_spec()], stop, true).await.map(drop)
    }

    async fn blocklist(&self, addr: &str, expiry: Duration, stop: &Stop) -> Result<(), RbdError> {
        let secs = expiry.as_secs().to_string();
        let args = |name| ["osd", name, "add", addr, secs.as_str()];
        match self.run_program("ceph", &args("blocklist"), stop, true).await {
            Ok(_) => Ok(()),
            // Clusters before Pacific know only the old name; the first error is the telling one.
            Err(e) => self.run_program("ceph", &args("blacklist"), stop, true).await.map(drop).map_err(|_| e),
        }
    }
}

/// The addresses in `ceph osd blocklist ls --format json` output (`[{"addr", "until"}]`, then
/// on recent releases `[ranges]`).
pub fn blocklisted_addrs(json: &str) -> Vec<String> {
    // Recent releases (16.2.15 here) follow the address list with a second array, of
    // blocklisted ranges (`[...][]`): every array of the output is read.
    let lists = serde_json::Deserializer::from_str(json).into_iter::<Vec<serde_json::Value>>();
    let entries: Vec<serde_json::Value> = lists.map_while(Result::ok).flatten().collect();
    entries.iter().filter_map(|e| e["addr"].as_str().map(str::to_owned)).collect()
}

/// Whether there are watchers and every one of them is blocklisted.
pub fn all_dead(watchers: &[&str], blocklisted: &[String]) -> bool {
    !watchers.is_empty() && watchers.iter().all(|w| blocklisted.iter().any(|b| b == w))
}

#[cfg(test)]
mod tests {
    #[test]
    fn dead_watchers_are_the_blocklisted_ones_and_only_when_all_are() {
        let listed = super::blocklisted_addrs(
            r#"[{"addr":"127.0.0.1:0/1771203139","until":"2026-11-30T02:52:42.891177+0000"},{"addr":"127.0.0.1:0/7"}]"#,
        );
        assert_eq!(listed, ["127.0.0.1:0/1771203139", "127.0.0.1:0/7"]);
        assert!(super::all_dead(&["127.0.0.1:0/1771203139"], &listed));
        assert!(!super::all_dead(&["127.0.0.1:0/1771203139", "127.0.0.1:0/8"], &listed), "a live watcher");
        assert!(!super::all_dead(&[], &listed), "no watcher: nothing to drop");
        assert!(super::blocklisted_addrs("not json").is_empty());
        // As the test cluster (16.2.15) answers: the addresses, then the (empty) ranges.
        let ranges_too = r#"[{"addr":"127.0.0.1:0/4172963249","until":"2026-11-30T15:32:58.294432+0000"}][]"#;
        assert_eq!(super::blocklisted_addrs(ranges_too), ["127.0.0.1:0/4172963249"]);
        assert!(super::all_dead(&["127.0.0.1:0/4172963249"], &super::blocklisted_addrs(ranges_too)));
    }

    #[test]
    fn flatten_progress_lines() {
        assert_eq!(super::flatten_progress("Image flatten: 42% complete..."), Some(42));
        assert_eq!(super::flatten_progress("Image flatten: 100% complete...done."), Some(100));
        assert_eq!(super::flatten_progress("rbd: error"), None);
    }
}
