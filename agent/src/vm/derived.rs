//! A new VM made from another VM's recorded spec (a clone, a VM from a snapshot group or from a
//! backup): fresh identity (uuid, serial, NIC MACs), the caller's overrides (name, offering,
//! NICs, platform...) and volumes retargeted to new install paths.

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;

use crate::api::native::{CephAccess, NewVmTarget, NewVolume};
use crate::api::vm::{NicTo, StartVmCmd, VolumeTo};
use crate::error::{AgentError, AgentResult};
use crate::storage::location::Location;

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
pub fn fresh_nics(source: &[NicTo], given: Option<&Vec<Value>>) -> AgentResult<Vec<NicTo>> {
    match given {
        Some(nics) => crate::api::decode(&Value::Array(nics.clone())),
        None => Ok(source
            .iter()
            .map(|n| NicTo { mac: random_mac(), uuid: random_uuid(), nic_internal_name: String::new(), ..n.clone() })
            .collect()),
    }
}

/// `origin` (a volume of the source VM) moved to `install_path` under a new uuid.
pub fn retarget(
    origin: &VolumeTo,
    install_path: String,
    volume_uuid: String,
    ceph: Option<&CephAccess>,
) -> AgentResult<VolumeTo> {
    let mut v = VolumeTo { install_path, volume_uuid, ..origin.clone() };
    if Location::is_rbd(&v.install_path) {
        v.device_type = "ceph".into();
        v.format = "raw".into();
        if let Some(c) = ceph {
            v.secret_uuid = c.secret_uuid.clone();
            v.mon_info =
                crate::api::decode(&Value::Array(c.mon_info.clone())).map_err(|e| e.context("ceph.monInfo"))?;
        }
    } else {
        v.device_type = "file".into();
        v.format = "qcow2".into();
    }
    Ok(v)
}

/// The spec of a new VM made from `base` as `target` asks, and per new volume (root first)
/// the uuid of the `base` volume it is made from. `identify` says which base volume a
/// request entry names (by source volume uuid, snapshot path...), `None` when it names none.
pub fn derive(
    base: &StartVmCmd,
    target: &NewVmTarget,
    identify: impl Fn(&NewVolume) -> AgentResult<Option<String>>,
) -> AgentResult<(StartVmCmd, Vec<String>)> {
    let root = &base.root_volume;
    let root_req = target.root_volume.clone().unwrap_or_default();
    if let Some(named) = identify(&root_req).map_err(|e| e.context("rootVolume"))? {
        if named != root.volume_uuid {
            return Err(AgentError::invalid(format!(
                "rootVolume names volume {named}, which is not the root volume {} of the source",
                root.volume_uuid
            )));
        }
    }
    let mut picked: Vec<(&VolumeTo, NewVolume)> = vec![(root, root_req)];
    match &target.data_volumes {
        None => picked.extend(base.data_volumes.iter().map(|v| (v, NewVolume::default()))),
        Some(list) => {
            let mut seen = HashSet::new();
            for (i, req) in list.iter().enumerate() {
                let at = || format!("dataVolumes[{i}]");
                let named = identify(req).map_err(|e| e.context(at()))?.ok_or_else(|| {
                    AgentError::invalid(format!("{}: name the source volume (sourceVolumeUuid)", at()))
                })?;
                let origin = base.data_volumes.iter().find(|v| v.volume_uuid == named).ok_or_else(|| {
                    AgentError::invalid(format!("{}: volume {named} is not a data volume of the source", at()))
                })?;
                if !seen.insert(named.clone()) {
                    return Err(AgentError::invalid(format!("{}: volume {named} is named twice", at())));
                }
                picked.push((origin, req.clone()));
            }
        }
    }

    let mut vm = serde_json::to_value(base)
        .map_err(|e| AgentError::internal(format!("cannot encode the source spec: {e}")))?
        .as_object()
        .cloned()
        .unwrap_or_default();
    vm.remove("nics");
    vm.insert("systemSerialNumber".into(), Value::String(uuid::Uuid::new_v4().to_string()));
    vm.insert("vmInstanceUuid".into(), Value::String(random_uuid()));
    vm.extend(target.vm.clone());
    let nics =
        fresh_nics(&base.nics, target.vm.get("nics").and_then(Value::as_array)).map_err(|e| e.context("vm.nics"))?;
    vm.remove("nics");
    let mut spec: StartVmCmd = crate::api::decode(&Value::Object(vm)).map_err(|e| e.context("vm"))?;
    spec.nics = nics;

    let mut origins = Vec::new();
    let mut volumes = Vec::new();
    for (origin, req) in picked {
        let uuid = req.volume_uuid.clone().unwrap_or_else(random_uuid);
        let path = req.install_path.clone().unwrap_or_else(|| path_beside(&origin.install_path, &uuid));
        volumes.push(retarget(origin, path, uuid, target.ceph.as_ref())?);
        origins.push(origin.volume_uuid.clone());
    }
    let mut volumes = volumes.into_iter();
    spec.root_volume = volumes.next().expect("the root is always picked");
    spec.data_volumes = volumes.collect();
    Ok((spec, origins))
}
