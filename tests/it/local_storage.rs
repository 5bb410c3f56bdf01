//! `/localstorage/*` on real qcow2 files: effects checked with qemu-img, bad input changes nothing.

use std::time::Duration;

use kvmagent_host_tests::checks::{file_sha256, qemu_img, qemu_img_info};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Every file under the storage root, for "nothing changed" checks.
fn tree(h: &Host) -> Vec<String> {
    fn walk(dir: &std::path::Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    let mut v = Vec::new();
    walk(&h.root, &mut v);
    v.sort();
    v
}

#[tokio::test]
async fn volume_paths_have_real_effects() {
    let h = Host::start().await.unwrap();
    let init = h.call_ok("/localstorage/init", &json!({"path": h.root, "hostUuid": "h"})).await.unwrap();
    assert!(init["totalCapacity"].as_u64().unwrap() > 0 && init["availableCapacity"].as_u64().unwrap() > 0, "{init}");

    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let r = h.call_ok("/localstorage/checkbits", &json!({"path": base.path})).await.unwrap();
    assert_eq!(r["existing"], true);
    let r = h.call_ok("/localstorage/checkbits", &json!({"path": h.path("none.qcow2")})).await.unwrap();
    assert_eq!(r["existing"], false);

    // A grown overlay on the cache, then a data volume backed by it, with ZStack's options.
    let (_, root) = root_volume_path(&h);
    let r = h
        .call_ok(
            "/localstorage/volume/createvolumefromcache",
            &json!({"templatePathInCache": base.path, "installUrl": root, "volumeUuid": "r", "virtualSize": 64 * MIB}),
        )
        .await
        .unwrap();
    assert_eq!(r["size"].as_u64(), Some(64 * MIB));
    assert!(r["totalCapacity"].as_u64().is_some(), "{r}");
    let (_, data) = data_volume_path(&h);
    let r = h
        .call_ok(
            "/localstorage/volume/createempty",
            &json!({"installUrl": data, "size": 0, "volumeUuid": "d", "backingFile": root, "kvmHostAddons": {"qcow2Options": " -o cluster_size=2097152 "}}),
        )
        .await
        .unwrap();
    assert_eq!(r["size"].as_u64(), Some(64 * MIB));
    let info = qemu_img_info(&data).unwrap();
    assert_eq!(info["cluster-size"].as_u64(), Some(2 * MIB));
    assert_eq!(info["backing-filename"].as_str(), root.to_str());

    let chain = h
        .call_ok("/localstorage/volume/getbackingchain", &json!({"installPath": data, "volumeUuid": "d"}))
        .await
        .unwrap();
    let names: Vec<&str> = chain["backingChain"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, [root.to_str().unwrap(), base.path.to_str().unwrap()], "parent first, base last");

    let size =
        h.call_ok("/localstorage/volume/getsize", &json!({"installPath": data, "volumeUuid": "d"})).await.unwrap();
    assert_eq!(size["size"].as_u64(), Some(64 * MIB));
    assert!(size["actualSize"].as_u64().unwrap() > 0);

    // Thick empty volume: fully allocated on disk.
    let (_, thick) = data_volume_path(&h);
    h.call_ok(
        "/localstorage/volume/createempty",
        &json!({"installUrl": thick, "size": 32 * MIB, "volumeUuid": "t", "kvmHostAddons": {"qcow2Options": "-o preallocation=falloc"}}),
    )
    .await
    .unwrap();
    assert!(qemu_img_info(&thick).unwrap()["actual-size"].as_u64().unwrap() >= 32 * MIB);

    // Delete: refused while open (inUse), then done, then idempotent.
    let held = std::fs::File::open(&thick).unwrap();
    let r = h.call("/localstorage/delete", &json!({"path": thick})).await.unwrap();
    assert_eq!((r["success"].as_bool(), r["inUse"].as_bool()), (Some(false), Some(true)), "{r}");
    assert!(thick.exists());
    drop(held);
    h.call_ok("/localstorage/delete", &json!({"path": thick})).await.unwrap();
    assert!(!thick.exists() && !thick.parent().unwrap().exists(), "the file and its vol- directory are gone");
    h.call_ok("/localstorage/delete", &json!({"path": thick})).await.unwrap();
}

#[tokio::test]
async fn bad_storage_commands_change_nothing() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let base_sha = file_sha256(&base.path).unwrap();
    let outside_dir = tempfile::tempdir().unwrap();
    let outside = outside_dir.path().join("x.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", outside.to_str().unwrap(), "16M"]).unwrap();
    // An image in the cache whose backing file leaves the roots: the classic injection.
    let evil = h.path(&format!("imagecache/template/{0}/{0}.qcow2", uuid()));
    std::fs::create_dir_all(evil.parent().unwrap()).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", outside.to_str().unwrap(), evil.to_str().unwrap()])
        .unwrap();
    // A raw file posing under a qcow2 name: it is used as what it is, never as qcow2.
    let (_, existing) = data_volume_path(&h);
    std::fs::create_dir_all(existing.parent().unwrap()).unwrap();
    std::fs::write(&existing, b"precious bytes").unwrap();
    let before = tree(&h);

    let (_, target) = root_volume_path(&h);
    let root_str = h.root.display().to_string();
    let cases = vec![
        (
            "/localstorage/volume/createvolumefromcache",
            json!({"templatePathInCache": base.path, "installUrl": outside_dir.path().join("y.qcow2")}),
            "outside the storage roots",
        ),
        (
            "/localstorage/volume/createvolumefromcache",
            json!({"templatePathInCache": outside, "installUrl": target}),
            "outside the storage roots",
        ),
        (
            "/localstorage/volume/createvolumefromcache",
            json!({"templatePathInCache": evil, "installUrl": target}),
            "outside the storage roots",
        ),
        (
            "/localstorage/volume/createvolumefromcache",
            json!({"templatePathInCache": h.path("imagecache/none.qcow2"), "installUrl": target}),
            "unable to find image in cache",
        ),
        (
            "/localstorage/volume/createvolumefromcache",
            json!({"templatePathInCache": base.path, "installUrl": format!("{root_str}/a/../../../etc/x.qcow2")}),
            "..",
        ),
        ("/localstorage/volume/createvolumefromcache", json!({"templatePathInCache": base.path}), "installUrl"),
        (
            "/localstorage/volume/createvolumefromcache",
            json!({"templatePathInCache": base.path, "installUrl": existing}),
            "already exists",
        ),
        (
            "/localstorage/volume/createvolumefromcache",
            json!({"templatePathInCache": base.path, "installUrl": target, "virtualSize": MIB}),
            "cannot shrink",
        ),
        ("/localstorage/volume/createempty", json!({"installUrl": target, "size": "big"}), "size"),
        (
            "/localstorage/volume/createempty",
            json!({"installUrl": target, "size": MIB, "kvmHostAddons": {"qcow2Options": "-o size=1; rm -rf /"}}),
            "qcow2Options",
        ),
        (
            "/localstorage/volume/createempty",
            json!({"installUrl": target, "size": MIB, "backingFile": outside}),
            "outside the storage roots",
        ),
        ("/localstorage/volume/createempty", json!({"installUrl": "relative.qcow2", "size": MIB}), "absolute"),
        ("/localstorage/delete", json!({"path": outside}), "outside the storage roots"),
        ("/localstorage/volume/getsize", json!({"installPath": "/etc/passwd"}), "outside the storage roots"),
    ];
    for (path, body, needle) in cases {
        let e = h.call_err(path, &body).await.unwrap();
        assert!(e.contains(needle), "{path} {body}: expected {needle:?} in {e}");
    }
    assert_eq!(tree(&h), before, "refused commands leave the storage root as it was");
    assert_eq!(file_sha256(&base.path).unwrap(), base_sha);
    assert_eq!(std::fs::read(&existing).unwrap(), b"precious bytes");
    assert!(outside.exists());
}

/// A volume that takes seconds to build: full preallocation writes every byte.
fn slow_volume_cmd(h: &Host, api: &str) -> (std::path::PathBuf, serde_json::Value) {
    let (_, path) = data_volume_path(h);
    let body = json!({
        "installUrl": path, "size": 8u64 << 30, "volumeUuid": "slow",
        "kvmHostAddons": {"qcow2Options": "-o preallocation=full"},
        "threadContext": {"api": api},
    });
    (path, body)
}

fn dir_is_empty_or_gone(p: &std::path::Path) -> bool {
    std::fs::read_dir(p).map(|mut d| d.next().is_none()).unwrap_or(true)
}

#[tokio::test]
async fn cancel_stops_a_running_task_and_leaves_no_volume() {
    let h = Host::start().await.unwrap();
    let api = uuid();
    let (path, body) = slow_volume_cmd(&h, &api);
    let task = h.send("/localstorage/volume/createempty", &body).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The same taskuuid while it runs: acknowledged, not run again.
    h.send_as(&task, "/localstorage/volume/createempty", &body).await.unwrap();
    let (_, status) = h.get(&format!("/task/{task}")).await.unwrap();
    assert!(status.contains("\"running\""), "{status}");

    let c = h.call_ok("/job/cancel", &json!({"cancellationApiId": api})).await.unwrap();
    assert_eq!(c["cancelled"], 1);
    let r = h.callbacks.wait(&task, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r["success"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("cancelled"), "{r}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.callbacks.results(&task).unwrap().len(), 1, "the duplicate was not run: one result only");
    assert!(!path.exists() && dir_is_empty_or_gone(path.parent().unwrap()), "no half-made volume or temporary file");
    let (_, status) = h.get(&format!("/task/{task}")).await.unwrap();
    assert!(status.contains("\"cancelled\""), "{status}");
}

#[tokio::test]
async fn the_deadline_from_task_context_stops_the_task() {
    let h = Host::start().await.unwrap();
    let (path, mut body) = slow_volume_cmd(&h, &uuid());
    body["taskContext"] = json!({"__messagetimeout__": "1000"});
    let t = std::time::Instant::now();
    let r = h.call_within("/localstorage/volume/createempty", &body, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r["success"], false, "{r}");
    assert_eq!(r["errorCode"]["code"], "SYS.1001", "{r}");
    assert!(t.elapsed() < Duration::from_secs(10), "stopped promptly: {:?}", t.elapsed());
    assert!(!path.exists() && dir_is_empty_or_gone(path.parent().unwrap()));
}

/// Volume from a snapshot (`snapshot/merge`) and revert (`snapshot/revert`) on real qcow2 files,
/// as the management node calls them: byte-checked with `qemu-img compare`; the snapshot is
/// never written. Then the image-cache clean-up sequence: references, deletedir.
#[tokio::test]
async fn snapshot_merge_and_revert_read_as_the_snapshot() {
    use kvmagent_host_tests::checks::qemu_io_write;
    let h = Host::start().await.unwrap();
    let flag = h.path("ps-initialized-file");
    let init = h.call_ok("/localstorage/init", &json!({"path": h.root, "initFilePath": flag})).await.unwrap();
    assert!(init["localStorageUsedCapacity"].as_u64().is_some(), "{init}");
    let r = h.call_ok("/localstorage/check/initializedfile", &json!({"filePath": flag, "storagePath": h.root})).await;
    assert_eq!(r.unwrap()["existed"], true);

    let base = BaseImage::create(&h, 8 * MIB).unwrap();
    let (_, vol) = root_volume_path(&h);
    let addons = json!({"qcow2Options": " -o cluster_size=2097152 "});
    let body = json!({"templatePathInCache": base.path, "installUrl": vol, "kvmHostAddons": addons});
    h.call_ok("/localstorage/volume/createvolumefromcache", &body).await.unwrap();
    assert_eq!(qemu_img_info(&vol).unwrap()["cluster-size"].as_u64(), Some(2 * MIB), "qcow2Options honoured");
    // A retry of the same create finds the untouched overlay and replaces it.
    h.call_ok("/localstorage/volume/createvolumefromcache", &body).await.unwrap();
    qemu_io_write(&vol, 0, &[0x5a; 65536]).unwrap();
    let snap = vol.parent().unwrap().join("snapshots/s1.qcow2");
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::fs::rename(&vol, &snap).unwrap();
    let body = json!({"installUrl": vol, "size": 0, "backingFile": snap});
    h.call_ok("/localstorage/volume/createempty", &body).await.unwrap();
    qemu_io_write(&vol, 0, &[0xa5; 65536]).unwrap();
    let snap_sha = file_sha256(&snap).unwrap();

    let ws = h.path(&format!("snapshotWorkspace/{}/x.qcow2", uuid()));
    let body = json!({"snapshotInstallPath": snap, "workspaceInstallPath": ws, "volumeUuid": "v"});
    let r = h.call_ok("/localstorage/snapshot/merge", &body).await.unwrap();
    assert!(r["size"].as_u64() == Some(8 * MIB) && r["actualSize"].as_u64().unwrap() > 0, "{r}");
    assert!(qemu_img_info(&ws).unwrap()["backing-filename"].is_null(), "a flat copy");
    qemu_img(&["compare", "-q", ws.to_str().unwrap(), snap.to_str().unwrap()]).unwrap();
    assert!(qemu_img(&["compare", "-q", ws.to_str().unwrap(), vol.to_str().unwrap()]).is_err());

    let r = h.call_ok("/localstorage/snapshot/revert", &json!({"snapshotInstallPath": snap})).await.unwrap();
    let new = std::path::PathBuf::from(r["newVolumeInstallPath"].as_str().unwrap());
    assert_eq!(r["size"].as_u64(), Some(8 * MIB));
    assert_eq!(new.parent(), snap.parent());
    qemu_img(&["compare", "-q", new.to_str().unwrap(), snap.to_str().unwrap()]).unwrap();
    assert_eq!(file_sha256(&snap).unwrap(), snap_sha, "the snapshot is never written");

    // The image is referenced: its directory is not deleted.
    let r = h.call_ok("/localstorage/getqcow2reference", &json!({"path": base.path, "searchingDir": h.root})).await;
    assert_eq!(r.unwrap()["referencePaths"], json!([snap]));
    let cache = base.path.parent().unwrap();
    assert!(h.call_err("/localstorage/deletedir", &json!({"path": cache})).await.is_ok());
    assert!(base.path.exists());
    let vol_dir = vol.parent().unwrap();
    h.call_ok("/localstorage/deletedir", &json!({"path": vol_dir})).await.unwrap();
    assert!(!vol_dir.exists());
}
