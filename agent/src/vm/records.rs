//! The last spec of every VM this agent started or created, kept in `state_dir/vms/<uuid>.json`
//! (written atomically), so that operations naming only a `vmUuid` (clone, change image) know
//! the VM's volumes, NICs and devices even while it is stopped and has no domain.

use std::path::{Path, PathBuf};

use crate::api::vm::StartVmCmd;
use crate::atomic_file;
use crate::error::{AgentError, AgentResult};

#[derive(Debug, Clone)]
pub struct VmRecords {
    dir: PathBuf,
}

impl VmRecords {
    pub fn new(state_dir: &Path) -> Self {
        VmRecords { dir: state_dir.join("vms") }
    }

    fn file(&self, vm: &str) -> PathBuf {
        // Callers pass validated 32-hex uuids only.
        self.dir.join(format!("{vm}.json"))
    }

    pub fn save(&self, spec: &StartVmCmd) -> AgentResult<()> {
        atomic_file::write_json(&self.file(&spec.vm_instance_uuid), spec)
            .map_err(|e| AgentError::failed("cannot record the VM", format!("{}: {e}", self.dir.display())))
    }

    /// The VM's recorded spec; a NotFound error when this host has none.
    pub fn load(&self, vm: &str) -> AgentResult<StartVmCmd> {
        crate::domain::check_uuid(vm)?;
        match atomic_file::read_json::<StartVmCmd>(&self.file(vm)) {
            Ok(Some(spec)) => Ok(spec),
            Ok(None) => {
                Err(AgentError::not_found(format!("VM {vm} is not known to this host; start or create it here first")))
            }
            Err(e) => Err(AgentError::failed("cannot read the VM record", format!("{vm}: {e}"))),
        }
    }

    pub fn remove(&self, vm: &str) {
        let _ = std::fs::remove_file(self.file(vm));
    }
}
