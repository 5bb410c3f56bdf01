//! `/localstorage/*` paths on files and directories rather than on one volume: capacity,
//! folders, directory removal, extra links, the initialized flag file, who references an image,
//! and the checks and renames of chains the management node moves between directories and hosts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::localstorage::with_capacity;
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::storage::local::is_open_by_any_process;
use crate::storage::local_files::{self, backing_of, disk_usage, files_under, Removal};
use crate::tasks::TaskCtx;
use crate::wire::localstorage::*;
use crate::wire::Empty;

fn in_use(what: &str, path: &str, file: &Path) -> AgentError {
    AgentError::conflict(format!(
        "{what} {path} is still in use: {} is open by a running process; stop the VM first",
        file.display()
    ))
    .with_field("inUse", true)
}

/// Creates the (empty) flag file if it is not there; an existing one is left as it is.
pub(super) fn create_flag_file(path: &Path) -> AgentResult<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
        .map_err(|e| AgentError::failed("cannot create the initialized file", format!("{}: {e}", path.display())))
}

pub async fn physical_capacity(app: &App, _ctx: &TaskCtx, cmd: StoragePathCmd) -> AgentResult<WithCapacity<Empty>> {
    let dir =
        app.storage.roots().confine_dir(&cmd.storage_path).map_err(|e| AgentError::from(e).context("storagePath"))?;
    Ok(with_capacity(app, Some(&dir), Empty {}))
}

/// Makes the directory `installUrl` is in (`os.path.dirname`, as the Python agent does).
pub async fn create_folder(app: &App, _ctx: &TaskCtx, cmd: CreateFolderCmd) -> AgentResult<WithCapacity<Empty>> {
    let parent = match cmd.install_url.rsplit_once('/') {
        Some(("", _)) => "/",
        Some((head, _)) => head,
        None => &cmd.install_url,
    };
    let dir = app.storage.roots().confine_dir(parent).map_err(|e| AgentError::from(e).context("installUrl"))?;
    std::fs::create_dir_all(&dir).map_err(|e| {
        AgentError::failed(format!("unable to create folder at {}", cmd.install_url), format!("{}: {e}", dir.display()))
    })?;
    Ok(with_capacity(app, Some(&dir), Empty {}))
}

pub async fn delete_dir(app: &App, _ctx: &TaskCtx, cmd: DeleteBitsCmd) -> AgentResult<WithCapacity<DeleteBitsRsp>> {
    let _lock = app.volume_locks.write(&cmd.path).await?;
    match local_files::delete_dir(app.storage.roots(), &cmd.path)? {
        Removal::InUse(f) => Err(in_use("dir", &cmd.path, &f)),
        Removal::Removed => Ok(with_capacity(app, Some(Path::new(&cmd.path)), DeleteBitsRsp { in_use: false })),
    }
}

pub async fn unlink(app: &App, _ctx: &TaskCtx, cmd: UnlinkCmd) -> AgentResult<WithCapacity<Empty>> {
    let _lock = app.volume_locks.write(&cmd.install_path).await?;
    match local_files::unlink_extra_links(app.storage.roots(), &cmd.install_path)? {
        Removal::InUse(f) => Err(in_use("file", &cmd.install_path, &f)),
        Removal::Removed => Ok(with_capacity(app, Some(Path::new(&cmd.install_path)), Empty {})),
    }
}

/// `existed: false` for a flag file outside the storage roots (the host does not have the
/// storage where the management node expects it).
pub async fn check_initialized_file(
    app: &App,
    _ctx: &TaskCtx,
    cmd: InitializedFileCmd,
) -> AgentResult<WithCapacity<InitializedFileRsp>> {
    let file = cmd.file_path.as_deref().ok_or_else(|| AgentError::invalid("filePath is required"))?;
    let roots = app.storage.roots();
    let file = roots.confine(file).ok();
    let existed = file.as_deref().is_some_and(|f| f.is_file());
    let at = cmd.storage_path.as_deref().and_then(|s| roots.confine_dir(s).ok()).or(file);
    Ok(with_capacity(app, at.as_deref(), InitializedFileRsp { existed }))
}

pub async fn create_initialized_file(
    app: &App,
    _ctx: &TaskCtx,
    cmd: InitializedFileCmd,
) -> AgentResult<WithCapacity<Empty>> {
    let file = cmd.file_path.as_deref().ok_or_else(|| AgentError::invalid("filePath is required"))?;
    let file = app.storage.roots().confine(file).map_err(|e| AgentError::from(e).context("filePath"))?;
    create_flag_file(&file)?;
    Ok(with_capacity(app, Some(&file), Empty {}))
}

pub async fn qcow2_reference(
    app: &App,
    _ctx: &TaskCtx,
    cmd: Qcow2ReferenceCmd,
) -> AgentResult<WithCapacity<Qcow2ReferenceRsp>> {
    let roots = app.storage.roots();
    let dir = roots.confine_dir(&cmd.searching_dir).map_err(|e| AgentError::from(e).context("searchingDir"))?;
    let target = roots.confine(&cmd.path).map_err(|e| AgentError::from(e).context("path"))?;
    let reference_paths = local_files::references(&dir, &target).iter().map(|p| p.display().to_string()).collect();
    Ok(with_capacity(app, Some(&dir), Qcow2ReferenceRsp { reference_paths }))
}

pub async fn batch_get_size(app: &App, ctx: &TaskCtx, cmd: BatchSizeCmd) -> AgentResult<WithCapacity<BatchSizeRsp>> {
    let mut actual_sizes = BTreeMap::new();
    for (uuid, path) in &cmd.volume_uuid_install_paths {
        if let Ok((_, actual)) = app.storage.sizes(path, &ctx.stop).await {
            actual_sizes.insert(uuid.clone(), actual);
        }
    }
    Ok(with_capacity(app, None, BatchSizeRsp { actual_sizes }))
}

/// The cached images (under `imageCacheDir`) that the files of the volume's directory are on:
/// the one in the volume's own chain is `path`, the others `otherPaths`.
pub async fn base_image_path(
    app: &App,
    _ctx: &TaskCtx,
    cmd: BaseImagePathCmd,
) -> AgentResult<WithCapacity<BaseImagePathRsp>> {
    let roots = app.storage.roots();
    let name = Path::new(&cmd.volume_install_dir).file_name().map(|n| n.to_string_lossy().into_owned());
    if cmd.volume_uuid.is_empty() || !name.is_some_and(|n| n.ends_with(&cmd.volume_uuid)) {
        return Err(AgentError::invalid(format!(
            "volumeInstallDir {} is not the directory of volume {}; maybe a wrong install dir was passed",
            cmd.volume_install_dir, cmd.volume_uuid
        )));
    }
    let vol_dir =
        roots.confine(&cmd.volume_install_dir).map_err(|e| AgentError::from(e).context("volumeInstallDir"))?;
    let cache = roots.confine_dir(&cmd.image_cache_dir).map_err(|e| AgentError::from(e).context("imageCacheDir"))?;
    let top =
        roots.confine_chain(&cmd.volume_install_path).map_err(|e| AgentError::from(e).context("volumeInstallPath"))?;
    let mut images: BTreeSet<PathBuf> =
        files_under(&vol_dir).iter().filter_map(|f| backing_of(f)).filter(|b| b.starts_with(&cache)).collect();
    let chain = std::iter::once(top.clone()).chain(roots.backing_chain(&top)?);
    let mut rsp = BaseImagePathRsp { path: None, other_paths: Vec::new(), size: None };
    for p in chain {
        if images.remove(&p) {
            let below = roots.backing_chain(&p)?;
            rsp.size = Some(std::iter::once(&p).chain(&below).map(|f| disk_usage(f)).sum());
            rsp.path = Some(p.display().to_string());
            break;
        }
    }
    rsp.other_paths = images.iter().map(|p| p.display().to_string()).collect();
    Ok(with_capacity(app, Some(&vol_dir), rsp))
}

/// Each file must exist and, when a parent is named, have it as its backing file.
pub async fn verify_chain(app: &App, _ctx: &TaskCtx, cmd: SnapshotChainCmd) -> AgentResult<WithCapacity<Empty>> {
    let roots = app.storage.roots();
    for sp in &cmd.snapshots {
        let what = || format!("resource[Snapshot or Volume, uuid:{}]", sp.snapshot_uuid.as_deref().unwrap_or("?"));
        let path = roots
            .confine_existing(&sp.path)
            .map_err(|e| AgentError::from(e).context(format!("cannot find the file of {}", what())))?;
        let Some(parent) = sp.parent_path.as_deref().filter(|p| !p.is_empty()) else { continue };
        let parent = roots
            .confine_existing(parent)
            .map_err(|e| AgentError::from(e).context(format!("cannot find the backing file of {}", what())))?;
        let actual = backing_of(&path);
        if actual.as_deref() != Some(parent.as_path()) {
            return Err(AgentError::invalid(format!(
                "{}'s file {}: its backing file {} is not {}",
                what(),
                path.display(),
                actual.map(|a| a.display().to_string()).unwrap_or_else(|| "(none)".into()),
                parent.display()
            )));
        }
    }
    Ok(with_capacity(app, None, Empty {}))
}

/// Renames the backing file in each file's header to its `parentPath` (`rebase -u`: after the
/// management node copied a chain, each copy names its copied parent). Everything is checked
/// before anything is rewritten; a file a process has open is refused.
pub async fn rebase_backing_files(app: &App, ctx: &TaskCtx, cmd: SnapshotChainCmd) -> AgentResult<WithCapacity<Empty>> {
    let roots = app.storage.roots();
    let mut todo = Vec::new();
    for sp in &cmd.snapshots {
        let Some(parent) = sp.parent_path.as_deref().filter(|p| !p.is_empty()) else { continue };
        let path = roots.confine_existing(&sp.path).map_err(|e| AgentError::from(e).context("path"))?;
        let parent = roots.confine_chain(parent).map_err(|e| AgentError::from(e).context("parentPath"))?;
        crate::qemu_img::read_header(&path).map_err(|e| AgentError::invalid(format!("{}: {e}", path.display())))?;
        todo.push((path, parent));
    }
    rename_backings(app, ctx, &todo).await?;
    Ok(with_capacity(app, None, Empty {}))
}

/// Points each file's header at its new backing file, after checking no process has any of
/// them open. Only the header's name changes.
async fn rename_backings(app: &App, ctx: &TaskCtx, todo: &[(PathBuf, PathBuf)]) -> AgentResult<()> {
    let paths: Vec<String> = todo.iter().map(|(p, _)| p.display().to_string()).collect();
    let _locks = app.volume_locks.write_all(&paths).await?;
    if let Some((p, _)) = todo.iter().find(|(p, _)| is_open_by_any_process(p)) {
        return Err(in_use("file", &p.display().to_string(), p));
    }
    for (path, backing) in todo {
        let fmt = crate::qemu_img::read_header(backing).map_err(|e| AgentError::invalid(e.to_string()))?.format;
        app.qemu_img.rename_backing(path, backing, fmt, &ctx.stop).await.map_err(|e| {
            AgentError::from(e).context(format!("cannot rename the backing file of {}", path.display()))
        })?;
    }
    Ok(())
}

/// A volume changes type: every file of `srcDir` gets a second link in `dstDir`, and every file
/// under `storagePath` backed by one of them is renamed onto the new link. The links come first,
/// so every file's backing file exists at every step; a retry finds the links made.
pub async fn hardlink(app: &App, ctx: &TaskCtx, cmd: HardlinkCmd) -> AgentResult<WithCapacity<Empty>> {
    let roots = app.storage.roots();
    let src = roots.confine(&cmd.src_dir).map_err(|e| AgentError::from(e).context("srcDir"))?;
    let dst = roots.confine(&cmd.dst_dir).map_err(|e| AgentError::from(e).context("dstDir"))?;
    let storage = roots.confine_dir(&cmd.storage_path).map_err(|e| AgentError::from(e).context("storagePath"))?;
    if !src.is_dir() {
        return Err(AgentError::not_found(format!("srcDir {} is not a directory", src.display())));
    }
    if dst.starts_with(&src) || src.starts_with(&dst) {
        return Err(AgentError::invalid(format!("srcDir {} and dstDir {} overlap", src.display(), dst.display())));
    }
    let links: HashMap<PathBuf, PathBuf> = files_under(&src)
        .into_iter()
        .filter_map(|f| f.strip_prefix(&src).ok().map(|rel| dst.join(rel)).map(|d| (f, d)))
        .collect();
    use std::os::unix::fs::MetadataExt;
    let same = |a: &Path, b: &Path| match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    };
    if let Some((_, d)) = links.iter().find(|(f, d)| d.symlink_metadata().is_ok() && !same(f, d)) {
        return Err(AgentError::conflict(format!(
            "{} already exists and is another file; delete it first",
            d.display()
        )));
    }
    let todo: Vec<(PathBuf, PathBuf)> = files_under(&storage)
        .into_iter()
        .filter_map(|f| backing_of(&f).and_then(|b| links.get(&b).cloned()).map(|d| (f, d)))
        .collect();
    if let Some((p, _)) = todo.iter().find(|(p, _)| is_open_by_any_process(p)) {
        return Err(in_use("file", &p.display().to_string(), p));
    }
    for (f, d) in links.iter().filter(|(f, d)| !same(f, d)) {
        if let Some(dir) = d.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| AgentError::failed("cannot create the directory", format!("{}: {e}", dir.display())))?;
        }
        std::fs::hard_link(f, d).map_err(|e| {
            AgentError::failed("cannot link the file", format!("{} -> {}: {e}", f.display(), d.display()))
        })?;
    }
    rename_backings(app, ctx, &todo).await?;
    Ok(with_capacity(app, Some(&storage), Empty {}))
}
