//! Host admission, facts, capacity, VM state sync, and cancellation.

use std::path::Path;

use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::host_identity::Identity;
use crate::host_info;
use crate::kvm_params;
use crate::libvirt::domains::VmState;
use crate::tasks::TaskCtx;
use crate::wire::host::*;

pub async fn connect(app: &App, _ctx: &TaskCtx, cmd: ConnectCmd) -> AgentResult<ConnectRsp> {
    connect_with(app, cmd, Path::new(kvm_params::SYS_MODULE)).await
}

/// `/host/connect` with the module parameters under `modules` (`/sys/module` but in tests).
pub(super) async fn connect_with(app: &App, cmd: ConnectCmd, modules: &Path) -> AgentResult<ConnectRsp> {
    if uuid::Uuid::try_parse(&cmd.host_uuid).is_err() {
        return Err(AgentError::invalid(format!("hostUuid {:?} is not a uuid", cmd.host_uuid)));
    }
    if let Some(url) = &cmd.send_command_url {
        crate::callbacks::client::parse_url(url).map_err(|e| AgentError::invalid(format!("sendCommandUrl: {e}")))?;
    }
    // Ask libvirt first: a connect that fails must leave the stored identity as it was.
    let (libvirt_version, qemu_version) = app.libvirt.versions().await?;
    if let Some(url) = &cmd.send_command_url {
        if let Err(e) = app.sources.learn_callback_host(url) {
            tracing::error!(error = %e, "cannot remember the management node's callback host");
        }
    }
    let identity =
        Identity { host_uuid: Some(cmd.host_uuid), send_command_url: cmd.send_command_url, version: cmd.version };
    app.identity.set(identity).map_err(|e| {
        AgentError::failed(
            "cannot persist the host identity",
            format!("{e}; check that the state directory is writable"),
        )
    })?;
    apply_host_settings(
        modules,
        &cmd.iptables_rules,
        cmd.ignore_msrs,
        cmd.page_table_extension_disabled,
        cmd.tcp_server_port,
    );
    Ok(ConnectRsp { libvirt_version, qemu_version })
}

/// What ZStack's agent does to the host at connect, where it is safe: `ignore_msrs` is set;
/// the rest is logged for the operator. Never fails the connect: the host runs VMs either way.
fn apply_host_settings(
    modules: &Path,
    iptables_rules: &Option<Vec<String>>,
    ignore_msrs: bool,
    ept_disabled: bool,
    tcp_server_port: Option<u32>,
) {
    match kvm_params::set_ignore_msrs(modules, ignore_msrs) {
        Ok(true) => tracing::info!(ignore_msrs, "kvm ignore_msrs set as the management node asks"),
        Ok(false) => tracing::debug!(ignore_msrs, "kvm ignore_msrs already as the management node asks"),
        Err(e @ kvm_params::ParamError::Absent { .. }) => tracing::info!(ignore_msrs, "ignore_msrs not set: {e}"),
        Err(e) => tracing::warn!(ignore_msrs, "ignore_msrs not set: {e}"),
    }
    match kvm_params::check_ept(modules, !ept_disabled) {
        Ok(kvm_params::Ept::Differs { enabled }) => {
            let want = if ept_disabled { "N" } else { "Y" };
            tracing::warn!(
                ept_enabled = enabled,
                "the management node asks for kvm_intel EPT {}, which is {} now: left as it is, because changing it \
                 means unloading kvm_intel, which every running VM prevents. To apply it: put `options kvm_intel ept={want}` \
                 in /etc/modprobe.d/ and reload kvm_intel (`modprobe -r kvm_intel && modprobe kvm_intel`) with no VM \
                 running, or reboot",
                if ept_disabled { "off" } else { "on" },
                if enabled { "on" } else { "off" },
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("kvm_intel EPT not checked: {e}"),
    }
    if let Some(rules) = iptables_rules.as_ref().filter(|r| !r.is_empty()) {
        tracing::warn!(
            ?rules,
            "the management node asks for {} iptables rules: left to the operator (this agent does not change \
             the host firewall); add them to the host's firewall configuration",
            rules.len()
        );
    }
    if let Some(port) = tcp_server_port.filter(|p| *p != 0) {
        tracing::info!(
            port,
            "the management node's TCP liveness port is not used: this agent answers /host/ping, which the \
             management node's ping task relies on"
        );
    }
}

/// `/host/update/configuration`, as ZStack's agent serves it: a management node that took the
/// host over (its ping saw another `sendCommandUrl`) says where agent-initiated commands and
/// progress go now. The host uuid and version stay as the last connect set them.
pub async fn update_configuration(
    app: &App,
    _ctx: &TaskCtx,
    cmd: UpdateConfigurationCmd,
) -> AgentResult<UpdateConfigurationRsp> {
    let url = cmd
        .send_command_url
        .ok_or_else(|| AgentError::invalid("sendCommandUrl is missing: it names where this host's reports go"))?;
    crate::callbacks::client::parse_url(&url).map_err(|e| AgentError::invalid(format!("sendCommandUrl: {e}")))?;
    let current = app.identity.get();
    let Some(known) = &current.host_uuid else {
        return Err(AgentError::invalid(
            "this host was never connected: a management node sends /host/connect before it updates the configuration",
        ));
    };
    if let Some(given) = cmd.host_uuid.as_ref().filter(|g| *g != known) {
        return Err(AgentError::invalid(format!(
            "hostUuid {given} is not this host ({known}); connect the host again to change its uuid"
        )));
    }
    if let Err(e) = app.sources.learn_callback_host(&url) {
        tracing::error!(error = %e, "cannot remember the management node's callback host");
    }
    app.identity.set(crate::host_identity::Identity { send_command_url: Some(url), ..current }).map_err(|e| {
        AgentError::failed(
            "cannot persist the host identity",
            format!("{e}; check that the state directory is writable"),
        )
    })?;
    Ok(UpdateConfigurationRsp {})
}

pub async fn ping(app: &App, _ctx: &TaskCtx, _cmd: PingCmd) -> AgentResult<PingRsp> {
    let id = app.identity.get();
    Ok(PingRsp { host_uuid: id.host_uuid, send_command_url: id.send_command_url, version: id.version })
}

pub async fn fact(app: &App, ctx: &TaskCtx, _cmd: crate::wire::Empty) -> AgentResult<FactRsp> {
    let (libvirt_version, qemu_version) = app.libvirt.versions().await?;
    let caps = host_info::parse_capabilities(&app.libvirt.capabilities().await?)
        .map_err(|e| AgentError::failed("cannot read libvirt's host capabilities", e))?;
    let qemu_img_version = host_info::qemu_img_version(&ctx.stop).await?;
    let cpu = host_info::cpu_info();
    let os = host_info::os_release();
    let dmi = host_info::dmi();
    Ok(FactRsp {
        hvm_cpu_flag: cpu.hvm_flag,
        ept_flag: cpu.ept_flag,
        cpu_model_name: caps.cpu_model,
        cpu_ghz: cpu.ghz(),
        cpu_processor_num: cpu.logical_cpus.to_string(),
        host_cpu_model_name: cpu.model_name,
        cpu_architecture: host_info::architecture(),
        os_distribution: os.distribution,
        os_version: os.version,
        os_release: os.release,
        libvirt_version,
        qemu_img_version,
        hostname: host_info::hostname(),
        libvirt_capabilities: caps.features,
        virtualizer_info: VirtualizerInfo {
            uuid: app.identity.get().host_uuid,
            virtualizer: "qemu-kvm",
            version: qemu_version,
        },
        system_product_name: dmi.product_name,
        system_serial_number: dmi.serial_number,
        system_manufacturer: dmi.manufacturer,
        system_uuid: dmi.uuid,
        bios_vendor: dmi.bios_vendor,
        bios_version: dmi.bios_version,
        bios_release_date: dmi.bios_release_date,
        memory_slots_maximum: dmi.memory_slots.map(|n| n.to_string()),
        uptime: host_info::boot_time(),
        ip_addresses: host_info::ipv4_addresses(),
        iscsi_initiator_name: host_info::iscsi_initiator_name(),
    })
}

pub async fn capacity(_app: &App, _ctx: &TaskCtx, _cmd: crate::wire::Empty) -> AgentResult<CapacityRsp> {
    let cpu = host_info::cpu_info();
    let mem = host_info::memory();
    Ok(CapacityRsp {
        cpu_num: cpu.logical_cpus,
        cpu_speed: cpu.mhz as u64,
        used_cpu: 0,
        total_memory: mem.total,
        used_memory: mem.total.saturating_sub(mem.available),
        cpu_sockets: cpu.sockets,
    })
}

/// `/vm/vmsync`, as ZStack's agent answers it (vm_plugin.py `get_vm_state_from_libvirt`).
pub async fn vm_sync(app: &App, _ctx: &TaskCtx, _cmd: crate::wire::Empty) -> AgentResult<VmSyncRsp> {
    let (states, in_shutdown) = app.libvirt.list_vm_states().await?;
    Ok(sync_states(states, in_shutdown))
}

/// Only VMs whose QEMU runs are reported (ZStack's agent lists active domains): a domain that is
/// defined but shut off — its QEMU exited or was killed — is left out, and the management node
/// takes a VM missing from the answer as stopped (VmTracer `handleMissingVm`); reporting it
/// `Shutdown` would make a VM it no longer knows a "stranger". A guest that is shutting down or
/// rebooting keeps its QEMU: it is `Running`, and named in `vmInShutdowns` (the management node
/// warns when one stays there).
fn sync_states(states: Vec<(String, VmState)>, in_shutdown: Vec<String>) -> VmSyncRsp {
    let states = (states.into_iter())
        .filter_map(|(vm, state)| match state {
            _ if in_shutdown.contains(&vm) => Some((vm, VmState::Running)),
            VmState::Shutdown => None,
            other => Some((vm, other)),
        })
        .collect();
    VmSyncRsp { states, vm_in_shutdowns: in_shutdown }
}

pub async fn cancel(app: &App, _ctx: &TaskCtx, cmd: CancelCmd) -> AgentResult<CancelRsp> {
    match app.tasks.cancel_by_api(&cmd.cancellation_api_id) {
        0 => Err(AgentError::not_found(format!(
            "no matched job to cancel: no running task carries api id {}",
            cmd.cancellation_api_id
        ))),
        n => Ok(CancelRsp { cancelled: n }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_sync_reports_running_qemus_only_and_a_guest_shutting_down_as_running() {
        let vm = |n: char| n.to_string().repeat(32);
        let states = vec![
            (vm('a'), VmState::Running),
            (vm('b'), VmState::Shutdown),
            (vm('c'), VmState::Shutdown),
            (vm('d'), VmState::Paused),
            (vm('e'), VmState::Crashed),
        ];
        let rsp = sync_states(states, vec![vm('c')]);
        let got: Vec<(&str, VmState)> = rsp.states.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            got,
            [
                (vm('a').as_str(), VmState::Running),
                (vm('c').as_str(), VmState::Running),
                (vm('d').as_str(), VmState::Paused),
                (vm('e').as_str(), VmState::Crashed)
            ],
            "a shut-off domain is left out; one shutting down is Running"
        );
        assert_eq!(rsp.vm_in_shutdowns, [vm('c')]);
    }
}
