//! Domain-level calls: look-up, state, define/start, stop, undefine, live XML.

use virt::domain::Domain;
use virt::sys;

use super::{Libvirt, LibvirtError};

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
    fn from_libvirt(s: sys::virDomainState) -> VmState {
        match s {
            sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => VmState::Running,
            sys::VIR_DOMAIN_PAUSED => VmState::Paused,
            sys::VIR_DOMAIN_SHUTDOWN | sys::VIR_DOMAIN_SHUTOFF => VmState::Shutdown,
            sys::VIR_DOMAIN_CRASHED => VmState::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => VmState::Suspended,
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

pub(super) fn lookup(c: &virt::connect::Connect, name: &str) -> Result<Domain, LibvirtError> {
    c.lookup_domain_by_name(name).map_err(|e| LibvirtError::from_virt("lookupByName", e))
}

fn state_of(d: &Domain) -> Result<(VmState, bool), LibvirtError> {
    let (s, _reason) = d.state().map_err(|e| LibvirtError::from_virt("getState", e))?;
    let s = s.to_raw();
    let shutting_down = s == sys::VIR_DOMAIN_SHUTDOWN;
    Ok((VmState::from_libvirt(s), shutting_down))
}

impl Libvirt {
    /// The state of domain `name`, or `None` when no such domain is defined.
    pub async fn domain_state(&self, name: &str) -> Result<Option<VmState>, LibvirtError> {
        let name = name.to_owned();
        let r = self.call("getState", move |c| state_of(&lookup(c, &name)?).map(|(s, _)| s)).await;
        match r {
            Err(e) if e.is_no_domain() => Ok(None),
            other => other.map(Some),
        }
    }

    /// Every managed domain with its state, plus the ones in the middle of shutting down.
    pub async fn list_vm_states(&self) -> Result<(Vec<(String, VmState)>, Vec<String>), LibvirtError> {
        self.call("listAllDomains", |c| {
            let domains = c.list_all_domains(0).map_err(|e| LibvirtError::from_virt("listAllDomains", e))?;
            let mut states = Vec::new();
            let mut shutting = Vec::new();
            for d in domains {
                let Ok(name) = d.name() else { continue };
                if !is_vm_name(&name) {
                    continue;
                }
                // A domain can vanish between the listing and this call; skip it.
                let Ok((state, in_shutdown)) = state_of(&d) else {
                    continue;
                };
                if in_shutdown {
                    shutting.push(name.clone());
                }
                states.push((name, state));
            }
            Ok((states, shutting))
        })
        .await
    }

    /// Defines the domain persistently from `xml`.
    pub async fn define(&self, xml: String) -> Result<(), LibvirtError> {
        self.call("defineXML", move |c| {
            c.define_domain_xml(&xml).map(|_| ()).map_err(|e| LibvirtError::from_virt("defineXML", e))
        })
        .await
    }

    /// Starts the defined domain `name`, paused when asked.
    pub async fn start(&self, name: &str, paused: bool) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        let flags = if paused { sys::VIR_DOMAIN_START_PAUSED } else { 0 };
        self.call("create", move |c| {
            let d = lookup(c, &name)?;
            if state_of(&d)?.0.is_active() {
                return Ok(());
            }
            d.create_with_flags(flags).map(|_| ()).map_err(|e| LibvirtError::from_virt("create", e))
        })
        .await
    }

    /// The live (or, when stopped, the persistent) XML of `name`.
    pub async fn xml(&self, name: &str) -> Result<String, LibvirtError> {
        let name = name.to_owned();
        self.call("getXMLDesc", move |c| {
            lookup(c, &name)?.xml_desc(0).map_err(|e| LibvirtError::from_virt("getXMLDesc", e))
        })
        .await
    }

    /// Hard power-off; a domain that is not running is left as it is.
    pub async fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call("destroy", move |c| {
            let d = lookup(c, &name)?;
            if !state_of(&d)?.0.is_active() {
                return Ok(());
            }
            d.destroy().map_err(|e| LibvirtError::from_virt("destroy", e))
        })
        .await
    }

    /// Asks the guest to shut down (ACPI); returns at once.
    pub async fn shutdown(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call("shutdown", move |c| {
            let d = lookup(c, &name)?;
            if !state_of(&d)?.0.is_active() {
                return Ok(());
            }
            d.shutdown().map_err(|e| LibvirtError::from_virt("shutdown", e))
        })
        .await
    }

    /// Removes the persistent definition (with its managed-save image and snapshot metadata).
    /// NVRAM is kept: the file is the agent's (see `ops::nvram`), and libvirt refuses to undefine
    /// a domain with NVRAM unless told what to do with it. TPM state is removed only when `remove_tpm_state`; otherwise it stays for a later
    /// start under the same uuid. A missing domain is success.
    pub async fn undefine(&self, name: &str, remove_tpm_state: bool) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        let tpm = if remove_tpm_state { sys::VIR_DOMAIN_UNDEFINE_TPM } else { sys::VIR_DOMAIN_UNDEFINE_KEEP_TPM };
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
            | tpm;
        let r = self
            .call("undefine", move |c| {
                lookup(c, &name)?.undefine_flags(flags).map_err(|e| LibvirtError::from_virt("undefine", e))
            })
            .await;
        match r {
            Err(e) if e.is_no_domain() => Ok(()),
            other => other,
        }
    }
}

/// A change to one device of a running domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChange {
    Attach,
    Detach,
    Update,
}

impl DeviceChange {
    fn call(self) -> &'static str {
        match self {
            DeviceChange::Attach => "attachDeviceFlags",
            DeviceChange::Detach => "detachDeviceFlags",
            DeviceChange::Update => "updateDeviceFlags",
        }
    }
}

impl Libvirt {
    /// Makes `change` with the device `xml` describes on the running domain `name`, and on its
    /// persistent definition too when it has one (so that both keep describing the same VM).
    pub async fn change_device(&self, name: &str, change: DeviceChange, xml: String) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        let call = change.call();
        self.call(call, move |c| {
            let d = lookup(c, &name)?;
            let persistent = d.is_persistent().map_err(|e| LibvirtError::from_virt("isPersistent", e))?;
            let flags = sys::VIR_DOMAIN_AFFECT_LIVE | if persistent { sys::VIR_DOMAIN_AFFECT_CONFIG } else { 0 };
            match change {
                DeviceChange::Attach => d.attach_device_flags(&xml, flags),
                DeviceChange::Detach => d.detach_device_flags(&xml, flags),
                DeviceChange::Update => d.update_device_flags(&xml, flags),
            }
            .map_err(|e| LibvirtError::from_virt(call, e))
        })
        .await
    }

    pub async fn suspend(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call("suspend", move |c| lookup(c, &name)?.suspend().map_err(|e| LibvirtError::from_virt("suspend", e)))
            .await
    }

    pub async fn resume(&self, name: &str) -> Result<(), LibvirtError> {
        let name = name.to_owned();
        self.call("resume", move |c| lookup(c, &name)?.resume().map_err(|e| LibvirtError::from_virt("resume", e))).await
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
        let flags = sys::VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC;
        self.call("snapshotCreateXML", move |c| {
            lookup(c, &name)?
                .create_snapshot_xml(&xml, flags)
                .map(|_| ())
                .map_err(|e| LibvirtError::from_virt("snapshotCreateXML", e))
        })
        .await
    }
}
