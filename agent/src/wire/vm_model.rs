//! ZStack's StartVmCmd to the agent's model and back: the one place that knows both. Into the
//! model, every value is checked once — text XML cannot carry, out-of-range sizes, unknown
//! choices (named with their field), volume locations parsed and validated; back to the wire for
//! the answers and files that carry a StartVmCmd (snapshot groups, backup manifests).

use std::collections::HashSet;

use serde_json::Value;

use super::vm::{
    CdRomTo, KernelBoot as WireKernelBoot, MonInfo, NicTo, StartVmCmd, TpmSpec, VHostAddOn, VolumeQos, VolumeTo,
};
use crate::domain::{check_uuid, device_letter, is_ifname, xml_safe};
use crate::error::{AgentError, AgentResult};
use crate::model::{
    check_disks, BootDevice, Bus, CacheMode, CdRom, Clock, Cpu, CpuMode, DiskFormat, Firmware, IoMode, IoTune,
    KernelBoot, Machine, Monitor, Nic, NicModel, NicNetwork, NicQueues, RbdAccess, Topology, TpmKey, TpmModel, Video,
    VmSpec, Volume,
};
use crate::storage::location::Location;

const MAX_MEMORY: u64 = 16 << 40;
const MAX_CPUS: u32 = 512;
/// The vCPUs a NUMA-form VM may grow to when `maxVcpuNum` is absent (ZStack's agent).
const DEFAULT_NUMA_MAX_VCPUS: u32 = 128;
/// Cores per socket of the NUMA form's topology when none is given (ZStack's agent: 32 × 4).
const NUMA_CORES_PER_SOCKET: u32 = 4;
/// Queue pairs a virtio NIC may have.
const MAX_NIC_QUEUES: u32 = 256;
/// The receive ring when `rxBufferSize` is absent (ZStack's agent).
const DEFAULT_RX_QUEUE_SIZE: u32 = 1024;
const VIDEO: [(&str, Video); 8] = [
    ("vga", Video::Vga),
    ("cirrus", Video::Cirrus),
    ("qxl", Video::Qxl),
    ("virtio", Video::Virtio),
    ("vmvga", Video::Vmvga),
    ("bochs", Video::Bochs),
    ("ramfb", Video::Ramfb),
    ("none", Video::None),
];

fn invalid(msg: String) -> AgentError {
    AgentError::invalid(msg)
}

impl StartVmCmd {
    /// The VM this command describes, in the agent's model.
    pub fn to_spec(&self) -> AgentResult<VmSpec> {
        check_uuid(&self.vm_instance_uuid)?;
        xml_safe("vmName", &self.vm_name)?;
        for (f, v) in [
            ("hostManagementIp", &self.host_management_ip),
            ("systemSerialNumber", &self.system_serial_number),
            ("chassisAssetTag", &self.chassis_asset_tag),
            ("consolePassword", &self.console_password),
            ("clock", &self.clock),
            ("imagePlatform", &self.image_platform),
        ] {
            xml_safe(f, v)?;
        }
        if self.memory < (1 << 20) || self.memory > MAX_MEMORY {
            return Err(invalid(format!("memory {} bytes is out of range (1 MiB to 16 TiB)", self.memory)));
        }
        let firmware = self.firmware()?;
        let machine = match self.machine_type.as_str() {
            // Secure Boot needs q35; the management plane's default machine is pc.
            "" if firmware == Firmware::UefiSecure => Machine::Q35,
            "" | "pc" => Machine::Pc,
            "q35" => Machine::Q35,
            other => return Err(invalid(format!("machineType {other:?} is not supported (pc or q35)"))),
        };
        firmware.check_machine(machine).map_err(invalid)?;
        let video = match self.video_type.as_str() {
            "" => Video::Vga,
            v => VIDEO
                .iter()
                .find(|(n, _)| *n == v)
                .map(|(_, m)| *m)
                .ok_or_else(|| invalid(format!("videoType {v:?} is not one of {:?}", VIDEO.map(|(n, _)| n))))?,
        };
        if self.root_volume.device_id != 0 {
            return Err(invalid(format!("rootVolume.deviceId must be 0, not {}", self.root_volume.device_id)));
        }
        let mut volumes = vec![self.root_volume.to_model("rootVolume")?];
        let volume_qos = self.volume_qos()?;
        let mut ids = HashSet::from([0]);
        for (i, v) in self.data_volumes.iter().enumerate() {
            volumes.push(v.to_model(&format!("dataVolumes[{i}]"))?);
            if !ids.insert(v.device_id) {
                return Err(invalid(format!("dataVolumes[{i}].deviceId {} is used by another disk", v.device_id)));
            }
        }
        if self.cd_roms.len() > 3 {
            return Err(invalid(format!("at most 3 cdRoms are supported, not {}", self.cd_roms.len())));
        }
        let cd_roms = self.cd_roms.iter().enumerate().map(|(i, c)| cd_rom(i, c)).collect::<AgentResult<_>>()?;
        let nics =
            self.nics.iter().enumerate().map(|(i, n)| n.to_model(&format!("nics[{i}]"))).collect::<AgentResult<_>>()?;
        if let Some(k) = &self.kernel_boot {
            for (f, v) in
                [("kernelBoot.kernel", &k.kernel), ("kernelBoot.initrd", &k.initrd), ("kernelBoot.cmdline", &k.cmdline)]
            {
                xml_safe(f, v)?;
            }
        }
        let tpm = match &self.tpm {
            Some(t) if !matches!(t.model.as_str(), "" | "tpm-crb" | "tpm-tis") => {
                return Err(invalid(format!("tpm.model {:?} is not supported (tpm-crb or tpm-tis)", t.model)))
            }
            Some(t) if t.enable => Some(if t.model == "tpm-tis" { TpmModel::Tis } else { TpmModel::Crb }),
            _ => None,
        };
        let tpm_key = self.tpm.as_ref().map(tpm_key).transpose()?.flatten();
        for v in volumes.iter_mut().filter(|v| v.iotune.is_none()) {
            v.iotune = volume_qos.get(&v.uuid).copied();
        }
        let mut boot_devices = boot_devices(&self.boot_dev)?;
        if boot_devices.is_empty() {
            boot_devices.push(BootDevice::Hd);
        }
        let spec = VmSpec {
            uuid: self.vm_instance_uuid.clone(),
            name: self.vm_name.clone(),
            internal_id: self.vm_internal_id,
            memory: self.memory,
            cpu: self.cpu()?,
            machine,
            boot_devices,
            volumes,
            cd_roms,
            nics,
            create_paused: self.create_paused,
            host_management_ip: self.host_management_ip.clone(),
            clock: match self.clock.as_str() {
                "" | "utc" => Clock::Utc,
                "localtime" => Clock::Localtime,
                other => return Err(invalid(format!("clock {other:?} is not utc or localtime"))),
            },
            serial_number: self.system_serial_number.clone(),
            chassis_asset_tag: self.chassis_asset_tag.clone(),
            console_password: self.console_password.clone(),
            video,
            image_platform: self.image_platform.clone(),
            addons: self.addons.clone(),
            tpm,
            tpm_encrypted: tpm_key.is_some(),
            tpm_key,
            kernel_boot: self.kernel_boot.as_ref().map(|k| KernelBoot {
                kernel: k.kernel.clone(),
                initrd: k.initrd.clone(),
                cmdline: k.cmdline.clone(),
            }),
            firmware,
            nvram: None,
            iothreads: self.io_threads,
            genid: None,
            cloud_init: None,
        };
        check_disks(&spec)?;
        Ok(spec)
    }

    /// ZStack's per-volume limits (`addons.VolumeQos`), by volume uuid.
    fn volume_qos(&self) -> AgentResult<std::collections::HashMap<String, IoTune>> {
        let Some(given) = self.addons.get("VolumeQos").filter(|q| !q.is_null()) else { return Ok(Default::default()) };
        let qos: std::collections::HashMap<String, Option<VolumeQos>> =
            super::decode(given).map_err(|e| e.context("addons.VolumeQos"))?;
        Ok((qos.into_iter())
            .filter_map(|(uuid, q)| {
                let q = q?;
                let tune = IoTune {
                    total_bytes_sec: Some(q.total_bandwidth).filter(|b| *b > 0),
                    total_iops_sec: Some(q.total_iops).filter(|i| *i > 0),
                    ..IoTune::default()
                };
                (tune != IoTune::default()).then_some((uuid, tune))
            })
            .collect())
    }

    /// The CPU model: `nestedVirtualization`, and `vmCpuModelName` for a named one.
    fn cpu_mode(&self) -> AgentResult<Option<CpuMode>> {
        let model = self.vm_cpu_model_name.as_str();
        // Checked even when unused: it is text the management plane meant for the domain.
        if (!model.is_empty() || self.nested_virtualization == "custom") && !is_short_name(model) {
            return Err(invalid(format!(
                "vmCpuModelName {model:?} is not a CPU model name (1 to 64 letters, digits, '-', '_' or '.')"
            )));
        }
        match self.nested_virtualization.as_str() {
            "" if model.is_empty() => Ok(None),
            "" | "custom" => Ok(Some(CpuMode::Custom(model.to_owned()))),
            "none" => Ok(None),
            "host-model" => Ok(Some(CpuMode::HostModel)),
            "host-passthrough" => Ok(Some(CpuMode::HostPassthrough)),
            other => Err(invalid(format!(
                "nestedVirtualization {other:?} is not one of none, host-model, host-passthrough, custom"
            ))),
        }
    }

    /// `bootMode` and `secureBoot` in the model.
    fn firmware(&self) -> AgentResult<Firmware> {
        match (self.boot_mode.as_str(), self.secure_boot) {
            ("" | "Legacy", false) => Ok(Firmware::Bios),
            ("" | "Legacy", true) => Err(invalid("secureBoot needs a UEFI bootMode (UEFI), not Legacy".to_owned())),
            ("UEFI" | "UEFI_WITH_CSM", false) => Ok(Firmware::Uefi),
            ("UEFI" | "UEFI_WITH_CSM", true) => Ok(Firmware::UefiSecure),
            (other, _) => Err(invalid(format!("bootMode {other:?} is not one of Legacy, UEFI, UEFI_WITH_CSM"))),
        }
    }

    /// The vCPUs and their topology. In the NUMA form (`useNuma`) the VM may grow to
    /// `maxVcpuNum` (128 when absent, as ZStack's agent) and the topology holds all of them;
    /// otherwise it holds `cpuNum`. Without `socketNum` the NUMA form gets ZStack's topology
    /// (sockets of 4 cores: 32 × 4 for 128 vCPUs), the other form none. A topology that does not
    /// hold exactly those vCPUs is refused, its fields named.
    fn cpu(&self) -> AgentResult<Cpu> {
        let max =
            self.use_numa.then_some(if self.max_vcpu_num == 0 { DEFAULT_NUMA_MAX_VCPUS } else { self.max_vcpu_num });
        if self.cpu_num == 0 || self.cpu_num > MAX_CPUS || self.max_vcpu_num > MAX_CPUS {
            return Err(invalid(format!(
                "cpuNum {} / maxVcpuNum {} out of range (1 to {MAX_CPUS})",
                self.cpu_num, self.max_vcpu_num
            )));
        }
        if let Some(m) = max.filter(|m| *m < self.cpu_num) {
            return Err(invalid(format!(
                "maxVcpuNum {m} is less than cpuNum {}: with useNuma the VM starts with cpuNum vCPUs and may grow \
                 to maxVcpuNum; give a maxVcpuNum of at least cpuNum",
                self.cpu_num
            )));
        }
        // Each at most MAX_CPUS, so that their product cannot overflow.
        for (f, v) in [
            ("socketNum", self.socket_num),
            ("cpuOnSocket", self.cpu_on_socket),
            ("threadsPerCore", self.threads_per_core),
        ] {
            if let Some(n) = v.filter(|n| *n > MAX_CPUS) {
                return Err(invalid(format!("{f} {n} is out of range (at most {MAX_CPUS})")));
            }
        }
        let topology = match (self.socket_num.filter(|s| *s > 0), max) {
            (Some(sockets), _) => Some(self.given_topology(sockets, max)?),
            (None, Some(m)) if m % NUMA_CORES_PER_SOCKET == 0 => {
                Some(Topology { sockets: m / NUMA_CORES_PER_SOCKET, cores: NUMA_CORES_PER_SOCKET, threads: 1 })
            }
            (None, Some(m)) => Some(Topology { sockets: m, cores: 1, threads: 1 }),
            (None, None) => None,
        };
        Ok(Cpu { count: self.cpu_num, max, topology, mode: self.cpu_mode()? })
    }

    /// `socketNum` × `cpuOnSocket` × `threadsPerCore` (1 when absent), which must hold exactly
    /// the VM's vCPUs: `max` in the NUMA form, `cpuNum` otherwise.
    fn given_topology(&self, sockets: u32, max: Option<u32>) -> AgentResult<Topology> {
        let cores = self.cpu_on_socket.unwrap_or(0);
        let threads = self.threads_per_core.unwrap_or(1);
        let holds = sockets * cores * threads;
        let (field, vcpus) = match max {
            Some(m) => ("maxVcpuNum (useNuma: every vCPU the VM may grow to)", m),
            None => ("cpuNum", self.cpu_num),
        };
        if holds != vcpus {
            return Err(invalid(format!(
                "socketNum {sockets} × cpuOnSocket {} × threadsPerCore {threads} = {holds} vCPUs, but {field} is \
                 {vcpus}: give a topology whose product is {vcpus}",
                self.cpu_on_socket.map_or("absent".to_owned(), |c| c.to_string())
            )));
        }
        Ok(Topology { sockets, cores, threads })
    }

    /// The wire form of `spec`, for answers and files that carry a StartVmCmd.
    pub fn from_spec(spec: &VmSpec) -> StartVmCmd {
        let mut volumes = spec.volumes.iter().map(volume_to);
        StartVmCmd {
            vm_instance_uuid: spec.uuid.clone(),
            vm_name: spec.name.clone(),
            vm_internal_id: spec.internal_id,
            memory: spec.memory,
            cpu_num: spec.cpu.count,
            max_vcpu_num: spec.cpu.max.unwrap_or(0),
            socket_num: spec.cpu.topology.map(|t| t.sockets),
            cpu_on_socket: spec.cpu.topology.map(|t| t.cores),
            threads_per_core: spec.cpu.topology.map(|t| t.threads),
            use_numa: spec.cpu.max.is_some(),
            machine_type: spec.machine.as_str().into(),
            boot_mode: if spec.firmware.is_uefi() { "UEFI" } else { "Legacy" }.into(),
            secure_boot: spec.firmware == Firmware::UefiSecure,
            boot_dev: spec.boot_devices.iter().map(|d| d.as_str().to_owned()).collect(),
            root_volume: volumes.next().expect("a spec always has its root"),
            data_volumes: volumes.collect(),
            cd_roms: spec.cd_roms.iter().map(cd_rom_to).collect(),
            nics: spec.nics.iter().map(nic_to).collect(),
            create_paused: spec.create_paused,
            host_management_ip: spec.host_management_ip.clone(),
            clock: match spec.clock {
                Clock::Utc => "utc",
                Clock::Localtime => "localtime",
            }
            .into(),
            system_serial_number: spec.serial_number.clone(),
            chassis_asset_tag: spec.chassis_asset_tag.clone(),
            console_password: spec.console_password.clone(),
            video_type: VIDEO.iter().find(|(_, v)| *v == spec.video).map_or("vga", |(n, _)| n).into(),
            image_platform: spec.image_platform.clone(),
            addons: spec.addons.clone(),
            tpm: spec.tpm.map(|m| TpmSpec {
                enable: true,
                model: match m {
                    TpmModel::Crb => "tpm-crb",
                    TpmModel::Tis => "tpm-tis",
                }
                .into(),
                key: String::new(),
            }),
            kernel_boot: spec.kernel_boot.as_ref().map(|k| WireKernelBoot {
                kernel: k.kernel.clone(),
                initrd: k.initrd.clone(),
                cmdline: k.cmdline.clone(),
            }),
            nested_virtualization: spec.cpu.mode.as_ref().map_or("", CpuMode::libvirt_mode).into(),
            vm_cpu_model_name: spec.cpu.mode.as_ref().and_then(CpuMode::model).unwrap_or_default().into(),
            io_threads: spec.iothreads,
        }
    }
}

/// 1 to 64 letters, digits, `-`, `_` and `.`: what a disk's serial (the volume uuid; what libvirt
/// and the guest's `/dev/disk/by-id` names carry) and a CPU model's name may be.
fn is_short_name(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The key of `tpm.key`: base64 of an AES-256 key, for an enabled TPM only.
fn tpm_key(t: &TpmSpec) -> AgentResult<Option<TpmKey>> {
    use base64::Engine;
    if t.key.is_empty() {
        return Ok(None);
    }
    if !t.enable {
        return Err(invalid("tpm.key is given but tpm.enable is false; enable the TPM or leave the key out".into()));
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(t.key.trim())
        .map_err(|e| invalid(format!("tpm.key is not base64: {e}")))?;
    if key.len() != 32 {
        return Err(invalid(format!(
            "tpm.key holds {} bytes; give the base64 of 32 bytes (an AES-256 key)",
            key.len()
        )));
    }
    Ok(Some(TpmKey(key)))
}

/// `bootDev` (ZStack's names: `hd`, `cdrom`, `network`) in the model: in order, each device
/// once; a name that is none of these is refused.
pub fn boot_devices(names: &[String]) -> AgentResult<Vec<BootDevice>> {
    let mut devices = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let device = BootDevice::ALL.iter().find(|(n, _)| n == name).map(|(_, d)| *d).ok_or_else(|| {
            invalid(format!("bootDev[{i}] {name:?} is not a boot device {:?}", BootDevice::ALL.map(|(n, _)| n)))
        })?;
        if !devices.contains(&device) {
            devices.push(device);
        }
    }
    Ok(devices)
}

impl VolumeTo {
    /// The volume in the model; errors name `field`.
    pub fn to_model(&self, field: &str) -> AgentResult<Volume> {
        volume(field, self)
    }
}

impl NicTo {
    /// The NIC in the model; errors name `field`.
    pub fn to_model(&self, field: &str) -> AgentResult<Nic> {
        nic(field, self)
    }
}

fn volume(field: &str, v: &VolumeTo) -> AgentResult<Volume> {
    xml_safe(&format!("{field}.installPath"), &v.install_path)?;
    if !is_short_name(&v.volume_uuid) {
        return Err(invalid(format!(
            "{field}.volumeUuid {:?} cannot be a disk serial: 1 to 64 letters, digits, '-', '_' or '.'",
            v.volume_uuid
        )));
    }
    device_letter(v.device_id).map_err(|e| e.context(format!("{field}.deviceId")))?;
    let (location, rbd) = match v.device_type.as_str() {
        "file" if !v.install_path.starts_with('/') => {
            return Err(invalid(format!("{field}.installPath {:?} must be an absolute path", v.install_path)))
        }
        "file" => (Location::File(v.install_path.clone().into()), None),
        "ceph" => {
            let p = crate::ceph::path::CephPath::parse(&v.install_path)
                .and_then(|p| p.require_image().map(|_| p))
                .map_err(|e| invalid(format!("{field}.installPath: {}", e.details)))?;
            let monitors = (v.mon_info.iter())
                .map(|m| Monitor { host: m.hostname.clone(), port: Some(m.port).filter(|p| *p > 0) })
                .collect();
            let secret_uuid = v.secret_uuid.clone().filter(|s| !s.is_empty());
            (Location::Rbd(p), Some(RbdAccess { secret_uuid, monitors }))
        }
        other => return Err(invalid(format!("{field}.deviceType {other:?} is not supported (file or ceph)"))),
    };
    let format = match (v.format.as_str(), &location) {
        ("qcow2", _) | ("", Location::File(_)) => DiskFormat::Qcow2,
        ("raw", _) | ("", Location::Rbd(_)) => DiskFormat::Raw,
        (other, _) => return Err(invalid(format!("{field}.format {other:?} is not supported (qcow2 or raw)"))),
    };
    let cache = match v.cache_mode.as_str() {
        "" => CacheMode::None,
        c => CacheMode::ALL.iter().find(|(n, _)| *n == c).map(|(_, m)| *m).ok_or_else(|| {
            invalid(format!("{field}.cacheMode {c:?} is not one of {:?}", CacheMode::ALL.map(|(n, _)| n)))
        })?,
    };
    let bus = match (v.bus.as_str(), v.use_virtio_scsi, v.use_virtio) {
        ("", true, _) => Bus::Scsi,
        ("", false, true) => Bus::Virtio,
        ("", false, false) => Bus::Sata,
        (b, _, _) => Bus::ALL
            .iter()
            .find(|(n, _)| *n == b)
            .map(|(_, m)| *m)
            .ok_or_else(|| invalid(format!("{field}.bus {b:?} is not one of {:?}", Bus::ALL.map(|(n, _)| n))))?,
    };
    let io =
        match v.io_mode.as_str() {
            "" => None,
            m => Some(IoMode::ALL.iter().find(|(n, _)| *n == m).map(|(_, io)| *io).ok_or_else(|| {
                invalid(format!("{field}.ioMode {m:?} is not one of {:?}", IoMode::ALL.map(|(n, _)| n)))
            })?),
        };
    Ok(Volume {
        uuid: v.volume_uuid.clone(),
        location,
        device_id: v.device_id,
        format,
        bus,
        cache,
        shareable: v.shareable,
        boot_order: Some(v.boot_order).filter(|o| *o > 0),
        rbd,
        io,
        iothread: Some(v.io_thread_id).filter(|t| *t > 0),
        iotune: v.iotune,
    })
}

fn volume_to(v: &Volume) -> VolumeTo {
    VolumeTo {
        install_path: v.install_path(),
        device_id: v.device_id,
        device_type: if v.is_rbd() { "ceph" } else { "file" }.into(),
        volume_uuid: v.uuid.clone(),
        use_virtio: v.bus == Bus::Virtio,
        use_virtio_scsi: v.bus == Bus::Scsi,
        shareable: v.shareable,
        cache_mode: v.cache.as_str().into(),
        boot_order: v.boot_order.unwrap_or(0),
        format: v.format.as_str().into(),
        secret_uuid: v.rbd.as_ref().and_then(|r| r.secret_uuid.clone()),
        mon_info: (v.rbd.iter().flat_map(|r| &r.monitors))
            .map(|m| MonInfo { hostname: m.host.clone(), port: m.port.unwrap_or(0) })
            .collect(),
        bus: v.bus.as_str().into(),
        io_mode: v.io.map_or("", IoMode::as_str).into(),
        io_thread_id: v.iothread.unwrap_or(0),
        iotune: v.iotune,
    }
}

fn cd_rom(i: usize, c: &CdRomTo) -> AgentResult<CdRom> {
    xml_safe(&format!("cdRoms[{i}].path"), &c.path)?;
    let iso = (!c.is_empty && !c.path.is_empty()).then(|| c.path.clone());
    if iso.as_deref().is_some_and(|p| !p.starts_with('/')) {
        return Err(invalid(format!("cdRoms[{i}].path {:?} must be an absolute path", c.path)));
    }
    Ok(CdRom {
        resource_uuid: c.resource_uuid.clone(),
        iso,
        device_id: c.device_id,
        boot_order: Some(c.boot_order).filter(|o| *o > 0),
    })
}

fn cd_rom_to(c: &CdRom) -> CdRomTo {
    CdRomTo {
        resource_uuid: c.resource_uuid.clone(),
        path: c.iso.clone().unwrap_or_default(),
        device_id: c.device_id,
        is_empty: c.iso.is_none(),
        boot_order: c.boot_order.unwrap_or(0),
    }
}

pub(crate) fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn nic(field: &str, n: &NicTo) -> AgentResult<Nic> {
    if !is_mac(&n.mac) {
        return Err(invalid(format!("{field}.mac {:?} is not a MAC address (xx:xx:xx:xx:xx:xx)", n.mac)));
    }
    let network = match n.nic_type.as_str() {
        "user" => NicNetwork::User,
        "" | "VNIC" if is_ifname(&n.bridge_name) => NicNetwork::Bridge(n.bridge_name.clone()),
        "" | "VNIC" => {
            return Err(invalid(format!("{field}.bridgeName {:?} is not a valid Linux interface name", n.bridge_name)))
        }
        other => return Err(invalid(format!("{field}.type {other:?} is not supported (VNIC or user)"))),
    };
    let model = match n.driver_type.as_str() {
        "" if n.use_virtio => NicModel::Virtio,
        "" => NicModel::E1000,
        "virtio" => NicModel::Virtio,
        "e1000" => NicModel::E1000,
        "rtl8139" => NicModel::Rtl8139,
        other => {
            return Err(invalid(format!("{field}.driverType {other:?} is not supported (virtio, e1000, rtl8139)")))
        }
    };
    xml_safe(&format!("{field}.uuid"), &n.uuid)?;
    let queues = match &n.v_host_add_on {
        Some(addon) => nic_queues(&format!("{field}.vHostAddOn"), addon, model)?,
        None => None,
    };
    if queues.is_some() && network == NicNetwork::User {
        return Err(invalid(format!(
            "{field}.vHostAddOn.queueNum: user-mode networking has one queue; multi-queue needs a bridge NIC"
        )));
    }
    Ok(Nic {
        mac: n.mac.clone(),
        uuid: n.uuid.clone(),
        device_id: n.device_id,
        internal_name: n.nic_internal_name.clone(),
        network,
        model,
        mtu: n.mtu.filter(|m| *m > 0),
        link_up: n.state != "disable",
        boot_order: Some(n.boot_order).filter(|o| *o > 0),
        queues,
    })
}

/// A virtio NIC's queues as ZStack's agent renders them: only a virtio NIC with more than one
/// queue pair gets any (the receive ring 1024 unless given); the ring sizes, where given, are
/// powers of two from 256 to 1024 (QEMU's bounds).
fn nic_queues(field: &str, addon: &VHostAddOn, model: NicModel) -> AgentResult<Option<NicQueues>> {
    if addon.queue_num > MAX_NIC_QUEUES {
        return Err(invalid(format!("{field}.queueNum {} is out of range (1 to {MAX_NIC_QUEUES})", addon.queue_num)));
    }
    let ring = |name: &str, v: &Option<String>| -> AgentResult<Option<u32>> {
        let Some(text) = v.as_deref().filter(|t| !t.is_empty()) else { return Ok(None) };
        match text.parse::<u32>() {
            Ok(n) if n.is_power_of_two() && (256..=1024).contains(&n) => Ok(Some(n)),
            _ => Err(invalid(format!("{field}.{name} {text:?} is not a ring size: a power of two from 256 to 1024"))),
        }
    };
    let rx = ring("rxBufferSize", &addon.rx_buffer_size)?;
    let tx = ring("txBufferSize", &addon.tx_buffer_size)?;
    Ok((model == NicModel::Virtio && addon.queue_num > 1).then(|| NicQueues {
        queues: addon.queue_num,
        rx_queue_size: rx.unwrap_or(DEFAULT_RX_QUEUE_SIZE),
        tx_queue_size: tx,
    }))
}

fn nic_to(n: &Nic) -> NicTo {
    NicTo {
        mac: n.mac.clone(),
        uuid: n.uuid.clone(),
        device_id: n.device_id,
        nic_internal_name: n.internal_name.clone(),
        bridge_name: match &n.network {
            NicNetwork::Bridge(b) => b.clone(),
            NicNetwork::User => String::new(),
        },
        mtu: n.mtu,
        use_virtio: n.model == NicModel::Virtio,
        driver_type: n.model.as_str().into(),
        boot_order: n.boot_order.unwrap_or(0),
        nic_type: match n.network {
            NicNetwork::User => "user",
            NicNetwork::Bridge(_) => "VNIC",
        }
        .into(),
        state: if n.link_up { "enable" } else { "disable" }.into(),
        v_host_add_on: n.queues.map(|q| VHostAddOn {
            queue_num: q.queues,
            rx_buffer_size: Some(q.rx_queue_size.to_string()),
            tx_buffer_size: q.tx_queue_size.map(|t| t.to_string()),
        }),
    }
}

/// NicTOs (as a management plane sends them for a new VM) in the model.
pub fn nics(given: &[Value]) -> AgentResult<Vec<Nic>> {
    let wire: Vec<NicTo> = super::decode(&Value::Array(given.to_vec()))?;
    wire.iter().enumerate().map(|(i, n)| n.to_model(&format!("nics[{i}]"))).collect()
}
