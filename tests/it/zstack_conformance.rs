//! Conformance of the VM flows a stock ZStack management node (MN) runs, against the real agent
//! and libvirtd: for each flow, the agent calls the open-source MN makes, in its order, with
//! bodies shaped as its Gson sends them (nulls absent, Java primitives present, `kvmHostAddons`
//! and the thread context added, the `taskuuid`/`callbackurl` headers), and every reply decoded
//! into the Java type the MN declares for it (the MN's side: [`kvmagent_host_tests::mn`]).
//!
//! Sources (zstackio/zstack at 5a29293b): `KVMHost.java` (`KH`) and `LocalStorageKvmBackend.java`
//! (`LSKB`). The only key no MN sends is `kernelBoot`: the test guest boots directly from a
//! kernel (tests/guest), not from the root volume.
//!
//! Two VMs in all (TCG is slow): one on local storage through create, stop/start, reboot, data
//! volume attach/detach, live snapshots, merge, flatten, backing chain and delete; one started
//! from the MN's own StartVmCmd fixture on a bridge the agent made from a veth pair this test
//! owns, checked inside the guest and with `virsh` through reboot, pause/resume and data volume
//! and ISO attach/detach.

use std::path::PathBuf;

use kvmagent_host_tests::checks::{disk_source, disks, domstate, ip, qemu_img_info, qemu_io_write, virsh, TestNic};
use kvmagent_host_tests::guest::pattern;
use kvmagent_host_tests::images::{startvm_fixture, BaseImage};
use kvmagent_host_tests::mn::{start_cmd, volume_to, Mn};
use kvmagent_host_tests::mn_types::{self, EmptyResponse};
use kvmagent_host_tests::sshd::Sshd;
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn create_stop_start_reboot_attach_snapshot_merge_flatten_and_delete_on_local_storage() {
    let h = Host::start().await.unwrap();
    let mn = Mn::new(&h);
    let base = BaseImage::create(&h, 64 * MIB).unwrap();

    // Create (LocalStorageKvmBackend's flows, then KVMHost.startVm): the root from the cached
    // image, an empty data volume, the VM with both.
    let (root_uuid, root) = mn.create_root_volume(&base).await;
    let data_bytes = pattern("conf-data");
    let (data_uuid, data) = mn.create_data_volume(4 * MIB, &data_bytes).await;
    let vm = uuid();
    h.track_vm(&vm);
    let root_to = volume_to(&root_uuid, &root, 0, "Root");
    let data_to = volume_to(&data_uuid, &data, 1, "Data");
    let cmd = start_cmd(&h, &vm, &root_to, &[&data_to], json!([]), 2);
    let seen = mn.start(&cmd).await;
    assert_eq!((seen["vda"][&0].as_slice(), seen["vdb"][&0].as_slice()), (&base.pattern[..], &data_bytes[..]));

    // Stop (KH:3528-3532: `type` as the API asked, "grace" or "cold", `timeout` 120, the VM's
    // NICs): the domain is gone.
    let r: EmptyResponse = mn.call("/vm/stop", json!({"uuid": vm, "type": "cold", "timeout": 120, "vmNics": []})).await;
    assert!(r.success && domstate(&vm).is_none(), "stopped and undefined, as ZStack's agent leaves it");
    // Start again: the same command, the same disks.
    let seen = mn.start(&cmd).await;
    assert_eq!(seen["vdb"][&0], data_bytes, "{seen:?}");
    let seen = mn.reboot(&vm).await;
    assert_eq!(seen["vda"][&0], base.pattern, "{seen:?}");

    // Attach and detach a second data volume: deviceId 2 is vdd (ZStack's x86 letters leave `c`
    // to the CD-ROM).
    let (extra_uuid, extra) = mn.create_data_volume(4 * MIB, &pattern("conf-extra")).await;
    let extra_to = volume_to(&extra_uuid, &extra, 2, "Data");
    mn.attach(&vm, &extra_to).await;
    assert_eq!(disk_source(&vm, "vdd").as_deref(), extra.to_str(), "{:?}", disks(&vm));
    mn.detach(&vm, &extra_to, "vdd").await;

    // Two live snapshots of the root: image ← root ← s1 ← s2 (the VM's top).
    let s1 = mn.take_live_snapshot(&vm, &root_to).await;
    let s1_to = volume_to(&root_uuid, &s1, 0, "Root");
    let s2 = mn.take_live_snapshot(&vm, &s1_to).await;
    let s2_to = volume_to(&root_uuid, &s2, 0, "Root");
    let chain = mn.backing_chain(&root_uuid, &s2).await;
    let expected = [&s1, &root, &base.path].map(|p| p.display().to_string());
    assert_eq!(chain, expected, "the files under the top, nearest first");

    // Merge from the first snapshot: s1 goes into the top, the top rests on root.
    mn.merge(&vm, s2_to.clone(), Some(&root), false).await;
    assert_eq!(mn.backing_chain(&root_uuid, &s2).await, expected[1..], "s1 merged into the top");
    mn.delete(&s1).await;
    // Flatten (a full rebase, no source): the top stands alone, the guest still reads its data.
    mn.merge(&vm, s2_to, None, true).await;
    assert!(mn.backing_chain(&root_uuid, &s2).await.is_empty());
    assert!(qemu_img_info(&s2).unwrap()["backing-filename"].is_null());
    mn.delete(&root).await;
    mn.delete(&extra).await;
    let seen = mn.reboot(&vm).await;
    assert_eq!((seen["vda"][&0].as_slice(), seen["vdb"][&0].as_slice()), (&base.pattern[..], &data_bytes[..]));
}

#[tokio::test]
async fn the_startvm_fixture_on_a_made_bridge_boots_and_reboots_pauses_and_takes_volumes_and_an_iso() {
    let nic = TestNic::create();
    let h = Host::start().await.unwrap();
    let mn = Mn::new(&h);

    // KH's L2 extension (KVMRealizeL2NoVlanNetworkBackend): CreateBridgeCmd before the VM starts.
    let bridge = json!({"physicalInterfaceName": nic.name, "bridgeName": nic.bridge, "l2NetworkUuid": uuid(),
                        "disableIptables": false, "mtu": 1500, "isolated": false});
    let r: EmptyResponse = mn.call("/network/l2novlan/createbridge", bridge.clone()).await;
    assert!(r.success);
    assert_eq!(nic.ports(), std::slice::from_ref(&nic.name), "the NIC is the bridge's port");

    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let (root_uuid, root) = mn.create_root_volume(&base).await;
    let vm = uuid();
    h.track_vm(&vm);
    let mut nics = startvm_fixture()["nics"].clone();
    nics[0]["bridgeName"] = json!(nic.bridge);
    nics[0]["physicalInterface"] = json!(nic.name);
    nics[0]["uuid"] = json!(uuid());
    let mut cmd = start_cmd(&h, &vm, &volume_to(&root_uuid, &root, 0, "Root"), &[], nics, 1);
    cmd["cdRoms"] = json!([{"deviceId": 0, "isEmpty": true, "resourceUuid": uuid(), "bootOrder": 0}]);
    let seen = mn.start(&cmd).await;
    assert_eq!(seen["vda"][&0], base.pattern, "the test guest booted from the fixture: {seen:?}");
    assert!(!seen.contains_key("vdb"));
    let iflist = virsh(&["domiflist", &vm]).unwrap();
    assert!(iflist.contains(&nic.bridge) && iflist.contains("fa:62:4a:61:6c:00"), "{iflist}");
    assert_eq!(nic.ports().len(), 2, "the VM's tap joined the bridge: {:?}", nic.ports());

    // A data volume in: after a reboot the guest reads it.
    let data_bytes = pattern("conf-bridge-data");
    let (data_uuid, data) = mn.create_data_volume(4 * MIB, &data_bytes).await;
    let data_to = volume_to(&data_uuid, &data, 1, "Data");
    mn.attach(&vm, &data_to).await;
    assert_eq!(disk_source(&vm, "vdb").as_deref(), data.to_str());
    let seen = mn.reboot(&vm).await;
    assert_eq!(seen["vdb"][&0], data_bytes, "the guest reads the attached volume: {seen:?}");

    // Pause and resume (KH:4366-4368, KH:4416-4418: {uuid, timeout 120}).
    let r: EmptyResponse = mn.call("/vm/pause", json!({"uuid": vm, "timeout": 120})).await;
    assert!(r.success && domstate(&vm).as_deref() == Some("paused"));
    let r: EmptyResponse = mn.call("/vm/resume", json!({"uuid": vm, "timeout": 120})).await;
    assert!(r.success && domstate(&vm).as_deref() == Some("running"));

    // An ISO into the empty drive and out (KH:2183-2185 AttachIsoCmd {iso: IsoTO, vmUuid},
    // KH:2128-2133 DetachIsoCmd).
    let iso = h.path("iso/conformance.iso");
    std::fs::create_dir_all(iso.parent().unwrap()).unwrap();
    std::fs::write(&iso, vec![0x49u8; 2 * MIB as usize]).unwrap();
    let iso_uuid = uuid();
    let iso_to = json!({"path": iso, "imageUuid": iso_uuid, "deviceId": 0, "resourceUuid": iso_uuid});
    let r: EmptyResponse = mn.call("/vm/iso/attach", json!({"vmUuid": vm, "iso": iso_to})).await;
    assert!(r.success);
    assert_eq!(disk_source(&vm, "hdc").as_deref(), iso.to_str(), "{:?}", disks(&vm));
    let r: EmptyResponse = mn.call("/vm/iso/detach", json!({"vmUuid": vm, "isoUuid": iso_uuid, "deviceId": 0})).await;
    assert!(r.success);
    assert_eq!(disk_source(&vm, "hdc").as_deref(), Some("-"), "ejected: {:?}", disks(&vm));

    // The data volume out: after a reboot the guest no longer sees it.
    mn.detach(&vm, &data_to, "vdb").await;
    let seen = mn.reboot(&vm).await;
    assert!(seen.contains_key("vda") && !seen.contains_key("vdb"), "{seen:?}");

    // Tear down as the MN does: the VM (KH:3397-3399, with its NICs as `VmNicInventory`), then the
    // bridge (it carries no host address: it goes).
    let vm_nic = json!({"uuid": cmd["nics"][0]["uuid"], "vmInstanceUuid": vm, "l3NetworkUuid": uuid(),
                        "mac": cmd["nics"][0]["mac"], "deviceId": 0, "internalName": "vnic1.0", "type": "VNIC",
                        "state": "enable", "usedIps": []});
    let r: EmptyResponse = mn.call("/vm/destroy", json!({"uuid": vm, "vmNics": [vm_nic]})).await;
    assert!(r.success && domstate(&vm).is_none());
    let r: EmptyResponse = mn.call("/network/l2novlan/deletebridge", bridge).await;
    assert!(r.success);
    assert!(ip(&["link", "show", &nic.bridge]).is_err(), "the bridge is deleted");
}

/// Create VM from an image that is only on the SFTP backup storage, twice at once, as the MN does
/// it for two VMs of one uncached image (`LocalStorageKvmSftpBackupStorageMediatorImpl`: the image
/// into the cache with `/localstorage/sftp/download`, then `LSKB`'s root from the cache, then
/// `/vm/start`): the image travels once, arrives bit-identical, and both guests boot from it.
#[tokio::test]
async fn two_vms_from_an_image_only_on_the_sftp_backup_storage_then_a_reinit() {
    let h = Host::start().await.unwrap();
    let mn = Mn::new(&h);
    let sshd = Sshd::start();
    // The test image, moved out of the cache onto the backup storage.
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let source = sshd.put("image.qcow2", &std::fs::read(&base.path).unwrap());
    std::fs::remove_file(&base.path).unwrap();

    let create = || async {
        let r: EmptyResponse = mn.ls_call("/localstorage/sftp/download", sshd.cmd(&source, &base.path)).await;
        assert!(r.success);
        mn.create_root_volume(&base).await
    };
    let ((vol_a, root_a), (vol_b, root_b)) = tokio::join!(create(), create());
    assert_eq!(sshd.logins(), 1, "the image was downloaded once for both");
    assert_eq!(
        kvmagent_host_tests::checks::file_sha256(&base.path).unwrap(),
        kvmagent_host_tests::checks::file_sha256(&source).unwrap(),
        "bit-identical to the backup storage's"
    );

    let (vm_a, vm_b) = (uuid(), uuid());
    h.track_vm(&vm_a);
    h.track_vm(&vm_b);
    let cmd_a = start_cmd(&h, &vm_a, &volume_to(&vol_a, &root_a, 0, "Root"), &[], json!([]), 1);
    let cmd_b = start_cmd(&h, &vm_b, &volume_to(&vol_b, &root_b, 0, "Root"), &[], json!([]), 1);
    let (seen_a, seen_b) = tokio::join!(mn.start(&cmd_a), mn.start(&cmd_b));
    for seen in [seen_a, seen_b] {
        assert_eq!(seen["vda"][&0], base.pattern, "the guest booted on the downloaded image: {seen:?}");
    }

    // Reinit the root of the first, stopped (`LSKB:2183-2199`: ReinitImageCmd {imagePath: the
    // cached image, volumePath: the root}; the MN then starts the VM on the new root and deletes
    // the old one). The guest sees the image again, not what was written over it.
    let r: EmptyResponse = mn.call("/vm/stop", json!({"uuid": vm_a, "type": "cold", "timeout": 120})).await;
    assert!(r.success);
    qemu_io_write(&root_a, 0, &pattern("written-over")).unwrap();
    let body = json!({"imagePath": base.path, "volumePath": root_a});
    let r: mn_types::ReinitImageRsp = mn.ls_call("/localstorage/reinit/image", body).await;
    let new_root = PathBuf::from(&r.new_volume_install_path);
    assert!(new_root != root_a && new_root.exists(), "{r:?}");
    assert!(root_a.exists(), "the old root survives until the new one is in place and used");
    let cmd_a = start_cmd(&h, &vm_a, &volume_to(&vol_a, &new_root, 0, "Root"), &[], json!([]), 1);
    let seen = mn.start(&cmd_a).await;
    assert_eq!(seen["vda"][&0], base.pattern, "reinit gives the image back: {seen:?}");
    mn.delete(&root_a).await;
    assert!(!root_a.exists() && new_root.exists());
}
