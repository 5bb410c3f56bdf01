//! ZStack compat storage paths: createwithbacking, createtemplate, reinit/image.

use std::path::Path;
use std::time::{Duration, Instant};

use kvmagent_host_tests::checks::{file_sha256, qemu_img, qemu_img_info, qemu_io_fill_compressed, qemu_io_write};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test]
async fn with_backing_template_and_reinit_have_real_effects() {
    let h = Host::start().await.unwrap();
    let connect =
        json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807", "sendCommandUrl": h.callbacks.send_command_url()});
    assert_eq!(h.post("/host/connect", &[], connect.to_string()).await.unwrap().0, 200);
    let base = BaseImage::create(&h, 32 * MIB).unwrap();

    let (_, linked) = data_volume_path(&h);
    let r = h
        .call_ok(
            "/localstorage/volume/createwithbacking",
            &json!({"templatePathInCache": base.path, "installPath": linked, "volumeUuid": "v"}),
        )
        .await
        .unwrap();
    assert_eq!(r["size"].as_u64(), Some(32 * MIB));
    assert_eq!(qemu_img_info(&linked).unwrap()["backing-filename"].as_str(), base.path.to_str());

    // A chain with data in both layers, flattened into a template.
    qemu_io_write(&linked, 8 * MIB, &vec![0x77; MIB as usize]).unwrap();
    let linked_sha = file_sha256(&linked).unwrap();
    let template = h.path(&format!("imagecache/template/{0}/{0}.qcow2", uuid()));
    let task = h
        .send("/localstorage/volume/createtemplate", &json!({"volumePath": linked, "installPath": template}))
        .await
        .unwrap();
    let r = h.callbacks.wait(&task, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r["success"], true, "{r}");
    assert!(qemu_img_info(&template).unwrap()["backing-filename"].is_null(), "a template stands alone");
    assert!(qemu_img(&["compare", "-U", linked.to_str().unwrap(), template.to_str().unwrap()])
        .unwrap()
        .contains("identical"));
    assert_eq!(file_sha256(&linked).unwrap(), linked_sha, "the source is only read");
    assert!(
        h.callbacks.progress_reports().iter().any(|p| p["processType"] == "/localstorage/volume/createtemplate"),
        "progress was reported"
    );

    let (_, root) = root_volume_path(&h);
    h.call_ok(
        "/localstorage/volume/createvolumefromcache",
        &json!({"templatePathInCache": base.path, "installUrl": root}),
    )
    .await
    .unwrap();
    qemu_io_write(&root, 0, b"old root data").unwrap();
    let root_sha = file_sha256(&root).unwrap();
    let r = h.call_ok("/localstorage/reinit/image", &json!({"imagePath": template, "volumePath": root})).await.unwrap();
    let new = Path::new(r["newVolumeInstallPath"].as_str().unwrap());
    assert_eq!(new.parent(), root.parent(), "the new root sits beside the old one");
    assert_eq!(qemu_img_info(new).unwrap()["backing-filename"].as_str(), template.to_str());
    assert_eq!(file_sha256(&root).unwrap(), root_sha, "the old root is left for the management node");
}

/// Waits until `dir` holds something (the copy's temporary file).
async fn wait_for_files(dir: &Path) {
    let until = Instant::now() + Duration::from_secs(30);
    while files(dir).is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!files(dir).is_empty(), "the copy started writing into {}", dir.display());
}

#[tokio::test]
async fn a_cancelled_or_timed_out_template_copy_leaves_nothing() {
    let h = Host::start().await.unwrap();
    let (_, src) = data_volume_path(&h);
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "1G"]).unwrap();
    // Compressed, so the flat copy takes about a second however fast the disk is.
    qemu_io_fill_compressed(&src, 0, 512 * MIB, 0x5a).unwrap();
    let src_sha = file_sha256(&src).unwrap();
    let dir = h.path("templates");
    let target = dir.join("t.qcow2");

    let api = uuid();
    let task = h
        .send(
            "/localstorage/volume/createtemplate",
            &json!({"volumePath": src, "installPath": target, "threadContext": {"api": api}}),
        )
        .await
        .unwrap();
    wait_for_files(&dir).await;
    h.call_ok("/job/cancel", &json!({"cancellationApiId": api})).await.unwrap();
    let r = h.callbacks.wait(&task, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r["success"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("copying the volume was cancelled"), "cancelled mid-copy: {r}");
    assert_eq!(files(&dir), Vec::<String>::new(), "no template or temporary file left");

    let r = h
        .call_within(
            "/localstorage/volume/createtemplate",
            &json!({"volumePath": src, "installPath": target, "taskContext": {"__messagetimeout__": 300}}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(r["success"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("copying the volume did not finish before the deadline"),
        "stopped during the copy: {r}"
    );
    assert_eq!(files(&dir), Vec::<String>::new(), "no template or temporary file left");
    assert_eq!(file_sha256(&src).unwrap(), src_sha, "the source is only read");
}

#[tokio::test]
async fn bad_input_changes_nothing() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let outside = tempfile::NamedTempFile::new().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", outside.path().to_str().unwrap(), "16M"]).unwrap();
    // Inside the roots, but its chain leaves them.
    let (_, escapes) = data_volume_path(&h);
    std::fs::create_dir_all(escapes.parent().unwrap()).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        outside.path().to_str().unwrap(),
        escapes.to_str().unwrap(),
    ])
    .unwrap();
    let (_, taken) = data_volume_path(&h);
    std::fs::create_dir_all(taken.parent().unwrap()).unwrap();
    std::fs::write(&taken, b"keep").unwrap();
    let dir = h.path("templates");
    let target = dir.join("t.qcow2");
    let watched =
        [&base.path, &escapes, &taken, &outside.path().to_path_buf()].map(|p| (p.clone(), file_sha256(p).unwrap()));
    let cases = vec![
        (
            "/localstorage/volume/createwithbacking",
            json!({"templatePathInCache": outside.path(), "installPath": target}),
            "outside the storage roots",
        ),
        (
            "/localstorage/volume/createwithbacking",
            json!({"templatePathInCache": escapes, "installPath": target}),
            "outside the storage roots",
        ),
        (
            "/localstorage/volume/createwithbacking",
            json!({"templatePathInCache": h.path("none.qcow2"), "installPath": target}),
            "unable to find image in cache",
        ),
        (
            "/localstorage/volume/createwithbacking",
            json!({"templatePathInCache": base.path, "installPath": taken}),
            "already exists",
        ),
        ("/localstorage/volume/createwithbacking", json!({"templatePathInCache": base.path}), "installPath"),
        (
            "/localstorage/volume/createtemplate",
            json!({"volumePath": h.path("missing.qcow2"), "installPath": target}),
            "does not exist",
        ),
        (
            "/localstorage/volume/createtemplate",
            json!({"volumePath": base.path, "installPath": "/etc/t.qcow2"}),
            "outside the storage roots",
        ),
        (
            "/localstorage/volume/createtemplate",
            json!({"volumePath": escapes, "installPath": target}),
            "outside the storage roots",
        ),
        (
            "/localstorage/volume/createtemplate",
            json!({"volumePath": base.path, "installPath": taken}),
            "already exists",
        ),
        ("/localstorage/volume/createtemplate", json!({"installPath": target}), "volumePath"),
        (
            "/localstorage/reinit/image",
            json!({"imagePath": base.path, "volumePath": "/etc/passwd"}),
            "outside the storage roots",
        ),
        (
            "/localstorage/reinit/image",
            json!({"imagePath": outside.path(), "volumePath": taken}),
            "outside the storage roots",
        ),
        (
            "/localstorage/reinit/image",
            json!({"imagePath": h.path("none.qcow2"), "volumePath": taken}),
            "unable to find image in cache",
        ),
        ("/localstorage/reinit/image", json!({"imagePath": base.path}), "volumePath"),
    ];
    for (path, body, needle) in cases {
        let e = h.call_err(path, &body).await.unwrap();
        assert!(e.contains(needle), "{path}: expected {needle:?} in {e}");
    }
    assert!(!dir.exists(), "no target directory made for a refused command");
    for (p, sha) in watched {
        assert_eq!(file_sha256(&p).unwrap(), sha, "{} unchanged", p.display());
    }
    assert_eq!(
        files(taken.parent().unwrap()),
        vec![taken.file_name().unwrap().to_string_lossy().into_owned()],
        "nothing beside the taken volume"
    );
}
