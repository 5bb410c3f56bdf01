//! The libvirt domain of a VM: rendering its XML from the VM's spec, and reading device
//! addresses back from the live domain.

mod addresses;
mod render;
mod validate;

pub use addresses::{device_info, device_range, live_disks, LiveDisk, LiveKey};
pub use render::{dashed_uuid, device_letter, render, render_device, xml_escape, Device, DomainSettings};
pub use validate::{check_uuid, file_paths, is_ifname, xml_safe};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::vm::StartVmCmd;
    use serde_json::{json, Value};

    fn fixture() -> Value {
        let mut v: Value = serde_json::from_str(include_str!("testdata/zstack-startvm-cmd.json")).unwrap();
        v["rootVolume"]["installPath"] = json!("/var/lib/kvmagent/local/root.qcow2");
        v
    }

    fn cmd(v: Value) -> StartVmCmd {
        crate::wire::decode(&v).unwrap()
    }

    fn validate(c: &StartVmCmd) -> crate::error::AgentResult<crate::model::VmSpec> {
        c.to_spec()
    }

    fn rendered(v: Value) -> String {
        let spec = validate(&cmd(v)).unwrap();
        render(&spec, &DomainSettings { domain_type: "qemu".into(), ..Default::default() }).unwrap()
    }

    fn text_of<'a>(doc: &'a roxmltree::Document, tag: &str) -> Vec<&'a str> {
        doc.descendants().filter(|n| n.has_tag_name(tag)).filter_map(|n| n.text()).collect()
    }

    #[test]
    fn fixture_renders_the_host_model() {
        let xml = rendered(fixture());
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let root = doc.root_element();
        assert_eq!(root.attribute("type"), Some("qemu"));
        assert_eq!(text_of(&doc, "name"), ["0b42630f37d8417480eced62ad89719f"]);
        assert_eq!(text_of(&doc, "uuid"), ["0b42630f-37d8-4174-80ec-ed62ad89719f"]);
        assert_eq!(text_of(&doc, "description"), ["vm-for-ut"]);
        assert_eq!(text_of(&doc, "internalId"), ["1"]);
        let zs = doc.descendants().find(|n| n.tag_name().name() == "zstack").unwrap();
        assert_eq!(zs.tag_name().namespace(), Some("http://zstack.org"));
        let disk_serials: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk"))
            .filter_map(|d| d.children().find(|c| c.has_tag_name("serial")).and_then(|s| s.text()))
            .collect();
        assert_eq!(disk_serials, ["d387b4534faf4553a50a8a632cf12e35"]);
        let vcpu = doc.descendants().find(|n| n.has_tag_name("vcpu")).unwrap();
        assert_eq!((vcpu.attribute("current"), vcpu.text()), (Some("1"), Some("128")), "NUMA form");
        let mac = doc.descendants().find(|n| n.has_tag_name("mac")).unwrap();
        assert_eq!(mac.attribute("address"), Some("fa:62:4a:61:6c:00"));
        let src = doc.descendants().find(|n| n.has_tag_name("source") && n.attribute("bridge").is_some()).unwrap();
        assert_eq!(src.attribute("bridge"), Some("br_eth0"));
        // Per-device boot order (rootVolume.bootOrder = 1) replaces <os><boot dev>.
        assert!(doc.descendants().all(|n| !(n.has_tag_name("boot") && n.attribute("dev").is_some())));
        assert!(doc.descendants().any(|n| n.has_tag_name("boot") && n.attribute("order") == Some("1")));
        assert!(!xml.contains("<tpm"), "no TPM unless asked");
    }

    #[test]
    fn hostile_text_round_trips_and_cannot_break_out() {
        let mut v = fixture();
        let name = "a<b&c\"d'e ünï ]]> <!-- </domain><x/>\tline\r\nnext";
        v["vmName"] = json!(name);
        v["rootVolume"]["installPath"] = json!("/var/lib/kvmagent/local/it's & <x>.qcow2");
        v["consolePassword"] = json!("p'w\"d\n1");
        let xml = rendered(v);
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(doc.descendants().filter(|n| n.has_tag_name("domain")).count(), 1);
        assert_eq!(text_of(&doc, "description"), [name]);
        let src = doc.descendants().find(|n| n.has_tag_name("source") && n.attribute("file").is_some()).unwrap();
        assert_eq!(src.attribute("file"), Some("/var/lib/kvmagent/local/it's & <x>.qcow2"));
        let vnc = doc.descendants().find(|n| n.has_tag_name("graphics")).unwrap();
        assert_eq!(vnc.attribute("passwd"), Some("p'w\"d\n1"), "attribute values keep newlines exactly");
    }

    #[test]
    fn control_characters_and_bad_values_are_refused() {
        let cases = [
            ("vmName", json!("bad\u{1}name"), "U+0001"),
            ("memory", json!(0), "memory"),
            ("cpuNum", json!(0), "cpuNum"),
            ("vmInstanceUuid", json!("not-a-uuid"), "32 hexadecimal"),
            ("bootMode", json!("UEFI"), "Legacy"),
            ("socketNum", json!(65536), "socketNum"),
            ("threadsPerCore", json!(u32::MAX), "threadsPerCore"),
            ("clock", json!("pst"), "clock"),
            ("vmName", json!("x".repeat(5000)), "vmName"),
        ];
        for (field, value, needle) in cases {
            let mut v = fixture();
            v[field] = value;
            let e = validate(&cmd(v)).unwrap_err().to_string();
            assert!(e.contains(needle), "{field}: {e}");
        }
        let mut v = fixture();
        v["nics"][0]["mac"] = json!("fa:62:4a:61:6c");
        assert!(validate(&cmd(v)).unwrap_err().to_string().contains("mac"));
        let mut v = fixture();
        v["nics"][0]["type"] = json!("vDPA");
        assert!(validate(&cmd(v)).unwrap_err().to_string().contains("nics[0].type"));
        let mut v = fixture();
        v["nics"][0]["bridgeName"] = json!("br/../x");
        assert!(validate(&cmd(v)).unwrap_err().to_string().contains("bridgeName"));
        let mut v = fixture();
        v["rootVolume"]["installPath"] = json!("relative.qcow2");
        assert!(validate(&cmd(v)).unwrap_err().to_string().contains("absolute"));
        let mut v = fixture();
        v["dataVolumes"] = json!([{"installPath": "/a", "deviceId": 1, "volumeUuid": "a"}, {"installPath": "/b", "deviceId": 1, "volumeUuid": "b"}]);
        assert!(validate(&cmd(v)).unwrap_err().to_string().contains("deviceId 1"));
    }

    #[test]
    fn tpm_cdroms_kernel_boot_and_disk_letters() {
        let mut v = fixture();
        v["tpm"] = json!({"enable": true});
        v["rootVolume"]["bootOrder"] = json!(0);
        v["cdRoms"] = json!([{"resourceUuid": "cd0", "isEmpty": true, "deviceId": 0}]);
        v["dataVolumes"] = json!([
            {"installPath": "/d2.qcow2", "deviceId": 2, "volumeUuid": "v2"},
            {"installPath": "/d1.qcow2", "deviceId": 1, "volumeUuid": "v1"}
        ]);
        v["kernelBoot"] = json!({"kernel": "/k/vmlinuz", "initrd": "/k/initrd.img", "cmdline": "console=ttyS0"});
        let xml = rendered(v.clone());
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let tpm = doc.descendants().find(|n| n.has_tag_name("tpm")).unwrap();
        assert_eq!(tpm.attribute("model"), Some("tpm-crb"));
        let cdrom =
            doc.descendants().find(|n| n.has_tag_name("disk") && n.attribute("device") == Some("cdrom")).unwrap();
        assert!(cdrom.children().all(|c| !c.has_tag_name("source")), "an empty cdrom has no source");
        let targets: Vec<_> = doc
            .descendants()
            .filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some("disk"))
            .map(|d| d.children().find(|c| c.has_tag_name("target")).unwrap().attribute("dev").unwrap())
            .collect();
        assert_eq!(targets, ["vda", "vdb", "vdd"], "sorted by deviceId; c is left to the cdrom");
        assert_eq!(text_of(&doc, "kernel"), ["/k/vmlinuz"]);
        assert_eq!(text_of(&doc, "cmdline"), ["console=ttyS0"]);
        let spec = validate(&cmd(v)).unwrap();
        let paths: Vec<&str> = file_paths(&spec).into_iter().filter_map(std::path::Path::to_str).collect();
        assert_eq!(
            paths,
            ["/var/lib/kvmagent/local/root.qcow2", "/d2.qcow2", "/d1.qcow2", "/k/vmlinuz", "/k/initrd.img"]
        );
    }

    #[test]
    fn device_addresses_are_read_from_live_xml() {
        let live = include_str!("testdata/live-domain.xml");
        let rsp = device_info(live).unwrap();
        assert_eq!(rsp.virtual_device_info_list.len(), 2);
        let root = &rsp.virtual_device_info_list[0];
        assert_eq!(root.resource_uuid, "d387b4534faf4553a50a8a632cf12e35");
        assert_eq!(root.device_address.slot.as_deref(), Some("0x04"));
        assert_eq!(rsp.virtual_device_info_list[1].device_address.addr_type.as_deref(), Some("drive"));
        assert_eq!(rsp.nic_infos[0].mac_address, "fa:62:4a:61:6c:00");
        assert_eq!(rsp.nic_infos[0].device_address.slot.as_deref(), Some("0x03"));
        assert!(rsp.mem_balloon_info.is_some());
    }
}
