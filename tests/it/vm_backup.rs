//! Backups and restores on real libvirtd (and the Ceph cluster): back up a running VM with a
//! data volume, write more, take an incremental, and a VM restored from each point sees exactly
//! the bytes of that point; a corrupted or missing backup file creates nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvmagent_host_tests::ceph::{self, admin_key, agent_config};
use kvmagent_host_tests::checks::{
    domstate, dumpxml, guest_disk_fill, qemu_img, qemu_img_check, qemu_img_info, qemu_io_fill, qemu_io_write, virsh,
    SmallDisk,
};
use kvmagent_host_tests::guest::{console_log, make_and_check, pattern, staying_kernel_boot, wait_report};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Where the tests write through the running VM (the root's image pattern sits at 0).
const AT: u64 = MIB;

fn write_both(vm: &str, byte: u8) {
    for alias in ["virtio-disk0", "virtio-disk1"] {
        guest_disk_fill(vm, alias, AT, 64, byte).unwrap();
    }
}

/// What a VM restored from the point where both disks had `byte` at [`AT`] must read.
fn expect(root: &[u8], data: &[u8], byte: u8) -> Vec<(&'static str, u64, Vec<u8>)> {
    vec![("vda", 0, root.to_vec()), ("vdb", 0, data.to_vec()), ("vda", AT, vec![byte; 64]), ("vdb", AT, vec![byte; 64])]
}

/// A VM with a root on `base` and a data volume holding a pattern at 0; started (staying up)
/// when `run`.
async fn local_vm(h: &Host, base: &BaseImage, run: bool) -> (String, PathBuf, PathBuf, Vec<u8>) {
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(h);
    let (data_uuid, data) = data_volume_path(h);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "source", "memory": 192 * MIB, "cpuNum": 1,
               "kernelBoot": staying_kernel_boot(h, &[0, AT], 2).unwrap(),
               "nics": [{"mac": "52:54:00:00:06:01", "type": "user", "deviceId": 0}]},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 16 * MIB}],
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    let data_pattern = pattern("DATA");
    qemu_io_write(&data, 0, &data_pattern).unwrap();
    if run {
        virsh(&["start", &vm]).unwrap();
        wait_report(&console_log(h, &vm), Duration::from_secs(90)).await.unwrap();
    }
    (vm, root, data, data_pattern)
}

fn group_file(r: &Value, volume: usize, point: usize) -> PathBuf {
    let m = &r["manifest"];
    Path::new(r["groupPath"].as_str().unwrap()).join(m["volumes"][volume]["chain"][point]["file"].as_str().unwrap())
}

#[tokio::test]
async fn a_running_vm_backed_up_full_and_incremental_restores_each_point() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let (vm, root, data, data_pattern) = local_vm(&h, &base, true).await;

    write_both(&vm, 0x11);
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": vm})).await.unwrap();
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    assert_eq!(full["point"], 0);
    // The VM runs on its own files again: the temporary tops were committed back and removed.
    assert_eq!(domstate(&vm).as_deref(), Some("running"));
    let xml = dumpxml(&vm).unwrap();
    assert!(xml.contains(root.to_str().unwrap()) && xml.contains(data.to_str().unwrap()), "{xml}");
    assert_eq!(qemu_img_info(&root).unwrap()["backing-filename"].as_str(), base.path.to_str());
    assert_eq!(std::fs::read_dir(data.parent().unwrap()).unwrap().count(), 1, "no temporary top is left");

    write_both(&vm, 0x22);
    let inc = h.call_ok("/vm/backup", &json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group})).await.unwrap();
    assert_eq!(inc["point"], 1);
    write_both(&vm, 0x33);

    for (volume, file) in [(0, group_file(&inc, 0, 1)), (1, group_file(&inc, 1, 1))] {
        qemu_img_check(&file).unwrap();
        let info = qemu_img_info(&file).unwrap();
        assert_eq!(info["backing-filename"], "0.qcow2", "an incremental is an overlay on the previous point");
        let (inc_bytes, full_bytes) =
            (std::fs::metadata(&file).unwrap().len(), std::fs::metadata(group_file(&inc, volume, 0)).unwrap().len());
        assert!(inc_bytes < full_bytes, "the incremental holds only what changed: {inc_bytes} vs {full_bytes}");
    }

    // Each point restores to exactly its bytes; the newest is the default.
    let at0 = json!({"groupUuid": group, "point": 0, "vm": {"vmName": "restored-0", "cpuNum": 1, "memory": 160 * MIB}});
    let r0 =
        make_and_check(&h, "/vm/createfrombackup", &at0, &expect(&base.pattern, &data_pattern, 0x11)).await.unwrap();
    assert_eq!((r0["name"].as_str(), r0["memorySize"].as_u64()), (Some("restored-0"), Some(160 * MIB)));
    for v in r0["allVolumes"].as_array().unwrap() {
        let p = Path::new(v["installPath"].as_str().unwrap());
        assert!(qemu_img_info(p).unwrap()["backing-filename"].is_null(), "a restored volume is flat");
        qemu_img_check(p).unwrap();
    }
    let same = qemu_img(&[
        "compare",
        "-U",
        r0["allVolumes"][1]["installPath"].as_str().unwrap(),
        group_file(&inc, 1, 0).to_str().unwrap(),
    ])
    .unwrap();
    assert!(same.contains("identical"), "{same}");
    let newest = json!({"groupUuid": group, "vm": {"vmName": "restored-1"}});
    make_and_check(&h, "/vm/createfrombackup", &newest, &expect(&base.pattern, &data_pattern, 0x22)).await.unwrap();

    let live = virsh(&[
        "qemu-monitor-command",
        "--hmp",
        &vm,
        "qemu-io -d /machine/peripheral/virtio-disk1/virtio-backend \"read -P 0x33 1048576 64\"",
    ])
    .unwrap();
    assert!(!live.contains("failed"), "the source keeps its later writes: {live}");
}

#[tokio::test]
async fn a_corrupted_or_missing_backup_file_creates_nothing() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let (vm, root, _, _) = local_vm(&h, &base, false).await;
    let root_sha = kvmagent_host_tests::checks::file_sha256(&root).unwrap();
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": vm})).await.unwrap();
    assert_eq!(
        kvmagent_host_tests::checks::file_sha256(&root).unwrap(),
        root_sha,
        "a stopped VM's volumes are read, not frozen"
    );
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    let new_vm = uuid();
    h.track_vm(&new_vm);
    let (_, target) = root_volume_path(&h);
    let cmd = json!({"groupUuid": group, "vm": {"vmInstanceUuid": new_vm}, "rootVolume": {"installPath": target}});
    let nothing_made = |what: &str| {
        assert!(!target.exists(), "{what}: no volume");
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
    let e = h.call_err("/vm/backup", &json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group})).await.unwrap();
    assert!(e.contains("missing"), "an incremental needs the whole chain: {e}");

    std::fs::write(&data_file, &original).unwrap();
    for (bad, want) in [
        (json!({"groupUuid": group, "point": 5, "vm": {"vmInstanceUuid": new_vm}}), "not 5"),
        (json!({"groupUuid": uuid(), "vm": {"vmInstanceUuid": new_vm}}), "no manifest"),
        (json!({"groupUuid": group, "backupRoot": "/etc", "vm": {"vmInstanceUuid": new_vm}}), "outside"),
        (
            json!({"groupUuid": group, "vm": {"vmInstanceUuid": new_vm}, "dataVolumes": [{"sourceVolumeUuid": uuid()}]}),
            "not in backup group",
        ),
        (
            json!({"groupUuid": group, "vm": {"vmInstanceUuid": new_vm}, "rootVolume": {"installPath": "/var/tmp/outside.qcow2"}}),
            "outside",
        ),
    ] {
        let e = h.call_err("/vm/createfrombackup", &bad).await.unwrap();
        assert!(e.contains(want), "{bad}: {e}");
        nothing_made(want);
    }
    let e = h.call_err("/vm/backup", &json!({"vmUuid": vm, "groupUuid": group})).await.unwrap();
    assert!(e.contains("already exists"), "{e}");
    let e = h.call_err("/vm/backup", &json!({"vmUuid": vm, "mode": "incremental"})).await.unwrap();
    assert!(e.contains("groupUuid"), "{e}");
    let e = h.call_err("/vm/backup", &json!({"vmUuid": vm, "backupRoot": "/etc"})).await.unwrap();
    assert!(e.contains("outside"), "{e}");

    // Intact again: the group restores, and the restore did not write it.
    let before = kvmagent_host_tests::checks::file_sha256(&data_file).unwrap();
    let r = h.call_ok("/vm/createfrombackup", &json!({"groupUuid": group, "vm": {"vmInstanceUuid": new_vm}, "rootVolume": {"installPath": target}, "strategy": "CreateStopped"})).await.unwrap();
    assert_eq!(r["state"], "Stopped", "{r}");
    let same = qemu_img(&["compare", target.to_str().unwrap(), root.to_str().unwrap()]).unwrap();
    assert!(same.contains("identical"), "{same}");
    assert_eq!(kvmagent_host_tests::checks::file_sha256(&data_file).unwrap(), before, "the group is read only");
}

#[tokio::test]
async fn an_rbd_vm_backed_up_and_restored_to_ceph_and_to_a_file() {
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
        "vm": {"vmInstanceUuid": vm, "vmName": "rbd-source", "memory": 192 * MIB, "cpuNum": 1,
               "kernelBoot": staying_kernel_boot(&h, &[0, AT], 2).unwrap()},
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
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": vm})).await.unwrap();
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    write_both(&vm, 0x55);
    h.call_ok("/vm/backup", &json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group})).await.unwrap();
    for image in [&root, &data] {
        let snaps = ceph::rbd(&["snap", "ls", "--format", "json", &format!("rbd/{image}")]).unwrap();
        assert!(!snaps.contains("kvmagent-backup-"), "the temporary snapshots are gone: {snaps}");
    }

    let (new_root, new_data) = (format!("vol-{}", uuid()), format!("vol-{}", uuid()));
    let to_ceph = json!({"groupUuid": group, "point": 0, "ceph": access, "vm": {"vmName": "rbd-restored"},
                         "rootVolume": {"installPath": format!("ceph://rbd/{new_root}")},
                         "dataVolumes": [{"sourceVolumeUuid": full["manifest"]["volumes"][1]["volumeUuid"], "installPath": format!("ceph://rbd/{new_data}")}]});
    let r = make_and_check(&h, "/vm/createfrombackup", &to_ceph, &expect(&root_pattern, &data_pattern, 0x44))
        .await
        .unwrap();
    assert!(ceph::info(&format!("rbd/{new_root}")).unwrap()["parent"].is_null(), "a restored image stands alone");
    let (_, file_root) = root_volume_path(&h);
    let (_, file_data) = data_volume_path(&h);
    let to_files = json!({"groupUuid": group, "vm": {"vmName": "file-restored"},
                          "rootVolume": {"installPath": file_root},
                          "dataVolumes": [{"sourceVolumeUuid": full["manifest"]["volumes"][1]["volumeUuid"], "installPath": file_data}]});
    let r1 = make_and_check(&h, "/vm/createfrombackup", &to_files, &expect(&root_pattern, &data_pattern, 0x55))
        .await
        .unwrap();

    for v in [r["uuid"].as_str().unwrap(), r1["uuid"].as_str().unwrap(), vm.as_str()] {
        h.call_ok("/vm/destroy", &json!({"uuid": v})).await.unwrap();
    }
    for i in [&new_root, &new_data, &root, &data] {
        ceph::remove_all(&format!("rbd/{i}"));
    }
    ceph::remove_all(&format!("rbd/{img}"));
    let _ = virsh(&["secret-undefine", &secret]);
}

#[tokio::test]
async fn a_backup_that_fills_its_disk_leaves_the_group_and_the_vm_as_they_were() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let (vm, root, data, _) = local_vm(&h, &base, false).await;
    qemu_io_fill(&data, 2 * MIB, 8 * MIB, 0x5a).unwrap();
    virsh(&["start", &vm]).unwrap();
    wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();
    let small = SmallDisk::mount(h.state_dir.parent().unwrap().join("backup").join("small"), "2M");
    let group = uuid();
    let e = h.call_err("/vm/backup", &json!({"vmUuid": vm, "groupUuid": group, "backupRoot": small.0})).await.unwrap();
    assert!(e.contains("step 'back up volume"), "{e}");
    assert!(!small.0.join(&group).exists(), "the new group is removed");
    assert_eq!(std::fs::read_dir(&small.0).unwrap().count(), 0, "no temporary file is left");
    assert_eq!(domstate(&vm).as_deref(), Some("running"));
    let xml = dumpxml(&vm).unwrap();
    assert!(
        xml.contains(root.to_str().unwrap()) && xml.contains(data.to_str().unwrap()),
        "back on its own files: {xml}"
    );
    for f in [&root, &data] {
        assert_eq!(std::fs::read_dir(f.parent().unwrap()).unwrap().count(), 1, "no temporary top is left");
    }
}
