//! cloud-init seeds on real libvirtd: a VM, its two clones and a VM from its snapshot group each
//! boot with their own NoCloud seed ISO (built by xorriso), which the test guest reads
//! (`kvmagent.cidata=1`), and each has its own VM generation ID.

use std::path::PathBuf;
use std::time::Duration;

use kvmagent_host_tests::checks::{dumpxml, file_sha256, xml_text};
use kvmagent_host_tests::guest::{console_log, kernel_boot, wait_report};
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{clone_uuids, uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const USER_DATA: &str = "#cloud-config\nruncmd: [echo seeded]\n";

/// The seed ISO the VM's record names.
fn seed_of(h: &Host, vm: &str) -> PathBuf {
    let record: Value =
        serde_json::from_slice(&std::fs::read(h.state_dir.join(format!("vms/{vm}.json"))).unwrap()).unwrap();
    PathBuf::from(record["vm"]["cloudInit"]["seed"].as_str().unwrap_or_else(|| panic!("no seed in {record}")))
}

/// The ISO 9660 volume label: bytes 40..72 of the primary volume descriptor (sector 16).
fn iso_label(iso: &std::path::Path) -> String {
    let bytes = std::fs::read(iso).unwrap();
    String::from_utf8_lossy(&bytes[16 * 2048 + 40..16 * 2048 + 72]).trim_end().to_owned()
}

/// What the guest printed of its seed: the hostname and the hash of the user-data.
async fn guest_seed(h: &Host, vm: &str) -> (String, String) {
    wait_report(&console_log(h, vm), Duration::from_secs(120)).await.unwrap();
    let log = std::fs::read_to_string(console_log(h, vm)).unwrap().replace('\r', "");
    let field = |key: &str| {
        log.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("VM {vm} printed no {key}:\n{log}"))
            .trim()
            .to_owned()
    };
    (field("KVMAGENT-CLOUDINIT-HOSTNAME"), field("KVMAGENT-CLOUDINIT-USERDATA"))
}

fn genid(vm: &str) -> String {
    let g = xml_text(&dumpxml(vm).unwrap(), "genid").unwrap_or_else(|| panic!("VM {vm} has no genid"));
    uuid::Uuid::parse_str(&g).unwrap_or_else(|e| panic!("genid {g:?} of {vm}: {e}"));
    g
}

#[tokio::test]
async fn a_vm_and_its_two_clones_each_print_their_own_cloud_init_hostname() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let mut boot = kernel_boot(&h, &[0], 1).unwrap();
    boot["cmdline"] = json!(format!("{} kvmagent.cidata=1", boot["cmdline"].as_str().unwrap()));
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "alpha", "memory": 192 * MIB, "cpuNum": 1, "kernelBoot": boot,
               "nics": [{"mac": "52:54:00:00:c1:01", "type": "user", "deviceId": 0}]},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "cloudInit": {"hostname": "alpha", "userData": USER_DATA,
                      "network": [{"mac": "52:54:00:00:c1:01", "dhcp": true}]},
    });
    let r = h.call_within("/vm/create", &cmd, Duration::from_secs(180)).await.unwrap();
    assert_eq!(r["success"], true, "{r}");

    let seed = seed_of(&h, &vm);
    assert_eq!(seed.parent(), root.parent(), "the seed lies beside the root");
    assert_eq!(iso_label(&seed), "cidata");
    assert!(dumpxml(&vm).unwrap().contains(&format!("<source file='{}'", seed.display())), "attached as a CD-ROM");
    let user_data_sha = {
        let f = h.path("user-data");
        std::fs::write(&f, USER_DATA).unwrap();
        file_sha256(&f).unwrap()
    };
    assert_eq!(guest_seed(&h, &vm).await, ("alpha".to_owned(), user_data_sha.clone()));

    // The guest powered itself off; two clones of it, one named by default, one given its name.
    let clone =
        json!({"vmUuid": vm, "clones": [{"name": "beta"}, {"name": "third", "cloudInit": {"hostname": "gamma"}}]});
    let r = h.call_within("/vm/clone", &clone, Duration::from_secs(300)).await.unwrap();
    assert_eq!((r["success"].as_bool(), r["numberOfClonedVm"].as_u64()), (Some(true), Some(2)), "{r}");
    let clones = clone_uuids(&r);
    for c in &clones {
        h.track_vm(c);
    }
    for (c, name) in clones.iter().zip(["beta", "gamma"]) {
        assert_eq!(guest_seed(&h, c).await, (name.to_owned(), user_data_sha.clone()), "clone {c}");
        assert_ne!(seed_of(&h, c), seed, "each clone has its own seed");
    }

    // A VM from a snapshot group of the source: the seed the call asks for, a new generation ID.
    let group = h.call_ok("/vm/snapshotgroup/take", &json!({"vmUuid": vm})).await.unwrap();
    let from = json!({"groupUuid": group["groupUuid"], "cloudInit": {"hostname": "delta"}});
    let r = h.call_within("/vm/createfromsnapshot", &from, Duration::from_secs(180)).await.unwrap();
    assert_eq!(r["success"], true, "{r}");
    let restored = r["uuid"].as_str().unwrap().to_owned();
    h.track_vm(&restored);
    let empty_user_data = {
        let f = h.path("empty-user-data");
        std::fs::write(&f, "#cloud-config\n").unwrap();
        file_sha256(&f).unwrap()
    };
    assert_eq!(guest_seed(&h, &restored).await, ("delta".to_owned(), empty_user_data));

    let all: Vec<&String> = std::iter::once(&vm).chain(&clones).chain([&restored]).collect();
    let genids: std::collections::HashSet<String> = all.iter().map(|v| genid(v)).collect();
    assert_eq!(genids.len(), 4, "each VM has its own generation ID: {genids:?}");

    for v in all {
        let seed = seed_of(&h, v);
        assert!(seed.is_file(), "{} exists while VM {v} does", seed.display());
        h.call_ok("/vm/destroy", &json!({"uuid": v})).await.unwrap();
        assert!(!seed.exists(), "{} is gone with VM {v}", seed.display());
    }
}
