//! Source VMs for the tests that capture a running VM (snapshot groups, backups): a root with a
//! known pattern at 0 and a data volume with its own, a guest that reports offsets 0 and
//! [`AT`] of both disks and stays up, and writes made through the running VM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use serde_json::{json, Value};

use crate::ceph::{self, admin_key};
use crate::checks::{guest_disk_fill, qemu_io_write, virsh};
use crate::guest::{console_log, pattern, staying_kernel_boot, wait_report};
use crate::images::{data_volume_path, root_volume_path, BaseImage};
use crate::{uuid, Host};

const MIB: u64 = 1 << 20;
/// Where tests write through the running VM (the root's pattern sits at 0).
pub const AT: u64 = MIB;

pub struct SourceVm {
    pub vm: String,
    /// Install paths: files, or `ceph://rbd/<image>`.
    pub root: String,
    pub data: String,
    pub root_pattern: Vec<u8>,
    pub data_pattern: Vec<u8>,
    /// On Ceph: the cached image, the libvirt secret and `{secretUuid, monInfo}`.
    pub rbd_image: Option<String>,
    pub ceph_access: Value,
}

impl SourceVm {
    /// A VM with file volumes, the root on `base`; started (and its guest up) when `run`.
    pub async fn local(h: &Host, base: &BaseImage, run: bool) -> Result<SourceVm> {
        let (root_uuid, root) = root_volume_path(h);
        let (data_uuid, data) = data_volume_path(h);
        let vm = uuid();
        let cmd = json!({
            "vm": vm_object(h, &vm)?,
            "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
            "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 16 * MIB}],
            "strategy": "CreateStopped",
        });
        h.track_vm(&vm);
        h.call_ok("/vm/create", &cmd).await?;
        let data_pattern = pattern("DATA");
        qemu_io_write(&data, 0, &data_pattern)?;
        let s = SourceVm {
            vm,
            root: path(root),
            data: path(data),
            root_pattern: base.pattern.clone(),
            data_pattern,
            rbd_image: None,
            ceph_access: Value::Null,
        };
        if run {
            s.start(h).await?;
        }
        Ok(s)
    }

    /// A running VM with RBD volumes, the root cloned from a new cached image.
    pub async fn rbd(h: &Host) -> Result<SourceVm> {
        let secret = uuid::Uuid::new_v4().to_string();
        h.call_ok("/vm/createcephsecret", &json!({"userKey": admin_key(), "uuid": secret})).await?;
        let img = format!("image-{}", uuid());
        ceph::rbd(&["create", "--size", "32M", &format!("rbd/{img}")])?;
        let root_pattern = pattern("RBDIMG");
        ceph::write(&format!("rbd/{img}"), 0, &root_pattern);
        ceph::rbd(&["snap", "create", &format!("rbd/{img}@{img}")])?;
        let access = json!({"secretUuid": secret, "monInfo": [{"hostname": "127.0.0.1", "port": 6789}]});
        let vm = uuid();
        let (root, data) = (format!("ceph://rbd/vol-{}", uuid()), format!("ceph://rbd/vol-{}", uuid()));
        let cmd = json!({
            "vm": vm_object(h, &vm)?,
            "rootVolume": {"volumeUuid": uuid(), "installPath": root, "imagePath": format!("ceph://rbd/{img}@{img}")},
            "dataVolumes": [{"volumeUuid": uuid(), "installPath": data, "size": 16 * MIB}],
            "ceph": access,
            "strategy": "CreateStopped",
        });
        h.track_vm(&vm);
        h.call_ok("/vm/create", &cmd).await?;
        let data_pattern = pattern("RBDDATA");
        ceph::write(&rbd_spec(&data), 0, &data_pattern);
        let s = SourceVm { vm, root, data, root_pattern, data_pattern, rbd_image: Some(img), ceph_access: access };
        s.start(h).await?;
        Ok(s)
    }

    async fn start(&self, h: &Host) -> Result<()> {
        virsh(&["start", &self.vm])?;
        wait_report(&console_log(h, &self.vm), Duration::from_secs(90)).await.map(|_| ())
    }

    /// The running VM writes `byte` at [`AT`] on both disks.
    pub fn write_both(&self, byte: u8) -> Result<()> {
        for alias in ["virtio-disk0", "virtio-disk1"] {
            guest_disk_fill(&self.vm, alias, AT, 64, byte)?;
        }
        Ok(())
    }

    /// What a VM made from the instant when both disks had `byte` at [`AT`] must read.
    pub fn expect(&self, byte: u8) -> Vec<(&'static str, u64, Vec<u8>)> {
        vec![
            ("vda", 0, self.root_pattern.clone()),
            ("vdb", 0, self.data_pattern.clone()),
            ("vda", AT, vec![byte; 64]),
            ("vdb", AT, vec![byte; 64]),
        ]
    }

    /// Destroys the VM and, on Ceph, removes its images (after the `extra` images made from
    /// them), the cached image and the secret.
    pub async fn remove_rbd(self, h: &Host, extra: &[String]) -> Result<()> {
        h.call_ok("/vm/destroy", &json!({"uuid": self.vm})).await?;
        for i in extra.iter().chain([&self.root, &self.data]) {
            ceph::remove_all(&rbd_spec(i));
        }
        if let Some(img) = &self.rbd_image {
            ceph::remove_all(&format!("rbd/{img}"));
        }
        if let Some(secret) = self.ceph_access["secretUuid"].as_str() {
            let _ = virsh(&["secret-undefine", secret]);
        }
        Ok(())
    }
}

fn vm_object(h: &Host, vm: &str) -> Result<Value> {
    Ok(json!({"vmInstanceUuid": vm, "vmName": "source", "memory": 192 * MIB, "cpuNum": 1,
              "kernelBoot": staying_kernel_boot(h, &[0, AT], 2)?,
              "nics": [{"mac": "52:54:00:00:06:01", "type": "user", "deviceId": 0}]}))
}

fn path(p: PathBuf) -> String {
    p.display().to_string()
}

/// `ceph://rbd/x` → `rbd/x`.
pub fn rbd_spec(install_path: &str) -> String {
    install_path.trim_start_matches("ceph://").to_owned()
}
