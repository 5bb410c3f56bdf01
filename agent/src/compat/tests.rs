//! Unit tests of ZStack's paths on the fake hypervisor: bad values are refused, named, before
//! anything changes.

use serde_json::{json, Value};

use crate::error::ErrorKind;
use crate::libvirt::domains::VmState;
use crate::tasks::TaskCtx;
use crate::testing::TestHost;
use crate::wire::decode;

fn ctx() -> TaskCtx {
    TaskCtx::detached("/test")
}

#[tokio::test]
async fn a_stop_of_unknown_type_or_unbounded_timeout_is_refused_and_the_vm_runs_on() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    for (body, field) in [
        (json!({"uuid": vm, "type": "grace-ful"}), "type"),
        (json!({"uuid": vm, "type": "grace", "timeout": 9223372036854775808u64}), "timeout"),
        (json!({"uuid": vm, "timeout": 3601}), "timeout"),
    ] {
        let e = super::vm::stop(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{body}: {e}");
        assert!(e.details.contains(field), "{body}: {e}");
        assert_eq!(h.hv.domain(&vm).unwrap().state, VmState::Running, "{body} changed nothing");
    }
    super::vm::stop(&h.app, &ctx(), decode(&json!({"uuid": vm, "type": "grace", "timeout": 5})).unwrap())
        .await
        .unwrap();
    assert!(h.hv.domain(&vm).is_none(), "a graceful stop ends with the domain undefined");
}

#[tokio::test]
async fn an_empty_ceph_key_is_refused_before_any_secret_is_defined() {
    let h = TestHost::start();
    let body = json!({"userKey": "", "uuid": "148347dd-908e-ce57-bc2a-f9650d652c09"});
    let e = super::vm::create_ceph_secret(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert!(h.hv.secret_uuids().is_empty(), "no secret defined");
}

#[tokio::test]
async fn reinit_needs_the_volume_itself() {
    let h = TestHost::start();
    let image = h.image("i", 1 << 20).await;
    std::fs::create_dir_all(h.root.join("rootVolumes/a/vol")).unwrap();
    let before = h.files();
    for volume in [h.path("rootVolumes/a/vol"), h.path("rootVolumes/a/vol/missing.qcow2"), h.path("rootVolumes")] {
        let body = json!({"imagePath": image, "volumePath": volume});
        let r = super::localstorage::reinit_image(&h.app, &ctx(), decode(&body).unwrap()).await;
        let e = r.err().unwrap_or_else(|| panic!("{volume} was taken for a volume"));
        assert!(e.to_string().contains("volumePath"), "{e}");
        assert_eq!(h.files(), before, "{volume}: nothing made");
    }
}

#[tokio::test]
async fn a_snapshot_group_names_the_new_top_of_each_volume() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let old = h.recorded(&vm).await;
    let body: Value = json!({"vmUuid": vm});
    let group =
        crate::ops::snapshot_group::take(&h.app, &ctx(), crate::wire::decode_native(&body).unwrap()).await.unwrap();
    let now = h.recorded(&vm).await;
    for (s, (before, after)) in group.snapshots.iter().zip(old.iter().zip(&now)) {
        assert_eq!((&s.snapshot_path, s.new_install_path.as_ref()), (before, Some(after)));
        assert_ne!(before, after);
    }
}

#[tokio::test]
async fn a_ceph_create_or_clone_that_fails_after_making_its_image_removes_it() {
    let h = TestHost::start();
    let stop = crate::stop::Stop::new();
    let base = crate::ceph::path::CephPath::parse("rbd/base").unwrap();
    h.app.rbd.create(&base, 4 << 20, &stop).await.unwrap();
    h.app.rbd.snap_create(&base.with_snap("s"), &stop).await.unwrap();
    h.rbd.fail_usage();
    let create = json!({"installPath": "ceph://rbd/new", "size": 1048576});
    super::ceph::create_empty(&h.app, &ctx(), decode(&create).unwrap()).await.unwrap_err();
    let clone = json!({"srcPath": "ceph://rbd/base@s", "dstPath": "ceph://rbd/clone"});
    super::ceph::clone(&h.app, &ctx(), decode(&clone).unwrap()).await.unwrap_err();
    assert_eq!(h.rbd.images(), ["rbd/base"], "nothing the failed commands made is left");
}
