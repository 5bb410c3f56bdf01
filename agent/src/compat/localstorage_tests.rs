//! Unit tests of the local-storage paths on the fakes: each path's answer, and bad input
//! refused in-band with nothing changed.

use std::path::Path;

use serde_json::{json, Value};

use super::localstorage as ls;
use super::localstorage_files as lf;
use crate::error::ErrorKind;
use crate::tasks::TaskCtx;
use crate::testing::{backing, same_content, write, TestHost};
use crate::wire::decode;

fn ctx() -> TaskCtx {
    TaskCtx::detached("/test")
}

/// A volume on `image` in `vol-<name>/`, with a snapshot below it: (snapshot, volume).
async fn volume_with_snapshot(h: &TestHost, image: &str, name: &str) -> (String, String) {
    let snap = h.path(&format!("rootVolumes/vol-{name}/snapshots/s1.qcow2"));
    let body = json!({"templatePathInCache": image, "installUrl": snap});
    ls::create_volume_from_cache(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    write(&snap, 65536, 0x11);
    let top = h.path(&format!("rootVolumes/vol-{name}/{name}.qcow2"));
    let body = json!({"installUrl": top, "backingFile": snap});
    ls::create_empty(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    write(&top, 0, 0x22);
    (snap, top)
}

#[tokio::test]
async fn merge_and_revert_make_new_volumes_that_read_as_the_snapshot() {
    let h = TestHost::start();
    let image = h.image("img", 1 << 20).await;
    let (snap, top) = volume_with_snapshot(&h, &image, "a").await;
    let snap_bytes = std::fs::read(&snap).unwrap();
    let ws = h.path("snapshotWorkspace/img/x.qcow2");
    let body =
        json!({"snapshotInstallPath": snap, "workspaceInstallPath": ws, "volumeUuid": "a", "storagePath": h.path("")});
    let r = serde_json::to_value(ls::merge_snapshot(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap()).unwrap();
    assert!(r["size"].is_u64() && r["actualSize"].is_u64() && r["totalCapacity"].is_u64(), "{r}");
    assert!(same_content(&ws, &snap) && backing(&ws).is_none(), "a flat copy of the snapshot");
    let e = ls::merge_snapshot(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "the workspace exists: {e}");

    let body = json!({"snapshotInstallPath": snap});
    let r = serde_json::to_value(ls::revert_snapshot(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap()).unwrap();
    let new = r["newVolumeInstallPath"].as_str().unwrap();
    assert_eq!(Path::new(new).parent(), Path::new(&snap).parent());
    assert_eq!(r["size"], 1 << 20);
    assert_eq!(backing(new).unwrap().canonicalize().unwrap(), Path::new(&snap).canonicalize().unwrap());
    assert!(same_content(new, &snap) && !same_content(new, &top));
    assert_eq!(std::fs::read(&snap).unwrap(), snap_bytes, "the snapshot is never written");

    let before = h.files();
    for body in [
        json!({"snapshotInstallPath": h.path("rootVolumes/vol-a/snapshots/missing.qcow2")}),
        json!({"snapshotInstallPath": "/etc/passwd"}),
        json!({"snapshotInstallPath": snap, "kvmHostAddons": {"qcow2Options": "-o backing_file=/etc/passwd"}}),
        json!({"snapshotInstallPath": snap, "workspaceInstallPath": "/tmp/x.qcow2"}),
        json!({"snapshotInstallPath": "/etc/passwd", "workspaceInstallPath": h.path("w/y.qcow2")}),
    ] {
        let r = if body.get("workspaceInstallPath").is_some() {
            ls::merge_snapshot(&h.app, &ctx(), decode(&body).unwrap()).await.map(drop)
        } else {
            ls::revert_snapshot(&h.app, &ctx(), decode(&body).unwrap()).await.map(drop)
        };
        assert!(r.is_err(), "{body}");
        assert_eq!(h.files(), before, "{body}: nothing changed");
    }
}

#[tokio::test]
async fn qcow2_options_apply_to_overlays_made_from_images() {
    let h = TestHost::start();
    let image = h.image("img", 1 << 20).await;
    let addons = json!({"qcow2Options": " -o cluster_size=2097152 -o preallocation=metadata"});
    let vol = h.path("rootVolumes/vol-o/o.qcow2");
    let body = json!({"templatePathInCache": image, "installUrl": vol, "kvmHostAddons": addons});
    ls::create_volume_from_cache(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    let bad = json!({"templatePathInCache": image, "installPath": h.path("d/x.qcow2"), "kvmHostAddons": {"qcow2Options": "-f raw"}});
    let e = ls::create_with_backing(&h.app, &ctx(), decode(&bad).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("qcow2Options"), "{e}");
    assert!(!h.root.join("d").exists());
}

#[tokio::test]
async fn a_create_from_cache_retry_replaces_only_an_untouched_leftover() {
    let h = TestHost::start();
    let image = h.image("img", 1 << 20).await;
    let other = h.image("other", 1 << 20).await;
    let vol = h.path("rootVolumes/vol-r/r.qcow2");
    let body = json!({"templatePathInCache": image, "installUrl": vol, "virtualSize": 0});
    ls::create_volume_from_cache(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    ls::create_volume_from_cache(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    assert_eq!(h.files().len(), 3, "no temporaries: {:?}", h.files());
    let on_other = json!({"templatePathInCache": other, "installUrl": vol});
    let e = ls::create_volume_from_cache(&h.app, &ctx(), decode(&on_other).unwrap()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "an overlay on another image is kept: {e}");
    write(&vol, 0, 0x33);
    let written = std::fs::read(&vol).unwrap();
    let e = ls::create_volume_from_cache(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "a volume with data is never replaced: {e}");
    assert_eq!(std::fs::read(&vol).unwrap(), written);
}

#[tokio::test]
async fn init_makes_the_root_and_flag_and_answers_the_directorys_usage() {
    let h = TestHost::start();
    std::fs::remove_dir_all(&h.root).unwrap();
    let flag = h.path("ps-initialized-file");
    let body = json!({"path": h.root, "initFilePath": flag, "hostUuid": "h"});
    let r = serde_json::to_value(ls::init(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap()).unwrap();
    assert!(Path::new(&flag).is_file());
    let used = r["localStorageUsedCapacity"].as_u64().unwrap();
    assert!(used < 64 << 10, "the new directory's usage, not the file system's: {r}");
    std::fs::write(h.root.join("data"), vec![1u8; 1 << 20]).unwrap();
    let r = serde_json::to_value(ls::init(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap()).unwrap();
    assert!(r["localStorageUsedCapacity"].as_u64().unwrap() >= used + (1 << 20), "{r}");
    let check = |f: &str| json!({"filePath": f, "storagePath": h.root});
    let c = lf::check_initialized_file(&h.app, &ctx(), decode(&check(&flag)).unwrap()).await.unwrap();
    assert!(c.rsp.existed);
    let c = lf::check_initialized_file(&h.app, &ctx(), decode(&check("/etc/passwd")).unwrap()).await.unwrap();
    assert!(!c.rsp.existed, "outside the roots");
    let other = h.path("other-flag");
    lf::create_initialized_file(&h.app, &ctx(), decode(&json!({"filePath": other})).unwrap()).await.unwrap();
    assert!(Path::new(&other).is_file());
    for bad in [json!({"path": "/etc"}), json!({"path": h.root, "initFilePath": "/etc/flag"})] {
        assert!(ls::init(&h.app, &ctx(), decode(&bad).unwrap()).await.is_err(), "{bad}");
    }
    assert!(!Path::new("/etc/flag").exists());
    // A flag file that cannot be made fails the init, which then leaves no directory of its own.
    let bad = json!({"path": h.path("ps2/dir"), "initFilePath": h.path("missing/flag")});
    assert!(ls::init(&h.app, &ctx(), decode(&bad).unwrap()).await.is_err(), "{bad}");
    assert!(!h.root.join("ps2").exists(), "the directory a failed init made is removed");
    for bad in [json!({}), json!({"filePath": "/etc/x-initialized-file"})] {
        assert!(lf::create_initialized_file(&h.app, &ctx(), decode(&bad).unwrap()).await.is_err(), "{bad}");
    }
    let cb = ls::check_bits(&h.app, &ctx(), decode(&json!({"path": "/etc/passwd"})).unwrap()).await.unwrap();
    assert!(!cb.rsp.existing);
}

#[tokio::test]
async fn reinit_with_a_directory_puts_the_new_root_in_it() {
    let h = TestHost::start();
    let image = h.image("img", 1 << 20).await;
    let dir = h.path("rootVolumes/vol-d/");
    let r = ls::reinit_image(&h.app, &ctx(), decode(&json!({"imagePath": image, "volumePath": dir})).unwrap())
        .await
        .unwrap();
    assert_eq!(Path::new(&r.rsp.new_volume_install_path).parent(), Some(h.root.join("rootVolumes/vol-d").as_path()));
    let before = h.files();
    for bad in [h.path("rootVolumes/vol-d/x/") + "../", "/etc/".into(), h.path("") + "/"] {
        let body = json!({"imagePath": image, "volumePath": bad});
        assert!(ls::reinit_image(&h.app, &ctx(), decode(&body).unwrap()).await.is_err(), "{bad}");
    }
    assert_eq!(h.files(), before);
}

#[tokio::test]
async fn folders_references_sizes_and_base_images() {
    let h = TestHost::start();
    let image = h.image("img", 1 << 20).await;
    let (snap, top) = volume_with_snapshot(&h, &image, "b").await;
    let body = json!({"installUrl": h.path("memoryVolumes/vol-m/x"), "storagePath": h.path("")});
    lf::create_folder(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    assert!(h.root.join("memoryVolumes/vol-m").is_dir());
    let cap = lf::physical_capacity(&h.app, &ctx(), decode(&json!({"storagePath": h.root})).unwrap()).await.unwrap();
    assert!(cap.total_capacity > 0);

    let body = json!({"path": image, "searchingDir": h.root});
    let r = lf::qcow2_reference(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    assert_eq!(r.rsp.reference_paths, std::slice::from_ref(&snap));

    let body = json!({"volumeUuidInstallPaths": {"b": top, "gone": h.path("nope.qcow2"), "out": "/etc/passwd"}});
    let r = lf::batch_get_size(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    assert_eq!(r.rsp.actual_sizes.keys().collect::<Vec<_>>(), ["b"]);

    let body = json!({"volumeUuid": "b", "volumeInstallDir": h.path("rootVolumes/vol-b"),
        "imageCacheDir": h.path("imagecache"), "volumeInstallPath": top});
    let r = serde_json::to_value(lf::base_image_path(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap()).unwrap();
    assert_eq!(r["path"], Value::from(image.clone()), "{r}");
    assert!(r["size"].as_u64().unwrap() > 0 && r["otherPaths"] == json!([]), "{r}");
    let wrong = json!({"volumeUuid": "c", "volumeInstallDir": h.path("rootVolumes/vol-b"),
        "imageCacheDir": h.path("imagecache"), "volumeInstallPath": top});
    assert!(lf::base_image_path(&h.app, &ctx(), decode(&wrong).unwrap()).await.is_err());

    let before = h.files();
    for (path, body) in [
        ("createfolder", json!({"installUrl": "/etc/kvmagent/x"})),
        ("getphysicalcapacity", json!({"storagePath": "/etc"})),
        ("getqcow2reference", json!({"path": image, "searchingDir": "/etc"})),
    ] {
        let r = match path {
            "createfolder" => lf::create_folder(&h.app, &ctx(), decode(&body).unwrap()).await.map(drop),
            "getphysicalcapacity" => lf::physical_capacity(&h.app, &ctx(), decode(&body).unwrap()).await.map(drop),
            _ => lf::qcow2_reference(&h.app, &ctx(), decode(&body).unwrap()).await.map(drop),
        };
        assert!(r.is_err(), "{path} {body}");
    }
    assert_eq!(h.files(), before);
    assert!(!Path::new("/etc/kvmagent/x").exists());
}

#[tokio::test]
async fn deletedir_keeps_images_other_volumes_are_on() {
    let h = TestHost::start();
    let image = h.image("img", 1 << 20).await;
    let (_snap, top) = volume_with_snapshot(&h, &image, "c").await;
    let cache = Path::new(&image).parent().unwrap().display().to_string();
    let e = lf::delete_dir(&h.app, &ctx(), decode(&json!({"path": cache})).unwrap()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
    assert!(Path::new(&image).exists());
    let vol_dir = h.path("rootVolumes/vol-c");
    lf::delete_dir(&h.app, &ctx(), decode(&json!({"path": vol_dir})).unwrap()).await.unwrap();
    assert!(!Path::new(&top).exists());
    lf::delete_dir(&h.app, &ctx(), decode(&json!({"path": cache})).unwrap()).await.unwrap();
    let file = h.image("img2", 1 << 20).await;
    for bad in [h.path(""), "/etc".into(), file.clone()] {
        assert!(lf::delete_dir(&h.app, &ctx(), decode(&json!({"path": bad})).unwrap()).await.is_err(), "{bad}");
    }
    assert!(Path::new(&file).exists());
}

#[tokio::test]
async fn hardlink_moves_a_chain_and_unlink_drops_the_old_links() {
    let h = TestHost::start();
    let image = h.image("img", 1 << 20).await;
    let (snap, top) = volume_with_snapshot(&h, &image, "d").await;
    let src = h.path("rootVolumes/vol-d");
    let dst = h.path("dataVolumes/vol-d");
    let body = json!({"srcDir": src, "dstDir": dst, "storagePath": h.root, "volumeUuid": "d"});
    lf::hardlink(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    lf::hardlink(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    let new_top = h.path("dataVolumes/vol-d/d.qcow2");
    let new_snap = h.path("dataVolumes/vol-d/snapshots/s1.qcow2");
    assert_eq!(backing(&new_top).unwrap(), Path::new(&new_snap));
    assert!(same_content(&new_top, &top));
    let chain = json!({"snapshots": [{"path": new_top, "parentPath": new_snap, "snapshotUuid": "t"},
                                     {"path": new_snap, "parentPath": image}]});
    lf::verify_chain(&h.app, &ctx(), decode(&chain).unwrap()).await.unwrap();
    lf::unlink(&h.app, &ctx(), decode(&json!({"installPath": src})).unwrap()).await.unwrap();
    assert!(!Path::new(&snap).exists() && Path::new(&new_snap).exists());
    let bad = json!({"snapshots": [{"path": new_top, "parentPath": image}]});
    assert!(lf::verify_chain(&h.app, &ctx(), decode(&bad).unwrap()).await.is_err());
    let before = std::fs::read(&new_top).unwrap();
    for bad in [
        json!({"snapshots": [{"path": new_top, "parentPath": "/etc/passwd"}]}),
        json!({"snapshots": [{"path": "/etc/passwd", "parentPath": new_snap}]}),
    ] {
        assert!(lf::rebase_backing_files(&h.app, &ctx(), decode(&bad).unwrap()).await.is_err(), "{bad}");
    }
    assert_eq!(std::fs::read(&new_top).unwrap(), before);
    let body = json!({"srcDir": "/etc", "dstDir": dst, "storagePath": h.root});
    assert!(lf::hardlink(&h.app, &ctx(), decode(&body).unwrap()).await.is_err());
}
