//! Benchmark: offline flatten (`/localstorage/snapshot/offlinemerge`, fullRebase) of a chain
//! with ~1 GiB allocated out of 20 GiB virtual, against `qemu-img convert` of the same chain run
//! in the same process; plus the dry run's time and its error against the real result.
//!
//! Run: `cargo build --release -p kvmagent && cargo bench -p kvmagent-host-tests --bench flatten`

use std::process::Command;
use std::time::{Duration, Instant};

use kvmagent_host_tests::bench::result_line;
use kvmagent_host_tests::checks::{qemu_img, qemu_img_info, qemu_io_fill};
use kvmagent_host_tests::Host;
use serde_json::json;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn actual(p: &std::path::Path) -> u64 {
    qemu_img_info(p).unwrap()["actual-size"].as_u64().unwrap()
}

#[tokio::main]
async fn main() {
    let h = Host::start().await.expect("agent");
    let dir = h.path("bench");
    std::fs::create_dir_all(&dir).unwrap();
    let (base, middle, top) = (dir.join("base.qcow2"), dir.join("middle.qcow2"), dir.join("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), &(20 * GIB).to_string()]).unwrap();
    // Data spread over the disk: 512 MiB in the base, 256 MiB in each overlay.
    for i in 0..8 {
        qemu_io_fill(&base, i * 2 * GIB, 64 * MIB, 0x11).unwrap();
    }
    for (layer, below, byte) in [(&middle, &base, 0x22u8), (&top, &middle, 0x33u8)] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            below.to_str().unwrap(),
            layer.to_str().unwrap(),
        ])
        .unwrap();
        for i in 0..4 {
            qemu_io_fill(layer, i * 4 * GIB + GIB + byte as u64 * MIB, 64 * MIB, byte).unwrap();
        }
    }

    const RUNS: usize = 3;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    // Baseline: qemu-img convert of the chain into a new flat file, with and without fsync. The
    // first, untimed run warms the page cache so that every timed run reads the chain alike.
    let reference = dir.join("reference.qcow2");
    let convert = |durable: bool| {
        let t = Instant::now();
        let ok = Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&top)
            .arg(&reference)
            .status()
            .unwrap()
            .success();
        assert!(ok, "qemu-img convert");
        if durable {
            std::fs::File::open(&reference).unwrap().sync_all().unwrap();
        }
        let took = t.elapsed();
        std::fs::remove_file(&reference).unwrap();
        took
    };
    convert(false);
    let baseline = median((0..RUNS).map(|_| convert(false)).collect());
    let baseline_durable = median((0..RUNS).map(|_| convert(true)).collect());

    // Dry run: metadata only.
    let t = Instant::now();
    let est =
        h.call_ok("/localstorage/volume/estimatetemplatesize", &json!({"volumePath": top})).await.expect("estimate");
    let dry = t.elapsed();
    let before = actual(&top);
    let predicted = est["actualSize"].as_u64().unwrap().saturating_sub(before);

    // The agent flattens fresh copies of the top layer (same chain below).
    let mut runs = Vec::new();
    let mut added = 0;
    for i in 0..RUNS {
        let copy = dir.join(format!("top-{i}.qcow2"));
        std::fs::copy(&top, &copy).unwrap();
        let t = Instant::now();
        h.call_within(
            "/localstorage/snapshot/offlinemerge",
            &json!({"destPath": copy, "fullRebase": true}),
            Duration::from_secs(3600),
        )
        .await
        .expect("flatten");
        runs.push(t.elapsed());
        added = actual(&copy) - before;
        std::fs::remove_file(&copy).unwrap();
    }
    let agent = median(runs);

    println!(
        "chain: 20 GiB virtual, {:.2} GiB allocated over 3 layers; median of {RUNS} runs",
        (actual(&base) + actual(&middle) + before) as f64 / GIB as f64
    );
    println!("kvmagent offline flatten  {:>8.3} s  (flat copy, fsync, rename over the volume)", agent.as_secs_f64());
    println!("baseline qemu-img convert {:>8.3} s", baseline.as_secs_f64());
    println!("baseline convert + fsync  {:>8.3} s", baseline_durable.as_secs_f64());
    println!("ratio (baseline / kvmagent): {:.2}x", baseline.as_secs_f64() / agent.as_secs_f64());
    println!("ratio (baseline + fsync / kvmagent): {:.2}x", baseline_durable.as_secs_f64() / agent.as_secs_f64());
    println!(
        "dry run {:.3} s: predicted {} bytes added, flatten added {} ({:.3}% off)",
        dry.as_secs_f64(),
        predicted,
        added,
        (predicted as f64 - added as f64).abs() * 100.0 / added as f64
    );
    result_line("flatten-offline-vs-convert", agent, baseline);
    result_line("flatten-offline-vs-convert-fsync", agent, baseline_durable);
}
