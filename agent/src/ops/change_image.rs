//! Native `/vm/changeimage`: the VM must be stopped; its new root is built beside the old one,
//! the VM's record (and domain, when defined) is switched to it, and only then is the old root
//! removed. On any failure before the switch the new root is removed and the VM is as before.

use super::undo::{UndoLog, UndoStep};
use super::volumes;
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::storage::local::Provisioning;
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::inventory::VmInstanceInventory;
use crate::wire::native::ChangeImageCmd;

pub async fn change_image(app: &App, ctx: &TaskCtx, cmd: ChangeImageCmd) -> AgentResult<VmInstanceInventory> {
    let owner = app.vms.lock(&cmd.vm_uuid).await?;
    let mut spec = owner.load()?;
    let vm = spec.uuid.clone();
    let new_uuid = match &cmd.volume_uuid {
        Some(u) => {
            crate::domain::check_uuid(u).map_err(|e| e.context("volumeUuid"))?;
            if spec.data_volumes().iter().any(|v| &v.uuid == u) {
                return Err(AgentError::invalid(format!("volumeUuid {u} is a data volume of VM {vm}")));
            }
            u.clone()
        }
        None => spec.root().uuid.clone(),
    };
    if let Some(p) = &cmd.platform {
        check_platform(p)?;
        spec.image_platform = p.clone();
    }
    let state = app.libvirt.domain_state(&vm).await?;
    if state.is_some_and(|s| s.is_active()) {
        return Err(AgentError::conflict(format!("VM {vm} is running; stop it before changing its image")));
    }
    let old_root = spec.root().install_path().clone();
    let new_root = match &cmd.new_root_install_path {
        Some(p) => p.clone(),
        None => match Location::parse(&old_root)? {
            Location::Rbd(old) => {
                // `ceph::rootPoolName::<pool>` places the new root in another pool.
                let pool =
                    cmd.system_tags.iter().find_map(|t| t.strip_prefix("ceph::rootPoolName::")).unwrap_or(&old.pool);
                Location::rbd_image(pool, &uuid::Uuid::new_v4().simple().to_string())
            }
            Location::File(_) => {
                let dir = std::path::Path::new(&old_root).parent().unwrap_or(std::path::Path::new("/"));
                dir.join(format!("{}.qcow2", uuid::Uuid::new_v4().simple())).display().to_string()
            }
        },
    };
    let _volumes = app.volume_locks.write_all(&[old_root.clone(), new_root.clone()]).await?;
    volumes::store(app, &cmd.image_path)?
        .check_image(&cmd.image_path, &ctx.stop)
        .await
        .map_err(|e| e.context("imagePath"))?;
    volumes::store(app, &new_root)?.check_free(&new_root, &ctx.stop).await?;
    // The new root keeps the old one's size when that is larger than the image.
    let (old_size, _) = volumes::store(app, &old_root)?
        .sizes(&old_root, &ctx.stop)
        .await
        .map_err(|e| e.context("reading the current root"))?;
    let (image_size, _) = volumes::store(app, &cmd.image_path)?
        .sizes(&cmd.image_path, &ctx.stop)
        .await
        .map_err(|e| e.context("reading the image"))?;

    let mut undo = UndoLog::journaled(app, &ctx.task_id);
    let result = async {
        let grow = Some(old_size).filter(|s| *s > image_size);
        let store = volumes::store(app, &new_root)?;
        let made = store.undo_for(&new_root)?;
        let location = match &made {
            UndoStep::RemoveVolumeFile { path, .. } => Location::File(path.clone()),
            _ => Location::parse(&new_root)?,
        };
        let old = spec.root();
        *spec.root_mut() = old.moved_to(new_uuid, location, old.rbd.clone());
        // Once the record names the new root, the switch is done: a crash after that keeps it.
        let path = spec.root().install_path();
        undo.push(UndoStep::UnlessRecorded { vm: vm.clone(), path, step: Box::new(made) });
        store
            .make_from_image(&cmd.image_path, &new_root, grow, Provisioning::Thin, &ctx.stop)
            .await
            .map_err(|e| e.context("step 'create new root' failed"))?;
        ctx.stop.check("changing the image")?;
        // Should the agent die once the record names the new root, the next start finishes the
        // job: the old root goes, as it would have below. Before that, this step keeps it.
        let old = volumes::store(app, &old_root)?.undo_for(&old_root)?;
        undo.push(UndoStep::RemoveReplaced { vm: vm.clone(), path: old_root.clone(), step: Box::new(old) });
        if state.is_some() {
            // A defined (stopped) domain is redefined to point at the new root, before the
            // record: a failed define leaves the record on the old root. A kill between the
            // two is mended by defining the domain from the record again.
            undo.push(UndoStep::RedefineFromRecord { vm: vm.clone() });
            let xml = crate::domain::render(&spec, &super::settings(app, &vm))?;
            app.libvirt.define(xml).await.map_err(|e| AgentError::from(e).context("step 'redefine domain' failed"))?;
        }
        owner.save(&spec)?;
        Ok(())
    }
    .await;
    match result {
        Ok(()) => undo.commit(),
        Err(e) => {
            undo.rollback(app, &owner).await;
            return Err(e);
        }
    }
    // The switch is done; the old root goes only now.
    if !volumes::store(app, &old_root)?.remove_unless_in_use(&old_root, &ctx.stop).await? {
        tracing::warn!(vm = %vm, path = %old_root, "the old root is in use and was kept; delete it later");
    }
    ctx.progress(100, "image changed");
    super::inventory::of(app, &spec, if state.is_some() { "Stopped" } else { "Created" }, ctx).await
}

/// The image platforms the management plane knows.
const PLATFORMS: [&str; 5] = ["Linux", "Windows", "WindowsVirtio", "Other", "Paravirtualization"];

fn check_platform(p: &str) -> AgentResult<()> {
    if !PLATFORMS.contains(&p) {
        return Err(AgentError::invalid(format!("platform {p:?} is not one of {PLATFORMS:?}")));
    }
    Ok(())
}
