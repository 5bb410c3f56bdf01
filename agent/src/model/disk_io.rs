//! How a VM's disks do I/O: the host I/O mode, the iothread serving a disk, and its limits —
//! with the rules libvirt and QEMU enforce, checked on the whole spec before anything is made.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Bus, CacheMode, Machine, VmSpec};
use crate::error::{AgentError, AgentResult};

/// How QEMU submits a disk's I/O on the host (`<driver io>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IoMode {
    /// Linux native AIO: needs O_DIRECT, so cache `none` or `directsync`.
    #[serde(rename = "native")]
    Native,
    #[serde(rename = "threads")]
    Threads,
    #[serde(rename = "io_uring")]
    IoUring,
}

impl IoMode {
    pub const ALL: [(&'static str, IoMode); 3] =
        [("native", IoMode::Native), ("threads", IoMode::Threads), ("io_uring", IoMode::IoUring)];

    pub fn as_str(self) -> &'static str {
        IoMode::ALL.iter().find(|(_, m)| *m == self).map_or("threads", |(s, _)| s)
    }
}

/// A disk's I/O limits (`<iotune>`), per second; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IoTune {
    #[serde(default)]
    pub total_bytes_sec: Option<u64>,
    #[serde(default)]
    pub read_bytes_sec: Option<u64>,
    #[serde(default)]
    pub write_bytes_sec: Option<u64>,
    #[serde(default)]
    pub total_iops_sec: Option<u64>,
    #[serde(default)]
    pub read_iops_sec: Option<u64>,
    #[serde(default)]
    pub write_iops_sec: Option<u64>,
}

impl IoTune {
    /// The limits that are set, as libvirt names them, in `<iotune>` order.
    pub fn limits(&self) -> Vec<(&'static str, u64)> {
        [
            ("total_bytes_sec", self.total_bytes_sec),
            ("read_bytes_sec", self.read_bytes_sec),
            ("write_bytes_sec", self.write_bytes_sec),
            ("total_iops_sec", self.total_iops_sec),
            ("read_iops_sec", self.read_iops_sec),
            ("write_iops_sec", self.write_iops_sec),
        ]
        .into_iter()
        .filter_map(|(n, v)| v.map(|v| (n, v)))
        .collect()
    }

    /// libvirt refuses a total limit together with a read or write one of the same kind, and
    /// QEMU a limit of 0 (which would mean "none": leave the field out instead).
    pub fn check(&self) -> Result<(), String> {
        if let Some((name, _)) = self.limits().into_iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0: leave it out for no limit"));
        }
        for (kind, total, read, write) in [
            ("bytes", self.total_bytes_sec, self.read_bytes_sec, self.write_bytes_sec),
            ("iops", self.total_iops_sec, self.read_iops_sec, self.write_iops_sec),
        ] {
            if total.is_some() && (read.is_some() || write.is_some()) {
                return Err(format!(
                    "total_{kind}_sec cannot be combined with read_{kind}_sec or write_{kind}_sec: give either the \
                     total or the read/write limits"
                ));
            }
        }
        Ok(())
    }
}

/// The most iothreads a VM may have.
pub const MAX_IOTHREADS: u32 = 64;

/// The disk rules of a whole spec: IDE only on `pc`; `io=native` only with an O_DIRECT cache;
/// an iothread only on virtio-blk or virtio-scsi, and one the VM has; one iothread for the one
/// virtio-scsi controller; sane limits.
pub fn check_disks(spec: &VmSpec) -> AgentResult<()> {
    if spec.iothreads > MAX_IOTHREADS {
        return Err(AgentError::invalid(format!(
            "ioThreads {} is out of range (0 to {MAX_IOTHREADS})",
            spec.iothreads
        )));
    }
    let mut scsi_iothread: Option<(u32, &str)> = None;
    for v in &spec.volumes {
        let disk = || format!("volume {} (deviceId {})", v.uuid, v.device_id);
        if v.bus == Bus::Ide && spec.machine != Machine::Pc {
            return Err(AgentError::invalid(format!(
                "{}: bus ide needs machine type pc; a q35 machine has no IDE controller — use sata instead",
                disk()
            )));
        }
        if v.io == Some(super::IoMode::Native) && !matches!(v.cache, CacheMode::None | CacheMode::Directsync) {
            return Err(AgentError::invalid(format!(
                "{}: io native needs cache none or directsync (it has {}): native AIO works on O_DIRECT files only",
                disk(),
                v.cache.as_str()
            )));
        }
        if let Some(t) = v.iothread {
            if !matches!(v.bus, Bus::Virtio | Bus::Scsi) {
                return Err(AgentError::invalid(format!(
                    "{}: iothread {t} needs bus virtio or scsi, not {}",
                    disk(),
                    v.bus.as_str()
                )));
            }
            if t == 0 || t > spec.iothreads {
                return Err(AgentError::invalid(format!(
                    "{}: iothread {t} is not one of the VM's iothreads (1 to ioThreads, which is {})",
                    disk(),
                    spec.iothreads
                )));
            }
            if v.bus == Bus::Scsi {
                match scsi_iothread {
                    Some((other, by)) if other != t => {
                        return Err(AgentError::invalid(format!(
                            "{}: iothread {t}, but volume {by} names iothread {other}: every scsi disk is on the one \
                             virtio-scsi controller, which has one iothread",
                            disk()
                        )))
                    }
                    _ => scsi_iothread = Some((t, &v.uuid)),
                }
            }
        }
        if let Some(tune) = &v.iotune {
            tune.check().map_err(|e| AgentError::invalid(format!("{}: iotune: {e}", disk())))?;
        }
    }
    Ok(())
}

/// The iothread of the virtio-scsi controller: the one its disks name, if any.
pub fn scsi_iothread(spec: &VmSpec) -> Option<u32> {
    spec.volumes.iter().filter(|v| v.bus == Bus::Scsi).find_map(|v| v.iothread)
}
