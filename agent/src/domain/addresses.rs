//! Reads device addresses back from a live domain's XML, for the StartVmCmd response (the
//! management plane stores them and replays them so addresses stay stable).

use crate::error::{AgentError, AgentResult};
use crate::wire::vm::{DeviceAddress, NicInfo, StartVmRsp, VirtualDeviceInfo};

fn address(node: roxmltree::Node) -> DeviceAddress {
    let Some(a) = node.children().find(|c| c.has_tag_name("address")) else {
        return DeviceAddress::default();
    };
    let attr = |n: &str| a.attribute(n).map(str::to_owned);
    DeviceAddress {
        addr_type: attr("type"),
        domain: attr("domain"),
        bus: attr("bus"),
        slot: attr("slot"),
        function: attr("function"),
        controller: attr("controller"),
        target: attr("target"),
        unit: attr("unit"),
    }
}

fn child_text<'a>(node: roxmltree::Node<'a, 'a>, tag: &str) -> Option<&'a str> {
    node.children().find(|c| c.has_tag_name(tag)).and_then(|c| c.text())
}

pub fn device_info(live_xml: &str) -> AgentResult<StartVmRsp> {
    let doc = roxmltree::Document::parse(live_xml)
        .map_err(|e| AgentError::internal(format!("libvirt returned unparsable domain XML: {e}")))?;
    let Some(devices) = doc.root_element().children().find(|c| c.has_tag_name("devices")) else {
        return Ok(StartVmRsp::default());
    };
    let mut rsp = StartVmRsp::default();
    for dev in devices.children().filter(roxmltree::Node::is_element) {
        match dev.tag_name().name() {
            "disk" => {
                if let Some(serial) = child_text(dev, "serial") {
                    rsp.virtual_device_info_list
                        .push(VirtualDeviceInfo { resource_uuid: serial.to_owned(), device_address: address(dev) });
                }
            }
            "interface" => {
                let mac = dev.children().find(|c| c.has_tag_name("mac")).and_then(|m| m.attribute("address"));
                if let Some(mac) = mac {
                    rsp.nic_infos.push(NicInfo { mac_address: mac.to_owned(), device_address: address(dev) });
                }
            }
            "memballoon" => {
                rsp.mem_balloon_info =
                    Some(VirtualDeviceInfo { resource_uuid: "memballoon".into(), device_address: address(dev) });
            }
            _ => {}
        }
    }
    Ok(rsp)
}

/// A disk of a live domain: its target device and, for file disks, its current top file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDisk {
    pub target: String,
    pub file: Option<String>,
    /// The disk serial: the volume uuid, for disks this agent defined.
    pub serial: Option<String>,
}

/// Every `<disk>` of a live domain (disks and CD-ROMs), in document order.
pub fn live_disks(live_xml: &str) -> AgentResult<Vec<LiveDisk>> {
    let doc = roxmltree::Document::parse(live_xml)
        .map_err(|e| AgentError::internal(format!("libvirt returned unparsable domain XML: {e}")))?;
    Ok(doc
        .descendants()
        .filter(|n| n.has_tag_name("disk"))
        .filter_map(|d| {
            let target = d.children().find(|c| c.has_tag_name("target"))?.attribute("dev")?.to_owned();
            let file =
                d.children().find(|c| c.has_tag_name("source")).and_then(|s| s.attribute("file")).map(str::to_owned);
            let serial = d.children().find(|c| c.has_tag_name("serial")).and_then(|s| s.text()).map(str::to_owned);
            Some(LiveDisk { target, file, serial })
        })
        .collect())
}
