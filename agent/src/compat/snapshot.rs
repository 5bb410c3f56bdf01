//! ZStack's volume snapshot paths. A snapshot is the volume's current top file, frozen; the
//! volume goes on in a new overlay on it. A full snapshot first cuts the top loose from its
//! chain (a live block pull on a running VM, a flat copy renamed over it otherwise), as ZStack's
//! agent does; the volume's first snapshot (its top on the image, nothing between) stays thin.

use std::path::Path;

use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::ops;
use crate::qemu_img::CreateOptions;
use crate::storage::local::Provisioning;
use crate::tasks::TaskCtx;
use crate::wire::vm::{MergeSnapshotCmd, TakeSnapshotCmd, TakeSnapshotRsp};
use crate::wire::Empty;

/// `/vm/volume/takesnapshot`: of a VM's volume (running or not) or, without `vmUuid`, of a
/// detached one. The new top is `newVolumeInstallPath`, else `installPath`; one that exists
/// already as an overlay on the volume is reused.
pub async fn take(app: &App, ctx: &TaskCtx, cmd: TakeSnapshotCmd) -> AgentResult<TakeSnapshotRsp> {
    let new_top =
        cmd.new_volume_install_path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| cmd.install_path.clone());
    let Some(vm) = cmd.vm_uuid.as_deref().filter(|v| !v.is_empty()) else {
        return take_detached(app, ctx, &cmd, &new_top).await;
    };
    ops::check_uuid(vm)?;
    let owner = app.vms.lock(vm).await?;
    if cmd.full_snapshot {
        let _volume = app.volume_locks.write(&cmd.volume_install_path).await?;
        cut_loose(app, ctx, Some(vm), &cmd.volume_install_path).await?;
    }
    let target =
        ops::freeze::Target { volume_uuid: cmd.volume_uuid.clone(), current: cmd.volume_install_path.clone(), new_top };
    let frozen = ops::freeze::freeze_to(app, &owner, std::slice::from_ref(&target), &ctx.task_id, &ctx.stop).await?;
    if let Some(mut spec) = owner.record()? {
        ops::freeze::record(app, &owner, &mut spec, &frozen).await?;
    }
    answer(app, ctx, &frozen[0].snapshot_path, &frozen[0].install_path).await
}

/// A volume no VM has: the new top is made as an overlay under the volume's lock; a volume a
/// process has open is refused (it belongs to a VM after all).
async fn take_detached(app: &App, ctx: &TaskCtx, cmd: &TakeSnapshotCmd, new_top: &str) -> AgentResult<TakeSnapshotRsp> {
    let _volume = app.volume_locks.write(&cmd.volume_install_path).await?;
    let current = app.storage.roots().confine_chain(&cmd.volume_install_path)?;
    if crate::storage::local::is_open_by_any_process(&current) {
        return Err(AgentError::conflict(format!(
            "volume {} is in use; give the vmUuid of the VM using it",
            current.display()
        )));
    }
    if cmd.full_snapshot {
        cut_loose(app, ctx, None, &cmd.volume_install_path).await?;
    }
    let top = app.storage.roots().confine(new_top)?;
    if ops::freeze::is_precreated_overlay(&top, &current)? {
        return answer(app, ctx, &current, &top).await;
    }
    // A new top goes again when the snapshot fails after making it (the answer cannot be read).
    super::journaled_make(app, ctx, new_top, async {
        let opts = CreateOptions::default();
        let path = cmd.volume_install_path.as_str();
        app.storage.create_empty(new_top, 0, Some(path), Provisioning::Thin, opts, &ctx.stop).await?;
        answer(app, ctx, &current, &top).await
    })
    .await
}

/// Makes the volume's top stand alone, unless its only backing file is the image.
async fn cut_loose(app: &App, ctx: &TaskCtx, vm: Option<&str>, volume: &str) -> AgentResult<()> {
    let top = app.storage.roots().confine_chain(volume)?;
    if app.storage.roots().backing_chain(&top)?.len() <= 1 {
        return Ok(());
    }
    let running = match vm {
        Some(vm) => app.libvirt.domain_state(vm).await?.is_some_and(|s| s.is_active()),
        None => false,
    };
    match vm.filter(|_| running) {
        Some(vm) => ops::flatten::pull_live(app, ctx, vm, &top, None, |p| ctx.progress(p, "flattening")).await,
        None => app.storage.flatten_offline(volume, &ctx.stop, &mut |p| ctx.progress(p, "flattening")).await.map(drop),
    }
}

async fn answer(app: &App, ctx: &TaskCtx, snapshot: &Path, new_top: &Path) -> AgentResult<TakeSnapshotRsp> {
    let size = app.qemu_img.info(snapshot, &ctx.stop).await?.actual_size;
    Ok(TakeSnapshotRsp {
        new_volume_install_path: new_top.display().to_string(),
        snapshot_install_path: snapshot.display().to_string(),
        size,
    })
}

/// `/vm/volume/mergesnapshot`: a live block pull on the running VM, verified from the qcow2
/// header before success is reported.
pub async fn merge(app: &App, ctx: &TaskCtx, cmd: MergeSnapshotCmd) -> AgentResult<Empty> {
    let _owner = app.vms.lock(&cmd.vm_uuid).await?;
    let _volume = app.volume_locks.write(&cmd.dest_path).await?;
    let dest = app.storage.roots().confine_chain(&cmd.dest_path)?;
    let base = match (cmd.full_rebase, cmd.src_path.as_deref().filter(|p| !p.is_empty())) {
        (true, _) => None,
        (false, Some(src)) => Some(app.storage.roots().confine_existing(src)?),
        (false, None) => return Err(AgentError::invalid("srcPath is required unless fullRebase is true")),
    };
    if base.is_none()
        && crate::qemu_img::read_header(&dest).map_err(|e| AgentError::invalid(e.to_string()))?.backing_file.is_none()
    {
        return Ok(Empty {});
    }
    if !app.libvirt.domain_state(&cmd.vm_uuid).await?.is_some_and(|s| s.is_active()) {
        return Err(AgentError::conflict(format!("VM {} is not running; merge offline instead", cmd.vm_uuid)));
    }
    ops::flatten::pull_live(app, ctx, &cmd.vm_uuid, &dest, base.as_deref(), |p| ctx.progress(p, "pulling")).await?;
    Ok(Empty {})
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::error::ErrorKind;
    use crate::testing::{backing, same_content, uuid, write, TestHost};
    use crate::wire::decode;

    async fn snapshot(h: &TestHost, body: serde_json::Value) -> AgentResult<TakeSnapshotRsp> {
        take(&h.app, &TaskCtx::detached("/vm/volume/takesnapshot"), decode(&body).unwrap()).await
    }

    /// A detached volume two layers above `image`: `image` ← `mid` ← `top`, with data in each.
    async fn detached_chain(h: &TestHost) -> (String, String) {
        let image = h.image(&uuid(), 1 << 20).await;
        let (mid, top) = (h.path("d/mid.qcow2"), h.path("d/top.qcow2"));
        let none = CreateOptions::default;
        h.app
            .storage
            .create_empty(&mid, 0, Some(&image), Provisioning::Thin, none(), &Default::default())
            .await
            .unwrap();
        write(&mid, 64 << 10, 1);
        h.app.storage.create_empty(&top, 0, Some(&mid), Provisioning::Thin, none(), &Default::default()).await.unwrap();
        write(&top, 128 << 10, 2);
        (mid, top)
    }

    #[tokio::test]
    async fn a_detached_volume_gets_a_new_top_and_a_full_one_is_cut_loose_first() {
        let h = TestHost::start();
        let (mid, top) = detached_chain(&h).await;
        let reference = h.path("d/reference.qcow2");
        std::fs::copy(&top, &reference).unwrap();
        let next = h.path("d/next.qcow2");
        let r =
            snapshot(&h, json!({"volumeUuid": uuid(), "installPath": next, "volumeInstallPath": top})).await.unwrap();
        assert_eq!(
            (r.snapshot_install_path.as_str(), r.new_volume_install_path.as_str()),
            (top.as_str(), next.as_str())
        );
        assert_eq!(backing(&next).unwrap().display().to_string(), top);
        assert_eq!(backing(&top).unwrap().display().to_string(), mid, "a delta snapshot leaves the chain");

        let full = h.path("d/full.qcow2");
        let body = json!({"volumeUuid": uuid(), "installPath": full, "volumeInstallPath": next, "fullSnapshot": true});
        let r = snapshot(&h, body).await.unwrap();
        assert_eq!(r.snapshot_install_path, next);
        assert!(backing(&next).is_none(), "the snapshot of a full one stands alone");
        assert!(same_content(&next, &reference) && same_content(&full, &reference), "and reads as before");
    }

    #[tokio::test]
    async fn a_running_vms_full_snapshot_is_pulled_live_and_its_first_stays_thin() {
        let h = TestHost::start();
        let vm = h.running_vm().await;
        let root = h.recorded(&vm).await.remove(0);
        let image = backing(&root).unwrap();
        let first = h.path("r/first.qcow2");
        let body = |new: &str, cur: &str| json!({"vmUuid": vm, "volumeUuid": uuid(), "installPath": new, "volumeInstallPath": cur, "fullSnapshot": true});
        snapshot(&h, body(&first, &root)).await.unwrap();
        assert_eq!(backing(&root).unwrap(), image, "the first snapshot (the image's overlay) stays thin");
        assert_eq!(h.domain_files(&vm)[0], first);
        write(&first, 0, 9);
        let second = h.path("r/second.qcow2");
        snapshot(&h, body(&second, &first)).await.unwrap();
        assert!(backing(&first).is_none(), "the running top was pulled before it was frozen");
        assert_eq!(backing(&second).unwrap().display().to_string(), first);
        assert_eq!(
            (h.domain_files(&vm)[0].as_str(), h.recorded(&vm).await[0].as_str()),
            (second.as_str(), second.as_str())
        );
    }

    #[tokio::test]
    async fn a_detached_snapshot_whose_answer_cannot_be_read_removes_its_new_top() {
        let h = TestHost::start();
        let (_, top) = detached_chain(&h).await;
        let files = h.files();
        h.faults.fail("qemu-img info");
        let body = json!({"volumeUuid": uuid(), "installPath": h.path("e/new/next.qcow2"), "volumeInstallPath": top});
        let e = snapshot(&h, body).await.unwrap_err();
        assert!(e.to_string().contains("qemu-img info"), "the answer's read failed: {e}");
        assert_eq!(h.files(), files, "the new top is removed");
        assert!(!h.root.join("e").exists(), "and the directories made for it");
    }

    #[tokio::test]
    async fn a_volume_in_use_or_outside_the_roots_is_refused_and_nothing_is_made() {
        let h = TestHost::start();
        let vm = h.running_vm().await;
        let root = h.recorded(&vm).await.remove(0);
        let files = h.files();
        for (cur, kind) in [(root.as_str(), ErrorKind::Conflict), ("/etc/passwd", ErrorKind::InvalidArgument)] {
            let body = json!({"volumeUuid": uuid(), "installPath": h.path("x/new.qcow2"), "volumeInstallPath": cur});
            let e = snapshot(&h, body).await.unwrap_err();
            assert_eq!(e.kind, kind, "{cur}: {e}");
            assert_eq!(h.files(), files, "{cur}: nothing made");
        }
    }
}
