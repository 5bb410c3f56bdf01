//! Unit tests of the VM operations on fakes of the hypervisor, qemu-img and RBD: each
//! operation's effect, its rollback when a hypervisor or qemu-img call fails, a kill at every such
//! call and after every journaled step followed by crash recovery, and operations racing on one
//! VM. No daemon and no external program is needed.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::AgentResult;
use crate::hypervisor::fake::GuestAgent;
use crate::libvirt::domains::VmState;
use crate::ops::undo::{kill_point, UndoStep};
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
        if let Some(ci) = h.app.vms.lock(&vm).await.unwrap().load().unwrap().cloud_init {
            assert!(ci.seed.is_file(), "VM {vm}'s cloud-init seed {} is gone", ci.seed.display());
            wanted.insert(ci.seed);
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
        assert!(!h.hv.domain(&d).unwrap().guest_frozen, "the guest of VM {d} stays frozen");
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

/// The answer (the new VM's inventory, read from its volumes) is part of the create: a create
/// that cannot read it fails and leaves nothing, not a VM the caller was told does not exist.
#[tokio::test]
async fn a_create_whose_inventory_cannot_be_read_leaves_nothing() {
    let h = TestHost::start();
    let vm = uuid();
    let root = h.path(&format!("rootVolumes/vol-{vm}/root.qcow2"));
    let body = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "t", "memory": 67108864, "cpuNum": 1},
        "rootVolume": {"volumeUuid": uuid(), "installPath": root, "size": 1048576},
        "strategy": "CreateStopped",
    });
    h.faults.fail("qemu-img info");
    let e = crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap_err();
    assert!(e.to_string().contains("qemu-img info"), "the inventory's read failed: {e}");
    assert_eq!(h.files(), BTreeSet::new(), "a failed create leaves no volume");
    assert!(h.hv.domain(&vm).is_none() && !h.app.vms.is_known(&vm), "nor a domain or record");
}

#[tokio::test]
async fn a_data_volume_from_an_image_and_a_cpu_the_host_lacks() {
    let h = TestHost::start();
    let (vm, image) = (uuid(), h.image("data", 2 << 20).await);
    let mut c = h.create_cmd(&vm, &image);
    c["dataVolumes"][0]["imagePath"] = json!(image);
    c["dataVolumes"][0]["size"] = json!(null);
    let before = h.files();
    for (mode, model) in [("host-passthrough", None), ("custom", Some("Skylake-Server"))] {
        let mut refused = c.clone();
        (refused["cpuMode"], refused["cpuModel"]) = (json!(mode), json!(model));
        let e = crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(refused)).await.unwrap_err();
        assert!(e.to_string().contains("offers the modes [\"host-model\", \"custom\"]"), "{mode}: {e}");
        assert_eq!(h.files(), before, "{mode}: a refused CPU leaves no volume");
        assert!(h.hv.domain(&vm).is_none() && !h.app.vms.is_known(&vm), "{mode}: nor a domain or record");
    }
    c["cpuMode"] = json!("host-model");
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(c)).await.unwrap();
    let files = h.recorded(&vm).await;
    assert_eq!(backing(&files[1]), Some(PathBuf::from(&image)), "the data volume is an overlay on its image");
    assert!(h.hv.domain(&vm).unwrap().xml.contains("<cpu mode='host-model'>"));
    assert_consistent(&h).await;
}

#[tokio::test]
async fn clones_take_the_volume_uuids_they_are_given() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let (root, data) = (uuid(), uuid());
    let ctx = TaskCtx::detached("/vm/clone");
    let clone = |clones: Value| {
        crate::ops::clone::clone(&h.app, &ctx, cmd(json!({"vmUuid": vm, "full": true, "clones": clones})))
    };
    for (clones, needle) in [
        (json!([{"dataVolumeUuids": [data, root]}]), "has 2 uuids but 1 data volumes"),
        (json!([{"rootVolumeUuid": root}, {"dataVolumeUuids": [root]}]), "is used twice"),
        (json!([{"rootVolumeUuid": "d1"}]), "clones[0].rootVolumeUuid"),
    ] {
        let e = clone(clones.clone()).await.unwrap_err();
        assert!(e.to_string().contains(needle), "{clones}: {e}");
    }
    let rsp = clone(json!([{"rootVolumeUuid": root, "dataVolumeUuids": [data]}])).await.unwrap();
    let new = rsp.inventories[0]["inventory"]["uuid"].as_str().unwrap().to_owned();
    let spec = h.app.vms.lock(&new).await.unwrap().load().unwrap();
    assert_eq!(spec.volumes.iter().map(|v| v.uuid.as_str()).collect::<Vec<_>>(), [root.as_str(), data.as_str()]);
    assert_consistent(&h).await;
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
async fn a_backup_of_a_running_vm_stays_on_its_own_files() {
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

/// Incremental points read the previous point's bitmaps while the chain holds (running: its
/// checkpoint, stopped: the bitmap in every volume), and compare — saying why — once it is
/// broken; only the newest point's checkpoint is kept.
#[tokio::test]
async fn incremental_points_use_bitmaps_and_fall_back_to_compare_when_the_chain_is_broken() {
    use crate::wire::native::IncrementalBy;
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let files = h.recorded(&vm).await;
    let backup = |body: serde_json::Value| {
        let app = h.app.clone();
        async move { crate::ops::backup::backup(&app, &TaskCtx::detached("/vm/backup"), cmd(body)).await.unwrap() }
    };
    let full = backup(json!({"vmUuid": vm})).await;
    let inc = json!({"vmUuid": vm, "mode": "incremental", "groupUuid": full.group_uuid});
    let checkpoints = || h.hv.domain(&vm).unwrap().checkpoints;
    let newest_reads_as_the_volume = |rsp: &crate::wire::native::BackupVmRsp| {
        let point = PathBuf::from(&rsp.group_path).join(&rsp.manifest.volumes[1].chain[rsp.point].file);
        assert!(same_content(&point.display().to_string(), &files[1]), "point {}", rsp.point);
    };
    assert_eq!(full.incremental_by, None);

    write(&files[1], 0, 0x22);
    let r = backup(inc.clone()).await;
    assert_eq!((r.incremental_by, r.incremental_reason.as_deref()), (Some(IncrementalBy::Bitmap), None));
    newest_reads_as_the_volume(&r);
    assert_eq!(checkpoints(), vec![crate::ops::bitmap_backup::checkpoint_name(&full.group_uuid, 1)], "bounded");

    // The VM redefined without its checkpoint metadata.
    h.app.libvirt.checkpoint_delete(&vm, &checkpoints()[0], true).await.unwrap();
    write(&files[1], 0, 0x33);
    let r = backup(inc.clone()).await;
    assert_eq!(r.incremental_by, Some(IncrementalBy::Compare));
    assert!(r.incremental_reason.as_deref().unwrap().contains("no checkpoint"), "{:?}", r.incremental_reason);
    newest_reads_as_the_volume(&r);

    // Stopped: the bitmap the running point left in the volumes is read.
    h.app.libvirt.destroy(&vm).await.unwrap();
    write(&files[1], 0, 0x44);
    let r = backup(inc.clone()).await;
    assert_eq!(r.incremental_by, Some(IncrementalBy::Bitmap), "{:?}", r.incremental_reason);
    newest_reads_as_the_volume(&r);
    // A replaced volume has no bitmap.
    let name = crate::ops::bitmap_backup::checkpoint_name(&full.group_uuid, r.point);
    crate::qemu_img::fake::set_bitmap(Path::new(&files[0]), &name, false).unwrap();
    let r = backup(inc).await;
    assert_eq!(r.incremental_by, Some(IncrementalBy::Compare));
    assert!(r.incremental_reason.as_deref().unwrap().contains("has no bitmap"), "{:?}", r.incremental_reason);
    newest_reads_as_the_volume(&r);
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
    h.faults.fail("backupBegin");
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
    kill_at_every_point_checked(h, path, op, |_| async {}).await
}

/// [`kill_at_every_point`], with `check` run on the host after every recovery too.
async fn kill_at_every_point_checked<F, Fut, C, CFut>(h: &mut TestHost, path: &str, op: F, check: C) -> usize
where
    F: Fn(std::sync::Arc<crate::app::App>, TaskCtx) -> Fut,
    Fut: Future<Output = AgentResult<Value>>,
    C: Fn(std::sync::Arc<crate::app::App>) -> CFut,
    CFut: Future<Output = ()>,
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
            check(h.app.clone()).await;
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
    assert!(kills >= 12, "{kills} kill points");
}

/// A killed incremental point's bitmap and checkpoint go with it: after every recovery the VM
/// carries only those of points the group records.
#[tokio::test]
async fn an_incremental_backup_killed_at_any_point_leaves_no_bitmap_of_its_own() {
    for running in [true, false] {
        let (mut h, vm, _) = kill_host().await;
        if !running {
            h.app.libvirt.destroy(&vm).await.unwrap();
        }
        let ctx = TaskCtx::detached("/vm/backup");
        let full = crate::ops::backup::backup(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap();
        let group = full.group_uuid.clone();
        let files = h.recorded(&vm).await;
        let check = |app: std::sync::Arc<crate::app::App>| {
            let (vm, group, files) = (vm.clone(), group.clone(), files.clone());
            async move {
                let g = crate::backup_group::Group::locate(&app.backup_roots, None, &group).unwrap();
                let points = g.manifest().unwrap().points.len();
                let recorded: Vec<String> =
                    (0..points).map(|p| crate::ops::bitmap_backup::checkpoint_name(&group, p)).collect();
                let mut carried = app.libvirt.checkpoint_names(&vm).await.unwrap();
                for f in &files {
                    let stop = crate::stop::Stop::new();
                    carried
                        .extend(app.qemu_img.bitmaps(Path::new(f), &stop).await.unwrap().into_iter().map(|b| b.name));
                }
                assert!(carried.iter().all(|c| recorded.contains(c)), "running {running}: {carried:?} vs {recorded:?}");
            }
        };
        let kills = kill_at_every_point_checked(
            &mut h,
            "/vm/backup",
            |app, ctx| {
                let body = json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group});
                async move { value(crate::ops::backup::backup(&app, &ctx, cmd(body)).await) }
            },
            check,
        )
        .await;
        assert!(kills >= 8, "running {running}: {kills} kill points");
    }
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

/// A change of image killed after its switch says so: the new root stays and the change is
/// made; one killed before it says it was rolled back.
#[tokio::test]
async fn an_interrupted_change_image_says_whether_the_vm_was_switched() {
    let (mut h, vm, image) = kill_host().await;
    h.app.libvirt.destroy(&vm).await.unwrap();
    let mut switched = 0;
    for n in 1.. {
        let root = h.recorded(&vm).await[0].clone();
        let ctx = h.task("/vm/changeimage").await;
        let task = ctx.task_id.clone();
        let op = crate::ops::change_image::change_image(&h.app, &ctx, cmd(json!({"vmUuid": vm, "imagePath": image})));
        if !run_killed(&h, "/vm/changeimage", async { value(op.await) }, Kill::Step(n)).await {
            break;
        }
        h.restart_and_recover().await;
        let now = h.recorded(&vm).await[0].clone();
        let result = h.app.tasks.status(&task).unwrap().result.unwrap();
        let details = result["error"].as_str().unwrap().to_owned();
        if now == root {
            assert!(details.ends_with("send the command again with a new taskuuid"), "killed at step {n}: {details}");
        } else {
            switched += 1;
            let stays = format!("VM {vm} was switched to {now}, which stays");
            assert!(details.contains(&stays) && details.ends_with("the change is made"), "{details}");
        }
    }
    assert!(switched >= 1, "a kill after the record write switched the VM");
}

/// A change of image killed after it redefined the stopped domain on the new root and before
/// the record named it (no kill point of the harness falls there): recovery removes the new
/// root and defines the domain on the recorded one again.
#[tokio::test]
async fn a_change_image_killed_between_define_and_record_leaves_the_domain_on_the_recorded_root() {
    let (mut h, vm, _) = kill_host().await;
    h.app.libvirt.destroy(&vm).await.unwrap();
    let old = PathBuf::from(&h.recorded(&vm).await[0]);
    let new = old.with_file_name(format!("{}.qcow2", uuid()));
    std::fs::copy(&old, &new).unwrap();
    let task = h.task("/vm/changeimage").await;
    let owner = h.app.vms.lock(&vm).await.unwrap();
    let mut spec = owner.load().unwrap();
    let mut log = crate::ops::undo::UndoLog::journaled(&h.app, &task.task_id);
    let [made, replaced] =
        [&new, &old].map(|p| (p.display().to_string(), UndoStep::RemoveVolumeFile { path: p.clone(), new_dirs: None }));
    log.push(UndoStep::UnlessRecorded { vm: vm.clone(), path: made.0, step: Box::new(made.1) });
    log.push(UndoStep::RemoveReplaced { vm: vm.clone(), path: replaced.0, step: Box::new(replaced.1) });
    log.push(UndoStep::RedefineFromRecord { vm: vm.clone() });
    let root = spec.root().moved_to(uuid(), crate::storage::location::Location::File(new.clone()), None);
    *spec.root_mut() = root;
    h.app.libvirt.define(crate::domain::render(&spec, &crate::ops::settings(&h.app, &vm)).unwrap()).await.unwrap();
    std::mem::forget(log); // killed before the record was saved
    drop(owner);
    assert_eq!(h.domain_files(&vm)[0], new.display().to_string(), "the domain was switched");
    h.restart_and_recover().await;
    assert!(!new.exists() && old.exists(), "the new root is gone, the old one stays");
    assert_eq!(h.domain_files(&vm)[0], old.display().to_string(), "the domain is back on the recorded root");
    assert_consistent(&h).await;
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

/// The backup snapshots on the VM's RBD images, as `image@snapshot`.
async fn backup_snapshots(h: &TestHost, vm: &str) -> Vec<String> {
    // Once the VM is free: a point's cleanup holds it after the reply.
    drop(h.app.vms.lock(vm).await.unwrap());
    let stop = crate::stop::Stop::new();
    let mut out = Vec::new();
    for p in h.recorded(vm).await.iter().filter_map(|p| crate::ceph::path::CephPath::parse(p).ok()) {
        for s in h.app.rbd.snapshots(&p, &stop).await.unwrap_or_default() {
            if s.name.starts_with(crate::ops::volumes::BACKUP_SNAPSHOT_PREFIX) {
                out.push(format!("{}@{}", p.image_spec(), s.name));
            }
        }
    }
    out
}

/// A VM on Ceph: each backup point keeps its snapshots (the newest point's only), an
/// incremental reads their diff, a failed point leaves none of its own, and the kept snapshot
/// does not keep a volume from being deleted or an old root from going with a change of image.
#[tokio::test]
async fn rbd_backup_points_keep_their_snapshots_and_incrementals_read_their_diff() {
    use crate::ops::bitmap_backup::checkpoint_name;
    use crate::wire::native::IncrementalBy;
    let (h, _, body) = rbd_host().await;
    let vm = uuid();
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body(&vm))).await.unwrap();
    h.app.libvirt.destroy(&vm).await.unwrap();
    let images: Vec<String> =
        h.recorded(&vm).await.iter().map(|p| p.trim_start_matches("ceph://").to_owned()).collect();
    let backup = |body: Value| {
        let app = h.app.clone();
        async move { crate::ops::backup::backup(&app, &TaskCtx::detached("/vm/backup"), cmd(body)).await }
    };
    let full = backup(json!({"vmUuid": vm})).await.unwrap();
    let snaps = |p: usize| -> Vec<String> {
        images.iter().map(|i| format!("{i}@{}", checkpoint_name(&full.group_uuid, p))).collect()
    };
    assert_eq!(backup_snapshots(&h, &vm).await, snaps(0));
    let inc = json!({"vmUuid": vm, "mode": "incremental", "groupUuid": full.group_uuid});
    let r = backup(inc.clone()).await.unwrap();
    assert_eq!((r.incremental_by, r.incremental_reason), (Some(IncrementalBy::SnapshotDiff), None));
    assert_eq!(backup_snapshots(&h, &vm).await, snaps(1), "only the newest point's are kept");
    let file = PathBuf::from(&r.group_path).join(&r.manifest.volumes[0].chain[1].file);
    let previous = file.with_file_name("0.qcow2");
    assert_eq!(backing(&file.display().to_string()), Some(previous), "an overlay on the previous point");

    // A point that fails removes the snapshots it took and keeps the previous ones.
    h.faults.fail("qemu-img create");
    backup(inc.clone()).await.expect_err("the overlay cannot be made");
    assert_eq!(backup_snapshots(&h, &vm).await, snaps(1));
    h.faults.heal("qemu-img create");

    // The previous point's snapshot removed by hand: the point compares and says why.
    let stop = crate::stop::Stop::new();
    let gone = crate::ceph::path::CephPath::parse(&snaps(1)[1]).unwrap();
    h.app.rbd.snap_unprotect(&gone, &stop).await.unwrap();
    h.app.rbd.snap_remove(&gone, &stop).await.unwrap();
    let r = backup(inc.clone()).await.unwrap();
    assert_eq!(r.incremental_by, Some(IncrementalBy::Compare));
    assert!(r.incremental_reason.as_deref().unwrap().contains(&images[1]), "{:?}", r.incremental_reason);
    assert_eq!(backup_snapshots(&h, &vm).await, snaps(2), "the chain goes on from the new point");

    // The kept snapshot does not keep the old root from going with a change of image.
    let change = cmd(json!({"vmUuid": vm, "imagePath": "ceph://rbd/base@s"}));
    crate::ops::change_image::change_image(&h.app, &TaskCtx::detached("/vm/changeimage"), change).await.unwrap();
    assert!(!h.rbd.images().contains(&images[0]), "the old root went with its backup snapshot");
    // Nor a volume from being deleted.
    let delete = json!({"installPath": format!("ceph://{}", images[1])});
    let delete = serde_json::from_value(delete).unwrap();
    crate::compat::ceph::delete(&h.app, &TaskCtx::detached("/ceph/primarystorage/volume/delete"), delete)
        .await
        .unwrap();
    assert!(!h.rbd.images().contains(&images[1]), "deleted with its backup snapshot");
}

/// A stopped VM on Ceph (its uuid) and the full point of a new backup group of it.
async fn stopped_rbd_vm_with_a_full_point() -> (TestHost, String, crate::wire::native::BackupVmRsp) {
    let (h, _, body) = rbd_host().await;
    let vm = uuid();
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body(&vm))).await.unwrap();
    h.app.libvirt.destroy(&vm).await.unwrap();
    let full =
        crate::ops::backup::backup(&h.app, &TaskCtx::detached("/vm/backup"), cmd(json!({"vmUuid": vm}))).await.unwrap();
    (h, vm, full)
}

/// The older points' snapshots go after the reply, under a journaled cleanup: one that a kill
/// cut short is finished by recovery, though its task had finished.
#[tokio::test]
async fn a_points_cleanup_cut_short_by_a_kill_is_finished_by_recovery() {
    let (mut h, vm, full) = stopped_rbd_vm_with_a_full_point().await;
    let kept = backup_snapshots(&h, &vm).await;
    // What a killed run's cleanup had journaled and not reached: two older points' snapshots,
    // journaled together (and a cleanup with nothing to do, which writes no log).
    let undo = crate::ops::undo::undo_dir(&h.app.config.state_dir);
    crate::ops::undo::UndoLog::cleanup(&h.app, "fedcba9876543210").push_all([]);
    let names = || std::fs::read_dir(&undo).into_iter().flatten().flatten().map(|e| e.file_name());
    assert!(!names().any(|n| n.to_string_lossy().starts_with("fedcba9876543210")), "nothing to clean up, no log");
    let root = h.recorded(&vm).await[0].trim_start_matches("ceph://").to_owned();
    let older: Vec<String> =
        (7..9).map(|i| format!("{root}@{}", crate::ops::bitmap_backup::checkpoint_name(&full.group_uuid, i))).collect();
    let stop = crate::stop::Stop::new();
    for o in &older {
        h.app.rbd.snap_create(&crate::ceph::path::CephPath::parse(o).unwrap(), &stop).await.unwrap();
    }
    let mut cleanup = crate::ops::undo::UndoLog::cleanup(&h.app, "0123456789abcdef");
    cleanup.push_all(older.iter().map(|o| UndoStep::RemoveRbdSnapshot { path: o.clone() }));
    let listed = backup_snapshots(&h, &vm).await;
    assert!(older.iter().all(|o| listed.contains(o)), "{listed:?}");

    let report = h.restart_and_recover().await;
    assert_eq!(report.cleaned_up, ["0123456789abcdef"], "{report:?}");
    assert!(report.rolled_back.is_empty(), "a cleanup undoes nothing of its task: {report:?}");
    assert_eq!(backup_snapshots(&h, &vm).await, kept);
    assert_eq!(std::fs::read_dir(undo).map(|d| d.count()).unwrap_or(0), 0, "the log is done with");
}

/// A killed incremental point of a VM on Ceph leaves no snapshot of its own: after every
/// recovery the images carry at most the recorded newest point's (a kill after the older
/// ones were dropped leaves none: the next point compares).
#[tokio::test]
async fn an_rbd_incremental_backup_killed_at_any_point_leaves_no_snapshot_of_its_own() {
    let (mut h, vm, full) = stopped_rbd_vm_with_a_full_point().await;
    let group = full.group_uuid.clone();
    let images: Vec<String> =
        h.recorded(&vm).await.iter().map(|p| p.trim_start_matches("ceph://").to_owned()).collect();
    let check = |app: std::sync::Arc<crate::app::App>| {
        let (group, images) = (group.clone(), images.clone());
        async move {
            let g = crate::backup_group::Group::locate(&app.backup_roots, None, &group).unwrap();
            let newest = crate::ops::bitmap_backup::checkpoint_name(&group, g.manifest().unwrap().points.len() - 1);
            let stop = crate::stop::Stop::new();
            for i in &images {
                let p = crate::ceph::path::CephPath::parse(i).unwrap();
                let names: Vec<String> =
                    app.rbd.snapshots(&p, &stop).await.unwrap().into_iter().map(|s| s.name).collect();
                assert!(names.iter().all(|n| *n == newest), "{i}: {names:?}, newest point {newest}");
            }
        }
    };
    let kills = kill_at_every_point_checked(
        &mut h,
        "/vm/backup",
        |app, ctx| {
            let body = json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group});
            async move { value(crate::ops::backup::backup(&app, &ctx, cmd(body)).await) }
        },
        check,
    )
    .await;
    assert!(kills >= 6, "{kills} kill points");
}

/// A clone whose capture fails after it took the source's RBD snapshots (here: the TPM state
/// cannot be copied) removes them again.
#[tokio::test]
async fn a_clone_whose_tpm_copy_fails_leaves_no_rbd_snapshot() {
    let (h, base, body) = rbd_host().await;
    let vm = uuid();
    let mut b = body(&vm);
    b["tpm"] = json!({"enable": true});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(b)).await.unwrap();
    let tpm = crate::ops::tpm::state_dir(&h.app.config.libvirt.swtpm_dir, &vm).join("tpm2");
    std::fs::create_dir_all(&tpm).unwrap();
    std::fs::write(tpm.join("tpm2-00.permall"), b"state").unwrap();
    // The staging directory of TPM copies cannot be made.
    std::fs::write(h.app.config.state_dir.join("staging"), b"").unwrap();
    let ctx = TaskCtx::detached("/vm/clone");
    let e = crate::ops::clone::clone(&h.app, &ctx, cmd(json!({"vmUuid": vm, "names": ["c"], "full": true})))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TPM state"), "{e}");
    let stop = crate::stop::Stop::new();
    for image in h.recorded(&vm).await {
        let p = crate::ceph::path::CephPath::parse(&image).unwrap();
        assert_eq!(h.app.rbd.snapshots(&p, &stop).await.unwrap().len(), 0, "{image} has no snapshot left");
    }
    assert_rbd_consistent(&h, &base).await;
}

#[tokio::test]
async fn linked_rbd_clones_keep_their_snapshot_without_listing_its_clones_and_copies_drop_it() {
    let (h, base, body) = rbd_host().await;
    let vm = uuid();
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body(&vm))).await.unwrap();
    let root = crate::ceph::path::CephPath::parse(h.recorded(&vm).await[0].trim_start_matches("ceph://")).unwrap();
    let temporary = |h: &TestHost| {
        let root = root.clone();
        let rbd = h.app.rbd.clone();
        async move {
            let snaps = rbd.snapshots(&root, &crate::stop::Stop::new()).await.unwrap();
            snaps.iter().filter(|s| s.name.starts_with(crate::ops::volumes::CLONE_SNAPSHOT_PREFIX)).count()
        }
    };

    let before = h.rbd.listings();
    let ctx = TaskCtx::detached("/vm/clone");
    let linked = json!({"vmUuid": vm, "names": ["a", "b", "c"], "strategy": "JustCreate"});
    let rsp = crate::ops::clone::clone(&h.app, &ctx, cmd(linked)).await.unwrap();
    assert_eq!(rsp.number_of_cloned_vm, 3);
    assert_eq!(h.rbd.listings(), before, "the clones just made show the snapshot is in use");
    assert_eq!(temporary(&h).await, 1, "the linked clones' snapshot stays");

    let copies = json!({"vmUuid": vm, "names": ["d"], "mode": "copy", "strategy": "JustCreate"});
    crate::ops::clone::clone(&h.app, &ctx, cmd(copies)).await.unwrap();
    assert_eq!(temporary(&h).await, 1, "the copies' snapshot is gone, the linked clones' stays");
    assert_rbd_consistent(&h, &base).await;
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

/// An RBD `/vm/create` killed after its second journaled step, on a host whose previous run
/// recorded its Ceph client as `addr`: the images the kill left behind (besides `base`).
async fn create_killed_by(h: &TestHost, addr: &str, body: impl Fn(&str) -> Value) -> Vec<String> {
    let ctx = h.task("/vm/create").await;
    let create = crate::ops::create::create(&h.app, &ctx, cmd(body(&uuid())));
    assert!(run_killed(h, "/vm/create", async { value(create.await) }, Kill::Step(2)).await, "killed");
    let fsid = crate::ceph::cluster::Cluster::fsid(h.ceph.as_ref()).await.unwrap();
    let client = crate::ceph::clients::Client { fsid, addr: addr.to_owned(), instance: 4100 };
    crate::ceph::clients::record(&h.app.config.state_dir, &client).unwrap();
    let left: Vec<String> = h.rbd.images().into_iter().filter(|i| i != "rbd/base").collect();
    assert!(!left.is_empty(), "the kill left the new root behind");
    left
}

#[tokio::test(start_paused = true)]
async fn recovery_blocklists_the_killed_runs_client_so_its_watches_do_not_hold_up_the_rollback() {
    use crate::ceph::clients::{self, Client};
    let (mut h, base, body) = rbd_host().await;
    let dead = "127.0.0.1:0/1001";
    for image in create_killed_by(&h, dead, body).await {
        h.rbd.watched_by_dead_client(&image, dead);
    }
    // A record of a client of another cluster the agent was once configured for.
    let elsewhere = Client { fsid: "another-cluster".into(), addr: "10.0.0.9:0/7".into(), instance: 1 };
    clients::record(&h.app.config.state_dir, &elsewhere).unwrap();

    let report = h.restart_and_recover().await;
    // The fake's dead watches go only by blocklisting: without it first, no removal succeeds.
    assert!(report.rolled_back.iter().all(|r| r.failures.is_empty()), "{report:?}");
    assert_rbd_consistent(&h, &base).await;
    assert_eq!(h.rbd.blocklisted(), [dead], "only the previous run's client on this cluster");
    assert_eq!(report.blocklisted_clients, [dead], "and recovery says so");
    assert!(clients::recorded(&h.app.config.state_dir).is_empty(), "the records are done with");
}

#[tokio::test]
async fn without_rbd_steps_to_undo_the_previous_client_is_still_blocklisted_after_the_rollback() {
    let mut h = TestHost::start();
    let fsid = crate::ceph::cluster::Cluster::fsid(h.ceph.as_ref()).await.unwrap();
    let client = crate::ceph::clients::Client { fsid, addr: "127.0.0.1:0/1003".into(), instance: 4101 };
    crate::ceph::clients::record(&h.app.config.state_dir, &client).unwrap();
    let report = h.restart_and_recover().await;
    assert_eq!(report.blocklisted_clients, h.rbd.blocklisted(), "{report:?}");
    assert_eq!(h.rbd.blocklisted(), [client.addr]);
}

#[tokio::test(start_paused = true)]
async fn a_refused_blocklist_falls_back_to_waiting_out_the_killed_clients_watch() {
    let (mut h, base, body) = rbd_host().await;
    create_killed_by(&h, "127.0.0.1:0/1002", body).await;
    h.rbd.refuse_blocklist();
    // The watch of the killed run's client, which the cluster times out after a while.
    h.rbd.watch_for(5);
    let report = h.restart_and_recover().await;
    assert!(report.rolled_back.iter().all(|r| r.failures.is_empty()), "{report:?}");
    assert_rbd_consistent(&h, &base).await;
    assert!(h.rbd.blocklisted().is_empty() && report.blocklisted_clients.is_empty());
    assert!(crate::ceph::clients::recorded(&h.app.config.state_dir).is_empty(), "the record is done with");
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

/// `h.create_cmd` with a cloud-init seed and one NIC.
fn cloud_init_create(h: &TestHost, vm: &str, image: &str, cloud_init: Value) -> Value {
    let mut body = h.create_cmd(vm, image);
    body["vm"]["nics"] = json!([{"mac": "52:54:00:12:34:56", "uuid": uuid(), "deviceId": 0, "bridgeName": "br0"}]);
    body["cloudInit"] = cloud_init;
    body
}

/// The seed of `vm` as the fake ISO writer wrote it (label, then each file), and its path.
async fn seed_of(h: &TestHost, vm: &str) -> (PathBuf, String) {
    let ci = h.app.vms.lock(vm).await.unwrap().load().unwrap().cloud_init.expect("a cloud-init seed");
    let text = std::fs::read_to_string(&ci.seed).unwrap();
    (ci.seed, text)
}

fn genid(h: &TestHost, vm: &str) -> String {
    let xml = h.hv.domain(vm).unwrap().xml;
    let doc = roxmltree::Document::parse(&xml).unwrap();
    doc.descendants().find(|n| n.has_tag_name("genid")).and_then(|n| n.text()).expect("a genid").to_owned()
}

#[tokio::test]
async fn create_with_cloud_init_attaches_a_seed_that_destroy_removes() {
    let h = TestHost::start();
    let (vm, image) = (uuid(), h.image("ci", 1 << 20).await);
    let ci = json!({"hostname": "alpha", "userData": "#cloud-config\nruncmd: [true]\n",
                    "sshKeys": ["ssh-ed25519 AAAAC3Nza me@host"],
                    "network": [{"mac": "52:54:00:12:34:56", "addresses": ["10.1.0.5/24"], "gateway": "10.1.0.1"}]});
    let body = cloud_init_create(&h, &vm, &image, ci);
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap();
    let (seed, text) = seed_of(&h, &vm).await;
    assert_eq!(seed.parent(), PathBuf::from(&h.recorded(&vm).await[0]).parent(), "beside the root");
    for want in [
        "cidata\n",
        "\"local-hostname\": \"alpha\"",
        &format!("\"instance-id\": \"{vm}\""),
        "ssh-ed25519 AAAAC3Nza me@host",
        "== user-data ==\n#cloud-config\nruncmd: [true]\n",
        "\"macaddress\": \"52:54:00:12:34:56\"",
        "\"via\": \"10.1.0.1\"",
    ] {
        assert!(text.contains(want), "{want:?} not in the seed:\n{text}");
    }
    let xml = h.hv.domain(&vm).unwrap().xml;
    assert!(xml.contains(&format!("<source file='{}'/>", seed.display())), "{xml}");
    uuid::Uuid::parse_str(&genid(&h, &vm)).expect("a uuid genid");
    assert_consistent(&h).await;

    let destroy = crate::wire::decode(&json!({"uuid": vm})).unwrap();
    crate::compat::vm::destroy(&h.app, &TaskCtx::detached("/vm/destroy"), destroy).await.unwrap();
    assert!(!seed.exists(), "the seed goes with the VM");
}

#[tokio::test]
async fn a_failed_create_or_bad_cloud_init_leaves_no_seed() {
    let ctx = TaskCtx::detached("/vm/create");
    for (fault, ci, want) in [
        (Some("create"), json!({}), "start domain"),
        (Some("xorriso"), json!({}), "cloud-init seed"),
        (None, json!({"network": [{"mac": "52:54:00:00:00:99", "dhcp": true}]}), "cloudInit.network[0]"),
        (None, json!({"hostname": "a_b"}), "cloudInit.hostname"),
    ] {
        let h = TestHost::start();
        let image = h.image("ci", 1 << 20).await;
        let before = h.files();
        if let Some(f) = fault {
            h.faults.fail(f);
        }
        let vm = uuid();
        let e =
            crate::ops::create::create(&h.app, &ctx, cmd(cloud_init_create(&h, &vm, &image, ci))).await.unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert_eq!(h.files(), before, "nothing is left behind ({want})");
        assert!(h.hv.domain(&vm).is_none() && !h.app.vms.is_known(&vm));
    }
}

#[tokio::test]
async fn clones_get_their_own_seed_hostname_and_genid() {
    let h = TestHost::start();
    let (vm, image) = (uuid(), h.image("ci", 1 << 20).await);
    let ci = json!({"hostname": "alpha", "network": [{"mac": "52:54:00:12:34:56", "dhcp": true}]});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(cloud_init_create(&h, &vm, &image, ci)))
        .await
        .unwrap();
    let body =
        json!({"vmUuid": vm, "clones": [{"name": "Web 2"}, {"name": "c", "cloudInit": {"hostname": "gamma.example"}}]});
    let rsp = crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(body)).await.unwrap();
    assert_eq!(rsp.number_of_cloned_vm, 2, "{:?}", rsp.inventories);
    let mut genids = vec![genid(&h, &vm)];
    for (inv, host) in rsp.inventories.iter().zip(["web-2", "gamma.example"]) {
        let clone = inv["inventory"]["uuid"].as_str().unwrap();
        let (_, text) = seed_of(&h, clone).await;
        assert!(text.contains(&format!("\"local-hostname\": \"{host}\"")), "{text}");
        let mac = &h.app.vms.lock(clone).await.unwrap().load().unwrap().nics[0].mac;
        assert!(text.contains(&format!("\"macaddress\": \"{mac}\"")), "the clone's own NIC: {text}");
        genids.push(genid(&h, clone));
    }
    assert_eq!(genids.iter().collect::<BTreeSet<_>>().len(), 3, "{genids:?}");
    let (_, source) = seed_of(&h, &vm).await;
    assert!(source.contains("\"local-hostname\": \"alpha\""), "the source's seed is its own");
    assert_consistent(&h).await;

    // A static address is the source's own: a clone must be given its own.
    let static_ci = json!({"network": [{"mac": "52:54:00:12:34:56", "addresses": ["10.0.0.5/24"]}]});
    let other = uuid();
    let create = cmd(cloud_init_create(&h, &other, &image, static_ci));
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), create).await.unwrap();
    let rsp = crate::ops::clone::clone(
        &h.app,
        &TaskCtx::detached("/vm/clone"),
        cmd(json!({"vmUuid": other, "names": ["x"]})),
    )
    .await;
    let e = rsp.expect_err("a clone of a static address");
    assert!(e.to_string().contains("static addresses"), "{e}");
}

#[tokio::test]
async fn a_create_with_cloud_init_killed_at_any_point_is_rolled_back() {
    let (mut h, _, image) = kill_host().await;
    let kills = kill_at_every_point(&mut h, "/vm/create", |app, ctx| {
        let root = app.storage.roots().roots()[0].join(format!("k/{}.qcow2", uuid()));
        let body = json!({
            "vm": {"vmInstanceUuid": uuid(), "vmName": "k", "memory": 67108864, "cpuNum": 1},
            "rootVolume": {"volumeUuid": uuid(), "installPath": root.display().to_string(), "imagePath": image.clone()},
            "cloudInit": {"hostname": "k"},
        });
        async move { value(crate::ops::create::create(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 8, "{kills} kill points");
}

#[tokio::test]
async fn vms_from_a_snapshot_group_or_a_backup_get_a_new_genid_and_the_seed_asked_for() {
    let h = TestHost::start();
    let (vm, image) = (uuid(), h.image("ci", 1 << 20).await);
    let create = cmd(cloud_init_create(&h, &vm, &image, json!({"hostname": "alpha"})));
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), create).await.unwrap();
    let ctx = TaskCtx::detached("/vm/test");
    let group = crate::ops::snapshot_group::take(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap();
    let backup = crate::ops::backup::backup(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap();

    let from_group = |ci: Option<Value>| {
        let mut body = json!({"groupUuid": group.group_uuid});
        if let Some(ci) = ci {
            body["cloudInit"] = ci;
        }
        body
    };
    let restored = json!({"groupUuid": backup.group_uuid, "cloudInit": {"hostname": "restored"}});
    let made = [
        crate::ops::snapshot_group::create_from(&h.app, &ctx, cmd(from_group(Some(json!({"hostname": "snap"})))))
            .await
            .unwrap(),
        crate::ops::backup::create_from(&h.app, &ctx, cmd(restored)).await.unwrap(),
        crate::ops::snapshot_group::create_from(&h.app, &ctx, cmd(from_group(None))).await.unwrap(),
    ];
    let mut genids = BTreeSet::from([genid(&h, &vm)]);
    for (inv, host) in made.iter().zip([Some("snap"), Some("restored"), None]) {
        genids.insert(genid(&h, &inv.uuid));
        let spec = h.app.vms.lock(&inv.uuid).await.unwrap().load().unwrap();
        assert_eq!(spec.cloud_init.as_ref().map(|c| c.hostname.as_str()), host, "{}", inv.uuid);
        if host.is_some() {
            let (_, text) = seed_of(&h, &inv.uuid).await;
            assert!(text.contains(&format!("\"instance-id\": \"{}\"", inv.uuid)), "{text}");
        }
    }
    assert_eq!(genids.len(), 4, "each VM has its own generation ID: {genids:?}");
    assert_consistent(&h).await;
}

#[tokio::test]
async fn zstack_start_keeps_the_genid_and_seed_the_agent_recorded() {
    let h = TestHost::start();
    let (vm, image) = (uuid(), h.image("ci", 1 << 20).await);
    let create = cmd(cloud_init_create(&h, &vm, &image, json!({"hostname": "alpha"})));
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), create).await.unwrap();
    let before = h.app.vms.lock(&vm).await.unwrap().load().unwrap();
    let wire = crate::wire::vm::StartVmCmd::from_spec(&before);
    h.app.libvirt.destroy(&vm).await.unwrap();
    let owner = h.app.vms.lock(&vm).await.unwrap();
    crate::ops::start(&h.app, &TaskCtx::detached("/vm/start"), &owner, wire).await.unwrap();
    let after = owner.load().unwrap();
    assert_eq!((&after.genid, &after.cloud_init), (&before.genid, &before.cloud_init));
    assert!(h.hv.domain(&vm).unwrap().xml.contains(before.cloud_init.unwrap().seed.to_str().unwrap()));
}

#[tokio::test]
async fn the_seed_of_a_vm_on_rbd_goes_under_the_first_storage_root() {
    let (h, _, body) = rbd_host().await;
    let vm = uuid();
    let mut create = body(&vm);
    create["cloudInit"] = json!({"hostname": "r"});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(create)).await.unwrap();
    let (seed, text) = seed_of(&h, &vm).await;
    assert_eq!(seed, h.root.join(crate::ops::cloud_init::RBD_SEED_DIR).join(format!("cidata-{vm}.iso")));
    assert!(text.contains("\"local-hostname\": \"r\""), "{text}");
    let rsp =
        crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(json!({"vmUuid": vm, "names": ["c"]})))
            .await
            .unwrap();
    let clone = rsp.inventories[0]["inventory"]["uuid"].as_str().unwrap().to_owned();
    let (clone_seed, text) = seed_of(&h, &clone).await;
    assert_eq!(clone_seed.parent(), seed.parent());
    assert!(text.contains("\"local-hostname\": \"c\""), "{text}");
}

/// A host with one running VM whose guest agent answers.
async fn quiesce_host() -> (TestHost, String) {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    h.hv.set_guest_agent(&vm, GuestAgent::Answering);
    (h, vm)
}

fn guest_freezes(h: &TestHost, vm: &str) -> usize {
    let d = h.hv.domain(vm).unwrap();
    assert!(!d.guest_frozen, "the guest is thawed after the capture");
    d.guest_freezes
}

#[tokio::test]
async fn captures_of_a_running_vm_are_quiesced_when_its_guest_agent_answers() {
    let (h, vm) = quiesce_host().await;
    let ctx = TaskCtx::detached("/vm/snapshotgroup/take");
    let group = crate::ops::snapshot_group::take(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap();
    assert!(group.quiesced);
    assert_eq!(guest_freezes(&h, &vm), 1);
    let get = cmd(json!({"groupUuid": group.group_uuid}));
    assert!(crate::ops::snapshot_group::get(&h.app, &ctx, get).await.unwrap().quiesced, "the group records it");

    let rsp =
        crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(json!({"vmUuid": vm, "names": ["c"]})))
            .await
            .unwrap();
    assert!(rsp.quiesced && rsp.number_of_cloned_vm == 1);
    let rsp =
        crate::ops::backup::backup(&h.app, &TaskCtx::detached("/vm/backup"), cmd(json!({"vmUuid": vm}))).await.unwrap();
    assert!(rsp.quiesced && rsp.manifest.points[0].quiesced, "the answer and the manifest's point say so");
    assert_eq!(guest_freezes(&h, &vm), 3);

    let off = json!({"vmUuid": vm, "quiesce": "off"});
    assert!(!crate::ops::snapshot_group::take(&h.app, &ctx, cmd(off)).await.unwrap().quiesced);
    assert_eq!(guest_freezes(&h, &vm), 3, "quiesce off asks the guest nothing");
    assert_consistent(&h).await;
}

#[tokio::test]
async fn without_a_guest_agent_a_capture_is_crash_consistent_unless_quiesce_is_required() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let ctx = TaskCtx::detached("/vm/snapshotgroup/take");
    let group = crate::ops::snapshot_group::take(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap();
    assert!(!group.quiesced, "the group is made, crash-consistent");

    let (files, before) = (h.recorded(&vm).await, h.files());
    let required = json!({"vmUuid": vm, "quiesce": "required"});
    let e = crate::ops::snapshot_group::take(&h.app, &ctx, cmd(required.clone())).await.unwrap_err();
    assert!(e.to_string().contains("guest agent is not connected"), "{e}");
    let e = crate::ops::backup::backup(&h.app, &TaskCtx::detached("/vm/backup"), cmd(required)).await.unwrap_err();
    assert!(e.to_string().contains("cannot quiesce VM"), "{e}");
    assert_eq!((h.recorded(&vm).await, h.files()), (files, before), "a refused capture changes nothing");

    // A stopped VM is captured as it is: there is nothing to quiesce.
    h.app.libvirt.destroy(&vm).await.unwrap();
    let required = json!({"vmUuid": vm, "quiesce": "required"});
    assert!(!crate::ops::snapshot_group::take(&h.app, &ctx, cmd(required)).await.unwrap().quiesced);
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_failed_capture_thaws_the_guest() {
    let (h, vm) = quiesce_host().await;
    h.faults.fail("snapshotCreateXML");
    let ctx = TaskCtx::detached("/vm/snapshotgroup/take");
    crate::ops::snapshot_group::take(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap_err();
    assert_eq!(guest_freezes(&h, &vm), 1, "frozen once, and thawed");
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_guest_agent_failing_to_freeze_leaves_the_capture_crash_consistent_or_refused() {
    let (h, vm) = quiesce_host().await;
    h.faults.fail("domainFSFreeze");
    let ctx = TaskCtx::detached("/vm/snapshotgroup/take");
    let group = crate::ops::snapshot_group::take(&h.app, &ctx, cmd(json!({"vmUuid": vm}))).await.unwrap();
    assert!(!group.quiesced);
    let required = json!({"vmUuid": vm, "quiesce": "required"});
    let e = crate::ops::snapshot_group::take(&h.app, &ctx, cmd(required)).await.unwrap_err();
    assert!(e.to_string().contains("domainFSFreeze"), "{e}");
    assert_eq!(guest_freezes(&h, &vm), 0);
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_kill_while_the_guest_is_frozen_is_thawed_by_recovery() {
    // The thaw is journaled before the freeze: the first kill point that finds the guest frozen
    // is the first journaled step after the freeze.
    for step in 1.. {
        assert!(step <= 10, "no kill point within 10 steps finds the guest frozen");
        let (mut h, vm) = quiesce_host().await;
        let ctx = h.task("/vm/snapshotgroup/take").await;
        let app = h.app.clone();
        let body = json!({"vmUuid": vm});
        let op = async move { value(crate::ops::snapshot_group::take(&app, &ctx, cmd(body)).await) };
        assert!(run_killed(&h, "/vm/snapshotgroup/take", op, Kill::Step(step)).await, "killed at step {step}");
        if !h.hv.domain(&vm).unwrap().guest_frozen {
            continue;
        }
        let report = h.restart_and_recover().await;
        assert!(report.rolled_back.iter().all(|r| r.failures.is_empty()), "{report:?}");
        assert_eq!(guest_freezes(&h, &vm), 1, "thawed by recovery");
        assert_consistent(&h).await;
        return;
    }
}

#[tokio::test]
async fn a_quiesced_snapshot_group_killed_at_any_point_leaves_no_guest_frozen() {
    let (mut h, vm) = quiesce_host().await;
    let kills = kill_at_every_point(&mut h, "/vm/snapshotgroup/take", |app, ctx| {
        let body = json!({"vmUuid": vm});
        async move { value(crate::ops::snapshot_group::take(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 8, "{kills} kill points");
}

#[test]
fn a_bad_quiesce_mode_is_refused_naming_the_field() {
    for bad in [json!("sometimes"), json!(true), json!("REQUIRED")] {
        let body = json!({"vmUuid": uuid(), "quiesce": bad});
        let e = decode_native::<crate::wire::native::TakeSnapshotGroupCmd>(&body).unwrap_err();
        assert!(e.to_string().contains("quiesce"), "{e}");
    }
}

const TPM_KEY: [u8; 32] = [7; 32];

fn tpm_key_b64(key: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

#[tokio::test]
async fn an_encrypted_tpm_gets_its_secret_and_clones_their_own_with_the_same_key() {
    let h = TestHost::start();
    let (vm, image) = (uuid(), h.image("i", 4 << 20).await);
    let mut body = h.create_cmd(&vm, &image);
    body["tpm"] = json!({"enable": true, "key": tpm_key_b64(&TPM_KEY)});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap();
    let secret = crate::domain::tpm_secret_uuid(&vm);
    assert_eq!(h.hv.secret_uuids(), std::slice::from_ref(&secret));
    assert_eq!(h.app.libvirt.vtpm_secret_value(&secret).await.unwrap().as_deref(), Some(&TPM_KEY[..]));
    assert!(h.hv.domain(&vm).unwrap().xml.contains(&format!("<encryption secret='{secret}'/>")));
    let record = std::fs::read_to_string(h.app.config.state_dir.join("vms").join(format!("{vm}.json"))).unwrap();
    assert!(!record.contains(&tpm_key_b64(&TPM_KEY)), "the key is not kept in the record: {record}");

    let rsp =
        crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(json!({"vmUuid": vm, "names": ["c"]})))
            .await
            .unwrap();
    let clone = rsp.inventories[0]["inventory"]["uuid"].as_str().unwrap().to_owned();
    let own = crate::domain::tpm_secret_uuid(&clone);
    assert_eq!(h.app.libvirt.vtpm_secret_value(&own).await.unwrap().as_deref(), Some(&TPM_KEY[..]), "the same key");
    assert!(h.hv.domain(&clone).unwrap().xml.contains(&format!("<encryption secret='{own}'/>")));

    // A failing clone leaves no secret of its own behind.
    h.faults.fail("create");
    let r =
        crate::ops::clone::clone(&h.app, &TaskCtx::detached("/vm/clone"), cmd(json!({"vmUuid": vm, "names": ["d"]})))
            .await
            .unwrap();
    assert_eq!(r.number_of_cloned_vm, 0);
    let mut left = h.hv.secret_uuids();
    left.sort();
    let mut want = vec![secret, own];
    want.sort();
    assert_eq!(left, want);
}

#[tokio::test]
async fn a_failed_create_removes_the_tpm_secret_and_bad_keys_are_refused() {
    let h = TestHost::start();
    let image = h.image("i", 4 << 20).await;
    h.faults.fail("create");
    let mut body = h.create_cmd(&uuid(), &image);
    body["tpm"] = json!({"enable": true, "key": tpm_key_b64(&TPM_KEY)});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap_err();
    assert!(h.hv.secret_uuids().is_empty(), "the secret is undone with the domain");

    for (tpm, field) in [
        (json!({"enable": true, "key": "not base64!"}), "tpm.key is not base64"),
        (json!({"enable": true, "key": tpm_key_b64(&[1; 16])}), "tpm.key holds 16 bytes"),
        (json!({"enable": false, "key": tpm_key_b64(&TPM_KEY)}), "tpm.enable is false"),
    ] {
        let mut body = h.create_cmd(&uuid(), &image);
        body["tpm"] = tpm;
        let e = crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap_err();
        assert!(e.to_string().contains(field), "{e}");
    }
    assert!(h.hv.secret_uuids().is_empty());

    // A secret of another usage that has the VM's uuid is left alone.
    let vm = uuid();
    let ceph = crate::domain::tpm_secret_uuid(&vm);
    h.app.libvirt.set_ceph_secret(&ceph, b"cephx".to_vec()).await.unwrap();
    let mut body = h.create_cmd(&vm, &image);
    body["tpm"] = json!({"enable": true, "key": tpm_key_b64(&TPM_KEY)});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap_err();
    assert_eq!(h.hv.secret_uuids(), [ceph]);
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

#[tokio::test]
async fn a_backup_keeps_the_tpm_state_of_its_point_and_a_restore_starts_with_it() {
    let h = TestHost::start();
    let vm = uuid();
    let mut body = h.create_cmd(&vm, &h.image("tpm", 1 << 20).await);
    body["tpm"] = json!({"enable": true});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap();
    let tpm = crate::ops::tpm::state_dir(&h.app.config.libvirt.swtpm_dir, &vm).join("tpm2");
    std::fs::create_dir_all(&tpm).unwrap();
    std::fs::write(tpm.join("tpm2-00.permall"), b"sealed at the point").unwrap();

    let rsp =
        crate::ops::backup::backup(&h.app, &TaskCtx::detached("/vm/backup"), cmd(json!({"vmUuid": vm}))).await.unwrap();
    assert!(rsp.manifest.points[0].tpm, "the point says it kept the TPM state");
    std::fs::write(tpm.join("tpm2-00.permall"), b"later").unwrap();

    let body = json!({"groupUuid": rsp.group_uuid, "point": 0, "vm": {"vmName": "restored"}});
    let inv =
        crate::ops::backup::create_from(&h.app, &TaskCtx::detached("/vm/createfrombackup"), cmd(body)).await.unwrap();
    let restored = serde_json::to_value(&inv).unwrap()["uuid"].as_str().unwrap().to_owned();
    let restored_tpm = crate::ops::tpm::state_dir(&h.app.config.libvirt.swtpm_dir, &restored).join("tpm2");
    assert_eq!(std::fs::read(restored_tpm.join("tpm2-00.permall")).unwrap(), b"sealed at the point");
    assert_consistent(&h).await;
}

#[tokio::test]
async fn a_backup_of_a_vm_with_a_tpm_killed_at_any_point_leaves_nothing() {
    let (mut h, _, image) = kill_host().await;
    let vm = uuid();
    let mut body = h.create_cmd(&vm, &image);
    body["tpm"] = json!({"enable": true});
    crate::ops::create::create(&h.app, &TaskCtx::detached("/vm/create"), cmd(body)).await.unwrap();
    let tpm = crate::ops::tpm::state_dir(&h.app.config.libvirt.swtpm_dir, &vm).join("tpm2");
    std::fs::create_dir_all(&tpm).unwrap();
    std::fs::write(tpm.join("tpm2-00.permall"), b"state").unwrap();
    let kills = kill_at_every_point(&mut h, "/vm/backup", |app, ctx| {
        let body = json!({"vmUuid": vm});
        async move { value(crate::ops::backup::backup(&app, &ctx, cmd(body)).await) }
    })
    .await;
    assert!(kills >= 3, "{kills} kill points");
}

#[tokio::test]
async fn recovery_removes_a_killed_runs_temporary_files_however_young_and_keeps_this_runs() {
    let mut h = TestHost::start();
    let dir = h.root.join("rootVolumes/acct-a/vol-b");
    std::fs::create_dir_all(&dir).unwrap();
    // Written just now, as by a killed run's copy finishing its last write after the restart.
    let left = dir.join(".b.qcow2.kvmagent-tmp-0123456789ab-00112233445566778899aabbccddeeff");
    let building = crate::storage::local::Building::beside(&dir.join("b.qcow2"));
    for f in [&left, &building.path().to_path_buf()] {
        std::fs::write(f, b"partial").unwrap();
    }
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::File::options().write(true).open(&left).unwrap().set_modified(later).unwrap();
    let report = h.restart_and_recover().await;
    assert_eq!(report.removed, vec![left.clone()], "{report:?}");
    assert!(!left.exists() && building.path().exists(), "this run's own volume being built stays");
}

/// A backup job a killed agent left running is aborted, and waited for, before the failed
/// point's checkpoint is deleted: libvirt ends an aborted job after answering the abort.
#[tokio::test(start_paused = true)]
async fn a_left_backup_job_ends_before_the_failed_points_checkpoint_is_deleted() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let name = crate::ops::bitmap_backup::checkpoint_name("g", 0);
    let xml = format!("<domaincheckpoint><name>{name}</name></domaincheckpoint>");
    h.app.libvirt.checkpoint_redefine(&vm, xml).await.unwrap();
    h.hv.leave_backup_job(&vm, 3, &[]);
    crate::ops::bitmap_backup::undo_bitmap(&h.app, &vm, &name, &[]).await.unwrap();
    assert!(h.hv.domain(&vm).unwrap().checkpoints.is_empty(), "the checkpoint went once the job had ended");
    assert_eq!(h.app.libvirt.backup_job(&vm).await.unwrap(), crate::libvirt::backup::BackupJobState::Completed);
}

/// The undo of a point of a running VM (as it was journaled: the point's bitmap, its target,
/// the job) ends the job before the target goes.
#[tokio::test(start_paused = true)]
async fn a_left_backup_job_ends_before_its_target_is_removed() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let target =
        PathBuf::from(h.path("backup/g/v/.0.qcow2.kvmagent-tmp-0123456789ab-00112233445566778899aabbccddeeff"));
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::write(&target, b"partial").unwrap();
    h.hv.leave_backup_job(&vm, 3, std::slice::from_ref(&target));
    let name = crate::ops::bitmap_backup::checkpoint_name("g", 0);
    let steps = vec![
        UndoStep::RemoveBitmap { vm: vm.clone(), name, files: Vec::new() },
        UndoStep::RemoveFile { path: target.clone() },
        UndoStep::EndBackupJob { vm: vm.clone() },
    ];
    let owner = h.app.vms.lock(&vm).await.unwrap();
    let failed = crate::ops::undo::replay(&h.app, steps, &[&owner]).await.failed;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(!target.exists());
    assert!(!h.hv.domain(&vm).unwrap().job_ended_without_its_targets, "the job ended before its target went");
}

/// A backup manifest a kill caught half-written (its temporary file) goes at the next start;
/// the manifest stays, and so does a temporary file written since the start.
#[tokio::test]
async fn recovery_removes_a_torn_backup_manifest_and_keeps_the_manifest() {
    let mut h = TestHost::start();
    let group = h.app.backup_roots.roots()[0].join("0123456789abcdef0123456789abcdef");
    std::fs::create_dir_all(&group).unwrap();
    let manifest = group.join(crate::backup_group::MANIFEST);
    let torn = group.join(format!(".{}.tmp-00112233445566778899aabbccddeeff", crate::backup_group::MANIFEST));
    let this_runs = group.join(format!(".{}.tmp-ffeeddccbbaa99887766554433221100", crate::backup_group::MANIFEST));
    for f in [&manifest, &torn, &this_runs] {
        std::fs::write(f, b"{}").unwrap();
    }
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    std::fs::File::options().write(true).open(&this_runs).unwrap().set_modified(later).unwrap();
    let report = h.restart_and_recover().await;
    assert_eq!(report.removed, vec![torn.clone()], "{report:?}");
    assert!(!torn.exists() && manifest.exists() && this_runs.exists());
}

#[tokio::test]
async fn recovery_makes_a_record_follow_only_a_file_the_running_vm_really_has() {
    let mut h = TestHost::start();
    let vm = h.running_vm().await;
    let live = h.path(&format!("rootVolumes/vol-{vm}/root.qcow2"));
    let other = h.path(&format!("rootVolumes/vol-{vm}/other.qcow2"));
    std::fs::copy(&live, &other).unwrap();
    let owner = h.app.vms.lock(&vm).await.unwrap();
    let mut spec = owner.load().unwrap();
    spec.volumes[0].location = crate::storage::location::Location::File(other.clone().into());
    owner.save(&spec).unwrap();
    drop(owner);
    let recorded = |h: &TestHost| {
        let owner = futures::executor::block_on(h.app.vms.lock(&vm)).unwrap();
        owner.load().unwrap().root().install_path()
    };

    // The file the domain's XML names is gone (libvirt's view of a pivot in flight, whose top
    // recovery removed): the record stays on the file it names.
    let aside = h.path("aside.qcow2");
    std::fs::rename(&live, &aside).unwrap();
    let report = h.restart_and_recover().await;
    assert!(report.records_updated.is_empty(), "{report:?}");
    assert_eq!(recorded(&h), other);

    // The VM runs on a file its record does not name (a kill between the switch and the
    // record): the record follows it.
    std::fs::rename(&aside, &live).unwrap();
    let report = h.restart_and_recover().await;
    assert_eq!(report.records_updated, vec![vm.clone()], "{report:?}");
    assert_eq!(recorded(&h), live);
}

#[tokio::test(start_paused = true)]
async fn a_watch_the_blocklist_does_not_drop_goes_with_the_half_made_images_header() {
    let (mut h, base, body) = rbd_host().await;
    let dead = "127.0.0.1:0/1004";
    for image in create_killed_by(&h, dead, body).await {
        h.rbd.stuck_watch(&image, dead);
    }
    let report = h.restart_and_recover().await;
    assert!(report.rolled_back.iter().all(|r| r.failures.is_empty()), "{report:?}");
    assert_rbd_consistent(&h, &base).await;
}

#[tokio::test(start_paused = true)]
async fn a_watch_of_a_client_not_blocklisted_is_never_dropped() {
    let (mut h, _, body) = rbd_host().await;
    let images = create_killed_by(&h, "127.0.0.1:0/1005", body).await;
    for image in &images {
        h.rbd.stuck_watch(image, "127.0.0.1:0/1005");
    }
    h.rbd.refuse_blocklist();
    let report = h.restart_and_recover().await;
    assert!(report.rolled_back.iter().any(|r| !r.failures.is_empty()), "the watched image is kept: {report:?}");
    let left = h.rbd.images();
    assert!(images.iter().all(|i| left.contains(i)), "{left:?}");
}
