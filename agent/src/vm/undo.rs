//! The undo log of a multi-step operation: each step that makes something records how to
//! remove it; on failure the log is played backwards, so the operation leaves nothing behind.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::app::App;

/// One compensation. Plain data, so a log can be written down and replayed after a crash.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum UndoStep {
    /// Delete a file this operation created.
    RemoveFile { path: PathBuf },
    /// Delete an RBD image this operation created.
    RemoveRbdImage { path: String },
    /// Delete a directory tree this operation created (a clone's TPM state).
    RemoveTree { path: PathBuf },
    /// Power off and undefine a domain this operation defined, with its TPM state.
    RemoveDomain { vm: String },
}

#[derive(Debug, Default)]
pub struct UndoLog {
    steps: Vec<UndoStep>,
}

impl UndoLog {
    pub fn push(&mut self, step: UndoStep) {
        self.steps.push(step);
    }

    /// The operation succeeded: nothing is to be undone.
    pub fn commit(mut self) {
        self.steps.clear();
    }

    /// Undoes every step, newest first. Failures are logged and the rest still undone.
    pub async fn rollback(mut self, app: &App) {
        while let Some(step) = self.steps.pop() {
            if let Err(e) = undo(app, &step).await {
                tracing::error!(?step, error = %e, "undo step failed; the resource may be left behind");
            }
        }
    }
}

async fn undo(app: &App, step: &UndoStep) -> Result<(), String> {
    match step {
        UndoStep::RemoveFile { path } => match tokio::fs::remove_file(path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("removing {}: {e}", path.display())),
            _ => Ok(()),
        },
        UndoStep::RemoveRbdImage { path } => {
            let p = crate::ceph::path::CephPath::parse(path).map_err(|e| e.to_string())?;
            match app.rbd.remove(&p, &crate::stop::Stop::new()).await {
                Err(e) if !e.is_not_found() => Err(e.to_string()),
                _ => Ok(()),
            }
        }
        UndoStep::RemoveTree { path } => match tokio::fs::remove_dir_all(path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("removing {}: {e}", path.display())),
            _ => Ok(()),
        },
        UndoStep::RemoveDomain { vm } => {
            match app.libvirt.destroy(vm).await {
                Err(e) if !e.is_no_domain() => return Err(e.to_string()),
                _ => {}
            }
            app.libvirt.undefine(vm, true).await.map_err(|e| e.to_string())
        }
    }
}

impl Drop for UndoLog {
    fn drop(&mut self) {
        if !self.steps.is_empty() {
            tracing::error!(steps = ?self.steps, "an undo log was dropped without commit or rollback");
        }
    }
}
