//! The libvirt domain of a VM: rendering its XML from the VM's spec, and reading device
//! addresses back from the live domain.

mod addresses;
mod cpu_caps;
mod render;
mod validate;

pub use addresses::{device_info, device_range, live_disks, LiveDisk, LiveKey};
pub use cpu_caps::{check_cpu_mode, cpu_offer, CpuOffer};
pub use render::{
    dashed_uuid, device_letter, render, render_device, tpm_secret_uuid, xml_escape, Device, DomainSettings,
};
pub use validate::{check_uuid, file_paths, is_ifname, xml_safe};

#[cfg(test)]
mod disk_tests;

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
            ("bootMode", json!("BIOS"), "Legacy, UEFI, UEFI_WITH_CSM"),
            ("secureBoot", json!(true), "secureBoot"),
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
    fn uefi_renders_ovmf_with_the_vms_nvram_and_secure_boot_adds_smm_on_q35() {
        let settings = DomainSettings::default();
        let render_with = |boot_mode: &str, secure: bool, machine: &str| {
            let mut v = fixture();
            v["bootMode"] = json!(boot_mode);
            v["secureBoot"] = json!(secure);
            v["machineType"] = json!(machine);
            let mut spec = validate(&cmd(v))?;
            spec.nvram = Some("/var/lib/kvmagent/local/vm.nvram.fd".into());
            render(&spec, &settings)
        };
        let xml = render_with("UEFI", false, "").unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(text_of(&doc, "loader"), ["/usr/share/OVMF/OVMF_CODE_4M.fd"]);
        assert_eq!(text_of(&doc, "nvram"), ["/var/lib/kvmagent/local/vm.nvram.fd"]);
        assert!(!xml.contains("secure=") && !xml.contains("<smm"), "{xml}");
        assert!(xml.contains("machine='pc'"), "plain UEFI keeps the machine");

        let xml = render_with("UEFI_WITH_CSM", true, "").unwrap();
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let loader = doc.descendants().find(|n| n.has_tag_name("loader")).unwrap();
        assert_eq!(loader.text(), Some("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"));
        assert_eq!((loader.attribute("secure"), loader.attribute("type")), (Some("yes"), Some("pflash")));
        assert!(doc.descendants().any(|n| n.has_tag_name("smm") && n.attribute("state") == Some("on")));
        assert!(xml.contains("machine='q35'"), "Secure Boot chooses q35 when none is given");

        let e = render_with("UEFI", true, "pc").unwrap_err().to_string();
        assert!(e.contains("q35") && e.contains("pc"), "{e}");
        let xml = render_with("Legacy", false, "").unwrap();
        assert!(!xml.contains("<loader") && !xml.contains("<nvram"), "BIOS: {xml}");
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
    fn genid_and_the_cloud_init_seed_in_the_last_cdrom_drive() {
        let settings = DomainSettings { domain_type: "qemu".into(), ..Default::default() };
        let mut v = fixture();
        v["cdRoms"] = json!([{"resourceUuid": "cd0", "isEmpty": true, "deviceId": 0}]);
        let mut spec = validate(&cmd(v.clone())).unwrap();
        assert!(!render(&spec, &settings).unwrap().contains("<genid"), "no genid unless the agent set one");
        spec.renew_genid();
        spec.cloud_init = Some(crate::model::CloudInit {
            hostname: "a".into(),
            user_data: None,
            ssh_keys: Vec::new(),
            network: Vec::new(),
            seed: "/var/lib/kvmagent/local/cidata-x.iso".into(),
        });
        for (machine, targets) in [("pc", ["hdc", "hdb"]), ("q35", ["sdx", "sdz"])] {
            spec.machine = if machine == "pc" { crate::model::Machine::Pc } else { crate::model::Machine::Q35 };
            let xml = render(&spec, &settings).unwrap();
            let doc = roxmltree::Document::parse(&xml).unwrap();
            assert_eq!(text_of(&doc, "genid"), [spec.genid.as_deref().unwrap()]);
            let cdroms: Vec<_> = doc
                .descendants()
                .filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some("cdrom"))
                .collect();
            let devs: Vec<&str> = (cdroms.iter())
                .filter_map(|n| n.children().find(|c| c.has_tag_name("target"))?.attribute("dev"))
                .collect();
            assert_eq!(devs, targets, "{machine}");
            let source = cdroms[1].children().find(|c| c.has_tag_name("source")).unwrap();
            assert_eq!(source.attribute("file"), Some("/var/lib/kvmagent/local/cidata-x.iso"));
        }
        v["cdRoms"] =
            json!([0, 1, 2].map(|i| json!({"resourceUuid": format!("cd{i}"), "isEmpty": true, "deviceId": i})));
        let mut full = validate(&cmd(v)).unwrap();
        full.cloud_init = spec.cloud_init.clone();
        let e = render(&full, &settings).unwrap_err().to_string();
        assert!(e.contains("at most 3 drives"), "{e}");
    }

    /// The attributes `names` of the first `<tag>` inside a `<parent>`.
    fn attrs<'a>(doc: &'a roxmltree::Document, parent: &str, tag: &str, names: &[&str]) -> Vec<Option<&'a str>> {
        let n = (doc.descendants())
            .find(|n| n.has_tag_name(tag) && n.ancestors().any(|a| a.has_tag_name(parent)))
            .unwrap_or_else(|| panic!("no <{tag}> in <{parent}>"));
        names.iter().map(|a| n.attribute(*a)).collect()
    }

    /// The domain XML of a NUMA VM with a multi-queue NIC, compared with a golden file
    /// (`KVMAGENT_UPDATE_GOLDEN=1` rewrites it after a deliberate change).
    #[test]
    fn numa_form_and_nic_queues_match_the_golden_file() {
        let mut v = fixture();
        v["nics"][0]["vHostAddOn"] = json!({"queueNum": 4, "rxBufferSize": "512", "txBufferSize": "256"});
        let xml = rendered(v);
        let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/src/domain/testdata/numa-queues.xml");
        if std::env::var_os("KVMAGENT_UPDATE_GOLDEN").is_some() {
            std::fs::write(golden, &xml).unwrap();
        }
        assert_eq!(xml, include_str!("testdata/numa-queues.xml"), "rendered:\n{xml}");
        let doc = roxmltree::Document::parse(&xml).unwrap();
        assert_eq!(
            attrs(&doc, "cpu", "topology", &["sockets", "cores", "threads"]),
            [Some("32"), Some("4"), Some("1")]
        );
        assert_eq!(
            attrs(&doc, "cpu", "cell", &["id", "cpus", "memory", "unit"]),
            [Some("0"), Some("0-127"), Some("2097152"), Some("KiB")],
            "one cell holds every vCPU and all of the memory"
        );
        assert_eq!(
            attrs(&doc, "interface", "driver", &["name", "queues", "rx_queue_size", "tx_queue_size"]),
            [Some("vhost"), Some("4"), Some("512"), Some("256")]
        );
    }

    #[test]
    fn topologies_as_zstacks_agent_renders_them() {
        // (useNuma, cpuNum, maxVcpuNum, socketNum, cpuOnSocket, threadsPerCore) → <vcpu>, topology, cell
        let cases = [
            ((true, 2, 0, None, None, None), ("2", "128"), Some(("32", "4", "1")), Some("0-127")),
            ((true, 1, 6, None, None, None), ("1", "6"), Some(("6", "1", "1")), Some("0-5")),
            ((true, 2, 8, Some(2), Some(2), Some(2)), ("2", "8"), Some(("2", "2", "2")), Some("0-7")),
            ((true, 4, 4, None, None, None), ("4", "4"), Some(("1", "4", "1")), Some("0-3")),
            ((false, 4, 0, Some(2), Some(2), None), ("", "4"), Some(("2", "2", "1")), None),
            ((false, 3, 0, None, Some(3), None), ("", "3"), None, None),
        ];
        for ((numa, cpus, max, s, c, t), (current, vcpu), topology, cell) in cases {
            let mut v = fixture();
            v["useNuma"] = json!(numa);
            v["cpuNum"] = json!(cpus);
            v["maxVcpuNum"] = json!(max);
            (v["socketNum"], v["cpuOnSocket"], v["threadsPerCore"]) = (json!(s), json!(c), json!(t));
            let case = v.clone();
            let xml = rendered(v);
            let doc = roxmltree::Document::parse(&xml).unwrap();
            let n = doc.descendants().find(|n| n.has_tag_name("vcpu")).unwrap();
            assert_eq!((n.attribute("current").unwrap_or(""), n.text().unwrap()), (current, vcpu), "{case}");
            let topo = doc.descendants().find(|n| n.has_tag_name("topology"));
            let topo = topo.map(|n| {
                (n.attribute("sockets").unwrap(), n.attribute("cores").unwrap(), n.attribute("threads").unwrap())
            });
            assert_eq!(topo, topology, "{case}");
            let got = doc.descendants().find(|n| n.has_tag_name("cell")).and_then(|n| n.attribute("cpus"));
            assert_eq!(got, cell, "{case}");
        }
    }

    #[test]
    fn inconsistent_topologies_are_refused_with_their_fields() {
        let cases = [
            (json!({"useNuma": false, "cpuNum": 4, "socketNum": 2, "cpuOnSocket": 3}), "= 6 vCPUs, but cpuNum is 4"),
            (
                json!({"useNuma": false, "cpuNum": 4, "socketNum": 2, "cpuOnSocket": 2, "threadsPerCore": 0}),
                "threadsPerCore 0",
            ),
            (
                json!({"useNuma": true, "cpuNum": 2, "maxVcpuNum": 16, "socketNum": 2, "cpuOnSocket": 4}),
                "but maxVcpuNum",
            ),
            (json!({"useNuma": true, "cpuNum": 8, "maxVcpuNum": 4}), "maxVcpuNum 4 is less than cpuNum 8"),
            (json!({"useNuma": false, "cpuNum": 4, "socketNum": 4}), "cpuOnSocket absent"),
            (json!({"useNuma": true, "cpuNum": 1, "maxVcpuNum": 1024}), "maxVcpuNum 1024"),
        ];
        for (fields, needle) in cases {
            let mut v = fixture();
            for (k, x) in fields.as_object().unwrap() {
                v[k] = x.clone();
            }
            let e = validate(&cmd(v)).unwrap_err().to_string();
            assert!(e.contains(needle), "{fields}: {e}");
        }
    }

    #[test]
    fn boot_devices_in_order_once_each_and_unknown_ones_refused() {
        let boot = |dev: Value| {
            let mut v = fixture();
            v["rootVolume"]["bootOrder"] = json!(0);
            v["bootDev"] = dev;
            let xml = rendered(v);
            let doc = roxmltree::Document::parse(&xml).unwrap();
            doc.descendants()
                .filter_map(|n| n.attribute("dev").filter(|_| n.has_tag_name("boot")))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(boot(json!(["cdrom", "hd", "cdrom", "network"])), ["cdrom", "hd", "network"]);
        assert_eq!(boot(json!("network")), ["network"], "one name, as a string");
        assert_eq!(boot(json!(null)), ["hd"]);
        let mut v = fixture();
        v["bootDev"] = json!(["hd", "floppy"]);
        let e = validate(&cmd(v)).unwrap_err().to_string();
        assert!(e.contains("bootDev[1] \"floppy\""), "{e}");
        let mut v = fixture();
        v["bootDev"] = json!(7);
        let e = crate::wire::decode::<StartVmCmd>(&v).unwrap_err().to_string();
        assert!(e.contains("bootDev") && e.contains("neither a list of names nor one name"), "{e}");
    }

    #[test]
    fn nic_queues_only_for_virtio_with_several_and_ring_sizes_checked() {
        let driver = |nic: Value| {
            let mut v = fixture();
            for (k, x) in nic.as_object().unwrap() {
                v["nics"][0][k] = x.clone();
            }
            let xml = rendered(v);
            let doc = roxmltree::Document::parse(&xml).unwrap();
            let d = doc
                .descendants()
                .find(|n| n.has_tag_name("driver") && n.parent().is_some_and(|p| p.has_tag_name("interface")));
            d.map(|d| ["queues", "rx_queue_size", "tx_queue_size"].map(|a| d.attribute(a).map(str::to_owned)))
        };
        assert_eq!(driver(json!({"vHostAddOn": {"queueNum": 1}})), None, "the fixture's one queue");
        assert_eq!(driver(json!({"vHostAddOn": null})), None);
        assert_eq!(
            driver(json!({"vHostAddOn": {"queueNum": 2}})),
            Some([Some("2".into()), Some("1024".into()), None]),
            "ZStack's receive ring; QEMU's own transmit ring"
        );
        assert_eq!(driver(json!({"driverType": "e1000", "vHostAddOn": {"queueNum": 4}})), None);
        for (nic, needle) in [
            (json!({"vHostAddOn": {"queueNum": 2, "rxBufferSize": "300"}}), "nics[0].vHostAddOn.rxBufferSize \"300\""),
            (json!({"vHostAddOn": {"queueNum": 2, "txBufferSize": "4096"}}), "nics[0].vHostAddOn.txBufferSize"),
            (json!({"vHostAddOn": {"queueNum": 1000}}), "nics[0].vHostAddOn.queueNum 1000"),
            (json!({"type": "user", "vHostAddOn": {"queueNum": 2}}), "user-mode networking"),
        ] {
            let mut v = fixture();
            for (k, x) in nic.as_object().unwrap() {
                v["nics"][0][k] = x.clone();
            }
            let e = validate(&cmd(v)).unwrap_err().to_string();
            assert!(e.contains(needle), "{nic}: {e}");
        }
    }

    #[test]
    fn the_wire_form_of_a_spec_gives_the_same_spec() {
        let mut v = fixture();
        v["nics"][0]["vHostAddOn"] = json!({"queueNum": 4, "txBufferSize": "512"});
        v["bootDev"] = json!(["cdrom", "hd"]);
        let spec = validate(&cmd(v)).unwrap();
        assert!(spec.cpu.max.is_some() && spec.nics[0].queues.is_some());
        assert_eq!(StartVmCmd::from_spec(&spec).to_spec().unwrap(), spec);
        for (boot_mode, secure, machine) in [("UEFI", false, "pc"), ("UEFI_WITH_CSM", true, "")] {
            let mut v = fixture();
            (v["bootMode"], v["secureBoot"], v["machineType"]) = (json!(boot_mode), json!(secure), json!(machine));
            let spec = validate(&cmd(v)).unwrap();
            assert_eq!(StartVmCmd::from_spec(&spec).to_spec().unwrap(), spec, "{boot_mode} {secure}");
        }
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
