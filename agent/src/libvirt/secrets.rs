//! libvirt secrets: the cephx key QEMU uses to open RBD disks, and the key swtpm encrypts a
//! VM's TPM state with.

use super::rpc::procedures::Secret;
use super::rpc::Connection;
use super::{code, Libvirt, LibvirtError};
use crate::domain::xml_escape;

/// `VIR_SECRET_USAGE_TYPE_VTPM`.
const USAGE_VTPM: i32 = 5;

/// libvirt's "no secret with matching uuid" (VIR_ERR_NO_SECRET).
fn is_no_secret(e: &LibvirtError) -> bool {
    matches!(e, LibvirtError::Call { code, .. } if *code == code::NO_SECRET)
}

impl Libvirt {
    /// Defines (or redefines) the ceph-usage secret `uuid` and sets its value to `key` (the raw
    /// bytes of a cephx key).
    pub async fn set_ceph_secret(&self, uuid: &str, key: Vec<u8>) -> Result<(), LibvirtError> {
        let u = xml_escape(uuid);
        let xml = format!(
            "<secret ephemeral='no' private='yes'><uuid>{u}</uuid><usage type='ceph'><name>{u}</name></usage></secret>"
        );
        self.define_secret(uuid, xml, key).await
    }

    /// Defines (or redefines) the vtpm-usage secret `uuid` of VM `vm` and sets its value to
    /// `key`. Not private: a clone's own secret is given the same value, read back.
    pub async fn set_vtpm_secret(&self, uuid: &str, vm: &str, key: Vec<u8>) -> Result<(), LibvirtError> {
        let (u, vm) = (xml_escape(uuid), xml_escape(vm));
        let xml = format!(
            "<secret ephemeral='no' private='no'><uuid>{u}</uuid><description>TPM state key of VM {vm}</description>\
             <usage type='vtpm'><name>kvmagent-vtpm-{vm}</name></usage></secret>"
        );
        self.define_secret(uuid, xml, key).await
    }

    async fn define_secret(&self, uuid: &str, xml: String, key: Vec<u8>) -> Result<(), LibvirtError> {
        let existing = uuid.to_owned();
        self.call("secretDefineXML", move |c| {
            let existed = c.lookup_secret(&existing).is_ok();
            let s = c.define_secret(&xml)?;
            c.set_secret_value(&s, &key).inspect_err(|_| {
                // A new secret without its value is of no use to anyone: it does not stay.
                if !existed {
                    if let Err(u) = c.undefine_secret(&s) {
                        tracing::error!(error = %u, "cannot undefine a secret whose value could not be set");
                    }
                }
            })
        })
        .await
    }

    /// The value of vtpm secret `uuid`, or `None` when there is no such secret.
    pub async fn vtpm_secret_value(&self, uuid: &str) -> Result<Option<Vec<u8>>, LibvirtError> {
        let uuid = uuid.to_owned();
        self.call("secretGetValue", move |c| match vtpm_secret(c, &uuid)? {
            None => Ok(None),
            Some(s) => c.secret_value(&s).map(Some),
        })
        .await
    }

    /// Removes vtpm secret `uuid`; a missing one is success.
    pub async fn remove_vtpm_secret(&self, uuid: &str) -> Result<(), LibvirtError> {
        let uuid = uuid.to_owned();
        self.call("secretUndefine", move |c| match vtpm_secret(c, &uuid)? {
            None => Ok(()),
            Some(s) => match c.undefine_secret(&s) {
                Err(e) if !is_no_secret(&e) => Err(e),
                _ => Ok(()),
            },
        })
        .await
    }
}

/// Secret `uuid` when it is of usage vtpm: a secret of another usage that happens to have the
/// uuid is none of the TPM's business.
fn vtpm_secret(c: &Connection, uuid: &str) -> Result<Option<Secret>, LibvirtError> {
    match c.lookup_secret(uuid) {
        Err(e) if is_no_secret(&e) => Ok(None),
        Err(e) => Err(e),
        Ok(s) => Ok((s.usage_type == USAGE_VTPM).then_some(s)),
    }
}
