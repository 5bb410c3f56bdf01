//! libvirt secrets: the cephx key QEMU uses to open RBD disks.

use super::{Libvirt, LibvirtError};
use crate::domain::xml_escape;

impl Libvirt {
    /// Defines (or redefines) the ceph-usage secret `uuid` and sets its value to `key` (the raw
    /// bytes of a cephx key).
    pub async fn set_ceph_secret(&self, uuid: &str, key: Vec<u8>) -> Result<(), LibvirtError> {
        let existing = uuid.to_owned();
        let uuid = xml_escape(uuid);
        let xml = format!(
            "<secret ephemeral='no' private='yes'><uuid>{uuid}</uuid><usage type='ceph'><name>{uuid}</name></usage></secret>"
        );
        self.call("secretDefineXML", move |c| {
            let existed = c.lookup_secret_by_uuid_string(&existing).is_ok();
            let s = c.define_secret_xml(&xml, 0).map_err(|e| LibvirtError::from_virt("secretDefineXML", e))?;
            s.set_value(&key, 0).map_err(|e| {
                // A new secret without its value is of no use to anyone: it does not stay.
                if !existed {
                    if let Err(u) = s.undefine() {
                        tracing::error!(error = %u, "cannot undefine a secret whose value could not be set");
                    }
                }
                LibvirtError::from_virt("secretSetValue", e)
            })
        })
        .await
    }
}
