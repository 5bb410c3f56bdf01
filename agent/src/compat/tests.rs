//! Unit tests of ZStack's paths on the fake hypervisor: bad values are refused, named, before
//! anything changes.

use serde_json::{json, Value};

use crate::error::ErrorKind;
use crate::libvirt::domains::VmState;
use crate::tasks::TaskCtx;
use crate::testing::mn_types::{
    self, ConnectResponse, HostCapacityResponse, HostFactResponse, PingResponse, ProgressReportCmd,
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
    let image = h.image("i", 1 << 20);
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
async fn a_ceph_create_or_clone_that_fails_after_making_its_image_removes_it() {
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
