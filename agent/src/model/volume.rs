//! A VM's disk in the model: where it lives and how the guest sees it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{IoMode, IoTune};
use crate::storage::location::Location;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Volume {
    /// The management plane's volume uuid; also the disk's serial in the guest.
    pub uuid: String,
    pub location: Location,
    /// 0 for the root; the disk letter follows from it.
    pub device_id: u32,
    pub format: DiskFormat,
    pub bus: Bus,
    pub cache: CacheMode,
    pub shareable: bool,
    pub boot_order: Option<u32>,
    /// How QEMU reaches an RBD volume; `None` for files.
    pub rbd: Option<RbdAccess>,
    /// `None`: the hypervisor's default.
    #[serde(default)]
    pub io: Option<IoMode>,
    /// The VM's iothread (from 1) serving this disk: virtio-blk and virtio-scsi only.
    #[serde(default)]
    pub iothread: Option<u32>,
    #[serde(default)]
    pub iotune: Option<IoTune>,
}

impl Volume {
    /// The install path, as the wire and the storage back ends name it.
    pub fn install_path(&self) -> String {
        self.location.to_string()
    }

    pub fn is_rbd(&self) -> bool {
        matches!(self.location, Location::Rbd(_))
    }

    /// Root or data, in the management plane's words.
    pub fn volume_type(&self) -> &'static str {
        if self.device_id == 0 {
            "Root"
        } else {
            "Data"
        }
    }

    /// Moves the volume to `location` (a new file, or an RBD image reached through `rbd`).
    pub fn moved_to(&self, uuid: String, location: Location, rbd: Option<RbdAccess>) -> Volume {
        let (format, rbd) = match location {
            Location::File(_) => (DiskFormat::Qcow2, None),
            Location::Rbd(_) => (DiskFormat::Raw, rbd),
        };
        Volume { uuid, location, format, rbd, ..self.clone() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The format a file's own header says it has (never what a command claims).
    pub fn of_file(path: &std::path::Path) -> Result<DiskFormat, crate::qemu_img::HeaderError> {
        Ok(match crate::qemu_img::sniff_format(path)? {
            "raw" => DiskFormat::Raw,
            _ => DiskFormat::Qcow2,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// The bus the guest sees the disk on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Bus {
    /// virtio-blk (`vdX`).
    Virtio,
    /// A virtio-scsi controller (`sdX`).
    Scsi,
    /// SATA (`sdX`).
    Sata,
    /// IDE (`hdX`): machine type `pc` only.
    Ide,
}

impl Bus {
    pub const ALL: [(&'static str, Bus); 4] =
        [("virtio", Bus::Virtio), ("scsi", Bus::Scsi), ("sata", Bus::Sata), ("ide", Bus::Ide)];

    /// libvirt's name, which is also the wire's.
    pub fn as_str(self) -> &'static str {
        Bus::ALL.iter().find(|(_, b)| *b == self).map_or("virtio", |(s, _)| s)
    }
}

/// libvirt's disk cache modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    None,
    Writethrough,
    Writeback,
    Directsync,
    Unsafe,
}

impl CacheMode {
    pub const ALL: [(&'static str, CacheMode); 5] = [
        ("none", CacheMode::None),
        ("writethrough", CacheMode::Writethrough),
        ("writeback", CacheMode::Writeback),
        ("directsync", CacheMode::Directsync),
        ("unsafe", CacheMode::Unsafe),
    ];

    pub fn as_str(self) -> &'static str {
        CacheMode::ALL.iter().find(|(_, m)| *m == self).map_or("none", |(s, _)| s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbdAccess {
    /// The libvirt secret holding the cephx key.
    pub secret_uuid: Option<String>,
    pub monitors: Vec<Monitor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Monitor {
    pub host: String,
    pub port: Option<u16>,
}
