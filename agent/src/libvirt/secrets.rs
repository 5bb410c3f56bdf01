//! libvirt secrets: the cephx key QEMU uses to open RBD disks.

use super::{Libvirt, LibvirtError};
use crate::domain::xml_escape;

impl Libvirt {
    /// Defines (or redefines) the ceph-usage secret `uuid` and sets its value to `key` (the raw
    /// bytes of a cephx key).
    pub async fn set_ceph_secret(&self, uuid: &str, key: Vec<u8>) -> Result<(), LibvirtError> {
        let uuid = xml_escape(uuid);
        let xml = format!(
            "<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid><usage type='ceph'><name>{uuid}</name></usage></secret>"
        );
        self.call("secretDefineXML", move |c| {
            let s = c.define_secret_xml(&xml, 0).map_err(|e| LibvirtError::from_virt("secretDefineXML", e))?;
            s.set_value(&key, 0).map_err(|e| LibvirtError::from_virt("secretSetValue", e))
        })
        .await
    }
}
