//! TPM state: libvirt keeps a VM's swtpm state in `<swtpm dir>/<dashed uuid>/`; a clone gets a
//! copy under its own uuid, so it boots with the source's TPM contents (sealed keys, PCR policy).
//!
//! The state may be encrypted (`tpm.key`): libvirt hands swtpm the key from the VM's secret of
//! usage `vtpm` ([`crate::domain::tpm_secret_uuid`]), defined with the domain and removed with
//! the TPM state. A clone's state is a copy, so its own secret gets the same key.

use std::path::{Path, PathBuf};

use super::owner::VmGuard;
use crate::app::App;
use crate::domain::{dashed_uuid, tpm_secret_uuid};
use crate::error::{AgentError, AgentResult};
use crate::model::{TpmKey, VmSpec};
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

/// Sets the key a command gave for `spec`'s TPM state into the VM's secret (before the domain
/// that names it is defined).
pub async fn set_secret(app: &App, spec: &VmSpec) -> AgentResult<()> {
    let Some(TpmKey(key)) = &spec.tpm_key else { return Ok(()) };
    let uuid = tpm_secret_uuid(&spec.uuid);
    app.libvirt
        .set_vtpm_secret(&uuid, &spec.uuid, key.clone())
        .await
        .map_err(|e| AgentError::from(e).context(format!("defining the TPM secret of VM {}", spec.uuid)))
}

/// The key of VM `vm`'s TPM state, read back from its secret (for a clone's own secret).
pub async fn key_of(app: &App, vm: &str) -> AgentResult<TpmKey> {
    let uuid = tpm_secret_uuid(vm);
    match app.libvirt.vtpm_secret_value(&uuid).await? {
        Some(key) => Ok(TpmKey(key)),
        None => Err(AgentError::not_found(format!(
            "the TPM state of VM {vm} is encrypted but its secret {uuid} is gone; it cannot be read"
        ))),
    }
}

/// A start without `tpm.key` of a VM whose TPM state is encrypted keeps it encrypted with the
/// secret it has (the management plane need not send the key again).
pub fn keep_encryption(owner: &VmGuard, spec: &mut VmSpec) {
    if spec.tpm.is_some() && spec.tpm_key.is_none() {
        spec.tpm_encrypted |= owner.load().is_ok_and(|old| old.tpm_encrypted);
    }
}
