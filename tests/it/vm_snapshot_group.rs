//! Snapshot groups on real libvirtd (and the Ceph cluster): snapshot a running VM's root and
//! data volume at one instant, keep writing to the VM, and a VM made from the group sees
//! exactly the bytes of that instant on both disks.

use std::path::Path;
use std::time::Duration;

use kvmagent_host_tests::ceph::{self, admin_key, agent_config};
use kvmagent_host_tests::checks::{domstate, file_sha256, guest_disk_fill, qemu_img_info, qemu_io_write, virsh};
use kvmagent_host_tests::guest::{console_log, make_and_check, pattern, staying_kernel_boot, wait_report};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Where the tests write through the running VM (the root's image pattern sits at 0).
const AT: u64 = MIB;

fn staying_guest(h: &Host) -> Value {
    staying_kernel_boot(h, &[0, AT], 2).unwrap()
}

/// Writes `byte` at [`AT`] on both disks of the running VM.
fn write_both(vm: &str, byte: u8) {
    for alias in ["virtio-disk0", "virtio-disk1"] {
        guest_disk_fill(vm, alias, AT, 64, byte).unwrap();
    }
}

/// Makes a VM from a group; its guest must see the root image pattern and the data pattern at
/// 0, `byte` at [`AT`] on both disks.
async fn check_vm_from_group(h: &Host, cmd: Value, root_pattern: &[u8], data_pattern: &[u8], byte: u8) -> Value {
    let expect = [
        ("vda", 0, root_pattern.to_vec()),
        ("vdb", 0, data_pattern.to_vec()),
        ("vda", AT, vec![byte; 64]),
        ("vdb", AT, vec![byte; 64]),
    ];
    make_and_check(h, "/vm/createfromsnapshot", &cmd, &expect).await.unwrap()
}

#[tokio::test]
async fn a_vm_from_a_snapshot_group_sees_the_instant_on_both_disks() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let (data_uuid, data) = data_volume_path(&h);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "source", "memory": 192 * MIB, "cpuNum": 1, "kernelBoot": staying_guest(&h),
               "nics": [{"mac": "52:54:00:00:05:01", "type": "user", "deviceId": 0}]},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 16 * MIB}],
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    let data_pattern = pattern("DATA");
    qemu_io_write(&data, 0, &data_pattern).unwrap();
    virsh(&["start", &vm]).unwrap();
    wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();

    write_both(&vm, 0x11);
    let g = h.call_ok("/vm/volumes/takesnapshot", &json!({"vmUuid": vm, "name": "before-upgrade"})).await.unwrap();
    let group = g["groupUuid"].as_str().unwrap().to_owned();
    assert_eq!(domstate(&vm).as_deref(), Some("running"), "the source keeps running");
    let snaps = g["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{g}");
    assert_eq!((snaps[0]["volumeType"].as_str(), snaps[1]["volumeType"].as_str()), (Some("Root"), Some("Data")));
    // The VM goes on writing, to both disks, after the instant.
    write_both(&vm, 0x22);
    guest_disk_fill(&vm, "virtio-disk1", 0, 64, 0x33).unwrap();
    let shas: Vec<String> =
        snaps.iter().map(|s| file_sha256(Path::new(s["snapshotPath"].as_str().unwrap())).unwrap()).collect();
    assert_eq!(
        h.call_ok("/vm/volumes/getsnapshotgroup", &json!({"groupUuid": group})).await.unwrap()["snapshots"],
        g["snapshots"]
    );

    // Thin: overlays on the snapshots, with a name, offering and NIC of its own.
    let thin = json!({"groupUuid": group, "vm": {"vmName": "from-snapshot", "cpuNum": 1, "memory": 160 * MIB,
                      "nics": [{"mac": "52:54:00:00:05:02", "type": "user", "deviceId": 0}]}});
    let r = check_vm_from_group(&h, thin, &base.pattern, &data_pattern, 0x11).await;
    assert_eq!((r["name"].as_str(), r["memorySize"].as_u64()), (Some("from-snapshot"), Some(160 * MIB)), "{r}");
    assert_eq!(r["vmNics"][0]["mac"], "52:54:00:00:05:02");
    for (v, s) in r["allVolumes"].as_array().unwrap().iter().zip(snaps) {
        let info = qemu_img_info(Path::new(v["installPath"].as_str().unwrap())).unwrap();
        assert_eq!(info["backing-filename"], s["snapshotPath"], "a thin volume is an overlay on its snapshot");
    }
    // Thick: standalone copies, the same bytes.
    let thick = json!({"groupUuid": group, "provisioning": "thick", "vm": {"vmName": "copied"}});
    let r = check_vm_from_group(&h, thick, &base.pattern, &data_pattern, 0x11).await;
    assert_ne!(r["vmNics"][0]["mac"], "52:54:00:00:05:01", "a fresh MAC when NICs are not given");
    for v in r["allVolumes"].as_array().unwrap() {
        assert!(qemu_img_info(Path::new(v["installPath"].as_str().unwrap())).unwrap()["backing-filename"].is_null());
    }
    let after: Vec<String> =
        snaps.iter().map(|s| file_sha256(Path::new(s["snapshotPath"].as_str().unwrap())).unwrap()).collect();
    assert_eq!(shas, after, "the snapshots were not written");
    assert_eq!(domstate(&vm).as_deref(), Some("running"));
    let live = virsh(&[
        "qemu-monitor-command",
        "--hmp",
        &vm,
        "qemu-io -d /machine/peripheral/virtio-disk1/virtio-backend \"read -P 0x22 1048576 64\"",
    ])
    .unwrap();
    assert!(!live.contains("failed"), "the source still has its own later writes: {live}");
}

#[tokio::test]
async fn bad_createfromsnapshot_commands_make_nothing() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    // Two stopped VMs, one group each (a stopped VM's files are frozen in its record).
    let mut groups = Vec::new();
    for name in ["a", "b"] {
        let vm = uuid();
        h.track_vm(&vm);
        let (root_uuid, root) = root_volume_path(&h);
        let (data_uuid, data) = data_volume_path(&h);
        let cmd = json!({
            "vm": {"vmInstanceUuid": vm, "vmName": name, "memory": 128 * MIB, "cpuNum": 1},
            "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
            "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 8 * MIB}],
            "strategy": "CreateStopped",
        });
        h.call_ok("/vm/create", &cmd).await.unwrap();
        groups.push(h.call_ok("/vm/volumes/takesnapshot", &json!({"vmUuid": vm})).await.unwrap());
    }
    let (a, b) = (&groups[0], &groups[1]);
    let new_vm = uuid();
    h.track_vm(&new_vm);
    let (_, target) = root_volume_path(&h);
    let outside = "/var/tmp/kvmagent-outside-roots.qcow2";
    let cases = [
        (json!({"groupUuid": uuid(), "vm": {"vmInstanceUuid": new_vm}}), "not known"),
        (json!({"groupUuid": "../etc", "vm": {"vmInstanceUuid": new_vm}}), "groupUuid"),
        (
            json!({"groupUuid": a["groupUuid"], "vm": {"vmInstanceUuid": new_vm},
                   "rootVolume": {"installPath": target},
                   "dataVolumes": [{"snapshotPath": b["snapshots"][1]["snapshotPath"]}]}),
            "belongs to group",
        ),
        (
            json!({"groupUuid": a["groupUuid"], "vm": {"vmInstanceUuid": new_vm},
                   "rootVolume": {"installPath": target},
                   "dataVolumes": [{"sourceVolumeUuid": b["snapshots"][1]["volumeUuid"]}]}),
            "has no snapshot in group",
        ),
        (
            json!({"groupUuid": a["groupUuid"], "vm": {"vmInstanceUuid": new_vm},
                   "rootVolume": {"sourceVolumeUuid": a["snapshots"][1]["volumeUuid"], "installPath": target}}),
            "not the root volume",
        ),
        (
            json!({"groupUuid": a["groupUuid"], "vm": {"vmInstanceUuid": new_vm}, "rootVolume": {"installPath": outside}}),
            "outside",
        ),
        (
            json!({"groupUuid": a["groupUuid"], "vm": {"vmInstanceUuid": new_vm, "memory": 1},
                   "rootVolume": {"installPath": target}}),
            "memory",
        ),
        (
            // Valid to every check, but libvirt cannot start it: everything made is undone.
            json!({"groupUuid": a["groupUuid"], "vm": {"vmInstanceUuid": new_vm,
                   "nics": [{"mac": "52:54:00:00:05:09", "bridgeName": "kvmt-nobr3", "deviceId": 0}]},
                   "rootVolume": {"installPath": target}}),
            "step 'start domain' failed",
        ),
    ];
    for (cmd, want) in cases {
        let e = h.call_err("/vm/createfromsnapshot", &cmd).await.unwrap();
        assert!(e.contains(want), "{cmd}: {e}");
        assert!(!Path::new(&target).exists() && !Path::new(outside).exists(), "nothing was made: {cmd}");
        assert!(domstate(&new_vm).is_none(), "no domain: {cmd}");
    }
    let e = h.call_err("/vm/volumes/takesnapshot", &json!({"vmUuid": uuid()})).await.unwrap();
    assert!(e.contains("not known"), "{e}");
    let e = h
        .call_err("/vm/volumes/takesnapshot", &json!({"vmUuid": a["vmUuid"], "groupUuid": a["groupUuid"]}))
        .await
        .unwrap();
    assert!(e.contains("already exists"), "{e}");
}

#[tokio::test]
async fn a_vm_from_an_rbd_snapshot_group_sees_the_instant() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let secret = uuid::Uuid::new_v4().to_string();
    h.call_ok("/vm/createcephsecret", &json!({"userKey": admin_key(), "uuid": secret})).await.unwrap();
    let img = format!("image-{}", uuid());
    ceph::rbd(&["create", "--size", "32M", &format!("rbd/{img}")]).unwrap();
    let root_pattern = pattern("RBDIMG");
    ceph::write(&format!("rbd/{img}"), 0, &root_pattern);
    ceph::rbd(&["snap", "create", &format!("rbd/{img}@{img}")]).unwrap();
    let access = json!({"secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]});

    let vm = uuid();
    h.track_vm(&vm);
    let (root, data) = (format!("vol-{}", uuid()), format!("vol-{}", uuid()));
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "rbd-source", "memory": 192 * MIB, "cpuNum": 1, "kernelBoot": staying_guest(&h)},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{root}"), "imagePath": format!("ceph://rbd/{img}@{img}")},
        "dataVolumes": [{"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{data}"), "size": 16 * MIB}],
        "ceph": access,
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    let data_pattern = pattern("RBDDATA");
    ceph::write(&format!("rbd/{data}"), 0, &data_pattern);
    virsh(&["start", &vm]).unwrap();
    wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();

    write_both(&vm, 0x44);
    let g = h.call_ok("/vm/volumes/takesnapshot", &json!({"vmUuid": vm})).await.unwrap();
    let group = g["groupUuid"].as_str().unwrap().to_owned();
    for (s, image) in g["snapshots"].as_array().unwrap().iter().zip([&root, &data]) {
        assert_eq!(s["snapshotPath"], json!(format!("ceph://rbd/{image}@kvmagent-group-{group}")), "{g}");
    }
    write_both(&vm, 0x55);

    let (new_root, new_data) = (format!("vol-{}", uuid()), format!("vol-{}", uuid()));
    let from = json!({"groupUuid": group, "ceph": access, "vm": {"vmName": "rbd-from-snapshot"},
                      "rootVolume": {"installPath": format!("ceph://rbd/{new_root}")},
                      "dataVolumes": [{"sourceVolumeUuid": g["snapshots"][1]["volumeUuid"], "installPath": format!("ceph://rbd/{new_data}")}]});
    let r = check_vm_from_group(&h, from, &root_pattern, &data_pattern, 0x44).await;
    let parent = &ceph::info(&format!("rbd/{new_data}")).unwrap()["parent"];
    assert_eq!(
        parent["snapshot"],
        json!(format!("kvmagent-group-{group}")),
        "a thin RBD volume is a clone of the snapshot"
    );

    for v in [r["uuid"].as_str().unwrap(), vm.as_str()] {
        h.call_ok("/vm/destroy", &json!({"uuid": v})).await.unwrap();
    }
    for i in [&new_root, &new_data, &root, &data] {
        ceph::remove_all(&format!("rbd/{i}"));
    }
    ceph::remove_all(&format!("rbd/{img}"));
    let _ = virsh(&["secret-undefine", &secret]);
}
