//! Images the tests start from, laid out as ZStack does under the storage root.

use std::path::PathBuf;

use anyhow::Result;
use serde_json::{json, Value};

use crate::checks::{qemu_img, qemu_io_write};
use crate::{guest, uuid, Host};

/// A cached image (`imagecache/template/<uuid>/<uuid>.qcow2`) with a unique pattern at offset 0.
pub struct BaseImage {
    pub uuid: String,
    pub path: PathBuf,
    pub pattern: Vec<u8>,
    pub size: u64,
}

impl BaseImage {
    pub fn create(host: &Host, size: u64) -> Result<BaseImage> {
        let id = uuid();
        let path = host.path(&format!("imagecache/template/{id}/{id}.qcow2"));
        std::fs::create_dir_all(path.parent().expect("image dir"))?;
        qemu_img(&["create", "-q", "-f", "qcow2", &path.to_string_lossy(), &size.to_string()])?;
        let pattern = guest::pattern("BASE");
        qemu_io_write(&path, 0, &pattern)?;
        Ok(BaseImage { uuid: id, path, pattern, size })
    }
}

/// `rootVolumes/acct-<acct>/vol-<vol>/<vol>.qcow2` for a fresh volume uuid.
pub fn root_volume_path(host: &Host) -> (String, PathBuf) {
    let vol = uuid();
    (vol.clone(), host.path(&format!("rootVolumes/acct-test/vol-{vol}/{vol}.qcow2")))
}

/// `dataVolumes/acct-<acct>/vol-<vol>/<vol>.qcow2` for a fresh volume uuid.
pub fn data_volume_path(host: &Host) -> (String, PathBuf) {
    let vol = uuid();
    (vol.clone(), host.path(&format!("dataVolumes/acct-test/vol-{vol}/{vol}.qcow2")))
}

/// A StartVmCmd the management node sent in ZStack's own tests (`tests/fixtures`).
pub fn startvm_fixture() -> Value {
    serde_json::from_str(include_str!("../fixtures/zstack-startvm-cmd.json")).expect("the fixture is JSON")
}

/// The fixture for a new VM (tracked for clean-up) whose root is a new volume made from `base`
/// by `/localstorage/volume/createvolumefromcache`; returns the VM's uuid and the command.
pub async fn fixture_vm_on_a_new_root(host: &Host, base: &BaseImage) -> Result<(String, Value)> {
    let (root_uuid, root) = root_volume_path(host);
    let body = json!({"templatePathInCache": base.path, "installUrl": root, "volumeUuid": root_uuid, "virtualSize": 0});
    host.call_ok("/localstorage/volume/createvolumefromcache", &body).await?;
    let vm = uuid();
    host.track_vm(&vm);
    let mut cmd = startvm_fixture();
    cmd["vmInstanceUuid"] = json!(vm);
    cmd["rootVolume"]["installPath"] = json!(root);
    cmd["rootVolume"]["volumeUuid"] = json!(root_uuid);
    Ok((vm, cmd))
}
