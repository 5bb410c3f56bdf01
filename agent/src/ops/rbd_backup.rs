//! Backup points of VMs on Ceph that read only what changed: each point keeps one protected
//! snapshot per RBD image, named after the group and point like the local bitmaps
//! ([`checkpoint_name`]), and an incremental point copies just the byte ranges librbd reports
//! changed between the previous point's snapshot and its own (`rbd_diff_iterate2`) into an
//! overlay on the previous point's file — the same file a compare writes.
//!
//! When the previous point's snapshot is missing (removed by hand, the image replaced), the
//! point compares the whole disk instead and says why. Only the newest point's snapshots are
//! kept: older `kvmagent-backup-*` snapshots of the VM's images go once a point is recorded.

use std::path::Path;

use super::bitmap_backup::{checkpoint_name, Incremental};
use super::undo::UndoStep;
use super::volumes::BACKUP_SNAPSHOT_PREFIX;
use crate::app::App;
use crate::ceph::path::CephPath;
use crate::ceph::rbd::Rbd;
use crate::error::AgentResult;
use crate::model::VmSpec;
use crate::qemu_img::{nbd, CreateOptions};
use crate::stop::Stop;
use crate::wire::native::IncrementalBy;

/// Whether every volume of the VM is an RBD image (a VM with file volumes too is compared).
pub fn all_on_ceph(spec: &VmSpec) -> bool {
    spec.volumes.iter().all(|v| v.is_rbd())
}

/// The RBD images of the VM's volumes, in volume order.
fn images(spec: &VmSpec) -> Vec<CephPath> {
    spec.volumes.iter().filter_map(|v| CephPath::parse(&v.install_path()).ok()).collect()
}

/// Whether every image has snapshot `previous`; `None` when they all do, else why not.
pub async fn chain_broken(rbd: &dyn Rbd, images: &[CephPath], previous: &str, stop: &Stop) -> Option<String> {
    for image in images {
        match rbd.snapshots(image, stop).await {
            Ok(snaps) if snaps.iter().any(|s| s.name == previous) => {}
            Ok(_) => return Some(format!("image {} has no snapshot {previous}", image.image_spec())),
            Err(e) => return Some(format!("the snapshots of image {} cannot be listed: {e}", image.image_spec())),
        }
    }
    None
}

/// How incremental point `point` of group `group` of VM `spec` (all on Ceph) finds what
/// changed; `None` for a full point.
pub async fn incremental(rbd: &dyn Rbd, spec: &VmSpec, group: &str, point: usize, stop: &Stop) -> Option<Incremental> {
    let previous = checkpoint_name(group, point.checked_sub(1)?);
    Some(match chain_broken(rbd, &images(spec), &previous, stop).await {
        None => Incremental { by: IncrementalBy::SnapshotDiff, reason: None },
        Some(why) => Incremental::compare(why),
    })
}

/// Writes into new file `dst` an overlay on `previous` (the previous point's file beside it)
/// holding the byte ranges of snapshot `snap` (`ceph://pool/image@snap`) that changed since
/// the image's snapshot `since`.
pub async fn write_changes(
    app: &App,
    snap: &str,
    since: &str,
    previous: &str,
    dst: &Path,
    stop: &Stop,
) -> AgentResult<()> {
    let p = CephPath::parse(snap)?;
    const DOING: &str = "backing up the volume";
    let size = app.rbd.info(&p, stop).await.map_err(|e| stop.or_error(e, DOING))?.size;
    let extents = app.rbd.changed_since(&p, since, stop).await.map_err(|e| stop.or_error(e, DOING))?;
    let opts = CreateOptions::default();
    app.qemu_img
        .create_overlay(Path::new(previous), "qcow2", dst, Some(size), &opts, stop)
        .await
        .map_err(|e| stop.or_error(e, DOING))?;
    if extents.is_empty() {
        return Ok(());
    }
    // Read in the agent (one cluster connection for all), written by a qemu-nbd meanwhile.
    let (tx, rx) = nbd::chunk_channel();
    let (read, written) =
        tokio::join!(app.rbd.read_extents(&p, extents, tx, stop), app.qemu_img.write_chunks(dst, rx, stop));
    // A writer that failed cut its reader short: its own error says why.
    written.map_err(|e| stop.or_error(e, DOING))?;
    read.map_err(|e| stop.or_error(e, DOING))
}

/// Once point `point` of `group` is recorded: every other backup snapshot of the VM's images
/// (older points', other groups', temporary ones of earlier versions), as the cleanup steps
/// that remove each unless a clone depends on it.
pub async fn older(app: &App, spec: &VmSpec, group: &str, point: usize) -> Vec<UndoStep> {
    let keep = checkpoint_name(group, point);
    let stop = Stop::new();
    let mut steps = Vec::new();
    for image in images(spec) {
        let snaps = match app.rbd.snapshots(&image, &stop).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(image = %image, error = %e, "cannot list the snapshots of an image to drop old backup ones");
                continue;
            }
        };
        let older = snaps.iter().filter(|s| s.name.starts_with(BACKUP_SNAPSHOT_PREFIX) && s.name != keep);
        steps.extend(older.map(|s| UndoStep::RemoveRbdSnapshot { path: image.with_snap(&s.name).to_string() }));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ceph::fake::FakeRbd;

    #[tokio::test]
    async fn an_incremental_reads_the_snapshot_diff_only_while_every_image_has_the_previous_snapshot() {
        let (rbd, stop) = (FakeRbd::default(), Stop::new());
        let images = [CephPath::parse("rbd/a").unwrap(), CephPath::parse("rbd/b").unwrap()];
        let previous = checkpoint_name("g", 0);
        for i in &images {
            rbd.create(i, 8 << 20, &stop).await.unwrap();
            rbd.snap_create(&i.with_snap(&previous), &stop).await.unwrap();
        }
        assert_eq!(chain_broken(&rbd, &images, &previous, &stop).await, None);
        assert_eq!(rbd.changed_since(&images[0].with_snap(&previous), &previous, &stop).await.unwrap(), vec![]);

        rbd.snap_remove(&images[1].with_snap(&previous), &stop).await.unwrap();
        let why = chain_broken(&rbd, &images, &previous, &stop).await.expect("a snapshot is missing");
        assert!(why.contains("rbd/b") && why.contains(&previous), "{why}");

        rbd.remove(&images[1].with_snap(&previous), &stop).await.unwrap();
        let why = chain_broken(&rbd, &images, &previous, &stop).await.expect("an image is missing");
        assert!(why.contains("rbd/b"), "{why}");
    }
}
