//! Quiesced captures on real libvirtd: every VM gets a guest-agent channel; a snapshot group or
//! a backup of a running VM whose guest agent answers freezes the guest's filesystems for the
//! instant and thaws them after (the test guest's agent says so on its serial console); a VM
//! whose agent does not answer is captured crash-consistent.

use std::time::Duration;

use anyhow::{bail, Result};
use kvmagent_host_tests::checks::dumpxml;
use kvmagent_host_tests::guest::{console_log, guest_agent_kernel_boot, staying_kernel_boot, wait_report};
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const AGENT_CHANNEL: &str = "name='org.qemu.guest_agent.0'";

/// Creates and starts a VM on `base` booting `boot`, and waits for its guest's report.
async fn running_vm(h: &Host, base: &BaseImage, boot: Value) -> Result<String> {
    let (root_uuid, root) = root_volume_path(h);
    let vm = uuid();
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "quiesce", "memory": 192 * MIB, "cpuNum": 1, "kernelBoot": boot},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
    });
    h.track_vm(&vm);
    h.call_ok("/vm/create", &cmd).await?;
    wait_report(&console_log(h, &vm), Duration::from_secs(120)).await?;
    Ok(vm)
}

/// Waits (bounded) until `cond` holds of the VM's serial console; returns the console.
async fn wait_console(h: &Host, vm: &str, what: &str, cond: impl Fn(&str) -> bool) -> Result<String> {
    for _ in 0..240 {
        let text = std::fs::read_to_string(console_log(h, vm)).unwrap_or_default().replace('\r', "");
        if cond(&text) {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("VM {vm}: {what} did not happen; console:\n{}", std::fs::read_to_string(console_log(h, vm))?)
}

/// Waits until libvirt sees the guest's agent connected (the guest opened its port).
async fn wait_agent_connected(vm: &str) -> Result<()> {
    for _ in 0..240 {
        let xml = dumpxml(vm)?;
        if xml.lines().any(|l| l.contains(AGENT_CHANNEL) && l.contains("state='connected'")) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("libvirt never saw the guest agent of VM {vm} connected:\n{}", dumpxml(vm)?)
}

/// The guest agent's freeze/thaw lines on the console, in order.
fn agent_lines(console: &str) -> Vec<&str> {
    console.lines().filter(|l| l.starts_with("KVMAGENT-QGA frozen") || l.starts_with("KVMAGENT-QGA thawed")).collect()
}

#[tokio::test]
async fn a_snapshot_group_of_a_running_vm_with_the_guest_agent_reports_quiesced() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let vm = running_vm(&h, &base, guest_agent_kernel_boot(&h, &[0], 1).unwrap()).await.unwrap();
    wait_console(&h, &vm, "the guest agent start", |c| c.contains("KVMAGENT-QGA ready")).await.unwrap();
    wait_agent_connected(&vm).await.unwrap();

    let g = h.call_ok("/vm/snapshotgroup/take", &json!({"vmUuid": vm, "quiesce": "required"})).await.unwrap();
    assert_eq!(g["quiesced"], true, "{g}");
    let console = wait_console(&h, &vm, "the thaw", |c| agent_lines(c).len() >= 2).await.unwrap();
    assert_eq!(agent_lines(&console), ["KVMAGENT-QGA frozen", "KVMAGENT-QGA thawed"], "frozen once, then thawed");
    let named = h.call_ok("/vm/snapshotgroup/get", &json!({"groupUuid": g["groupUuid"]})).await.unwrap();
    assert_eq!(named["quiesced"], true, "the group records it");

    let b = h.call_ok("/vm/backup", &json!({"vmUuid": vm})).await.unwrap();
    assert_eq!((&b["quiesced"], &b["manifest"]["points"][0]["quiesced"]), (&json!(true), &json!(true)), "{b}");
    let console = wait_console(&h, &vm, "the second thaw", |c| agent_lines(c).len() >= 4).await.unwrap();
    assert_eq!(agent_lines(&console)[2..], ["KVMAGENT-QGA frozen", "KVMAGENT-QGA thawed"]);
}

#[tokio::test]
async fn a_vm_whose_guest_agent_does_not_answer_is_captured_crash_consistent() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 16 * MIB).unwrap();
    let vm = running_vm(&h, &base, staying_kernel_boot(&h, &[0], 1).unwrap()).await.unwrap();
    assert!(dumpxml(&vm).unwrap().contains(AGENT_CHANNEL), "every VM gets the guest agent's channel");

    let g = h.call_ok("/vm/snapshotgroup/take", &json!({"vmUuid": vm})).await.unwrap();
    assert_eq!(g["quiesced"], false, "{g}");
    assert_eq!(g["snapshots"].as_array().map(Vec::len), Some(1), "the group is made: {g}");
    let e = h.call_err("/vm/snapshotgroup/take", &json!({"vmUuid": vm, "quiesce": "required"})).await.unwrap();
    assert!(e.contains("guest agent is not connected"), "{e}");
}
