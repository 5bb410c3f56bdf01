//! Disk buses, iothreads, I/O limits and CPU models on real libvirtd, and the volume uuids,
//! paths and platform that `/vm/create`, `/vm/clone` and `/vm/changeimage` are given.

use std::path::Path;
use std::time::Duration;

use kvmagent_host_tests::checks::{dumpxml, qemu_img_info};
use kvmagent_host_tests::guest::{console_log, kernel_boot, wait_report};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn vm_object(h: &Host, vm: &str, disks: usize) -> Value {
    json!({
        "vmInstanceUuid": vm, "vmName": "disks", "memory": 256 * MIB, "cpuNum": 1,
        "nics": [{"mac": "52:54:00:12:34:57", "uuid": uuid(), "deviceId": 0, "type": "user"}],
        "kernelBoot": kernel_boot(h, &[0], disks).unwrap(),
    })
}

/// `(target dev, bus, driver iothread, serial, iotune children)` of each disk of `vm`'s domain.
type Disk = (String, String, Option<String>, String, Vec<(String, String)>);

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.has_tag_name(tag))
}

fn domain_disks(xml: &str) -> Vec<Disk> {
    let doc = roxmltree::Document::parse(xml).unwrap();
    (doc.descendants().filter(|n| n.has_tag_name("disk") && n.attribute("device") == Some("disk")))
        .map(|d| {
            let target = child(d, "target").unwrap();
            let tune = child(d, "iotune").map_or(Vec::new(), |t| {
                (t.children().filter(|c| c.is_element()))
                    .map(|c| (c.tag_name().name().to_owned(), c.text().unwrap_or("").to_owned()))
                    .collect()
            });
            (
                target.attribute("dev").unwrap().to_owned(),
                target.attribute("bus").unwrap().to_owned(),
                child(d, "driver").and_then(|x| x.attribute("iothread")).map(str::to_owned),
                child(d, "serial").and_then(|s| s.text()).unwrap_or("").to_owned(),
                tune,
            )
        })
        .collect()
}

#[tokio::test]
async fn a_vm_with_a_virtio_scsi_root_a_sata_data_disk_and_an_iotune_limit_boots_and_reads_both_disks() {
    let h = Host::start().await.unwrap();
    let root_image = BaseImage::create(&h, 32 * MIB).unwrap();
    let data_image = BaseImage::create(&h, 32 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let (sata_uuid, sata) = data_volume_path(&h);
    let (blk_uuid, blk) = data_volume_path(&h);
    let mut vm_obj = vm_object(&h, &vm, 3);
    // The guest loads its AHCI driver only when asked.
    let cmdline = vm_obj["kernelBoot"]["cmdline"].as_str().unwrap().to_owned();
    vm_obj["kernelBoot"]["cmdline"] = json!(format!("{cmdline} kvmagent.sata=1"));
    vm_obj["machineType"] = json!("q35");
    vm_obj["ioThreads"] = json!(2);
    let cmd = json!({
        "vm": vm_obj,
        "cpuMode": "custom", "cpuModel": "qemu64",
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": root_image.path,
                       "bus": "scsi", "iothread": 1, "io": "native", "cache": "none"},
        "dataVolumes": [
            {"volumeUuid": sata_uuid, "installPath": sata, "imagePath": data_image.path, "bus": "sata",
             "cache": "writeback", "iotune": {"totalBytesSec": 10485760, "readIopsSec": 400, "writeIopsSec": 200}},
            {"volumeUuid": blk_uuid, "installPath": blk, "size": 16 * MIB, "provisioning": "thick",
             "iothread": 2, "io": "threads"}
        ],
        "strategy": "InstantStart",
    });
    let r = h.call_ok("/vm/create", &cmd).await.unwrap();
    assert_eq!(r["state"], "Running", "{r}");

    let xml = dumpxml(&vm).unwrap();
    let s = |x: &str| x.to_owned();
    let limits =
        vec![(s("total_bytes_sec"), s("10485760")), (s("read_iops_sec"), s("400")), (s("write_iops_sec"), s("200"))];
    assert_eq!(
        domain_disks(&xml),
        [
            (s("sda"), s("scsi"), None, root_uuid.clone(), vec![]),
            (s("sdb"), s("sata"), None, sata_uuid.clone(), limits),
            (s("vdd"), s("virtio"), Some(s("2")), blk_uuid.clone(), vec![]),
        ],
        "{xml}"
    );
    let doc = roxmltree::Document::parse(&xml).unwrap();
    let iothreads = doc.descendants().find(|n| n.has_tag_name("iothreads")).and_then(|n| n.text());
    assert_eq!(iothreads, Some("2"));
    let scsi = doc.descendants().find(|n| n.has_tag_name("controller") && n.attribute("type") == Some("scsi")).unwrap();
    let scsi_driver = scsi.children().find(|c| c.has_tag_name("driver")).and_then(|d| d.attribute("iothread"));
    assert_eq!(scsi_driver, Some("1"), "the virtio-scsi controller runs on the root's iothread");
    assert!(xml.contains("io='native'") && xml.contains("io='threads'"), "{xml}");
    let cpu = doc.descendants().find(|n| n.has_tag_name("cpu")).unwrap();
    assert_eq!(cpu.attribute("mode"), Some("custom"));
    let model = cpu.children().find(|c| c.has_tag_name("model")).and_then(|m| m.text());
    assert_eq!(model, Some("qemu64"));

    // A thin data disk on the image: an overlay, as the root is.
    let info = qemu_img_info(&sata).unwrap();
    assert_eq!(info["backing-filename"].as_str(), data_image.path.to_str());

    // The guest names SCSI and SATA disks sd* in the order it finds them: compare contents.
    let dump = wait_report(&console_log(&h, &vm), Duration::from_secs(120)).await.unwrap();
    let mut sd: Vec<Option<&Vec<u8>>> =
        dump.iter().filter(|(d, _)| d.starts_with("sd")).map(|(_, o)| o.get(&0)).collect();
    let mut want = vec![Some(&root_image.pattern), Some(&data_image.pattern)];
    sd.sort();
    want.sort();
    assert_eq!(sd, want, "the guest reads the root on virtio-scsi and the image on the SATA disk: {dump:?}");
    // The guest's own names: its one virtio-blk disk is vda (the domain's vdd).
    let vdd = dump.get("vda").and_then(|d| d.get(&0));
    assert_eq!(vdd, Some(&vec![0u8; 64]), "the virtio-blk disk is empty: {dump:?}");
}

#[tokio::test]
async fn a_cpu_mode_the_host_lacks_is_refused_and_nothing_is_made() {
    let h = Host::start().await.unwrap();
    let image = BaseImage::create(&h, 16 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let domcaps =
        kvmagent_host_tests::checks::virsh(&["domcapabilities", "--virttype", "qemu", "--machine", "pc"]).unwrap();
    let passthrough = domcaps.contains("<mode name='host-passthrough' supported='yes'");
    for (mode, model, offered) in [("host-passthrough", None, passthrough), ("custom", Some("Not-A-Model"), false)] {
        let cmd = json!({
            "vm": vm_object(&h, &vm, 1), "cpuMode": mode, "cpuModel": model,
            "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": image.path},
            "strategy": "CreateStopped",
        });
        if offered {
            continue;
        }
        let e = h.call_err("/vm/create", &cmd).await.unwrap();
        assert!(e.contains("this host cannot give the guest") && e.contains("qemu64"), "{mode}: {e}");
        assert!(!root.exists(), "{mode}: the root made for the VM is removed");
        assert!(kvmagent_host_tests::checks::domstate(&vm).is_none(), "{mode}: no domain");
    }
}

/// A VM with a root and one data volume, defined and stopped; returns its uuid.
async fn stopped_vm(h: &Host, image: &BaseImage) -> (String, String, String) {
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(h);
    let (data_uuid, data) = data_volume_path(h);
    let cmd = json!({
        "vm": vm_object(h, &vm, 2),
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": image.path},
        "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 8 * MIB}],
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    (vm, root_uuid, data_uuid)
}

#[tokio::test]
async fn clones_take_the_volume_uuids_they_are_given_as_disk_serials() {
    let h = Host::start().await.unwrap();
    let image = BaseImage::create(&h, 16 * MIB).unwrap();
    let (src, src_root, _) = stopped_vm(&h, &image).await;
    let (root_uuid, data_uuid) = (uuid(), uuid());
    let bad = [
        (json!([{"rootVolumeUuid": root_uuid, "dataVolumeUuids": []}]), "dataVolumeUuids has 0 uuids"),
        (json!([{"rootVolumeUuid": root_uuid, "dataVolumeUuids": [root_uuid]}]), "is used twice"),
        (json!([{"rootVolumeUuid": src_root}]), "is used twice"),
        (json!([{"rootVolumeUuid": "../x"}]), "clones[0].rootVolumeUuid"),
        (json!([{"rootVolumeUuid": root_uuid}, {"rootVolumeUuid": root_uuid}]), "is used twice"),
    ];
    for (clones, needle) in bad {
        let cmd = json!({"vmUuid": src, "full": true, "mode": "copy", "clones": clones, "strategy": "CreateStopped"});
        let e = h.call_err("/vm/clone", &cmd).await.unwrap();
        assert!(e.contains(needle), "{clones}: {e}");
    }
    let clone = uuid();
    h.track_vm(&clone);
    let cmd = json!({"vmUuid": src, "full": true, "mode": "copy", "strategy": "CreateStopped",
                     "clones": [{"uuid": clone, "rootVolumeUuid": root_uuid, "dataVolumeUuids": [data_uuid]}]});
    let r = h.call_ok("/vm/clone", &cmd).await.unwrap();
    let inv = &r["inventories"][0]["inventory"];
    assert_eq!(inv["rootVolumeUuid"], json!(root_uuid), "{r}");
    let serials: Vec<String> = domain_disks(&dumpxml(&clone).unwrap()).into_iter().map(|d| d.3).collect();
    assert_eq!(serials, [root_uuid, data_uuid]);
}

#[tokio::test]
async fn change_image_takes_the_new_roots_uuid_path_and_platform() {
    let h = Host::start().await.unwrap();
    let a = BaseImage::create(&h, 16 * MIB).unwrap();
    let b = BaseImage::create(&h, 16 * MIB).unwrap();
    let (vm, old_root_uuid, data_uuid) = stopped_vm(&h, &a).await;
    for (body, needle) in [
        (json!({"volumeUuid": "not-a-uuid"}), "volumeUuid"),
        (json!({"volumeUuid": data_uuid}), "is a data volume"),
        (json!({"platform": "Plan9"}), "platform \"Plan9\""),
    ] {
        let mut cmd = json!({"vmUuid": vm, "imagePath": b.path});
        cmd.as_object_mut().unwrap().extend(body.as_object().unwrap().clone());
        let e = h.call_err("/vm/changeimage", &cmd).await.unwrap();
        assert!(e.contains(needle), "{body}: {e}");
    }
    let (new_uuid, new_root) = root_volume_path(&h);
    let cmd = json!({"vmUuid": vm, "imagePath": b.path, "volumeUuid": new_uuid, "newRootInstallPath": new_root,
                     "platform": "Windows"});
    let r = h.call_ok("/vm/changeimage", &cmd).await.unwrap();
    assert_eq!((&r["rootVolumeUuid"], &r["platform"]), (&json!(new_uuid), &json!("Windows")), "{r}");
    assert_eq!(r["allVolumes"][0]["installPath"], json!(new_root));
    assert_ne!(new_uuid, old_root_uuid);
    let info = qemu_img_info(Path::new(&new_root)).unwrap();
    assert_eq!(info["backing-filename"].as_str(), b.path.to_str());
    let disks = domain_disks(&dumpxml(&vm).unwrap());
    assert_eq!(disks[0].3, new_uuid, "the root's serial is the new volume uuid");
    assert!(dumpxml(&vm).unwrap().contains(new_root.to_str().unwrap()));
}
