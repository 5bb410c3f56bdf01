//! The management node's Clone VM flow, as its open-source building blocks run it (the clone
//! orchestrator itself is not open source): snapshot the source's volumes, make each snapshot a
//! template (linked: the snapshot itself; full: a flat copy), build the clone's volumes on them,
//! start the clone. Once on local storage, once on Ceph (the Ceph calls on the Ceph agent port,
//! the VMs started with the MN's Ceph `VolumeTO`s and the cephx secret in `addons`). Each clone
//! boots the test guest, which reads the source's bytes; the source's files are never written.
//! The sequence: ZStack's "link clone" commits (`KVMHost.java`, `LocalStorageKvmBackend.java`
//! (`LSKB`), `LocalStorageKvmFactory.java`, `CephPrimaryStorageBase.java` (`CPB`)).

use std::path::Path;

use kvmagent_host_tests::ceph::{self, admin_key, agent_config_serving, info, MadeImages};
use kvmagent_host_tests::checks::{domstate, file_sha256, qemu_img_info};
use kvmagent_host_tests::guest::pattern;
use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::mn::{start_cmd, volume_to, Mn};
use kvmagent_host_tests::mn_types::{decode, CephAgentResponse, CephCloneRsp, LocalStorageVolumeRsp};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Linked (`volume::fastCreate`, the snapshot used as the template directly) and full (the
/// snapshot copied into the image cache, the data volume merged out of its snapshot), with the
/// data volume (`full = true`), from a running VM.
#[tokio::test]
async fn a_running_vm_cloned_linked_and_full_with_its_data_volume_on_local_storage() {
    let h = Host::start().await.unwrap();
    let mn = Mn::new(&h);
    let base = BaseImage::create(&h, 64 * MIB).unwrap();
    let (root_uuid, root) = mn.create_root_volume(&base).await;
    let data_bytes = pattern("clone-flow-data");
    let (data_uuid, data) = mn.create_data_volume(4 * MIB, &data_bytes).await;
    let vm = uuid();
    h.track_vm(&vm);
    let root_to = volume_to(&root_uuid, &root, 0, "Root");
    let data_to = volume_to(&data_uuid, &data, 1, "Data");
    mn.start(&start_cmd(&h, &vm, &root_to, &[&data_to], json!([]), 2)).await;

    // 1. The source's volumes snapshotted: each goes on in a pre-created overlay; its former
    //    file is the snapshot, which nothing may write from now on.
    let root_top = mn.clone_snapshot(&vm, &root_to, base.size).await;
    let data_top = mn.clone_snapshot(&vm, &data_to, 4 * MIB).await;
    let snapshots = [&root, &data].map(|p| file_sha256(p).unwrap());

    // 2–3, linked: the root on the root's snapshot (`createvolumefromcache`), the data volume on
    //    its snapshot (`LSKB:2258-2316` `createwithbacking`).
    let (linked_root_uuid, linked_root) = mn.create_root_volume_from(&root, base.size).await;
    let linked_data_uuid = uuid();
    let linked_data = mn.volume_path("data", &linked_data_uuid);
    let body = json!({"templatePathInCache": data, "installPath": linked_data, "volumeUuid": linked_data_uuid});
    let r: LocalStorageVolumeRsp = mn.ls_call("/localstorage/volume/createwithbacking", body).await;
    assert_eq!(r.size, Some(4 * MIB as i64), "{r:?}");
    assert_eq!(qemu_img_info(&linked_data).unwrap()["backing-filename"].as_str(), data.to_str());

    // 2–3, full: the root's snapshot into the image cache (`LSKB:1508-1525` `createtemplate`),
    //    the root on that copy; the data volume converted out of its snapshot (`snapshot/merge`).
    let image = uuid();
    let cache = h.path(&format!("imagecache/template/{image}/{image}.qcow2"));
    let body = json!({"volumePath": root, "installPath": cache});
    let r: LocalStorageVolumeRsp = mn.ls_call("/localstorage/volume/createtemplate", body).await;
    assert_eq!(r.size, Some(base.size as i64), "{r:?}");
    assert!(qemu_img_info(&cache).unwrap()["backing-filename"].is_null(), "a template stands alone");
    let (full_root_uuid, full_root) = mn.create_root_volume_from(&cache, base.size).await;
    let full_data_uuid = uuid();
    let full_data = mn.volume_path("data", &full_data_uuid);
    let body = json!({"volumeUuid": full_data_uuid, "snapshotInstallPath": data, "workspaceInstallPath": full_data});
    let r: LocalStorageVolumeRsp = mn.ls_call("/localstorage/snapshot/merge", body).await;
    assert_eq!(r.size, Some(4 * MIB as i64), "{r:?}");
    assert!(qemu_img_info(&full_data).unwrap()["backing-filename"].is_null());

    // 4. Both clones started: each guest reads the source's root and data bytes.
    for (root_uuid, root, data_uuid, data) in [
        (&linked_root_uuid, &linked_root, &linked_data_uuid, &linked_data),
        (&full_root_uuid, &full_root, &full_data_uuid, &full_data),
    ] {
        let clone = uuid();
        h.track_vm(&clone);
        let (root_to, data_to) = (volume_to(root_uuid, root, 0, "Root"), volume_to(data_uuid, data, 1, "Data"));
        let seen = mn.start(&start_cmd(&h, &clone, &root_to, &[&data_to], json!([]), 2)).await;
        assert_eq!((seen["vda"][&0].as_slice(), seen["vdb"][&0].as_slice()), (&base.pattern[..], &data_bytes[..]));
    }
    assert_eq!([&root, &data].map(|p| file_sha256(p).unwrap()), snapshots, "the snapshots were never written");
    assert_eq!(domstate(&vm).as_deref(), Some("running"), "the source runs on, on its new tops");
    assert!([&root_top, &data_top].iter().all(|t| kvmagent_host_tests::mn::dumpxml_has_source(&vm, t)));
}

/// The Ceph agent's port for this test: the MN's is 7762, which `ceph_agent.rs` serves.
const CEPH_AGENT_PORT: u16 = 17762;

/// The same flow on Ceph: the source started from the MN's Ceph `VolumeTO`s with the cephx secret
/// in `addons` (no `/vm/createcephsecret` before it), the clone's images made through the Ceph
/// agent port.
#[tokio::test]
async fn a_running_vm_on_ceph_cloned_linked_and_full_through_the_ceph_agent_port() {
    let h = Host::start_with(&agent_config_serving(&format!("127.0.0.1:{CEPH_AGENT_PORT}"))).await.unwrap();
    let mn = Mn::new(&h);
    let [image, root, data, linked_root, linked_data, template, full_root, full_data] =
        ["img", "root", "data", "lroot", "ldata", "tmpl", "froot", "fdata"].map(|n| format!("rbd/{n}-{}", uuid()));
    let _made = MadeImages(
        [&image, &root, &data, &template, &linked_root, &linked_data, &full_root, &full_data].map(|s| s.clone()).into(),
    );
    let ceph = |path: &'static str, body: Value| {
        let body = ceph_command(body);
        let h = &h;
        async move {
            let r = h.call_at(CEPH_AGENT_PORT, path, &body).await.unwrap();
            let base: CephAgentResponse = decode(&r).unwrap();
            assert!(base.base.success && base.total_capacity.is_some(), "{path}: {r}");
            r
        }
    };
    let snapshot_and_protect = |spec: String| async move {
        ceph("/ceph/primarystorage/snapshot/create", json!({"snapshotPath": url(&spec), "skipOnExisting": true})).await;
        ceph("/ceph/primarystorage/snapshot/protect", json!({"snapshotPath": url(&spec), "ignoreError": true})).await;
    };
    let clone = |src: String, dst: String| async move {
        let r = ceph("/ceph/primarystorage/volume/clone", json!({"srcPath": url(&src), "dstPath": url(&dst)})).await;
        let c: CephCloneRsp = decode(&r).unwrap();
        assert_eq!(c.install_path, Some(url(&dst)), "{r}");
    };

    // The image in the cache as the MN makes it (`CPB:2298-2372`): bytes, then `@<image>`
    // snapshotted and protected; the root cloned from it, an empty data volume beside it.
    let image_bytes = pattern("ceph-clone-image");
    ceph::rbd(&["create", "--size", "64", &image]).unwrap();
    ceph::write(&image, 0, &image_bytes);
    let image_snap = format!("{image}@{}", name_of(&image));
    snapshot_and_protect(image_snap.clone()).await;
    clone(image_snap, root.clone()).await;
    let body = json!({"installPath": url(&data), "size": 4 * MIB, "shareable": false, "skipIfExisting": false});
    ceph("/ceph/primarystorage/volume/createempty", body).await;
    let data_bytes = pattern("ceph-clone-data");
    ceph::write(&data, 0, &data_bytes);

    let vm = uuid();
    h.track_vm(&vm);
    let secret = uuid::Uuid::new_v4().to_string();
    let mut cmd = start_cmd(&h, &vm, &ceph_volume(&root, 0, &secret), &[&ceph_volume(&data, 1, &secret)], json!([]), 2);
    cmd["addons"]["ceph_secret_uuid"] = json!(secret);
    cmd["addons"]["ceph_secret_key"] = json!(admin_key());
    let seen = mn.start(&cmd).await;
    assert_eq!((seen["vda"][&0].as_slice(), seen["vdb"][&0].as_slice()), (&image_bytes[..], &data_bytes[..]));

    // 1. The source's volumes snapshotted on the Ceph side (`CPB:5433-5470`), protected.
    let [root_snap, data_snap] = [&root, &data].map(|s| format!("{s}@{}", uuid()));
    for snap in [&root_snap, &data_snap] {
        snapshot_and_protect(snap.clone()).await;
    }
    // 2–3, linked: clones of the snapshots (`CPB:5037-5064`).
    clone(root_snap.clone(), linked_root.clone()).await;
    clone(data_snap.clone(), linked_data.clone()).await;
    // 2–3, full: the root's snapshot copied into a template, snapshotted and protected, the root
    //    cloned from it (`CPB:2231-2255`); the data volume copied out of its snapshot (`volume/cp`).
    for (src, dst) in [(&root_snap, &template), (&data_snap, &full_data)] {
        let r = ceph("/ceph/primarystorage/volume/cp", json!({"srcPath": src, "dstPath": url(dst)})).await;
        assert_eq!(r["installPath"], json!(url(dst)), "{r}");
    }
    let template_snap = format!("{template}@{}", name_of(&template));
    snapshot_and_protect(template_snap.clone()).await;
    clone(template_snap.clone(), full_root.clone()).await;
    let parent = |spec: &str| info(spec).and_then(|i| i["parent"].as_object().cloned());
    let parent_of = |spec: &str| {
        let p = parent(spec)?;
        let [pool, image, snap] = ["pool", "image", "snapshot"].map(|k| p[k].as_str().unwrap_or_default().to_owned());
        Some(format!("{pool}/{image}@{snap}"))
    };
    assert_eq!(parent_of(&linked_root), Some(root_snap.clone()), "a linked clone rests on the snapshot");
    assert_eq!(parent_of(&full_root), Some(template_snap.clone()), "a full clone rests on its own template");
    assert!(parent(&full_data).is_none(), "a copied data volume stands alone");

    // 4. Both clones started from the MN's Ceph VolumeTOs: each reads the source's bytes.
    for (root, data) in [(&linked_root, &linked_data), (&full_root, &full_data)] {
        let clone = uuid();
        h.track_vm(&clone);
        let cmd = start_cmd(&h, &clone, &ceph_volume(root, 0, &secret), &[&ceph_volume(data, 1, &secret)], json!([]), 2);
        let seen = mn.start(&cmd).await;
        assert_eq!((seen["vda"][&0].as_slice(), seen["vdb"][&0].as_slice()), (&image_bytes[..], &data_bytes[..]));
    }
    assert_eq!(domstate(&vm).as_deref(), Some("running"));
}

/// What every MN command to the Ceph agent carries (`CephPrimaryStorageBase.AgentCommand`).
fn ceph_command(mut body: Value) -> Value {
    let common = json!({"uuid": uuid(), "fsId": "", "monUuid": uuid(), "kvmHostAddons": {}});
    body.as_object_mut().unwrap().extend(common.as_object().unwrap().clone());
    body
}

fn url(spec: &str) -> String {
    format!("ceph://{spec}")
}

/// The image's name, without its pool (`CPB:6026-6057`: a cache snapshot is named after it).
fn name_of(spec: &str) -> &str {
    Path::new(spec).file_name().and_then(|n| n.to_str()).unwrap()
}

/// `CephPrimaryStorageFactory.java:395-430` `KVMCephVolumeTO` of `spec`: the file `VolumeTO`
/// rewritten for RBD (`deviceType: ceph`, raw, the monitors, the secret).
fn ceph_volume(spec: &str, device_id: u32, secret: &str) -> Value {
    let vol = uuid();
    let port: u16 = std::env::var("KVMAGENT_CEPH_MON_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(6789);
    let mut to = volume_to(&vol, Path::new(&url(spec)), device_id, if device_id == 0 { "Root" } else { "Data" });
    to["deviceType"] = json!("ceph");
    to["format"] = json!("raw");
    to["primaryStorageType"] = json!("Ceph");
    to["secretUuid"] = json!(secret);
    to["monInfo"] = json!([{"hostname": "127.0.0.1", "port": port}]);
    to
}
