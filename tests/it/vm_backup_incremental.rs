//! Incremental backups that read only what changed, on real libvirtd and qemu: a running VM's
//! point is a backup job from the previous point's checkpoint, a stopped VM's copies the
//! extents the previous point's bitmap marks. Each incremental file holds about the written
//! bytes and no more, says `bitmap`, and restores byte-identical to the source at that instant;
//! a broken chain (bitmap removed, checkpoint metadata lost) compares instead and says why.

use std::path::{Path, PathBuf};

use kvmagent_host_tests::checks::{guest_disk_fill, guest_disk_flush, qemu_img, qemu_io_fill, virsh};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::sources::SourceVm;
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

/// The backup checkpoints libvirt keeps for the VM.
fn checkpoints(vm: &str) -> Vec<String> {
    virsh(&["checkpoint-list", "--name", vm])
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn bitmaps(file: &str) -> Vec<String> {
    let info: Value = serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", file]).unwrap()).unwrap();
    let list = info["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    list.iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect()
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
