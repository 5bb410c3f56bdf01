//! The ZStack paths around a running VM: `/vm/reboot`, `/vm/pause`, `/vm/resume`, hot-plugged
//! data volumes (`/vm/attachdatavolume`, `/vm/detachdatavolume`), ISOs (`/vm/iso/attach`,
//! `/vm/iso/detach`) and NICs (`/vm/attachnic`, `/vm/detachnic`), `/vm/getvncport`,
//! `/vm/checkstate` and `/vm/volumesync`.
//!
//! Every change to a VM's devices is made under the VM's lock, to the running domain (live and
//! in its definition) and to the VM's record alike: the device is rendered from the record with
//! the change, so a later reboot, clone, snapshot group or flatten sees the VM as it runs. The
//! VM must run here and be known here (started or created by this agent).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::app::App;
use crate::domain::{self, Device, LiveKey};
use crate::error::{AgentError, AgentResult};
use crate::libvirt::domains::VmState;
use crate::model::{Bus, VmSpec};
use crate::ops::{self, owner::VmGuard};
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::vm::VirtualDeviceInfo;
use crate::wire::vm_devices::{
    AttachDeviceRsp, AttachIsoCmd, CheckVmStateCmd, CheckVmStateRsp, DataVolumeCmd, DetachIsoCmd, GetVncPortCmd,
    GetVncPortRsp, NicCmd, PauseVmCmd, RebootVmCmd, RebootVmRsp, VolumeSyncCmd, VolumeSyncRsp,
};
use crate::wire::Empty;

/// How long a guest may take to release an unplugged device.
const UNPLUG_WAIT: Duration = Duration::from_secs(60);

/// The state of VM `vm`, which must be running (or paused) here to have devices changed.
async fn active(app: &App, vm: &str, what: &str) -> AgentResult<VmState> {
    match app.libvirt.domain_state(vm).await? {
        Some(s) if s.is_active() => Ok(s),
        _ => Err(AgentError::conflict(format!(
            "VM {vm} is not running on this host; {what} needs a running VM (a stopped VM gets its devices from its next /vm/start)"
        ))),
    }
}

/// The VM's record and its running domain, under its lock.
async fn running(app: &App, vm: &str, what: &str) -> AgentResult<(VmGuard, VmSpec)> {
    let owner = app.vms.lock(vm).await?;
    let spec = owner.load()?;
    active(app, vm, what).await?;
    Ok((owner, spec))
}

/// `/vm/reboot`: the guest is asked to shut down (powered off after `timeout` seconds), then
/// the domain is defined again from the VM's record, booting from `bootDev`, and started: a new
/// QEMU process, as ZStack's agent does it.
pub async fn reboot(app: &App, _ctx: &TaskCtx, cmd: RebootVmCmd) -> AgentResult<RebootVmRsp> {
    let grace = crate::wire::vm::grace_period(cmd.timeout)?;
    let boot = crate::wire::vm_model::boot_devices(&cmd.boot_dev)?;
    let (owner, mut spec) = running(app, &cmd.uuid, "a reboot").await?;
    if !boot.is_empty() {
        spec.boot_devices = boot;
    }
    spec.create_paused = false;
    if !app.libvirt.shutdown_and_wait(&cmd.uuid, grace).await? {
        tracing::info!(vm = %cmd.uuid, "guest did not shut down in time; powering it off to reboot it");
    }
    app.libvirt.destroy(&cmd.uuid).await?;
    ops::define_and_start(app, &owner, &spec).await?;
    Ok(RebootVmRsp { virtualizer_info: super::vm::virtualizer_info(app, cmd.uuid).await? })
}

/// `/vm/pause`: a paused VM stays paused.
pub async fn pause(app: &App, _ctx: &TaskCtx, cmd: PauseVmCmd) -> AgentResult<Empty> {
    let _owner = app.vms.lock(&cmd.uuid).await?;
    if active(app, &cmd.uuid, "pausing").await? != VmState::Paused {
        app.libvirt.suspend(&cmd.uuid).await?;
    }
    Ok(Empty {})
}

/// `/vm/resume`: a running VM runs on.
pub async fn resume(app: &App, _ctx: &TaskCtx, cmd: PauseVmCmd) -> AgentResult<Empty> {
    let _owner = app.vms.lock(&cmd.uuid).await?;
    if active(app, &cmd.uuid, "resuming").await? != VmState::Running {
        app.libvirt.resume(&cmd.uuid).await?;
    }
    Ok(Empty {})
}

/// Plugs `device` of `spec` (the record with the new device) into the running domain, then
/// records `spec`; if the record cannot be written the device is unplugged again.
async fn plug(app: &App, owner: &VmGuard, spec: &VmSpec, device: Device<'_>) -> AgentResult<String> {
    let vm = &spec.uuid;
    let xml = domain::render_device(spec, &ops::settings(app, vm), device)?;
    app.libvirt
        .attach_device(vm, xml.clone())
        .await
        .map_err(|e| AgentError::from(e).context(format!("plugging into VM {vm}")))?;
    if let Err(e) = owner.save(spec) {
        if let Err(u) = app.libvirt.detach_device(vm, xml).await {
            tracing::error!(vm = %vm, error = %u, "cannot unplug a device the VM record could not take");
        }
        return Err(e);
    }
    Ok(app.libvirt.xml(vm).await?)
}

/// Unplugs the device `key` names from running domain `vm` and waits until the guest has let
/// it go. A device the domain does not have is already unplugged.
async fn unplug(app: &App, vm: &str, key: &LiveKey) -> AgentResult<()> {
    let live = app.libvirt.xml(vm).await?;
    let Some(range) = domain::device_range(&live, key)? else { return Ok(()) };
    app.libvirt.detach_device(vm, live[range].to_owned()).await?;
    let deadline = tokio::time::Instant::now() + UNPLUG_WAIT;
    while domain::device_range(&app.libvirt.xml(vm).await?, key)?.is_some() {
        if tokio::time::Instant::now() >= deadline {
            return Err(AgentError::failed(
                "the guest did not release the device",
                format!(
                    "VM {vm} still has {key:?} {} s after it was unplugged; detach it again",
                    UNPLUG_WAIT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// The address libvirt gave the device with serial or MAC `id`, named `resource` for ZStack.
fn address_of(live: &str, id: &str, resource: &str) -> AgentResult<AttachDeviceRsp> {
    let info = domain::device_info(live)?;
    let disks = info.virtual_device_info_list.into_iter().filter(|d| d.resource_uuid == id);
    let nics = (info.nic_infos.into_iter())
        .filter(|n| n.mac_address.eq_ignore_ascii_case(id))
        .map(|n| VirtualDeviceInfo { resource_uuid: resource.to_owned(), device_address: n.device_address });
    Ok(AttachDeviceRsp { virtual_device_info_list: disks.chain(nics).collect() })
}

/// `/vm/attachdatavolume`: hot-plugs a data volume (a file under the storage roots, or RBD).
/// Attaching a volume the VM already has there again answers its address.
pub async fn attach_volume(app: &App, _ctx: &TaskCtx, cmd: DataVolumeCmd) -> AgentResult<AttachDeviceRsp> {
    let mut volume = cmd.volume.to_model("volume")?;
    if volume.device_id == 0 {
        return Err(AgentError::invalid("volume.deviceId 0 is the root volume's; a data volume needs another"));
    }
    if matches!(volume.bus, Bus::Sata | Bus::Ide) {
        return Err(AgentError::invalid(format!(
            "volume.bus {}: QEMU cannot hot-plug SATA or IDE disks; attach it on bus virtio or scsi, or stop the VM",
            volume.bus.as_str()
        )));
    }
    let (owner, mut spec) = running(app, &cmd.vm_instance_uuid, "attaching a volume").await?;
    let vm = spec.uuid.clone();
    if let Some(have) = spec.volumes.iter().find(|v| v.uuid == volume.uuid || v.device_id == volume.device_id) {
        if have.uuid == volume.uuid && have.location == volume.location {
            return address_of(&app.libvirt.xml(&vm).await?, &volume.uuid, &volume.uuid);
        }
        return Err(AgentError::invalid(format!(
            "VM {vm} already has volume {} at deviceId {} ({}); detach it first",
            have.uuid,
            have.device_id,
            have.install_path()
        )));
    }
    let _volume_lock = app.volume_locks.write(&volume.install_path()).await?;
    ops::check_volume(app, &mut volume)?;
    if let Location::File(p) = &volume.location {
        if !volume.shareable && crate::storage::local::is_open_by_any_process(p) {
            return Err(AgentError::conflict(format!(
                "volume {} ({}) is in use by another process (another VM?); detach it there first",
                volume.uuid,
                p.display()
            )));
        }
    }
    // A running virtio-scsi controller keeps the iothread it started with.
    let controller = spec.volumes.iter().any(|v| v.bus == Bus::Scsi).then(|| crate::model::scsi_iothread(&spec));
    if let Some(running) = controller.filter(|t| volume.bus == Bus::Scsi && *t != volume.iothread) {
        return Err(AgentError::invalid(format!(
            "volume.ioThreadId {:?}: the running virtio-scsi controller of VM {vm} has iothread {running:?}, and \
             every scsi disk is on it; give that or stop the VM",
            volume.iothread
        )));
    }
    let uuid = volume.uuid.clone();
    spec.volumes.push(volume);
    crate::model::check_disks(&spec).map_err(|e| e.context("volume"))?;
    let live = plug(app, &owner, &spec, Device::Disk(&uuid)).await?;
    address_of(&live, &uuid, &uuid)
}

/// `/vm/detachdatavolume`: unplugs a data volume; one the VM does not have is detached already.
pub async fn detach_volume(app: &App, _ctx: &TaskCtx, cmd: DataVolumeCmd) -> AgentResult<Empty> {
    let uuid = &cmd.volume.volume_uuid;
    let (owner, mut spec) = running(app, &cmd.vm_instance_uuid, "detaching a volume").await?;
    let vm = spec.uuid.clone();
    if spec.root().uuid == *uuid {
        return Err(AgentError::invalid(format!("volume {uuid} is the root volume of VM {vm}; it cannot be detached")));
    }
    let live = domain::live_disks(&app.libvirt.xml(&vm).await?)?;
    if let Some(disk) = live.into_iter().find(|d| d.serial.as_deref() == Some(uuid.as_str())) {
        unplug(app, &vm, &LiveKey::Target(disk.target)).await?;
    }
    spec.volumes.retain(|v| v.uuid != *uuid);
    owner.save(&spec)?;
    Ok(Empty {})
}

/// Puts `iso` (or no medium) into the CD-ROM drive `device_id` of the running VM.
async fn change_medium(app: &App, vm: &str, device_id: u32, iso: Option<String>) -> AgentResult<Empty> {
    let what = if iso.is_some() { "attaching an ISO" } else { "detaching an ISO" };
    let (owner, mut spec) = running(app, vm, what).await?;
    let Some(drive) = spec.cd_roms.iter_mut().find(|c| c.device_id == device_id) else {
        return Err(AgentError::invalid(format!(
            "VM {vm} has no CD-ROM drive with deviceId {device_id}; a VM gets its drives from /vm/start (cdRoms)"
        )));
    };
    drive.iso = iso;
    let xml = domain::render_device(&spec, &ops::settings(app, vm), Device::Cdrom(device_id))?;
    app.libvirt.update_device(vm, xml).await?;
    owner.save(&spec)?;
    Ok(Empty {})
}

/// `/vm/iso/attach`: the ISO must be a file under the storage roots.
pub async fn attach_iso(app: &App, _ctx: &TaskCtx, cmd: AttachIsoCmd) -> AgentResult<Empty> {
    domain::xml_safe("iso.path", &cmd.iso.path)?;
    if !cmd.iso.path.starts_with('/') {
        return Err(AgentError::invalid(format!(
            "iso.path {:?} is not supported: this agent attaches ISO files under its storage roots",
            cmd.iso.path
        )));
    }
    app.storage.roots().confine_existing(&cmd.iso.path)?;
    change_medium(app, &cmd.vm_uuid, cmd.iso.device_id, Some(cmd.iso.path)).await
}

/// `/vm/iso/detach`: ejects the medium.
pub async fn detach_iso(app: &App, _ctx: &TaskCtx, cmd: DetachIsoCmd) -> AgentResult<Empty> {
    tracing::debug!(vm = %cmd.vm_uuid, iso = %cmd.iso_uuid, "ejecting");
    change_medium(app, &cmd.vm_uuid, cmd.device_id, None).await
}

/// `/vm/attachnic`: hot-plugs a NIC. Attaching a MAC the VM already has answers its address.
pub async fn attach_nic(app: &App, _ctx: &TaskCtx, cmd: NicCmd) -> AgentResult<AttachDeviceRsp> {
    let nic = cmd.nic.to_model("nic")?;
    let (owner, mut spec) = running(app, &cmd.vm_uuid, "attaching a NIC").await?;
    let (mac, uuid) = (nic.mac.clone(), nic.uuid.clone());
    let live = match spec.nics.iter().find(|n| n.mac.eq_ignore_ascii_case(&mac)) {
        Some(have) if *have == nic => app.libvirt.xml(&cmd.vm_uuid).await?,
        Some(have) => {
            return Err(AgentError::invalid(format!(
                "VM {} already has a NIC with MAC {mac} (nic {}); detach it first",
                cmd.vm_uuid, have.uuid
            )))
        }
        None => {
            spec.nics.push(nic);
            plug(app, &owner, &spec, Device::Interface(&mac)).await?
        }
    };
    address_of(&live, &mac, &uuid)
}

/// `/vm/detachnic`: unplugs a NIC; one the VM does not have is detached already.
pub async fn detach_nic(app: &App, _ctx: &TaskCtx, cmd: NicCmd) -> AgentResult<Empty> {
    let (owner, mut spec) = running(app, &cmd.vm_uuid, "detaching a NIC").await?;
    let mac = &cmd.nic.mac;
    unplug(app, &cmd.vm_uuid, &LiveKey::Mac(mac.clone())).await?;
    spec.nics.retain(|n| !n.mac.eq_ignore_ascii_case(mac));
    owner.save(&spec)?;
    Ok(Empty {})
}

/// `/vm/getvncport`: the VNC port QEMU listens on.
pub async fn get_vnc_port(app: &App, _ctx: &TaskCtx, cmd: GetVncPortCmd) -> AgentResult<GetVncPortRsp> {
    let _owner = app.vms.lock(&cmd.vm_uuid).await?;
    active(app, &cmd.vm_uuid, "a console").await?;
    let live = app.libvirt.xml(&cmd.vm_uuid).await?;
    let doc = roxmltree::Document::parse(&live)
        .map_err(|e| AgentError::internal(format!("libvirt returned unparsable domain XML: {e}")))?;
    let port = (doc.descendants())
        .find(|n| n.has_tag_name("graphics") && n.attribute("type") == Some("vnc"))
        .and_then(|g| g.attribute("port")?.parse::<i32>().ok())
        .filter(|p| *p > 0)
        .ok_or_else(|| AgentError::failed("no VNC console", format!("VM {} has no VNC port", cmd.vm_uuid)))?;
    Ok(GetVncPortRsp { port, protocol: "vnc".into(), vnc_port: port })
}

/// `/vm/checkstate`: each VM's state; a VM with no domain here is `Shutdown`.
pub async fn check_state(app: &App, _ctx: &TaskCtx, cmd: CheckVmStateCmd) -> AgentResult<CheckVmStateRsp> {
    cmd.vm_uuids.iter().try_for_each(|vm| domain::check_uuid(vm))?;
    let (states, _) = app.libvirt.list_vm_states().await?;
    let states: BTreeMap<String, VmState> = states.into_iter().collect();
    Ok(CheckVmStateRsp {
        states: (cmd.vm_uuids.into_iter())
            .map(|vm| {
                let s = states.get(&vm).copied().unwrap_or(VmState::Shutdown);
                (vm, s)
            })
            .collect(),
    })
}

/// The files (and directories) a `file://` storage path of `/vm/volumesync` covers: the
/// entries of a directory, or those of a file's directory whose names match the file's name
/// (a `*` in it matches any run of characters; without one the name is a prefix).
fn volume_sync_entries(app: &App, path: &str) -> AgentResult<Vec<PathBuf>> {
    let given = Path::new(path);
    let (dir, pattern) = if given.is_dir() {
        (given, "*".to_owned())
    } else {
        let name = given.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let pattern = if name.contains('*') { name } else { format!("{name}*") };
        (given.parent().unwrap_or(Path::new("/")), pattern)
    };
    let dir = app.storage.roots().confine(&dir.display().to_string())?;
    Ok((std::fs::read_dir(&dir).into_iter().flatten().flatten())
        .filter(|e| wildcard_match(&pattern, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect())
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// `/vm/volumesync`: under each `file://` storage path, the volume files no running domain
/// uses (a file is used when a domain's disk or a file of its chain is it or lies under it),
/// reported once unused at this sync and at the one before, as ZStack's agent does. Other
/// protocols report nothing.
pub async fn volume_sync(app: &App, _ctx: &TaskCtx, cmd: VolumeSyncCmd) -> AgentResult<VolumeSyncRsp> {
    let mut covered = Vec::new();
    for url in &cmd.storage_paths {
        domain::xml_safe("storagePaths", url)?;
        let entries = match url.strip_prefix("file://") {
            Some(path) => volume_sync_entries(app, path)?,
            None => Vec::new(),
        };
        covered.push((url.clone(), entries));
    }
    let mut used = BTreeSet::new();
    for (vm, state) in app.libvirt.list_vm_states().await?.0 {
        if !state.is_active() {
            continue;
        }
        let Ok(xml) = app.libvirt.xml(&vm).await else { continue };
        let doc = roxmltree::Document::parse(&xml)
            .map_err(|e| AgentError::internal(format!("libvirt returned unparsable domain XML: {e}")))?;
        used.extend(
            doc.descendants()
                .filter(|n| n.has_tag_name("source"))
                .filter_map(|n| n.attribute("file"))
                .map(PathBuf::from),
        );
    }
    let unused: BTreeMap<String, BTreeSet<String>> = (covered.into_iter())
        .map(|(url, entries)| {
            let free = entries.into_iter().filter(|e| !used.iter().any(|u| u.starts_with(e)));
            (url, free.map(|e| e.display().to_string()).collect())
        })
        .collect();
    let mut last = app.inactive_volumes.lock().unwrap_or_else(|p| p.into_inner());
    let twice = (unused.iter())
        .filter_map(|(url, now)| {
            let both: Vec<String> = now.intersection(last.get(url)?).cloned().collect();
            (!both.is_empty()).then(|| (url.clone(), both))
        })
        .collect();
    *last = unused;
    Ok(VolumeSyncRsp { inactive_volume_paths: twice })
}
