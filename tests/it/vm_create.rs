//! Native `/vm/create`: volumes and domain in one call, all or nothing.

use std::time::Duration;

use kvmagent_host_tests::checks::{domstate, dumpxml, file_sha256, qemu_img_check, qemu_img_info};
use kvmagent_host_tests::guest::{console_log, kernel_boot, wait_report};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn vm_object(vm: &str) -> Value {
    json!({
        "vmInstanceUuid": vm,
        "vmName": "created",
        "memory": 256 * MIB,
        "cpuNum": 1,
        "nics": [{"mac": "52:54:00:12:34:56", "uuid": uuid(), "deviceId": 0, "type": "user"}],
    })
}

#[tokio::test]
async fn instant_start_thin_root_with_data_volume_and_tpm_boots_the_guest() {
    let h = Host::start().await.unwrap();
    // Progress goes to the sendCommandUrl learned at connect.
    let connect = json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807", "sendCommandUrl": h.callbacks.send_command_url(), "version": "1"});
    assert_eq!(h.post("/host/connect", &[], connect.to_string()).await.unwrap().0, 200);
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let base_sha = file_sha256(&base.path).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let (data_uuid, data) = data_volume_path(&h);
    let mut vm_obj = vm_object(&vm);
    vm_obj["kernelBoot"] = kernel_boot(&h, &[0], 2).unwrap();
    let cmd = json!({
        "vm": vm_obj,
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path, "size": 128 * MIB},
        "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 32 * MIB}],
        "strategy": "InstantStart",
        "tpm": {"enable": true},
    });
    let r = h.call_ok("/vm/create", &cmd).await.unwrap();
    assert_eq!(r["uuid"], json!(vm));
    assert_eq!(r["state"], "Running");
    let vols = r["allVolumes"].as_array().unwrap();
    assert_eq!(vols.len(), 2);
    assert_eq!((vols[0]["type"].as_str(), vols[0]["size"].as_u64()), (Some("Root"), Some(128 * MIB)));
    assert_eq!((vols[1]["type"].as_str(), vols[1]["deviceId"].as_u64()), (Some("Data"), Some(1)));
    assert_eq!(r["vmNics"][0]["mac"], "52:54:00:12:34:56");

    let info = qemu_img_info(&root).unwrap();
    assert_eq!(info["backing-filename"].as_str(), base.path.to_str(), "thin root is an overlay on the cached image");
    assert_eq!(info["virtual-size"].as_u64(), Some(128 * MIB));
    assert!(dumpxml(&vm).unwrap().contains("<tpm model='tpm-crb'>"));

    let dump = wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();
    assert_eq!(dump["vda"][&0], base.pattern, "root shows the image");
    assert_eq!(dump["vdb"][&0], vec![0u8; 64], "data volume is empty");
    let console = std::fs::read_to_string(console_log(&h, &vm)).unwrap();
    assert!(console.contains("KVMAGENT-TPM tpm0"), "the guest sees its TPM: {console}");
    assert_eq!(file_sha256(&base.path).unwrap(), base_sha);
    let reports = h.callbacks.progress_reports();
    assert!(reports.iter().any(|p| p["processType"] == "/vm/create" && p["progress"] == "100"), "{reports:?}");
}

#[tokio::test]
async fn create_stopped_and_just_create_with_a_thick_root() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();

    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let cmd = json!({
        "vm": vm_object(&vm),
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path, "provisioning": "thick"},
        "strategy": "CreateStopped",
    });
    let r = h.call_ok("/vm/create", &cmd).await.unwrap();
    assert_eq!(r["state"], "Stopped");
    assert_eq!(domstate(&vm).as_deref(), Some("shut off"), "defined, not started");
    let info = qemu_img_info(&root).unwrap();
    assert!(info["backing-filename"].is_null(), "thick root is a full copy: {info}");
    assert!(info["actual-size"].as_u64().unwrap() >= 32 * MIB, "and allocated: {info}");
    qemu_img_check(&root).unwrap();
    // The copy carries the image's bytes.
    let out =
        kvmagent_host_tests::checks::qemu_img(&["compare", "-U", base.path.to_str().unwrap(), root.to_str().unwrap()])
            .unwrap();
    assert!(out.contains("identical"), "{out}");

    let vm2 = uuid();
    h.track_vm(&vm2);
    let (r2, root2) = root_volume_path(&h);
    let cmd = json!({"vm": vm_object(&vm2), "rootVolume": {"volumeUuid": r2, "installPath": root2, "size": 64 * MIB}, "strategy": "JustCreate"});
    let r = h.call_ok("/vm/create", &cmd).await.unwrap();
    assert_eq!(r["state"], "Created");
    assert_eq!(domstate(&vm2), None, "JustCreate defines no domain");
    assert_eq!(qemu_img_info(&root2).unwrap()["virtual-size"].as_u64(), Some(64 * MIB));
}

#[tokio::test]
async fn a_failure_at_the_last_step_undoes_every_volume() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let (data_uuid, data) = data_volume_path(&h);
    let mut vm_obj = vm_object(&vm);
    // Valid to every check, but libvirt cannot start it: the bridge does not exist.
    vm_obj["nics"] = json!([{"mac": "52:54:00:12:34:57", "bridgeName": "kvmt-nobr0", "deviceId": 0}]);
    let cmd = json!({
        "vm": vm_obj,
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 16 * MIB}],
    });
    let r = h.call("/vm/create", &cmd).await.unwrap();
    assert_eq!(r["success"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("step 'start domain' failed"), "the failed step is named: {r}");
    assert_eq!(domstate(&vm), None, "no orphan domain");
    assert!(!root.exists() && !data.exists(), "no volume left behind");
    assert!(base.path.exists());
}

#[tokio::test]
async fn bad_create_commands_make_nothing() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let (_, existing) = data_volume_path(&h);
    std::fs::create_dir_all(existing.parent().unwrap()).unwrap();
    std::fs::write(&existing, b"keep").unwrap();
    let good = json!({"vm": vm_object(&vm), "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path}});

    let mut cases = Vec::new();
    let mut c = good.clone();
    c["rootVolume"]["imagePath"] = json!(h.path("imagecache/missing.qcow2"));
    cases.push((c, "missing.qcow2"));
    let mut c = good.clone();
    c["dataVolumes"] = json!([{"volumeUuid": "d", "installPath": existing, "size": MIB}]);
    cases.push((c, "already exists"));
    let mut c = good.clone();
    c["dataVolumes"] = json!([{"volumeUuid": "d", "installPath": "/var/lib/elsewhere/d.qcow2", "size": MIB}]);
    cases.push((c, "outside the storage roots"));
    let mut c = good.clone();
    c["vm"]["cpuNum"] = json!(0);
    cases.push((c, "cpuNum"));
    let mut c = good.clone();
    c["vm"].as_object_mut().unwrap().remove("memory");
    cases.push((c, "memory"));
    let mut c = good.clone();
    c["strategy"] = json!("Sometime");
    cases.push((c, "strategy"));
    let mut c = good.clone();
    c["rootVolume"].as_object_mut().unwrap().remove("imagePath");
    cases.push((c, "imagePath or a size"));
    for (cmd, needle) in cases {
        let e = h.call_err("/vm/create", &cmd).await.unwrap();
        assert!(e.contains(needle), "expected {needle:?} in {e}");
        assert!(!root.exists(), "nothing made ({e})");
        assert_eq!(domstate(&vm), None);
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
}
