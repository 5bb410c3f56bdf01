//! Native `/vm/changeimage`: the VM must be stopped; its new root is built beside the old one,
//! the VM's record (and domain, when defined) is switched to it, and only then is the old root
//! removed. On any failure before the switch the new root is removed and the VM is as before.

use super::undo::{UndoLog, UndoStep};
use crate::api::inventory::VmInstanceInventory;
use crate::api::native::ChangeImageCmd;
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::storage::local::Provisioning;
use crate::tasks::TaskCtx;

pub async fn change_image(app: &App, ctx: &TaskCtx, cmd: ChangeImageCmd) -> AgentResult<VmInstanceInventory> {
    let mut spec = app.vm_records.load(&cmd.vm_uuid)?;
    let vm = spec.vm_instance_uuid.clone();
    let _lock = app.vm_locks.write(&vm).await;
    let state = app.libvirt.domain_state(&vm).await?;
    if state.is_some_and(|s| s.is_active()) {
        return Err(AgentError::conflict(format!("VM {vm} is running; stop it before changing its image")));
    }
    let old_root = spec.root_volume.install_path.clone();
    if spec.root_volume.device_type != "file" {
        return Err(AgentError::invalid(format!(
            "VM {vm} has a {} root; this host changes images of file roots only",
            spec.root_volume.device_type
        )));
    }
    let new_root = match &cmd.new_root_install_path {
        Some(p) => p.clone(),
        None => {
            let dir = std::path::Path::new(&old_root).parent().unwrap_or(std::path::Path::new("/"));
            dir.join(format!("{}.qcow2", uuid::Uuid::new_v4().simple())).display().to_string()
        }
    };
    let _volumes = app.volume_locks.write_all(&[old_root.clone(), new_root.clone()]).await;
    // The new root keeps the old one's size when that is larger than the image.
    let (old_size, _) =
        app.storage.sizes(&old_root, &ctx.stop).await.map_err(|e| e.context("reading the current root"))?;
    let (image_size, _) =
        app.storage.sizes(&cmd.image_path, &ctx.stop).await.map_err(|e| e.context("reading the image"))?;

    let mut undo = UndoLog::default();
    let result = async {
        let made = app
            .storage
            .create_from_image(
                &cmd.image_path,
                &new_root,
                Some(old_size).filter(|s| *s > image_size),
                Provisioning::Thin,
                &ctx.stop,
            )
            .await
            .map_err(|e| e.context("step 'create new root' failed"))?;
        undo.push(UndoStep::RemoveFile { path: made.clone() });
        ctx.stop.check("changing the image")?;
        spec.root_volume.install_path = made.display().to_string();
        spec.root_volume.format = "qcow2".into();
        if state.is_some() {
            // A defined (stopped) domain is redefined to point at the new root.
            let xml = crate::domain::render(&spec, &super::settings(app, &vm))?;
            app.libvirt.define(xml).await.map_err(|e| AgentError::from(e).context("step 'redefine domain' failed"))?;
        }
        app.vm_records.save(&spec)
    }
    .await;
    match result {
        Ok(()) => undo.commit(),
        Err(e) => {
            undo.rollback(app).await;
            return Err(e);
        }
    }
    // The switch is done; the old root goes only now.
    if !app.storage.delete(&old_root)? {
        tracing::warn!(vm = %vm, path = %old_root, "the old root is in use and was kept; delete it later");
    }
    ctx.progress(100, "image changed");
    super::inventory::of(app, &spec, if state.is_some() { "Stopped" } else { "Created" }, ctx).await
}
