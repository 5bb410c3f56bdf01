//! `/vm/start`, `/vm/stop`, `/vm/destroy` and local-storage volume paths on real libvirtd + QEMU.

use std::time::Duration;

use kvmagent_host_tests::checks::{
    domstate, dumpxml, ensure_bridge, file_sha256, qemu_img_check, qemu_img_info, xml_text,
};
use kvmagent_host_tests::guest::{console_log, kernel_boot, wait_report};
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// ZStack's own StartVmCmd fixture with a fresh VM uuid, our root volume, and a user-mode NIC
/// (the fixture's `br_eth0` does not exist on a test host).
fn fixture_cmd(vm: &str, root: &str) -> Value {
    let mut cmd: Value = kvmagent_host_tests::images::startvm_fixture();
    cmd["vmInstanceUuid"] = json!(vm);
    cmd["rootVolume"]["installPath"] = json!(root);
    cmd["nics"][0]["type"] = json!("user");
    // The fixture asks for 2 GiB; a TCG test guest needs far less and CI has 2 cores.
    cmd["memory"] = json!(256 * MIB);
    cmd
}

async fn create_root_from_cache(h: &Host, base: &BaseImage) -> (String, std::path::PathBuf) {
    let (vol, path) = root_volume_path(h);
    let r = h
        .call_ok(
            "/localstorage/volume/createvolumefromcache",
            &json!({"templatePathInCache": base.path, "installUrl": path, "volumeUuid": vol, "virtualSize": 0}),
        )
        .await
        .unwrap();
    assert_eq!(r["size"].as_u64(), Some(base.size), "{r}");
    (vol, path)
}

#[tokio::test]
async fn zstack_fixture_is_accepted_unchanged_but_for_root_path_and_bridge() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let (_, root) = create_root_from_cache(&h, &base).await;
    let mut cmd: Value = kvmagent_host_tests::images::startvm_fixture();
    let vm = cmd["vmInstanceUuid"].as_str().unwrap().to_owned();
    let _ = kvmagent_host_tests::checks::virsh(&["destroy", &vm]);
    let _ = kvmagent_host_tests::checks::virsh(&["undefine", "--nvram", &vm]);
    h.track_vm(&vm);
    cmd["rootVolume"]["installPath"] = json!(root);
    ensure_bridge("kvmagent-tbr0").unwrap();
    cmd["nics"][0]["bridgeName"] = json!("kvmagent-tbr0");

    let r = h.call_ok("/vm/start", &cmd).await.unwrap();
    assert_eq!(domstate(&vm).as_deref(), Some("running"), "{r}");
    let devices = r["virtualDeviceInfoList"].as_array().expect("virtualDeviceInfoList");
    let root_dev =
        devices.iter().find(|d| d["resourceUuid"] == cmd["rootVolume"]["volumeUuid"]).expect("root volume address");
    assert_eq!(root_dev["deviceAddress"]["type"], "pci", "{r}");
    assert_eq!(r["nicInfos"][0]["macAddress"], "fa:62:4a:61:6c:00", "{r}");

    let xml = dumpxml(&vm).unwrap();
    assert!(xml.contains("<uuid>0b42630f-37d8-4174-80ec-ed62ad89719f</uuid>"), "{xml}");
    assert!(xml.contains("<description>vm-for-ut</description>"), "{xml}");
    assert!(xml.contains("<serial>d387b4534faf4553a50a8a632cf12e35</serial>"), "{xml}");
    assert!(
        xml.contains("<internalId>1</internalId>") && xml.contains("<hostManagementIp>10.0.245.48</hostManagementIp>"),
        "{xml}"
    );
    assert!(xml.contains("<source bridge='kvmagent-tbr0'/>"), "{xml}");
    assert!(xml.contains("current='1'>128</vcpu>"), "NUMA mode: current vCPUs and the maximum: {xml}");

    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    assert_eq!(domstate(&vm), None, "destroy undefines the domain");
}

#[tokio::test]
async fn the_guest_reads_the_base_pattern_through_the_overlay() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let base_sha = file_sha256(&base.path).unwrap();
    let (root_uuid, root) = create_root_from_cache(&h, &base).await;
    let info = qemu_img_info(&root).unwrap();
    assert_eq!(info["backing-filename"].as_str(), Some(base.path.to_str().unwrap()), "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2");

    let vm = uuid();
    h.track_vm(&vm);
    let mut cmd = fixture_cmd(&vm, root.to_str().unwrap());
    cmd["rootVolume"]["volumeUuid"] = json!(root_uuid);
    cmd["vmName"] = json!("guest <vm> & \"friends\" \u{fc}");
    cmd["kernelBoot"] = kernel_boot(&h, &[0], 1).unwrap();
    h.call_ok("/vm/start", &cmd).await.unwrap();
    let xml = dumpxml(&vm).unwrap();
    assert_eq!(xml_text(&xml, "description").as_deref(), Some("guest <vm> & \"friends\" \u{fc}"), "{xml}");

    let dump = wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();
    assert_eq!(dump["vda"][&0], base.pattern, "the guest reads the base image's bytes through the overlay");
    // The guest powered itself off: the persistent domain is now shut off.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while domstate(&vm).as_deref() != Some("shut off") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(domstate(&vm).as_deref(), Some("shut off"));
    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    assert_eq!(file_sha256(&base.path).unwrap(), base_sha, "the cached image is never written");
    qemu_img_check(&root).unwrap();
}

#[tokio::test]
async fn start_paused_then_stop_cold_and_grace_and_tpm() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let (_, root) = create_root_from_cache(&h, &base).await;
    let vm = uuid();
    h.track_vm(&vm);
    let mut cmd = fixture_cmd(&vm, root.to_str().unwrap());
    cmd["createPaused"] = json!(true);
    cmd["tpm"] = json!({"enable": true});
    // A guest that stays up: no test kernel, so it sits in the firmware while we stop it.
    h.call_ok("/vm/start", &cmd).await.unwrap();
    assert_eq!(domstate(&vm).as_deref(), Some("paused"));
    let xml = dumpxml(&vm).unwrap();
    assert!(xml.contains("<tpm model='tpm-crb'>") && xml.contains("<backend type='emulator' version='2.0'"), "{xml}");

    // Starting a running VM again is a no-op success that still reports devices.
    let again = h.call_ok("/vm/start", &cmd).await.unwrap();
    assert!(again["virtualDeviceInfoList"].as_array().is_some_and(|d| !d.is_empty()), "{again}");

    h.call_ok("/vm/stop", &json!({"uuid": vm, "type": "cold"})).await.unwrap();
    assert_eq!(domstate(&vm), None, "stop undefines the domain");

    cmd["createPaused"] = json!(false);
    h.call_ok("/vm/start", &cmd).await.unwrap();
    assert_eq!(domstate(&vm).as_deref(), Some("running"));
    // The firmware ignores ACPI; a short grace period then a forced power-off.
    h.call_ok("/vm/stop", &json!({"uuid": vm, "type": "grace", "timeout": 2})).await.unwrap();
    assert_eq!(domstate(&vm), None);
    // Stopping a VM that is not there is success.
    h.call_ok("/vm/stop", &json!({"uuid": vm})).await.unwrap();
}

#[tokio::test]
async fn bad_start_commands_are_refused_and_define_nothing() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let (_, root) = create_root_from_cache(&h, &base).await;
    let outside = tempfile::NamedTempFile::new().unwrap();

    let vm = uuid();
    h.track_vm(&vm);
    let good = fixture_cmd(&vm, root.to_str().unwrap());
    let mut cases: Vec<(&str, Value)> = Vec::new();
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("rootVolume");
    cases.push(("rootVolume", c));
    let mut c = good.clone();
    c["rootVolume"]["installPath"] = json!(outside.path());
    cases.push(("outside", c));
    let mut c = good.clone();
    c["rootVolume"]["installPath"] = json!(format!("{}/../../../etc/passwd", h.root.display()));
    cases.push(("", c));
    let mut c = good.clone();
    c["memory"] = json!("lots");
    cases.push(("memory", c));
    let mut c = good.clone();
    c["vmName"] = json!("bad\u{1}name");
    cases.push(("", c));
    let mut c = good.clone();
    c["nics"][0]["mac"] = json!("zz:zz");
    cases.push(("mac", c));
    let mut c = good.clone();
    c["rootVolume"]["installPath"] = json!(h.path("imagecache/none.qcow2"));
    cases.push(("", c));
    for (needle, cmd) in cases {
        let e = h.call_err("/vm/start", &cmd).await.unwrap();
        assert!(e.contains(needle), "error should mention {needle:?}: {e}");
        assert_eq!(domstate(&vm), None, "a refused start defines nothing ({e})");
    }
}
