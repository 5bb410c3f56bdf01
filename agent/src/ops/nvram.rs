//! UEFI variable stores (NVRAM). Each UEFI VM has its own file, made by the agent from the
//! firmware's template (or, for a clone, from its source's store) and referenced by the domain's
//! `<nvram>`: `<vm uuid>.nvram.fd` beside the root volume, or, for an RBD root, in
//! `[uefi] nvram_dir` (by default `nvram/` in the first storage root). The path is recorded with
//! the VM and kept for its life (a change of image keeps it); libvirt only uses the file
//! (undefine keeps it) and the agent removes it with the VM.

use std::path::{Path, PathBuf};

use super::undo::{UndoLog, UndoStep};
use crate::app::App;
use crate::config::UefiConfig;
use crate::error::{AgentError, AgentResult};
use crate::model::{Firmware, VmSpec};
use crate::storage::local::Building;
use crate::storage::location::Location;

/// Refuses `firmware` when this host lacks one of its files, naming the file.
pub fn check_firmware(config: &UefiConfig, firmware: Firmware) -> AgentResult<()> {
    let Some((code, vars)) = config.files(firmware) else { return Ok(()) };
    for file in [code, vars] {
        if !file.is_file() {
            return Err(AgentError::invalid(format!(
                "firmware {}: the UEFI firmware file {} is missing on this host; install Debian's ovmf package \
                 (it provides the default files) or set [uefi] in the agent configuration",
                serde_json::to_string(&firmware).unwrap_or_default(),
                file.display()
            )));
        }
    }
    Ok(())
}

/// Gives a UEFI `spec` its NVRAM path: `previous` (the path the VM's record has), else a new
/// one beside its root volume. A BIOS spec has none.
pub fn assign(app: &App, spec: &mut VmSpec, previous: Option<&Path>) -> AgentResult<()> {
    spec.nvram = match (spec.firmware.is_uefi(), previous) {
        (false, _) => None,
        (true, Some(p)) => Some(p.to_owned()),
        (true, None) => Some(new_path(app, spec)?),
    };
    Ok(())
}

fn new_path(app: &App, spec: &VmSpec) -> AgentResult<PathBuf> {
    let name = format!("{}.nvram.fd", spec.uuid);
    let dir = match &spec.root().location {
        Location::File(root) => root.parent().map(Path::to_owned),
        Location::Rbd(_) => {
            (app.config.uefi.nvram_dir.clone()).or_else(|| app.storage.roots().roots().first().map(|r| r.join("nvram")))
        }
    }
    .ok_or_else(|| AgentError::internal(format!("no directory for the NVRAM of VM {}", spec.uuid)))?;
    Ok(app.storage.roots().confine(&dir.join(name).display().to_string())?)
}

/// Makes the NVRAM file of `spec` unless it exists: a copy of `from` (another VM's store, when
/// that exists) or of the firmware's template, built beside and linked into place. Its removal
/// is recorded in `undo` first.
pub async fn make(app: &App, spec: &VmSpec, from: Option<&Path>, undo: &mut UndoLog) -> AgentResult<()> {
    let (Some(dst), Some((_, template))) = (&spec.nvram, app.config.uefi.files(spec.firmware)) else {
        return Ok(());
    };
    if dst.exists() {
        return Ok(());
    }
    check_firmware(&app.config.uefi, spec.firmware)?;
    let src = from.filter(|f| f.is_file()).unwrap_or(template).to_owned();
    let dst = dst.clone();
    undo.push(UndoStep::RemoveFile { path: dst.clone() });
    tokio::task::spawn_blocking(move || copy_into_place(&src, &dst))
        .await
        .map_err(|e| AgentError::internal(format!("copying an NVRAM file: {e}")))?
        .map_err(|e| e.context("step 'make NVRAM' failed"))
}

/// Copies the store `src` to `dst` (which must not exist), built beside and linked into place.
pub fn copy_into_place(src: &Path, dst: &Path) -> AgentResult<()> {
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::failed("cannot create the NVRAM directory", format!("{}: {e}", dir.display())))?;
    }
    let building = Building::beside(dst);
    std::fs::copy(src, building.path()).map_err(|e| {
        AgentError::failed("cannot copy the NVRAM", format!("{} to {}: {e}", src.display(), dst.display()))
    })?;
    building.publish(dst)
}

/// Removes the NVRAM file of `spec`, if it has one.
pub fn remove(spec: &VmSpec) -> AgentResult<()> {
    let Some(path) = &spec.nvram else { return Ok(()) };
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(AgentError::failed("cannot remove the NVRAM", format!("{}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}
