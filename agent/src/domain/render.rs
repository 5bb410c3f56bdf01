//! Renders a VM spec into libvirt domain XML. Decisions (device names, boot order, sizes)
//! are made here in Rust on a view struct; the template only lays the view out, and every value
//! it prints goes through XML escaping.

use std::path::PathBuf;
use std::sync::LazyLock;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::Serialize;

use crate::error::{AgentError, AgentResult};
use crate::model::{
    scsi_iothread, Bus, Clock, Firmware, KernelBoot, Machine, Monitor, NicNetwork, NicQueues, TpmModel, Video, VmSpec,
    Volume,
};
use crate::storage::location::Location;

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
    /// OVMF's files, for UEFI VMs.
    pub uefi: crate::config::UefiConfig,
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
            uefi: crate::config::UefiConfig::default(),
        }
    }
}

/// Disk letters as ZStack assigns them on x86: `c` is left to the CD-ROM, so deviceId 0 → vda,
/// 1 → vdb, 2 → vdd.
pub const DEVICE_LETTERS: &[u8] = b"abdefghijklmnopqrstuvwxyz";

/// CD-ROM slots: IDE on `pc` (hdc = secondary master, as ZStack), SATA on `q35`.
const IDE_CDROMS: [&str; 3] = ["hdc", "hdd", "hdb"];
const SATA_CDROMS: [&str; 3] = ["sdx", "sdy", "sdz"];
/// The cloud-init seed's drive: no `cdRoms` entry names it.
const SEED_DEVICE_ID: u32 = u32::MAX;

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
    genid: Option<&'a str>,
    description: &'a str,
    internal_id: i64,
    host_ip: &'a str,
    memory_kib: u64,
    vcpu: u32,
    vcpu_max: Option<u32>,
    iothreads: u32,
    cpu_mode: Option<&'static str>,
    /// The named model of mode `custom`.
    cpu_model: Option<&'a str>,
    topology: Option<crate::model::Topology>,
    /// The vCPUs of the one NUMA cell (`0-N`), which holds all of the memory.
    numa_cpus: Option<String>,
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
    scsi_iothread: Option<u32>,
    nics: Vec<NicView<'a>>,
    console_log: Option<String>,
    vnc_listen: &'a str,
    vnc_password: &'a str,
    video: &'a str,
    tpm_model: Option<&'a str>,
    tpm_secret: Option<String>,
    uefi: Option<UefiView>,
}

/// The firmware and variable store of a UEFI VM.
#[derive(Serialize)]
struct UefiView {
    loader: String,
    nvram: String,
    /// Secure Boot: the loader is `secure='yes'` and SMM is on.
    secure: bool,
}

#[derive(Serialize)]
struct DiskView<'a> {
    file: Option<String>,
    rbd: Option<RbdView<'a>>,
    format: &'static str,
    cache: &'static str,
    io: Option<&'static str>,
    /// virtio-blk only: a virtio-scsi disk's iothread is its controller's.
    iothread: Option<u32>,
    /// `(libvirt element, value)` of each limit set.
    iotune: Vec<(&'static str, u64)>,
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
    hosts: Vec<HostView<'a>>,
    secret: Option<&'a str>,
    user: &'a str,
}

#[derive(Serialize)]
struct HostView<'a> {
    hostname: &'a str,
    port: Option<u16>,
}

#[derive(Serialize)]
struct CdromView<'a> {
    /// Which drive this is (not rendered: libvirt knows a drive by its target).
    device_id: u32,
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
    model: &'static str,
    mtu: Option<u32>,
    link_down: bool,
    boot_order: Option<u32>,
    queues: Option<NicQueues>,
}

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::Custom("xml"));
    env.set_formatter(|out, _state, value| {
        out.write_str(&xml_escape(&value.to_string()))
            .map_err(|_| minijinja::Error::new(minijinja::ErrorKind::WriteFailure, "cannot write template output"))
    });
    for (name, text) in [
        ("domain.xml", include_str!("../../../libvirt-templates/domain.xml.j2")),
        ("disk.xml", include_str!("../../../libvirt-templates/disk.xml.j2")),
        ("cdrom.xml", include_str!("../../../libvirt-templates/cdrom.xml.j2")),
        ("interface.xml", include_str!("../../../libvirt-templates/interface.xml.j2")),
    ] {
        env.add_template(name, text).expect("the domain templates parse");
    }
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

/// The libvirt secret (usage `vtpm`) holding the key of VM `vm`'s TPM state: one per VM, named
/// by the VM's uuid, so that it is found (and removed) with the VM.
pub fn tpm_secret_uuid(vm: &str) -> String {
    dashed_uuid(vm)
}

fn disk_view<'a>(v: &'a Volume, settings: &'a DomainSettings, per_device_boot: bool) -> AgentResult<DiskView<'a>> {
    let letter = device_letter(v.device_id)?;
    let dev = match v.bus {
        Bus::Virtio => format!("vd{letter}"),
        Bus::Scsi | Bus::Sata => format!("sd{letter}"),
        // Two IDE channels of two drives each: hda to hdd.
        Bus::Ide if letter <= 'd' => format!("hd{letter}"),
        Bus::Ide => {
            return Err(AgentError::invalid(format!(
                "volume {} (deviceId {}): IDE has four drives (hda to hdd), so deviceId {} cannot be on bus ide",
                v.uuid, v.device_id, v.device_id
            )))
        }
    };
    let (file, rbd) = match &v.location {
        Location::File(p) => (Some(p.display().to_string()), None),
        Location::Rbd(p) => {
            let access = v.rbd.as_ref();
            let rbd = RbdView {
                name: p.spec(),
                hosts: (access.iter().flat_map(|a| &a.monitors))
                    .map(|m: &Monitor| HostView { hostname: &m.host, port: m.port })
                    .collect(),
                secret: access.and_then(|a| a.secret_uuid.as_deref()),
                user: &settings.ceph_user,
            };
            (None, Some(rbd))
        }
    };
    Ok(DiskView {
        file,
        rbd,
        format: v.format.as_str(),
        cache: v.cache.as_str(),
        io: v.io.map(|io| io.as_str()),
        iothread: v.iothread.filter(|_| v.bus == Bus::Virtio),
        iotune: v.iotune.map(|t| t.limits()).unwrap_or_default(),
        dev,
        bus: v.bus.as_str(),
        shareable: v.shareable,
        boot_order: v.boot_order.filter(|_| per_device_boot),
        serial: &v.uuid,
    })
}

/// One device of a VM's spec, to render alone (hot-plugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device<'a> {
    /// The disk of the volume with this uuid.
    Disk(&'a str),
    /// The CD-ROM drive with this deviceId.
    Cdrom(u32),
    /// The network interface with this MAC address.
    Interface(&'a str),
}

/// Renders the domain XML of `spec`.
pub fn render(spec: &VmSpec, settings: &DomainSettings) -> AgentResult<String> {
    let view = view(spec, settings)?;
    let xml = TEMPLATES
        .get_template("domain.xml")
        .and_then(|t| t.render(&view))
        .map_err(|e| AgentError::internal(format!("rendering the domain XML of {}: {e}", spec.uuid)))?;
    no_control_characters(spec, xml)
}

/// Renders one device of `spec` exactly as [`render`] lays it out in the whole domain, for
/// attaching it to (or changing it in) the running domain.
pub fn render_device(spec: &VmSpec, settings: &DomainSettings, device: Device) -> AgentResult<String> {
    let view = view(spec, settings)?;
    let missing = || AgentError::invalid(format!("VM {} has no {device:?}", spec.uuid));
    let (template, ctx) = match device {
        Device::Disk(uuid) => {
            let d = view.disks.iter().find(|d| d.serial == uuid).ok_or_else(missing)?;
            ("disk.xml", minijinja::context! { d })
        }
        Device::Cdrom(id) => {
            let c = view.cdroms.iter().find(|c| c.device_id == id).ok_or_else(missing)?;
            ("cdrom.xml", minijinja::context! { c })
        }
        Device::Interface(mac) => {
            let n = view.nics.iter().find(|n| n.mac.eq_ignore_ascii_case(mac)).ok_or_else(missing)?;
            ("interface.xml", minijinja::context! { n })
        }
    };
    let xml = TEMPLATES
        .get_template(template)
        .and_then(|t| t.render(ctx))
        .map_err(|e| AgentError::internal(format!("rendering {device:?} of VM {}: {e}", spec.uuid)))?;
    no_control_characters(spec, xml.trim().to_owned())
}

/// What the templates lay out: every decision about `spec`'s domain, made here.
fn view<'a>(spec: &'a VmSpec, settings: &'a DomainSettings) -> AgentResult<View<'a>> {
    let q35 = spec.machine == Machine::Q35;
    // libvirt refuses <os><boot dev> together with per-device <boot order>: per-device wins
    // when any device asks for a position.
    let per_device_boot = spec.root().boot_order.is_some()
        || spec.cd_roms.iter().any(|c| c.boot_order.is_some())
        || spec.nics.iter().any(|n| n.boot_order.is_some());
    let boot_devs = if per_device_boot || spec.kernel_boot.is_some() {
        Vec::new()
    } else {
        spec.boot_devices.iter().map(|d| d.as_str()).collect()
    };

    let mut volumes: Vec<&Volume> = spec.volumes.iter().collect();
    volumes.sort_by_key(|v| v.device_id);
    let disks = volumes
        .into_iter()
        .map(|v| disk_view(v, settings, per_device_boot && v.device_id == 0))
        .collect::<AgentResult<Vec<_>>>()?;

    let mut cd_roms: Vec<_> = spec.cd_roms.iter().collect();
    cd_roms.sort_by_key(|c| c.device_id);
    let slots = if q35 { &SATA_CDROMS } else { &IDE_CDROMS };
    let bus = if q35 { "sata" } else { "ide" };
    // The cloud-init seed always takes the last drive, so the others keep their targets.
    let (user_slots, seed_slot) = match &spec.cloud_init {
        Some(ci) if cd_roms.len() >= slots.len() => {
            return Err(AgentError::invalid(format!(
                "VM {} has {} CD-ROMs and a cloud-init seed ({}): at most {} drives in all",
                spec.uuid,
                cd_roms.len(),
                ci.seed.display(),
                slots.len()
            )))
        }
        Some(ci) => (&slots[..slots.len() - 1], Some((ci, slots[slots.len() - 1]))),
        None => (&slots[..], None),
    };
    let mut cdroms: Vec<CdromView> = cd_roms
        .iter()
        .zip(user_slots.iter())
        .map(|(c, dev)| CdromView {
            device_id: c.device_id,
            file: c.iso.as_deref(),
            dev,
            bus,
            boot_order: c.boot_order.filter(|_| per_device_boot),
            serial: &c.resource_uuid,
        })
        .collect();
    if let Some((ci, dev)) = seed_slot {
        cdroms.push(CdromView {
            device_id: SEED_DEVICE_ID,
            file: ci.seed.to_str(),
            dev,
            bus,
            boot_order: None,
            serial: "",
        });
    }
    if let Some(d) = disks.iter().find(|d| cdroms.iter().any(|c| c.dev == d.dev)) {
        return Err(AgentError::invalid(format!(
            "disk {} ({}) takes the drive of a CD-ROM: on machine pc the CD-ROMs are hdc, hdd and hdb, so put the \
             disk on another bus or deviceId",
            d.serial, d.dev
        )));
    }

    let mut nics: Vec<_> = spec.nics.iter().collect();
    nics.sort_by_key(|n| n.device_id);
    let nics = nics
        .into_iter()
        .map(|n| {
            // User-mode NICs have no tap device and no MTU setting.
            let (user_mode, bridge) = match &n.network {
                NicNetwork::User => (true, ""),
                NicNetwork::Bridge(b) => (false, b.as_str()),
            };
            NicView {
                user_mode,
                bridge,
                mac: &n.mac,
                target: Some(n.internal_name.as_str()).filter(|t| !user_mode && super::validate::is_ifname(t)),
                model: n.model.as_str(),
                mtu: n.mtu.filter(|_| !user_mode),
                link_down: !n.link_up,
                boot_order: n.boot_order.filter(|_| per_device_boot),
                queues: n.queues,
            }
        })
        .collect();

    let uefi = match settings.uefi.files(spec.firmware) {
        None => None,
        Some((code, _)) => Some(UefiView {
            loader: code.display().to_string(),
            nvram: (spec.nvram.as_ref().map(|p| p.display().to_string()))
                .ok_or_else(|| AgentError::internal(format!("UEFI VM {} has no NVRAM file assigned", spec.uuid)))?,
            secure: spec.firmware == Firmware::UefiSecure,
        }),
    };

    Ok(View {
        domain_type: &settings.domain_type,
        name: &spec.uuid,
        uuid: dashed_uuid(&spec.uuid),
        genid: spec.genid.as_deref(),
        description: &spec.name,
        internal_id: spec.internal_id,
        host_ip: &spec.host_management_ip,
        memory_kib: spec.memory / 1024,
        vcpu: spec.cpu.count,
        vcpu_max: spec.cpu.max,
        iothreads: spec.iothreads,
        cpu_mode: spec.cpu.mode.as_ref().map(|m| m.libvirt_mode()),
        cpu_model: spec.cpu.mode.as_ref().and_then(|m| m.model()),
        topology: spec.cpu.topology,
        numa_cpus: spec.cpu.max.map(|m| format!("0-{}", m.saturating_sub(1))),
        serial_number: &spec.serial_number,
        asset_tag: &spec.chassis_asset_tag,
        machine: spec.machine.as_str(),
        kernel: spec.kernel_boot.as_ref(),
        boot_devs,
        clock: match spec.clock {
            Clock::Localtime => "localtime",
            Clock::Utc => "utc",
        },
        emulator: settings.emulator.as_deref(),
        virtio_scsi: disks.iter().any(|d| d.bus == "scsi"),
        scsi_iothread: scsi_iothread(spec),
        disks,
        cdroms,
        nics,
        console_log: settings.console_log.as_ref().map(|p| p.display().to_string()),
        vnc_listen: &settings.vnc_listen,
        vnc_password: &spec.console_password,
        video: match spec.video {
            Video::Vga => "vga",
            Video::Cirrus => "cirrus",
            Video::Qxl => "qxl",
            Video::Virtio => "virtio",
            Video::Vmvga => "vmvga",
            Video::Bochs => "bochs",
            Video::Ramfb => "ramfb",
            Video::None => "none",
        },
        tpm_model: spec.tpm.map(|t| match t {
            TpmModel::Crb => "tpm-crb",
            TpmModel::Tis => "tpm-tis",
        }),
        tpm_secret: spec.tpm_encrypted.then(|| tpm_secret_uuid(&spec.uuid)),
        uefi,
    })
}

fn no_control_characters(spec: &VmSpec, xml: String) -> AgentResult<String> {
    // Whatever validation missed, XML cannot carry control characters: never hand libvirt one.
    if let Some(c) = xml.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        return Err(AgentError::invalid(format!(
            "a value of VM {} contains the control character U+{:04X}, which a domain definition cannot carry",
            spec.uuid, c as u32
        )));
    }
    Ok(xml)
}
