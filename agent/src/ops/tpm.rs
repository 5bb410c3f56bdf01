//! TPM state: libvirt keeps a VM's swtpm state in `<swtpm dir>/<dashed uuid>/`; a clone gets a
//! copy under its own uuid, so it boots with the source's TPM contents (sealed keys, PCR policy).

use std::path::{Path, PathBuf};

use crate::domain::dashed_uuid;
use crate::error::{AgentError, AgentResult};
use crate::stop::Stop;

pub fn state_dir(swtpm_dir: &Path, vm: &str) -> PathBuf {
    swtpm_dir.join(dashed_uuid(vm))
}

/// Copies the TPM state directory `from` to `to` (which must not exist), keeping modes and
/// owners. Returns false when `from` does not exist (a VM never started has no TPM state).
pub async fn copy_state(from: &Path, to: &Path, stop: &Stop) -> AgentResult<bool> {
    if !from.is_dir() {
        return Ok(false);
    }
    if to.exists() {
        return Err(AgentError::conflict(format!("TPM state {} already exists", to.display())));
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(|e| {
            AgentError::failed("cannot create the TPM state directory", format!("{}: {e}", parent.display()))
        })?;
    }
    let (f, t) = (from.as_os_str(), to.as_os_str());
    crate::process::run("cp", &[std::ffi::OsStr::new("-a"), std::ffi::OsStr::new("--"), f, t], stop)
        .await
        .map_err(|e| AgentError::failed("cannot copy the TPM state", e.to_string()))?;
    Ok(true)
}
