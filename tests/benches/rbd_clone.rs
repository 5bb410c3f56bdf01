//! Benchmark: `/vm/clone` of a VM on RBD into N linked clones (volumes only) against a
//! sequential `rbd clone` loop from one protected snapshot, in the same process, on the test
//! cluster (`tests/ceph/start.sh`). Prints wall times and the ratio.
//!
//! Run: `cargo build --release -p kvmagent && cargo bench -p kvmagent-host-tests --bench rbd_clone`

use std::process::Command;
use std::time::{Duration, Instant};

use kvmagent_host_tests::ceph::{self, agent_config};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KVMAGENT_BENCH_CLONES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let h = Host::start_with(&format!("{}[clone]\nparallelism = 8\n", agent_config())).await.expect("agent");
    let image = format!("bench-img-{}", uuid());
    ceph::rbd(&["create", "--size", "64M", &format!("rbd/{image}")]).unwrap();
    ceph::rbd(&["snap", "create", &format!("rbd/{image}@{image}")]).unwrap();
    let vm = uuid();
    let root = format!("bench-src-{}", uuid());
    h.call_ok(
        "/vm/create",
        &json!({"vm": {"vmInstanceUuid": vm, "vmName": "bench", "memory": 128 * MIB, "cpuNum": 1},
                "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/{root}"), "imagePath": format!("ceph://rbd/{image}@{image}")},
                "strategy": "JustCreate"}),
    )
    .await
    .expect("source VM");

    let names: Vec<String> = (0..n).map(|i| format!("bench-{i}")).collect();
    let t = Instant::now();
    let r = h
        .call_within(
            "/vm/clone",
            &json!({"vmUuid": vm, "names": names, "strategy": "JustCreate"}),
            Duration::from_secs(3600),
        )
        .await
        .expect("clone");
    let agent = t.elapsed();
    assert_eq!(r["numberOfClonedVm"].as_u64(), Some(n as u64), "{r}");

    // Baseline: one snapshot, protected, then one `rbd clone` after the other.
    let snap = format!("rbd/{root}@baseline");
    let conf = ceph::conf();
    let t = Instant::now();
    ceph::rbd(&["snap", "create", &snap]).unwrap();
    ceph::rbd(&["snap", "protect", &snap]).unwrap();
    let mut baseline_images = Vec::new();
    for _ in 0..n {
        let dst = format!("rbd/bench-base-{}", uuid());
        let ok = Command::new("rbd").arg("-c").arg(&conf).args(["clone", &snap, &dst]).status().unwrap().success();
        assert!(ok, "rbd clone");
        baseline_images.push(dst);
    }
    let baseline = t.elapsed();

    println!("RBD linked clones: {n}");
    println!(
        "kvmagent /vm/clone      {:>8.3} s  ({:.1} ms per clone)",
        agent.as_secs_f64(),
        agent.as_secs_f64() * 1000.0 / n as f64
    );
    println!(
        "baseline rbd clone loop {:>8.3} s  ({:.1} ms per clone)",
        baseline.as_secs_f64(),
        baseline.as_secs_f64() * 1000.0 / n as f64
    );
    println!("speed-up (baseline / kvmagent): {:.2}x", baseline.as_secs_f64() / agent.as_secs_f64());

    for inv in r["inventories"].as_array().unwrap() {
        let path =
            inv["inventory"]["allVolumes"][0]["installPath"].as_str().unwrap().trim_start_matches("ceph://").to_owned();
        ceph::remove_all(&path);
    }
    for i in &baseline_images {
        ceph::remove_all(i);
    }
    ceph::remove_all(&format!("rbd/{root}"));
    ceph::remove_all(&format!("rbd/{image}"));
}
