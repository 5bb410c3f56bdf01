//! Unit tests of ZStack's paths on the fake hypervisor: bad values are refused, named, before
//! anything changes.

use serde_json::{json, Value};

use crate::error::ErrorKind;
use crate::libvirt::domains::VmState;
use crate::tasks::TaskCtx;
use crate::testing::mn_types::{
    self, ConnectResponse, HostCapacityResponse, HostFactResponse, PingResponse, ProgressReportCmd, StartVmResponse,
    UpdateHostConfigurationResponse, VmSyncResponse,
};
use crate::testing::TestHost;
use crate::wire::decode;

fn ctx() -> TaskCtx {
    TaskCtx::detached("/test")
}

#[tokio::test]
async fn a_stop_of_unknown_type_or_unbounded_timeout_is_refused_and_the_vm_runs_on() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    for (body, field) in [
        (json!({"uuid": vm, "type": "grace-ful"}), "type"),
        (json!({"uuid": vm, "type": "grace", "timeout": 9223372036854775808u64}), "timeout"),
        (json!({"uuid": vm, "timeout": 3601}), "timeout"),
    ] {
        let e = super::vm::stop(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{body}: {e}");
        assert!(e.details.contains(field), "{body}: {e}");
        assert_eq!(h.hv.domain(&vm).unwrap().state, VmState::Running, "{body} changed nothing");
    }
    super::vm::stop(&h.app, &ctx(), decode(&json!({"uuid": vm, "type": "grace", "timeout": 5})).unwrap())
        .await
        .unwrap();
    assert!(h.hv.domain(&vm).is_none(), "a graceful stop ends with the domain undefined");
}

#[tokio::test]
async fn an_empty_ceph_key_is_refused_before_any_secret_is_defined() {
    let h = TestHost::start();
    let body = json!({"userKey": "", "uuid": "148347dd-908e-ce57-bc2a-f9650d652c09"});
    let e = super::vm::create_ceph_secret(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    assert!(h.hv.secret_uuids().is_empty(), "no secret defined");
}

#[tokio::test]
async fn reinit_needs_the_volume_itself() {
    let h = TestHost::start();
    let image = h.image("i", 1 << 20).await;
    std::fs::create_dir_all(h.root.join("rootVolumes/a/vol")).unwrap();
    let before = h.files();
    for volume in [h.path("rootVolumes/a/vol"), h.path("rootVolumes/a/vol/missing.qcow2"), h.path("rootVolumes")] {
        let body = json!({"imagePath": image, "volumePath": volume});
        let r = super::localstorage::reinit_image(&h.app, &ctx(), decode(&body).unwrap()).await;
        let e = r.err().unwrap_or_else(|| panic!("{volume} was taken for a volume"));
        assert!(e.to_string().contains("volumePath"), "{e}");
        assert_eq!(h.files(), before, "{volume}: nothing made");
    }
}

#[tokio::test]
async fn a_snapshot_group_names_the_new_top_of_each_volume() {
    let h = TestHost::start();
    let vm = h.running_vm().await;
    let old = h.recorded(&vm).await;
    let body: Value = json!({"vmUuid": vm});
    let group =
        crate::ops::snapshot_group::take(&h.app, &ctx(), crate::wire::decode_native(&body).unwrap()).await.unwrap();
    let now = h.recorded(&vm).await;
    for (s, (before, after)) in group.snapshots.iter().zip(old.iter().zip(&now)) {
        assert_eq!((&s.snapshot_path, s.new_install_path.as_ref()), (before, Some(after)));
        assert_ne!(before, after);
    }
}

#[tokio::test]
async fn a_ceph_create_clone_or_snapshot_that_fails_after_making_it_removes_it() {
    let h = TestHost::start();
    let stop = crate::stop::Stop::new();
    let base = crate::ceph::path::CephPath::parse("rbd/base").unwrap();
    h.app.rbd.create(&base, 4 << 20, &stop).await.unwrap();
    h.app.rbd.snap_create(&base.with_snap("s"), &stop).await.unwrap();
    h.rbd.fail_usage();
    let create = json!({"installPath": "ceph://rbd/new", "size": 1048576});
    super::ceph::create_empty(&h.app, &ctx(), decode(&create).unwrap()).await.unwrap_err();
    let clone = json!({"srcPath": "ceph://rbd/base@s", "dstPath": "ceph://rbd/clone"});
    super::ceph::clone(&h.app, &ctx(), decode(&clone).unwrap()).await.unwrap_err();
    assert_eq!(h.rbd.images(), ["rbd/base"], "nothing the failed commands made is left");
    for snapshot in ["ceph://rbd/base@new", "ceph://rbd/base@s"] {
        let take = json!({"snapshotPath": snapshot, "skipOnExisting": true});
        super::ceph::snapshot_create(&h.app, &ctx(), decode(&take).unwrap()).await.unwrap_err();
    }
    let snaps = h.app.rbd.snapshots(&base, &stop).await.unwrap();
    let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s"], "the snapshot a failed command took is removed, the one there before kept");
}

/// A running VM started by `/vm/start` as the management node starts one: a root volume, an
/// empty CD-ROM drive and a user-mode NIC. Returns its uuid.
async fn started_vm(h: &TestHost) -> String {
    let vm = crate::testing::uuid();
    let root = h.path(&format!("rootVolumes/{vm}/root.qcow2"));
    std::fs::create_dir_all(std::path::Path::new(&root).parent().unwrap()).unwrap();
    std::fs::copy(h.image(&vm, 1 << 20).await, &root).unwrap();
    let cmd = json!({
        "vmInstanceUuid": vm, "vmName": "t", "memory": 67108864, "cpuNum": 1,
        "rootVolume": {"installPath": root, "volumeUuid": crate::testing::uuid(), "deviceId": 0},
        "cdRoms": [{"deviceId": 0, "isEmpty": true, "resourceUuid": "cd0"}],
        "nics": [{"mac": "52:54:00:00:00:01", "type": "user", "uuid": "nic0"}],
    });
    super::vm::start(&h.app, &ctx(), decode(&cmd).unwrap()).await.unwrap();
    vm
}

#[tokio::test]
async fn a_start_answers_what_the_management_node_saves_of_the_vms_qemu() {
    let h = TestHost::start();
    let vm = started_vm(&h).await;
    let body = json!({"vmInstanceUuid": vm, "vmName": "t", "memory": 67108864, "cpuNum": 1,
                      "rootVolume": {"installPath": h.recorded(&vm).await[0], "volumeUuid": "r", "deviceId": 0}});
    // Started again while it runs: the same answer as a fresh start.
    let rsp = super::vm::start(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    let r: StartVmResponse = mn_types::decode(&answer(rsp)).unwrap();
    let v = r.virtualizer_info.expect("KvmHypervisorInfoExtensions.afterReceiveVmDeviceInfoResponse saves it");
    assert_eq!(
        (v.uuid.as_deref(), v.virtualizer.as_deref(), v.version.as_deref()),
        (Some(vm.as_str()), Some("qemu-kvm"), Some("7.2.0"))
    );
    assert!(r.virtual_device_info_list.is_some_and(|l| !l.is_empty()));
}

fn data_volume(h: &TestHost, name: &str) -> String {
    let p = h.path(&format!("dataVolumes/{name}/{name}.qcow2"));
    std::fs::create_dir_all(std::path::Path::new(&p).parent().unwrap()).unwrap();
    let out = std::process::Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", &p, "1M"]).output().unwrap();
    assert!(out.status.success());
    p
}

/// What the VM's record and its domain say, to compare around a refused command.
async fn vm_state(h: &TestHost, vm: &str) -> (crate::model::VmSpec, String) {
    (h.app.vms.lock(vm).await.unwrap().load().unwrap(), h.hv.domain(vm).unwrap().xml)
}

#[tokio::test]
async fn a_data_volume_is_attached_and_detached_live_and_in_the_record() {
    use super::vm_devices::{attach_volume, detach_volume, reboot};
    let h = TestHost::start();
    let vm = started_vm(&h).await;
    let path = data_volume(&h, "d1");
    let body = json!({"vmInstanceUuid": vm, "volume": {"installPath": path, "volumeUuid": "d1", "deviceId": 1,
                      "deviceType": "file", "useVirtio": true}, "addons": {"attachedDataVolumes": []}});
    let rsp = attach_volume(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    assert_eq!(rsp.virtual_device_info_list.len(), 1);
    assert_eq!(rsp.virtual_device_info_list[0].resource_uuid, "d1");
    assert_eq!(h.recorded(&vm).await[1], path, "the record has the volume");
    assert!(h.domain_files(&vm).contains(&path), "the domain has the disk");
    // Again: the same answer, nothing added.
    attach_volume(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    assert_eq!(h.recorded(&vm).await.len(), 2);

    // A reboot defines the domain again from the record: the volume stays.
    reboot(&h.app, &ctx(), decode(&json!({"uuid": vm, "timeout": 1, "bootDev": ["hd"]})).unwrap()).await.unwrap();
    assert!(h.domain_files(&vm).contains(&path), "rebooted with the attached volume");
    assert_eq!(h.hv.domain(&vm).unwrap().state, VmState::Running);

    detach_volume(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    assert_eq!(h.recorded(&vm).await.len(), 1, "the record lost the volume");
    assert!(!h.domain_files(&vm).contains(&path), "the domain lost the disk");
    detach_volume(&h.app, &ctx(), decode(&body).unwrap()).await.expect("a detached volume is detached");
}

#[tokio::test]
async fn a_hot_plugged_volume_keeps_its_bus_io_mode_and_limits() {
    use super::vm_devices::attach_volume;
    let h = TestHost::start();
    let vm = started_vm(&h).await;
    let path = data_volume(&h, "d1");
    let body = json!({"vmInstanceUuid": vm, "volume": {"installPath": path, "volumeUuid": "d1", "deviceId": 1,
                      "useVirtioSCSI": true, "ioMode": "threads", "iotune": {"totalIopsSec": 100}}});
    attach_volume(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    let xml = h.hv.domain(&vm).unwrap().xml;
    for want in ["<target dev='sdb' bus='scsi'/>", "io='threads'", "<total_iops_sec>100</total_iops_sec>"] {
        assert!(xml.contains(want), "{want} in {xml}");
    }
    let spec = h.app.vms.lock(&vm).await.unwrap().load().unwrap();
    assert_eq!(spec.volumes[1].iotune.and_then(|t| t.total_iops_sec), Some(100), "the record keeps the limit");
    let other = data_volume(&h, "d2");
    let body = json!({"vmInstanceUuid": vm, "volume": {"installPath": other, "volumeUuid": "d2", "deviceId": 2,
                      "useVirtioSCSI": true, "ioThreadId": 1}});
    let e = attach_volume(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("controller of VM"), "the controller's iothread cannot change live: {e}");
}

#[tokio::test]
async fn bad_attach_commands_are_refused_and_change_nothing() {
    use super::vm_devices::{attach_iso, attach_nic, attach_volume, detach_volume, reboot};
    let h = TestHost::start();
    let vm = started_vm(&h).await;
    let good = data_volume(&h, "d1");
    let outside = tempfile::NamedTempFile::new().unwrap();
    let root = h.recorded(&vm).await[0].clone();
    let root_uuid = h.app.vms.lock(&vm).await.unwrap().load().unwrap().root().uuid.clone();
    let before = vm_state(&h, &vm).await;
    let vol = |path: &str, id: u32| json!({"vmInstanceUuid": vm, "volume": {"installPath": path, "volumeUuid": "d1", "deviceId": id}});
    let cases: Vec<(&str, Value, ErrorKind)> = vec![
        ("outside", vol(outside.path().to_str().unwrap(), 1), ErrorKind::InvalidArgument),
        ("deviceId 0", vol(&good, 0), ErrorKind::InvalidArgument),
        ("missing", vol(&h.path("dataVolumes/none.qcow2"), 1), ErrorKind::NotFound),
        (
            "in use",
            json!({"vmInstanceUuid": vm, "volume": {"installPath": root, "volumeUuid": "x", "deviceId": 2}}),
            ErrorKind::Conflict,
        ),
        (
            "sata cannot be hot-plugged",
            json!({"vmInstanceUuid": vm, "volume": {"installPath": good, "volumeUuid": "d1", "deviceId": 1, "bus": "sata"}}),
            ErrorKind::InvalidArgument,
        ),
        (
            "an iothread the VM lacks",
            json!({"vmInstanceUuid": vm, "volume": {"installPath": good, "volumeUuid": "d1", "deviceId": 1, "ioThreadId": 1}}),
            ErrorKind::InvalidArgument,
        ),
        (
            "native io with a host cache",
            json!({"vmInstanceUuid": vm, "volume": {"installPath": good, "volumeUuid": "d1", "deviceId": 1,
                   "ioMode": "native", "cacheMode": "writeback"}}),
            ErrorKind::InvalidArgument,
        ),
        (
            "unknown VM",
            json!({"vmInstanceUuid": crate::testing::uuid(), "volume": {"installPath": good, "volumeUuid": "d1", "deviceId": 1}}),
            ErrorKind::NotFound,
        ),
    ];
    for (what, body, kind) in cases {
        let e = attach_volume(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
        assert_eq!(e.kind, kind, "{what}: {e}");
        assert_eq!(vm_state(&h, &vm).await, before, "{what} changed nothing");
    }
    let e = detach_volume(
        &h.app,
        &ctx(),
        decode(&json!({"vmInstanceUuid": vm, "volume": {"installPath": root, "volumeUuid": root_uuid}})).unwrap(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("root"), "{e}");
    let e = attach_iso(
        &h.app,
        &ctx(),
        decode(&json!({"vmUuid": vm, "iso": {"path": outside.path(), "deviceId": 0}})).unwrap(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
    let e = attach_iso(&h.app, &ctx(), decode(&json!({"vmUuid": vm, "iso": {"path": good, "deviceId": 2}})).unwrap())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("deviceId 2"), "{e}");
    let e = attach_nic(&h.app, &ctx(), decode(&json!({"vmUuid": vm, "nic": {"mac": "zz", "type": "user"}})).unwrap())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nic.mac"), "{e}");
    let e = reboot(&h.app, &ctx(), decode(&json!({"uuid": vm, "bootDev": ["floppy"]})).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("floppy"), "{e}");
    assert_eq!(vm_state(&h, &vm).await, before, "nothing changed");
}

#[tokio::test]
async fn isos_nics_pause_and_states_of_a_running_vm() {
    use super::vm_devices::*;
    let h = TestHost::start();
    let vm = started_vm(&h).await;
    let iso = h.path("iso/x.iso");
    std::fs::create_dir_all(h.path("iso")).unwrap();
    std::fs::write(&iso, b"iso").unwrap();
    attach_iso(&h.app, &ctx(), decode(&json!({"vmUuid": vm, "iso": {"path": iso, "deviceId": 0}})).unwrap())
        .await
        .unwrap();
    let cdrom = |spec: &crate::model::VmSpec| spec.cd_roms[0].iso.clone();
    assert_eq!(cdrom(&vm_state(&h, &vm).await.0), Some(iso.clone()));
    assert!(h.hv.domain(&vm).unwrap().xml.contains(&format!("<source file='{iso}'/>")));
    detach_iso(&h.app, &ctx(), decode(&json!({"vmUuid": vm, "isoUuid": "i", "deviceId": 0})).unwrap()).await.unwrap();
    assert_eq!(cdrom(&vm_state(&h, &vm).await.0), None);
    assert!(!h.hv.domain(&vm).unwrap().xml.contains(&iso), "ejected");

    let nic = json!({"vmUuid": vm, "nic": {"mac": "52:54:00:00:00:02", "type": "user", "uuid": "nic1", "deviceId": 1}});
    let rsp = attach_nic(&h.app, &ctx(), decode(&nic).unwrap()).await.unwrap();
    assert_eq!(rsp.virtual_device_info_list[0].resource_uuid, "nic1");
    assert_eq!(vm_state(&h, &vm).await.0.nics.len(), 2);
    assert!(h.hv.domain(&vm).unwrap().xml.contains("52:54:00:00:00:02"));
    detach_nic(&h.app, &ctx(), decode(&nic).unwrap()).await.unwrap();
    assert_eq!(vm_state(&h, &vm).await.0.nics.len(), 1);
    assert!(!h.hv.domain(&vm).unwrap().xml.contains("52:54:00:00:00:02"));

    pause(&h.app, &ctx(), decode(&json!({"uuid": vm, "timeout": 120})).unwrap()).await.unwrap();
    pause(&h.app, &ctx(), decode(&json!({"uuid": vm})).unwrap()).await.expect("a paused VM stays paused");
    assert_eq!(h.hv.domain(&vm).unwrap().state, VmState::Paused);
    let gone = crate::testing::uuid();
    let states =
        check_state(&h.app, &ctx(), decode(&json!({"vmUuids": [vm, gone], "hostUuid": "h"})).unwrap()).await.unwrap();
    assert_eq!(serde_json::to_value(&states).unwrap(), json!({"states": {vm.clone(): "Paused", gone: "Shutdown"}}));
    resume(&h.app, &ctx(), decode(&json!({"uuid": vm})).unwrap()).await.unwrap();
    assert_eq!(h.hv.domain(&vm).unwrap().state, VmState::Running);
    let e = check_state(&h.app, &ctx(), decode(&json!({"vmUuids": ["../x"]})).unwrap()).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
}

#[tokio::test]
async fn volume_sync_reports_files_unused_at_two_syncs_in_a_row() {
    use super::vm_devices::volume_sync;
    let h = TestHost::start();
    let vm = started_vm(&h).await;
    let dir = std::path::Path::new(&h.recorded(&vm).await[0]).parent().unwrap().to_owned();
    let stray = dir.join("stray.qcow2");
    std::fs::write(&stray, b"x").unwrap();
    let body = json!({"storagePaths": [format!("file://{}", dir.display()), "ceph://pool/x"]});
    let first = volume_sync(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    assert!(first.inactive_volume_paths.is_empty(), "once unused is not reported yet");
    let second = volume_sync(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    let key = format!("file://{}", dir.display());
    assert_eq!(second.inactive_volume_paths.get(&key), Some(&vec![stray.display().to_string()]), "{second:?}");
    let outside = json!({"storagePaths": ["file:///etc"]});
    assert!(volume_sync(&h.app, &ctx(), decode(&outside).unwrap()).await.is_err());
}

/// What a handler answers, as the HTTP layer sends it (the response envelope).
fn answer<T: serde::Serialize>(rsp: T) -> Value {
    crate::wire::envelope(&Ok(serde_json::to_value(rsp).unwrap()))
}

fn connect_body(host_uuid: &str, send_command_url: &str) -> Value {
    // As the MN's Gson sends a ConnectCmd (KVMAgentCommands.java:265-272): primitives present,
    // nulls absent, kvmHostAddons appended.
    json!({
        "hostUuid": host_uuid, "sendCommandUrl": send_command_url,
        "iptablesRules": ["-A INPUT -p tcp --dport 7070 -j ACCEPT"],
        "ignoreMsrs": true, "pageTableExtensionDisabled": true, "tcpServerPort": 7123,
        "version": "5.1.0", "kvmHostAddons": {}
    })
}

#[tokio::test]
async fn admission_replies_decode_into_the_management_nodes_types() {
    let h = TestHost::start();
    let modules = tempfile::tempdir().unwrap();
    let params = modules.path().join("kvm/parameters");
    std::fs::create_dir_all(&params).unwrap();
    std::fs::write(params.join("ignore_msrs"), "N\n").unwrap();
    let host = "5b9a2f4c1d3e4f5a8b7c6d5e4f3a2b1c";
    let url = "http://10.0.0.1:8080/zstack/asyncrest/sendcommand";

    let rsp =
        super::host::connect_with(&h.app, decode(&connect_body(host, url)).unwrap(), modules.path()).await.unwrap();
    let c: ConnectResponse = mn_types::decode(&answer(rsp)).unwrap();
    assert!(c.base.success);
    assert_eq!((c.libvirt_version.as_deref(), c.qemu_version.as_deref()), (Some("9.0.0"), Some("7.2.0")));
    assert_eq!(std::fs::read_to_string(params.join("ignore_msrs")).unwrap(), "Y", "ignoreMsrs applied");

    let fact = super::host::fact(&h.app, &ctx(), crate::wire::Empty {}).await.unwrap();
    let f: HostFactResponse = mn_types::decode(&answer(fact)).unwrap();
    let v = f.virtualizer_info.expect("the MN dereferences virtualizerInfo (KVMHost.java:5727)");
    assert_eq!(
        (v.uuid.as_deref(), v.virtualizer.as_deref(), v.version.as_deref()),
        (Some(host), Some("qemu-kvm"), Some("7.2.0"))
    );
    assert_eq!(f.cpu_model_name.as_deref(), Some("EPYC-Rome"), "libvirt's model name");
    assert!(f.libvirt_version.is_some(), "the MN compares it unconditionally (KVMHost.java:5840)");
    assert_ne!(f.hvm_cpu_flag.as_deref(), Some(""), "vmx, svm or absent");
    let ghz = f.cpu_ghz.unwrap();
    assert!(ghz.parse::<f64>().is_ok(), "{ghz}");
    assert!(f.cpu_processor_num.unwrap().parse::<u32>().unwrap() >= 1);
    assert!(f.ip_addresses.is_some() && f.libvirt_capabilities.is_some() && f.system_serial_number.is_some());

    let ping = super::host::ping(&h.app, &ctx(), decode(&json!({"hostUuid": host, "kvmHostAddons": {}})).unwrap())
        .await
        .unwrap();
    let p: PingResponse = mn_types::decode(&answer(ping)).unwrap();
    assert_eq!(
        (p.host_uuid.as_deref(), p.send_command_url.as_deref(), p.version.as_deref()),
        (Some(host), Some(url), Some("5.1.0"))
    );

    let mn2 = "http://10.0.0.2:8080/zstack/asyncrest/sendcommand";
    let body = json!({"hostUuid": host, "sendCommandUrl": mn2, "kvmHostAddons": {}, "threadContext": {"api": "x"}});
    let upd = super::host::update_configuration(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap();
    let u: UpdateHostConfigurationResponse = mn_types::decode(&answer(upd)).unwrap();
    assert!(u.success);
    let id = h.app.identity.get();
    assert_eq!(
        (id.send_command_url.as_deref(), id.host_uuid.as_deref()),
        (Some(mn2), Some(host)),
        "only the URL changes"
    );
    assert!(
        h.app.callback_allowed("http://10.0.0.1:8080/zstack/asyncrest/callback").is_ok(),
        "the first MN still gets results"
    );
    assert!(h.app.callback_allowed("http://10.0.0.2:8080/zstack/asyncrest/callback").is_ok());
    assert!(h.app.callback_allowed("http://10.0.0.3:8080/zstack/asyncrest/callback").is_err());

    let cap = super::host::capacity(&h.app, &ctx(), crate::wire::Empty {}).await.unwrap();
    let c: HostCapacityResponse = mn_types::decode(&answer(cap)).unwrap();
    assert!(c.cpu_num >= 1 && c.total_memory > 0 && c.cpu_sockets >= 1);
    let sync = super::host::vm_sync(&h.app, &ctx(), crate::wire::Empty {}).await.unwrap();
    let _: VmSyncResponse = mn_types::decode(&answer(sync)).unwrap();
}

#[test]
fn the_mirror_types_fail_on_a_wrong_json_type_as_gson_does() {
    assert!(mn_types::decode::<HostFactResponse>(&json!({"cpuProcessorNum": 8})).is_err(), "a number for a String");
    assert!(mn_types::decode::<HostFactResponse>(&json!({"virtualizerInfo": "qemu"})).is_err());
    assert!(mn_types::decode::<HostCapacityResponse>(&json!({"cpuNum": "8"})).is_err());
    assert!(mn_types::decode::<ProgressReportCmd>(&json!({"detail": "copying"})).is_err(), "the bug this fixed");
    assert!(mn_types::decode::<ProgressReportCmd>(&json!({"detail": {"step": "copying"}, "progress": "5"})).is_ok());
}

#[tokio::test]
async fn update_configuration_for_another_host_or_without_a_url_changes_nothing() {
    let h = TestHost::start();
    let host = "5b9a2f4c1d3e4f5a8b7c6d5e4f3a2b1c";
    let url = "http://10.0.0.1:8080/zstack/asyncrest/sendcommand";
    let early = json!({"hostUuid": host, "sendCommandUrl": url});
    let e = super::host::update_configuration(&h.app, &ctx(), decode(&early).unwrap()).await.unwrap_err();
    assert!(e.to_string().contains("never connected"), "{e}");
    assert_eq!(h.app.identity.get().send_command_url, None, "a host never connected takes no URL");
    let modules = tempfile::tempdir().unwrap();
    super::host::connect_with(&h.app, decode(&connect_body(host, url)).unwrap(), modules.path()).await.unwrap();
    let before = h.app.identity.get();
    for body in [
        json!({"hostUuid": "0000000000000000000000000000000a", "sendCommandUrl": "http://10.9.9.9:8080/x"}),
        json!({"hostUuid": host}),
        json!({"hostUuid": host, "sendCommandUrl": "not a url"}),
    ] {
        let e = super::host::update_configuration(&h.app, &ctx(), decode(&body).unwrap()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{body}: {e}");
        assert_eq!(h.app.identity.get(), before, "{body} changed nothing");
    }
    assert!(h.app.callback_allowed("http://10.9.9.9:8080/x").is_err());
}

#[tokio::test]
async fn a_ceph_vms_start_defines_the_secret_its_addons_carry_and_half_a_pair_is_refused() {
    let h = TestHost::start();
    let vm = started_vm(&h).await;
    let secret = "148347dd-908e-ce57-bc2a-f9650d652c09";
    let root = h.recorded(&vm).await[0].clone();
    let start = |addons: Value| {
        json!({"vmInstanceUuid": vm, "vmName": "t", "memory": 67108864, "cpuNum": 1, "addons": addons,
               "rootVolume": {"installPath": root, "volumeUuid": "r", "deviceId": 0}})
    };
    for (addons, field) in [
        (json!({"ceph_secret_uuid": secret}), "ceph_secret_key"),
        (json!({"ceph_secret_uuid": secret, "ceph_secret_key": "not base64!"}), "addons.ceph_secret_key"),
        (json!({"ceph_secret_uuid": "nope", "ceph_secret_key": "QUJD"}), "addons.ceph_secret_uuid"),
    ] {
        let e = super::vm::start(&h.app, &ctx(), decode(&start(addons.clone())).unwrap()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{addons}: {e}");
        assert!(e.to_string().contains(field), "{addons}: {e}");
        assert!(h.hv.secret_uuids().is_empty(), "{addons}: no secret defined");
    }
    let addons = json!({"ceph_secret_uuid": secret, "ceph_secret_key": "QUJD"});
    super::vm::start(&h.app, &ctx(), decode(&start(addons)).unwrap()).await.unwrap();
    assert_eq!(h.hv.secret_uuids(), [secret]);
}

/// A ZStack start of a new UEFI VM with an encrypted TPM, and the NVRAM path it gets.
async fn uefi_tpm_start(h: &TestHost) -> (serde_json::Value, std::path::PathBuf) {
    let vm = crate::testing::uuid();
    let root = h.path(&format!("rootVolumes/{vm}/root.qcow2"));
    std::fs::create_dir_all(std::path::Path::new(&root).parent().unwrap()).unwrap();
    std::fs::copy(h.image(&vm, 1 << 20).await, &root).unwrap();
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let cmd = json!({
        "vmInstanceUuid": vm, "vmName": "t", "memory": 67108864, "cpuNum": 1, "bootMode": "UEFI",
        "tpm": {"enable": true, "key": key},
        "rootVolume": {"installPath": root, "volumeUuid": crate::testing::uuid(), "deviceId": 0},
    });
    (cmd, std::path::Path::new(&root).with_file_name(format!("{vm}.nvram.fd")))
}

/// A first `/vm/start` that fails leaves nothing of the VM (domain, NVRAM, the secret of its TPM
/// state); a failed start of a VM that ran before keeps what it had.
#[tokio::test]
async fn a_failed_first_zstack_start_leaves_no_nvram_or_tpm_secret_and_a_later_one_keeps_them() {
    let h = TestHost::start();
    let (cmd, nvram) = uefi_tpm_start(&h).await;
    let vm = cmd["vmInstanceUuid"].as_str().unwrap().to_owned();
    h.faults.fail("create");
    super::vm::start(&h.app, &ctx(), decode(&cmd).unwrap()).await.unwrap_err();
    assert!(!nvram.exists(), "the NVRAM a failed first start made is removed");
    assert!(h.hv.secret_uuids().is_empty(), "and the TPM state's secret");
    assert!(h.hv.domain(&vm).is_none() && !h.app.vms.is_known(&vm), "and the domain; no record");

    let h = TestHost::start();
    let (cmd, nvram) = uefi_tpm_start(&h).await;
    let vm = cmd["vmInstanceUuid"].as_str().unwrap().to_owned();
    super::vm::start(&h.app, &ctx(), decode(&cmd).unwrap()).await.unwrap();
    super::vm::stop(&h.app, &ctx(), decode(&json!({"uuid": vm, "type": "cold"})).unwrap()).await.unwrap();
    h.faults.fail("create");
    super::vm::start(&h.app, &ctx(), decode(&cmd).unwrap()).await.unwrap_err();
    assert!(nvram.exists(), "a VM that ran before keeps its NVRAM");
    assert_eq!(h.hv.secret_uuids(), [crate::domain::tpm_secret_uuid(&vm)], "and its TPM state's secret");
    assert!(h.hv.domain(&vm).is_none(), "only the definition goes");
}

#[tokio::test]
async fn a_zstack_uefi_start_makes_the_nvram_once_and_destroy_removes_it() {
    let h = TestHost::start();
    let vm = crate::testing::uuid();
    let root = h.path(&format!("rootVolumes/{vm}/root.qcow2"));
    std::fs::create_dir_all(std::path::Path::new(&root).parent().unwrap()).unwrap();
    std::fs::copy(h.image(&vm, 1 << 20).await, &root).unwrap();
    let cmd = json!({
        "vmInstanceUuid": vm, "vmName": "t", "memory": 67108864, "cpuNum": 1, "bootMode": "UEFI",
        "secureBoot": true, "rootVolume": {"installPath": root, "volumeUuid": crate::testing::uuid(), "deviceId": 0},
    });
    super::vm::start(&h.app, &ctx(), decode(&cmd).unwrap()).await.unwrap();
    let nvram = std::path::Path::new(&root).with_file_name(format!("{vm}.nvram.fd"));
    assert_eq!(std::fs::read(&nvram).unwrap(), b"VARS.ms.fd");
    let xml = h.hv.domain(&vm).unwrap().xml;
    assert!(xml.contains("machine='q35'") && xml.contains("<smm state='on'/>"), "{xml}");

    // Stopped and started again: the same store, with what the guest wrote.
    std::fs::write(&nvram, b"written by the guest").unwrap();
    super::vm::stop(&h.app, &ctx(), decode(&json!({"uuid": vm, "type": "cold"})).unwrap()).await.unwrap();
    super::vm::start(&h.app, &ctx(), decode(&cmd).unwrap()).await.unwrap();
    assert_eq!(std::fs::read(&nvram).unwrap(), b"written by the guest");
    super::vm::destroy(&h.app, &ctx(), decode(&json!({"uuid": vm})).unwrap()).await.unwrap();
    assert!(!nvram.exists(), "destroy removes the NVRAM");
}
