//! Renders a StartVmCmd into libvirt domain XML. Decisions (device names, boot order, sizes)
//! are made here in Rust on a view struct; the template only lays the view out, and every value
//! it prints goes through XML escaping.

use std::path::PathBuf;
use std::sync::LazyLock;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;

use crate::api::vm::{KernelBoot, MonInfo, StartVmCmd, VolumeTo};
use crate::error::{AgentError, AgentResult};

/// How this host renders domains.
#[derive(Debug, Clone)]
pub struct DomainSettings {
    /// `kvm` or `qemu` (TCG).
    pub domain_type: String,
    pub emulator: Option<String>,
    /// The serial console is also logged to this file.
    pub console_log: Option<PathBuf>,
    pub vnc_listen: String,
    /// cephx user for RBD disks.
    pub ceph_user: String,
}

impl Default for DomainSettings {
    fn default() -> Self {
        DomainSettings {
            domain_type: "kvm".into(),
            emulator: None,
            console_log: None,
            // ZStack's agent listens on all addresses; consoles are password-protected by the
            // management plane when it sets consolePassword.
            vnc_listen: "0.0.0.0".into(),
            ceph_user: "zstack".into(),
        }
    }
}

/// Disk letters as ZStack assigns them on x86: `c` is left to the CD-ROM, so deviceId 0 → vda,
/// 1 → vdb, 2 → vdd.
pub const DEVICE_LETTERS: &[u8] = b"abdefghijklmnopqrstuvwxyz";

/// CD-ROM slots: IDE on `pc` (hdc = secondary master, as ZStack), SATA on `q35`.
const IDE_CDROMS: [&str; 3] = ["hdc", "hdd", "hdb"];
const SATA_CDROMS: [&str; 3] = ["sdx", "sdy", "sdz"];

pub fn device_letter(device_id: u32) -> AgentResult<char> {
    DEVICE_LETTERS.get(device_id as usize).map(|b| *b as char).ok_or_else(|| {
        AgentError::invalid(format!("deviceId {device_id} is too large: at most {} disks", DEVICE_LETTERS.len()))
    })
}

#[derive(Serialize)]
struct View<'a> {
    domain_type: &'a str,
    name: &'a str,
    uuid: String,
    description: &'a str,
    internal_id: i64,
    host_ip: &'a str,
    memory_kib: u64,
    vcpu: u32,
    vcpu_max: Option<u32>,
    cpu_mode: Option<&'a str>,
    topology: Option<Topology>,
    serial_number: &'a str,
    asset_tag: &'a str,
    machine: &'a str,
    kernel: Option<&'a KernelBoot>,
    boot_devs: Vec<&'static str>,
    clock: &'a str,
    emulator: Option<&'a str>,
    disks: Vec<DiskView<'a>>,
    cdroms: Vec<CdromView<'a>>,
    virtio_scsi: bool,
    nics: Vec<NicView<'a>>,
    console_log: Option<String>,
    vnc_listen: &'a str,
    vnc_password: &'a str,
    video: &'a str,
    tpm_model: Option<&'a str>,
}

#[derive(Serialize)]
struct Topology {
    sockets: u32,
    cores: u32,
    threads: u32,
}

#[derive(Serialize)]
struct DiskView<'a> {
    file: Option<&'a str>,
    rbd: Option<RbdView<'a>>,
    format: &'a str,
    cache: &'a str,
    dev: String,
    bus: &'static str,
    shareable: bool,
    boot_order: Option<u32>,
    serial: &'a str,
}

#[derive(Serialize)]
struct RbdView<'a> {
    /// `pool/image`.
    name: String,
    hosts: &'a [MonInfo],
    secret: Option<&'a str>,
    user: &'a str,
}

#[derive(Serialize)]
struct CdromView<'a> {
    file: Option<&'a str>,
    dev: &'static str,
    bus: &'static str,
    boot_order: Option<u32>,
    serial: &'a str,
}

#[derive(Serialize)]
struct NicView<'a> {
    user_mode: bool,
    bridge: &'a str,
    mac: &'a str,
    target: Option<&'a str>,
    model: &'a str,
    mtu: Option<u32>,
    link_down: bool,
    boot_order: Option<u32>,
}

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::Custom("xml"));
    env.set_formatter(|out, _state, value| {
        out.write_str(&xml_escape(&value.to_string()))
            .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "cannot write template output"))
    });
    env.add_template("domain.xml", include_str!("../../../libvirt-templates/domain.xml.j2"))
        .expect("the domain template parses");
    env
});

/// Escapes text for XML element content and single- or double-quoted attributes.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Attribute values would turn these into spaces; references keep them exact.
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c => out.push(c),
        }
    }
    out
}

/// The dashed form of a 32-hex uuid.
pub fn dashed_uuid(u: &str) -> String {
    if u.len() != 32 {
        return u.to_owned();
    }
    format!("{}-{}-{}-{}-{}", &u[0..8], &u[8..12], &u[12..16], &u[16..20], &u[20..32])
}

fn none_if_zero(n: u32) -> Option<u32> {
    (n > 0).then_some(n)
}

fn disk_view<'a>(v: &'a VolumeTo, settings: &'a DomainSettings, per_device_boot: bool) -> AgentResult<DiskView<'a>> {
    let letter = device_letter(v.device_id)?;
    let (dev, bus) = match (v.use_virtio_scsi, v.use_virtio) {
        (true, _) => (format!("sd{letter}"), "scsi"),
        (false, true) => (format!("vd{letter}"), "virtio"),
        (false, false) => (format!("sd{letter}"), "sata"),
    };
    let rbd = match v.device_type.as_str() {
        "ceph" => Some(RbdView {
            name: crate::ceph::path::CephPath::parse(&v.install_path)?.spec(),
            hosts: &v.mon_info,
            secret: v.secret_uuid.as_deref().filter(|s| !s.is_empty()),
            user: &settings.ceph_user,
        }),
        _ => None,
    };
    Ok(DiskView {
        file: rbd.is_none().then_some(v.install_path.as_str()),
        rbd,
        format: if v.format.is_empty() { "qcow2" } else { &v.format },
        cache: if v.cache_mode.is_empty() { "none" } else { &v.cache_mode },
        dev,
        bus,
        shareable: v.shareable,
        boot_order: if per_device_boot { none_if_zero(v.boot_order) } else { None },
        serial: &v.volume_uuid,
    })
}

/// Renders the domain XML of `cmd`. Call [`super::validate`] first.
pub fn render(cmd: &StartVmCmd, settings: &DomainSettings) -> AgentResult<String> {
    let q35 = cmd.machine_type == "q35";
    // libvirt refuses <os><boot dev> together with per-device <boot order>: per-device wins
    // when any device asks for a position.
    let per_device_boot = cmd.root_volume.boot_order > 0
        || cmd.cd_roms.iter().any(|c| c.boot_order > 0)
        || cmd.nics.iter().any(|n| n.boot_order > 0);
    let boot_devs = if per_device_boot || cmd.kernel_boot.is_some() {
        Vec::new()
    } else {
        let mut devs: Vec<&'static str> = cmd
            .boot_dev
            .iter()
            .filter_map(|d| match d.as_str() {
                "hd" => Some("hd"),
                "cdrom" => Some("cdrom"),
                "network" => Some("network"),
                _ => None,
            })
            .collect();
        if devs.is_empty() {
            devs.push("hd");
        }
        devs
    };

    let mut volumes: Vec<&VolumeTo> = cmd.volumes().collect();
    volumes.sort_by_key(|v| v.device_id);
    let disks = volumes
        .into_iter()
        .map(|v| disk_view(v, settings, per_device_boot && v.device_id == 0))
        .collect::<AgentResult<Vec<_>>>()?;

    let mut cd_roms: Vec<_> = cmd.cd_roms.iter().collect();
    cd_roms.sort_by_key(|c| c.device_id);
    let slots = if q35 { &SATA_CDROMS } else { &IDE_CDROMS };
    let cdroms = cd_roms
        .iter()
        .zip(slots.iter())
        .map(|(c, dev)| CdromView {
            file: (!c.is_empty && !c.path.is_empty()).then_some(c.path.as_str()),
            dev,
            bus: if q35 { "sata" } else { "ide" },
            boot_order: if per_device_boot { none_if_zero(c.boot_order) } else { None },
            serial: &c.resource_uuid,
        })
        .collect();

    let mut nics: Vec<_> = cmd.nics.iter().collect();
    nics.sort_by_key(|n| n.device_id);
    let nics = nics
        .into_iter()
        .map(|n| {
            // User-mode NICs have no tap device and no MTU setting.
            let user_mode = n.nic_type == "user";
            NicView {
                user_mode,
                bridge: &n.bridge_name,
                mac: &n.mac,
                target: Some(n.nic_internal_name.as_str()).filter(|t| !user_mode && super::validate::is_ifname(t)),
                model: match n.driver_type.as_str() {
                    "" if n.use_virtio => "virtio",
                    "" => "e1000",
                    other => other,
                },
                mtu: n.mtu.filter(|m| *m > 0 && !user_mode),
                link_down: n.state == "disable",
                boot_order: if per_device_boot { none_if_zero(n.boot_order) } else { None },
            }
        })
        .collect();

    let vcpu_max = (cmd.use_numa && cmd.max_vcpu_num > cmd.cpu_num).then_some(cmd.max_vcpu_num);
    let all_vcpus = vcpu_max.unwrap_or(cmd.cpu_num);
    let topology = match (cmd.socket_num, cmd.cpu_on_socket, cmd.threads_per_core) {
        (Some(s), Some(c), t) if s * c * t.unwrap_or(1) == all_vcpus => {
            Some(Topology { sockets: s, cores: c, threads: t.unwrap_or(1) })
        }
        _ => None,
    };
    let view =
        View {
            domain_type: &settings.domain_type,
            name: &cmd.vm_instance_uuid,
            uuid: dashed_uuid(&cmd.vm_instance_uuid),
            description: &cmd.vm_name,
            internal_id: cmd.vm_internal_id,
            host_ip: &cmd.host_management_ip,
            memory_kib: cmd.memory / 1024,
            vcpu: cmd.cpu_num,
            vcpu_max,
            // Host CPU modes need hardware virtualisation; under TCG the default model is used.
            cpu_mode: None,
            topology,
            serial_number: &cmd.system_serial_number,
            asset_tag: &cmd.chassis_asset_tag,
            machine: if q35 { "q35" } else { "pc" },
            kernel: cmd.kernel_boot.as_ref(),
            boot_devs,
            clock: if cmd.clock == "localtime" { "localtime" } else { "utc" },
            emulator: settings.emulator.as_deref(),
            virtio_scsi: disks.iter().any(|d| d.bus == "scsi"),
            disks,
            cdroms,
            nics,
            console_log: settings.console_log.as_ref().map(|p| p.display().to_string()),
            vnc_listen: &settings.vnc_listen,
            vnc_password: &cmd.console_password,
            video: match cmd.video_type.as_str() {
                "" => "vga",
                other => other,
            },
            tpm_model: cmd.tpm.as_ref().filter(|t| t.enable).map(|t| {
                if t.model == "tpm-tis" {
                    "tpm-tis"
                } else {
                    "tpm-crb"
                }
            }),
        };
    let xml = TEMPLATES
        .get_template("domain.xml")
        .and_then(|t| t.render(&view))
        .map_err(|e| AgentError::internal(format!("rendering the domain XML of {}: {e}", cmd.vm_instance_uuid)))?;
    // Whatever validation missed, XML cannot carry control characters: never hand libvirt one.
    if let Some(c) = xml.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        return Err(AgentError::invalid(format!(
            "a value of VM {} contains the control character U+{:04X}, which a domain definition cannot carry",
            cmd.vm_instance_uuid, c as u32
        )));
    }
    Ok(xml)
}
