//! `/ceph/primarystorage/*` against a real one-node Ceph cluster (tests/ceph/start.sh).

use kvmagent_host_tests::ceph::{self, agent_config, images, info, qemu_name};
use kvmagent_host_tests::checks::qemu_img;
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn identical(a: &str, b: &str) -> bool {
    qemu_img(&["compare", "-U", "-f", "raw", "-F", "raw", &qemu_name(a), &qemu_name(b)])
        .map(|o| o.contains("identical"))
        .unwrap_or(false)
}

#[tokio::test]
async fn images_snapshots_clones_flatten_copy_and_delete() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let img = format!("img-{}", uuid());
    let (clone1, clone2, copy) = (format!("c1-{}", uuid()), format!("c2-{}", uuid()), format!("cp-{}", uuid()));
    let (s, body) = h.post("/ceph/primarystorage/echo", &[], "").await.unwrap();
    assert_eq!((s, body.as_str()), (200, ""));

    let r = h
        .call_ok(
            "/ceph/primarystorage/volume/createempty",
            &json!({"installPath": format!("ceph://rbd/{img}"), "size": 64 * MIB}),
        )
        .await
        .unwrap();
    assert_eq!(info(&format!("rbd/{img}")).unwrap()["size"].as_u64(), Some(64 * MIB), "{r}");
    let pattern = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(pattern.path(), vec![0x42u8; MIB as usize]).unwrap();
    let cmd = format!("write -s {} 0 {}", pattern.path().display(), MIB);
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", &cmd, &qemu_name(&format!("rbd/{img}"))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let snap = format!("ceph://rbd/{img}@s1");
    h.call_ok("/ceph/primarystorage/snapshot/create", &json!({"snapshotPath": snap})).await.unwrap();
    h.call_ok("/ceph/primarystorage/snapshot/create", &json!({"snapshotPath": snap, "skipOnExisting": true}))
        .await
        .unwrap();
    let r = h
        .call_ok(
            "/ceph/primarystorage/volume/clone",
            &json!({"srcPath": snap, "dstPath": format!("ceph://rbd/{clone1}")}),
        )
        .await
        .unwrap();
    assert_eq!(r["installPath"], json!(format!("ceph://rbd/{clone1}")));
    let parent = &info(&format!("rbd/{clone1}")).unwrap()["parent"];
    assert_eq!(
        (parent["image"].as_str(), parent["snapshot"].as_str()),
        (Some(img.as_str()), Some("s1")),
        "a clone of the snapshot"
    );
    assert!(identical(&format!("rbd/{img}@s1"), &format!("rbd/{clone1}")), "the clone sees the source data");
    let chain = h
        .call_ok("/ceph/primarystorage/volume/getbackingchain", &json!({"installPath": format!("ceph://rbd/{clone1}")}))
        .await
        .unwrap();
    assert_eq!(chain["backingChain"], json!([snap]));

    h.call_ok("/ceph/primarystorage/volume/flatten", &json!({"path": format!("ceph://rbd/{clone1}")})).await.unwrap();
    assert!(info(&format!("rbd/{clone1}")).unwrap()["parent"].is_null(), "flatten removes the parent");
    assert!(identical(&format!("rbd/{img}@s1"), &format!("rbd/{clone1}")));
    // A flat image: flatten is a no-op success.
    h.call_ok("/ceph/primarystorage/volume/flatten", &json!({"path": format!("ceph://rbd/{clone1}")})).await.unwrap();

    let r = h
        .call_ok(
            "/ceph/primarystorage/volume/cp",
            &json!({"srcPath": format!("ceph://rbd/{clone1}"), "dstPath": format!("ceph://rbd/{copy}")}),
        )
        .await
        .unwrap();
    assert!(r["size"].as_u64().unwrap() >= 64 * MIB);
    assert!(info(&format!("rbd/{copy}")).unwrap()["parent"].is_null());
    assert!(identical(&format!("rbd/{clone1}"), &format!("rbd/{copy}")));

    // A snapshot with a clone depending on it is not removed.
    h.call_ok(
        "/ceph/primarystorage/volume/clone",
        &json!({"srcPath": snap, "dstPath": format!("ceph://rbd/{clone2}")}),
    )
    .await
    .unwrap();
    let e = h.call_err("/ceph/primarystorage/snapshot/delete", &json!({"snapshotPath": snap})).await.unwrap();
    assert!(e.contains("still has clones"), "{e}");
    assert!(info(&format!("rbd/{img}@s1")).is_some());
    let e =
        h.call_err("/ceph/primarystorage/delete", &json!({"installPath": format!("ceph://rbd/{img}")})).await.unwrap();
    assert!(e.contains("still has snapshots"), "{e}");

    for i in [&clone2, &clone1, &copy] {
        h.call_ok("/ceph/primarystorage/delete", &json!({"installPath": format!("ceph://rbd/{i}")})).await.unwrap();
    }
    h.call_ok("/ceph/primarystorage/snapshot/delete", &json!({"snapshotPath": snap})).await.unwrap();
    h.call_ok("/ceph/primarystorage/delete", &json!({"installPath": format!("ceph://rbd/{img}")})).await.unwrap();
    h.call_ok("/ceph/primarystorage/delete", &json!({"installPath": format!("ceph://rbd/{img}")})).await.unwrap();
    for i in [&img, &clone1, &clone2, &copy] {
        assert!(info(&format!("rbd/{i}")).is_none(), "{i} is gone");
    }
}

#[tokio::test]
async fn bad_ceph_commands_change_nothing() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let img = format!("keep-{}", uuid());
    ceph::rbd(&["create", "--size", "16M", &format!("rbd/{img}")]).unwrap();
    // Images the refused commands would have made (other tests share the pool, so only these
    // names are checked).
    let fresh: Vec<String> = (0..4).map(|_| format!("n-{}", uuid())).collect();
    // Two odd names no command may make, compared before and after: the shared pool may hold
    // someone else's image by either name.
    let odd = || images("rbd").into_iter().filter(|i| i == "-rf" || i == "x y").collect::<Vec<_>>();
    let odd_before = odd();
    let cases = vec![
        (
            "/ceph/primarystorage/volume/createempty",
            json!({"installPath": "ceph://rbd/-rf", "size": MIB}),
            "not a Ceph path",
        ),
        (
            "/ceph/primarystorage/volume/createempty",
            json!({"installPath": "ceph://rbd/x y", "size": MIB}),
            "not a Ceph path",
        ),
        (
            "/ceph/primarystorage/volume/createempty",
            json!({"installPath": format!("ceph://rbd/{img}"), "size": MIB}),
            "already exists",
        ),
        (
            "/ceph/primarystorage/volume/createempty",
            json!({"installPath": format!("ceph://rbd/{}", fresh[0]), "size": 0}),
            "size",
        ),
        (
            "/ceph/primarystorage/volume/clone",
            json!({"srcPath": format!("ceph://rbd/{img}"), "dstPath": format!("ceph://rbd/{}", fresh[1])}),
            "names no snapshot",
        ),
        (
            "/ceph/primarystorage/volume/clone",
            json!({"srcPath": format!("ceph://rbd/{img}@nosnap"), "dstPath": format!("ceph://rbd/{}", fresh[2])}),
            "does not exist",
        ),
        (
            "/ceph/primarystorage/volume/cp",
            json!({"srcPath": format!("ceph://rbd/missing-{}", uuid()), "dstPath": format!("ceph://rbd/{}", fresh[3])}),
            "No such file",
        ),
        ("/ceph/primarystorage/getvolumesize", json!({"installPath": "/etc/passwd"}), "not a Ceph path"),
    ];
    for (path, body, needle) in cases {
        let e = h.call_err(path, &body).await.unwrap();
        assert!(e.contains(needle), "{path}: expected {needle:?} in {e}");
    }
    for name in &fresh {
        assert!(info(&format!("rbd/{name}")).is_none(), "{name} was not made");
    }
    assert_eq!(
        info(&format!("rbd/{img}")).unwrap()["size"].as_u64(),
        Some(16 * MIB),
        "the existing image is untouched"
    );
    assert_eq!(odd(), odd_before, "no image named -rf or \"x y\" was made");
    ceph::rbd(&["rm", "--no-progress", &format!("rbd/{img}")]).unwrap();
}

#[tokio::test]
async fn a_flatten_stopped_by_its_deadline_leaves_the_clone_on_its_parent() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let (img, clone) = (format!("img-{}", uuid()), format!("c-{}", uuid()));
    ceph::rbd(&["create", "--size", "512M", &format!("rbd/{img}")]).unwrap();
    // Enough parent data that copying it up takes well over the deadline.
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 0 256M", &qemu_name(&format!("rbd/{img}"))])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ceph::rbd(&["snap", "create", &format!("rbd/{img}@s")]).unwrap();
    ceph::rbd(&["snap", "protect", &format!("rbd/{img}@s")]).unwrap();
    ceph::rbd(&["clone", &format!("rbd/{img}@s"), &format!("rbd/{clone}")]).unwrap();

    let cmd = json!({"path": format!("ceph://rbd/{clone}"), "taskContext": {"__messagetimeout__": 150}});
    let e = h.call_err("/ceph/primarystorage/volume/flatten", &cmd).await.unwrap();
    assert!(e.contains("deadline"), "{e}");
    let parent = &info(&format!("rbd/{clone}")).unwrap()["parent"];
    assert_eq!(parent["image"], json!(img), "the clone still reads through its parent");
    assert!(identical(&format!("rbd/{img}@s"), &format!("rbd/{clone}")), "and reads the same");
    ceph::remove_all(&format!("rbd/{clone}"));
    ceph::remove_all(&format!("rbd/{img}"));
}
