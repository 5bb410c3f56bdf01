//! Checks a StartVmCmd before anything is made from it. Text that XML can carry is escaped, not
//! refused; what it cannot carry (control characters) is refused.

use std::collections::HashSet;

use crate::api::vm::{StartVmCmd, VolumeTo};
use crate::error::{AgentError, AgentResult};

const MAX_MEMORY: u64 = 16 << 40;
const MAX_CPUS: u32 = 512;

fn invalid(msg: String) -> AgentError {
    AgentError::invalid(msg)
}

/// Characters XML 1.0 cannot carry at all (escaping does not help).
pub fn xml_safe(field: &str, value: &str) -> AgentResult<()> {
    match value.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        Some(c) => Err(invalid(format!(
            "{field} contains the control character U+{:04X}, which a domain definition cannot carry",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// VM uuids are 32 hex characters: the domain name.
pub fn check_uuid(uuid: &str) -> AgentResult<()> {
    if crate::libvirt::domains::is_vm_name(uuid) {
        Ok(())
    } else {
        Err(invalid(format!("VM uuid {uuid:?} must be 32 hexadecimal characters")))
    }
}

/// A Linux interface name: 1–15 bytes, no `/`, whitespace or `:`.
pub fn is_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn check_volume(field: &str, v: &VolumeTo) -> AgentResult<()> {
    xml_safe(&format!("{field}.installPath"), &v.install_path)?;
    xml_safe(&format!("{field}.volumeUuid"), &v.volume_uuid)?;
    match v.device_type.as_str() {
        "file" if !v.install_path.starts_with('/') => {
            Err(invalid(format!("{field}.installPath {:?} must be an absolute path", v.install_path)))
        }
        "ceph" => crate::ceph::path::CephPath::parse(&v.install_path)
            .and_then(|p| p.require_image())
            .map_err(|e| invalid(format!("{field}.installPath: {}", e.details))),
        "file" => Ok(()),
        other => Err(invalid(format!("{field}.deviceType {other:?} is not supported (file or ceph)"))),
    }
}

pub fn validate(cmd: &StartVmCmd) -> AgentResult<()> {
    check_uuid(&cmd.vm_instance_uuid)?;
    xml_safe("vmName", &cmd.vm_name)?;
    for (f, v) in [
        ("hostManagementIp", &cmd.host_management_ip),
        ("systemSerialNumber", &cmd.system_serial_number),
        ("chassisAssetTag", &cmd.chassis_asset_tag),
        ("consolePassword", &cmd.console_password),
        ("clock", &cmd.clock),
        ("imagePlatform", &cmd.image_platform),
    ] {
        xml_safe(f, v)?;
    }
    if cmd.memory < (1 << 20) || cmd.memory > MAX_MEMORY {
        return Err(invalid(format!("memory {} bytes is out of range (1 MiB to 16 TiB)", cmd.memory)));
    }
    if cmd.cpu_num == 0 || cmd.cpu_num > MAX_CPUS || cmd.max_vcpu_num > MAX_CPUS {
        return Err(invalid(format!(
            "cpuNum {} / maxVcpuNum {} out of range (1 to {MAX_CPUS})",
            cmd.cpu_num, cmd.max_vcpu_num
        )));
    }
    // Each at most MAX_CPUS, so that their product (the topology check) cannot overflow.
    for (f, v) in
        [("socketNum", cmd.socket_num), ("cpuOnSocket", cmd.cpu_on_socket), ("threadsPerCore", cmd.threads_per_core)]
    {
        if v.is_some_and(|n| n > MAX_CPUS) {
            return Err(invalid(format!("{f} {} is out of range (at most {MAX_CPUS})", v.unwrap_or_default())));
        }
    }
    if !matches!(cmd.machine_type.as_str(), "" | "pc" | "q35") {
        return Err(invalid(format!("machineType {:?} is not supported (pc or q35)", cmd.machine_type)));
    }
    const VIDEO: &[&str] = &["", "vga", "cirrus", "qxl", "virtio", "vmvga", "bochs", "ramfb", "none"];
    if !VIDEO.contains(&cmd.video_type.as_str()) {
        return Err(invalid(format!("videoType {:?} is not one of {:?}", cmd.video_type, &VIDEO[1..])));
    }
    if !matches!(cmd.boot_mode.as_str(), "" | "Legacy") {
        return Err(invalid(format!("bootMode {:?} is not supported by this agent yet (Legacy only)", cmd.boot_mode)));
    }
    if cmd.root_volume.device_id != 0 {
        return Err(invalid(format!("rootVolume.deviceId must be 0, not {}", cmd.root_volume.device_id)));
    }
    check_volume("rootVolume", &cmd.root_volume)?;
    let mut ids = HashSet::from([0]);
    for (i, v) in cmd.data_volumes.iter().enumerate() {
        check_volume(&format!("dataVolumes[{i}]"), v)?;
        if !ids.insert(v.device_id) {
            return Err(invalid(format!("dataVolumes[{i}].deviceId {} is used by another disk", v.device_id)));
        }
        super::render::device_letter(v.device_id)?;
    }
    if cmd.cd_roms.len() > 3 {
        return Err(invalid(format!("at most 3 cdRoms are supported, not {}", cmd.cd_roms.len())));
    }
    for (i, c) in cmd.cd_roms.iter().enumerate() {
        xml_safe(&format!("cdRoms[{i}].path"), &c.path)?;
        if !c.is_empty && !c.path.is_empty() && !c.path.starts_with('/') {
            return Err(invalid(format!("cdRoms[{i}].path {:?} must be an absolute path", c.path)));
        }
    }
    for (i, n) in cmd.nics.iter().enumerate() {
        if !is_mac(&n.mac) {
            return Err(invalid(format!("nics[{i}].mac {:?} is not a MAC address (xx:xx:xx:xx:xx:xx)", n.mac)));
        }
        if n.nic_type != "user" && !is_ifname(&n.bridge_name) {
            return Err(invalid(format!(
                "nics[{i}].bridgeName {:?} is not a valid Linux interface name",
                n.bridge_name
            )));
        }
        if !matches!(n.driver_type.as_str(), "" | "virtio" | "e1000" | "rtl8139") {
            return Err(invalid(format!(
                "nics[{i}].driverType {:?} is not supported (virtio, e1000, rtl8139)",
                n.driver_type
            )));
        }
    }
    if let Some(k) = &cmd.kernel_boot {
        for (f, v) in
            [("kernelBoot.kernel", &k.kernel), ("kernelBoot.initrd", &k.initrd), ("kernelBoot.cmdline", &k.cmdline)]
        {
            xml_safe(f, v)?;
        }
    }
    if let Some(t) = &cmd.tpm {
        if !matches!(t.model.as_str(), "" | "tpm-crb" | "tpm-tis") {
            return Err(invalid(format!("tpm.model {:?} is not supported (tpm-crb or tpm-tis)", t.model)));
        }
    }
    Ok(())
}

/// Every local file the domain would open, for the caller to confine to the storage roots.
pub fn file_paths(cmd: &StartVmCmd) -> Vec<&str> {
    let disks = cmd.volumes().filter(|v| v.device_type == "file").map(|v| v.install_path.as_str());
    let isos = cmd.cd_roms.iter().filter(|c| !c.is_empty && !c.path.is_empty()).map(|c| c.path.as_str());
    let kernel = cmd.kernel_boot.iter().flat_map(|k| [k.kernel.as_str(), k.initrd.as_str()]).filter(|p| !p.is_empty());
    disks.chain(isos).chain(kernel).collect()
}
