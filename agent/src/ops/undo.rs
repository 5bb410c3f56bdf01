//! The undo log of a multi-step operation: before each step that makes something, the log
//! records how to remove it; on failure the log is played backwards, so the operation leaves
//! nothing behind. A journaled log is also written to `state_dir/undo/<task>-<n>.json` at every
//! step. The file outlives a commit: it goes only once the task's result is in the task journal
//! ([`discard_journal`]), so an agent killed before that — even after the operation itself
//! completed — plays it back at the next start, and the result it then reports (failed,
//! rolled back) matches what is on the host (see [`crate::recovery`]).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::owner::VmGuard;
use crate::app::App;
use crate::atomic_file;

/// One compensation. Plain data, so a log can be written down and replayed after a crash.
/// Each is recorded before the thing it removes is made, so undoing one that was never made
/// is a no-op.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum UndoStep {
    /// Delete a file this operation created.
    RemoveFile { path: PathBuf },
    /// Delete a volume file this operation created, then the directories it created for it
    /// (from the file's parent up to `new_dirs`), as far as they are empty.
    RemoveVolumeFile { path: PathBuf, new_dirs: Option<PathBuf> },
    /// Delete an RBD image this operation created.
    RemoveRbdImage { path: String },
    /// Unprotect and delete an RBD snapshot this operation took, unless a clone depends on it.
    RemoveRbdSnapshot { path: String },
    /// Delete a directory tree this operation created (a clone's TPM state, a backup group).
    RemoveTree { path: PathBuf },
    /// Power off and undefine a domain this operation defined, with its TPM state and the
    /// secret that state is encrypted with.
    RemoveDomain { vm: String },
    /// `step`, unless the record of VM `vm` names `path` by then: the operation got past the
    /// point where the VM was switched to it (a new root in place), so it stays.
    UnlessRecorded { vm: String, path: String, step: Box<UndoStep> },
    /// `step` (removing `path`, the volume a switch replaces), once the record of VM `vm` no
    /// longer names it: the switch was done, and this finishes it. Before the switch it stays.
    RemoveReplaced { vm: String, path: String, step: Box<UndoStep> },
    /// Forget the record of a VM this operation made.
    RemoveRecord { vm: String },
    /// Define VM `vm`'s stopped domain from its record again: an operation that switches a
    /// stopped VM to new volumes redefines it and then saves the record, and a kill between
    /// the two leaves them apart.
    RedefineFromRecord { vm: String },
    /// Remove a new top a freeze made on `base`, pointing the VM's record back at `base` if it
    /// already names the top (nothing has written to the top while the freeze's task ran).
    RemoveTop { vm: String, top: PathBuf, base: PathBuf },
    /// Commit the temporary tops a backup froze back into the VM's volumes.
    Thaw { vm: String, frozen: Vec<super::freeze::Frozen> },
    /// Forget the points of backup group `dir` (named `group`) from `points` on, which this
    /// operation added to its manifest.
    TruncateBackupGroup { dir: PathBuf, group: String, points: usize },
    /// Remove backup checkpoint `name` of VM `vm` and its bitmap in `files` (those nothing has
    /// open), which a backup point made (see [`super::bitmap_backup`]).
    RemoveBitmap { vm: String, name: String, files: Vec<PathBuf> },
    /// End the backup job this operation started in VM `vm` (abort it, and wait until libvirt
    /// has torn it down) before its target files go: libvirtd 9.0 crashed tearing down a job
    /// whose target had been removed.
    EndBackupJob { vm: String },
    /// Thaw the filesystems of VM `vm`'s guest, which this operation froze through its guest
    /// agent (see [`super::quiesce`]).
    ThawGuest { vm: String },
}

#[derive(Debug, Default)]
pub struct UndoLog {
    steps: Vec<UndoStep>,
    /// Where a journaled log is written.
    file: Option<PathBuf>,
}

/// What follows the task id in the name of a cleanup log ([`UndoLog::cleanup`]).
const CLEANUP: &str = ".cleanup";

pub fn undo_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("undo")
}

impl UndoLog {
    /// A log that is written down at every step, for task `task_id`. Its name orders it among
    /// the task's logs (a creation time), so that recovery undoes the newest first.
    pub fn journaled(app: &App, task_id: &str) -> UndoLog {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let name = format!("{task_id}-{:020}-{}.json", created.as_nanos(), uuid::Uuid::new_v4().simple());
        UndoLog { steps: Vec::new(), file: Some(undo_dir(&app.config.state_dir).join(name)) }
    }

    /// A journaled log of cleanup that task `task_id` leaves to run after its result (what
    /// its committed work made obsolete): recovery plays it whether or not the task finished.
    pub fn cleanup(app: &App, task_id: &str) -> UndoLog {
        UndoLog::journaled(app, &format!("{task_id}{CLEANUP}"))
    }

    pub fn push(&mut self, step: UndoStep) {
        self.push_all([step]);
    }

    /// Pushes `steps` with one write of the journal (none when there are none): steps known
    /// together need not each pay a synced write.
    pub fn push_all(&mut self, steps: impl IntoIterator<Item = UndoStep>) {
        let before = self.steps.len();
        self.steps.extend(steps);
        if self.steps.len() > before {
            self.write();
            #[cfg(test)]
            kill_point::reached();
        }
    }

    fn write(&self) {
        if let Some(f) = &self.file {
            if let Err(e) = atomic_file::write_json(f, &self.steps) {
                tracing::error!(file = %f.display(), error = %e, "cannot journal an undo step; a crash now may leave it behind");
            }
        }
    }

    fn forget(&mut self) {
        self.steps.clear();
        if let Some(f) = self.file.take() {
            let _ = std::fs::remove_file(f);
        }
    }

    /// The operation succeeded: nothing is to be undone, once its task's result is recorded.
    pub fn commit(mut self) {
        self.steps.clear();
        self.file = None;
    }

    /// Undoes every step, newest first, as the owner of VM `vm` (the only VM a log's steps
    /// name). Failures are logged and the rest still undone.
    pub async fn rollback(mut self, app: &App, vm: &VmGuard) {
        replay(app, std::mem::take(&mut self.steps), &[vm]).await;
        self.forget();
    }

    /// Like [`rollback`](Self::rollback), for a log whose steps name no VM (storage paths).
    pub async fn rollback_storage(mut self, app: &App) {
        replay(app, std::mem::take(&mut self.steps), &[]).await;
        self.forget();
    }
}

/// Runs `make` with `removal` (how to remove what it makes, when it makes something new)
/// journaled first for task `task_id`: a failure, or a kill before the task's result is
/// recorded, undoes it. For storage steps, which name no VM.
pub async fn journaled<T>(
    app: &App,
    task_id: &str,
    removal: Option<UndoStep>,
    make: impl std::future::Future<Output = crate::error::AgentResult<T>>,
) -> crate::error::AgentResult<T> {
    let mut undo = UndoLog::journaled(app, task_id);
    if let Some(step) = removal {
        undo.push(step);
    }
    match make.await {
        Ok(made) => {
            undo.commit();
            Ok(made)
        }
        Err(e) => {
            undo.rollback_storage(app).await;
            Err(e)
        }
    }
}

impl UndoStep {
    /// Whether undoing this step removes an RBD image or snapshot.
    pub fn touches_rbd(&self) -> bool {
        match self {
            UndoStep::RemoveRbdImage { .. } | UndoStep::RemoveRbdSnapshot { .. } => true,
            UndoStep::UnlessRecorded { step, .. } | UndoStep::RemoveReplaced { step, .. } => step.touches_rbd(),
            _ => false,
        }
    }

    /// The VM whose record or domain this step touches: its lock must be held to undo it.
    pub fn vm(&self) -> Option<&str> {
        match self {
            UndoStep::RemoveDomain { vm }
            | UndoStep::UnlessRecorded { vm, .. }
            | UndoStep::RemoveReplaced { vm, .. }
            | UndoStep::RemoveRecord { vm }
            | UndoStep::RedefineFromRecord { vm }
            | UndoStep::RemoveTop { vm, .. }
            | UndoStep::Thaw { vm, .. }
            | UndoStep::RemoveBitmap { vm, .. }
            | UndoStep::EndBackupJob { vm }
            | UndoStep::ThawGuest { vm } => Some(vm),
            _ => None,
        }
    }
}

/// What playing an undo log back did not undo.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Steps that could not be undone (their resources stay), and why.
    pub failed: Vec<String>,
    /// What an operation past its point of no return had made, kept rather than undone.
    pub kept: Vec<String>,
}

/// Undoes `steps`, newest first, holding the VMs they name.
pub async fn replay(app: &App, mut steps: Vec<UndoStep>, held: &[&VmGuard]) -> Replayed {
    let mut replayed = Replayed::default();
    while let Some(step) = steps.pop() {
        let owner = step.vm().map(|vm| held.iter().find(|g| g.uuid() == vm).copied().ok_or(vm));
        let done = match owner {
            Some(Err(vm)) => Err(format!("VM {vm} is not held by this undo; its step was left alone")),
            Some(Ok(g)) => undo_or_keep(app, &step, Some(g)).await,
            None => undo_or_keep(app, &step, None).await,
        };
        match done {
            Ok(None) => {}
            Ok(Some(kept)) => replayed.kept.push(kept),
            Err(e) => {
                tracing::error!(?step, error = %e, "undo step failed; the resource may be left behind");
                replayed.failed.push(e);
            }
        }
    }
    replayed
}

/// Removes the journaled logs of task `task_id`, whose result is now recorded.
pub fn discard_journal(state_dir: &Path, task_id: &str) {
    let Ok(entries) = std::fs::read_dir(undo_dir(state_dir)) else { return };
    let prefix = format!("{task_id}-");
    for e in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)) {
        let _ = std::fs::remove_file(e.path());
    }
}

/// A journaled log that a killed agent left: the task it belonged to and its steps.
pub struct Leftover {
    pub task_id: String,
    pub file: PathBuf,
    pub steps: Vec<UndoStep>,
    /// A cleanup log ([`UndoLog::cleanup`]): played even when its task finished.
    pub cleanup: bool,
}

/// Every journaled log in `state_dir`, each task's newest first (a later log may hold what
/// depends on an earlier one's: a clone on a temporary snapshot). Unreadable ones are logged
/// and skipped; torn writes are removed.
pub fn leftovers(state_dir: &Path) -> Vec<Leftover> {
    let Ok(entries) = std::fs::read_dir(undo_dir(state_dir)) else { return Vec::new() };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let file = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(task_id) = name.strip_suffix(".json").and_then(|n| n.split_once('-')).map(|(t, _)| t.to_owned())
        else {
            // A write torn by the kill; the log's previous version is the `.json` beside it.
            let _ = std::fs::remove_file(&file);
            continue;
        };
        match atomic_file::read_json::<Vec<UndoStep>>(&file) {
            Ok(Some(steps)) => {
                let (task_id, cleanup) = match task_id.strip_suffix(CLEANUP) {
                    Some(t) => (t.to_owned(), true),
                    None => (task_id, false),
                };
                out.push(Leftover { task_id, file, steps, cleanup })
            }
            Ok(None) => {}
            Err(e) => tracing::error!(file = %file.display(), error = %e, "unreadable undo log skipped"),
        }
    }
    out.sort_by(|a, b| b.file.cmp(&a.file));
    out
}

/// Undoes one step, or keeps what a switch put in place (see [`UndoStep::UnlessRecorded`]) and
/// says so.
async fn undo_or_keep(app: &App, step: &UndoStep, owner: Option<&VmGuard>) -> Result<Option<String>, String> {
    match step {
        UndoStep::UnlessRecorded { vm, path, .. } if records(owner, path)? => {
            Ok(Some(format!("VM {vm} was switched to {path}, which stays")))
        }
        _ => undo(app, step, owner).await.map(|()| None),
    }
}

/// Whether the record of `owner` names the volume at `path`.
fn records(owner: Option<&VmGuard>, path: &str) -> Result<bool, String> {
    Ok(owned(owner)?.load().is_ok_and(|spec| spec.volumes.iter().any(|v| v.install_path() == path)))
}

/// Undoes one step; `owner` is the held VM the step names, if it names one.
async fn undo(app: &App, step: &UndoStep, owner: Option<&VmGuard>) -> Result<(), String> {
    let stop = crate::stop::Stop::new();
    match step {
        // A file some process has open (a VM switched to it just before a crash) is in use,
        // whoever made it: it stays.
        UndoStep::RemoveFile { path } if crate::storage::local::is_open_by_any_process(path) => {
            Err(format!("{} is in use; kept", path.display()))
        }
        UndoStep::RemoveFile { path } => remove_file(path).await,
        UndoStep::RemoveVolumeFile { path, .. } if crate::storage::local::is_open_by_any_process(path) => {
            Err(format!("{} is in use; kept", path.display()))
        }
        UndoStep::RemoveVolumeFile { path, new_dirs } => {
            remove_file(path).await?;
            if let (Some(dir), Some(top)) = (path.parent(), new_dirs) {
                remove_empty_dirs(dir, top);
            }
            Ok(())
        }
        UndoStep::RemoveRbdImage { path } => {
            let p = crate::ceph::path::CephPath::parse(path).map_err(|e| e.to_string())?;
            remove_rbd_image(app, &p, &stop).await
        }
        UndoStep::RemoveRbdSnapshot { path } => {
            super::volumes::drop_unused_snapshot(app.rbd.as_ref(), path).await;
            Ok(())
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
            match app.libvirt.undefine(vm, true).await {
                Err(e) if !e.is_no_domain() => return Err(e.to_string()),
                _ => {}
            }
            // The key of the TPM state goes with the state.
            app.libvirt.remove_vtpm_secret(&crate::domain::tpm_secret_uuid(vm)).await.map_err(|e| e.to_string())
        }
        // The two differ in what their keeping means (see `undo_or_keep`), not in what they do.
        UndoStep::UnlessRecorded { path, step, .. } | UndoStep::RemoveReplaced { path, step, .. } => {
            if records(owner, path)? {
                Ok(())
            } else {
                Box::pin(undo(app, step, owner)).await
            }
        }
        UndoStep::RemoveRecord { .. } => {
            owned(owner)?.remove();
            Ok(())
        }
        UndoStep::RedefineFromRecord { .. } => {
            let vm = owned(owner)?;
            match vm.load() {
                Ok(spec) => super::redefine_if_stopped(app, vm, &spec).await.map_err(|e| e.to_string()),
                Err(_) => Ok(()),
            }
        }
        UndoStep::RemoveTop { top, .. } if crate::storage::local::is_open_by_any_process(top) => {
            Err(format!("{} is in use; kept", top.display()))
        }
        UndoStep::RemoveTop { top, base, .. } => {
            let vm = owned(owner)?;
            if let Ok(mut spec) = vm.load() {
                super::freeze::point_back(app, vm, &mut spec, top, base).await.map_err(|e| e.to_string())?;
            }
            match tokio::fs::remove_file(top).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("removing {}: {e}", top.display())),
                _ => Ok(()),
            }
        }
        UndoStep::Thaw { frozen, .. } => {
            let vm = owned(owner)?;
            let mut spec = vm.load().map_err(|e| e.to_string())?;
            super::freeze::thaw(app, vm, &mut spec, frozen).await;
            Ok(())
        }
        UndoStep::ThawGuest { vm } => super::quiesce::thaw(app, vm).await,
        UndoStep::TruncateBackupGroup { dir, group, points } => {
            let g = crate::backup_group::Group { uuid: group.clone(), dir: dir.clone() };
            match g.truncate(*points) {
                Err(e) if e.kind != crate::error::ErrorKind::NotFound => Err(e.to_string()),
                _ => Ok(()),
            }
        }
        UndoStep::RemoveBitmap { vm, name, files } => super::bitmap_backup::undo_bitmap(app, vm, name, files).await,
        UndoStep::EndBackupJob { vm } => {
            super::bitmap_backup::end_job(app, vm).await;
            Ok(())
        }
    }
}

/// Removes `dir` and its parents up to `top` (a directory an operation made, with what it
/// made inside), as far as they are empty: another operation may have put a file there since.
pub fn remove_empty_dirs(dir: &Path, top: &Path) {
    for d in dir.ancestors().take_while(|d| d.starts_with(top)) {
        if std::fs::remove_dir(d).is_err() {
            break;
        }
    }
}

fn owned(owner: Option<&VmGuard>) -> Result<&VmGuard, String> {
    owner.ok_or_else(|| "a step on a VM record was replayed without its VM".to_owned())
}

/// How long a removal waits for the watch a killed client left on an image: Ceph drops it
/// after about 30 s.
const DEAD_WATCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(75);

/// Removes an RBD image this operation made; a missing one is fine. While the image still has
/// a watcher — the previous run of the agent, killed with the image open — the removal is
/// retried until the cluster times the watch out.
async fn remove_rbd_image(app: &App, p: &crate::ceph::path::CephPath, stop: &crate::stop::Stop) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + DEAD_WATCH_TIMEOUT;
    loop {
        match app.rbd.remove(p, stop).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if e.is_busy() && tokio::time::Instant::now() < deadline => {
                // Watchers that are all blocklisted are dead for good: their watch goes with
                // the header of this half-made image.
                match app.rbd.drop_dead_watch(p, stop).await {
                    Ok(true) => {
                        tracing::warn!(image = %p, "removed the header a dead, blocklisted client still watched");
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(image = %p, error = %e, "cannot tell whether the image's watchers are dead")
                    }
                }
                tracing::info!(image = %p, "the image still has a watcher (a killed client's); waiting for it to expire");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn remove_file(path: &Path) -> Result<(), String> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!("removing {}: {e}", path.display())),
        _ => Ok(()),
    }
}

impl Drop for UndoLog {
    fn drop(&mut self) {
        if !self.steps.is_empty() {
            tracing::error!(steps = ?self.steps, "an undo log was dropped without commit or rollback");
        }
    }
}

/// Unit tests kill the "agent" right after the n-th journaled step or VM record write of an
/// operation (a record write is how a VM switches to new volumes): the operation's future then
/// unwinds without running anything more (no rollback), as a SIGKILL would leave it, and the
/// test restarts and recovers.
#[cfg(test)]
pub mod kill_point {
    use std::cell::Cell;

    tokio::task_local! {
        static STEPS_LEFT: Cell<usize>;
    }

    /// The panic message a kill unwinds with.
    pub const KILLED: &str = "killed after a journaled step or record write";

    /// Runs `f` so that it is killed right after its `n`-th journaled step or record write
    /// (1 = the first).
    pub async fn after<F: std::future::Future>(n: usize, f: F) -> F::Output {
        STEPS_LEFT.scope(Cell::new(n), f).await
    }

    pub(in crate::ops) fn reached() {
        let _ = STEPS_LEFT.try_with(|left| {
            left.set(left.get().saturating_sub(1));
            if left.get() == 0 {
                std::panic::panic_any(KILLED);
            }
        });
    }
}
