//! The guest agent (qemu-guest-agent in the guest, on the `org.qemu.guest_agent.0` channel
//! every domain gets): whether it is connected, and freezing and thawing the guest's
//! filesystems.

use std::time::Duration;

use super::rpc::{Connection, Domain};
use super::{Libvirt, LibvirtError};

/// The name of the guest agent's virtio-serial port.
pub const CHANNEL: &str = "org.qemu.guest_agent.0";

/// Whether live domain XML shows the guest agent's channel connected: libvirt marks it so
/// once the guest has opened its end, and refuses agent commands at once until then.
pub fn agent_connected(live_xml: &str) -> bool {
    let Ok(doc) = roxmltree::Document::parse(live_xml) else { return false };
    doc.descendants().filter(|n| n.has_tag_name("channel")).flat_map(|c| c.children()).any(|t| {
        t.has_tag_name("target") && t.attribute("name") == Some(CHANNEL) && t.attribute("state") == Some("connected")
    })
}

/// Bounds how long libvirt waits for the agent's answers to `d`'s agent commands (by default
/// it waits for ever).
fn bound_agent_wait(c: &Connection, d: &Domain, timeout: Duration) -> Result<(), LibvirtError> {
    c.set_agent_timeout(d, i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX).max(1))
}

impl Libvirt {
    /// Whether the guest agent of domain `vm` is connected.
    pub async fn guest_agent_connected(&self, vm: &str) -> Result<bool, LibvirtError> {
        Ok(agent_connected(&self.xml(vm).await?))
    }

    /// Freezes every filesystem of the guest of `vm` through its agent (`virDomainFSFreeze`),
    /// waiting at most `timeout` for the agent; returns how many were frozen.
    pub async fn guest_fs_freeze(&self, vm: &str, timeout: Duration) -> Result<u32, LibvirtError> {
        let vm = vm.to_owned();
        self.call("domainFSFreeze", move |c| {
            let d = c.lookup_domain(&vm)?;
            bound_agent_wait(c, &d, timeout)?;
            // No mount points named: all of them.
            Ok(u32::try_from(c.fs_freeze(&d, true)?).unwrap_or(0))
        })
        .await
    }

    /// Thaws the guest's filesystems (`virDomainFSThaw`); a guest not frozen stays as it is.
    pub async fn guest_fs_thaw(&self, vm: &str, timeout: Duration) -> Result<(), LibvirtError> {
        let vm = vm.to_owned();
        self.call("domainFSThaw", move |c| {
            let d = c.lookup_domain(&vm)?;
            bound_agent_wait(c, &d, timeout)?;
            c.fs_freeze(&d, false).map(drop)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::agent_connected;

    #[test]
    fn the_agent_is_connected_only_when_libvirt_says_so() {
        let xml = |state: &str| {
            format!(
                "<domain><devices><channel type='unix'><source mode='bind'/>\
                 <target type='virtio' name='org.qemu.guest_agent.0'{state}/></channel></devices></domain>"
            )
        };
        assert!(agent_connected(&xml(" state='connected'")));
        assert!(!agent_connected(&xml(" state='disconnected'")));
        assert!(!agent_connected(&xml("")), "a domain that is not running has no state");
        assert!(!agent_connected("<domain><devices/></domain>"));
    }
}
