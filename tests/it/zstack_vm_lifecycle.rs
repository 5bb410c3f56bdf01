//! The ZStack paths the management node sends around a running VM, on real libvirtd + QEMU:
//! one VM started with ZStack's StartVmCmd fixture goes through attach/detach of a data volume,
//! an ISO and a NIC, the console port, states, pause/resume, a reboot (the guest boots again and
//! reads the attached volume) and volume sync. Only what the test made is looked at.

use std::time::Duration;

use kvmagent_host_tests::checks::{disk_source as source_of, disks, domstate, eventually, qemu_io_write, virsh};
use kvmagent_host_tests::guest::{console_log, pattern, staying_kernel_boot, wait_report};
use kvmagent_host_tests::images::{data_volume_path, fixture_vm_on_a_new_root, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn a_running_vm_through_the_management_nodes_paths() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let (vm, mut cmd) = fixture_vm_on_a_new_root(&h, &base).await.unwrap();
    cmd["nics"][0]["type"] = json!("user");
    cmd["memory"] = json!(256 * MIB);
    cmd["cdRoms"] = json!([{"deviceId": 0, "isEmpty": true, "resourceUuid": uuid()}]);
    cmd["kernelBoot"] = staying_kernel_boot(&h, &[0], 1).unwrap();
    h.call_ok("/vm/start", &cmd).await.unwrap();
    let first = wait_report(&console_log(&h, &vm), Duration::from_secs(120)).await.unwrap();
    assert!(first.contains_key("vda") && !first.contains_key("vdb"), "{first:?}");

    // A data volume with a pattern the guest will read after the reboot.
    let (data_uuid, data) = data_volume_path(&h);
    h.call_ok(
        "/localstorage/volume/createempty",
        &json!({"installUrl": data, "size": 4 * MIB, "volumeUuid": data_uuid}),
    )
    .await
    .unwrap();
    let bytes = pattern("data");
    qemu_io_write(&data, 0, &bytes).unwrap();
    let volume = json!({"installPath": data, "volumeUuid": data_uuid, "deviceId": 1, "deviceType": "file",
                        "useVirtio": true, "useVirtioSCSI": false, "shareable": false, "cacheMode": "none"});
    let attach =
        json!({"vmInstanceUuid": vm, "volume": volume, "addons": {"attachedDataVolumes": []}, "kvmHostAddons": {}});
    let r = h.call_ok("/vm/attachdatavolume", &attach).await.unwrap();
    let info = &r["virtualDeviceInfoList"][0];
    assert_eq!(
        (info["resourceUuid"].as_str(), info["deviceAddress"]["type"].as_str()),
        (Some(data_uuid.as_str()), Some("pci")),
        "{r}"
    );
    assert_eq!(source_of(&vm, "vdb").as_deref(), data.to_str(), "{:?}", disks(&vm).unwrap());
    assert!(h.recorded_paths(&vm).unwrap().contains(&data.display().to_string()), "the record has the volume");

    // An ISO into the empty drive, then out again.
    let iso = h.path("iso/test.iso");
    std::fs::create_dir_all(iso.parent().unwrap()).unwrap();
    std::fs::write(&iso, vec![0x49u8; 2 * MIB as usize]).unwrap();
    let iso_uuid = uuid();
    h.call_ok("/vm/iso/attach", &json!({"vmUuid": vm, "iso": {"path": iso, "imageUuid": iso_uuid, "deviceId": 0}}))
        .await
        .unwrap();
    assert_eq!(source_of(&vm, "hdc").as_deref(), iso.to_str(), "{:?}", disks(&vm).unwrap());
    h.call_ok("/vm/iso/detach", &json!({"vmUuid": vm, "isoUuid": iso_uuid, "deviceId": 0})).await.unwrap();
    assert_eq!(source_of(&vm, "hdc").as_deref(), Some("-"), "ejected: {:?}", disks(&vm).unwrap());

    // A NIC in and out.
    let mac = "52:54:00:6b:76:01";
    let nic = json!({"vmUuid": vm, "nic": {"mac": mac, "uuid": uuid(), "deviceId": 1, "type": "user", "useVirtio": true},
                     "accountUuid": uuid(), "addons": {}});
    let r = h.call_ok("/vm/attachnic", &nic).await.unwrap();
    assert_eq!(r["virtualDeviceInfoList"][0]["deviceAddress"]["type"], "pci", "{r}");
    assert!(virsh(&["domiflist", &vm]).unwrap().contains(mac));
    h.call_ok("/vm/detachnic", &nic).await.unwrap();
    assert!(!virsh(&["domiflist", &vm]).unwrap().contains(mac), "the NIC is gone");

    let r = h.call_ok("/vm/getvncport", &json!({"vmUuid": vm})).await.unwrap();
    assert!(
        r["port"].as_i64().is_some_and(|p| p >= 5900) && r["vncPort"] == r["port"] && r["protocol"] == "vnc",
        "{r}"
    );
    let gone = uuid();
    let states = json!({"vmUuids": [vm, gone], "hostUuid": uuid()});
    let r = h.call_ok("/vm/checkstate", &states).await.unwrap();
    assert_eq!((r["states"][&vm].as_str(), r["states"][&gone].as_str()), (Some("Running"), Some("Shutdown")), "{r}");

    h.call_ok("/vm/pause", &json!({"uuid": vm, "timeout": 120})).await.unwrap();
    assert_eq!(domstate(&vm).as_deref(), Some("paused"));
    assert_eq!(h.call_ok("/vm/checkstate", &states).await.unwrap()["states"][&vm], "Paused");
    h.call_ok("/vm/resume", &json!({"uuid": vm, "timeout": 120})).await.unwrap();
    assert_eq!(domstate(&vm).as_deref(), Some("running"));

    // The reboot starts the guest again (its console log starts over): it reads the volume.
    let r = h.call_ok("/vm/reboot", &json!({"uuid": vm, "timeout": 2, "bootDev": ["hd"]})).await.unwrap();
    assert_eq!(r["virtualizerInfo"]["uuid"], vm.as_str(), "{r}");
    assert!(r["virtualizerInfo"]["version"].as_str().is_some_and(|v| !v.is_empty()), "{r}");
    assert_eq!(domstate(&vm).as_deref(), Some("running"));
    let second = wait_report(&console_log(&h, &vm), Duration::from_secs(120)).await.unwrap();
    assert_eq!(second["vdb"][&0], bytes, "after the reboot the guest reads the attached volume: {second:?}");

    h.call_ok("/vm/detachdatavolume", &json!({"vmInstanceUuid": vm, "volume": volume})).await.unwrap();
    eventually("the disk is unplugged", || source_of(&vm, "vdb").is_none()).await.unwrap();
    assert!(!h.recorded_paths(&vm).unwrap().contains(&data.display().to_string()), "the record lost the volume");

    // The detached volume is unused at two syncs in a row; the running root never is.
    let root = std::path::PathBuf::from(cmd["rootVolume"]["installPath"].as_str().unwrap());
    let dirs = [data.parent().unwrap(), root.parent().unwrap()].map(|d| format!("file://{}", d.display()));
    let sync = json!({"storagePaths": dirs});
    let r = h.call_ok("/vm/volumesync", &sync).await.unwrap();
    assert!(r["inactiveVolumePaths"].as_object().is_none_or(|m| m.is_empty()), "{r}");
    let r = h.call_ok("/vm/volumesync", &sync).await.unwrap();
    assert_eq!(r["inactiveVolumePaths"][&dirs[0]], json!([data]), "{r}");
    assert!(r["inactiveVolumePaths"].get(&dirs[1]).is_none(), "{r}");

    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
}
