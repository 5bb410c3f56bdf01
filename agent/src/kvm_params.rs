//! The `kvm` module parameters `/host/connect` carries. `ignore_msrs` is a runtime parameter and
//! is set; EPT (`kvm_intel`'s `ept`) is only read: changing it means unloading `kvm_intel`, which
//! fails with VMs running and must not be done behind them, so a difference is for the operator.

use std::path::{Path, PathBuf};

/// Where the kernel shows module parameters.
pub const SYS_MODULE: &str = "/sys/module";

#[derive(Debug, thiserror::Error)]
pub enum ParamError {
    #[error("{} is absent: the kvm module is not loaded or has no such parameter", path.display())]
    Absent { path: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} reads {value:?}, not a boolean parameter", path.display())]
    NotBoolean { path: PathBuf, value: String },
    #[error("cannot write {}: {source}; set it as root (or with `options kvm ignore_msrs=...` in /etc/modprobe.d)", path.display())]
    Write { path: PathBuf, source: std::io::Error },
}

fn read_bool(path: &Path) -> Result<bool, ParamError> {
    let value = std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ParamError::Absent { path: path.to_owned() },
        _ => ParamError::Read { path: path.to_owned(), source },
    })?;
    match value.trim() {
        "Y" | "y" | "1" => Ok(true),
        "N" | "n" | "0" => Ok(false),
        other => Err(ParamError::NotBoolean { path: path.to_owned(), value: other.to_owned() }),
    }
}

/// Sets `kvm`'s `ignore_msrs` to `want`, writing only when it differs. Returns whether it
/// changed.
pub fn set_ignore_msrs(modules: &Path, want: bool) -> Result<bool, ParamError> {
    let path = modules.join("kvm/parameters/ignore_msrs");
    if read_bool(&path)? == want {
        return Ok(false);
    }
    std::fs::write(&path, if want { "Y" } else { "N" }).map_err(|source| ParamError::Write { path, source })?;
    Ok(true)
}

/// How `kvm_intel`'s EPT compares with what the management node wants.
#[derive(Debug, PartialEq, Eq)]
pub enum Ept {
    /// No `kvm_intel` loaded (an AMD host, or no KVM): nothing to decide.
    NotApplicable,
    AsWanted,
    /// EPT is `enabled` now, the other way from what was asked.
    Differs {
        enabled: bool,
    },
}

pub fn check_ept(modules: &Path, want_enabled: bool) -> Result<Ept, ParamError> {
    match read_bool(&modules.join("kvm_intel/parameters/ept")) {
        Err(ParamError::Absent { .. }) => Ok(Ept::NotApplicable),
        Err(e) => Err(e),
        Ok(enabled) if enabled == want_enabled => Ok(Ept::AsWanted),
        Ok(enabled) => Ok(Ept::Differs { enabled }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(ignore_msrs: Option<&str>, ept: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (module, name, value) in [("kvm", "ignore_msrs", ignore_msrs), ("kvm_intel", "ept", ept)] {
            if let Some(v) = value {
                let p = dir.path().join(module).join("parameters");
                std::fs::create_dir_all(&p).unwrap();
                std::fs::write(p.join(name), v).unwrap();
            }
        }
        dir
    }

    #[test]
    fn ignore_msrs_is_written_only_when_it_differs() {
        let dir = modules(Some("N\n"), None);
        let file = dir.path().join("kvm/parameters/ignore_msrs");
        assert!(!set_ignore_msrs(dir.path(), false).unwrap());
        assert!(set_ignore_msrs(dir.path(), true).unwrap());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "Y");
        assert!(!set_ignore_msrs(dir.path(), true).unwrap());
    }

    #[test]
    fn a_missing_or_strange_ignore_msrs_is_an_error_that_names_the_file() {
        let none = modules(None, None);
        let e = set_ignore_msrs(none.path(), true).unwrap_err();
        assert!(matches!(e, ParamError::Absent { .. }) && e.to_string().contains("ignore_msrs"), "{e}");
        let odd = modules(Some("maybe"), None);
        assert!(matches!(set_ignore_msrs(odd.path(), true).unwrap_err(), ParamError::NotBoolean { .. }));
        assert_eq!(std::fs::read_to_string(odd.path().join("kvm/parameters/ignore_msrs")).unwrap(), "maybe");
    }

    #[test]
    fn ept_is_compared_never_changed() {
        assert_eq!(check_ept(modules(None, None).path(), true).unwrap(), Ept::NotApplicable);
        let on = modules(None, Some("Y\n"));
        assert_eq!(check_ept(on.path(), true).unwrap(), Ept::AsWanted);
        assert_eq!(check_ept(on.path(), false).unwrap(), Ept::Differs { enabled: true });
        assert_eq!(std::fs::read_to_string(on.path().join("kvm_intel/parameters/ept")).unwrap(), "Y\n");
        assert_eq!(check_ept(modules(None, Some("0")).path(), false).unwrap(), Ept::AsWanted);
    }
}
