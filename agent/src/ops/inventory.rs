//! The `VmInstanceInventory` of a VM this agent made, from its spec and its volumes' real sizes.

use crate::app::App;
use crate::error::AgentResult;
use crate::model::{NicNetwork, VmSpec, Volume};
use crate::tasks::TaskCtx;
use crate::wire::inventory::{VmCdRomInventory, VmInstanceInventory, VmNicInventory, VolumeInventory};

async fn volume(app: &App, vm: &str, v: &Volume, ctx: &TaskCtx) -> AgentResult<VolumeInventory> {
    let path = v.install_path();
    let (size, actual_size) = super::volumes::store(app, &path)?.sizes(&path, &ctx.stop).await?;
    Ok(VolumeInventory {
        uuid: v.uuid.clone(),
        name: if v.device_id == 0 { format!("ROOT-for-{vm}") } else { format!("DATA-{}-for-{vm}", v.device_id) },
        vm_instance_uuid: vm.to_owned(),
        install_path: path,
        volume_type: v.volume_type(),
        format: v.format.as_str().into(),
        size,
        actual_size,
        device_id: v.device_id,
        state: "Enabled",
        status: "Ready",
        is_shareable: v.shareable,
    })
}

/// `state`: `Running`, `Paused`, `Stopped` or `Created`.
pub async fn of(app: &App, spec: &VmSpec, state: &str, ctx: &TaskCtx) -> AgentResult<VmInstanceInventory> {
    let vm = &spec.uuid;
    let mut all_volumes = Vec::new();
    for v in spec.volumes.iter() {
        all_volumes.push(volume(app, vm, v, ctx).await?);
    }
    Ok(VmInstanceInventory {
        uuid: vm.clone(),
        name: spec.name.clone(),
        state: state.to_owned(),
        hypervisor_type: "KVM",
        vm_type: "UserVm",
        memory_size: spec.memory,
        cpu_num: spec.cpu.count,
        platform: if spec.image_platform.is_empty() { "Linux".into() } else { spec.image_platform.clone() },
        architecture: crate::host_info::architecture(),
        internal_id: spec.internal_id,
        root_volume_uuid: spec.root().uuid.clone(),
        host_uuid: app.identity.get().host_uuid,
        all_volumes,
        vm_nics: spec
            .nics
            .iter()
            .map(|n| VmNicInventory {
                uuid: n.uuid.clone(),
                vm_instance_uuid: vm.clone(),
                mac: n.mac.clone(),
                device_id: n.device_id,
                internal_name: n.internal_name.clone(),
                driver_type: n.model.as_str().into(),
                nic_type: match n.network {
                    NicNetwork::User => "user",
                    NicNetwork::Bridge(_) => "VNIC",
                }
                .into(),
            })
            .collect(),
        vm_cd_roms: spec
            .cd_roms
            .iter()
            .map(|c| VmCdRomInventory {
                uuid: c.resource_uuid.clone(),
                vm_instance_uuid: vm.clone(),
                device_id: c.device_id,
                iso_install_path: c.iso.clone(),
                name: format!("vm-{vm}-cdRom-{}", c.device_id),
            })
            .collect(),
    })
}
