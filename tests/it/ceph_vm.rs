//! VMs on RBD: the cephx secret, and a guest booting from an RBD root on the real cluster.

use std::time::Duration;

use kvmagent_host_tests::ceph::{self, admin_key, agent_config, qemu_name};
use kvmagent_host_tests::checks::{dumpxml, virsh};
use kvmagent_host_tests::guest::{console_log, kernel_boot, pattern, wait_report};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn a_guest_boots_from_an_rbd_root_and_reads_its_bytes() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let img = format!("root-{}", uuid());
    h.call_ok(
        "/ceph/primarystorage/volume/createempty",
        &json!({"installPath": format!("ceph://rbd/{img}"), "size": 64 * MIB}),
    )
    .await
    .unwrap();
    let bytes = pattern("RBD");
    ceph::write(&format!("rbd/{img}"), 0, &bytes);

    let secret = uuid::Uuid::new_v4().to_string();
    h.call_ok("/vm/createcephsecret", &json!({"userKey": admin_key(), "uuid": secret})).await.unwrap();
    let e = h.call_err("/vm/createcephsecret", &json!({"userKey": "not base64!", "uuid": secret})).await.unwrap();
    assert!(e.contains("base64"), "{e}");

    let vm = uuid();
    h.track_vm(&vm);
    let volume = uuid();
    let start = json!({
        "vmInstanceUuid": vm, "vmName": "on-rbd", "memory": 192 * MIB, "cpuNum": 1,
        "rootVolume": {"installPath": format!("ceph://rbd/{img}"), "deviceType": "ceph", "volumeUuid": volume,
                       "secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "nics": [{"mac": "52:54:00:00:0c:01", "type": "user", "deviceId": 0}],
        "kernelBoot": kernel_boot(&h, &[0], 1).unwrap(),
    });
    let r = h.call_ok("/vm/start", &start).await.unwrap();
    assert!(r["virtualDeviceInfoList"].as_array().unwrap().iter().any(|d| d["resourceUuid"] == json!(volume)), "{r}");
    let xml = dumpxml(&vm).unwrap();
    assert!(xml.contains("protocol='rbd'") && xml.contains(&format!("name='rbd/{img}'")), "{xml}");
    let dump = wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();
    assert_eq!(dump["vda"][&0], bytes, "the guest reads the RBD image's bytes");

    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    h.call_ok("/ceph/primarystorage/delete", &json!({"installPath": format!("ceph://rbd/{img}")})).await.unwrap();
    assert!(ceph::info(&format!("rbd/{img}")).is_none());
    let _ = virsh(&["secret-undefine", &secret]);
}

/// A cached image on RBD with a pattern at offset 0 and its snapshot: `ceph://rbd/<img>@<img>`.
fn rbd_image() -> (String, Vec<u8>) {
    let img = format!("image-{}", uuid());
    ceph::rbd(&["create", "--size", "64M", &format!("rbd/{img}")]).unwrap();
    let bytes = pattern("RBDIMG");
    ceph::write(&format!("rbd/{img}"), 0, &bytes);
    ceph::rbd(&["snap", "create", &format!("rbd/{img}@{img}")]).unwrap();
    (img, bytes)
}

async fn secret(h: &Host) -> String {
    let secret = uuid::Uuid::new_v4().to_string();
    h.call_ok("/vm/createcephsecret", &json!({"userKey": admin_key(), "uuid": secret})).await.unwrap();
    secret
}

#[tokio::test]
async fn create_on_rbd_clones_the_image_and_the_guest_reads_it() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let (img, bytes) = rbd_image();
    let secret = secret(&h).await;
    let vm = uuid();
    h.track_vm(&vm);
    let (root, data) = (format!("vol-{}", uuid()), format!("vol-{}", uuid()));
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "rbd-vm", "memory": 192 * MIB, "cpuNum": 1, "kernelBoot": kernel_boot(&h, &[0], 2).unwrap()},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{root}"), "imagePath": format!("ceph://rbd/{img}@{img}"), "size": 128 * MIB},
        "dataVolumes": [{"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{data}"), "size": 32 * MIB}],
        "ceph": {"secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
    });
    let r = h.call_ok("/vm/create", &cmd).await.unwrap();
    assert_eq!(r["state"], "Running", "{r}");
    let parent = &ceph::info(&format!("rbd/{root}")).unwrap()["parent"];
    assert_eq!(
        (parent["image"].as_str(), parent["snapshot"].as_str()),
        (Some(img.as_str()), Some(img.as_str())),
        "root = clone of the image snapshot"
    );
    assert_eq!(ceph::info(&format!("rbd/{root}")).unwrap()["size"].as_u64(), Some(128 * MIB));
    let dump = wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();
    assert_eq!(dump["vda"][&0], bytes, "the guest reads the image through the clone");
    assert_eq!(dump["vdb"][&0], vec![0u8; 64]);
    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    for i in [&root, &data] {
        ceph::rbd(&["rm", "--no-progress", &format!("rbd/{i}")]).unwrap();
    }
    ceph::remove_all(&format!("rbd/{img}"));
    let _ = virsh(&["secret-undefine", &secret]);
}

#[tokio::test]
async fn a_failed_create_on_rbd_leaves_no_image() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let (img, _) = rbd_image();
    let vm = uuid();
    h.track_vm(&vm);
    let (root, data) = (format!("vol-{}", uuid()), format!("vol-{}", uuid()));
    let cmd = json!({
        // Valid to every check, but libvirt cannot start it: the bridge does not exist.
        "vm": {"vmInstanceUuid": vm, "vmName": "rbd-fail", "memory": 192 * MIB, "cpuNum": 1,
               "nics": [{"mac": "52:54:00:00:0c:09", "bridgeName": "kvmt-nobr2", "deviceId": 0}]},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{root}"), "imagePath": format!("ceph://rbd/{img}@{img}")},
        "dataVolumes": [{"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{data}"), "size": 16 * MIB}],
        "ceph": {"monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
    });
    let e = h.call_err("/vm/create", &cmd).await.unwrap();
    assert!(e.contains("step 'start domain' failed"), "{e}");
    for i in [&root, &data] {
        assert!(ceph::info(&format!("rbd/{i}")).is_none(), "no image left behind: {i}");
    }
    let bad = json!({"vm": cmd["vm"], "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{root}"), "imagePath": format!("ceph://rbd/{img}@missing")}});
    let e = h.call_err("/vm/create", &bad).await.unwrap();
    assert!(e.contains("does not exist"), "{e}");
    assert!(ceph::info(&format!("rbd/{root}")).is_none());
    ceph::remove_all(&format!("rbd/{img}"));
}

#[tokio::test]
async fn flatten_of_an_rbd_root_while_the_vm_runs() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let connect =
        json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807", "sendCommandUrl": h.callbacks.send_command_url()});
    assert_eq!(h.post("/host/connect", &[], connect.to_string()).await.unwrap().0, 200);
    let (img, _) = rbd_image();
    // More parent data than the clone will own, so the flatten has objects to copy.
    let fill = "write -P 7 8M 12M";
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", fill, &qemu_name(&format!("rbd/{img}"))])
        .output()
        .unwrap();
    assert!(out.status.success());
    ceph::rbd(&["snap", "create", &format!("rbd/{img}@v2")]).unwrap();
    let secret = secret(&h).await;
    let vm = uuid();
    h.track_vm(&vm);
    let root = format!("vol-{}", uuid());
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "rbd-flat", "memory": 128 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{root}"), "imagePath": format!("ceph://rbd/{img}@v2")},
        "ceph": {"secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    let own = "write -P 9 40M 1M";
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", own, &qemu_name(&format!("rbd/{root}"))])
        .output()
        .unwrap();
    assert!(out.status.success());
    virsh(&["start", &vm]).unwrap();

    let used = |name: &str| -> u64 {
        let du: serde_json::Value =
            serde_json::from_str(&ceph::rbd(&["du", "--format", "json", &format!("rbd/{name}")]).unwrap()).unwrap();
        du["images"][0]["used_size"].as_u64().unwrap()
    };
    let before = used(&root);
    let dry = h.call_ok("/vm/flatten", &json!({"vmUuid": vm, "dryRun": true})).await.unwrap();
    let predicted = dry["totalBytesToAdd"].as_u64().unwrap();
    assert!(ceph::info(&format!("rbd/{root}")).unwrap()["parent"].is_object(), "a dry run changes nothing");

    let r = h.call_ok("/vm/flatten", &json!({"vmUuid": vm})).await.unwrap();
    assert_eq!(r["state"], "Running", "{r}");
    assert!(
        ceph::info(&format!("rbd/{root}")).unwrap()["parent"].is_null(),
        "flatten removed the parent while the VM ran"
    );
    let reports = h.callbacks.progress_reports();
    assert!(reports.iter().any(|p| p["processType"] == "/vm/flatten"), "flatten progress was reported: {reports:?}");
    let added = used(&root) - before;
    assert!(
        added > 0 && (predicted as f64 - added as f64).abs() <= added as f64 * 0.01,
        "predicted {predicted}, added {added}"
    );

    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    // The flat image holds both the parent's data and its own write (qemu-io fails on a mismatch).
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 7 8M 12M", "-c", "read -P 9 40M 1M", &qemu_name(&format!("rbd/{root}"))])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("Pattern verification failed"), "{text}");
    ceph::rbd(&["rm", "--no-progress", &format!("rbd/{root}")]).unwrap();
    ceph::remove_all(&format!("rbd/{img}"));
    let _ = virsh(&["secret-undefine", &secret]);
}

#[tokio::test]
async fn clones_of_a_running_rbd_vm_linked_and_copied() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let (img, bytes) = rbd_image();
    let secret = secret(&h).await;
    let vm = uuid();
    h.track_vm(&vm);
    let (root, data) = (format!("vol-{}", uuid()), format!("vol-{}", uuid()));
    let mut boot = kernel_boot(&h, &[0], 2).unwrap();
    boot["cmdline"] = json!(format!("{} kvmagent.shell=1", boot["cmdline"].as_str().unwrap()));
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "rbd-src", "memory": 160 * MIB, "cpuNum": 1, "kernelBoot": boot},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{root}"), "imagePath": format!("ceph://rbd/{img}@{img}")},
        "dataVolumes": [{"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{data}"), "size": 16 * MIB}],
        "ceph": {"secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    let data_bytes = pattern("RBDDATA");
    ceph::write(&format!("rbd/{data}"), 0, &data_bytes);
    virsh(&["start", &vm]).unwrap();
    wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();

    for mode in ["linked", "copy"] {
        let r = h
            .call_ok("/vm/clone", &json!({"vmUuid": vm, "names": ["a", "b"], "full": true, "mode": mode}))
            .await
            .unwrap();
        assert_eq!(r["numberOfClonedVm"], 2, "{mode}: {r}");
        assert_eq!(kvmagent_host_tests::checks::domstate(&vm).as_deref(), Some("running"), "the source keeps running");
        for inv in r["inventories"].as_array().unwrap() {
            let c = inv["inventory"]["uuid"].as_str().unwrap().to_owned();
            h.track_vm(&c);
            let vols = inv["inventory"]["allVolumes"].as_array().unwrap();
            for v in vols {
                let name = v["installPath"].as_str().unwrap().trim_start_matches("ceph://");
                let parent = &ceph::info(name).unwrap()["parent"];
                assert_eq!(parent.is_object(), mode == "linked", "{mode} clone {name}: {parent}");
            }
            let dump = wait_report(&console_log(&h, &c), Duration::from_secs(120)).await.unwrap();
            assert_eq!(dump["vda"][&0], bytes, "{mode} clone sees the root data");
            assert_eq!(dump["vdb"][&0], data_bytes, "{mode} clone sees the data volume");
            h.call_ok("/vm/destroy", &json!({"uuid": c})).await.unwrap();
            for v in vols {
                h.call_ok("/ceph/primarystorage/delete", &json!({"installPath": v["installPath"]})).await.unwrap();
            }
        }
        // Copies leave no temporary snapshot behind, and a linked clone's goes with the last
        // clone deleted.
        for i in [&root, &data] {
            let snaps = ceph::rbd(&["snap", "ls", "--format", "json", &format!("rbd/{i}")]).unwrap();
            assert!(!snaps.contains("kvmagent-clone"), "{mode}: {snaps}");
        }
    }
    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    for i in [&root, &data] {
        ceph::remove_all(&format!("rbd/{i}"));
    }
    ceph::remove_all(&format!("rbd/{img}"));
    let _ = virsh(&["secret-undefine", &secret]);
}

#[tokio::test]
async fn change_image_of_an_rbd_root() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let (a, _) = rbd_image();
    let (b, b_bytes) = rbd_image();
    let secret = secret(&h).await;
    let vm = uuid();
    h.track_vm(&vm);
    let root = format!("vol-{}", uuid());
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "rbd-ci", "memory": 160 * MIB, "cpuNum": 1, "kernelBoot": kernel_boot(&h, &[0], 1).unwrap()},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{root}"), "imagePath": format!("ceph://rbd/{a}@{a}")},
        "ceph": {"secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    let r = h
        .call_ok("/vm/changeimage", &json!({"vmUuid": vm, "imagePath": format!("ceph://rbd/{b}@{b}"), "systemTags": ["ceph::rootPoolName::rbd"]}))
        .await
        .unwrap();
    let new_root = r["allVolumes"][0]["installPath"].as_str().unwrap().trim_start_matches("ceph://").to_owned();
    assert_ne!(new_root, format!("rbd/{root}"));
    assert_eq!(
        ceph::info(&new_root).unwrap()["parent"]["image"].as_str(),
        Some(b.as_str()),
        "cloned from the new image"
    );
    assert!(ceph::info(&format!("rbd/{root}")).is_none(), "the old root is removed once the VM points at the new one");
    virsh(&["start", &vm]).unwrap();
    let dump = wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();
    assert_eq!(dump["vda"][&0], b_bytes, "the guest sees the new image");
    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    let _ = ceph::rbd(&["rm", "--no-progress", &new_root]);
    for i in [&a, &b] {
        ceph::remove_all(&format!("rbd/{i}"));
    }
    let _ = virsh(&["secret-undefine", &secret]);
}
