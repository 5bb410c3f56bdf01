//! Benchmark: `/vm/clone` of one VM into N linked clones, defined and then started (measured to
//! `running`), against a sequential baseline doing the minimum by hand — `qemu-img create -b`
//! plus `virsh define` (plus `virsh start`) per clone, of the same machine (the XML libvirt holds
//! for the agent's first clone, with its name, disk and log changed) — run in the same process on
//! the same host. Prints wall times and the ratios. The clones boot nothing (no OS): what is
//! measured is the agent's work up to a running QEMU.
//!
//! Run: `cargo build --release -p kvmagent && cargo bench -p kvmagent-host-tests --bench clone`
//! (`KVMAGENT_BENCH_CLONES=N` to change N; needs libvirtd like the host tests).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kvmagent_host_tests::bench::result_line;
use kvmagent_host_tests::checks::{domstate, virsh};
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{clone_uuids, uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// The domain XML of VM `id` on `disk`, from `template`: the XML libvirt holds for one of the
/// agent's clones (`clone`), so that both sides define and boot the same machine.
fn baseline_domain_xml(template: &str, clone: &str, id: &str, disk: &str) -> String {
    let source = template.split("<source file='").nth(1).and_then(|r| r.split('\'').next()).expect("a disk source");
    template
        .lines()
        .filter(|l| !l.trim_start().starts_with("<uuid>") && !l.trim_start().starts_with("<genid>"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(source, disk)
        .replace(clone, id)
}

/// One `qemu-img create -b` + `virsh define` (+ `virsh start`) per clone, one after the other:
/// the minimum by hand, of the machine the agent's clone `clone` is (its XML `template`).
/// Returns the domains it made.
fn baseline_loop(dir: &Path, base: &Path, n: usize, start: bool, template: &str, clone: &str) -> Vec<String> {
    let xml_file = dir.join("domain.xml");
    let mut vms = Vec::new();
    for _ in 0..n {
        let id = uuid();
        let disk = dir.join(format!("{id}.qcow2"));
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(&disk)
            .status()
            .expect("qemu-img")
            .success();
        assert!(ok, "qemu-img create");
        std::fs::write(&xml_file, baseline_domain_xml(template, clone, &id, &disk.to_string_lossy())).unwrap();
        virsh(&["define", &xml_file.to_string_lossy()]).expect("virsh define");
        if start {
            virsh(&["start", &id]).expect("virsh start");
        }
        vms.push(id);
    }
    vms
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
        &json!({"vm": {"vmInstanceUuid": vm, "vmName": "bench-src", "memory": 64 * MIB, "cpuNum": 1},
                "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path}, "strategy": "JustCreate"}),
    )
    .await
    .expect("source VM");
    let dir = h.path("baseline");
    std::fs::create_dir_all(&dir).unwrap();

    // Defined, then started (to `running`): the agent in one call, then the baseline loop; each
    // phase's domains go before the next phase.
    for (phase, strategy, start) in [("defined", "CreateStopped", false), ("started", "InstantStart", true)] {
        let names: Vec<String> = (0..n).map(|i| format!("bench-{phase}-{i}")).collect();
        let t = Instant::now();
        let r = h
            .call_within(
                "/vm/clone",
                &json!({"vmUuid": vm, "names": names, "strategy": strategy}),
                Duration::from_secs(3600),
            )
            .await
            .expect("clone");
        let agent = t.elapsed();
        assert_eq!(r["numberOfClonedVm"].as_u64(), Some(n as u64), "{r}");
        let clones = clone_uuids(&r);
        let template = virsh(&["dumpxml", &clones[0]]).expect("the first clone's XML");
        if start {
            for c in &clones {
                assert_eq!(domstate(c).as_deref(), Some("running"), "clone {c}");
            }
        }
        for c in &clones {
            let _ = h.call_ok("/vm/destroy", &json!({"uuid": c})).await;
            let _ = virsh(&["undefine", "--nvram", c]);
        }

        let t = Instant::now();
        let made = baseline_loop(&dir, &base.path, n, start, &template, &clones[0]);
        let baseline = t.elapsed();
        for id in &made {
            let _ = virsh(&["destroy", id]);
            let _ = virsh(&["undefine", id]);
        }

        let per = |d: Duration| d.as_secs_f64() * 1000.0 / n as f64;
        println!("linked clones {phase}: {n}");
        println!("kvmagent /vm/clone        {:>9.3} s  ({:.1} ms per clone)", agent.as_secs_f64(), per(agent));
        println!("baseline qemu-img+virsh   {:>9.3} s  ({:.1} ms per clone)", baseline.as_secs_f64(), per(baseline));
        println!("speed-up (baseline / kvmagent): {:.2}x", baseline.as_secs_f64() / agent.as_secs_f64());
        result_line(&format!("clone-{n}-linked-{phase}"), agent, baseline);
    }
}
