//! `/vm/volume/takesnapshot` (ZStack compat): live on a running VM, offline by qemu-img.

use std::path::Path;

use kvmagent_host_tests::checks::{dumpxml, qemu_img, qemu_img_info};
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

async fn vm(h: &Host, strategy: &str) -> (String, String, std::path::PathBuf) {
    let base = BaseImage::create(h, 16 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(h);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "s", "memory": 128 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "strategy": strategy,
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    (vm, root_uuid, root)
}

/// The root's install path as the VM's record names it.
fn recorded_root(h: &Host, vm: &str) -> String {
    h.recorded_paths(vm).unwrap().remove(0)
}

#[tokio::test]
async fn live_snapshot_switches_the_running_vm_to_the_new_top() {
    let h = Host::start().await.unwrap();
    let (vm, vol, root) = vm(&h, "InstantStart").await;
    let top = root.with_file_name(format!("{}.qcow2", uuid()));
    let r = h
        .call_ok(
            "/vm/volume/takesnapshot",
            &json!({"vmUuid": vm, "volumeUuid": vol, "installPath": top, "volumeInstallPath": root, "online": true}),
        )
        .await
        .unwrap();
    assert_eq!(r["newVolumeInstallPath"].as_str(), top.to_str());
    assert_eq!(r["snapshotInstallPath"].as_str(), root.to_str());
    assert!(r["size"].as_u64().unwrap() > 0);
    let xml = dumpxml(&vm).unwrap();
    assert!(xml.contains(&format!("<source file='{}'", top.display())), "the running VM writes to the new top: {xml}");
    assert_eq!(qemu_img_info(&top).unwrap()["backing-filename"].as_str(), root.to_str());
    assert_eq!(Some(recorded_root(&h, &vm).as_str()), top.to_str(), "the VM record follows");
    assert!(qemu_img(&["compare", "-U", root.to_str().unwrap(), top.to_str().unwrap()]).unwrap().contains("identical"));
}

#[tokio::test]
async fn offline_snapshot_reuses_a_precreated_overlay_and_refuses_a_foreign_file() {
    let h = Host::start().await.unwrap();
    let (vm, vol, root) = vm(&h, "JustCreate").await;
    // The management node pre-creates the overlay (ZStack does, to avoid a QEMU crash).
    let top = root.with_file_name(format!("{}.qcow2", uuid()));
    h.call_ok("/localstorage/volume/createempty", &json!({"installUrl": top, "backingFile": root, "size": 0}))
        .await
        .unwrap();
    let before = std::fs::metadata(&top).unwrap().modified().unwrap();
    let r = h
        .call_ok(
            "/vm/volume/takesnapshot",
            &json!({"vmUuid": vm, "volumeUuid": vol, "installPath": top, "volumeInstallPath": root}),
        )
        .await
        .unwrap();
    assert_eq!(r["newVolumeInstallPath"].as_str(), top.to_str());
    assert_eq!(
        std::fs::metadata(&top).unwrap().modified().unwrap(),
        before,
        "the pre-created overlay is reused as it is"
    );
    assert_eq!(Some(recorded_root(&h, &vm).as_str()), top.to_str());

    // A file at the target that is not an overlay on the volume is never taken over.
    let foreign = root.with_file_name("foreign.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", foreign.to_str().unwrap(), "16M"]).unwrap();
    let e = h
        .call_err("/vm/volume/takesnapshot", &json!({"vmUuid": vm, "installPath": foreign, "volumeInstallPath": top}))
        .await
        .unwrap();
    assert!(e.contains("is not an overlay"), "{e}");
    assert_eq!(Some(recorded_root(&h, &vm).as_str()), top.to_str(), "nothing changed");
    let e = h
        .call_err(
            "/vm/volume/takesnapshot",
            &json!({"vmUuid": vm, "installPath": "/etc/x.qcow2", "volumeInstallPath": top}),
        )
        .await
        .unwrap();
    assert!(e.contains("outside the storage roots"), "{e}");
    assert!(!Path::new("/etc/x.qcow2").exists());
}
