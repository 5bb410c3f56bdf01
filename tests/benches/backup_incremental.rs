//! Benchmark: an incremental backup point of a stopped VM with a 4 GiB root holding 1 GiB,
//! after 16 MiB changed: read through the previous point's dirty bitmap, against the full point
//! and against an incremental that compares the whole disk (its bitmap removed). Prints the
//! bytes each incremental holds (what it wrote; the bitmap one read about as much).
//! Then the same on a stopped VM on Ceph: its incremental reads the diff between the previous
//! and the new point's RBD snapshots, against the full point and against a compare (the
//! previous snapshot removed); prints the bytes the diff reported (what it read) and held.
//!
//! Run (the RBD half needs the test cluster, `tests/ceph/start.sh`):
//! `cargo build --release -p kvmagent && cargo bench -p kvmagent-host-tests --bench backup_incremental`

use std::path::Path;
use std::time::{Duration, Instant};

use kvmagent_host_tests::bench::result_line;
use kvmagent_host_tests::ceph::{self, agent_config, MadeImages};
use kvmagent_host_tests::checks::{qemu_img, qemu_io_fill};
use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::sources::SourceVm;
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Bytes the newest point's root file holds itself.
fn held(r: &Value) -> u64 {
    let point = r["point"].as_u64().unwrap() as usize;
    let file = r["manifest"]["volumes"][0]["chain"][point]["file"].as_str().unwrap();
    let path = Path::new(r["groupPath"].as_str().unwrap()).join(file);
    let map: Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", path.to_str().unwrap()]).unwrap()).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum()
}

async fn timed(h: &Host, cmd: &Value) -> (Duration, Value) {
    let t = Instant::now();
    let r = h.call_ok("/vm/backup", cmd).await.expect("backup");
    (t.elapsed(), r)
}

#[tokio::main]
async fn main() {
    local().await;
    on_ceph().await;
}

async fn local() {
    let h = Host::start().await.expect("agent");
    let base = BaseImage::create(&h, 4 * GIB).expect("base image");
    let src = SourceVm::local(&h, &base, false).await.expect("source VM");
    let root = Path::new(&src.root);
    // 1 GiB spread over the disk, 64 MiB every 256 MiB.
    for i in 0..16 {
        qemu_io_fill(root, i * 256 * MIB + MIB, 64 * MIB, 0x11).unwrap();
    }
    let (full_took, full) = timed(&h, &json!({"vmUuid": src.vm})).await;
    let inc = json!({"vmUuid": src.vm, "mode": "incremental", "groupUuid": full["groupUuid"]});
    let change = |byte: u8| {
        // 16 MiB in 1 MiB pieces across the disk.
        for i in 0..16 {
            qemu_io_fill(root, i * 256 * MIB + 2 * MIB, MIB, byte).unwrap();
        }
    };

    change(0x22);
    let (bitmap_took, by_bitmap) = timed(&h, &inc).await;
    assert_eq!(by_bitmap["incrementalBy"], "bitmap", "{by_bitmap}");

    change(0x33);
    let newest = format!("kvmagent-backup-{}-{}", full["groupUuid"].as_str().unwrap(), by_bitmap["point"]);
    qemu_img(&["bitmap", "--remove", &src.root, &newest]).unwrap();
    let (compare_took, by_compare) = timed(&h, &inc).await;
    assert_eq!(by_compare["incrementalBy"], "compare", "{by_compare}");

    println!(
        "full point {full_took:?}; incremental by bitmap {bitmap_took:?} holding {} MiB; by compare {compare_took:?} holding {} MiB (16 MiB changed)",
        held(&by_bitmap) / MIB,
        held(&by_compare) / MIB
    );
    result_line("backup_incremental_bitmap_vs_full", bitmap_took, full_took);
    result_line("backup_incremental_bitmap_vs_compare", bitmap_took, compare_took);
}

/// Bytes `rbd diff` reports changed in `image` since its snapshot `from`: what an incremental
/// point taken now reads.
fn diff_bytes(image: &str, from: &str) -> u64 {
    let out = ceph::rbd(&["diff", "--format", "json", "--from-snap", from, image]).unwrap();
    let extents: Value = serde_json::from_str(&out).unwrap();
    extents.as_array().unwrap().iter().map(|e| e["length"].as_u64().unwrap()).sum()
}

async fn on_ceph() {
    let h = Host::start_with(&agent_config()).await.expect("agent");
    let (img, root) = (format!("rbd/bench-image-{}", uuid()), format!("rbd/bench-vol-{}", uuid()));
    let _made = MadeImages(vec![img.clone(), root.clone()]);
    ceph::rbd(&["create", "--size", "4G", &img]).unwrap();
    ceph::rbd(&["snap", "create", &format!("{img}@s")]).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "bench-rbd", "memory": 128 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://{root}"), "imagePath": format!("ceph://{img}@s")},
        "ceph": {"monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.expect("VM on Ceph");
    // 1 GiB spread over the disk, 64 MiB every 256 MiB.
    for i in 0..16 {
        ceph::fill(&root, i * 256 * MIB + MIB, 64 * MIB, 0x11);
    }
    let (full_took, full) = timed(&h, &json!({"vmUuid": vm})).await;
    let group = full["groupUuid"].as_str().unwrap().to_owned();
    let inc = json!({"vmUuid": vm, "mode": "incremental", "groupUuid": group});
    let change = |byte: u8| {
        for i in 0..16 {
            ceph::fill(&root, i * 256 * MIB + 2 * MIB, MIB, byte);
        }
    };
    let snap = |point: u64| format!("kvmagent-backup-{group}-{point}");

    change(0x22);
    let read = diff_bytes(&root, &snap(0));
    let (diff_took, by_diff) = timed(&h, &inc).await;
    assert_eq!(by_diff["incrementalBy"], "snapshot-diff", "{by_diff}");

    change(0x33);
    let newest = format!("{root}@{}", snap(1));
    ceph::rbd(&["snap", "unprotect", &newest]).unwrap();
    ceph::rbd(&["snap", "rm", "--no-progress", &newest]).unwrap();
    let (compare_took, by_compare) = timed(&h, &inc).await;
    assert_eq!(by_compare["incrementalBy"], "compare", "{by_compare}");

    println!(
        "RBD: full point {full_took:?} holding {} MiB; incremental by snapshot diff {diff_took:?} reading {} MiB, \
         holding {} MiB; by compare {compare_took:?} holding {} MiB (16 MiB changed)",
        held(&full) / MIB,
        read / MIB,
        held(&by_diff) / MIB,
        held(&by_compare) / MIB
    );
    result_line("backup_incremental_rbd_diff_vs_full", diff_took, full_took);
    result_line("backup_incremental_rbd_diff_vs_compare", diff_took, compare_took);
    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.expect("destroy");
}
