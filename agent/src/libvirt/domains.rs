//! Domain-level calls: look-up, state, define/start, stop, undefine, live XML.

use super::rpc::{Connection, DeviceCall, Domain};
use super::{Libvirt, LibvirtError};

/// libvirt's `virDomainState` values.
const RUNNING: i32 = 1;
const BLOCKED: i32 = 2;
const PAUSED: i32 = 3;
const SHUTDOWN: i32 = 4;
const SHUTOFF: i32 = 5;
const CRASHED: i32 = 6;
const PMSUSPENDED: i32 = 7;

/// `VIR_DOMAIN_START_PAUSED`.
const START_PAUSED: u32 = 1;
/// `virDomainUndefineFlagsValues`.
const UNDEFINE_MANAGED_SAVE: u32 = 1;
const UNDEFINE_SNAPSHOTS_METADATA: u32 = 2;
const UNDEFINE_KEEP_NVRAM: u32 = 8;
const UNDEFINE_CHECKPOINTS_METADATA: u32 = 16;
const UNDEFINE_TPM: u32 = 32;
const UNDEFINE_KEEP_TPM: u32 = 64;
/// `virDomainModificationImpact`.
const AFFECT_LIVE: u32 = 1;
const AFFECT_CONFIG: u32 = 2;
/// `virDomainSnapshotCreateFlags`.
const SNAPSHOT_NO_METADATA: u32 = 4;
const SNAPSHOT_DISK_ONLY: u32 = 16;
const SNAPSHOT_REUSE_EXT: u32 = 32;
const SNAPSHOT_ATOMIC: u32 = 128;

/// A domain's state in the management plane's vocabulary (`/vm/vmsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum VmState {
    Running,
    Paused,
    Shutdown,
    Crashed,
    Suspended,
    NoState,
}

impl VmState {
    fn from_libvirt(s: i32) -> VmState {
        match s {
            RUNNING | BLOCKED => VmState::Running,
            PAUSED => VmState::Paused,
            SHUTDOWN | SHUTOFF => VmState::Shutdown,
            CRASHED => VmState::Crashed,
            PMSUSPENDED => VmState::Suspended,
            _ => VmState::NoState,
        }
    }

    pub fn is_active(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused | VmState::Suspended)
    }
}

/// A domain the agent manages: its name is a 32-hex VM uuid.
pub fn is_vm_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The state of `d` and whether it is in the middle of shutting down.
fn state_of(c: &Connection, d: &Domain) -> Result<(VmState, bool), LibvirtError> {
    let s = c.domain_state(d)?;
    Ok((VmState::from_libvirt(s), s == SHUTDOWN))
}

impl Libvirt {
    /// The state of domain `name`, or `None` when no such domain is defined.
    pub async fn domain_state(&self, name: &str) -> Result<Option<VmState>, LibvirtError> {
        let name = name.to_owned();
        let r = self.call("getState", move |c| state_of(c, &c.lookup_domain(&name)?).map(|(s, _)| s)).await;
        match r {
            Err(e) if e.is_no_domain() => Ok(None),
            other => other.map(Some),
        }
    }

    /// Every managed domain with its state, plus the ones in the middle of shutting down.
    pub async fn list_vm_states(&self) -> Result<(Vec<(String, VmState)>, Vec<String>), LibvirtError> {
        self.call("listAllDomains", |c| {
            let mut states = Vec::new();
            let mut shutting = Vec::new();
            for d in c.list_all_domains()? {
                if !is_vm_name(&d.name) {
                    continue;
                }
                // A domain can vanish between the listing and this call; skip it.
                let Ok((state, in_shutdown)) = state_of(c, &d) else {
                    continue;
                };
                if in_shutdown {
                    shutting.push(d.name.clone());
                }
                states.push((d.name, state));
            }
            Ok((states, shutting))
        })
        .await
    }

    /// Defines the domain persistently from `xml`.
    pub async fn define(&self, xml: String) -> Result<(), LibvirtError> {
        self.call("defineXML", move |c| c.define_domain(&xml)).await
    }

    /// Starts the defined domain `name`, paused when asked.
    pub async fn start(&self, name: &str, paused: bool) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        let flags = if paused { START_PAUSED } else { 0 };
        self.call("create", move |c| {
            let d = c.lookup_domain(&name)?;
            if state_of(c, &d)?.0.is_active() {
                return Ok(());
            }
            c.create_domain(&d, flags)
        })
        .await
    }

    /// The live (or, when stopped, the persistent) XML of `name`.
    pub async fn xml(&self, name: &str) -> Result<String, LibvirtError> {
        let name = name.to_owned();
        self.call("getXMLDesc", move |c| c.domain_xml(&c.lookup_domain(&name)?)).await
    }

    /// Hard power-off; a domain that is not running is left as it is.
    pub async fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call("destroy", move |c| {
            let d = c.lookup_domain(&name)?;
            if !state_of(c, &d)?.0.is_active() {
                return Ok(());
            }
            c.destroy_domain(&d)
        })
        .await
    }

    /// Asks the guest to shut down (ACPI); returns at once.
    pub async fn shutdown(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call("shutdown", move |c| {
            let d = c.lookup_domain(&name)?;
            if !state_of(c, &d)?.0.is_active() {
                return Ok(());
            }
            c.shutdown_domain(&d)
        })
        .await
    }

    /// Removes the persistent definition (with its managed-save image and snapshot metadata).
    /// NVRAM is kept: the file is the agent's (see `ops::nvram`), and libvirt refuses to undefine
    /// a domain with NVRAM unless told what to do with it. TPM state is removed only when `remove_tpm_state`; otherwise it stays for a later
    /// start under the same uuid. A missing domain is success.
    pub async fn undefine(&self, name: &str, remove_tpm_state: bool) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        let tpm = if remove_tpm_state { UNDEFINE_TPM } else { UNDEFINE_KEEP_TPM };
        let flags = UNDEFINE_MANAGED_SAVE
            | UNDEFINE_SNAPSHOTS_METADATA
            | UNDEFINE_CHECKPOINTS_METADATA
            | UNDEFINE_KEEP_NVRAM
            | tpm;
        let r = self.call("undefine", move |c| c.undefine_domain(&c.lookup_domain(&name)?, flags)).await;
        match r {
            Err(e) if e.is_no_domain() => Ok(()),
            other => other,
        }
    }
}

impl Libvirt {
    /// Makes `change` with the device `xml` describes on the running domain `name`, and on its
    /// persistent definition too when it has one (so that both keep describing the same VM).
    pub async fn change_device(&self, name: &str, change: DeviceCall, xml: String) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call(change.name(), move |c| {
            let d = c.lookup_domain(&name)?;
            let flags = AFFECT_LIVE | if c.domain_is_persistent(&d)? { AFFECT_CONFIG } else { 0 };
            c.change_device(change, &d, &xml, flags)
        })
        .await
    }

    pub async fn suspend(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call("suspend", move |c| c.suspend_domain(&c.lookup_domain(&name)?)).await
    }

    pub async fn resume(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call("resume", move |c| c.resume_domain(&c.lookup_domain(&name)?)).await
    }

    /// Switches some disks of the running domain to pre-created qcow2 overlays on their current
    /// images, all at one instant (atomic, disk-only, external, no libvirt snapshot metadata).
    /// `disks` lists every disk target of the domain with its new top file, or `None` to leave
    /// it alone: an unlisted disk would get libvirt's default, an external snapshot of its own.
    /// From that instant on the old images are no longer written.
    pub async fn snapshot_disks(&self, name: &str, disks: Vec<(String, Option<String>)>) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        let mut xml = String::from("<domainsnapshot><disks>");
        for (dev, file) in &disks {
            let dev = crate::domain::xml_escape(dev);
            match file {
                Some(f) => xml.push_str(&format!(
                    "<disk name='{dev}' snapshot='external' type='file'><driver type='qcow2'/><source file='{}'/></disk>",
                    crate::domain::xml_escape(f)
                )),
                None => xml.push_str(&format!("<disk name='{dev}' snapshot='no'/>")),
            }
        }
        xml.push_str("</disks></domainsnapshot>");
        let flags = SNAPSHOT_DISK_ONLY | SNAPSHOT_REUSE_EXT | SNAPSHOT_NO_METADATA | SNAPSHOT_ATOMIC;
        self.call("snapshotCreateXML", move |c| c.create_snapshot(&c.lookup_domain(&name)?, &xml, flags)).await
    }
}
