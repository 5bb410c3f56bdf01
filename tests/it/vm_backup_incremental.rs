//! Incremental backups that read only what changed, on real libvirtd and qemu: a running VM's
//! point is a backup job from the previous point's checkpoint, a stopped VM's copies the
//! extents the previous point's bitmap marks. Each incremental file holds about the written
//! bytes and no more, says `bitmap`, and restores byte-identical to the source at that instant;
//! a broken chain (bitmap removed, checkpoint metadata lost) compares instead and says why.
//! A VM on Ceph keeps each point's RBD snapshots, and its incrementals copy what librbd
//! reports changed between them (`snapshot-diff`); a missing snapshot compares instead.

use std::path::{Path, PathBuf};

use kvmagent_host_tests::ceph::{self, agent_config, MadeImages};
use kvmagent_host_tests::checks::{
    bitmaps, checkpoints, eventually, guest_disk_fill, guest_disk_flush, qemu_img, qemu_io_fill, virsh,
};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::sources::{rbd_spec, SourceVm};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// qcow2's default cluster: what a partly written cluster costs.
const CLUSTER: u64 = 64 * KIB;

/// Writes made between the points: `(volume index, offset, length, byte)`, on both disks,
/// cluster-aligned and not.
const WRITES: [(usize, u64, u64, u8); 4] = [
    (0, 2 * MIB, 64 * KIB, 0x61),
    (1, 4 * MIB, 128 * KIB, 0x62),
    (1, 9 * MIB + 4 * KIB, 8 * KIB, 0x63),
    (1, 0, 4 * KIB, 0),
];

fn point_file(r: &Value, volume: usize) -> PathBuf {
    let point = r["point"].as_u64().unwrap() as usize;
    let file = r["manifest"]["volumes"][volume]["chain"][point]["file"].as_str().unwrap();
    Path::new(r["groupPath"].as_str().unwrap()).join(file)
}

/// The byte ranges a point file holds itself (not through its backing file).
fn own_ranges(file: &Path) -> Vec<(u64, u64)> {
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", file.to_str().unwrap()]).unwrap()).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// The incremental of each volume covers what was written to it, and little else.
fn holds_just_the_writes(inc: &Value) {
    for volume in [0, 1] {
        let own = own_ranges(&point_file(inc, volume));
        let writes: Vec<_> = WRITES.iter().filter(|w| w.0 == volume).collect();
        for (_, offset, len, _) in &writes {
            let covered = own.iter().any(|(s, l)| s <= offset && offset + len <= s + l);
            assert!(covered, "volume {volume}: write at {offset}+{len} is in the incremental: {own:?}");
        }
        let written: u64 = writes.iter().map(|w| w.2).sum();
        let held: u64 = own.iter().map(|r| r.1).sum();
        assert!(held <= 2 * written + 4 * CLUSTER, "volume {volume}: {held} bytes held for {written} written: {own:?}");
    }
}

/// Restores the newest point of `r` as a stopped VM; its volume files, root first.
async fn restore(h: &Host, r: &Value) -> [PathBuf; 2] {
    let new_vm = uuid();
    h.track_vm(&new_vm);
    let (_, root) = root_volume_path(h);
    let (_, data) = data_volume_path(h);
    let data_volume = &r["manifest"]["volumes"][1]["volumeUuid"];
    let cmd = json!({"groupUuid": r["groupUuid"], "vm": {"vmInstanceUuid": new_vm}, "strategy": "CreateStopped",
                     "rootVolume": {"installPath": root},
                     "dataVolumes": [{"sourceVolumeUuid": data_volume, "installPath": data}]});
    h.call_ok("/vm/createfrombackup", &cmd).await.unwrap();
    [root, data]
}

fn identical(a: &Path, b: &Path) {
    let out = qemu_img(&["compare", "-U", a.to_str().unwrap(), b.to_str().unwrap()]).unwrap();
    assert!(out.contains("identical"), "{} vs {}: {out}", a.display(), b.display());
}

/// Copies of the source's volumes as they are now (a running VM's flushed first), to compare
/// a restore with.
fn copies(src: &SourceVm, dir: &Path, running: bool) -> [PathBuf; 2] {
    [(&src.root, "virtio-disk0", "root"), (&src.data, "virtio-disk1", "data")].map(|(file, alias, name)| {
        if running {
            guest_disk_flush(&src.vm, alias).unwrap();
        }
        let copy = dir.join(format!("{name}.qcow2"));
        qemu_img(&["convert", "-U", "-O", "qcow2", file, copy.to_str().unwrap()]).unwrap();
        copy
    })
}

fn write_all(src: &SourceVm, running: bool) {
    for (volume, offset, len, byte) in WRITES {
        if running {
            guest_disk_fill(&src.vm, ["virtio-disk0", "virtio-disk1"][volume], offset, len, byte).unwrap();
        } else {
            qemu_io_fill(Path::new([&src.root, &src.data][volume]), offset, len, byte).unwrap();
        }
    }
}

async fn incremental(h: &Host, src: &SourceVm, full: &Value) -> Value {
    let cmd = json!({"vmUuid": src.vm, "mode": "incremental", "groupUuid": full["groupUuid"]});
    h.call_ok("/vm/backup", &cmd).await.unwrap()
}

#[tokio::test]
async fn a_running_vm_incremental_reads_only_the_written_clusters_and_restores_identical() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let src = SourceVm::local(&h, &base, true).await.unwrap();
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": src.vm})).await.unwrap();
    assert!(full.get("incrementalBy").is_none(), "{full}");
    write_all(&src, true);
    let inc = incremental(&h, &src, &full).await;
    let dir = tempfile::tempdir().unwrap();
    let at_point = copies(&src, dir.path(), true);
    assert_eq!(inc["incrementalBy"], "bitmap", "{inc}");
    holds_just_the_writes(&inc);
    assert_eq!(checkpoints(&src.vm), vec![format!("kvmagent-backup-{}-1", full["groupUuid"].as_str().unwrap())]);

    // Later writes are in the source only.
    guest_disk_fill(&src.vm, "virtio-disk1", 4 * MIB, 4 * KIB, 0x70).unwrap();
    for (restored, copy) in restore(&h, &inc).await.iter().zip(&at_point) {
        identical(restored, copy);
    }

    // The VM redefined without its checkpoint metadata: the next point compares, and says so.
    virsh(&["checkpoint-delete", "--metadata", &src.vm, &checkpoints(&src.vm)[0]]).unwrap();
    let broken = incremental(&h, &src, &full).await;
    let at_broken = copies(&src, dir.path(), true);
    assert_eq!(broken["incrementalBy"], "compare", "{broken}");
    assert!(broken["incrementalReason"].as_str().unwrap().contains("no checkpoint"), "{broken}");
    for (restored, copy) in restore(&h, &broken).await.iter().zip(&at_broken) {
        identical(restored, copy);
    }
    // ... and the chain is whole again from there.
    guest_disk_fill(&src.vm, "virtio-disk1", 5 * MIB, 4 * KIB, 0x71).unwrap();
    assert_eq!(incremental(&h, &src, &full).await["incrementalBy"], "bitmap");
}

#[tokio::test]
async fn a_stopped_vm_incremental_copies_only_the_dirty_extents_and_restores_identical() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let src = SourceVm::local(&h, &base, false).await.unwrap();
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": src.vm})).await.unwrap();
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    assert_eq!(bitmaps(&src.data), vec![format!("kvmagent-backup-{group}-0")]);
    write_all(&src, false);
    let inc = incremental(&h, &src, &full).await;
    assert_eq!(inc["incrementalBy"], "bitmap", "{inc}");
    holds_just_the_writes(&inc);
    assert_eq!(bitmaps(&src.data), vec![format!("kvmagent-backup-{group}-1")], "only the newest bitmap is kept");
    let [root, data] = restore(&h, &inc).await;
    identical(&root, Path::new(&src.root));
    identical(&data, Path::new(&src.data));

    // A bitmap removed (a volume replaced): the next point compares, and says so.
    qemu_io_fill(Path::new(&src.data), 6 * MIB, 64 * KIB, 0x66).unwrap();
    qemu_img(&["bitmap", "--remove", &src.data, &format!("kvmagent-backup-{group}-1")]).unwrap();
    let broken = incremental(&h, &src, &full).await;
    assert_eq!(broken["incrementalBy"], "compare", "{broken}");
    assert!(broken["incrementalReason"].as_str().unwrap().contains("has no bitmap"), "{broken}");
    let [root, data] = restore(&h, &broken).await;
    identical(&root, Path::new(&src.root));
    identical(&data, Path::new(&src.data));

    // Started after a stopped point: the running point finds the checkpoint the stopped one
    // recorded, and reads its bitmap.
    virsh(&["start", &src.vm]).unwrap();
    guest_disk_fill(&src.vm, "virtio-disk1", 7 * MIB, 64 * KIB, 0x67).unwrap();
    let running = incremental(&h, &src, &full).await;
    assert_eq!(running["incrementalBy"], "bitmap", "{running}");
    let own: u64 = own_ranges(&point_file(&running, 1)).iter().map(|r| r.1).sum();
    assert!(own <= 4 * CLUSTER, "{own} bytes for one written cluster");
}

/// The `kvmagent-backup-*` snapshots of an RBD image.
fn backup_snapshots(spec: &str) -> Vec<String> {
    ceph::snapshots(spec).into_iter().filter(|n| n.starts_with("kvmagent-backup-")).collect()
}

/// `image@snapshot` of the RBD image exported to a raw file in `dir`.
fn export(spec: &str, dir: &Path) -> PathBuf {
    let to = dir.join(format!("{}.raw", spec.replace(['/', '@'], "_")));
    let _ = std::fs::remove_file(&to);
    ceph::rbd(&["export", "--no-progress", spec, to.to_str().unwrap()]).unwrap();
    to
}

/// Each restored volume reads as its RBD image did at `point` of `group` (its snapshot).
async fn restores_as_the_snapshots(h: &Host, r: &Value, images: &[String; 2], group: &str, point: usize, dir: &Path) {
    let restored = restore(h, r).await;
    for (file, image) in restored.iter().zip(images) {
        identical(file, &export(&format!("{image}@kvmagent-backup-{group}-{point}"), dir));
    }
}

#[tokio::test]
async fn an_rbd_vm_incremental_copies_only_the_snapshot_diff_and_restores_identical() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let img = format!("image-{}", uuid());
    let (root, data) = (format!("rbd/vol-{}", uuid()), format!("rbd/vol-{}", uuid()));
    let _made = MadeImages(vec![format!("rbd/{img}"), root.clone(), data.clone()]);
    ceph::rbd(&["create", "--size", "16M", &format!("rbd/{img}")]).unwrap();
    ceph::rbd(&["snap", "create", &format!("rbd/{img}@{img}")]).unwrap();
    // The copy of the VM made at the end starts: QEMU needs the cephx secret.
    let secret = uuid::Uuid::new_v4().to_string();
    h.call_ok("/vm/createcephsecret", &json!({"userKey": ceph::admin_key(), "uuid": secret})).await.unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "rbd-backup", "memory": 160 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://{root}"), "imagePath": format!("ceph://rbd/{img}@{img}")},
        "dataVolumes": [{"volumeUuid": uuid(), "installPath": format!("ceph://{data}"), "size": 16 * MIB}],
        "ceph": {"secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    let images = [root.clone(), data.clone()];
    // Every object holds data before the full point (a guest's disk in use): the later writes
    // land in objects the previous snapshot has, where librbd's diff is exact.
    for i in &images {
        ceph::write(i, 0, &vec![0x11; 16 * MIB as usize]);
    }
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": vm})).await.unwrap();
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    for i in &images {
        assert_eq!(backup_snapshots(i), vec![format!("kvmagent-backup-{group}-0")], "{i}");
    }
    for (volume, offset, len, byte) in WRITES {
        ceph::write(&images[volume], offset, &vec![byte; len as usize]);
    }
    let inc = h.call_ok("/vm/backup", &json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group})).await.unwrap();
    assert_eq!(inc["incrementalBy"], "snapshot-diff", "{inc}");
    assert!(inc.get("incrementalReason").is_none(), "{inc}");
    holds_just_the_writes(&inc);
    // The previous point's snapshots go after the reply.
    let newest = vec![format!("kvmagent-backup-{group}-1")];
    eventually("only the newest point's snapshots are kept", || images.iter().all(|i| backup_snapshots(i) == newest))
        .await
        .unwrap();
    // Later writes are in the source only.
    ceph::write(&data, 4 * MIB, &[0x70; 4096]);
    let dir = tempfile::tempdir().unwrap();
    restores_as_the_snapshots(&h, &inc, &images, &group, 1, dir.path()).await;

    // The previous point's snapshot removed by hand: the next point compares, and says so.
    let previous = format!("{data}@kvmagent-backup-{group}-1");
    ceph::rbd(&["snap", "unprotect", &previous]).unwrap();
    ceph::rbd(&["snap", "rm", "--no-progress", &previous]).unwrap();
    let broken =
        h.call_ok("/vm/backup", &json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group})).await.unwrap();
    assert_eq!(broken["incrementalBy"], "compare", "{broken}");
    assert!(broken["incrementalReason"].as_str().unwrap().contains("has no snapshot"), "{broken}");
    restores_as_the_snapshots(&h, &broken, &images, &group, 2, dir.path()).await;
    // ... and the chain is whole again from there.
    ceph::write(&data, 5 * MIB, &[0x71; 4096]);
    let again =
        h.call_ok("/vm/backup", &json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group})).await.unwrap();
    assert_eq!(again["incrementalBy"], "snapshot-diff", "{again}");

    // The kept snapshots block nothing: a flatten, a copy of the VM, the volumes' deletion.
    h.call_ok("/vm/flatten", &json!({"vmUuid": vm})).await.unwrap();
    assert!(ceph::info(&root).unwrap()["parent"].is_null(), "flattened under a kept backup snapshot");
    let r = h.call_ok("/vm/clone", &json!({"vmUuid": vm, "names": ["c"], "full": true, "mode": "copy"})).await.unwrap();
    let copy = &r["inventories"][0]["inventory"];
    assert!(copy["uuid"].is_string(), "{r}");
    h.track_vm(copy["uuid"].as_str().unwrap());
    h.call_ok("/vm/destroy", &json!({"uuid": copy["uuid"]})).await.unwrap();
    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    let copies = copy["allVolumes"].as_array().unwrap().iter().map(|v| v["installPath"].clone());
    for path in images.iter().map(|i| json!(format!("ceph://{i}"))).chain(copies) {
        h.call_ok("/ceph/primarystorage/delete", &json!({"installPath": path})).await.unwrap();
        let spec = path.as_str().unwrap().trim_start_matches("ceph://").to_owned();
        assert!(ceph::info(&spec).is_none(), "{spec} deleted with its backup snapshot");
    }
    let _ = virsh(&["secret-undefine", &secret]);
}

#[tokio::test]
async fn a_running_rbd_vm_incremental_copies_only_the_snapshot_diff_and_restores_identical() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let src = SourceVm::rbd(&h).await.unwrap();
    let images = [rbd_spec(&src.root), rbd_spec(&src.data)];
    // The guest's disks in use: every object holds data before the full point.
    for (alias, image) in ["virtio-disk0", "virtio-disk1"].iter().zip(&images) {
        let size = ceph::info(image).unwrap()["size"].as_u64().unwrap();
        guest_disk_fill(&src.vm, alias, 0, size, 0x11).unwrap();
    }
    let full = h.call_ok("/vm/backup", &json!({"vmUuid": src.vm})).await.unwrap();
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    write_all(&src, true);
    let inc = incremental(&h, &src, &full).await;
    assert_eq!(inc["incrementalBy"], "snapshot-diff", "{inc}");
    holds_just_the_writes(&inc);
    // Later writes are in the source only.
    guest_disk_fill(&src.vm, "virtio-disk1", 4 * MIB, 4 * KIB, 0x70).unwrap();
    let dir = tempfile::tempdir().unwrap();
    restores_as_the_snapshots(&h, &inc, &images, &group, 1, dir.path()).await;
    src.remove_rbd(&h, &[]).await.unwrap();
}
