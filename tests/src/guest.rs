//! The tiny test guest (tests/guest/build.sh): a direct-boot kernel + initramfs that prints the
//! bytes at given offsets of every virtio disk on its serial console, then powers off.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::Host;

/// Copies the guest kernel and initramfs into the host's storage root (the agent only lets a
/// domain open files inside its roots) and returns the `kernelBoot` object for a StartVmCmd.
pub fn kernel_boot(host: &Host, offsets: &[u64], disks: usize) -> Result<Value> {
    let src = crate::guest_dir();
    let dst = host.path("guest");
    std::fs::create_dir_all(&dst)?;
    for f in ["vmlinuz", "initrd.img"] {
        if !dst.join(f).exists() {
            std::fs::copy(src.join(f), dst.join(f))?;
        }
    }
    let offsets: Vec<String> = offsets.iter().map(u64::to_string).collect();
    Ok(json!({
        "kernel": dst.join("vmlinuz"),
        "initrd": dst.join("initrd.img"),
        // no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can miss its
        // window and panic ("IO-APIC + timer doesn't work").
        "cmdline": format!(
            "console=ttyS0 quiet panic=-1 no_timer_check kvmagent.offsets={} kvmagent.disks={disks}",
            offsets.join(",")
        ),
    }))
}

/// Where the agent logs a VM's serial console.
pub fn console_log(host: &Host, vm: &str) -> PathBuf {
    host.state_dir.join("console").join(format!("{vm}.log"))
}

/// What the guest reported: `disk → offset → bytes`.
pub type DiskDump = BTreeMap<String, BTreeMap<u64, Vec<u8>>>;

/// Waits (up to `timeout`) for the guest to finish its report, and parses it.
pub async fn wait_report(log: &Path, timeout: Duration) -> Result<DiskDump> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default().replace('\r', "");
        if text.contains("KVMAGENT-GUEST-DONE") {
            return Ok(parse(&text));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the guest did not finish within {timeout:?}; console so far:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn parse(text: &str) -> DiskDump {
    let mut dump = DiskDump::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if w.next() != Some("KVMAGENT-DISK") {
            continue;
        }
        let (Some(dev), Some(off), Some(hex)) = (w.next(), w.next(), w.next()) else { continue };
        let Ok(off) = off.parse() else { continue };
        let bytes =
            (0..hex.len() / 2).filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect();
        dump.entry(dev.to_owned()).or_default().insert(off, bytes);
    }
    dump
}

/// A 64-byte pattern unique to this run, so a stale image can never satisfy a check.
pub fn pattern(tag: &str) -> Vec<u8> {
    let mut p = format!("KVMAGENT-{tag}-{}", crate::uuid()).into_bytes();
    p.resize(64, b'.');
    p
}

/// Like [`kernel_boot`], for a guest that stays up after its report (a shell on its console),
/// so that tests can go on writing to its disks.
pub fn staying_kernel_boot(host: &Host, offsets: &[u64], disks: usize) -> Result<Value> {
    kernel_boot_with(host, offsets, disks, "kvmagent.shell=1")
}

/// Like [`kernel_boot`], for a guest that answers the guest agent protocol and stays up after
/// its report (see `kvmagent.qga` in tests/guest/init).
pub fn guest_agent_kernel_boot(host: &Host, offsets: &[u64], disks: usize) -> Result<Value> {
    kernel_boot_with(host, offsets, disks, "kvmagent.qga=1")
}

/// [`kernel_boot`] with one more kernel-cmdline `switch` for the guest's /init.
fn kernel_boot_with(host: &Host, offsets: &[u64], disks: usize, switch: &str) -> Result<Value> {
    let mut boot = kernel_boot(host, offsets, disks)?;
    boot["cmdline"] = json!(format!("{} {switch}", boot["cmdline"].as_str().unwrap_or_default()));
    Ok(boot)
}

/// Sends a command that makes a running VM (`/vm/create`, `/vm/createfromsnapshot`,
/// `/vm/createfrombackup`...) and checks what its guest sees: `expect` lists `(disk, offset,
/// bytes)`. Returns the VM's inventory.
pub async fn make_and_check(host: &Host, path: &str, cmd: &Value, expect: &[(&str, u64, Vec<u8>)]) -> Result<Value> {
    let r = host.call_within(path, cmd, Duration::from_secs(180)).await?;
    if r["success"] != true || r["state"] != "Running" {
        bail!("{path} did not make a running VM: {r}");
    }
    let vm = r["uuid"].as_str().unwrap_or_default().to_owned();
    host.track_vm(&vm);
    let dump = wait_report(&console_log(host, &vm), Duration::from_secs(120)).await?;
    for (disk, offset, bytes) in expect {
        let seen = dump.get(*disk).and_then(|d| d.get(offset));
        if seen != Some(bytes) {
            bail!("VM {vm} from {path}: {disk} at {offset} reads {seen:?}, expected {bytes:?}");
        }
    }
    Ok(r)
}

/// The test guest on a UEFI-bootable disk (`tests/guest/build-esp.sh`: Debian's signed shim and
/// GRUB, the guest kernel booted with `kvmagent.efivar=`[`EFIVAR`]), converted into a cached
/// qcow2 image in the host's storage root. Returns the image's path.
pub fn esp_image(host: &Host) -> Result<PathBuf> {
    let raw =
        std::env::var_os("KVMAGENT_TEST_ESP").map(PathBuf::from).unwrap_or_else(|| crate::guest_dir().join("esp.raw"));
    if !raw.exists() {
        bail!("{} is missing: run tests/guest/build-esp.sh", raw.display());
    }
    let id = crate::uuid();
    let path = host.path(&format!("imagecache/template/{id}/{id}.qcow2"));
    std::fs::create_dir_all(path.parent().expect("image dir"))?;
    crate::checks::qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &raw.to_string_lossy(),
        &path.to_string_lossy(),
    ])?;
    Ok(path)
}

/// The EFI variable the guest on [`esp_image`] writes (`tests/guest/init`): its name and vendor
/// GUID. Its content is `kvmagent-<the VM's SMBIOS serial number>`.
pub const EFIVAR: (&str, &str) = ("KvmagentTest", "4b564d41-4745-4e54-8000-000000000001");

/// The content of variable `name` (vendor `guid`) in a UEFI variable store, read with
/// `virt-fw-vars`; `None` when the store has no such variable.
pub fn efi_variable(nvram: &Path, (name, guid): (&str, &str)) -> Result<Option<Vec<u8>>> {
    let json = tempfile::NamedTempFile::new()?;
    let out = std::process::Command::new("virt-fw-vars")
        .arg("-i")
        .arg(nvram)
        .arg("--output-json")
        .arg(json.path())
        .output()?;
    if !out.status.success() {
        bail!("virt-fw-vars -i {}: {}", nvram.display(), String::from_utf8_lossy(&out.stderr));
    }
    let vars: Value = serde_json::from_slice(&std::fs::read(json.path())?)?;
    let found = (vars["variables"].as_array().into_iter().flatten())
        .find(|v| v["name"] == name && v["guid"].as_str().is_some_and(|g| g.eq_ignore_ascii_case(guid)));
    let Some(hex) = found.and_then(|v| v["data"].as_str()) else { return Ok(None) };
    Ok(Some((0..hex.len() / 2).filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect()))
}
