//! A Ceph cluster in memory, for unit tests of the RBD paths: images with a size, a parent
//! snapshot and snapshots of their own, and the rules the cluster enforces (a clone needs a
//! protected snapshot, a snapshot with clones cannot be unprotected, an image with snapshots
//! cannot be removed). Data is not kept: `used` counts what was written by creating, growing
//! and flattening.

use std::collections::BTreeMap;
use std::sync::mpsc::SyncSender;
use std::sync::Mutex;

use async_trait::async_trait;

use super::cluster::{Capacity, Cluster, ClusterError};
use super::path::CephPath;
use super::rbd::{ImageInfo, Parent, Rbd, RbdError, Snapshot};
use crate::qemu_img::nbd::{self, Chunk, Extent};
use crate::stop::Stop;

const OBJECT: u64 = 4 << 20;

#[derive(Debug, Clone, Default)]
struct Image {
    size: u64,
    used: u64,
    parent: Option<CephPath>,
    /// Snapshot name → protected.
    snaps: BTreeMap<String, bool>,
}

#[derive(Default)]
pub struct FakeRbd {
    images: Mutex<BTreeMap<String, Image>>,
    /// How many more removals fail because a (killed) client still watches the image.
    watched: std::sync::atomic::AtomicUsize,
    /// Reading usage fails (a cluster that stops answering half-way through a command).
    usage_fails: std::sync::atomic::AtomicBool,
    /// Images a client has open.
    open: Mutex<std::collections::BTreeSet<String>>,
    /// Images moved to the trash, with their delay.
    trash: Mutex<BTreeMap<String, u64>>,
    /// Watches of killed clients, by image (`pool/image`): the client's address. A watch goes
    /// once its client is blocklisted.
    dead_watches: Mutex<BTreeMap<String, String>>,
    /// Watches a blocklist does not drop (recorded on the header by a client killed while it
    /// registered them), by image: the client's address. They go with the header.
    stuck_watches: Mutex<BTreeMap<String, String>>,
    /// The addresses blocklisted so far.
    blocklisted: Mutex<Vec<String>>,
    /// Blocklisting is refused (a Ceph user without the right).
    blocklist_refused: std::sync::atomic::AtomicBool,
    /// How many times a snapshot's clones were listed (costly on a real cluster).
    listings: std::sync::atomic::AtomicUsize,
}

fn not_found(p: &CephPath) -> RbdError {
    RbdError::NotFound { what: p.spec() }
}

fn refused(p: &CephPath, reason: &str) -> RbdError {
    RbdError::Refused { what: p.spec(), reason: reason.into() }
}

impl FakeRbd {
    /// Every image, as `pool/image`.
    pub fn images(&self) -> Vec<String> {
        self.images.lock().unwrap().keys().cloned().collect()
    }

    /// The next `n` removals find the image watched, as after a client was killed with it open.
    pub fn watch_for(&self, n: usize) {
        self.watched.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// A client opens `image` (`pool/image`), as a running VM does.
    pub fn open(&self, image: &str) {
        self.open.lock().unwrap().insert(image.to_owned());
    }

    /// A client at `addr` was killed with `image` (`pool/image`) open: its watch stays until the
    /// client is blocklisted.
    pub fn watched_by_dead_client(&self, image: &str, addr: &str) {
        self.dead_watches.lock().unwrap().insert(image.to_owned(), addr.to_owned());
    }

    /// Like [`watched_by_dead_client`](Self::watched_by_dead_client), but the watch outlives
    /// the client's blocklisting (it was recorded while the client died).
    pub fn stuck_watch(&self, image: &str, addr: &str) {
        self.stuck_watches.lock().unwrap().insert(image.to_owned(), addr.to_owned());
    }

    /// The addresses blocklisted so far.
    pub fn blocklisted(&self) -> Vec<String> {
        self.blocklisted.lock().unwrap().clone()
    }

    /// From now on, blocklisting is refused.
    pub fn refuse_blocklist(&self) {
        self.blocklist_refused.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many times a snapshot's clones were listed so far.
    pub fn listings(&self) -> usize {
        self.listings.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The images in the trash (`pool/image`) and their delays.
    pub fn trash(&self) -> BTreeMap<String, u64> {
        self.trash.lock().unwrap().clone()
    }

    /// From now on, reading an image's usage fails.
    pub fn fail_usage(&self) {
        self.usage_fails.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// `image`'s parent snapshot, when it is a clone.
    pub fn parent(&self, image: &str) -> Option<String> {
        self.images.lock().unwrap().get(image).and_then(|i| i.parent.as_ref().map(CephPath::spec))
    }

    fn with<T>(&self, p: &CephPath, f: impl FnOnce(&mut Image) -> Result<T, RbdError>) -> Result<T, RbdError> {
        let mut map = self.images.lock().unwrap();
        let image = map.get_mut(&p.image_spec()).ok_or_else(|| not_found(p))?;
        if let Some(s) = &p.snap {
            if !image.snaps.contains_key(s) {
                return Err(not_found(p));
            }
        }
        f(image)
    }

    /// Takes the image out of the pool, as removing it or moving it to the trash does: refused
    /// while it has snapshots.
    fn take_out(&self, p: &CephPath) -> Result<(), RbdError> {
        let mut map = self.images.lock().unwrap();
        match map.get(&p.image_spec()) {
            None => Err(not_found(p)),
            Some(i) if !i.snaps.is_empty() => Err(refused(p, "the image has snapshots")),
            Some(_) => {
                map.remove(&p.image_spec());
                Ok(())
            }
        }
    }

    fn add(&self, p: &CephPath, image: Image) -> Result<(), RbdError> {
        let mut map = self.images.lock().unwrap();
        if map.contains_key(&p.image_spec()) {
            return Err(RbdError::Exists { what: p.spec() });
        }
        map.insert(p.image_spec(), image);
        Ok(())
    }
}

#[async_trait]
impl Rbd for FakeRbd {
    fn qemu_name(&self, p: &CephPath) -> String {
        format!("rbd:{}", p.spec())
    }

    async fn info(&self, p: &CephPath, _stop: &Stop) -> Result<ImageInfo, RbdError> {
        self.with(p, |i| {
            let parent = i.parent.as_ref().map(|s| Parent {
                pool: s.pool.clone(),
                image: s.image.clone(),
                snapshot: s.snap.clone().unwrap_or_default(),
            });
            Ok(ImageInfo { size: i.size, object_size: OBJECT, parent })
        })
    }

    async fn used(&self, p: &CephPath, _stop: &Stop) -> Result<u64, RbdError> {
        if self.usage_fails.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(refused(p, "the cluster did not answer"));
        }
        self.with(p, |i| Ok(i.used))
    }

    async fn data_objects(&self, p: &CephPath, object_size: u64, _stop: &Stop) -> Result<u64, RbdError> {
        let (own, parent) = self.with(p, |i| Ok((i.used, i.parent.clone())))?;
        let inherited = match parent {
            Some(s) => self.with(&s, |i| Ok(i.used))?,
            None => 0,
        };
        Ok(own.max(inherited).div_ceil(object_size))
    }

    async fn create(&self, p: &CephPath, size: u64, _stop: &Stop) -> Result<(), RbdError> {
        self.add(p, Image { size: size.div_ceil(1 << 20).max(1) << 20, ..Image::default() })
    }

    async fn resize(&self, p: &CephPath, size: u64, _stop: &Stop) -> Result<(), RbdError> {
        self.with(p, |i| {
            i.size = i.size.max(size.div_ceil(1 << 20) << 20);
            Ok(())
        })
    }

    async fn clone_snapshot(&self, src: &CephPath, dst: &CephPath, _stop: &Stop) -> Result<(), RbdError> {
        let snap = src.snap.clone().ok_or_else(|| refused(src, "a clone needs a snapshot"))?;
        let size = self.with(src, |i| match i.snaps.get(&snap) {
            Some(true) => Ok(i.size),
            _ => Err(refused(src, "the snapshot is not protected")),
        })?;
        self.add(dst, Image { size, parent: Some(src.clone()), ..Image::default() })
    }

    async fn deep_copy(&self, src: &CephPath, dst: &CephPath, _stop: &Stop) -> Result<(), RbdError> {
        let copy = self.with(src, |i| Ok(i.clone()))?;
        self.add(dst, copy)
    }

    async fn flatten(
        &self,
        p: &CephPath,
        _stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> Result<(), RbdError> {
        let parent = self.with(p, |i| Ok(i.parent.clone()))?;
        let inherited = match &parent {
            Some(s) => self.with(s, |i| Ok(i.used))?,
            None => 0,
        };
        self.with(p, |i| {
            i.used = i.used.max(inherited);
            i.parent = None;
            Ok(())
        })?;
        on_progress(100);
        Ok(())
    }

    async fn snap_create(&self, p: &CephPath, _stop: &Stop) -> Result<(), RbdError> {
        let snap = p.require_snap().map_err(|_| refused(p, "no snapshot name"))?.to_owned();
        let image = CephPath { snap: None, ..p.clone() };
        self.with(&image, |i| match i.snaps.insert(snap, false) {
            Some(_) => Err(RbdError::Exists { what: p.spec() }),
            None => Ok(()),
        })
    }

    async fn snap_protect(&self, p: &CephPath, _stop: &Stop) -> Result<(), RbdError> {
        let snap = p.snap.clone().unwrap_or_default();
        self.with(p, |i| {
            i.snaps.insert(snap, true);
            Ok(())
        })
    }

    async fn snap_unprotect(&self, p: &CephPath, stop: &Stop) -> Result<(), RbdError> {
        if !self.children(p, stop).await?.is_empty() {
            return Err(refused(p, "the snapshot has clones"));
        }
        let snap = p.snap.clone().unwrap_or_default();
        self.with(p, |i| {
            i.snaps.insert(snap, false);
            Ok(())
        })
    }

    async fn snap_remove(&self, p: &CephPath, _stop: &Stop) -> Result<(), RbdError> {
        let snap = p.snap.clone().unwrap_or_default();
        self.with(p, |i| match i.snaps.get(&snap) {
            Some(true) => Err(refused(p, "the snapshot is protected")),
            _ => {
                i.snaps.remove(&snap);
                Ok(())
            }
        })
    }

    async fn snapshots(&self, p: &CephPath, _stop: &Stop) -> Result<Vec<Snapshot>, RbdError> {
        let image = CephPath { snap: None, ..p.clone() };
        self.with(&image, |i| {
            Ok(i.snaps
                .iter()
                .map(|(name, protected)| Snapshot { name: name.clone(), protected: Some(protected.to_string()) })
                .collect())
        })
    }

    /// The fake keeps no data: nothing changed, once both snapshots exist.
    async fn changed_since(&self, p: &CephPath, from_snap: &str, _stop: &Stop) -> Result<Vec<(u64, u64)>, RbdError> {
        let snap = p.require_snap().map_err(|_| refused(p, "no snapshot name"))?.to_owned();
        let image = CephPath { snap: None, ..p.clone() };
        self.with(&image, |i| match [snap.as_str(), from_snap].iter().all(|s| i.snaps.contains_key(*s)) {
            true => Ok(Vec::new()),
            false => Err(not_found(p)),
        })
    }

    /// The fake keeps no data: zeros, from a thread of its own like librbd's reads.
    async fn read_extents(
        &self,
        p: &CephPath,
        extents: Vec<Extent>,
        chunks: SyncSender<Chunk>,
        stop: &Stop,
    ) -> Result<(), RbdError> {
        self.with(p, |_| Ok(()))?;
        let halt = stop.clone();
        let sent =
            tokio::task::spawn_blocking(move || nbd::send_chunks(&extents, &chunks, &halt, |_, _| Ok::<(), ()>(())));
        match sent.await {
            Ok(Ok(())) => Ok(()),
            _ => Err(refused(p, "the read was cut short")),
        }
    }

    async fn children(&self, p: &CephPath, _stop: &Stop) -> Result<Vec<CephPath>, RbdError> {
        self.listings.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let map = self.images.lock().unwrap();
        Ok(map
            .iter()
            .filter(|(_, i)| i.parent.as_ref() == Some(p))
            .filter_map(|(spec, _)| CephPath::parse(spec).ok())
            .collect())
    }

    async fn remove(&self, p: &CephPath, _stop: &Stop) -> Result<(), RbdError> {
        use std::sync::atomic::Ordering;
        if self.watched.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
            || self.dead_watches.lock().unwrap().contains_key(&p.image_spec())
            || self.stuck_watches.lock().unwrap().contains_key(&p.image_spec())
        {
            return Err(RbdError::Busy { what: p.spec() });
        }
        self.take_out(p)
    }

    async fn watchers(&self, p: &CephPath, _stop: &Stop) -> Result<usize, RbdError> {
        self.with(&CephPath { snap: None, ..p.clone() }, |_| Ok(()))?;
        let dead = self.dead_watches.lock().unwrap().contains_key(&p.image_spec());
        Ok(usize::from(self.open.lock().unwrap().contains(&p.image_spec())) + usize::from(dead))
    }

    async fn trash_move(&self, p: &CephPath, delay_secs: u64, _stop: &Stop) -> Result<(), RbdError> {
        self.take_out(p)?;
        self.trash.lock().unwrap().insert(p.image_spec(), delay_secs);
        Ok(())
    }

    async fn blocklist(&self, addr: &str, _expiry: std::time::Duration, _stop: &Stop) -> Result<(), RbdError> {
        if self.blocklist_refused.load(std::sync::atomic::Ordering::SeqCst) {
            let reason = "access denied (the user may not change the OSD map)".into();
            return Err(RbdError::Refused { what: format!("osd blocklist add {addr}"), reason });
        }
        self.dead_watches.lock().unwrap().retain(|_, owner| owner != addr);
        self.blocklisted.lock().unwrap().push(addr.to_owned());
        Ok(())
    }

    async fn drop_dead_watch(&self, p: &CephPath, _stop: &Stop) -> Result<bool, RbdError> {
        let mut stuck = self.stuck_watches.lock().unwrap();
        let dead = stuck.get(&p.image_spec()).is_some_and(|a| self.blocklisted.lock().unwrap().contains(a));
        if dead {
            stuck.remove(&p.image_spec());
        }
        Ok(dead)
    }
}

/// A cluster in memory: one monitor at 127.0.0.1:6789, the pool `rbd`, 100 GiB of which 60 free.
pub struct FakeCluster {
    pools: Mutex<Vec<String>>,
    objects: Mutex<Vec<String>>,
}

impl Default for FakeCluster {
    fn default() -> Self {
        FakeCluster { pools: Mutex::new(vec!["rbd".into()]), objects: Mutex::default() }
    }
}

impl FakeCluster {
    pub fn pools_now(&self) -> Vec<String> {
        self.pools.lock().unwrap().clone()
    }

    /// The objects written, as `pool/name`.
    pub fn objects(&self) -> Vec<String> {
        self.objects.lock().unwrap().clone()
    }
}

#[async_trait]
impl Cluster for FakeCluster {
    async fn capacity(&self) -> Result<Capacity, ClusterError> {
        Ok(Capacity { total: 100 << 30, available: 60 << 30 })
    }

    async fn fsid(&self) -> Result<String, ClusterError> {
        Ok("5e2fb1c8-0c37-4c2b-9d6e-6f0e8b7b1a11".into())
    }

    async fn pools(&self) -> Result<Vec<String>, ClusterError> {
        Ok(self.pools_now())
    }

    async fn create_pool(&self, name: &str) -> Result<(), ClusterError> {
        self.pools.lock().unwrap().push(name.to_owned());
        Ok(())
    }

    async fn mon_addrs(&self) -> Result<Vec<String>, ClusterError> {
        Ok(vec!["v2:127.0.0.1:3300/0".into(), "v1:127.0.0.1:6789/0".into()])
    }

    async fn put_object(&self, pool: &str, name: &str) -> Result<(), ClusterError> {
        if !self.pools_now().iter().any(|p| p == pool) {
            return Err(ClusterError::Refused {
                what: format!("rados -p {pool} put {name}"),
                reason: "no such pool".into(),
            });
        }
        self.objects.lock().unwrap().push(format!("{pool}/{name}"));
        Ok(())
    }

    async fn user_key(&self, user: &str) -> Result<String, ClusterError> {
        Ok(format!("AQ{user}fakekey=="))
    }
}
