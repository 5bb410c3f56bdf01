//! Benchmark: `/vm/clone` of one VM into N linked clones (defined, not started) against a
//! sequential baseline doing the minimum by hand — `qemu-img create -b` plus `virsh define` per
//! clone — run in the same process on the same host. Prints wall times and the ratio.
//!
//! Run: `cargo build --release -p kvmagent && cargo bench -p kvmagent-host-tests --bench clone`
//! (`KVMAGENT_BENCH_CLONES=N` to change N; needs libvirtd like the host tests).

use std::process::Command;
use std::time::{Duration, Instant};

use kvmagent_host_tests::checks::virsh;
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn baseline_domain_xml(name: &str, disk: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os><devices><disk type='file' device='disk'>\
         <driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("KVMAGENT_BENCH_CLONES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let h = Host::start_with("[clone]\nparallelism = 8\n").await.expect("agent");
    let base = BaseImage::create(&h, 64 * MIB).expect("base image");
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    h.call_ok(
        "/vm/create",
        &json!({"vm": {"vmInstanceUuid": vm, "vmName": "bench-src", "memory": 128 * MIB, "cpuNum": 1},
                "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path}, "strategy": "JustCreate"}),
    )
    .await
    .expect("source VM");

    // The agent: one call.
    let names: Vec<String> = (0..n).map(|i| format!("bench-{i}")).collect();
    let t = Instant::now();
    let r = h
        .call_within(
            "/vm/clone",
            &json!({"vmUuid": vm, "names": names, "strategy": "CreateStopped"}),
            Duration::from_secs(3600),
        )
        .await
        .expect("clone");
    let agent = t.elapsed();
    assert_eq!(r["numberOfClonedVm"].as_u64(), Some(n as u64), "{r}");
    for inv in r["inventories"].as_array().unwrap() {
        h.track_vm(inv["inventory"]["uuid"].as_str().unwrap());
    }

    // The baseline: the same files and definitions, one after the other.
    let dir = h.path("baseline");
    std::fs::create_dir_all(&dir).unwrap();
    let xml_file = dir.join("domain.xml");
    let mut baseline_vms = Vec::new();
    let t = Instant::now();
    for _ in 0..n {
        let id = uuid();
        let disk = dir.join(format!("{id}.qcow2"));
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base.path)
            .arg(&disk)
            .status()
            .expect("qemu-img")
            .success();
        assert!(ok, "qemu-img create");
        std::fs::write(&xml_file, baseline_domain_xml(&id, &disk.to_string_lossy())).unwrap();
        virsh(&["define", &xml_file.to_string_lossy()]).expect("virsh define");
        baseline_vms.push(id);
    }
    let baseline = t.elapsed();
    for id in &baseline_vms {
        let _ = virsh(&["undefine", id]);
    }

    let per = |d: Duration| d.as_secs_f64() * 1000.0 / n as f64;
    println!("linked clones: {n}");
    println!("kvmagent /vm/clone        {:>9.3} s  ({:.1} ms per clone)", agent.as_secs_f64(), per(agent));
    println!("baseline qemu-img+virsh   {:>9.3} s  ({:.1} ms per clone)", baseline.as_secs_f64(), per(baseline));
    println!("speed-up (baseline / kvmagent): {:.2}x", baseline.as_secs_f64() / agent.as_secs_f64());
}
