//! `/localstorage/*`: ZStack's local primary storage on qcow2 files.

use std::path::Path;

use serde::Serialize;

use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::image_cache::{self, ssh::SshSource, Source};
use crate::qemu_img::CreateOptions;
use crate::storage::local::{parse_qcow2_options, Existing, FromImage, Provisioning};
use crate::storage::local_files::disk_usage;
use crate::tasks::TaskCtx;
use crate::wire::localstorage::*;

pub(super) fn with_capacity<T: Serialize>(app: &App, path: Option<&Path>, rsp: T) -> WithCapacity<T> {
    let c = app.storage.capacity(path);
    WithCapacity { rsp, total_capacity: c.total, available_capacity: c.available }
}

/// `kvmHostAddons.qcow2Options`, which applies to every qcow2 the agent makes.
fn qcow2_options(addons: Option<&KvmHostAddons>) -> AgentResult<CreateOptions> {
    match addons.and_then(|a| a.qcow2_options.as_deref()) {
        Some(o) => parse_qcow2_options(o),
        None => Ok(CreateOptions::default()),
    }
}

/// Makes the storage directory (a configured root, or a directory inside one) and the flag
/// file; answers the directory's own usage, as `du` counts it.
pub async fn init(app: &App, _ctx: &TaskCtx, cmd: InitCmd) -> AgentResult<WithCapacity<InitRsp>> {
    let roots = app.storage.roots();
    let dir = roots.confine_dir(&cmd.path).map_err(|e| AgentError::from(e).context("path"))?;
    let flag = match cmd.init_file_path.as_deref().filter(|p| !p.is_empty()) {
        Some(f) => Some(roots.confine(f).map_err(|e| AgentError::from(e).context("initFilePath"))?),
        None => None,
    };
    let made = dir.ancestors().take_while(|d| d.symlink_metadata().is_err()).last().map(Path::to_path_buf);
    std::fs::create_dir_all(&dir)
        .map_err(|e| AgentError::failed("cannot create the storage directory", format!("{}: {e}", dir.display())))?;
    if let Some(f) = flag {
        if let Err(e) = super::localstorage_files::create_flag_file(&f) {
            // A failed init leaves no directory of its own.
            if let Some(top) = made {
                crate::ops::undo::remove_empty_dirs(&dir, &top);
            }
            return Err(e);
        }
    }
    Ok(with_capacity(app, Some(&dir), InitRsp { local_storage_used_capacity: disk_usage(&dir) }))
}

/// A path outside the storage roots is not there for this agent: `existing: false`.
pub async fn check_bits(app: &App, _ctx: &TaskCtx, cmd: CheckBitsCmd) -> AgentResult<WithCapacity<CheckBitsRsp>> {
    let p = app.storage.roots().confine(&cmd.path).ok();
    let existing = p.as_deref().is_some_and(|p| p.symlink_metadata().is_ok());
    Ok(with_capacity(app, p.as_deref(), CheckBitsRsp { existing }))
}

async fn size_of(app: &App, ctx: &TaskCtx, path: &Path) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let (size, actual_size) = app.storage.sizes(&path.to_string_lossy(), &ctx.stop).await?;
    Ok(with_capacity(app, Some(path), VolumeSizeRsp { size, actual_size }))
}

pub async fn create_volume_from_cache(
    app: &App,
    ctx: &TaskCtx,
    cmd: CreateVolumeFromCacheCmd,
) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let opts = qcow2_options(cmd.kvm_host_addons.as_ref())?;
    let _lock = app.volume_locks.write(&cmd.install_url).await?;
    // A retry after a failure may find what the first attempt made: replaced when it is an
    // untouched overlay on the same image, refused otherwise.
    let spec = FromImage {
        size: cmd.virtual_size.filter(|s| *s > 0),
        provisioning: Provisioning::Thin,
        opts: &opts,
        existing: Existing::ReplaceLeftover,
    };
    super::journaled_make(app, ctx, &cmd.install_url, async {
        let path =
            app.storage.create_from_image(&cmd.template_path_in_cache, &cmd.install_url, &spec, &ctx.stop).await?;
        size_of(app, ctx, &path).await
    })
    .await
}

pub async fn create_empty(
    app: &App,
    ctx: &TaskCtx,
    cmd: CreateEmptyVolumeCmd,
) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let opts = qcow2_options(cmd.kvm_host_addons.as_ref())?;
    let _lock = app.volume_locks.write(&cmd.install_url).await?;
    super::journaled_make(app, ctx, &cmd.install_url, async {
        let path = app
            .storage
            .create_empty(&cmd.install_url, cmd.size, cmd.backing_file.as_deref(), Provisioning::Thin, opts, &ctx.stop)
            .await
            .map_err(|e| {
                e.context(format!("unable to create empty volume[uuid:{}]", cmd.volume_uuid.as_deref().unwrap_or("?")))
            })?;
        size_of(app, ctx, &path).await
    })
    .await
}

pub async fn get_size(app: &App, ctx: &TaskCtx, cmd: VolumePathCmd) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let _lock = app.volume_locks.read(&cmd.install_path).await?;
    size_of(app, ctx, Path::new(&cmd.install_path)).await
}

pub async fn get_backing_chain(
    app: &App,
    _ctx: &TaskCtx,
    cmd: VolumePathCmd,
) -> AgentResult<WithCapacity<BackingChainRsp>> {
    let _lock = app.volume_locks.read(&cmd.install_path).await?;
    let top = app.storage.roots().confine_chain(&cmd.install_path)?;
    let chain = app.storage.roots().backing_chain(&top)?;
    let total_size = chain.iter().filter_map(|p| std::fs::metadata(p).ok()).map(|m| m.len()).sum();
    let backing_chain = chain.iter().map(|p| p.display().to_string()).collect();
    Ok(with_capacity(app, Some(&top), BackingChainRsp { backing_chain, total_size }))
}

pub async fn delete(app: &App, _ctx: &TaskCtx, cmd: DeleteBitsCmd) -> AgentResult<WithCapacity<DeleteBitsRsp>> {
    let _lock = app.volume_locks.write(&cmd.path).await?;
    if !app.storage.delete(&cmd.path)? {
        return Err(AgentError::conflict(format!(
            "volume {} is in use by a running process; stop the VM first",
            cmd.path
        ))
        .with_field("inUse", true));
    }
    Ok(with_capacity(app, Some(Path::new(&cmd.path)), DeleteBitsRsp { in_use: false }))
}

/// A thin overlay on a snapshot or cached image (linked volumes, ZStack's fast create).
pub async fn create_with_backing(
    app: &App,
    ctx: &TaskCtx,
    cmd: CreateWithBackingCmd,
) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let opts = qcow2_options(cmd.kvm_host_addons.as_ref())?;
    let _lock = app.volume_locks.write(&cmd.install_path).await?;
    let spec = FromImage { opts: &opts, ..FromImage::THIN };
    super::journaled_make(app, ctx, &cmd.install_path, async {
        let path =
            app.storage.create_from_image(&cmd.template_path_in_cache, &cmd.install_path, &spec, &ctx.stop).await?;
        size_of(app, ctx, &path).await
    })
    .await
}

/// A flat copy of a volume and its chain (a template); progress is reported as it goes.
pub async fn create_template(
    app: &App,
    ctx: &TaskCtx,
    cmd: CreateTemplateCmd,
) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let opts = qcow2_options(cmd.kvm_host_addons.as_ref())?;
    flat_copy(app, ctx, &cmd.volume_path, &cmd.install_path, &opts).await
}

/// A flat copy of `src`'s chain at `dst`, with progress; answers its sizes.
async fn flat_copy(
    app: &App,
    ctx: &TaskCtx,
    src: &str,
    dst: &str,
    opts: &CreateOptions,
) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let _source = app.volume_locks.read(src).await?;
    let _target = app.volume_locks.write(dst).await?;
    crate::ops::volumes::store(app, dst)?.check_free(dst, &ctx.stop).await?;
    super::journaled_make(app, ctx, dst, async {
        let path = app.storage.create_flat_copy(src, dst, opts, &ctx.stop, &mut |p| ctx.progress(p, "copying")).await?;
        size_of(app, ctx, &path).await
    })
    .await
}

/// A volume or template from a snapshot: a flat copy of its chain at the workspace path.
pub async fn merge_snapshot(
    app: &App,
    ctx: &TaskCtx,
    cmd: MergeSnapshotCmd,
) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let opts = qcow2_options(cmd.kvm_host_addons.as_ref())?;
    flat_copy(app, ctx, &cmd.snapshot_install_path, &cmd.workspace_install_path, &opts).await
}

/// Revert to a snapshot: a new volume on it, in its directory; the old volume is left for the
/// management node to delete.
pub async fn revert_snapshot(
    app: &App,
    ctx: &TaskCtx,
    cmd: RevertSnapshotCmd,
) -> AgentResult<WithCapacity<RevertSnapshotRsp>> {
    let opts = qcow2_options(cmd.kvm_host_addons.as_ref())?;
    let snapshot = app
        .storage
        .roots()
        .confine_existing(&cmd.snapshot_install_path)
        .map_err(|e| AgentError::from(e).context("snapshotInstallPath"))?;
    let dir = snapshot.parent().ok_or_else(|| {
        AgentError::invalid(format!("snapshotInstallPath {} has no directory", cmd.snapshot_install_path))
    })?;
    let new = dir.join(format!("{}.qcow2", uuid::Uuid::new_v4().simple())).display().to_string();
    let _source = app.volume_locks.read(&cmd.snapshot_install_path).await?;
    let _lock = app.volume_locks.write(&new).await?;
    let spec = FromImage { opts: &opts, ..FromImage::THIN };
    super::journaled_make(app, ctx, &new, async {
        let path = app.storage.create_from_image(&cmd.snapshot_install_path, &new, &spec, &ctx.stop).await?;
        let (size, _) = app.storage.sizes(&new, &ctx.stop).await?;
        let new_volume_install_path = path.display().to_string();
        Ok(with_capacity(app, Some(&path), RevertSnapshotRsp { new_volume_install_path, size }))
    })
    .await
}

/// A fresh root from the image beside the old one, which is left for the management node to
/// delete once it has switched the volume over.
/// `volumePath` is the volume (which must exist) or, ending in `/`, its directory (made if
/// missing, as the Python agent's `os.path.dirname` makes it).
pub async fn reinit_image(app: &App, ctx: &TaskCtx, cmd: ReinitImageCmd) -> AgentResult<WithCapacity<ReinitImageRsp>> {
    let opts = qcow2_options(cmd.kvm_host_addons.as_ref())?;
    let roots = app.storage.roots();
    let dir = match cmd.volume_path.strip_suffix('/') {
        Some(dir) => roots.confine(dir),
        None => roots.confine_existing(&cmd.volume_path).map(|old| old.parent().map(Path::to_path_buf).unwrap_or(old)),
    }
    .map_err(|e| AgentError::from(e).context("volumePath"))?;
    if dir.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
        return Err(
            AgentError::invalid(format!("volumePath {} is not a directory", cmd.volume_path)).context("volumePath")
        );
    }
    let new = dir.join(format!("{}.qcow2", uuid::Uuid::new_v4().simple())).display().to_string();
    let _lock = app.volume_locks.write(&new).await?;
    let spec = FromImage { opts: &opts, ..FromImage::THIN };
    super::journaled_make(app, ctx, &new, async {
        let path = app.storage.create_from_image(&cmd.image_path, &new, &spec, &ctx.stop).await?;
        Ok(with_capacity(app, Some(&path), ReinitImageRsp { new_volume_install_path: path.display().to_string() }))
    })
    .await
}

pub async fn offline_merge(
    app: &App,
    ctx: &TaskCtx,
    cmd: OfflineMergeCmd,
) -> AgentResult<WithCapacity<crate::wire::Empty>> {
    let _lock = app.volume_locks.write(&cmd.dest_path).await?;
    match (cmd.full_rebase, cmd.src_path.as_deref().filter(|p| !p.is_empty())) {
        (true, _) => {
            app.storage.flatten_offline(&cmd.dest_path, &ctx.stop, &mut |p| ctx.progress(p, "flattening")).await?;
        }
        (false, Some(src)) => app.storage.rebase_offline(&cmd.dest_path, src, &ctx.stop).await?,
        (false, None) => return Err(AgentError::invalid("srcPath is required unless fullRebase is true")),
    }
    Ok(with_capacity(app, Some(Path::new(&cmd.dest_path)), crate::wire::Empty {}))
}

/// Bytes a flat copy of the volume would take (`actualSize`) and its virtual size (`size`),
/// from allocation metadata.
pub async fn estimate_template_size(
    app: &App,
    ctx: &TaskCtx,
    cmd: EstimateTemplateSizeCmd,
) -> AgentResult<WithCapacity<VolumeSizeRsp>> {
    let _lock = app.volume_locks.read(&cmd.volume_path).await?;
    let e = app.storage.estimate_flatten(&cmd.volume_path, &ctx.stop).await?;
    Ok(with_capacity(
        app,
        Some(Path::new(&cmd.volume_path)),
        VolumeSizeRsp { size: e.virtual_size, actual_size: e.flat_size },
    ))
}

/// An image from the SFTP backup storage into the cache (or any file the management node names
/// under the roots): fetched once, complete or not at all ([`crate::image_cache`]). A target
/// already in place is the image: it is kept, not fetched again.
/// The file on the backup storage the command names, reached over SSH with its key.
fn backup_storage(cmd: &SftpBitsCmd) -> AgentResult<SshSource> {
    let (host, user, path) = (&cmd.hostname, cmd.username.as_deref(), &cmd.backup_storage_install_path);
    SshSource::new(host, cmd.ssh_port, user, path, &cmd.ssh_key, None).map_err(Into::into)
}

pub async fn sftp_download(
    app: &App,
    ctx: &TaskCtx,
    cmd: SftpBitsCmd,
) -> AgentResult<WithCapacity<crate::wire::Empty>> {
    let fail =
        |e: AgentError| e.context(format!("unable to download {}/{}", cmd.hostname, cmd.backup_storage_install_path));
    let source = backup_storage(&cmd).map_err(fail)?;
    let cached = image_cache::fetch(app, ctx, &Source::Ssh(source), &cmd.primary_storage_install_path, None)
        .await
        .map_err(fail)?;
    Ok(with_capacity(app, Some(&cached.path), crate::wire::Empty {}))
}

/// A file of the local storage (a template made from a volume) to the SFTP backup storage.
pub async fn sftp_upload(app: &App, ctx: &TaskCtx, cmd: SftpBitsCmd) -> AgentResult<WithCapacity<crate::wire::Empty>> {
    let fail = |e: AgentError| {
        e.context(format!(
            "unable to upload {} to {}/{}",
            cmd.primary_storage_install_path, cmd.hostname, cmd.backup_storage_install_path
        ))
    };
    let dest = backup_storage(&cmd).map_err(fail)?;
    let file = app.storage.roots().confine_existing(&cmd.primary_storage_install_path).map_err(|e| fail(e.into()))?;
    let _lock = app.volume_locks.read(&cmd.primary_storage_install_path).await?;
    dest.upload(&app.config.state_dir, &file, ctx).await.map_err(fail)?;
    Ok(with_capacity(app, Some(&file), crate::wire::Empty {}))
}
