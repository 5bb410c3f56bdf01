//! The management node (MN) as the conformance tests play it: its agent calls in its order, with
//! bodies shaped as its Gson sends them (nulls absent, Java primitives present, `kvmHostAddons`
//! and the thread context added, the `taskuuid`/`callbackurl` headers), and every reply decoded
//! into the Java type the MN declares for it ([`crate::mn_types`]).
//!
//! Sources (zstackio/zstack at 5a29293b): `KVMHost.java` (`KH`) and `LocalStorageKvmBackend.java`
//! (`LSKB`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::checks::{disk_source, domstate, eventually, qemu_img_info, qemu_io_write, virsh};
use crate::guest::{console_log, staying_kernel_boot, wait_report, DiskDump};
use crate::images::{startvm_fixture, BaseImage};
use crate::mn_types::{
    self, AttachDataVolumeResponse, DeleteBitsRsp, EmptyResponse, GetBackingChainRsp, LocalStorageVolumeRsp,
    RebootVmResponse, StartVmResponse, TakeSnapshotResponse,
};
use crate::{uuid, with_mn_context, Host};

const MIB: u64 = 1 << 20;

/// One MN: the API call the commands serve, the local primary storage, the host.
pub struct Mn<'a> {
    pub h: &'a Host,
    pub api: String,
    pub ps_uuid: String,
    pub host_uuid: String,
    pub account: String,
}

impl<'a> Mn<'a> {
    pub fn new(h: &'a Host) -> Mn<'a> {
        Mn { h, api: uuid(), ps_uuid: uuid(), host_uuid: uuid(), account: uuid() }
    }

    /// Sends `body` as `KVMHost.Http` does, requires success, decodes the reply as `T`.
    pub async fn call<T: DeserializeOwned>(&self, path: &str, body: Value) -> T {
        let r = self.h.call_ok(path, &with_mn_context(body, &self.api)).await.unwrap();
        mn_types::decode(&r).unwrap_or_else(|e| panic!("{path}: the MN cannot decode the reply: {e}"))
    }

    /// A local storage command: `LSKB:1164-1166` `httpCall` adds the storage's `uuid` and
    /// `storagePath` (its URL, the storage root).
    pub async fn ls_call<T: DeserializeOwned>(&self, path: &str, mut body: Value) -> T {
        body["uuid"] = json!(self.ps_uuid);
        body["storagePath"] = json!(self.h.root);
        self.call(path, body).await
    }

    /// `LSKB:1012-1024` install paths: `rootVolumes/acct-<account>/vol-<uuid>/<uuid>.qcow2`,
    /// `dataVolumes/...` likewise.
    pub fn volume_path(&self, kind: &str, vol: &str) -> PathBuf {
        self.h.path(&format!("{kind}Volumes/acct-{}/vol-{vol}/{vol}.qcow2", self.account))
    }

    /// `LSKB:1338-1359` `CreateEmptyVolumeCmd` for a new data volume with `bytes` at offset 0.
    pub async fn create_data_volume(&self, size: u64, bytes: &[u8]) -> (String, PathBuf) {
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
    pub async fn create_root_volume(&self, base: &BaseImage) -> (String, PathBuf) {
        self.create_root_volume_from(&base.path, base.size).await
    }

    /// A root volume on `template` (a cached image, or a snapshot file when the MN clones), whose
    /// virtual size is `size`.
    pub async fn create_root_volume_from(&self, template: &Path, size: u64) -> (String, PathBuf) {
        let vol = uuid();
        let path = self.volume_path("root", &vol);
        let body = json!({"templatePathInCache": template, "installUrl": path, "volumeUuid": vol, "virtualSize": 0});
        let r: LocalStorageVolumeRsp = self.ls_call("/localstorage/volume/createvolumefromcache", body).await;
        assert_eq!(r.size, Some(size as i64), "{r:?}");
        assert!(r.actual_size.is_some() && r.base.total_capacity.is_some(), "{r:?}");
        assert_eq!(qemu_img_info(&path).unwrap()["backing-filename"].as_str(), template.to_str());
        (vol, path)
    }

    /// `LSKB:2571-2577` `GetBackingChainCmd`: the files under `top`, nearest first.
    pub async fn backing_chain(&self, vol: &str, top: &Path) -> Vec<String> {
        let body = json!({"volumeUuid": vol, "installPath": top});
        let r: GetBackingChainRsp = self.ls_call("/localstorage/volume/getbackingchain", body).await;
        assert!(r.base.total_capacity.is_some(), "{r:?}");
        r.backing_chain.unwrap_or_default()
    }

    /// `KH:2455-2463` `MergeSnapshotCmd`: `srcPath` the snapshot merged from, absent (a Java
    /// null) for a full rebase.
    pub async fn merge(&self, vm: &str, volume: Value, src: Option<&Path>, full_rebase: bool) {
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
    pub async fn take_live_snapshot(&self, vm: &str, volume: &Value) -> PathBuf {
        let install = new_top(volume);
        self.take_live_snapshot_into(vm, volume, &install).await;
        install
    }

    /// The first step of the MN's clone of a running VM: the new top pre-created as an empty
    /// overlay on the volume (`LocalStorageKvmFactory.java:181-211`, `createempty` with
    /// `backingFile`), then the live snapshot into it (libvirt's reuse of an existing file).
    /// Returns the new top; the volume's former file is the snapshot the clone is built on.
    pub async fn clone_snapshot(&self, vm: &str, volume: &Value, size: u64) -> PathBuf {
        let install = new_top(volume);
        let body = json!({"installUrl": install, "size": size, "accountUuid": self.account, "name": "clone-top",
                          "volumeUuid": volume["volumeUuid"], "backingFile": volume["installPath"]});
        let _: LocalStorageVolumeRsp = self.ls_call("/localstorage/volume/createempty", body).await;
        assert_eq!(qemu_img_info(&install).unwrap()["backing-filename"], volume["installPath"]);
        self.take_live_snapshot_into(vm, volume, &install).await;
        install
    }

    async fn take_live_snapshot_into(&self, vm: &str, volume: &Value, install: &Path) {
        let current = PathBuf::from(volume["installPath"].as_str().unwrap());
        let body = json!({
            "vmUuid": vm, "volumeUuid": volume["volumeUuid"], "volume": volume, "installPath": install,
            "fullSnapshot": false, "volumeInstallPath": current, "online": true, "timeout": 1800,
            "isBaremetal2InstanceOnlineSnapshot": false, "primaryStorageUuid": self.ps_uuid,
        });
        let r: TakeSnapshotResponse = self.call("/vm/volume/takesnapshot", body).await;
        assert_eq!(r.new_volume_install_path.as_deref(), install.to_str(), "{r:?}");
        assert_eq!(r.snapshot_install_path.as_deref(), current.to_str(), "{r:?}");
        assert!(r.size > 0, "validated notZero (KAC:4150)");
        assert!(dumpxml_has_source(vm, install), "the running VM writes to the new top");
    }

    /// `LSKB:1825-1832` `DeleteBitsCmd`.
    pub async fn delete(&self, path: &Path) {
        let r: DeleteBitsRsp =
            self.ls_call("/localstorage/delete", json!({"path": path, "hostUuid": self.host_uuid})).await;
        assert!(!r.in_use && r.base.total_capacity.is_some(), "{r:?}");
        assert!(!path.exists(), "{} is deleted", path.display());
    }

    /// `KH:3349-3352` `AttachDataVolumeCmd`: the volume, the VM, `addons`.
    pub async fn attach(&self, vm: &str, volume: &Value) {
        let body = json!({"vmInstanceUuid": vm, "volume": volume, "addons": {"attachedDataVolumes": []}});
        let r: AttachDataVolumeResponse = self.call("/vm/attachdatavolume", body).await;
        let infos = r.virtual_device_info_list.unwrap_or_default();
        let info = infos.iter().find(|i| i.resource_uuid.as_deref() == volume["volumeUuid"].as_str());
        let address = info.and_then(|i| i.device_address.as_ref()).expect("the volume's device address");
        assert_eq!(address.addr_type.as_deref(), Some("pci"), "{address:?}");
    }

    /// `KH:3237-3239` `DetachDataVolumeCmd`.
    pub async fn detach(&self, vm: &str, volume: &Value, target: &str) {
        let r: EmptyResponse = self.call("/vm/detachdatavolume", json!({"vmInstanceUuid": vm, "volume": volume})).await;
        assert!(r.success);
        eventually("the disk is unplugged", || disk_source(vm, target).is_none()).await.unwrap();
    }

    /// `KH:3482-3485` `RebootVmCmd` (`timeout` in seconds, `bootDev` a list); waits for the guest
    /// to report again.
    pub async fn reboot(&self, vm: &str) -> DiskDump {
        let _ = std::fs::remove_file(console_log(self.h, vm));
        let r: RebootVmResponse = self.call("/vm/reboot", json!({"uuid": vm, "timeout": 2, "bootDev": ["hd"]})).await;
        let info = r.virtualizer_info.expect("saved by KvmHypervisorInfoExtensions.rebootVmOnKvmSuccess");
        assert_eq!(info.uuid.as_deref(), Some(vm));
        assert_eq!(domstate(vm).as_deref(), Some("running"));
        wait_report(&console_log(self.h, vm), Duration::from_secs(120)).await.unwrap()
    }

    /// `KH:4030-4236` `StartVmCmd`; checks the reply as `KH:4236-4270` reads it and waits for the
    /// guest's report.
    pub async fn start(&self, cmd: &Value) -> DiskDump {
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

/// `LSKB:1060-1063` a snapshot's new top: `<volume dir>/snapshots/<snapshot uuid>.qcow2`.
fn new_top(volume: &Value) -> PathBuf {
    let current = Path::new(volume["installPath"].as_str().unwrap());
    current.parent().unwrap().join(format!("snapshots/{}.qcow2", uuid()))
}

pub fn dumpxml_has_source(vm: &str, path: &Path) -> bool {
    virsh(&["dumpxml", vm]).unwrap().contains(&format!("<source file='{}'", path.display()))
}

/// `VolumeTO.valueOf` (`plugin/kvm/.../VolumeTO.java:34-54`) of a file volume on local storage:
/// every Java primitive and defaulted `String` present, the nulls absent.
pub fn volume_to(vol: &str, path: &Path, device_id: u32, kind: &str) -> Value {
    json!({
        "installPath": path, "deviceId": device_id, "deviceType": "file", "volumeUuid": vol,
        "useVirtio": true, "useVirtioSCSI": false, "shareable": false, "cacheMode": "none",
        "aioNative": false, "wwn": format!("0x000f{}", &vol[..12]), "bootOrder": u32::from(device_id == 0),
        "physicalBlockSize": 0, "type": kind, "format": "qcow2", "primaryStorageType": "LocalStorage",
        "ioThreadId": 0, "controllerIndex": 0, "resourceUuid": vol,
    })
}

/// ZStack's StartVmCmd fixture for VM `vm` with the given volumes and NICs, small enough for
/// TCG, booting the test guest (which stays up).
pub fn start_cmd(h: &Host, vm: &str, root: &Value, data: &[&Value], nics: Value, disks: usize) -> Value {
    let mut cmd = startvm_fixture();
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
