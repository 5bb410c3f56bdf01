//! A new VM made from another VM's recorded spec (a clone, a VM from a snapshot group or from a
//! backup): fresh identity (uuid, serial, NIC MACs), the caller's overrides (name, offering,
//! NICs, platform...) and volumes retargeted to new install paths.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{AgentError, AgentResult};
use crate::model::{Monitor, Nic, RbdAccess, VmSpec, Volume};
use crate::storage::location::Location;
use crate::wire::native::{CephAccess, NewVmTarget, NewVolume};
use crate::wire::vm::MonInfo;

pub fn random_uuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// A locally administered unicast MAC in QEMU's range.
fn random_mac() -> String {
    let b = uuid::Uuid::new_v4().into_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// `<...>/vol-<old>/<file>` → `<...>/vol-<new>/<new>.qcow2`: ZStack's layout, beside the source;
/// on Ceph, a new image in the source's pool.
pub fn path_beside(source: &str, new_volume: &str) -> String {
    if let Ok(Location::Rbd(p)) = Location::parse(source) {
        return Location::rbd_image(&p.pool, new_volume);
    }
    let p = Path::new(source);
    let base = p.parent().and_then(Path::parent).unwrap_or(Path::new("/"));
    base.join(format!("vol-{new_volume}")).join(format!("{new_volume}.qcow2")).display().to_string()
}

/// The NICs of a new VM: `given` NicTOs, or the source's NICs with fresh MACs and uuids.
pub fn fresh_nics(source: &[Nic], given: Option<&Vec<Value>>) -> AgentResult<Vec<Nic>> {
    match given {
        Some(nics) => crate::wire::vm_model::nics(nics),
        None => Ok(source
            .iter()
            .map(|n| Nic { mac: random_mac(), uuid: random_uuid(), internal_name: String::new(), ..n.clone() })
            .collect()),
    }
}

/// `origin` (a volume of the source VM) moved to `install_path` under a new uuid; an RBD volume
/// is reached as `ceph` says.
pub fn retarget(
    origin: &Volume,
    install_path: String,
    volume_uuid: String,
    ceph: Option<&CephAccess>,
) -> AgentResult<Volume> {
    let location = Location::parse(&install_path)?;
    let rbd = match ceph {
        Some(c) => {
            let mons: Vec<MonInfo> =
                crate::wire::decode(&Value::Array(c.mon_info.clone())).map_err(|e| e.context("ceph.monInfo"))?;
            Some(RbdAccess {
                secret_uuid: c.secret_uuid.clone().filter(|s| !s.is_empty()),
                monitors: mons
                    .into_iter()
                    .map(|m| Monitor { host: m.hostname, port: Some(m.port).filter(|p| *p > 0) })
                    .collect(),
            })
        }
        None => origin.rbd.clone(),
    };
    Ok(origin.moved_to(volume_uuid, location, rbd))
}

/// The spec of a new VM made from `base` as `target` asks, and per new volume (root first)
/// the uuid of the `base` volume it is made from. `identify` says which base volume a
/// request entry names (by source volume uuid, snapshot path...), `None` when it names none.
pub fn derive(
    base: &VmSpec,
    target: &NewVmTarget,
    identify: impl Fn(&NewVolume) -> AgentResult<Option<String>>,
) -> AgentResult<(VmSpec, Vec<String>)> {
    let root = base.root();
    let root_req = target.root_volume.clone().unwrap_or_default();
    if let Some(named) = identify(&root_req).map_err(|e| e.context("rootVolume"))? {
        if named != root.uuid {
            return Err(AgentError::invalid(format!(
                "rootVolume names volume {named}, which is not the root volume {} of the source",
                root.uuid
            )));
        }
    }
    let mut picked: Vec<(&Volume, NewVolume)> = vec![(root, root_req)];
    match &target.data_volumes {
        None => picked.extend(base.data_volumes().iter().map(|v| (v, NewVolume::default()))),
        Some(list) => {
            let mut seen = HashSet::new();
            for (i, req) in list.iter().enumerate() {
                let at = || format!("dataVolumes[{i}]");
                let named = identify(req).map_err(|e| e.context(at()))?.ok_or_else(|| {
                    AgentError::invalid(format!("{}: name the source volume (sourceVolumeUuid)", at()))
                })?;
                let origin = base.data_volumes().iter().find(|v| v.uuid == named).ok_or_else(|| {
                    AgentError::invalid(format!("{}: volume {named} is not a data volume of the source", at()))
                })?;
                if !seen.insert(named.clone()) {
                    return Err(AgentError::invalid(format!("{}: volume {named} is named twice", at())));
                }
                picked.push((origin, req.clone()));
            }
        }
    }

    let mut spec = target.overlay(base)?;
    spec.nics = fresh_nics(&base.nics, target.nics()).map_err(|e| e.context("vm.nics"))?;

    let mut origins = Vec::new();
    let mut volumes = Vec::new();
    for (origin, req) in picked {
        let uuid = req.volume_uuid.clone().unwrap_or_else(random_uuid);
        let path = req.install_path.clone().unwrap_or_else(|| path_beside(&origin.install_path(), &uuid));
        volumes.push(retarget(origin, path, uuid, target.ceph.as_ref())?);
        origins.push(origin.uuid.clone());
    }
    spec.volumes = volumes;
    Ok((spec, origins))
}
