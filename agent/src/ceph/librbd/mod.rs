//! [`RbdLib`]: the [`Rbd`] trait over librbd and librados in the agent's process. One cluster
//! connection for the whole agent, opened on first use and shared; one I/O context per pool,
//! kept. A call that fails as if the connection were gone (or does not answer in time) drops it,
//! and the next call connects again. librados blocks, so every call runs on the blocking pool;
//! a stopped task makes no further call, and a flatten or deep copy under way is aborted from
//! its progress callback. Each connection can be recorded in the agent's state directory (see
//! [`super::clients`]), so that the next start can blocklist it.

mod ffi;
mod handle;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use self::ffi::Api;
use self::handle::{ClientIdentity, Fail, Image, IoCtx, Rados, Res};
use super::clients::{self, Client};
use super::health::{Health, HEALTH_COMMAND, HEALTH_TIMEOUT};
use super::path::CephPath;
use super::rbd::{whole_mib, Connection, ImageInfo, Parent, Rbd, RbdError, Snapshot};
use crate::qemu_img::nbd::{self, Chunk, Extent, SendError};
use crate::stop::Stop;

/// Set on the connection: bounds how long connecting waits for a monitor (librados' default is
/// five minutes, longer than a call may take).
const CONNECT_OPTIONS: &[(&str, &str)] = &[("client_mount_timeout", "60")];

/// Errnos after which the connection is not trusted any more.
fn connection_lost(errno: i32) -> bool {
    [libc::ESHUTDOWN, libc::ENOTCONN, libc::ETIMEDOUT, libc::ECONNREFUSED, libc::ECONNRESET].contains(&-errno)
}

/// The connected cluster and the I/O contexts of the pools used so far.
struct Session {
    rados: Arc<Rados>,
    /// Who the connection is (`None` when it could not be read: nothing was recorded).
    me: Option<ClientIdentity>,
    pools: Mutex<HashMap<String, Arc<IoCtx>>>,
}

impl Session {
    fn pool(&self, name: &str) -> Res<Arc<IoCtx>> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(io) = pools.get(name) {
            return Ok(io.clone());
        }
        let io = Arc::new(IoCtx::open(&self.rados, name)?);
        pools.insert(name.to_owned(), io.clone());
        Ok(io)
    }
}

struct Shared {
    connection: Connection,
    session: Mutex<Option<Arc<Session>>>,
    /// The state directory each new connection is recorded in.
    records: Option<PathBuf>,
}

impl Shared {
    /// The current session, connecting first if there is none (callers wait for one connect).
    fn session(&self, api: &'static Api) -> Res<Arc<Session>> {
        let mut slot = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let c = &self.connection;
        let rados = Rados::connect(api, &c.conf, &c.id, c.keyring.as_deref(), CONNECT_OPTIONS)?;
        let me = self.records.as_deref().and_then(|state_dir| remember(&rados, state_dir));
        let s = Arc::new(Session { rados: Arc::new(rados), me, pools: Mutex::default() });
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Drops the session (calls still running keep theirs until they return).
    fn forget(&self) {
        self.session.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Records the new connection `rados` in `state_dir`; a failure is logged (the next start
/// then cannot blocklist it, and waits out the watches a kill leaves instead).
fn remember(rados: &Rados, state_dir: &std::path::Path) -> Option<ClientIdentity> {
    let recorded = rados.identity().map_err(|f| f.step).and_then(|me| {
        let client = Client { fsid: me.fsid.clone(), addr: me.addr.clone(), instance: me.instance };
        clients::record(state_dir, &client).map(|()| me).map_err(|e| e.to_string())
    });
    recorded
        .inspect_err(|e| {
            tracing::warn!(error = %e, "cannot record the agent's Ceph client; after a kill, images it had open \
                stay watched until the cluster times the watch out")
        })
        .ok()
}

/// The monitor command that blocklists `addr` for `expiry`, under the name `name` (`blocklist`,
/// or `blacklist` before Pacific).
fn blocklist_command(name: &str, addr: &str, expiry: Duration) -> String {
    serde_json::json!({
        "prefix": format!("osd {name}"),
        format!("{name}op"): "add",
        "addr": addr,
        "expire": expiry.as_secs_f64(),
    })
    .to_string()
}

/// RBD through librbd, one connection per agent.
#[derive(Clone)]
pub struct RbdLib(Arc<Shared>);

impl RbdLib {
    /// Connects lazily: nothing happens until the first call.
    pub fn new(connection: Connection) -> RbdLib {
        RbdLib(Arc::new(Shared { connection, session: Mutex::default(), records: None }))
    }

    /// Like [`new`](Self::new); each connection is recorded in `state_dir` as it opens.
    pub fn recording_clients(connection: Connection, state_dir: PathBuf) -> RbdLib {
        RbdLib(Arc::new(Shared { connection, session: Mutex::default(), records: Some(state_dir) }))
    }

    /// Runs `f` on the blocking pool with the session; `bounded` calls give up after the
    /// connection's call timeout (flatten and copies are bounded by the task instead).
    async fn call<T, F>(&self, what: String, stop: &Stop, bounded: bool, f: F) -> Result<T, RbdError>
    where
        T: Send + 'static,
        F: FnOnce(&Session) -> Res<T> + Send + 'static,
    {
        if stop.is_stopped() {
            return Err(RbdError::Stopped { what });
        }
        let shared = self.0.clone();
        let logged = what.clone();
        let job = tokio::task::spawn_blocking(move || {
            // The first call loads the libraries (about 10 ms of disk and relocations), off the runtime too.
            let api = Api::get()?;
            let started = std::time::Instant::now();
            let r = shared.session(api).and_then(|s| f(&s));
            if r.as_ref().is_err_and(|e| connection_lost(e.errno)) {
                shared.forget();
            }
            // The benchmark's time per step reads these.
            tracing::debug!(call = %logged, us = started.elapsed().as_micros() as u64, ok = r.is_ok(), "librbd call");
            Ok(r)
        });
        let joined = if bounded {
            let after = self.0.connection.call_timeout;
            match tokio::time::timeout(after, job).await {
                Ok(j) => j,
                Err(_) => {
                    // The call may be stuck on a dead connection: the next one starts afresh.
                    self.0.forget();
                    return Err(RbdError::Timeout { what, after, health: self.health().await });
                }
            }
        } else {
            job.await
        };
        let r = joined
            .map_err(|e| RbdError::Refused { what: what.clone(), reason: format!("the librbd call failed: {e}") })?
            .map_err(|e: ffi::LoadError| RbdError::NoLibrary { what: what.clone(), reason: e.to_string() })?;
        r.map_err(|Fail { step, errno }| {
            if errno == -libc::ECANCELED && stop.is_stopped() {
                RbdError::Stopped { what }
            } else {
                RbdError::Lib { what, step, errno }
            }
        })
    }

    /// What the monitors report as wrong, asked on a fresh session, to explain a call that
    /// timed out (a full pool makes writes wait; the monitors still answer).
    async fn health(&self) -> Option<Health> {
        let shared = self.0.clone();
        let asked = tokio::task::spawn_blocking(move || {
            let api = Api::get().ok()?;
            shared.session(api).and_then(|s| s.rados.mon_command(HEALTH_COMMAND)).ok()
        });
        let out = tokio::time::timeout(HEALTH_TIMEOUT, asked).await.ok()?.ok()??;
        Health::parse(&out)
    }

    /// Like [`call`](Self::call), for a long operation reporting `(done, total)` through the
    /// closure `f` is given: percentages go to `on_progress` while it runs, and the closure
    /// answers `false` (abort) once `stop` fires.
    async fn call_with_progress<F>(
        &self,
        what: String,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
        f: F,
    ) -> Result<(), RbdError>
    where
        F: FnOnce(&Session, &(dyn Fn(u64, u64) -> bool + Sync)) -> Res<()> + Send + 'static,
    {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u8>();
        let stopped = stop.clone();
        // Nothing reported yet: the first callback always reports.
        let last = AtomicU8::new(u8::MAX);
        let fut = self.call(what, stop, false, move |s| {
            let progress = move |done: u64, total: u64| {
                let pct = (done.saturating_mul(100) / total.max(1)).min(100) as u8;
                if last.swap(pct, Ordering::Relaxed) != pct {
                    let _ = tx.send(pct);
                }
                !stopped.is_stopped()
            };
            f(s, &progress)
        });
        tokio::pin!(fut);
        loop {
            tokio::select! {
                r = &mut fut => {
                    while let Ok(pct) = rx.try_recv() {
                        on_progress(pct);
                    }
                    return r;
                }
                Some(pct) = rx.recv() => on_progress(pct),
            }
        }
    }
}

fn no_snap(p: &CephPath) -> Fail {
    Fail { step: format!("{} names no snapshot (pool/image@snap)", p.spec()), errno: -libc::EINVAL }
}

/// Opens `p` at its snapshot (if it names one) in the session.
fn with_image<T>(s: &Session, p: &CephPath, read_only: bool, f: impl FnOnce(&Image) -> Res<T>) -> Res<T> {
    let io = s.pool(&p.pool)?;
    let image = Image::open(&io, &p.image, p.snap.as_deref(), read_only)?;
    f(&image)
}

/// Opens the head of `p` (read-write) and runs one call on the snapshot `p` names.
fn on_snap(s: &Session, p: &CephPath, f: impl FnOnce(&Image, &str) -> Res<()>) -> Res<()> {
    let snap = p.snap.as_deref().ok_or_else(|| no_snap(p))?;
    with_image(s, &CephPath { snap: None, ..p.clone() }, false, |img| f(img, snap))
}

/// What `rbd du` reports for the open head: the data written since the last snapshot (all of
/// it without one), whole objects counted, the parent's not.
fn head_used(img: &Image) -> Res<u64> {
    let last_snap = img.snaps()?.pop();
    let used = AtomicU64::new(0);
    img.diff(last_snap.as_deref(), false, |_, len, exists| {
        if exists {
            used.fetch_add(len, Ordering::Relaxed);
        }
    })?;
    Ok(used.into_inner())
}

#[async_trait]
impl Rbd for RbdLib {
    fn qemu_name(&self, p: &CephPath) -> String {
        self.0.connection.qemu_name(p)
    }

    async fn info(&self, p: &CephPath, stop: &Stop) -> Result<ImageInfo, RbdError> {
        let p = p.clone();
        self.call(format!("info {}", p.spec()), stop, true, move |s| {
            with_image(s, &p, true, |img| {
                let stat = img.stat()?;
                let parent = img.parent()?.map(|pp| Parent { pool: pp.pool, image: pp.image, snapshot: pp.snapshot });
                Ok(ImageInfo { size: stat.size, object_size: stat.object_size, parent })
            })
        })
        .await
    }

    async fn used(&self, p: &CephPath, stop: &Stop) -> Result<u64, RbdError> {
        let head = CephPath { snap: None, ..p.clone() };
        self.call(format!("du {}", head.spec()), stop, true, move |s| with_image(s, &head, true, head_used)).await
    }

    /// Both from one open of the head (a clone's open also opens its parent, so each open
    /// saved is several round trips).
    async fn size_and_used(&self, p: &CephPath, stop: &Stop) -> Result<(u64, u64), RbdError> {
        if p.snap.is_some() {
            return Ok((self.info(p, stop).await?.size, self.used(p, stop).await?));
        }
        let head = p.clone();
        self.call(format!("info+du {}", head.spec()), stop, true, move |s| {
            with_image(s, &head, true, |img| Ok((img.stat()?.size, head_used(img)?)))
        })
        .await
    }

    async fn data_objects(&self, p: &CephPath, object_size: u64, stop: &Stop) -> Result<u64, RbdError> {
        let p = p.clone();
        let object_size = object_size.max(1);
        self.call(format!("diff {}", p.spec()), stop, true, move |s| {
            with_image(s, &p, true, |img| {
                let objects = Mutex::new(BTreeSet::new());
                img.diff(None, true, |offset, len, exists| {
                    if exists && len > 0 {
                        let mut set = objects.lock().unwrap_or_else(|e| e.into_inner());
                        set.extend(offset / object_size..=(offset + len - 1) / object_size);
                    }
                })?;
                Ok(objects.into_inner().unwrap_or_else(|e| e.into_inner()).len() as u64)
            })
        })
        .await
    }

    async fn create(&self, p: &CephPath, size: u64, stop: &Stop) -> Result<(), RbdError> {
        let (p, bytes) = (p.clone(), whole_mib(p, size)? << 20);
        self.call(format!("create {}", p.image_spec()), stop, true, move |s| s.pool(&p.pool)?.create(&p.image, bytes))
            .await
    }

    async fn resize(&self, p: &CephPath, size: u64, stop: &Stop) -> Result<(), RbdError> {
        let (head, bytes) = (CephPath { snap: None, ..p.clone() }, whole_mib(p, size)? << 20);
        self.call(format!("resize {}", head.spec()), stop, true, move |s| {
            with_image(s, &head, false, |img| img.grow(bytes))
        })
        .await
    }

    async fn clone_snapshot(&self, src: &CephPath, dst: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        let (src, dst) = (src.clone(), dst.clone());
        self.call(format!("clone {} {}", src.spec(), dst.image_spec()), stop, true, move |s| {
            let snap = src.snap.as_deref().ok_or_else(|| no_snap(&src))?;
            let parent_io = s.pool(&src.pool)?;
            s.pool(&dst.pool)?.clone_snapshot(&parent_io, &src.image, snap, &dst.image)
        })
        .await
    }

    async fn deep_copy(&self, src: &CephPath, dst: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        let (src, dst) = (src.clone(), dst.clone());
        let what = format!("deep cp {} {}", src.spec(), dst.image_spec());
        self.call_with_progress(what, stop, &mut |_| {}, move |s, progress| {
            let dest_io = s.pool(&dst.pool)?;
            with_image(s, &src, true, |img| img.deep_copy(&dest_io, &dst.image, progress))
        })
        .await
    }

    async fn flatten(
        &self,
        p: &CephPath,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> Result<(), RbdError> {
        let head = CephPath { snap: None, ..p.clone() };
        self.call_with_progress(format!("flatten {}", head.spec()), stop, on_progress, move |s, progress| {
            with_image(s, &head, false, |img| img.flatten(progress))
        })
        .await
    }

    async fn snap_create(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        let p = p.clone();
        self.call(format!("snap create {}", p.spec()), stop, true, move |s| on_snap(s, &p, |i, n| i.snap_create(n)))
            .await
    }

    async fn snap_protect(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        let p = p.clone();
        self.call(format!("snap protect {}", p.spec()), stop, true, move |s| on_snap(s, &p, |i, n| i.snap_protect(n)))
            .await
    }

    async fn snap_unprotect(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        let p = p.clone();
        self.call(format!("snap unprotect {}", p.spec()), stop, true, move |s| {
            on_snap(s, &p, |i, n| i.snap_unprotect(n))
        })
        .await
    }

    async fn snap_remove(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        let p = p.clone();
        self.call(format!("snap rm {}", p.spec()), stop, true, move |s| on_snap(s, &p, |i, n| i.snap_remove(n))).await
    }

    async fn snapshots(&self, p: &CephPath, stop: &Stop) -> Result<Vec<Snapshot>, RbdError> {
        let head = CephPath { snap: None, ..p.clone() };
        self.call(format!("snap ls {}", head.spec()), stop, true, move |s| {
            with_image(s, &head, true, |img| {
                img.snaps()?
                    .into_iter()
                    .map(|name| {
                        let protected = img.snap_is_protected(&name)?;
                        Ok(Snapshot { name, protected: Some(protected.to_string()) })
                    })
                    .collect()
            })
        })
        .await
    }

    async fn changed_since(&self, p: &CephPath, from_snap: &str, stop: &Stop) -> Result<Vec<(u64, u64)>, RbdError> {
        let (p, from) = (p.clone(), from_snap.to_owned());
        self.call(format!("diff --from-snap {from} {}", p.spec()), stop, true, move |s| {
            with_image(s, &p, true, |img| {
                let extents = Mutex::new(Vec::new());
                img.changes_since(&from, |offset, len, _| {
                    if len > 0 {
                        extents.lock().unwrap_or_else(|e| e.into_inner()).push((offset, len));
                    }
                })?;
                Ok(extents.into_inner().unwrap_or_else(|e| e.into_inner()))
            })
        })
        .await
    }

    async fn read_extents(
        &self,
        p: &CephPath,
        extents: Vec<Extent>,
        chunks: SyncSender<Chunk>,
        stop: &Stop,
    ) -> Result<(), RbdError> {
        let (p, halt) = (p.clone(), stop.clone());
        // Bounded by the task, like a flatten: its size is the data's.
        self.call(format!("read {}", p.spec()), stop, false, move |s| {
            with_image(s, &p, true, |img| {
                nbd::send_chunks(&extents, &chunks, &halt, |offset, buf| img.read(offset, buf)).map_err(|e| match e {
                    SendError::Read(f) => f,
                    SendError::Stopped => Fail { step: format!("reading {}", p.spec()), errno: -libc::ECANCELED },
                    SendError::WriterGone => Fail {
                        step: format!("handing the data of {} to the copy's writer, which stopped", p.spec()),
                        errno: -libc::EPIPE,
                    },
                })
            })
        })
        .await
    }

    async fn children(&self, p: &CephPath, stop: &Stop) -> Result<Vec<CephPath>, RbdError> {
        let p = p.clone();
        self.call(format!("children {}", p.spec()), stop, true, move |s| {
            if p.snap.is_none() {
                return Err(no_snap(&p));
            }
            let kids = with_image(s, &p, true, |img| img.children())?;
            Ok(kids.into_iter().map(|(pool, image)| CephPath { pool, image, snap: None }).collect())
        })
        .await
    }

    async fn remove(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        let p = p.clone();
        self.call(format!("rm {}", p.image_spec()), stop, true, move |s| s.pool(&p.pool)?.remove(&p.image)).await
    }

    /// Opens the image read-only, which adds no watch of its own.
    async fn watchers(&self, p: &CephPath, stop: &Stop) -> Result<usize, RbdError> {
        let head = CephPath { snap: None, ..p.clone() };
        self.call(format!("status {}", head.spec()), stop, true, move |s| {
            with_image(s, &head, true, |img| img.watchers().map(|w| w.len()))
        })
        .await
    }

    async fn drop_dead_watch(&self, p: &CephPath, stop: &Stop) -> Result<bool, RbdError> {
        let head = CephPath { snap: None, ..p.clone() };
        self.call(format!("drop the dead watch of {}", head.spec()), stop, true, move |s| {
            let (watchers, header) = with_image(s, &head, true, |img| Ok((img.watchers()?, img.header_object()?)))?;
            let watchers: Vec<&str> = watchers.iter().map(String::as_str).collect();
            if !crate::ceph::rbd::all_dead(&watchers, &s.rados.blocklisted()?) {
                return Ok(false);
            }
            s.pool(&head.pool)?.remove_object(&header)?;
            Ok(true)
        })
        .await
    }

    async fn trash_move(&self, p: &CephPath, delay_secs: u64, stop: &Stop) -> Result<(), RbdError> {
        let p = p.clone();
        self.call(format!("trash mv {}", p.image_spec()), stop, true, move |s| {
            s.pool(&p.pool)?.trash_move(&p.image, delay_secs)
        })
        .await
    }

    /// A monitor command on the agent's connection, never on the connection's own address; then
    /// waits for the OSD map that has the entry, so the next requests (which carry it) find the
    /// client's watches gone.
    async fn blocklist(&self, addr: &str, expiry: Duration, stop: &Stop) -> Result<(), RbdError> {
        let addr = addr.to_owned();
        self.call(format!("osd blocklist add {addr}"), stop, true, move |s| {
            if s.me.as_ref().is_some_and(|me| me.addr == addr) {
                let step = format!("{addr} is this agent's own connection; it is not blocklisted");
                return Err(Fail { step, errno: -libc::EINVAL });
            }
            match s.rados.mon_command(&blocklist_command("blocklist", &addr, expiry)) {
                // Clusters before Pacific know only the old name; the first error is the telling one.
                Err(f) if f.errno == -libc::EINVAL => {
                    s.rados.mon_command(&blocklist_command("blacklist", &addr, expiry)).map_err(|_| f)?
                }
                r => r?,
            };
            s.rados.wait_for_latest_osdmap()
        })
        .await
    }
}
