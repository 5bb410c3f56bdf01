//! Benchmark: `/vm/clone` of a VM on RBD into N linked clones (volumes only) against a
//! sequential `rbd clone` loop from one protected snapshot, in the same process, on the test
//! cluster (`tests/ceph/start.sh`). Prints wall times and the ratio, then one JSON line
//! `{"name", "figure", "baseline", "ratio"}` (seconds; ratio = figure / baseline).
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
    print_librbd_steps(&h.log());
    let (figure, base) = (agent.as_secs_f64(), baseline.as_secs_f64());
    println!("{}", json!({"name": "rbd_clone", "figure": figure, "baseline": base, "ratio": figure / base}));

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

/// Time per step: how many librbd calls of each kind the agent made and how long they took
/// (from its debug log; nothing when it runs the `rbd` command line).
fn print_librbd_steps(log: &str) {
    let mut steps: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for line in log.lines().filter(|l| l.contains("librbd call")) {
        let line = strip_ansi(line);
        let field = |name: &str| line.split(&format!("{name}=")).nth(1).map(|rest| rest.trim_start_matches('"'));
        let kind =
            field("call").map(|c| c.split_whitespace().take_while(|w| !w.contains('/')).collect::<Vec<_>>().join(" "));
        let us = field("us").and_then(|u| u.split_whitespace().next()?.parse::<u64>().ok());
        if let (Some(kind), Some(us)) = (kind, us) {
            let e = steps.entry(kind).or_default();
            *e = (e.0 + 1, e.1 + us);
        }
    }
    for (kind, (count, us)) in steps {
        println!("librbd {kind:<14} {count:>4} calls  {:>7.1} ms each", us as f64 / count as f64 / 1000.0);
    }
}

/// The log line without its terminal colour codes (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}
