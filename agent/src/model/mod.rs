//! The agent's own model of a VM: what the operations work on, what the domain XML is rendered
//! from and what VM records and snapshot groups persist. Wire commands (ZStack's StartVmCmd,
//! the native commands) are decoded into it at the edge ([`crate::wire::vm`]), validated once:
//! every choice is an enum, every volume a typed [`Location`], and no other module knows a
//! ZStack field name.

mod cloud_init;
mod cpu_mode;
mod disk_io;
mod volume;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use cloud_init::{Addressing, CloudInit, IpCidr, NicSetup};
pub use cpu_mode::CpuMode;
pub use disk_io::{check_disks, scsi_iothread, IoMode, IoTune, MAX_IOTHREADS};
pub use volume::{Bus, CacheMode, DiskFormat, Monitor, RbdAccess, Volume};

/// The version of the persisted model (VM records, snapshot groups). Version 1 was ZStack's
/// StartVmCmd itself; such files are migrated at start.
pub const FORMAT_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSpec {
    /// 32 hex characters; also the domain's name.
    pub uuid: String,
    pub name: String,
    pub internal_id: i64,
    /// Bytes.
    pub memory: u64,
    pub cpu: Cpu,
    pub machine: Machine,
    /// Firmware boot order when no device names its own position.
    pub boot_devices: Vec<BootDevice>,
    /// The root volume (device 0) first, then the data volumes.
    pub volumes: Vec<Volume>,
    pub cd_roms: Vec<CdRom>,
    pub nics: Vec<Nic>,
    pub create_paused: bool,
    pub host_management_ip: String,
    pub clock: Clock,
    pub serial_number: String,
    pub chassis_asset_tag: String,
    pub console_password: String,
    pub video: Video,
    pub image_platform: String,
    /// ZStack's free-form addons, carried as they came.
    pub addons: Map<String, Value>,
    pub tpm: Option<TpmModel>,
    /// The TPM's state is encrypted with the VM's vTPM secret in libvirt (`ops::tpm`).
    #[serde(default)]
    pub tpm_encrypted: bool,
    /// The key of that secret as a command gave it: set into the secret when the domain is
    /// defined, never persisted (libvirt's secret keeps it).
    #[serde(skip)]
    pub tpm_key: Option<TpmKey>,
    pub kernel_boot: Option<KernelBoot>,
    /// iothreads of the VM (`<iothreads>`), numbered from 1, which disks may name.
    #[serde(default)]
    pub iothreads: u32,
    /// The VM generation ID (`<genid>`, a dashed UUID): new for every VM the agent makes,
    /// including clones and restores, so a guest can tell it was copied or rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub genid: Option<String>,
    /// The guest's cloud-init seed, when the VM was made with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// BIOS or UEFI (records older than UEFI support are BIOS VMs).
    #[serde(default)]
    pub firmware: Firmware,
    /// The VM's own UEFI variable store, inside the storage roots: chosen by the agent when a
    /// UEFI VM is first made or started, then kept (also across a change of image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<std::path::PathBuf>,
}

/// An AES-256 key for the TPM state (32 bytes); never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct TpmKey(pub Vec<u8>);

impl std::fmt::Debug for TpmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TpmKey(..)")
    }
}

impl VmSpec {
    pub fn root(&self) -> &Volume {
        &self.volumes[0]
    }

    pub fn root_mut(&mut self) -> &mut Volume {
        &mut self.volumes[0]
    }

    pub fn data_volumes(&self) -> &[Volume] {
        &self.volumes[1..]
    }

    /// A fresh generation ID, for a VM that is new or a copy of another.
    pub fn renew_genid(&mut self) {
        self.genid = Some(uuid::Uuid::new_v4().to_string());
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cpu {
    /// vCPUs at start.
    pub count: u32,
    /// ZStack's NUMA form (`useNuma`): the VM may grow to this many vCPUs (at least `count`),
    /// and one NUMA cell holds them all with all of the memory.
    pub max: Option<u32>,
    /// Sockets, cores, threads: their product is `max` in the NUMA form, `count` otherwise.
    pub topology: Option<Topology>,
    /// The CPU the guest sees; `None` is the hypervisor's default model.
    #[serde(default)]
    pub mode: Option<CpuMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    Pc,
    Q35,
}

impl Machine {
    /// libvirt's machine type, which is also the wire's.
    pub fn as_str(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Hd,
    Cdrom,
    Network,
}

impl BootDevice {
    /// ZStack's names (`bootDev`), which are libvirt's `<boot dev>` too.
    pub const ALL: [(&'static str, BootDevice); 3] =
        [("hd", BootDevice::Hd), ("cdrom", BootDevice::Cdrom), ("network", BootDevice::Network)];

    pub fn as_str(self) -> &'static str {
        BootDevice::ALL.iter().find(|(_, d)| *d == self).map_or("hd", |(n, _)| n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Clock {
    Utc,
    Localtime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Video {
    Vga,
    Cirrus,
    Qxl,
    Virtio,
    Vmvga,
    Bochs,
    Ramfb,
    None,
}

/// What the VM boots with. The native commands' `firmware` names these; ZStack's StartVmCmd
/// says `bootMode` (`Legacy`, `UEFI`, `UEFI_WITH_CSM`) and our `secureBoot`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Firmware {
    #[default]
    #[serde(rename = "bios")]
    Bios,
    /// OVMF with an empty variable store.
    #[serde(rename = "uefi")]
    Uefi,
    /// OVMF built with Secure Boot, Microsoft's keys enrolled; needs SMM, so the q35 machine.
    #[serde(rename = "uefi-secure")]
    UefiSecure,
}

impl Firmware {
    pub fn is_uefi(self) -> bool {
        self != Firmware::Bios
    }

    /// Secure Boot needs SMM, which only the q35 machine has: a `pc` machine is refused.
    pub fn check_machine(self, machine: Machine) -> Result<(), String> {
        if self == Firmware::UefiSecure && machine == Machine::Pc {
            return Err("Secure Boot (firmware uefi-secure) needs the q35 machine (SMM); machineType pc cannot \
                        have it: give machineType q35 (or leave it empty), or firmware uefi"
                .into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TpmModel {
    #[serde(rename = "tpm-crb")]
    Crb,
    #[serde(rename = "tpm-tis")]
    Tis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KernelBoot {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CdRom {
    pub resource_uuid: String,
    /// The ISO; `None` for an empty drive.
    pub iso: Option<String>,
    pub device_id: u32,
    pub boot_order: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Nic {
    pub mac: String,
    pub uuid: String,
    pub device_id: u32,
    /// The tap device's name, when the management plane chose one.
    pub internal_name: String,
    pub network: NicNetwork,
    pub model: NicModel,
    pub mtu: Option<u32>,
    pub link_up: bool,
    pub boot_order: Option<u32>,
    /// Multi-queue settings of a virtio NIC with more than one queue pair.
    pub queues: Option<NicQueues>,
}

/// A multi-queue virtio NIC (ZStack's `vHostAddOn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicQueues {
    /// Queue pairs, more than one.
    pub queues: u32,
    /// Receive ring entries.
    pub rx_queue_size: u32,
    /// Transmit ring entries, when the management plane chose them.
    pub tx_queue_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum NicNetwork {
    /// A tap on this Linux bridge.
    Bridge(String),
    /// QEMU's user-mode networking (hosts without bridges).
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    Virtio,
    E1000,
    Rtl8139,
}

impl NicModel {
    pub fn as_str(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
            NicModel::Rtl8139 => "rtl8139",
        }
    }
}

/// A persisted VM record: the spec with the model's version.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmRecord {
    pub format_version: u32,
    pub vm: VmSpec,
}
