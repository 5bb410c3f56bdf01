//! `/ceph/primarystorage/*`: RBD images, snapshots and clones. ZStack serves these from a
//! separate agent on the monitors; this agent serves them on its own port.

use crate::app::App;
use crate::ceph::path::CephPath;
use crate::error::{AgentError, AgentResult};
use crate::ops::undo::UndoStep;
use crate::tasks::TaskCtx;
use crate::wire::ceph::*;
use crate::wire::Empty;

fn image(p: &str) -> AgentResult<CephPath> {
    let p = CephPath::parse(p)?;
    p.require_image()?;
    Ok(p)
}

fn snapshot(p: &str) -> AgentResult<CephPath> {
    let p = CephPath::parse(p)?;
    p.require_snap()?;
    Ok(p)
}

async fn describe(app: &App, ctx: &TaskCtx, p: &CephPath) -> AgentResult<ImageRsp> {
    let size = app.rbd.info(p, &ctx.stop).await?.size;
    let actual_size = app.rbd.used(p, &ctx.stop).await?;
    Ok(ImageRsp { install_path: p.to_string(), size, actual_size })
}

async fn refuse_existing(app: &App, ctx: &TaskCtx, p: &CephPath) -> AgentResult<()> {
    if app.rbd.exists(p, &ctx.stop).await? {
        return Err(AgentError::conflict(format!("{p} already exists; delete it first or choose another path")));
    }
    Ok(())
}

pub async fn create_empty(app: &App, ctx: &TaskCtx, cmd: CreateEmptyCmd) -> AgentResult<ImageRsp> {
    let p = image(&cmd.install_path)?;
    if cmd.size == 0 {
        return Err(AgentError::invalid("size must be greater than 0"));
    }
    let _lock = app.volume_locks.write_rbd(&p).await;
    if cmd.skip_if_existing && app.rbd.exists(&p, &ctx.stop).await? {
        return describe(app, ctx, &p).await;
    }
    refuse_existing(app, ctx, &p).await?;
    super::journaled_make(app, ctx, &cmd.install_path, async {
        app.rbd.create(&p, cmd.size, &ctx.stop).await?;
        describe(app, ctx, &p).await
    })
    .await
}

/// `rbd clone` of a snapshot; a v1-format cluster needs the snapshot protected first, which is
/// metadata only and done here when missing.
pub async fn clone(app: &App, ctx: &TaskCtx, cmd: CopyCmd) -> AgentResult<ImageRsp> {
    let src = snapshot(&cmd.src_path)?;
    let dst = image(&cmd.dst_path)?;
    let _lock = app.volume_locks.write_rbd(&dst).await;
    refuse_existing(app, ctx, &dst).await?;
    let snap = src.require_snap()?.to_owned();
    let snaps = app.rbd.snapshots(&src, &ctx.stop).await?;
    let found = snaps
        .iter()
        .find(|s| s.name == snap)
        .ok_or_else(|| AgentError::not_found(format!("snapshot {src} does not exist")))?;
    if found.protected.as_deref() != Some("true") {
        app.rbd.snap_protect(&src, &ctx.stop).await?;
    }
    super::journaled_make(app, ctx, &cmd.dst_path, async {
        app.rbd.clone_snapshot(&src, &dst, &ctx.stop).await?;
        // ZStack reports the source's size for a clone.
        let mut rsp = describe(app, ctx, &dst).await?;
        rsp.size = app.rbd.info(&src, &ctx.stop).await?.size.max(rsp.size);
        Ok(rsp)
    })
    .await
}

pub async fn flatten(app: &App, ctx: &TaskCtx, cmd: PathCmd) -> AgentResult<Empty> {
    let p = image(&cmd.path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    let stopped = |e| ctx.stop.or_error(e, "flattening the image");
    if app.rbd.info(&p, &ctx.stop).await.map_err(stopped)?.parent.is_some() {
        app.rbd.flatten(&p, &ctx.stop, &mut |pct| ctx.progress(pct, "flattening")).await.map_err(stopped)?;
    }
    Ok(Empty {})
}

pub async fn snapshot_create(app: &App, ctx: &TaskCtx, cmd: SnapshotCmd) -> AgentResult<ImageRsp> {
    let p = snapshot(&cmd.snapshot_path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    // A snapshot this command takes goes again if it fails (its size cannot be read, a cancel);
    // one that was there before is left alone.
    let snap = p.require_snap()?;
    let new = !app.rbd.snapshots(&p, &ctx.stop).await?.iter().any(|s| s.name == snap);
    let removal = new.then(|| UndoStep::RemoveRbdSnapshot { path: p.to_string() });
    crate::ops::undo::journaled(app, &ctx.task_id, removal, async {
        match app.rbd.snap_create(&p, &ctx.stop).await {
            Err(e) if e.is_exists() && cmd.skip_on_existing => {}
            other => other?,
        }
        describe(app, ctx, &p).await
    })
    .await
}

pub async fn snapshot_protect(app: &App, ctx: &TaskCtx, cmd: SnapshotCmd) -> AgentResult<Empty> {
    let p = snapshot(&cmd.snapshot_path)?;
    match app.rbd.snap_protect(&p, &ctx.stop).await {
        Err(_) if cmd.ignore_error => Ok(Empty {}),
        other => other.map(|_| Empty {}).map_err(Into::into),
    }
}

/// Refuses while clones still depend on the snapshot.
async fn unprotect_if_unused(app: &App, ctx: &TaskCtx, p: &CephPath) -> AgentResult<()> {
    let kids = app.rbd.children(p, &ctx.stop).await?;
    if !kids.is_empty() {
        let names: Vec<String> = kids.iter().map(ToString::to_string).collect();
        return Err(AgentError::conflict(format!(
            "snapshot {p} still has clones {names:?}; flatten or delete them first"
        )));
    }
    let snap = p.require_snap()?;
    let protected =
        app.rbd.snapshots(p, &ctx.stop).await?.iter().any(|s| s.name == snap && s.protected.as_deref() == Some("true"));
    if protected {
        app.rbd.snap_unprotect(p, &ctx.stop).await?;
    }
    Ok(())
}

pub async fn snapshot_unprotect(app: &App, ctx: &TaskCtx, cmd: SnapshotCmd) -> AgentResult<Empty> {
    let p = snapshot(&cmd.snapshot_path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    unprotect_if_unused(app, ctx, &p).await.map(|_| Empty {})
}

pub async fn snapshot_delete(app: &App, ctx: &TaskCtx, cmd: SnapshotCmd) -> AgentResult<Empty> {
    let p = snapshot(&cmd.snapshot_path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    unprotect_if_unused(app, ctx, &p).await?;
    app.rbd.snap_remove(&p, &ctx.stop).await?;
    Ok(Empty {})
}

/// A full, independent copy; a failed or killed copy leaves no destination image.
pub async fn copy(app: &App, ctx: &TaskCtx, cmd: CopyCmd) -> AgentResult<ImageRsp> {
    let src = CephPath::parse(&cmd.src_path)?;
    let dst = image(&cmd.dst_path)?;
    let _lock = app.volume_locks.write_rbd(&dst).await;
    app.rbd.info(&src, &ctx.stop).await?;
    refuse_existing(app, ctx, &dst).await?;
    super::journaled_make(app, ctx, &cmd.dst_path, async {
        app.rbd.deep_copy(&src, &dst, &ctx.stop).await.map_err(|e| ctx.stop.or_error(e, "copying the image"))?;
        describe(app, ctx, &dst).await
    })
    .await
}

pub async fn get_size(app: &App, ctx: &TaskCtx, cmd: InstallPathCmd) -> AgentResult<ImageRsp> {
    let p = image(&cmd.install_path)?;
    let _lock = app.volume_locks.read_rbd(&p).await;
    describe(app, ctx, &p).await
}

/// Deletes an image; one that is already gone is success. Its backup snapshots go with it
/// (unless a clone depends on one); its other snapshots must be deleted first;
/// an image a client has open is refused with `inUse` (the MN's DeleteRsp). With
/// `expirationTime` it goes to the pool's trash for that many seconds instead.
pub async fn delete(app: &App, ctx: &TaskCtx, cmd: DeleteCmd) -> AgentResult<Empty> {
    let p = image(&cmd.install_path)?;
    let _lock = app.volume_locks.write_rbd(&p).await;
    if !app.rbd.exists(&p, &ctx.stop).await? {
        return Ok(Empty {});
    }
    let snaps = app.rbd.snapshots(&p, &ctx.stop).await?;
    let backup = |name: &str| name.starts_with(crate::ops::volumes::BACKUP_SNAPSHOT_PREFIX);
    let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).filter(|n| !backup(n)).collect();
    if !names.is_empty() {
        return Err(AgentError::conflict(format!("{p} still has snapshots {names:?}; delete them first")));
    }
    if app.rbd.watchers(&p, &ctx.stop).await? > 0 {
        let e = AgentError::conflict(format!("unable to delete {p}: the volume is in use; stop the VM using it first"));
        return Err(e.with_field("inUse", true));
    }
    // A backup point's snapshot goes with its image (the group's next point compares).
    crate::ops::volumes::drop_backup_snapshots(app.rbd.as_ref(), &p, &ctx.stop).await?;
    let parent = app.rbd.info(&p, &ctx.stop).await?.parent;
    if cmd.expiration_time > 0 {
        app.rbd.trash_move(&p, cmd.expiration_time, &ctx.stop).await?;
    } else {
        app.rbd.remove(&p, &ctx.stop).await?;
    }
    // A snapshot this agent took for clones goes with its last clone.
    if let Some(parent) = parent.filter(|pa| pa.snapshot.starts_with(crate::ops::volumes::CLONE_SNAPSHOT_PREFIX)) {
        let snap = CephPath { pool: parent.pool, image: parent.image, snap: Some(parent.snapshot) };
        crate::ops::volumes::drop_unused_snapshot(app.rbd.as_ref(), &snap.to_string()).await;
    }
    Ok(Empty {})
}

pub async fn get_backing_chain(app: &App, ctx: &TaskCtx, cmd: BackingChainCmd) -> AgentResult<BackingChainRsp> {
    let mut current = image(&cmd.volume_path)?;
    let mut backing_chain = Vec::new();
    let mut total_size = 0;
    for _ in 0..64 {
        let Some(parent) = app.rbd.info(&current, &ctx.stop).await?.parent else { break };
        let snap = CephPath { pool: parent.pool, image: parent.image, snap: Some(parent.snapshot) };
        total_size += app.rbd.used(&snap, &ctx.stop).await?;
        backing_chain.push(snap.to_string());
        current = CephPath { snap: None, ..snap };
    }
    Ok(BackingChainRsp { backing_chain, total_size })
}

/// `/ceph/primarystorage/connect`: the cluster answers (its capacity goes with every reply).
pub async fn connect(app: &App, _ctx: &TaskCtx, _cmd: ConnectCmd) -> AgentResult<Empty> {
    app.ceph.fsid().await?;
    Ok(Empty {})
}

/// A pool or object name as the MN sends it: no path separators or option syntax.
fn rados_name<'a>(what: &str, s: &'a str) -> AgentResult<&'a str> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(s)
    } else {
        Err(AgentError::invalid(format!("{what} {s:?} must be 1-255 letters, digits, '.', '_', ':' or '-'")))
    }
}

/// `/ceph/primarystorage/ping`: the monitor the MN knows is still in the monitor map, and the
/// cluster takes a write (a heartbeat object in the pool); failures are named as the MN's
/// `PingOperationFailure`.
pub async fn ping(app: &App, _ctx: &TaskCtx, cmd: PingCmd) -> AgentResult<PingRsp> {
    let (pool, object) = cmd
        .test_image_path
        .split_once('/')
        .ok_or_else(|| AgentError::invalid(format!("testImagePath {:?} must be pool/object", cmd.test_image_path)))?;
    let (pool, object) = (rados_name("pool", pool)?, rados_name("object", object)?);
    let failed = |failure: PingFailure, e: AgentError| {
        e.with_field("failure", serde_json::to_value(failure).unwrap_or_default())
    };
    if cmd.mon_addr.is_empty() || !app.ceph.mon_addrs().await?.iter().any(|a| a.contains(&cmd.mon_addr)) {
        let e = AgentError::failed(
            "the monitor address changed",
            format!("{} is no longer in the monitor map; reconnect the Ceph primary storage", cmd.mon_addr),
        );
        return Err(failed(PingFailure::MonAddrChanged, e));
    }
    if let Err(e) = app.ceph.put_object(pool, object).await {
        return Err(failed(PingFailure::UnableToCreateFile, e.into()));
    }
    Ok(PingRsp { operation_failure: false, failure: None })
}

/// `/ceph/primarystorage/init`: every pool exists afterwards (a `predefined` one must already),
/// and the answer carries the cluster's fsid and, unless `nocephx`, the hosts' cephx key.
pub async fn init(app: &App, _ctx: &TaskCtx, cmd: InitCmd) -> AgentResult<InitRsp> {
    for p in &cmd.pools {
        rados_name("pool", &p.name)?;
    }
    let existing = app.ceph.pools().await?;
    if let Some(p) = cmd.pools.iter().find(|p| p.predefined && !existing.contains(&p.name)) {
        return Err(AgentError::not_found(format!(
            "cannot find pool {} in the Ceph cluster; a predefined pool must be created by hand",
            p.name
        )));
    }
    for p in cmd.pools.iter().filter(|p| !existing.contains(&p.name)) {
        app.ceph.create_pool(&p.name).await?;
    }
    let user_key = if cmd.nocephx { None } else { Some(app.ceph.user_key("zstack").await?) };
    Ok(InitRsp { fsid: app.ceph.fsid().await?, user_key, manufacturer: "open-source" })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::error::ErrorKind;
    use crate::stop::Stop;
    use crate::testing::TestHost;

    /// Runs `path` as the HTTP layer does (decode, handler, encode) and returns the envelope.
    async fn call(h: &TestHost, path: &str, body: Value) -> Value {
        let route = crate::http::routes::find(path).unwrap();
        let r = (route.handler)(h.app.clone(), crate::tasks::TaskCtx::detached(path), body).await;
        crate::wire::envelope(&r)
    }

    #[tokio::test]
    async fn connect_ping_and_init_answer_as_zstacks_ceph_agent_with_the_capacity() {
        let h = TestHost::start();
        let r = call(&h, "/ceph/primarystorage/connect", json!({"monUuid": "m"})).await;
        assert_eq!((r["success"].as_bool(), r["totalCapacity"].as_u64()), (Some(true), Some(100 << 30)), "{r}");
        assert_eq!(r["availableCapacity"], 60u64 << 30);

        let ping = |addr: &str, path: &str| json!({"monAddr": addr, "testImagePath": path, "monUuid": "m"});
        let r = call(&h, "/ceph/primarystorage/ping", ping("127.0.0.1:6789", "rbd/zshb.ps.u.127.0.0.1")).await;
        assert_eq!((r["success"].as_bool(), &r["operationFailure"]), (Some(true), &json!(false)), "{r}");
        assert_eq!(h.ceph.objects(), ["rbd/zshb.ps.u.127.0.0.1"], "the heartbeat object is written");
        let r = call(&h, "/ceph/primarystorage/ping", ping("10.9.9.9:6789", "rbd/o")).await;
        assert_eq!((r["success"].as_bool(), r["failure"].as_str()), (Some(false), Some("MonAddrChanged")), "{r}");
        let r = call(&h, "/ceph/primarystorage/ping", ping("127.0.0.1:6789", "nopool/o")).await;
        assert_eq!(r["failure"], "UnableToCreateFile", "{r}");
        for bad in ["rbd", "rbd/../x", "rbd/-x", "/o"] {
            let r = call(&h, "/ceph/primarystorage/ping", ping("127.0.0.1:6789", bad)).await;
            assert_eq!(r["errorCode"]["code"], ErrorKind::InvalidArgument.code(), "{bad}: {r}");
        }

        let pools = |p: Value| json!({"pools": p, "monUuid": "m", "fsId": "x"});
        let r = call(
            &h,
            "/ceph/primarystorage/init",
            pools(json!([{"name": "gone", "predefined": true}, {"name": "new"}])),
        )
        .await;
        assert_eq!(r["success"], false, "a predefined pool must exist: {r}");
        assert_eq!(h.ceph.pools_now(), ["rbd"], "and nothing is created then");
        let r =
            call(&h, "/ceph/primarystorage/init", pools(json!([{"name": "rbd", "predefined": true}, {"name": "new"}])))
                .await;
        assert_eq!((r["success"].as_bool(), r["manufacturer"].as_str()), (Some(true), Some("open-source")), "{r}");
        assert!(r["fsid"].as_str().is_some_and(|f| !f.is_empty()) && r["userKey"].as_str().is_some(), "{r}");
        assert_eq!(h.ceph.pools_now(), ["rbd", "new"]);
        let r = call(&h, "/ceph/primarystorage/init", json!({"pools": [], "nocephx": true})).await;
        assert!(r.get("userKey").is_none(), "no key without cephx: {r}");
    }

    #[tokio::test]
    async fn delete_refuses_an_image_in_use_and_trashes_with_an_expiration_time() {
        let h = TestHost::start();
        let stop = Stop::new();
        for image in ["a", "b"] {
            h.app
                .rbd
                .create(&crate::ceph::path::CephPath::parse(&format!("ceph://rbd/{image}")).unwrap(), 1 << 20, &stop)
                .await
                .unwrap();
        }
        h.rbd.open("rbd/a");
        let r = call(&h, "/ceph/primarystorage/delete", json!({"installPath": "ceph://rbd/a"})).await;
        assert_eq!((r["success"].as_bool(), r["inUse"].as_bool()), (Some(false), Some(true)), "{r}");
        assert!(h.rbd.images().contains(&"rbd/a".to_owned()), "the image in use is kept");
        let r = call(&h, "/ceph/primarystorage/delete", json!({"installPath": "ceph://rbd/b", "expirationTime": 3600}))
            .await;
        assert_eq!(r["success"], true, "{r}");
        assert_eq!(h.rbd.trash().get("rbd/b"), Some(&3600), "moved to the trash for an hour");
        assert!(!h.rbd.images().contains(&"rbd/b".to_owned()));
    }

    #[tokio::test]
    async fn the_backing_chain_is_asked_by_volume_path() {
        let h = TestHost::start();
        let stop = Stop::new();
        let p = |s: &str| crate::ceph::path::CephPath::parse(s).unwrap();
        h.app.rbd.create(&p("ceph://rbd/base"), 1 << 20, &stop).await.unwrap();
        h.app.rbd.snap_create(&p("ceph://rbd/base@s"), &stop).await.unwrap();
        h.app.rbd.snap_protect(&p("ceph://rbd/base@s"), &stop).await.unwrap();
        h.app.rbd.clone_snapshot(&p("ceph://rbd/base@s"), &p("ceph://rbd/vol"), &stop).await.unwrap();
        let r = call(&h, "/ceph/primarystorage/volume/getbackingchain", json!({"volumePath": "ceph://rbd/vol"})).await;
        assert_eq!(r["backingChain"], json!(["ceph://rbd/base@s"]), "{r}");
    }
}
