//! Conformance of the VM flows a stock ZStack management node (MN) runs, against the real agent
//! and libvirtd: for each flow, the agent calls the open-source MN makes, in its order, with
//! bodies shaped as its Gson sends them (nulls absent, Java primitives present, `kvmHostAddons`
//! and the thread context added, the `taskuuid`/`callbackurl` headers), and every reply decoded
//! into the Java type the MN declares for it ([`kvmagent_host_tests::mn_types`]).
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

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvmagent_host_tests::checks::{
    disk_source, disks, domstate, eventually, ip, qemu_img_info, qemu_io_write, virsh, TestNic,
};
use kvmagent_host_tests::guest::{console_log, pattern, staying_kernel_boot, wait_report, DiskDump};
use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::mn_types::{
    self, AttachDataVolumeResponse, DeleteBitsRsp, EmptyResponse, GetBackingChainRsp, LocalStorageVolumeRsp,
    RebootVmResponse, StartVmResponse, TakeSnapshotResponse,
};
use kvmagent_host_tests::sshd::Sshd;
use kvmagent_host_tests::{uuid, with_mn_context, Host};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// One MN: the API call the commands serve, the local primary storage, the host.
struct Mn<'a> {
    h: &'a Host,
    api: String,
    ps_uuid: String,
    host_uuid: String,
    account: String,
}

impl<'a> Mn<'a> {
    fn new(h: &'a Host) -> Mn<'a> {
        Mn { h, api: uuid(), ps_uuid: uuid(), host_uuid: uuid(), account: uuid() }
    }

    /// Sends `body` as `KVMHost.Http` does, requires success, decodes the reply as `T`.
    async fn call<T: DeserializeOwned>(&self, path: &str, body: Value) -> T {
        let r = self.h.call_ok(path, &with_mn_context(body, &self.api)).await.unwrap();
        mn_types::decode(&r).unwrap_or_else(|e| panic!("{path}: the MN cannot decode the reply: {e}"))
    }

    /// A local storage command: `LSKB:1164-1166` `httpCall` adds the storage's `uuid` and
    /// `storagePath` (its URL, the storage root).
    async fn ls_call<T: DeserializeOwned>(&self, path: &str, mut body: Value) -> T {
        body["uuid"] = json!(self.ps_uuid);
        body["storagePath"] = json!(self.h.root);
        self.call(path, body).await
    }

    /// `LSKB:1012-1024` install paths: `rootVolumes/acct-<account>/vol-<uuid>/<uuid>.qcow2`,
    /// `dataVolumes/...` likewise.
    fn volume_path(&self, kind: &str, vol: &str) -> PathBuf {
        self.h.path(&format!("{kind}Volumes/acct-{}/vol-{vol}/{vol}.qcow2", self.account))
    }

    /// `LSKB:1338-1359` `CreateEmptyVolumeCmd` for a new data volume with `bytes` at offset 0.
    async fn create_data_volume(&self, size: u64, bytes: &[u8]) -> (String, PathBuf) {
        let vol = uuid();
        let path = self.volume_path("data", &vol);
        let body = json!({"installUrl": path, "size": size, "accountUuid": self.account, "name": "data",
                          "volumeUuid": vol});
        let r: LocalStorageVolumeRsp = self.ls_call("/localstorage/volume/createempty", body).await;
        assert_eq!(r.size, Some(size as i64), "{r:?}");
        assert!(r.actual_size.is_some() && r.base.total_capacity.is_some() && r.base.available_capacity.is_some());
        qemu_io_write(&path, 0, bytes).unwrap();
        (vol, path)
    }

    /// `LSKB:1766-1780` `CreateVolumeFromCacheCmd`: a root volume from a cached image of the
    /// volume's size (`virtualSize` stays the Java default 0).
    async fn create_root_volume(&self, base: &BaseImage) -> (String, PathBuf) {
        let vol = uuid();
        let path = self.volume_path("root", &vol);
        let body = json!({"templatePathInCache": base.path, "installUrl": path, "volumeUuid": vol, "virtualSize": 0});
        let r: LocalStorageVolumeRsp = self.ls_call("/localstorage/volume/createvolumefromcache", body).await;
        assert_eq!(r.size, Some(base.size as i64), "{r:?}");
        assert!(r.actual_size.is_some() && r.base.total_capacity.is_some(), "{r:?}");
        assert_eq!(qemu_img_info(&path).unwrap()["backing-filename"].as_str(), base.path.to_str());
        (vol, path)
    }

    /// `LSKB:2571-2577` `GetBackingChainCmd`: the files under `top`, nearest first.
    async fn backing_chain(&self, vol: &str, top: &Path) -> Vec<String> {
        let body = json!({"volumeUuid": vol, "installPath": top});
        let r: GetBackingChainRsp = self.ls_call("/localstorage/volume/getbackingchain", body).await;
        assert!(r.base.total_capacity.is_some(), "{r:?}");
        r.backing_chain.unwrap_or_default()
    }

    /// `KH:2455-2463` `MergeSnapshotCmd`: `srcPath` the snapshot merged from, absent (a Java
    /// null) for a full rebase.
    async fn merge(&self, vm: &str, volume: Value, src: Option<&Path>, full_rebase: bool) {
        let mut body = json!({"vmUuid": vm, "destPath": volume["installPath"], "volume": volume,
                              "fullRebase": full_rebase});
        if let Some(src) = src {
            body["srcPath"] = json!(src);
        }
        let r: EmptyResponse = self.call("/vm/volume/mergesnapshot", body).await;
        assert!(r.success);
    }

    /// `KH:2652-2685` `TakeSnapshotCmd` of a running VM's volume: the new top at
    /// `LSKB:1060-1063` `<volume dir>/snapshots/<snapshot uuid>.qcow2`.
    async fn take_live_snapshot(&self, vm: &str, volume: &Value) -> PathBuf {
        let current = PathBuf::from(volume["installPath"].as_str().unwrap());
        let install = current.parent().unwrap().join(format!("snapshots/{}.qcow2", uuid()));
        let body = json!({
            "vmUuid": vm, "volumeUuid": volume["volumeUuid"], "volume": volume, "installPath": install,
            "fullSnapshot": false, "volumeInstallPath": current, "online": true, "timeout": 1800,
            "isBaremetal2InstanceOnlineSnapshot": false, "primaryStorageUuid": self.ps_uuid,
        });
        let r: TakeSnapshotResponse = self.call("/vm/volume/takesnapshot", body).await;
        assert_eq!(r.new_volume_install_path.as_deref(), install.to_str(), "{r:?}");
        assert_eq!(r.snapshot_install_path.as_deref(), current.to_str(), "{r:?}");
        assert!(r.size > 0, "validated notZero (KAC:4150)");
        assert!(dumpxml_has_source(vm, &install), "the running VM writes to the new top");
        install
    }

    /// `LSKB:1825-1832` `DeleteBitsCmd`.
    async fn delete(&self, path: &Path) {
        let r: DeleteBitsRsp =
            self.ls_call("/localstorage/delete", json!({"path": path, "hostUuid": self.host_uuid})).await;
        assert!(!r.in_use && r.base.total_capacity.is_some(), "{r:?}");
        assert!(!path.exists(), "{} is deleted", path.display());
    }

    /// `KH:3349-3352` `AttachDataVolumeCmd`: the volume, the VM, `addons`.
    async fn attach(&self, vm: &str, volume: &Value) {
        let body = json!({"vmInstanceUuid": vm, "volume": volume, "addons": {"attachedDataVolumes": []}});
        let r: AttachDataVolumeResponse = self.call("/vm/attachdatavolume", body).await;
        let infos = r.virtual_device_info_list.unwrap_or_default();
        let info = infos.iter().find(|i| i.resource_uuid.as_deref() == volume["volumeUuid"].as_str());
        let address = info.and_then(|i| i.device_address.as_ref()).expect("the volume's device address");
        assert_eq!(address.addr_type.as_deref(), Some("pci"), "{address:?}");
    }

    /// `KH:3237-3239` `DetachDataVolumeCmd`.
    async fn detach(&self, vm: &str, volume: &Value, target: &str) {
        let r: EmptyResponse = self.call("/vm/detachdatavolume", json!({"vmInstanceUuid": vm, "volume": volume})).await;
        assert!(r.success);
        eventually("the disk is unplugged", || disk_source(vm, target).is_none()).await.unwrap();
    }

    /// `KH:3482-3485` `RebootVmCmd` (`timeout` in seconds, `bootDev` a list); waits for the guest
    /// to report again.
    async fn reboot(&self, vm: &str) -> DiskDump {
        let _ = std::fs::remove_file(console_log(self.h, vm));
        let r: RebootVmResponse = self.call("/vm/reboot", json!({"uuid": vm, "timeout": 2, "bootDev": ["hd"]})).await;
        let info = r.virtualizer_info.expect("saved by KvmHypervisorInfoExtensions.rebootVmOnKvmSuccess");
        assert_eq!(info.uuid.as_deref(), Some(vm));
        assert_eq!(domstate(vm).as_deref(), Some("running"));
        wait_report(&console_log(self.h, vm), Duration::from_secs(120)).await.unwrap()
    }

    /// `KH:4030-4236` `StartVmCmd`; checks the reply as `KH:4236-4270` reads it and waits for the
    /// guest's report.
    async fn start(&self, cmd: &Value) -> DiskDump {
        let vm = cmd["vmInstanceUuid"].as_str().unwrap();
        let _ = std::fs::remove_file(console_log(self.h, vm));
        let r: StartVmResponse = self.call("/vm/start", cmd.clone()).await;
        let devices = r.virtual_device_info_list.unwrap_or_default();
        let volumes = std::iter::once(&cmd["rootVolume"]).chain(cmd["dataVolumes"].as_array().into_iter().flatten());
        for v in volumes {
            assert!(
                devices.iter().any(|d| d.resource_uuid.as_deref() == v["volumeUuid"].as_str()
                    && d.device_address.as_ref().is_some_and(|a| a.addr_type.is_some())),
                "{} has its device address: {devices:?}",
                v["volumeUuid"]
            );
        }
        let nics = r.nic_infos.unwrap_or_default();
        for nic in cmd["nics"].as_array().into_iter().flatten() {
            assert!(
                nics.iter().any(|n| n.mac_address.as_deref() == nic["mac"].as_str() && n.device_address.is_some()),
                "nicInfos names {}: {nics:?}",
                nic["mac"]
            );
        }
        let info = r.virtualizer_info.expect("saved by KvmHypervisorInfoExtensions.afterReceiveVmDeviceInfoResponse");
        assert!(info.version.is_some_and(|v| !v.is_empty()) && info.uuid.as_deref() == Some(vm));
        assert_eq!(domstate(vm).as_deref(), Some("running"));
        wait_report(&console_log(self.h, vm), Duration::from_secs(120)).await.unwrap()
    }
}

fn dumpxml_has_source(vm: &str, path: &Path) -> bool {
    virsh(&["dumpxml", vm]).unwrap().contains(&format!("<source file='{}'", path.display()))
}

/// `VolumeTO.valueOf` (`plugin/kvm/.../VolumeTO.java:34-54`) of a file volume on local storage:
/// every Java primitive and defaulted `String` present, the nulls absent.
fn volume_to(vol: &str, path: &Path, device_id: u32, kind: &str) -> Value {
    json!({
        "installPath": path, "deviceId": device_id, "deviceType": "file", "volumeUuid": vol,
        "useVirtio": true, "useVirtioSCSI": false, "shareable": false, "cacheMode": "none",
        "aioNative": false, "wwn": format!("0x000f{}", &vol[..12]), "bootOrder": u32::from(device_id == 0),
        "physicalBlockSize": 0, "type": kind, "format": "qcow2", "primaryStorageType": "LocalStorage",
        "ioThreadId": 0, "controllerIndex": 0, "resourceUuid": vol,
    })
}

/// A StartVmCmd the MN sent in ZStack's own tests.
fn fixture() -> Value {
    kvmagent_host_tests::images::startvm_fixture()
}

/// ZStack's StartVmCmd fixture for VM `vm` with the given volumes and NICs, small enough for
/// TCG, booting the test guest (which stays up).
fn start_cmd(h: &Host, vm: &str, root: &Value, data: &[&Value], nics: Value, disks: usize) -> Value {
    let mut cmd = fixture();
    cmd["vmInstanceUuid"] = json!(vm);
    cmd["priorityConfigStruct"]["vmUuid"] = json!(vm);
    cmd["addons"]["channel"]["socketPath"] = json!(format!("/var/lib/libvirt/qemu/{vm}"));
    cmd["rootVolume"] = root.clone();
    cmd["dataVolumes"] = json!(data);
    cmd["nics"] = nics;
    cmd["memory"] = json!(256 * MIB);
    cmd["maxMemory"] = json!(256 * MIB);
    cmd["kernelBoot"] = staying_kernel_boot(h, &[0], disks).unwrap();
    cmd
}

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
    let mut nics = fixture()["nics"].clone();
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
