//! Native `/vm/clone` on real libvirtd: linked and full clones of running and stopped VMs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvmagent_host_tests::checks::{
    domstate, dumpxml, file_sha256, qemu_img, qemu_img_info, qemu_io_write, virsh, xml_text, SmallDisk,
};
use kvmagent_host_tests::guest::{console_log, kernel_boot, pattern, wait_report};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::{clone_failures, clone_uuids, uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

struct Source {
    vm: String,
    base: BaseImage,
    data: PathBuf,
    data_pattern: Vec<u8>,
}

/// A VM with a TPM and a data volume holding its own pattern; `run` starts it with a guest
/// that reports and then stays up (a shell on its console).
async fn source_vm(h: &Host, run: bool) -> Source {
    let base = BaseImage::create(h, 32 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(h);
    let (data_uuid, data) = data_volume_path(h);
    let mut boot = kernel_boot(h, &[0], 2).unwrap();
    boot["cmdline"] = json!(format!("{} kvmagent.shell=1", boot["cmdline"].as_str().unwrap()));
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "source", "memory": 192 * MIB, "cpuNum": 1, "kernelBoot": boot,
               "nics": [{"mac": "52:54:00:00:00:01", "type": "user", "deviceId": 0}]},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 16 * MIB}],
        "strategy": "CreateStopped",
        "tpm": {"enable": true},
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    let data_pattern = pattern("DATA");
    qemu_io_write(&data, 0, &data_pattern).unwrap();
    if run {
        virsh(&["start", &vm]).unwrap();
        // Wait for its report: the TPM state exists once it ran.
        wait_report(&console_log(h, &vm), Duration::from_secs(90)).await.unwrap();
    }
    Source { vm, base, data, data_pattern }
}

fn swtpm_dir(vm: &str) -> PathBuf {
    let d = format!("{}-{}-{}-{}-{}", &vm[0..8], &vm[8..12], &vm[12..16], &vm[16..20], &vm[20..]);
    Path::new("/var/lib/libvirt/swtpm").join(d)
}

#[tokio::test]
async fn five_linked_clones_of_a_running_vm_with_data_and_tpm() {
    five_clones_of_a_running_vm("linked").await
}

#[tokio::test]
async fn five_full_copies_of_a_running_vm_with_data_and_tpm() {
    five_clones_of_a_running_vm("copy").await
}

async fn five_clones_of_a_running_vm(mode: &str) {
    let h = Host::start().await.unwrap();
    let src = source_vm(&h, true).await;
    let base_sha = file_sha256(&src.base.path).unwrap();
    let names: Vec<String> = (1..=5).map(|i| format!("clone-{i}")).collect();
    let cmd = json!({"vmUuid": src.vm, "names": names, "full": true, "mode": mode});
    let r = h.call_within("/vm/clone", &cmd, Duration::from_secs(300)).await.unwrap();
    assert_eq!(r["success"], true, "{r}");
    let clones = clone_uuids(&r);
    for c in &clones {
        h.track_vm(c);
    }
    assert_eq!((r["numberOfClonedVm"].as_u64(), clones.len()), (Some(5), 5), "{}\n{r}", clone_failures(&r));
    assert_eq!(domstate(&src.vm).as_deref(), Some("running"), "the source keeps running");

    // The source now writes to new tops; what the clones are built on is frozen.
    let frozen = r["sourceVolumes"].as_array().unwrap();
    assert_eq!(frozen.len(), 2, "root and data frozen: {r}");
    for f in frozen {
        let top = qemu_img_info(Path::new(f["installPath"].as_str().unwrap())).unwrap();
        assert_eq!(top["backing-filename"], f["snapshotPath"], "the source's new top is on its frozen snapshot");
        let same =
            qemu_img(&["compare", "-U", f["snapshotPath"].as_str().unwrap(), f["installPath"].as_str().unwrap()])
                .unwrap();
        assert!(same.contains("identical"), "the source's guest-visible data is unchanged: {same}");
    }
    let src_xml = dumpxml(&src.vm).unwrap();
    assert!(
        src_xml.contains(frozen[0]["installPath"].as_str().unwrap()),
        "the running source was switched to its new top"
    );

    let mut macs = std::collections::HashSet::new();
    for (inv, name) in r["inventories"].as_array().unwrap().iter().zip(&names) {
        let inv = &inv["inventory"];
        let c = inv["uuid"].as_str().unwrap();
        assert_eq!(inv["name"].as_str(), Some(name.as_str()));
        assert_eq!(inv["state"], "Running");
        assert!(macs.insert(inv["vmNics"][0]["mac"].as_str().unwrap().to_owned()), "MACs are unique");
        let xml = dumpxml(c).unwrap();
        for v in inv["allVolumes"].as_array().unwrap() {
            assert!(
                xml.contains(&format!("<serial>{}</serial>", v["uuid"].as_str().unwrap())),
                "disk serial = new volume uuid"
            );
            let info = qemu_img_info(Path::new(v["installPath"].as_str().unwrap())).unwrap();
            if mode == "linked" {
                assert!(
                    frozen.iter().any(|f| f["snapshotPath"] == info["backing-filename"]),
                    "linked to a frozen snapshot: {info}"
                );
            } else {
                assert!(info["backing-filename"].is_null(), "a full copy stands alone: {info}");
            }
        }
        assert_ne!(xml_text(&xml, "description").as_deref(), Some("source"));
        assert!(swtpm_dir(c).join("tpm2").is_dir(), "the clone has a copy of the TPM state");
        let dump = wait_report(&console_log(&h, c), Duration::from_secs(120)).await.unwrap();
        assert_eq!(dump["vda"][&0], src.base.pattern, "clone {c} sees the source's root data");
        assert_eq!(dump["vdb"][&0], src.data_pattern, "clone {c} sees the source's data volume");
    }
    assert_eq!(file_sha256(&src.base.path).unwrap(), base_sha);
}

#[tokio::test]
async fn full_copies_of_a_stopped_vm_leave_the_source_as_it_was() {
    let h = Host::start().await.unwrap();
    let src = source_vm(&h, false).await;
    let src_root = PathBuf::from(&h.recorded_paths(&src.vm).unwrap()[0]);
    let (root_sha, data_sha) = (file_sha256(&src_root).unwrap(), file_sha256(&src.data).unwrap());
    let r = h
        .call_ok("/vm/clone", &json!({"vmUuid": src.vm, "names": ["copy-1", "copy-2"], "full": true, "mode": "copy", "strategy": "JustCreate"}))
        .await
        .unwrap();
    assert_eq!(r["numberOfClonedVm"], 2, "{r}");
    assert_eq!(r["sourceVolumes"], json!([]), "a stopped VM is copied without freezing it");
    for inv in r["inventories"].as_array().unwrap() {
        let vols = inv["inventory"]["allVolumes"].as_array().unwrap();
        for (v, original) in vols.iter().zip([&src_root, &src.data]) {
            let p = v["installPath"].as_str().unwrap();
            assert!(qemu_img_info(Path::new(p)).unwrap()["backing-filename"].is_null(), "a full copy stands alone");
            let same = qemu_img(&["compare", "-U", original.to_str().unwrap(), p]).unwrap();
            assert!(same.contains("identical"), "{same}");
        }
        assert_eq!(domstate(inv["inventory"]["uuid"].as_str().unwrap()), None, "JustCreate: no domain");
    }
    assert_eq!(
        (file_sha256(&src_root).unwrap(), file_sha256(&src.data).unwrap()),
        (root_sha, data_sha),
        "the source is never written"
    );
}

#[tokio::test]
async fn one_failing_clone_does_not_undo_the_others_and_leaves_nothing() {
    let h = Host::start().await.unwrap();
    let src = source_vm(&h, false).await;
    let bad_root = h.path("rootVolumes/acct-test/vol-bad/bad.qcow2");
    let good = uuid();
    let bad = uuid();
    h.track_vm(&good);
    h.track_vm(&bad);
    let cmd = json!({
        "vmUuid": src.vm,
        "clones": [
            {"uuid": good, "name": "good"},
            // Valid to every check, but libvirt cannot start it: its bridge does not exist.
            {"uuid": bad, "name": "bad", "rootInstallPath": bad_root,
             "nics": [{"mac": "52:54:00:00:00:99", "bridgeName": "kvmt-nobr1", "deviceId": 0}]},
        ],
        "strategy": "InstantStart",
    });
    let r = h.call_ok("/vm/clone", &cmd).await.unwrap();
    assert_eq!(r["numberOfClonedVm"], 1, "{r}");
    let entries = r["inventories"].as_array().unwrap();
    assert_eq!(entries[0]["inventory"]["uuid"].as_str(), Some(good.as_str()));
    assert_eq!(entries[1]["uuid"].as_str(), Some(bad.as_str()));
    assert!(entries[1]["message"].as_str().unwrap().contains("step 'start domain' failed"), "{r}");
    assert_eq!(domstate(&bad), None, "no orphan domain");
    assert!(!bad_root.exists(), "no volume left for the failed clone");
    assert!(!swtpm_dir(&bad).exists(), "no TPM state left for the failed clone");
    assert!(!h.state_dir.join(format!("vms/{bad}.json")).exists());
    assert_eq!(domstate(&good).as_deref(), Some("running"));
}

#[tokio::test]
async fn bad_clone_commands_make_nothing() {
    let h = Host::start().await.unwrap();
    let src = source_vm(&h, false).await;
    let (_, existing) = root_volume_path(&h);
    std::fs::create_dir_all(existing.parent().unwrap()).unwrap();
    std::fs::write(&existing, b"keep").unwrap();
    let before = std::fs::read_dir(h.path("rootVolumes/acct-test")).unwrap().count();
    let cases = vec![
        (json!({"vmUuid": uuid(), "names": ["x"]}), "not known to this host"),
        (json!({"vmUuid": src.vm}), "at least one clone"),
        (json!({"vmUuid": src.vm, "names": ["a", "b"], "clones": [{}]}), "`names` has 2"),
        (json!({"vmUuid": src.vm, "clones": [{"uuid": "nope"}]}), "32 hexadecimal"),
        (json!({"vmUuid": src.vm, "clones": [{"rootInstallPath": existing}]}), "already exists"),
        (json!({"vmUuid": src.vm, "clones": [{"rootInstallPath": "/etc/evil.qcow2"}]}), "outside the storage roots"),
        (json!({"vmUuid": src.vm, "names": ["x"], "mode": "deep"}), "mode"),
    ];
    for (cmd, needle) in cases {
        let e = h.call_err("/vm/clone", &cmd).await.unwrap();
        assert!(e.contains(needle), "expected {needle:?} in {e}");
        assert_eq!(std::fs::read_dir(h.path("rootVolumes/acct-test")).unwrap().count(), before, "nothing made ({e})");
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
}

#[tokio::test]
async fn a_clone_that_fills_its_disk_leaves_nothing_and_its_sibling_succeeds() {
    let h = Host::start().await.unwrap();
    let src = source_vm(&h, false).await;
    // 4 MiB of data in the source root: a flat copy cannot fit in 2 MiB.
    qemu_io_write(Path::new(&h.recorded_paths(&src.vm).unwrap()[0]), MIB, &vec![0x5a; 4 * MIB as usize]).unwrap();
    let small = SmallDisk::mount(h.path("small"), "2M");
    let full_target = small.0.join("vol-x/x.qcow2");
    let (a, b) = (uuid(), uuid());
    h.track_vm(&a);
    h.track_vm(&b);
    let r = h
        .call_ok(
            "/vm/clone",
            &json!({"vmUuid": src.vm, "mode": "copy", "strategy": "JustCreate",
                    "clones": [{"uuid": a, "rootInstallPath": full_target}, {"uuid": b}]}),
        )
        .await
        .unwrap();
    assert_eq!(r["numberOfClonedVm"], 1, "{r}");
    let msg = r["inventories"][0]["message"].as_str().unwrap();
    assert!(msg.contains("No space left on device") || msg.contains("ENOSPC") || msg.contains("space"), "{msg}");
    let left: Vec<_> = walk(&small.0);
    assert!(left.is_empty(), "no half-made volume or temporary file on the full disk: {left:?}");
    assert!(!h.state_dir.join(format!("vms/{a}.json")).exists());
    assert_eq!(r["inventories"][1]["inventory"]["uuid"].as_str(), Some(b.as_str()));
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}
