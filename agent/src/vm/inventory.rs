//! The `VmInstanceInventory` of a VM this agent made, from its spec and its volumes' real sizes.

use crate::api::inventory::{VmCdRomInventory, VmInstanceInventory, VmNicInventory, VolumeInventory};
use crate::api::vm::{StartVmCmd, VolumeTo};
use crate::app::App;
use crate::error::AgentResult;
use crate::tasks::TaskCtx;

async fn volume(app: &App, vm: &str, v: &VolumeTo, ctx: &TaskCtx) -> AgentResult<VolumeInventory> {
    let (size, actual_size) = super::volumes::store(app, &v.install_path)?.sizes(&v.install_path, &ctx.stop).await?;
    Ok(VolumeInventory {
        uuid: v.volume_uuid.clone(),
        name: if v.device_id == 0 { format!("ROOT-for-{vm}") } else { format!("DATA-{}-for-{vm}", v.device_id) },
        vm_instance_uuid: vm.to_owned(),
        install_path: v.install_path.clone(),
        volume_type: if v.device_id == 0 { "Root" } else { "Data" },
        format: if v.format.is_empty() { "qcow2".into() } else { v.format.clone() },
        size,
        actual_size,
        device_id: v.device_id,
        state: "Enabled",
        status: "Ready",
        is_shareable: v.shareable,
    })
}

/// `state`: `Running`, `Paused`, `Stopped` or `Created`.
pub async fn of(app: &App, spec: &StartVmCmd, state: &str, ctx: &TaskCtx) -> AgentResult<VmInstanceInventory> {
    let vm = &spec.vm_instance_uuid;
    let mut all_volumes = Vec::new();
    for v in spec.volumes() {
        all_volumes.push(volume(app, vm, v, ctx).await?);
    }
    Ok(VmInstanceInventory {
        uuid: vm.clone(),
        name: spec.vm_name.clone(),
        state: state.to_owned(),
        hypervisor_type: "KVM",
        vm_type: "UserVm",
        memory_size: spec.memory,
        cpu_num: spec.cpu_num,
        platform: if spec.image_platform.is_empty() { "Linux".into() } else { spec.image_platform.clone() },
        architecture: crate::host_info::architecture(),
        internal_id: spec.vm_internal_id,
        root_volume_uuid: spec.root_volume.volume_uuid.clone(),
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
                internal_name: n.nic_internal_name.clone(),
                driver_type: if n.driver_type.is_empty() { "virtio".into() } else { n.driver_type.clone() },
                nic_type: if n.nic_type.is_empty() { "VNIC".into() } else { n.nic_type.clone() },
            })
            .collect(),
        vm_cd_roms: spec
            .cd_roms
            .iter()
            .map(|c| VmCdRomInventory {
                uuid: c.resource_uuid.clone(),
                vm_instance_uuid: vm.clone(),
                device_id: c.device_id,
                iso_install_path: (!c.is_empty && !c.path.is_empty()).then(|| c.path.clone()),
                name: format!("vm-{vm}-cdRom-{}", c.device_id),
            })
            .collect(),
    })
}
