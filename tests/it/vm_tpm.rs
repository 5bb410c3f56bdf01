//! Encrypted TPM state on real libvirtd and swtpm: `tpm.key` goes into a libvirt secret of
//! usage `vtpm` that the domain's TPM backend names, swtpm runs with the key, the guest sees its
//! TPM; a clone gets a copy of the state and its own secret with the same key, and boots with it.

use std::time::Duration;

use base64::Engine;
use kvmagent_host_tests::checks::{dumpxml, virsh};
use kvmagent_host_tests::guest::{console_log, staying_kernel_boot, wait_report};
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn dashed(vm: &str) -> String {
    format!("{}-{}-{}-{}-{}", &vm[0..8], &vm[8..12], &vm[12..16], &vm[16..20], &vm[20..])
}

/// The arguments of the swtpm process serving VM `vm`'s TPM.
fn swtpm_args(vm: &str) -> Option<String> {
    let state = dashed(vm);
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|p| {
        let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
        let args = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        (args.starts_with("/usr/bin/swtpm socket") && args.contains(&state)).then_some(args)
    })
}

/// Checks that VM `vm` runs with its own encrypted TPM: the domain names its secret, the
/// secret holds `key`, swtpm got a key, and the guest sees the TPM.
async fn check_encrypted(h: &Host, vm: &str, key: &str) {
    let secret = dashed(vm);
    let xml = dumpxml(vm).unwrap();
    assert!(xml.contains(&format!("<encryption secret='{secret}'/>")), "{xml}");
    assert_eq!(virsh(&["secret-get-value", &secret]).unwrap().trim(), key, "the secret holds the key");
    assert!(virsh(&["secret-dumpxml", &secret]).unwrap().contains("<usage type='vtpm'>"));
    let args = swtpm_args(vm).unwrap_or_else(|| panic!("no swtpm runs for VM {vm}"));
    assert!(args.contains("--key"), "swtpm runs with the key: {args}");
    wait_report(&console_log(h, vm), Duration::from_secs(120)).await.unwrap();
    let console = std::fs::read_to_string(console_log(h, vm)).unwrap();
    assert!(console.contains("KVMAGENT-TPM tpm0"), "the guest sees its TPM: {console}");
}

#[tokio::test]
async fn an_encrypted_tpm_boots_and_a_clone_boots_with_its_own_secret_of_the_same_key() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode(rand_key());
    let (root_uuid, root) = root_volume_path(&h);
    let vm = uuid();
    h.track_vm(&vm);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "tpm", "memory": 192 * MIB, "cpuNum": 1,
               "kernelBoot": staying_kernel_boot(&h, &[0], 1).unwrap()},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "tpm": {"enable": true, "key": key},
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    check_encrypted(&h, &vm, &key).await;
    let record = std::fs::read_to_string(h.state_dir.join("vms").join(format!("{vm}.json"))).unwrap();
    assert!(!record.contains(&key), "the agent does not keep the key");

    let r = h.call_ok("/vm/clone", &json!({"vmUuid": vm, "names": ["tpm-clone"]})).await.unwrap();
    let clone = r["inventories"][0]["inventory"]["uuid"].as_str().unwrap_or_else(|| panic!("{r}")).to_owned();
    h.track_vm(&clone);
    check_encrypted(&h, &clone, &key).await;

    // The domains go with their TPM state when `h` is dropped; swtpm no longer needs the keys.
    for v in [&vm, &clone] {
        virsh(&["secret-undefine", &dashed(v)]).unwrap();
    }
}

/// 32 bytes that differ from run to run.
fn rand_key() -> Vec<u8> {
    let a = uuid::Uuid::new_v4();
    let b = uuid::Uuid::new_v4();
    a.as_bytes().iter().chain(b.as_bytes()).copied().collect()
}
