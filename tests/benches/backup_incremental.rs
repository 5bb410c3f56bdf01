//! Benchmark: an incremental backup point of a stopped VM with a 4 GiB root holding 1 GiB,
//! after 16 MiB changed: read through the previous point's dirty bitmap, against the full point
//! and against an incremental that compares the whole disk (its bitmap removed). Prints the
//! bytes each incremental holds (what it wrote; the bitmap one read about as much).
//!
//! Run: `cargo build --release -p kvmagent && cargo bench -p kvmagent-host-tests --bench backup_incremental`

use std::path::Path;
use std::time::{Duration, Instant};

use kvmagent_host_tests::bench::result_line;
use kvmagent_host_tests::checks::{qemu_img, qemu_io_fill};
use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::sources::SourceVm;
use kvmagent_host_tests::Host;
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
