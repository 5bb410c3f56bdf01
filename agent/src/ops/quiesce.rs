//! Quiescing a running guest for a capture: its filesystems are frozen through the guest agent
//! (flushed and held still) for the capture instant only, so that the capture is what a clean
//! shutdown would leave rather than what a power cut would. Not to be confused with
//! [`super::freeze`], which freezes volumes (files) under a VM.
//!
//! The thaw is a journaled undo step recorded before the freeze: a failed capture thaws, and
//! an agent killed while the guest is frozen thaws it at its next start (thawing a guest that
//! is not frozen changes nothing).

use std::time::Duration;

use super::owner::VmGuard;
use super::undo::{UndoLog, UndoStep};
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::libvirt::domains::VmState;
use crate::wire::native::Quiesce;

/// How long a freeze or thaw waits for the guest agent's answer (the freeze flushes the
/// guest's dirty data first).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A guest held frozen; [`Quiesced::thaw`] ends it.
pub struct Quiesced {
    thaw: UndoLog,
}

impl Quiesced {
    pub async fn thaw(self, app: &App, owner: &VmGuard) {
        self.thaw.rollback(app, owner).await;
    }
}

/// Freezes the filesystems of VM `owner`, in state `state`, as `mode` asks; `None` when the
/// capture goes on crash-consistent. A VM that is not running is captured as it is.
pub async fn quiesce(
    app: &App,
    owner: &VmGuard,
    mode: Quiesce,
    state: Option<VmState>,
    task_id: &str,
) -> AgentResult<Option<Quiesced>> {
    let vm = owner.uuid();
    let required = |why: String| {
        AgentError::failed(
            format!("cannot quiesce VM {vm}"),
            format!("{why}; start the guest agent in the VM, or capture with quiesce 'auto' or 'off'"),
        )
    };
    match state {
        _ if mode == Quiesce::Off => return Ok(None),
        None => return Ok(None),
        Some(s) if !s.is_active() => return Ok(None),
        Some(VmState::Running) => {}
        // A paused guest cannot answer.
        Some(s) if mode == Quiesce::Required => return Err(required(format!("the VM is {s:?}, not running"))),
        Some(_) => return Ok(None),
    }
    if !app.libvirt.guest_agent_connected(vm).await? {
        return match mode {
            Quiesce::Required => Err(required("its guest agent is not connected".into())),
            _ => Ok(None),
        };
    }
    let mut thaw = UndoLog::journaled(app, task_id);
    thaw.push(UndoStep::ThawGuest { vm: vm.to_owned() });
    match app.libvirt.guest_fs_freeze(vm, AGENT_TIMEOUT).await {
        Ok(n) => {
            tracing::info!(vm = %vm, filesystems = n, "guest filesystems frozen for the capture");
            Ok(Some(Quiesced { thaw }))
        }
        Err(e) => {
            // A freeze that timed out may still take effect in the guest.
            thaw.rollback(app, owner).await;
            if mode == Quiesce::Required {
                return Err(required(e.to_string()));
            }
            tracing::warn!(vm = %vm, error = %e, "the guest agent did not freeze the filesystems; the capture is crash-consistent");
            Ok(None)
        }
    }
}

/// Thaws the guest of VM `vm` (the undo of a freeze); a VM that no longer runs has nothing
/// frozen.
pub async fn thaw(app: &App, vm: &str) -> Result<(), String> {
    match app.libvirt.guest_fs_thaw(vm, AGENT_TIMEOUT).await {
        Err(e) if !e.is_no_domain() && !e.is_not_running() => Err(format!("thawing the guest of VM {vm}: {e}")),
        _ => Ok(()),
    }
}
