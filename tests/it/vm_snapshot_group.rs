//! Snapshot groups on real libvirtd (and the Ceph cluster): snapshot a running VM's root and
//! data volume at one instant, keep writing to the VM, and a VM made from the group sees
//! exactly the bytes of that instant on both disks.

use std::path::Path;

use kvmagent_host_tests::ceph::{self, agent_config};
use kvmagent_host_tests::checks::{domstate, file_sha256, qemu_img_info, virsh};
use kvmagent_host_tests::guest::make_and_check;
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::sources::{rbd_spec, SourceVm};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

async fn from_group(h: &Host, cmd: &Value, src: &SourceVm, byte: u8) -> Value {
    make_and_check(h, "/vm/createfromsnapshot", cmd, &src.expect(byte)).await.unwrap()
}

#[tokio::test]
async fn a_vm_from_a_snapshot_group_sees_the_instant_on_both_disks() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let src = SourceVm::local(&h, &base, true).await.unwrap();
    let vm = &src.vm;

    src.write_both(0x11).unwrap();
    let g = h.call_ok("/vm/snapshotgroup/take", &json!({"vmUuid": vm, "name": "before-upgrade"})).await.unwrap();
    let group = g["groupUuid"].as_str().unwrap().to_owned();
    assert_eq!(domstate(vm).as_deref(), Some("running"), "the source keeps running");
    let snaps = g["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "{g}");
    assert_eq!((snaps[0]["volumeType"].as_str(), snaps[1]["volumeType"].as_str()), (Some("Root"), Some("Data")));
    // The VM goes on writing, to both disks, after the instant.
    src.write_both(0x22).unwrap();
    let shas: Vec<String> =
        snaps.iter().map(|s| file_sha256(Path::new(s["snapshotPath"].as_str().unwrap())).unwrap()).collect();
    let named = h.call_ok("/vm/snapshotgroup/get", &json!({"groupUuid": group})).await.unwrap();
    assert_eq!(named["snapshots"], g["snapshots"]);

    // Thin: overlays on the snapshots, with a name, offering and NIC of its own.
    let thin = json!({"groupUuid": group, "vm": {"vmName": "from-snapshot", "cpuNum": 1, "memory": 160 * MIB,
                      "nics": [{"mac": "52:54:00:00:05:02", "type": "user", "deviceId": 0}]}});
    let r = from_group(&h, &thin, &src, 0x11).await;
    assert_eq!((r["name"].as_str(), r["memorySize"].as_u64()), (Some("from-snapshot"), Some(160 * MIB)), "{r}");
    assert_eq!(r["vmNics"][0]["mac"], "52:54:00:00:05:02");
    for (v, s) in r["allVolumes"].as_array().unwrap().iter().zip(snaps) {
        let info = qemu_img_info(Path::new(v["installPath"].as_str().unwrap())).unwrap();
        assert_eq!(info["backing-filename"], s["snapshotPath"], "a thin volume is an overlay on its snapshot");
    }
    // Thick: standalone copies, the same bytes.
    let thick = json!({"groupUuid": group, "provisioning": "thick", "vm": {"vmName": "copied"}});
    let r = from_group(&h, &thick, &src, 0x11).await;
    assert_ne!(r["vmNics"][0]["mac"], "52:54:00:00:06:01", "a fresh MAC when NICs are not given");
    for v in r["allVolumes"].as_array().unwrap() {
        assert!(qemu_img_info(Path::new(v["installPath"].as_str().unwrap())).unwrap()["backing-filename"].is_null());
    }
    let after: Vec<String> =
        snaps.iter().map(|s| file_sha256(Path::new(s["snapshotPath"].as_str().unwrap())).unwrap()).collect();
    assert_eq!(shas, after, "the snapshots were not written");
    assert_eq!(domstate(vm).as_deref(), Some("running"));
    let live = virsh(&[
        "qemu-monitor-command",
        "--hmp",
        vm,
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
    for _ in 0..2 {
        let src = SourceVm::local(&h, &base, false).await.unwrap();
        groups.push(h.call_ok("/vm/snapshotgroup/take", &json!({"vmUuid": src.vm})).await.unwrap());
    }
    let (a, b) = (&groups[0], &groups[1]);
    let new_vm = uuid();
    h.track_vm(&new_vm);
    let (_, target) = root_volume_path(&h);
    let (_, data_target) = data_volume_path(&h);
    let outside = "/var/tmp/kvmagent-outside-roots.qcow2";
    let with = |extra: Value| {
        let mut cmd = json!({"groupUuid": a["groupUuid"], "vm": {"vmInstanceUuid": new_vm},
                             "rootVolume": {"installPath": target},
                             "dataVolumes": [{"sourceVolumeUuid": a["snapshots"][1]["volumeUuid"], "installPath": data_target}]});
        for (k, v) in extra.as_object().unwrap() {
            cmd[k] = v.clone();
        }
        cmd
    };
    let cases = [
        (with(json!({"groupUuid": uuid()})), "not known"),
        (with(json!({"groupUuid": "../etc"})), "groupUuid"),
        (with(json!({"dataVolumes": [{"snapshotPath": "/var/tmp/no-such-snapshot.qcow2"}]})), "is not known"),
        (with(json!({"dataVolumes": [{"snapshotPath": b["snapshots"][1]["snapshotPath"]}]})), "belongs to group"),
        (
            with(json!({"dataVolumes": [{"sourceVolumeUuid": b["snapshots"][1]["volumeUuid"]}]})),
            "has no snapshot in group",
        ),
        (
            with(json!({"rootVolume": {"sourceVolumeUuid": a["snapshots"][1]["volumeUuid"], "installPath": target}})),
            "not the root volume",
        ),
        (with(json!({"rootVolume": {"installPath": outside}})), "outside"),
        (with(json!({"vm": {"vmInstanceUuid": new_vm, "memory": 1}})), "memory"),
        (
            // Valid to every check, but libvirt cannot start it: everything made is undone.
            with(json!({"vm": {"vmInstanceUuid": new_vm,
                               "nics": [{"mac": "52:54:00:00:05:09", "bridgeName": "kvmt-nobr3", "deviceId": 0}]}})),
            "step 'start domain' failed",
        ),
    ];
    for (cmd, want) in cases {
        let e = h.call_err("/vm/createfromsnapshot", &cmd).await.unwrap();
        assert!(e.contains(want), "{cmd}: {e}");
        for p in [target.as_path(), data_target.as_path(), Path::new(outside)] {
            assert!(!p.exists(), "nothing was made ({}): {cmd}", p.display());
        }
        assert!(domstate(&new_vm).is_none(), "no domain: {cmd}");
    }
    let e = h.call_err("/vm/snapshotgroup/take", &json!({"vmUuid": uuid()})).await.unwrap();
    assert!(e.contains("not known"), "{e}");
    let again = json!({"vmUuid": a["vmUuid"], "groupUuid": a["groupUuid"]});
    let e = h.call_err("/vm/snapshotgroup/take", &again).await.unwrap();
    assert!(e.contains("already exists"), "{e}");
}

#[tokio::test]
async fn a_vm_from_an_rbd_snapshot_group_sees_the_instant() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let src = SourceVm::rbd(&h).await.unwrap();
    src.write_both(0x44).unwrap();
    let g = h.call_ok("/vm/snapshotgroup/take", &json!({"vmUuid": src.vm})).await.unwrap();
    let group = g["groupUuid"].as_str().unwrap().to_owned();
    for (s, image) in g["snapshots"].as_array().unwrap().iter().zip([&src.root, &src.data]) {
        assert_eq!(s["snapshotPath"], json!(format!("{image}@kvmagent-group-{group}")), "{g}");
    }
    src.write_both(0x55).unwrap();

    let (new_root, new_data) = (format!("ceph://rbd/vol-{}", uuid()), format!("ceph://rbd/vol-{}", uuid()));
    let from = json!({"groupUuid": group, "ceph": src.ceph_access, "vm": {"vmName": "rbd-from-snapshot"},
                      "rootVolume": {"installPath": new_root},
                      "dataVolumes": [{"sourceVolumeUuid": g["snapshots"][1]["volumeUuid"], "installPath": new_data}]});
    let r = from_group(&h, &from, &src, 0x44).await;
    let parent = &ceph::info(&rbd_spec(&new_data)).unwrap()["parent"];
    assert_eq!(
        parent["snapshot"],
        json!(format!("kvmagent-group-{group}")),
        "a thin RBD volume is a clone of the snapshot"
    );

    h.call_ok("/vm/destroy", &json!({"uuid": r["uuid"]})).await.unwrap();
    src.remove_rbd(&h, &[new_root, new_data]).await.unwrap();
}
