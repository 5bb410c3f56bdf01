//! Disk buses, I/O modes, iothreads, limits and CPU models: from StartVmCmd fields to domain
//! XML, the rules that refuse bad combinations, and libvirt's schema.

use serde_json::{json, Value};

use super::{render, DomainSettings};
use crate::wire::vm::StartVmCmd;

fn fixture() -> Value {
    let mut v: Value = serde_json::from_str(include_str!("testdata/zstack-startvm-cmd.json")).unwrap();
    v["rootVolume"]["installPath"] = json!("/var/lib/kvmagent/local/root.qcow2");
    v
}

fn spec(v: Value) -> crate::error::AgentResult<crate::model::VmSpec> {
    crate::wire::decode::<StartVmCmd>(&v)?.to_spec()
}

fn rendered(v: Value) -> String {
    render(&spec(v).unwrap(), &DomainSettings { domain_type: "qemu".into(), ..Default::default() }).unwrap()
}

/// A q35 VM with a virtio-scsi root on iothread 2 (native AIO), a SATA data disk with limits and
/// a virtio-blk data disk on iothread 1 (io_uring), on a named CPU model.
fn every_option() -> Value {
    let mut v = fixture();
    v["machineType"] = json!("q35");
    v["ioThreads"] = json!(2);
    v["nestedVirtualization"] = json!("custom");
    v["vmCpuModelName"] = json!("qemu64");
    for (k, x) in [("bus", json!("scsi")), ("ioThreadId", json!(2)), ("ioMode", json!("native"))] {
        v["rootVolume"][k] = x;
    }
    v["dataVolumes"] = json!([
        {"installPath": "/d1.qcow2", "deviceId": 1, "volumeUuid": "v1", "bus": "sata",
         "iotune": {"totalBytesSec": 1048576, "readIopsSec": 100, "writeIopsSec": 50}},
        {"installPath": "/d2.qcow2", "deviceId": 2, "volumeUuid": "v2", "useVirtio": true, "ioThreadId": 1,
         "ioMode": "io_uring", "cacheMode": "writeback"}
    ]);
    v
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn attr(n: roxmltree::Node<'_, '_>, a: &str) -> Option<String> {
    n.attribute(a).map(str::to_owned)
}

/// `(target dev, bus, driver io, driver iothread, <iotune> children)` of a disk.
type Disk = (String, String, Option<String>, Option<String>, Vec<(String, String)>);

fn disks(xml: &str) -> Vec<Disk> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    (doc.descendants().filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some("disk")))
        .map(|d| {
            let target = child(d, "target").unwrap();
            let driver = child(d, "driver").unwrap();
            let tune = child(d, "iotune").map_or(Vec::new(), |t| {
                (t.children().filter(|c| c.is_element()))
                    .map(|c| (c.tag_name().name().to_owned(), c.text().unwrap_or("").to_owned()))
                    .collect()
            });
            (
                attr(target, "dev").unwrap(),
                attr(target, "bus").unwrap(),
                attr(driver, "io"),
                attr(driver, "iothread"),
                tune,
            )
        })
        .collect()
}

#[test]
fn every_disk_option_and_a_cpu_model_render_as_libvirt_wants_them() {
    let xml = rendered(every_option());
    let s = |x: &str| x.to_owned();
    assert_eq!(
        disks(&xml),
        [
            (s("sda"), s("scsi"), Some(s("native")), None, vec![]),
            (
                s("sdb"),
                s("sata"),
                None,
                None,
                vec![
                    (s("total_bytes_sec"), s("1048576")),
                    (s("read_iops_sec"), s("100")),
                    (s("write_iops_sec"), s("50"))
                ]
            ),
            (s("vdd"), s("virtio"), Some(s("io_uring")), Some(s("1")), vec![]),
        ],
        "a scsi disk's iothread is its controller's"
    );
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let find = |tag: &str| doc.descendants().find(|n| n.has_tag_name(tag)).unwrap();
    assert_eq!(find("iothreads").text(), Some("2"));
    let controller = find("controller");
    assert_eq!(controller.attribute("model"), Some("virtio-scsi"));
    let driver = controller.children().find(|c| c.has_tag_name("driver")).unwrap();
    assert_eq!(driver.attribute("iothread"), Some("2"));
    let cpu = find("cpu");
    assert_eq!((cpu.attribute("mode"), cpu.attribute("match")), (Some("custom"), Some("exact")));
    let model = find("model");
    assert_eq!((model.attribute("fallback"), model.text()), (Some("forbid"), Some("qemu64")));
    assert!(xml.contains("cache='writeback'"));
    validate_with_libvirt_schema(&xml);
}

/// libvirt's own schema check, where the tool is installed (it is on the test hosts).
fn validate_with_libvirt_schema(xml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("domain.xml");
    std::fs::write(&file, xml).unwrap();
    match std::process::Command::new("virt-xml-validate").arg(&file).arg("domain").output() {
        Ok(out) => assert!(
            out.status.success(),
            "virt-xml-validate refused:\n{}{}\n{xml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => eprintln!("virt-xml-validate is not installed"),
        Err(e) => panic!("virt-xml-validate: {e}"),
    }
}

#[test]
fn ide_on_pc_and_host_cpu_modes() {
    let mut v = fixture();
    v["rootVolume"]["bus"] = json!("ide");
    v["nestedVirtualization"] = json!("host-passthrough");
    let xml = rendered(v.clone());
    assert_eq!(disks(&xml)[0].0, "hda");
    assert!(xml.contains("<cpu mode='host-passthrough'>"), "{xml}");
    validate_with_libvirt_schema(&xml);
    v["nestedVirtualization"] = json!("host-model");
    assert!(rendered(v.clone()).contains("<cpu mode='host-model'>"));
    v["nestedVirtualization"] = json!("none");
    v["vmCpuModelName"] = json!("qemu64");
    assert!(!rendered(v).contains("<cpu mode"), "none means the hypervisor's default");
}

#[test]
fn zstack_volume_qos_becomes_the_disks_limits() {
    let mut v = fixture();
    let root = v["rootVolume"]["volumeUuid"].as_str().unwrap().to_owned();
    v["addons"]["VolumeQos"] = json!({ root: {"totalBandwidth": 2097152, "totalIops": 0}, "other": null });
    assert_eq!(disks(&rendered(v))[0].4, [("total_bytes_sec".to_owned(), "2097152".to_owned())]);
}

#[test]
fn the_wire_form_keeps_every_disk_option_and_the_cpu_model() {
    let spec = spec(every_option()).unwrap();
    assert_eq!(StartVmCmd::from_spec(&spec).to_spec().unwrap(), spec);
}

#[test]
fn bad_disk_and_cpu_choices_are_refused_naming_what_to_change() {
    let cases: [(&str, Value, &str); 14] = [
        ("ide on q35", json!({"machineType": "q35", "rootVolume": {"bus": "ide"}}), "needs machine type pc"),
        ("unknown bus", json!({"rootVolume": {"bus": "usb"}}), "rootVolume.bus \"usb\""),
        ("unknown io", json!({"rootVolume": {"ioMode": "aio"}}), "rootVolume.ioMode \"aio\""),
        (
            "native io with a host cache",
            json!({"rootVolume": {"ioMode": "native", "cacheMode": "writeback"}}),
            "io native needs cache none or directsync (it has writeback)",
        ),
        (
            "iothread on sata",
            json!({"ioThreads": 1, "rootVolume": {"bus": "sata", "ioThreadId": 1}}),
            "needs bus virtio or scsi",
        ),
        ("iothread the VM lacks", json!({"ioThreads": 1, "rootVolume": {"ioThreadId": 2}}), "iothread 2 is not one"),
        ("too many iothreads", json!({"ioThreads": 1000}), "ioThreads 1000"),
        (
            "two iothreads on one scsi controller",
            json!({"ioThreads": 2, "rootVolume": {"bus": "scsi", "ioThreadId": 1},
                   "dataVolumes": [{"installPath": "/d", "deviceId": 1, "volumeUuid": "v1", "useVirtioSCSI": true, "ioThreadId": 2}]}),
            "one virtio-scsi controller",
        ),
        (
            "total with read",
            json!({"rootVolume": {"iotune": {"totalBytesSec": 1, "readBytesSec": 1}}}),
            "total_bytes_sec cannot be combined",
        ),
        ("a zero limit", json!({"rootVolume": {"iotune": {"writeIopsSec": 0}}}), "write_iops_sec is 0"),
        ("unknown cpu mode", json!({"nestedVirtualization": "maximum"}), "nestedVirtualization \"maximum\""),
        ("custom without a model", json!({"nestedVirtualization": "custom"}), "vmCpuModelName \"\""),
        ("a model that is not a name", json!({"vmCpuModelName": "x'><y"}), "vmCpuModelName"),
        (
            "ide disk on a cdrom's drive",
            json!({"rootVolume": {"bus": "ide"}, "cdRoms": [{"resourceUuid": "c0", "isEmpty": true}, {"resourceUuid": "c1", "isEmpty": true, "deviceId": 1}],
                   "dataVolumes": [{"installPath": "/d", "deviceId": 2, "volumeUuid": "v2", "bus": "ide"}]}),
            "hdd",
        ),
    ];
    for (case, fields, needle) in cases {
        let mut v = fixture();
        for (k, x) in fields.as_object().unwrap() {
            match (v.get_mut(k), x) {
                (Some(Value::Object(have)), Value::Object(more)) => have.extend(more.clone()),
                _ => v[k] = x.clone(),
            }
        }
        let settings = DomainSettings { domain_type: "qemu".into(), ..Default::default() };
        let e = spec(v).and_then(|s| render(&s, &settings)).unwrap_err().to_string();
        assert!(e.contains(needle), "{case}: {e}");
    }
}
