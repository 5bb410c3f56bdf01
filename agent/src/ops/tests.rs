//! Unit tests of the VM operations on fakes of the hypervisor, qemu-img and RBD: each
//! operation's effect, its rollback when a hypervisor or qemu-img call fails, a kill at every such
//! call and after every journaled step followed by crash recovery, and operations racing on one
//! VM. No daemon and no external program is needed.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::error::AgentResult;
use crate::libvirt::domains::VmState;
use crate::ops::undo::kill_point;
use crate::tasks::TaskCtx;
use crate::testing::{backing, same_content, uuid, write, TestHost};
use crate::wire::decode_native;

fn cmd<T: crate::wire::native::NativeCommand>(v: Value) -> T {
    decode_native(&v).unwrap()
}

/// The files a host may hold: cached images, and every chain file of every recorded VM and of
/// every snapshot group. Every VM's record names existing, sound files, and a VM with a domain
/// runs on exactly the files its record names.
async fn assert_consistent(h: &TestHost) {
    let mut wanted: BTreeSet<PathBuf> = BTreeSet::new();
    let chain = |top: PathBuf, wanted: &mut BTreeSet<PathBuf>| {
        let mut cur = Some(top);
        while let Some(p) = cur {
            h.check(&p);
            cur = backing(&p.display().to_string());
            wanted.insert(p);
        }
    };
    let records = h.app.config.state_dir.join("vms");
    for e in std::fs::read_dir(&records).into_iter().flatten().flatten() {
        let vm = e.file_name().to_string_lossy().trim_end_matches(".json").to_owned();
        // RBD volumes are checked by `assert_rbd_consistent`.
        let recorded: Vec<String> = h.recorded(&vm).await.into_iter().filter(|p| !p.starts_with("ceph://")).collect();
        for f in &recorded {
            assert!(std::path::Path::new(f).exists(), "VM {vm}'s record names {f}, which is gone");
            chain(PathBuf::from(f), &mut wanted);
        }
        if let Some(nvram) = h.nvram(&vm).await {
            assert!(nvram.is_file(), "VM {vm}'s record names NVRAM {}, which is gone", nvram.display());
            wanted.insert(nvram);
        }
        if h.hv.domain(&vm).is_some() {
            assert_eq!(h.domain_files(&vm), recorded, "VM {vm} runs on other files than its record names");
        }
    }
    let groups = h.app.config.state_dir.join("snapshot-groups");
    for e in std::fs::read_dir(&groups).into_iter().flatten().flatten() {
        let g: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        for s in g["snapshots"].as_array().unwrap() {
            chain(PathBuf::from(s["snapshotPath"].as_str().unwrap()), &mut wanted);
        }
    }
    let stray: Vec<PathBuf> =
        h.files().into_iter().filter(|f| !wanted.contains(f) && !f.starts_with(h.root.join("imagecache"))).collect();
    assert!(stray.is_empty(), "files no VM, clone or group references: {stray:?}");
    for d in h.hv.domain_names() {
        assert!(h.app.vms.is_known(&d), "domain {d} has no record");
    }
}

#[tokio::test]
async fn create_makes_the_vm_and_a_failed_start_leaves_nothing() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    assert_eq!(h.hv.domain(&vm).unwrap().state, VmState::Running);
    let files = h.recorded(&vm).await;
    assert!(backing(&files[0]).is_some_and(|b| b.starts_with(h.root.join("imagecache"))), "a thin root");
    assert_consistent(&h).await;

    let before = h.files();
    h.faults.fail("create");
    let (other, image) = (uuid(), h.image("i2", 1 << 20).await);
    let before = before.into_iter().chain([PathBuf::from(&image)]).collect::<BTreeSet<_>>();
    let e = crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(h.create_cmd(&other, &image)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("start domain"), "{e}");
    assert_eq!(h.files(), before, "a failed create leaves no volume");
    assert!(h.hv.domain(&other).is_none() && !h.app.vms.is_known(&other), "nor a domain or record");
}

#[tokio::test]
async fn a_linked_clone_freezes_the_source_and_its_record_follows() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let old = h.recorded(&vm).await;
    let rsp = crate::ops::clone::clone(
        &h.app,
        &TaskCtx::detached("/vm/clone"),
        cmd(json!({"vmUuid": vm, "names": ["a", "b"], "full": true})),
    )
    .await
    .unwrap();
    assert_eq!(rsp.number_of_cloned_vm, 2, "{:?}", rsp.inventories);
    let now = h.recorded(&vm).await;
    for (o, n) in old.iter().zip(&now) {
        assert_ne!(o, n, "the source runs on a new top");
        assert_eq!(backing(n).unwrap(), PathBuf::from(o), "on the frozen file");
    }
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_failing_clone_leaves_nothing_of_itself() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    h.faults.fail("defineXML");
    let rsp =
        crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(json!({"vmUuid": vm, "names": ["a"]})))
            .await
            .unwrap();
    assert_eq!(rsp.number_of_cloned_vm, 0);
    assert!(rsp.inventories[0]["message"].as_str().unwrap().contains("defineXML failed"), "{:?}", rsp.inventories);
    assert_consistent(&h).await;
}

#[tokio::test]
async fn change_image_switches_a_stopped_vm_or_changes_nothing() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    h.app.libvirt.destroy(&vm).await.unwrap();
    let (old, image) = (h.recorded(&vm).await, h.image("other", 8 << 20).await);
    let c = || cmd(json!({"vmUuid": vm, "imagePath": image}));
    h.faults.fail("defineXML");
    crate::ops::change_image::change_image(&h.app, &TaskCtx::detached("/vm/changeimage"), c()).await.unwrap_err();
    assert_eq!(h.recorded(&vm).await, old, "a failed change keeps the old root");
    assert_consistent(&h).await;

    let h2 = TestHost::start();
    let vm = h2.running_vm().await;
    h2.app.libvirt.destroy(&vm).await.unwrap();
    let old = h2.recorded(&vm).await;
    let image = h2.image("other", 8 << 20).await;
    let c = cmd(json!({"vmUuid": vm, "imagePath": image}));
    crate::ops::change_image::change_image(&h2.app, &TaskCtx::detached("/vm/changeimage"), c).await.unwrap();
    let now = h2.recorded(&vm).await;
    assert_ne!(now[0], old[0]);
    assert!(!std::path::Path::new(&old[0]).exists(), "the old root is gone once the switch is done");
    assert_eq!(backing(&now[0]).unwrap(), PathBuf::from(&image));
    assert_consistent(&h2).await;
}

#[tokio::test]
async fn flatten_cuts_volumes_loose_live_and_offline_with_the_same_content() {
    for running in [true, false] {
        let h = TestHost::start();
        let vm = h.running_vm().await;
        if !running {
            h.app.libvirt.destroy(&vm).await.unwrap();
        }
        let root = h.recorded(&vm).await.remove(0);
        let image = backing(&root).unwrap().display().to_string();
        let dry = crate::ops::flatten::flatten(
            &h.app,
            &TaskCtx::detached("/vm/flatten"),
            cmd(json!({"vmUuid": vm, "dryRun": true})),
        )
        .await
        .unwrap();
        assert!(dry["totalBytesToAdd"].as_u64().unwrap() >= 64 << 10, "{dry}");
        assert!(backing(&root).is_some(), "a dry run changes nothing");
        crate::ops::flatten::flatten(&h.app, &TaskCtx::detached("/vm/flatten"), cmd(json!({"vmUuid": vm})))
            .await
            .unwrap();
        assert!(backing(&root).is_none(), "running: {running}");
        assert!(same_content(&root, &image), "the flattened root reads as before");
        assert_consistent(&h).await;
    }
}

#[tokio::test]
async fn a_backup_of_a_running_vm_commits_its_temporary_tops_back() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let files = h.recorded(&vm).await;
    write(&files[1], 0, 0x11);
    let rsp =
        crate::ops::backup::backup(&h.app, &TaskCtx::detached("/vm/backup"), cmd(json!({"vmUuid": vm}))).await.unwrap();
    assert_eq!(h.recorded(&vm).await, files, "the VM is back on its own files");
    let point = PathBuf::from(&rsp.group_path).join(&rsp.manifest.volumes[1].chain[0].file);
    assert!(same_content(&point.display().to_string(), &files[1]));
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_cancelled_flatten_leaves_the_volume_as_it_was() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    h.app.libvirt.destroy(&vm).await.unwrap();
    let root = h.recorded(&vm).await.remove(0);
    let before = std::fs::read(&root).unwrap();
    let ctx = TaskCtx::detached("/vm/flatten");
    ctx.stop.fire(crate::stop::StopReason::Cancelled);
    crate::ops::flatten::flatten(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap_err();
    assert_eq!(std::fs::read(&root).unwrap(), before, "the volume is byte for byte as it was");
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_failed_snapshot_group_or_backup_changes_nothing() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let (files, before) = (h.recorded(&vm).await, h.files());
    h.faults.fail("snapshotCreateXML");
    let ctx = TaskCtx::detached("/vm/snapshotgroup/take");
    crate::ops::snapshot_group::take(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap_err();
    let ctx = TaskCtx::detached("/vm/backup");
    crate::ops::backup::backup(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap_err();
    assert_eq!((h.recorded(&vm).await, h.files()), (files, before), "same record, same files");
    assert_eq!(h.domain_files(&vm), h.recorded(&vm).await);
    let groups = h.app.config.state_dir.join("snapshot-groups");
    assert_eq!(std::fs::read_dir(groups).map(|d| d.count()).unwrap_or(0), 0, "no group recorded");
    let backups = std::fs::read_dir(h.dir.path().join("backup")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(backups, 0, "no backup group left");
}

/// Runs operation `op` on the host's VM `vm` (a create makes a new VM from `image`, a change of
/// image puts `image` under `vm`); whether it made what it was asked for.
async fn run_op(h: &TestHost, op: &str, vm: &str, image: &str) -> bool {
    let ctx = TaskCtx::detached(op);
    let app = &h.app;
    match op {
        "/vm/create" => {
            let c = cmd(h.create_cmd(&uuid(), image));
            crate::ops::create::create(app, &ctx, c).await.is_ok()
        }
        "/vm/clone" => {
            let c = cmd(json!({"vmUuid": vm, "names": ["a", "b"], "full": true}));
            crate::ops::clone::clone(app, &ctx, c).await.is_ok_and(|r| r.number_of_cloned_vm == 2)
        }
        "/vm/snapshotgroup/take" => {
            crate::ops::snapshot_group::take(app, &ctx, cmd(json!({"vmUuid": vm}))).await.is_ok()
        }
        "/vm/backup" => crate::ops::backup::backup(app, &ctx, cmd(json!({"vmUuid": vm}))).await.is_ok(),
        "/vm/flatten" => crate::ops::flatten::flatten(app, &ctx, cmd(json!({"vmUuid": vm}))).await.is_ok(),
        "/vm/changeimage" => {
            let c = cmd(json!({"vmUuid": vm, "imagePath": image}));
            crate::ops::change_image::change_image(app, &ctx, c).await.is_ok()
        }
        _ => unreachable!("{op}"),
    }
}

#[tokio::test]
async fn an_operation_whose_qemu_img_call_fails_changes_nothing() {
    let calls = ["qemu-img create", "qemu-img convert", "qemu-img rebase", "qemu-img commit", "qemu-img info"];
    let ops = ["/vm/create", "/vm/clone", "/vm/snapshotgroup/take", "/vm/backup", "/vm/flatten", "/vm/changeimage"];
    let mut failed = BTreeSet::new();
    for call in calls {
        for op in ops {
            for stopped in [false, true] {
                let h = TestHost::start();
                let vm = h.running_vm().await;
                if stopped {
                    h.app.libvirt.destroy(&vm).await.unwrap();
                }
                let image = h.image("other", 8 << 20).await;
                let (record, files) = (h.recorded(&vm).await, h.files());
                h.faults.fail(call);
                // A clone reports each clone's failure; the source stays frozen on its new top
                // (recorded, and named in the answer), which is checked for consistency below.
                if !run_op(&h, op, &vm, &image).await && op != "/vm/clone" {
                    failed.insert(call);
                    let what = format!("{op} (VM stopped: {stopped}) failing at {call}");
                    assert_eq!(h.recorded(&vm).await, record, "{what} keeps the VM's record");
                    assert_eq!(h.files(), files, "{what} leaves the files as they were");
                    assert_eq!(h.domain_files(&vm), record, "{what} leaves the domain on its files");
                }
                assert_consistent(&h).await;
            }
        }
    }
    assert_eq!(failed.len(), calls.len(), "each call is used by some operation: {failed:?}");
}

/// Where a test kills the agent: at its n-th hypervisor or qemu-img call (which then never
/// returns), or
/// right after its n-th journaled undo step.
#[derive(Debug, Clone, Copy)]
enum Kill {
    Call(usize),
    Step(usize),
}

/// Runs `op` once, killed at `kill`; false when it finished first (it must have succeeded).
async fn run_killed<Fut: Future<Output = AgentResult<Value>>>(h: &TestHost, path: &str, op: Fut, kill: Kill) -> bool {
    use futures::FutureExt;
    let killed = match kill {
        Kill::Call(n) => {
            h.faults.kill_at(n);
            tokio::select! {
                r = op => { r.unwrap_or_else(|e| panic!("{path}: {e}")); false }
                _ = h.faults.killed() => true,
            }
        }
        Kill::Step(n) => match std::panic::AssertUnwindSafe(kill_point::after(n, op)).catch_unwind().await {
            Ok(r) => {
                r.unwrap_or_else(|e| panic!("{path}: {e}"));
                false
            }
            Err(p) if p.downcast_ref::<&str>() == Some(&kill_point::KILLED) => true,
            Err(p) => std::panic::resume_unwind(p),
        },
    };
    h.faults.revive();
    killed
}

/// Runs `op` killed at each of its hypervisor and qemu-img calls and after each of its journaled steps in
/// turn, restarting the agent and recovering after each kill; each time the host must be
/// consistent again. Returns how many kills ran.
async fn kill_at_every_point<F, Fut>(h: &mut TestHost, path: &str, op: F) -> usize
where
    F: Fn(std::sync::Arc<crate::app::App>, TaskCtx) -> Fut,
    Fut: Future<Output = AgentResult<Value>>,
{
    let mut kills = 0;
    for at in [Kill::Call as fn(usize) -> Kill, Kill::Step] {
        for n in 1.. {
            let ctx = h.task(path).await;
            if !run_killed(h, path, op(h.app.clone(), ctx), at(n)).await {
                break;
            }
            kills += 1;
            let report = h.restart_and_recover().await;
            // A step may keep what a running VM already uses; anything else must be undone.
            let failures = report.rolled_back.iter().flat_map(|r| &r.failures);
            let kill = at(n);
            assert!(failures.clone().all(|f| f.ends_with("is in use; kept")), "{path} killed at {kill:?}: {report:?}");
            assert_consistent(h).await;
        }
    }
    kills
}

fn value<T: serde::Serialize>(r: AgentResult<T>) -> AgentResult<Value> {
    r.map(|v| serde_json::to_value(v).unwrap())
}

/// A host with one running VM and a second image, for the kill tests.
async fn kill_host() -> (TestHost, String, String) {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let image = h.image("other", 8 << 20).await;
    (h, vm, image)
}

#[tokio::test]
async fn a_create_killed_at_any_point_is_rolled_back() {
    let (mut h, _, image) = kill_host().await;
    let kills = kill_at_every_point(&mut h, "/vm/create", |app, ctx| {
        let root = app.storage.roots().roots()[0].join(format!("k/{}.qcow2", uuid()));
        let body = json!({
            "vm": {"vmInstanceUuid": uuid(), "vmName": "k", "memory": 67108864, "cpuNum": 1},
            "rootVolume": {"volumeUuid": uuid(), "installPath": root.display().to_string(), "imagePath": image.clone()},
        });
        async move { value(crate::ops::create::create(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 6, "{kills} kill points");
}

#[tokio::test]
async fn a_clone_killed_at_any_point_is_recovered() {
    let (mut h, vm, _) = kill_host().await;
    let kills = kill_at_every_point(&mut h, "/vm/clone", |app, ctx| {
        let body = json!({"vmUuid": vm, "names": ["c"], "full": true});
        async move { value(crate::ops::clone::clone(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 12, "{kills} kill points");
}

#[tokio::test]
async fn a_snapshot_group_killed_at_any_point_is_recovered() {
    let (mut h, vm, _) = kill_host().await;
    let kills = kill_at_every_point(&mut h, "/vm/snapshotgroup/take", |app, ctx| {
        let body = json!({"vmUuid": vm});
        async move { value(crate::ops::snapshot_group::take(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 6, "{kills} kill points");
}

#[tokio::test]
async fn a_backup_killed_at_any_point_is_recovered() {
    let (mut h, vm, _) = kill_host().await;
    let kills = kill_at_every_point(&mut h, "/vm/backup", |app, ctx| {
        let body = json!({"vmUuid": vm});
        async move { value(crate::ops::backup::backup(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 20, "{kills} kill points");
}

#[tokio::test]
async fn a_change_image_killed_at_any_point_is_recovered() {
    let (mut h, vm, image) = kill_host().await;
    h.app.libvirt.destroy(&vm).await.unwrap();
    let kills = kill_at_every_point(&mut h, "/vm/changeimage", |app, ctx| {
        let body = json!({"vmUuid": vm, "imagePath": image.clone()});
        async move { value(crate::ops::change_image::change_image(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 3, "{kills} kill points");
}

#[tokio::test]
async fn operations_racing_on_one_vm_lose_no_update() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let ops = (0..4).map(|i| {
        let (app, vm) = (h.app.clone(), vm.clone());
        async move {
            let ctx = TaskCtx::detached("/race");
            match i {
                0 => value(crate::ops::snapshot_group::take(&app, &ctx, cmd(json!({"vmUuid": vm}))).await),
                1 => value(crate::ops::clone::clone(&app, &ctx, cmd(json!({"vmUuid": vm, "names": ["r"]}))).await),
                2 => value(crate::ops::backup::backup(&app, &ctx, cmd(json!({"vmUuid": vm}))).await),
                _ => crate::ops::flatten::flatten(&app, &ctx, cmd(json!({"vmUuid": vm, "full": false}))).await,
            }
        }
    });
    for r in futures::future::join_all(ops).await {
        r.unwrap();
    }
    assert_consistent(&h).await;
}

/// The RBD images a host may hold: the cached image and those VM records name; no temporary
/// clone snapshot without a clone on it.
async fn assert_rbd_consistent(h: &TestHost, base: &str) {
    let mut wanted = BTreeSet::from([base.to_owned()]);
    for e in std::fs::read_dir(h.app.config.state_dir.join("vms")).into_iter().flatten().flatten() {
        let vm = e.file_name().to_string_lossy().trim_end_matches(".json").to_owned();
        for p in h.recorded(&vm).await.iter().filter_map(|p| p.strip_prefix("ceph://")) {
            assert!(h.rbd.images().contains(&p.to_owned()), "VM {vm}'s record names {p}, which is gone");
            wanted.insert(p.to_owned());
        }
    }
    let stray: Vec<String> = h.rbd.images().into_iter().filter(|i| !wanted.contains(i)).collect();
    assert!(stray.is_empty(), "images no VM references: {stray:?}");
    let stop = crate::stop::Stop::new();
    for image in h.rbd.images() {
        let p = crate::ceph::path::CephPath::parse(&image).unwrap();
        for s in h.app.rbd.snapshots(&p, &stop).await.unwrap() {
            let kids = h.app.rbd.children(&p.with_snap(&s.name), &stop).await.unwrap();
            let temporary = s.name.starts_with(crate::ops::volumes::CLONE_SNAPSHOT_PREFIX);
            assert!(!temporary || !kids.is_empty(), "temporary snapshot {image}@{} has no clone", s.name);
        }
    }
}

/// A cached image on the fake cluster (`rbd/base@s`), and a `/vm/create` body on it.
async fn rbd_host() -> (TestHost, String, impl Fn(&str) -> Value) {
    let h = TestHost::start();
    let stop = crate::stop::Stop::new();
    let base = crate::ceph::path::CephPath::parse("rbd/base").unwrap();
    h.app.rbd.create(&base, 8 << 20, &stop).await.unwrap();
    h.app.rbd.snap_create(&base.with_snap("s"), &stop).await.unwrap();
    let body = |vm: &str| {
        json!({
            "vm": {"vmInstanceUuid": vm, "vmName": "r", "memory": 67108864, "cpuNum": 1},
            "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{}", uuid()), "imagePath": "ceph://rbd/base@s"},
            "dataVolumes": [{"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{}", uuid()), "size": 1048576}],
            "ceph": {"secretUuid": "9e1fd1a2-6e6c-4b4b-8a4c-4f6f0b0e2f11", "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        })
    };
    (h, "rbd/base".to_owned(), body)
}

#[tokio::test]
async fn rbd_volumes_are_created_cloned_flattened_and_replaced_through_the_same_operations() {
    let (h, base, body) = rbd_host().await;
    let vm = uuid();
    let ctx = TaskCtx::detached("/vm/create");
    crate::ops::create::create(&h.app, &ctx, cmd(body(&vm))).await.unwrap();
    let root = h.recorded(&vm).await[0].trim_start_matches("ceph://").to_owned();
    assert_eq!(h.rbd.parent(&root).as_deref(), Some("rbd/base@s"), "a thin root is a clone of the image");
    let xml = h.hv.domain(&vm).unwrap().xml;
    assert!(xml.contains(&format!("name='{root}'")) && xml.contains("protocol='rbd'"), "{xml}");

    let ctx = TaskCtx::detached("/vm/clone");
    let rsp = crate::ops::clone::clone(&h.app, &ctx, cmd(json!({"vmUuid": vm, "names": ["c"], "full": true}))).await;
    assert_eq!(rsp.unwrap().number_of_cloned_vm, 1);
    assert_rbd_consistent(&h, &base).await;

    let ctx = TaskCtx::detached("/vm/flatten");
    crate::ops::flatten::flatten(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap();
    assert_eq!(h.rbd.parent(&root), None, "flattened");

    h.app.libvirt.destroy(&vm).await.unwrap();
    let ctx = TaskCtx::detached("/vm/changeimage");
    let change = cmd(json!({"vmUuid": vm, "imagePath": "ceph://rbd/base@s"}));
    crate::ops::change_image::change_image(&h.app, &ctx, change).await.unwrap();
    let new_root = h.recorded(&vm).await[0].trim_start_matches("ceph://").to_owned();
    assert_ne!(new_root, root);
    assert!(h.rbd.images().contains(&root), "the old root is kept while a clone depends on its snapshot");
    assert_eq!(h.rbd.parent(&new_root).as_deref(), Some("rbd/base@s"));
}

#[tokio::test]
async fn rbd_create_and_clone_killed_at_any_point_leak_no_image() {
    let (mut h, base, body) = rbd_host().await;
    let vm = uuid();
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body(&vm))).await.unwrap();
    let mut kills = kill_at_every_point(&mut h, "/vm/create", |app, ctx| {
        let b = body(&uuid());
        async move { value(crate::ops::create::create(&app, &ctx, cmd(b)).await) }
    })
    .await;
    assert_rbd_consistent(&h, &base).await;
    kills += kill_at_every_point(&mut h, "/vm/clone", |app, ctx| {
        let b = json!({"vmUuid": vm, "names": ["c"], "full": true});
        async move { value(crate::ops::clone::clone(&app, &ctx, cmd(b)).await) }
    })
    .await;
    assert_rbd_consistent(&h, &base).await;
    assert!(kills >= 10, "{kills} kill points");
}

#[tokio::test(start_paused = true)]
async fn recovery_waits_out_the_watch_a_killed_client_left_on_an_image() {
    let (mut h, base, body) = rbd_host().await;
    let ctx = h.task("/vm/create").await;
    let create = crate::ops::create::create(&h.app, &ctx, cmd(body(&uuid())));
    assert!(run_killed(&h, "/vm/create", async { value(create.await) }, Kill::Step(2)).await, "killed");
    assert!(h.rbd.images().len() > 1, "the kill left the new root behind");
    // The killed run's open of the image: the first removals find it watched.
    h.rbd.watch_for(5);
    let report = h.restart_and_recover().await;
    assert!(report.rolled_back.iter().all(|r| r.failures.is_empty()), "{report:?}");
    assert_rbd_consistent(&h, &base).await;
}

#[tokio::test]
async fn a_state_file_torn_by_a_kill_is_removed_at_start_and_never_read_as_a_record() {
    let mut h = TestHost::start();
    let vm = h.running_vm().await;
    let vms = h.app.config.state_dir.join("vms");
    // What a kill in the middle of an atomic write leaves: a temporary beside the record.
    let torn = vms.join(format!(".{vm}.json.tmp-{}", uuid()));
    std::fs::write(&torn, br#"{"vmInstanceUuid": "half"#).unwrap();
    let report = h.restart_and_recover().await;
    assert!(!torn.exists() && report.removed.contains(&torn), "{report:?}");
    assert_eq!(std::fs::read_dir(&vms).unwrap().count(), 1, "only the record stays");
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_define_that_libvirtd_runs_after_its_undo_is_removed_again() {
    let mut h = TestHost::start();
    let recorded = h.running_vm().await;
    let (late, task) = (uuid(), h.task("/vm/create").await);
    let mut log = crate::ops::undo::UndoLog::journaled(&h.app, &task.task_id);
    for vm in [&late, &recorded] {
        log.push(crate::ops::undo::UndoStep::RemoveDomain { vm: vm.clone() });
    }
    std::mem::forget(log); // killed: the define was sent, its answer never came
    h.app.libvirt.destroy(&recorded).await.unwrap();
    h.restart_and_recover().await;
    assert!(h.hv.domain(&recorded).is_none(), "the undo removed the recorded VM's domain too");
    // libvirtd gets to the killed agent's define only now; the recorded VM is defined again by a
    // later command of its owner.
    let xml = |vm: &str| format!("<domain type='qemu'><name>{vm}</name></domain>");
    h.app.libvirt.define(xml(&late)).await.unwrap();
    h.app.libvirt.define(xml(&recorded)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1600)).await;
    assert!(h.hv.domain(&late).is_none(), "the late domain of a VM without a record is removed");
    assert!(h.hv.domain(&recorded).is_some(), "a VM with a record keeps its domain");
}

/// A `/vm/create` body of a started VM with `firmware`.
async fn uefi_create(h: &TestHost, vm: &str, firmware: &str) -> Value {
    let mut body = h.create_cmd(vm, &h.image(&uuid(), 4 << 20).await);
    body["firmware"] = json!(firmware);
    body
}

#[tokio::test]
async fn a_uefi_vm_has_its_own_nvram_which_clones_copy_and_destroy_removes() {
    let h = TestHost::start();
    let vm = uuid();
    let ctx = TaskCtx::detached("/vm/create");
    crate::ops::create::create(&h.app, &ctx, cmd(uefi_create(&h, &vm, "uefi-secure").await)).await.unwrap();
    let nvram = h.nvram(&vm).await.expect("a UEFI VM records its NVRAM");
    let root = PathBuf::from(&h.recorded(&vm).await[0]);
    assert_eq!(nvram, root.with_file_name(format!("{vm}.nvram.fd")), "beside the root");
    assert_eq!(std::fs::read(&nvram).unwrap(), b"VARS.ms.fd", "a copy of the Secure Boot template");
    let xml = h.hv.domain(&vm).unwrap().xml;
    assert!(xml.contains(&format!("<nvram>{}</nvram>", nvram.display())), "{xml}");
    assert!(xml.contains("secure='yes'") && xml.contains("<smm state='on'/>") && xml.contains("machine='q35'"));
    assert_consistent(&h).await;

    // A variable the guest wrote is in the clone's copy; one written after the clone is not.
    std::fs::write(&nvram, b"VARS.ms.fd+before").unwrap();
    let body = json!({"vmUuid": vm, "names": ["a", "b"]});
    let rsp = crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(body)).await.unwrap();
    assert_eq!(rsp.number_of_cloned_vm, 2, "{:?}", rsp.inventories);
    let body = json!({"vmUuid": vm, "names": ["plain"], "firmware": "uefi"});
    let rsp = crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(body)).await.unwrap();
    std::fs::write(&nvram, b"VARS.ms.fd+before+after").unwrap();
    let uuid_of = |rsp: &crate::wire::native::CloneVmRsp, i: usize| {
        rsp.inventories[i]["inventory"]["uuid"].as_str().unwrap().to_owned()
    };
    let plain = uuid_of(&rsp, 0);
    let plain_nvram = h.nvram(&plain).await.unwrap();
    assert_eq!(std::fs::read(&plain_nvram).unwrap(), b"VARS.fd", "other firmware: a fresh store");
    assert!(h.hv.domain(&plain).unwrap().xml.contains("CODE.fd</loader>"));
    let mut copies = Vec::new();
    for e in std::fs::read_dir(h.app.config.state_dir.join("vms")).unwrap().flatten() {
        let other = e.file_name().to_string_lossy().trim_end_matches(".json").to_owned();
        if other != vm && other != plain {
            copies.push((other.clone(), h.nvram(&other).await.unwrap()));
        }
    }
    assert_eq!(copies.len(), 2);
    for (clone, copy) in &copies {
        assert_ne!(copy, &nvram);
        assert_eq!(copy.file_name().unwrap().to_string_lossy(), format!("{clone}.nvram.fd"));
        assert_eq!(std::fs::read(copy).unwrap(), b"VARS.ms.fd+before", "the source's store at the clone");
    }
    assert_consistent(&h).await;

    // ZStack's destroy takes the NVRAM with the VM; a stop keeps it.
    let (clone, copy) = &copies[0];
    let stop = crate::wire::decode(&json!({"uuid": clone, "type": "cold"})).unwrap();
    crate::compat::vm::stop(&h.app, &TaskCtx::detached("/vm/stop"), stop).await.unwrap();
    assert!(copy.is_file(), "a stopped VM keeps its NVRAM");
    let destroy = crate::wire::decode(&json!({"uuid": clone})).unwrap();
    crate::compat::vm::destroy(&h.app, &TaskCtx::detached("/vm/destroy"), destroy).await.unwrap();
    assert!(!copy.exists() && !h.app.vms.is_known(clone));
    assert!(nvram.is_file(), "the source keeps its own");
}

#[tokio::test]
async fn uefi_is_refused_without_its_firmware_files_or_on_pc_with_secure_boot() {
    let h = TestHost::start();
    std::fs::remove_file(&h.app.config.uefi.secure_vars).unwrap();
    let before = h.files();
    let vm = uuid();
    let body = uefi_create(&h, &vm, "uefi-secure").await;
    let e = crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap_err();
    let missing = h.app.config.uefi.secure_vars.display().to_string();
    assert!(e.to_string().contains(&missing) && e.to_string().contains("ovmf"), "{e}");
    assert!(!h.app.vms.is_known(&vm));
    let made: Vec<_> =
        (h.files().into_iter()).filter(|f| !before.contains(f) && !f.starts_with(h.root.join("imagecache"))).collect();
    assert!(made.is_empty(), "a refused create makes nothing: {made:?}");

    let mut body = uefi_create(&h, &vm, "uefi-secure").await;
    body["vm"]["machineType"] = json!("pc");
    let e = crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap_err();
    assert!(e.to_string().contains("q35"), "{e}");
    let mut body = uefi_create(&h, &vm, "uefi").await;
    body["firmware"] = json!("efi");
    assert!(decode_native::<crate::wire::native::CreateVmCmd>(&body).unwrap_err().to_string().contains("firmware"));
}

#[tokio::test]
async fn a_uefi_create_and_clone_killed_at_any_point_leave_no_nvram_behind() {
    let (mut h, _, image) = kill_host().await;
    let kills = kill_at_every_point(&mut h, "/vm/create", |app, ctx| {
        let vm = uuid();
        let root = app.storage.roots().roots()[0].join(format!("k/{vm}/root.qcow2"));
        let body = json!({
            "vm": {"vmInstanceUuid": vm, "vmName": "k", "memory": 67108864, "cpuNum": 1},
            "rootVolume": {"volumeUuid": uuid(), "installPath": root.display().to_string(), "imagePath": image.clone()},
            "firmware": "uefi",
        });
        async move { value(crate::ops::create::create(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 7, "{kills} kill points");
    let vm = uuid();
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(uefi_create(&h, &vm, "uefi").await))
        .await
        .unwrap();
    let kills = kill_at_every_point(&mut h, "/vm/clone", |app, ctx| {
        let body = json!({"vmUuid": vm, "names": ["c"]});
        async move { value(crate::ops::clone::clone(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 8, "{kills} kill points");
}

#[tokio::test]
async fn a_snapshot_group_keeps_the_nvram_and_tpm_state_a_vm_made_from_it_starts_with() {
    let h = TestHost::start();
    let vm = uuid();
    let mut body = uefi_create(&h, &vm, "uefi").await;
    body["tpm"] = json!({"enable": true});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap();
    let nvram = h.nvram(&vm).await.unwrap();
    std::fs::write(&nvram, b"at the instant").unwrap();
    let tpm = crate::ops::tpm::state_dir(&h.app.config.libvirt.swtpm_dir, &vm).join("tpm2");
    std::fs::create_dir_all(&tpm).unwrap();
    std::fs::write(tpm.join("tpm2-00.permall"), b"sealed at the instant").unwrap();

    let ctx = TaskCtx::detached("/vm/snapshotgroup/take");
    let group = crate::ops::snapshot_group::take(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap();
    std::fs::write(&nvram, b"later").unwrap();
    std::fs::write(tpm.join("tpm2-00.permall"), b"later").unwrap();

    let body = json!({"groupUuid": group.group_uuid, "vm": {"vmName": "restored"}});
    let ctx = TaskCtx::detached("/vm/createfromsnapshot");
    let inv = crate::ops::snapshot_group::create_from(&h.app, &ctx, cmd(body)).await.unwrap();
    let restored = serde_json::to_value(&inv).unwrap()["uuid"].as_str().unwrap().to_owned();
    let restored_nvram = h.nvram(&restored).await.unwrap();
    assert_ne!(restored_nvram, nvram);
    assert_eq!(std::fs::read(&restored_nvram).unwrap(), b"at the instant");
    let restored_tpm = crate::ops::tpm::state_dir(&h.app.config.libvirt.swtpm_dir, &restored).join("tpm2");
    assert_eq!(std::fs::read(restored_tpm.join("tpm2-00.permall")).unwrap(), b"sealed at the instant");

    // Another firmware: a fresh store.
    let body = json!({"groupUuid": group.group_uuid, "vm": {"vmName": "secure", "machineType": "q35"}, "firmware": "uefi-secure"});
    let ctx = TaskCtx::detached("/vm/createfromsnapshot");
    let inv = crate::ops::snapshot_group::create_from(&h.app, &ctx, cmd(body)).await.unwrap();
    let secure = serde_json::to_value(&inv).unwrap()["uuid"].as_str().unwrap().to_owned();
    assert_eq!(std::fs::read(h.nvram(&secure).await.unwrap()).unwrap(), b"VARS.ms.fd");
    assert_consistent(&h).await;
}

#[tokio::test]
async fn change_image_keeps_the_nvram_of_a_uefi_vm() {
    let h = TestHost::start();
    let vm = uuid();
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(uefi_create(&h, &vm, "uefi").await))
        .await
        .unwrap();
    h.app.libvirt.destroy(&vm).await.unwrap();
    let nvram = h.nvram(&vm).await.unwrap();
    std::fs::write(&nvram, b"boot entries").unwrap();
    let image = h.image("other", 8 << 20).await;
    let c = cmd(json!({"vmUuid": vm, "imagePath": image}));
    crate::ops::change_image::change_image(&h.app, &TaskCtx::detached("/vm/changeimage"), c).await.unwrap();
    assert_eq!(h.nvram(&vm).await, Some(nvram.clone()));
    assert_eq!(std::fs::read(&nvram).unwrap(), b"boot entries");
    assert!(h.hv.domain(&vm).unwrap().xml.contains(&format!("<nvram>{}</nvram>", nvram.display())));
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_uefi_vm_on_rbd_keeps_its_nvram_in_the_first_storage_root() {
    let (h, _, body) = rbd_host().await;
    let (vm, clone) = (uuid(), uuid());
    let mut b = body(&vm);
    b["firmware"] = json!("uefi");
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(b)).await.unwrap();
    let nvram = h.nvram(&vm).await.unwrap();
    assert_eq!(nvram, h.root.join("nvram").join(format!("{vm}.nvram.fd")));
    assert_eq!(std::fs::read(&nvram).unwrap(), b"VARS.fd");
    let c = json!({"vmUuid": vm, "clones": [{"uuid": clone}]});
    let rsp = crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(c)).await.unwrap();
    assert_eq!(rsp.number_of_cloned_vm, 1, "{:?}", rsp.inventories);
    assert_eq!(h.nvram(&clone).await.unwrap(), h.root.join("nvram").join(format!("{clone}.nvram.fd")));
}

/// Restores point `point` of backup group `group` into a new VM; answers its NVRAM's content.
async fn restored_nvram(h: &TestHost, group: &str, point: usize) -> AgentResult<Vec<u8>> {
    let body = json!({"groupUuid": group, "point": point, "vm": {"vmName": format!("restored-{point}")}});
    let ctx = TaskCtx::detached("/vm/createfrombackup");
    let inv = crate::ops::backup::create_from(&h.app, &ctx, cmd(body)).await?;
    let vm = serde_json::to_value(&inv).unwrap()["uuid"].as_str().unwrap().to_owned();
    Ok(std::fs::read(h.nvram(&vm).await.unwrap()).unwrap())
}

#[tokio::test]
async fn a_backup_keeps_the_nvram_of_its_point_and_a_restore_starts_with_it() {
    let h = TestHost::start();
    let vm = uuid();
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(uefi_create(&h, &vm, "uefi").await))
        .await
        .unwrap();
    let nvram = h.nvram(&vm).await.unwrap();
    let ctx = || TaskCtx::detached("/vm/backup");
    std::fs::write(&nvram, b"point 0").unwrap();
    let rsp = crate::ops::backup::backup(&h.app, &ctx(), cmd(json!({"vmUuid": vm}))).await.unwrap();
    std::fs::write(&nvram, b"later").unwrap();
    let group = rsp.group_uuid.clone();
    assert_eq!(restored_nvram(&h, &group, 0).await.unwrap(), b"point 0");
    // Another group, another instant (the fake qemu-img cannot make incremental points).
    let rsp = crate::ops::backup::backup(&h.app, &ctx(), cmd(json!({"vmUuid": vm}))).await.unwrap();
    assert_eq!(restored_nvram(&h, &rsp.group_uuid, 0).await.unwrap(), b"later");

    // A store that no longer matches the manifest is refused.
    std::fs::write(PathBuf::from(&rsp.group_path).join("nvram/0.fd"), b"tampered").unwrap();
    let group = rsp.group_uuid.clone();
    let e = restored_nvram(&h, &group, 0).await.unwrap_err();
    assert!(e.to_string().contains("nvram/0.fd"), "{e}");
}
