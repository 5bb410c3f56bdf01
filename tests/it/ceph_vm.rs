//! VMs on RBD: the cephx secret, and a guest booting from an RBD root on the real cluster.

use std::time::Duration;

use kvmagent_host_tests::ceph::{self, admin_key, agent_config, qemu_name};
use kvmagent_host_tests::checks::{dumpxml, virsh};
use kvmagent_host_tests::guest::{console_log, kernel_boot, pattern, wait_report};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn a_guest_boots_from_an_rbd_root_and_reads_its_bytes() {
    let h = Host::start_with(&agent_config()).await.unwrap();
    let img = format!("root-{}", uuid());
    h.call_ok("/ceph/primarystorage/volume/createempty", &json!({"installPath": format!("ceph://rbd/{img}"), "size": 64 * MIB}))
        .await
        .unwrap();
    let bytes = pattern("RBD");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &bytes).unwrap();
    let cmd = format!("write -s {} 0 64", file.path().display());
    let out = std::process::Command::new("qemu-io").args(["-f", "raw", "-c", &cmd, &qemu_name(&format!("rbd/{img}"))]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let secret = uuid::Uuid::new_v4().to_string();
    h.call_ok("/vm/createcephsecret", &json!({"userKey": admin_key(), "uuid": secret})).await.unwrap();
    let e = h.call_err("/vm/createcephsecret", &json!({"userKey": "not base64!", "uuid": secret})).await.unwrap();
    assert!(e.contains("base64"), "{e}");

    let vm = uuid();
    h.track_vm(&vm);
    let volume = uuid();
    let start = json!({
        "vmInstanceUuid": vm, "vmName": "on-rbd", "memory": 192 * MIB, "cpuNum": 1,
        "rootVolume": {"installPath": format!("ceph://rbd/{img}"), "deviceType": "ceph", "volumeUuid": volume,
                       "secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "nics": [{"mac": "52:54:00:00:0c:01", "type": "user", "deviceId": 0}],
        "kernelBoot": kernel_boot(&h, &[0], 1).unwrap(),
    });
    let r = h.call_ok("/vm/start", &start).await.unwrap();
    assert!(r["virtualDeviceInfoList"].as_array().unwrap().iter().any(|d| d["resourceUuid"] == json!(volume)), "{r}");
    let xml = dumpxml(&vm).unwrap();
    assert!(xml.contains("protocol='rbd'") && xml.contains(&format!("name='rbd/{img}'")), "{xml}");
    let dump = wait_report(&console_log(&h, &vm), Duration::from_secs(90)).await.unwrap();
    assert_eq!(dump["vda"][&0], bytes, "the guest reads the RBD image's bytes");

    h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
    h.call_ok("/ceph/primarystorage/delete", &json!({"installPath": format!("ceph://rbd/{img}")})).await.unwrap();
    assert!(ceph::info(&format!("rbd/{img}")).is_none());
    let _ = virsh(&["secret-undefine", &secret]);
}
