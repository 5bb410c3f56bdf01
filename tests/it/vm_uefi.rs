//! UEFI VMs on real libvirtd and QEMU (TCG): OVMF with Secure Boot, SMM and a TPM boots
//! Debian's signed shim, GRUB and kernel from an ESP (tests/guest/build-esp.sh); every VM has its
//! own NVRAM, which clones copy and ZStack's destroy removes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvmagent_host_tests::checks::{domstate, dumpxml, eventually, virsh};
use kvmagent_host_tests::guest::{console_log, efi_variable, esp_image, wait_report, EFIVAR};
use kvmagent_host_tests::images::root_volume_path;
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// OVMF, shim, GRUB and the kernel under TCG: far slower than the direct-boot guest.
const UEFI_BOOT: Duration = Duration::from_secs(600);

/// Creates a VM on the ESP image with `firmware` and a TPM; returns its uuid and root path.
/// (With 256 MiB, the q35 + SMM guest's kernel did not come up: it kept rebooting after GRUB.)
async fn uefi_vm(h: &Host, firmware: &str, strategy: &str) -> (String, PathBuf) {
    let image = esp_image(h).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(h);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "uefi", "memory": 512 * MIB, "cpuNum": 1,
               "systemSerialNumber": format!("serial-{vm}")},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": image},
        "strategy": strategy,
        "tpm": {"enable": true},
        "firmware": firmware,
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    (vm, root)
}

/// The `<nvram>` file of the VM's domain, which must be `<vm>.nvram.fd` beside its root.
fn nvram_of(vm: &str, root: &Path) -> PathBuf {
    let xml = dumpxml(vm).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let nvram = PathBuf::from(doc.descendants().find(|n| n.has_tag_name("nvram")).and_then(|n| n.text()).unwrap());
    assert_eq!(nvram, root.with_file_name(format!("{vm}.nvram.fd")), "the NVRAM lies beside the root");
    assert!(nvram.is_file(), "{} exists", nvram.display());
    nvram
}

/// Boots the defined VM and waits for its guest's report and power-off; returns its console.
async fn boot(h: &Host, vm: &str) -> String {
    virsh(&["start", vm]).unwrap();
    wait_report(&console_log(h, vm), UEFI_BOOT).await.unwrap();
    eventually("the guest powers off", || domstate(vm).as_deref() == Some("shut off")).await.unwrap();
    std::fs::read_to_string(console_log(h, vm)).unwrap().replace('\r', "")
}

fn clone_uuid(r: &Value) -> String {
    r["inventories"][0]["inventory"]["uuid"].as_str().unwrap_or_else(|| panic!("no clone: {r}")).to_owned()
}

/// What the guest writes into its variable: its SMBIOS serial number (a clone has its own).
fn efivar_content(vm: &str) -> Vec<u8> {
    let xml = dumpxml(vm).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let serial = (doc.descendants())
        .find(|n| n.has_tag_name("entry") && n.attribute("name") == Some("serial"))
        .and_then(|n| n.text())
        .unwrap_or_else(|| panic!("VM {vm} has no SMBIOS serial: {xml}"));
    format!("kvmagent-{serial}").into_bytes()
}

#[tokio::test]
async fn a_secure_boot_vm_with_tpm_boots_and_its_clone_keeps_its_own_nvram() {
    let h = Host::start().await.unwrap();
    let (vm, root) = uefi_vm(&h, "uefi-secure", "CreateStopped").await;
    let xml = dumpxml(&vm).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let loader = doc.descendants().find(|n| n.has_tag_name("loader")).unwrap();
    assert_eq!(loader.text(), Some("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"));
    assert_eq!((loader.attribute("secure"), loader.attribute("type")), (Some("yes"), Some("pflash")), "{xml}");
    assert!(doc.descendants().any(|n| n.has_tag_name("smm") && n.attribute("state") == Some("on")), "{xml}");
    let machine = doc.descendants().find(|n| n.has_tag_name("type")).and_then(|n| n.attribute("machine")).unwrap();
    assert!(machine.contains("q35"), "Secure Boot runs on q35, not {machine}");
    assert!(xml.contains("<tpm model='tpm-crb'>"), "{xml}");
    let nvram = nvram_of(&vm, &root);
    assert!(nvram.starts_with(&h.root));
    assert_eq!(std::fs::read(&nvram).unwrap(), std::fs::read("/usr/share/OVMF/OVMF_VARS_4M.ms.fd").unwrap());

    // Cloned before the source ever booted: its own copy of the store.
    let r = h.call_ok("/vm/clone", &json!({"vmUuid": vm, "names": ["copy"], "strategy": "CreateStopped"})).await;
    let clone = clone_uuid(&r.unwrap());
    h.track_vm(&clone);
    let clone_root = PathBuf::from(&h.recorded_paths(&clone).unwrap()[0]);
    let clone_nvram = nvram_of(&clone, &clone_root);
    assert_ne!(clone_nvram, nvram);

    let console = boot(&h, &vm).await;
    assert!(console.contains("KVMAGENT-SECUREBOOT 1"), "the guest runs with Secure Boot on: {console}");
    assert!(console.contains("KVMAGENT-TPM tpm0"), "the guest sees its TPM: {console}");
    let line = format!("KVMAGENT-EFIVAR {} kvmagent-serial-{vm}", EFIVAR.0);
    assert_ne!(efivar_content(&clone), efivar_content(&vm), "the clone has its own serial");
    assert!(console.contains(&line), "the guest wrote its variable: {console}");
    assert_eq!(efi_variable(&nvram, EFIVAR).unwrap(), Some(efivar_content(&vm)), "in the source's NVRAM");
    assert_eq!(efi_variable(&clone_nvram, EFIVAR).unwrap(), None, "the clone, made before, does not see it");

    // A snapshot group and a backup keep the store as it is now: VMs made from them have the
    // variable in their own copies.
    let g = h.call_ok("/vm/snapshotgroup/take", &json!({"vmUuid": vm})).await.unwrap();
    let body = json!({"groupUuid": g["groupUuid"], "vm": {"vmName": "from-group"}, "strategy": "CreateStopped"});
    let b = h.call_ok("/vm/backup", &json!({"vmUuid": vm})).await.unwrap();
    let restore = json!({"groupUuid": b["groupUuid"], "vm": {"vmName": "from-backup"}, "strategy": "CreateStopped"});
    for (path, body) in [("/vm/createfromsnapshot", body), ("/vm/createfrombackup", restore)] {
        let made = h.call_ok(path, &body).await.unwrap()["uuid"].as_str().unwrap().to_owned();
        h.track_vm(&made);
        let made_nvram = nvram_of(&made, Path::new(&h.recorded_paths(&made).unwrap()[0]));
        assert_eq!(efi_variable(&made_nvram, EFIVAR).unwrap(), Some(efivar_content(&vm)), "{path}");
    }

    // The clone boots the same way from its own store, and writes its own variable there.
    let console = boot(&h, &clone).await;
    assert!(console.contains("KVMAGENT-SECUREBOOT 1") && console.contains("KVMAGENT-TPM tpm0"), "{console}");
    assert_eq!(efi_variable(&clone_nvram, EFIVAR).unwrap(), Some(efivar_content(&clone)));
    assert_eq!(efi_variable(&nvram, EFIVAR).unwrap(), Some(efivar_content(&vm)), "the source's is untouched");

    // ZStack's destroy takes the NVRAM with the VM.
    h.call_ok("/vm/destroy", &json!({"uuid": clone})).await.unwrap();
    assert!(!clone_nvram.exists(), "destroy removes the clone's NVRAM");
    assert!(nvram.is_file(), "and leaves the source's");
}

#[tokio::test]
async fn a_plain_uefi_vm_boots_the_esp_without_secure_boot() {
    let h = Host::start().await.unwrap();
    let (vm, root) = uefi_vm(&h, "uefi", "InstantStart").await;
    let nvram = nvram_of(&vm, &root);
    let xml = dumpxml(&vm).unwrap();
    assert!(xml.contains("/usr/share/OVMF/OVMF_CODE_4M.fd</loader>") && !xml.contains("secure='yes'"), "{xml}");
    wait_report(&console_log(&h, &vm), UEFI_BOOT).await.unwrap();
    eventually("the guest powers off", || domstate(&vm).as_deref() == Some("shut off")).await.unwrap();
    let console = std::fs::read_to_string(console_log(&h, &vm)).unwrap();
    assert!(console.contains("KVMAGENT-SECUREBOOT 0"), "plain UEFI: Secure Boot off: {console}");
    assert_eq!(efi_variable(&nvram, EFIVAR).unwrap(), Some(efivar_content(&vm)));
}
