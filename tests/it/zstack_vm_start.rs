//! `/vm/start` as the ZStack management node means it, on real libvirtd + QEMU: ZStack's
//! StartVmCmd fixture with its NUMA form (vCPUs that may grow, one NUMA cell) and a multi-queue
//! virtio NIC on a bridge, checked in the live domain; then what `/vm/vmsync` says after the guest
//! is reset (as a reboot inside it does) and after its QEMU is killed. Only what the test made is
//! looked at or touched.

use std::time::Duration;

use kvmagent_host_tests::checks::{domstate, dumpxml, ensure_bridge, virsh};
use kvmagent_host_tests::guest::{console_log, staying_kernel_boot, wait_report};
use kvmagent_host_tests::images::{fixture_vm_on_a_new_root, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const BRIDGE: &str = "kvmagent-tbr0";

/// The attributes `names` of the first `<tag>` inside a `<parent>` of `xml`.
fn attrs(xml: &str, parent: &str, tag: &str, names: &[&str]) -> Vec<Option<String>> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    let n = (doc.descendants())
        .find(|n| n.has_tag_name(tag) && n.ancestors().any(|a| a.has_tag_name(parent)))
        .unwrap_or_else(|| panic!("no <{tag}> in <{parent}>: {xml}"));
    names.iter().map(|a| n.attribute(*a).map(str::to_owned)).collect()
}

fn some(v: &[&str]) -> Vec<Option<String>> {
    v.iter().map(|s| Some((*s).to_owned())).collect()
}

/// Waits until `cond` holds (TCG guests are slow).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within 60 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn synced_state(h: &Host, vm: &str) -> Value {
    let r = h.call_ok("/vm/vmsync", &json!({})).await.unwrap();
    r["states"][vm].clone()
}

#[tokio::test]
async fn numa_topology_nic_queues_and_vmsync_after_a_reset_and_a_qemu_crash() {
    let h = Host::start().await.unwrap();
    ensure_bridge(BRIDGE).unwrap();
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let (vm, mut cmd) = fixture_vm_on_a_new_root(&h, &base).await.unwrap();
    cmd["memory"] = json!(256 * MIB);
    // The NUMA form as the management node sends it (useNuma, no topology), small for TCG.
    (cmd["cpuNum"], cmd["maxVcpuNum"]) = (json!(1), json!(4));
    cmd["nics"][0]["bridgeName"] = json!(BRIDGE);
    cmd["nics"][0]["nicInternalName"] = json!(format!("vs{}", &vm[..8]));
    cmd["nics"][0]["vHostAddOn"] = json!({"queueNum": 2, "rxBufferSize": "512"});
    cmd["kernelBoot"] = staying_kernel_boot(&h, &[0], 1).unwrap();

    // An inconsistent topology is refused before anything is made.
    let mut bad = cmd.clone();
    (bad["socketNum"], bad["cpuOnSocket"]) = (json!(2), json!(3));
    let e = h.call_err("/vm/start", &bad).await.unwrap();
    assert!(e.contains("socketNum 2") && e.contains("maxVcpuNum"), "{e}");
    assert_eq!(domstate(&vm), None, "no domain for a refused start");

    h.call_ok("/vm/start", &cmd).await.unwrap();
    let xml = dumpxml(&vm).unwrap();
    assert_eq!(attrs(&xml, "domain", "vcpu", &["current"]), some(&["1"]));
    assert_eq!(attrs(&xml, "cpu", "topology", &["sockets", "cores", "threads"]), some(&["1", "4", "1"]));
    assert_eq!(attrs(&xml, "numa", "cell", &["id", "cpus", "memory"]), some(&["0", "0-3", "262144"]));
    assert_eq!(attrs(&xml, "interface", "driver", &["queues", "rx_queue_size"]), some(&["2", "512"]));
    let counts = virsh(&["vcpucount", &vm]).unwrap();
    let words: Vec<&str> = counts.split_whitespace().collect();
    for line in [["maximum", "live", "4"], ["current", "live", "1"]] {
        assert!(words.windows(3).any(|w| w == line), "{line:?}: {counts}");
    }
    wait_report(&console_log(&h, &vm), Duration::from_secs(120)).await.unwrap();
    assert_eq!(synced_state(&h, &vm).await, "Running");

    // A reset (what QEMU does when the guest reboots): the same QEMU, the domain stays, Running.
    let pid = || std::fs::read_to_string(format!("/run/libvirt/qemu/{vm}.pid")).ok().map(|p| p.trim().to_owned());
    let before = pid().expect("the VM's QEMU pid file");
    let boots =
        || std::fs::read_to_string(console_log(&h, &vm)).unwrap_or_default().matches("KVMAGENT-GUEST-BOOTED").count();
    let booted = boots();
    virsh(&["reset", &vm]).unwrap();
    eventually("the guest boots again", || boots() > booted).await;
    assert_eq!((pid(), domstate(&vm).as_deref()), (Some(before.clone()), Some("running")));
    assert_eq!(synced_state(&h, &vm).await, "Running");

    // Its QEMU killed: the domain stays defined, shut off; vmsync leaves it out (the management
    // node takes a missing VM as stopped, as with ZStack's agent), checkstate says Shutdown.
    let qemu: i32 = before.parse().unwrap();
    assert_eq!(unsafe { libc::kill(qemu, libc::SIGKILL) }, 0, "killing QEMU {qemu} of {vm}");
    eventually("libvirt sees QEMU gone", || domstate(&vm).as_deref() == Some("shut off")).await;
    let sync = h.call_ok("/vm/vmsync", &json!({})).await.unwrap();
    assert!(sync["states"].get(&vm).is_none(), "{sync}");
    assert!(sync["vmInShutdowns"].as_array().is_some_and(|l| !l.contains(&json!(vm))), "{sync}");
    let r = h.call_ok("/vm/checkstate", &json!({"vmUuids": [vm], "hostUuid": uuid()})).await.unwrap();
    assert_eq!(r["states"][&vm], "Shutdown", "{r}");

    // The management node starts it again: the definition is replaced and it runs.
    h.call_ok("/vm/start", &cmd).await.unwrap();
    assert_eq!(domstate(&vm).as_deref(), Some("running"));
    assert_eq!(synced_state(&h, &vm).await, "Running");
    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    assert_eq!(domstate(&vm), None, "destroy undefines");
}
