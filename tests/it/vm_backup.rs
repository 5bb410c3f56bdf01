//! Backups and restores on real libvirtd (and the Ceph cluster): back up a running VM with a
//! data volume, write more, take an incremental, and a VM restored from each point sees exactly
//! the bytes of that point; a corrupted or missing backup file, or a full disk, creates nothing.

use std::path::{Path, PathBuf};

use kvmagent_host_tests::ceph::{self, agent_config};
use kvmagent_host_tests::checks::{
    domstate, dumpxml, eventually, file_sha256, qemu_img, qemu_img_check, qemu_img_info, qemu_io_fill, virsh, SmallDisk,
};
use kvmagent_host_tests::guest::make_and_check;
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::sources::{rbd_spec, SourceVm};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn group_file(r: &Value, volume: usize, point: usize) -> PathBuf {
    let file = r["manifest"]["volumes"][volume]["chain"][point]["file"].as_str().unwrap();
    Path::new(r["groupPath"].as_str().unwrap()).join(file)
}

/// The running VM is back on its own files: temporary tops committed back and removed.
fn on_its_own_files(src: &SourceVm) {
    assert_eq!(domstate(&src.vm).as_deref(), Some("running"));
    let xml = dumpxml(&src.vm).unwrap();
    assert!(xml.contains(&src.root) && xml.contains(&src.data), "{xml}");
    for f in [&src.root, &src.data] {
        assert_eq!(std::fs::read_dir(Path::new(f).parent().unwrap()).unwrap().count(), 1, "no temporary top is left");
    }
}

#[tokio::test]
async fn a_running_vm_backed_up_full_and_incremental_restores_each_point() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let src = SourceVm::local(&h, &base, true).await.unwrap();

    src.write_both(0x11).unwrap();
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": src.vm})).await.unwrap();
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    assert_eq!(full["point"], 0);
    on_its_own_files(&src);
    assert_eq!(qemu_img_info(Path::new(&src.root)).unwrap()["backing-filename"].as_str(), base.path.to_str());

    src.write_both(0x22).unwrap();
    let inc = json!({"vmUuid": src.vm, "mode": "incremental", "groupUuid": group});
    let inc = h.call_ok("/vm/backup", &inc).await.unwrap();
    assert_eq!(inc["point"], 1);
    on_its_own_files(&src);
    src.write_both(0x33).unwrap();

    for volume in [0, 1] {
        let file = group_file(&inc, volume, 1);
        qemu_img_check(&file).unwrap();
        let info = qemu_img_info(&file).unwrap();
        assert_eq!(info["backing-filename"], "0.qcow2", "an incremental is an overlay on the previous point");
        let inc_bytes = std::fs::metadata(&file).unwrap().len();
        let full_bytes = std::fs::metadata(group_file(&inc, volume, 0)).unwrap().len();
        assert!(inc_bytes < full_bytes, "the incremental holds only what changed: {inc_bytes} vs {full_bytes}");
    }

    // Each point restores to exactly its bytes; the newest is the default.
    let at0 = json!({"groupUuid": group, "point": 0, "vm": {"vmName": "restored-0", "cpuNum": 1, "memory": 160 * MIB}});
    let r0 = make_and_check(&h, "/vm/createfrombackup", &at0, &src.expect(0x11)).await.unwrap();
    assert_eq!((r0["name"].as_str(), r0["memorySize"].as_u64()), (Some("restored-0"), Some(160 * MIB)));
    for v in r0["allVolumes"].as_array().unwrap() {
        let p = Path::new(v["installPath"].as_str().unwrap());
        assert!(qemu_img_info(p).unwrap()["backing-filename"].is_null(), "a restored volume is flat");
        qemu_img_check(p).unwrap();
    }
    let restored_data = r0["allVolumes"][1]["installPath"].as_str().unwrap();
    let same = qemu_img(&["compare", "-U", restored_data, group_file(&inc, 1, 0).to_str().unwrap()]).unwrap();
    assert!(same.contains("identical"), "{same}");
    let newest = json!({"groupUuid": group, "vm": {"vmName": "restored-1"}});
    make_and_check(&h, "/vm/createfrombackup", &newest, &src.expect(0x22)).await.unwrap();

    let read = "qemu-io -d /machine/peripheral/virtio-disk1/virtio-backend \"read -P 0x33 1048576 64\"";
    let live = virsh(&["qemu-monitor-command", "--hmp", &src.vm, read]).unwrap();
    assert!(!live.contains("failed"), "the source keeps its later writes: {live}");
}

#[tokio::test]
async fn a_corrupted_or_missing_backup_file_creates_nothing() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let src = SourceVm::local(&h, &base, false).await.unwrap();
    let map = || qemu_img(&["map", "--output=json", &src.root]).unwrap();
    let root_map = map();
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": src.vm})).await.unwrap();
    // (Only the point's dirty bitmap is added to them.)
    assert_eq!(map(), root_map, "a stopped VM's volumes are only read");
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    let new_vm = uuid();
    h.track_vm(&new_vm);
    let (_, target) = root_volume_path(&h);
    let (_, data_target) = data_volume_path(&h);
    let cmd = json!({"groupUuid": group, "vm": {"vmInstanceUuid": new_vm}, "rootVolume": {"installPath": target},
                     "dataVolumes": [{"sourceVolumeUuid": full["manifest"]["volumes"][1]["volumeUuid"], "installPath": data_target}]});
    let nothing_made = |what: &str| {
        assert!(!target.exists() && !data_target.exists(), "{what}: no volume");
        assert!(domstate(&new_vm).is_none(), "{what}: no domain");
    };

    // One flipped byte in the data volume's file.
    let data_file = group_file(&full, 1, 0);
    let original = std::fs::read(&data_file).unwrap();
    let mut bad = original.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    std::fs::write(&data_file, &bad).unwrap();
    let e = h.call_err("/vm/createfrombackup", &cmd).await.unwrap();
    assert!(e.contains("corrupted"), "{e}");
    nothing_made("corrupted");

    std::fs::remove_file(&data_file).unwrap();
    let e = h.call_err("/vm/createfrombackup", &cmd).await.unwrap();
    assert!(e.contains("missing"), "{e}");
    nothing_made("missing");
    let inc = json!({"vmUuid": src.vm, "mode": "incremental", "groupUuid": group});
    let e = h.call_err("/vm/backup", &inc).await.unwrap();
    assert!(e.contains("missing"), "an incremental needs the whole chain: {e}");

    std::fs::write(&data_file, &original).unwrap();
    let with = |extra: Value| {
        let mut c = cmd.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    for (bad, want) in [
        (with(json!({"point": 5})), "not 5"),
        (with(json!({"groupUuid": uuid()})), "no manifest"),
        (with(json!({"backupRoot": "/etc"})), "outside"),
        (with(json!({"dataVolumes": [{"sourceVolumeUuid": uuid()}]})), "not in backup group"),
        (with(json!({"rootVolume": {"installPath": "/var/tmp/outside.qcow2"}})), "outside"),
    ] {
        let e = h.call_err("/vm/createfrombackup", &bad).await.unwrap();
        assert!(e.contains(want), "{bad}: {e}");
        nothing_made(want);
    }
    for (bad, want) in [
        (json!({"vmUuid": src.vm, "groupUuid": group}), "already exists"),
        (json!({"vmUuid": src.vm, "mode": "incremental"}), "groupUuid"),
        (json!({"vmUuid": src.vm, "backupRoot": "/etc"}), "outside"),
    ] {
        let e = h.call_err("/vm/backup", &bad).await.unwrap();
        assert!(e.contains(want), "{bad}: {e}");
    }

    // Intact again: the group restores, and the restore did not write it.
    let before = file_sha256(&data_file).unwrap();
    let r = h.call_ok("/vm/createfrombackup", &with(json!({"strategy": "CreateStopped"}))).await.unwrap();
    assert_eq!(r["state"], "Stopped", "{r}");
    let same = qemu_img(&["compare", target.to_str().unwrap(), &src.root]).unwrap();
    assert!(same.contains("identical"), "{same}");
    assert_eq!(file_sha256(&data_file).unwrap(), before, "the group is only read");
}

#[tokio::test]
async fn a_backup_that_fills_its_disk_leaves_the_group_and_the_vm_as_they_were() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let src = SourceVm::local(&h, &base, false).await.unwrap();
    qemu_io_fill(Path::new(&src.data), 2 * MIB, 8 * MIB, 0x5a).unwrap();
    // Mounted before the VM starts: QEMU, which writes a running VM's backup, runs in its own
    // mount namespace and does not see later mounts.
    let small = SmallDisk::mount(h.state_dir.parent().unwrap().join("backup").join("small"), "2M");
    virsh(&["start", &src.vm]).unwrap();
    let group = uuid();
    let cmd = json!({"vmUuid": src.vm, "groupUuid": group, "backupRoot": small.0});
    let e = h.call_err("/vm/backup", &cmd).await.unwrap();
    assert!(e.contains("step 'back up volume"), "{e}");
    assert!(!small.0.join(&group).exists(), "the new group is removed");
    assert_eq!(std::fs::read_dir(&small.0).unwrap().count(), 0, "no temporary file is left");
    on_its_own_files(&src);
}

#[tokio::test]
async fn an_rbd_vm_backed_up_and_restored_to_ceph_and_to_a_file() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let src = SourceVm::rbd(&h).await.unwrap();
    src.write_both(0x44).unwrap();
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": src.vm})).await.unwrap();
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    src.write_both(0x55).unwrap();
    let inc = json!({"vmUuid": src.vm, "mode": "incremental", "groupUuid": group});
    let r = h.call_ok("/vm/backup", &inc).await.unwrap();
    assert_eq!(r["incrementalBy"], "snapshot-diff", "a running VM's point reads the diff too: {r}");
    // The previous point's snapshots go after the reply.
    let ours = |image: &String| -> Vec<String> {
        let names = ceph::snapshots(&rbd_spec(image)).into_iter();
        names.filter(|n| n.starts_with("kvmagent-backup-")).collect()
    };
    let newest = vec![format!("kvmagent-backup-{group}-1")];
    let only_newest = || [&src.root, &src.data].into_iter().all(|i| ours(i) == newest);
    eventually("only the newest point's snapshot is kept", only_newest).await.unwrap();
    let data_volume = &full["manifest"]["volumes"][1]["volumeUuid"];

    let (new_root, new_data) = (format!("ceph://rbd/vol-{}", uuid()), format!("ceph://rbd/vol-{}", uuid()));
    let to_ceph = json!({"groupUuid": group, "point": 0, "ceph": src.ceph_access, "vm": {"vmName": "rbd-restored"},
                         "rootVolume": {"installPath": new_root},
                         "dataVolumes": [{"sourceVolumeUuid": data_volume, "installPath": new_data}]});
    let r = make_and_check(&h, "/vm/createfrombackup", &to_ceph, &src.expect(0x44)).await.unwrap();
    assert!(ceph::info(&rbd_spec(&new_root)).unwrap()["parent"].is_null(), "a restored image stands alone");
    let (_, file_root) = root_volume_path(&h);
    let (_, file_data) = data_volume_path(&h);
    let to_files = json!({"groupUuid": group, "vm": {"vmName": "file-restored"},
                          "rootVolume": {"installPath": file_root},
                          "dataVolumes": [{"sourceVolumeUuid": data_volume, "installPath": file_data}]});
    let r1 = make_and_check(&h, "/vm/createfrombackup", &to_files, &src.expect(0x55)).await.unwrap();

    for v in [&r["uuid"], &r1["uuid"]] {
        h.call_ok("/vm/destroy", &json!({"uuid": v})).await.unwrap();
    }
    src.remove_rbd(&h, &[new_root, new_data]).await.unwrap();
}
