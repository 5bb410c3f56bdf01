//! The checks a domain's values need. Text that XML can carry is escaped, not refused; what it
//! cannot carry (control characters) is refused. (A whole StartVmCmd is checked as it is decoded
//! into the model, in [`crate::wire::vm_model`].)

use std::path::Path;

use crate::error::{AgentError, AgentResult};
use crate::model::VmSpec;
use crate::storage::location::Location;

fn invalid(msg: String) -> AgentError {
    AgentError::invalid(msg)
}

/// The longest text a field of a VM may hold (names, serials, passwords, paths).
pub const MAX_TEXT: usize = 4096;

/// Text a domain definition can carry: at most [`MAX_TEXT`] bytes, and none of the characters
/// XML 1.0 cannot carry at all (escaping does not help).
pub fn xml_safe(field: &str, value: &str) -> AgentResult<()> {
    if value.len() > MAX_TEXT {
        return Err(invalid(format!("{field} is {} bytes long; at most {MAX_TEXT} are taken", value.len())));
    }
    match value.chars().find(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) {
        Some(c) => Err(invalid(format!(
            "{field} contains the control character U+{:04X}, which a domain definition cannot carry",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// VM uuids are 32 hex characters: the domain name.
pub fn check_uuid(uuid: &str) -> AgentResult<()> {
    if crate::libvirt::domains::is_vm_name(uuid) {
        Ok(())
    } else {
        Err(invalid(format!("VM uuid {uuid:?} must be 32 hexadecimal characters")))
    }
}

/// A Linux interface name: 1–15 bytes, no `/`, whitespace or `:`.
pub fn is_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Every local file the domain would open, for the caller to confine to the storage roots.
pub fn file_paths(spec: &VmSpec) -> Vec<&Path> {
    let disks = spec.volumes.iter().filter_map(|v| match &v.location {
        Location::File(p) => Some(p.as_path()),
        Location::Rbd(_) => None,
    });
    let isos = spec.cd_roms.iter().filter_map(|c| c.iso.as_deref()).map(Path::new);
    let kernel = spec.kernel_boot.iter().flat_map(|k| [k.kernel.as_str(), k.initrd.as_str()]).filter(|p| !p.is_empty());
    disks.chain(isos).chain(kernel.map(Path::new)).collect()
}
