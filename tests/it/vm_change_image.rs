//! Native `/vm/changeimage` on real libvirtd: the guest sees the new image; failures change nothing.

use std::time::Duration;

use kvmagent_host_tests::checks::{domstate, dumpxml, file_sha256, qemu_img_info, virsh};
use kvmagent_host_tests::guest::{console_log, kernel_boot, wait_report};
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A VM created stopped (defined, with the test kernel) from `image`.
async fn stopped_vm(h: &Host, image: &BaseImage, size: u64) -> (String, std::path::PathBuf) {
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(h);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "ci", "memory": 256 * MIB, "cpuNum": 1, "kernelBoot": kernel_boot(h, &[0], 1).unwrap()},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": image.path, "size": size},
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    (vm, root)
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_new_root_carries_the_new_image_and_the_old_root_goes_last() {
    let h = Host::start().await.unwrap();
    let a = BaseImage::create(&h, 32 * MIB).unwrap();
    let b = BaseImage::create(&h, 32 * MIB).unwrap();
    let b_sha = file_sha256(&b.path).unwrap();
    let (vm, old_root) = stopped_vm(&h, &a, 96 * MIB).await;

    let r = h.call_ok("/vm/changeimage", &json!({"vmUuid": vm, "imagePath": b.path})).await.unwrap();
    let new_root = r["allVolumes"][0]["installPath"].as_str().unwrap().to_owned();
    assert_ne!(new_root, old_root.to_str().unwrap());
    assert_eq!(std::path::Path::new(&new_root).parent(), old_root.parent(), "built beside the old root");
    assert!(!old_root.exists(), "the old root is removed once the VM points at the new one");
    let info = qemu_img_info(std::path::Path::new(&new_root)).unwrap();
    assert_eq!(info["backing-filename"].as_str(), b.path.to_str());
    assert_eq!(info["virtual-size"].as_u64(), Some(96 * MIB), "the root keeps its larger size");
    assert!(dumpxml(&vm).unwrap().contains(&new_root), "the defined domain points at the new root");

    virsh(&["start", &vm]).unwrap();
    let dump = wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();
    assert_eq!(dump["vda"][&0], b.pattern, "the guest sees the new image");
    assert_eq!(file_sha256(&b.path).unwrap(), b_sha);
}

#[tokio::test]
async fn a_running_vm_or_a_bad_image_changes_nothing() {
    let h = Host::start().await.unwrap();
    let a = BaseImage::create(&h, 32 * MIB).unwrap();
    let (vm, root) = stopped_vm(&h, &a, 0).await;
    let dir = root.parent().unwrap().to_owned();
    let root_sha = file_sha256(&root).unwrap();
    let before = files_in(&dir);
    let outside = tempfile::NamedTempFile::new().unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (json!({"vmUuid": vm, "imagePath": h.path("imagecache/missing.qcow2")}), "missing.qcow2 does not exist"),
        (json!({"vmUuid": vm, "imagePath": outside.path()}), "outside the storage roots"),
        (json!({"vmUuid": vm}), "imagePath"),
        (json!({"vmUuid": uuid(), "imagePath": a.path}), "not known to this host"),
        (json!({"vmUuid": vm, "imagePath": a.path, "newRootInstallPath": root}), "already exists"),
    ];
    for (cmd, needle) in cases {
        let e = h.call_err("/vm/changeimage", &cmd).await.unwrap();
        assert!(e.contains(needle), "expected {needle:?} in {e}");
        assert_eq!(files_in(&dir), before, "nothing made or removed ({e})");
        assert!(dumpxml(&vm).unwrap().contains(root.to_str().unwrap()));
    }
    assert_eq!(file_sha256(&root).unwrap(), root_sha);

    virsh(&["start", "--paused", &vm]).unwrap();
    let e = h.call_err("/vm/changeimage", &json!({"vmUuid": vm, "imagePath": a.path})).await.unwrap();
    assert!(e.contains("stop it"), "{e}");
    assert_eq!(domstate(&vm).as_deref(), Some("paused"));
    assert_eq!(files_in(&dir), before);
}
