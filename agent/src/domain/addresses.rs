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

/// How libvirt tells one device of a domain from the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveKey {
    /// A disk or CD-ROM drive, by its target device (`vdb`, `hdc`).
    Target(String),
    /// A network interface, by its MAC address.
    Mac(String),
}

fn child_attr<'a>(node: roxmltree::Node<'a, 'a>, tag: &str, attr: &str) -> Option<&'a str> {
    node.children().find(|c| c.has_tag_name(tag)).and_then(|c| c.attribute(attr))
}

impl LiveKey {
    fn matches(&self, node: roxmltree::Node) -> bool {
        match self {
            LiveKey::Target(dev) => node.has_tag_name("disk") && child_attr(node, "target", "dev") == Some(dev),
            LiveKey::Mac(mac) => {
                node.has_tag_name("interface")
                    && child_attr(node, "mac", "address").is_some_and(|m| m.eq_ignore_ascii_case(mac))
            }
        }
    }

    /// The key of the one device `xml` describes (a `<disk>` or an `<interface>`).
    pub fn of_device(xml: &str) -> AgentResult<LiveKey> {
        let doc =
            roxmltree::Document::parse(xml).map_err(|e| AgentError::internal(format!("unparsable device XML: {e}")))?;
        let root = doc.root_element();
        match root.tag_name().name() {
            "disk" => child_attr(root, "target", "dev").map(|d| LiveKey::Target(d.to_owned())),
            "interface" => child_attr(root, "mac", "address").map(|m| LiveKey::Mac(m.to_owned())),
            _ => None,
        }
        .ok_or_else(|| AgentError::internal(format!("device XML names no disk target or interface MAC: {xml}")))
    }
}

/// Where in `xml` (a domain) the device `key` names is written: the byte range of its element,
/// as libvirt wrote it. `None` when the domain has no such device.
pub fn device_range(xml: &str, key: &LiveKey) -> AgentResult<Option<std::ops::Range<usize>>> {
    let doc = roxmltree::Document::parse(xml)
        .map_err(|e| AgentError::internal(format!("libvirt returned unparsable domain XML: {e}")))?;
    Ok(doc.descendants().find(|n| key.matches(*n)).map(|n| n.range()))
}
