//! Torture: start an operation (create, clone, change image, flatten offline and live, create on
//! RBD, backup, an incremental backup point of a local VM (dirty bitmaps) and of a VM on RBD
//! (snapshot diff), an image download into the cache, a volume from a snapshot), SIGKILL the
//! agent at a random moment, start it again, and check that the final result
//! for that taskuuid is delivered, every volume passes `qemu-img check`, the sources are
//! bit-identical, and nothing half-made is left: no volume, image, domain or temporary file of
//! a failed operation, no undo log. `KVMAGENT_TORTURE_COUNT` sets how many rounds (default: one
//! per kind of operation); `KVMAGENT_TORTURE_KINDS` (comma-separated) picks the kinds;
//! `KVMAGENT_TORTURE_SEED` replays a run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvmagent_host_tests::ceph::{self, agent_config};
use kvmagent_host_tests::checks::{
    bitmaps, checkpoints, domstate, file_sha256, guest_disk_fill, guest_disk_flush, qemu_img, qemu_img_info,
    qemu_io_fill, virsh,
};
use kvmagent_host_tests::guest::staying_kernel_boot;
use kvmagent_host_tests::http_server::{sha256, HttpServer, Serve};
use kvmagent_host_tests::images::{data_volume_path, root_volume_path, BaseImage};
use kvmagent_host_tests::sources::rbd_spec;
use kvmagent_host_tests::{record_volumes, uuid, Host, Rng};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const KINDS: [&str; 13] = [
    "create",
    "clone",
    "changeimage",
    "flatten-offline",
    "flatten-live",
    "rbd-create",
    "clone-linked",
    "backup",
    "backup-incremental",
    "rbd-backup",
    "download",
    "merge",
    "ls-create",
];

/// What one round must find afterwards.
enum Expect {
    /// All-or-nothing: on success these files/images and domains exist, on failure none do.
    AllOrNothing { paths: Vec<String>, domains: Vec<String>, defined: bool },
    /// Change image: the new root replaced the old one (the agent may have died after the
    /// switch, and the next start finished it), or the old one is untouched; one of them only.
    Replaced { vm: String, old: PathBuf, new: PathBuf },
    /// A backup point is written whole or not at all, and the VM ends on its own files.
    Backup { vm: String, group: PathBuf, volumes: Vec<String> },
    /// An incremental point over a full one: recorded whole (the manifest's second point) or not
    /// at all (the group's files as `before`), and the VM's volumes keep the bitmaps, checkpoints
    /// or RBD snapshots of the newest recorded point only.
    Incremental { marks: BackupMarks, dir: PathBuf, before: Vec<PathBuf> },
    /// A flatten always ends done (resumed after the kill): the root stands alone and reads as
    /// `reference` did.
    Flat { vm: String, root: PathBuf, reference: PathBuf },
    /// An image download (`/image/cache`): the target holds the source's bytes, or is not there
    /// (and is there after a success).
    Downloaded { target: PathBuf, sha: String },
    /// A volume from a snapshot (`/localstorage/snapshot/merge`): the workspace file reads as
    /// the snapshot, or is not there; the snapshot is never written.
    Merged { workspace: PathBuf, snapshot: PathBuf, snapshot_sha: String },
    /// A new volume at a name of the agent's choosing (snapshot revert, reinit): `dir` holds one
    /// file more than `before` exactly when the command succeeded.
    NewFileIn { dir: PathBuf, before: Vec<PathBuf> },
}

struct Setup {
    base: BaseImage,
    base_sha: String,
    image: BaseImage,
    rbd_image: String,
    clone_source: String,
    clone_source_shas: Vec<(PathBuf, String)>,
    /// Serves the images of the download rounds.
    http: HttpServer,
}

fn exists(path: &str) -> bool {
    if path.starts_with("ceph://") {
        ceph::info(&rbd_spec(path)).is_some()
    } else {
        Path::new(path).exists()
    }
}

/// A VM with a thin root on the base image and a data volume, defined and stopped (or running).
async fn vm(h: &Host, s: &Setup, strategy: &str) -> (String, PathBuf) {
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(h);
    let (data_uuid, data) = data_volume_path(h);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "torture", "memory": 128 * MIB, "cpuNum": 1,
               "kernelBoot": staying_kernel_boot(h, &[0], 2).unwrap()},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": s.base.path},
        "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 16 * MIB}],
        "strategy": strategy,
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    (vm, root)
}

/// A backup group's VM and what marks its volumes with the group's newest point: dirty bitmaps
/// and libvirt checkpoints (local qcow2), or RBD snapshots.
struct BackupMarks {
    vm: String,
    group: String,
    /// The VM's install paths (files, or `ceph://pool/image`), root first.
    volumes: Vec<String>,
    on_ceph: bool,
}

impl BackupMarks {
    /// The point's mark name, as the agent names it.
    fn name(&self, point: usize) -> String {
        format!("kvmagent-backup-{}-{point}", self.group)
    }

    /// Writes `len` bytes of `byte` at `offset` of volume `i`: through the running VM's block
    /// layer, into the stopped VM's file, or into the RBD image.
    fn write(&self, i: usize, offset: u64, len: u64, byte: u8) {
        let v = &self.volumes[i];
        if self.on_ceph {
            ceph::fill(&rbd_spec(v), offset, len, byte);
        } else if domstate(&self.vm).as_deref() == Some("running") {
            guest_disk_fill(&self.vm, &format!("virtio-disk{i}"), offset, len, byte).unwrap();
        } else {
            qemu_io_fill(Path::new(v), offset, len, byte).unwrap();
        }
    }

    /// The volumes carry no backup marks but those of `point`; answers whether each carries
    /// them (a point killed after it dropped the older marks, and so undone, leaves none: the
    /// next point compares). A running VM's bitmaps reach its files when QEMU closes them: only
    /// its checkpoints are looked at.
    fn only_of(&self, point: usize) -> bool {
        let keep = vec![self.name(point)];
        let mut carried = Vec::new();
        if self.on_ceph {
            // Every snapshot of the image: the point's is the only one the agent keeps.
            carried.extend(self.volumes.iter().map(|v| (v.clone(), ceph::snapshots(&rbd_spec(v)))));
        } else {
            carried.push((format!("the checkpoints of VM {}", self.vm), checkpoints(&self.vm)));
            if domstate(&self.vm).as_deref() != Some("running") {
                let backup =
                    |v: &String| bitmaps(v).into_iter().filter(|b| b.starts_with("kvmagent-backup-")).collect();
                carried.extend(self.volumes.iter().map(|v| (v.clone(), backup(v))));
            }
        }
        for (what, marks) in &carried {
            assert!(marks.iter().all(|m| keep.contains(m)), "{what}: {marks:?}, newest recorded point {keep:?}");
        }
        carried.iter().all(|(_, marks)| *marks == keep)
    }
}

/// A stopped VM on RBD: its root a clone of the cached RBD image, and a data volume.
async fn rbd_vm(h: &Host, s: &Setup) -> String {
    let vm = uuid();
    h.track_vm(&vm);
    let img = &s.rbd_image;
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "t-rbd-backup", "memory": 128 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://rbd/vol-{}", uuid()), "imagePath": format!("ceph://rbd/{img}@{img}")},
        "dataVolumes": [{"volumeUuid": uuid(), "installPath": format!("ceph://rbd/vol-{}", uuid()), "size": 16 * MIB}],
        "ceph": {"monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &cmd).await.unwrap();
    vm
}

fn backup_dir(h: &Host, group: &str) -> PathBuf {
    h.state_dir.parent().unwrap().join("backup").join(group)
}

/// The command of one round, and what to check after it.
async fn round(h: &Host, s: &Setup, kind: &str, rng: &mut Rng) -> (&'static str, Value, Expect) {
    match kind {
        "download" => {
            // A qcow2 of a few hundred KiB: mostly dripped 64 KiB at a time (the kill lands
            // mid-download), sometimes sent at once (it lands after).
            let id = uuid();
            let src = h.dir.path().join(format!("download-{id}.qcow2"));
            qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "16M"]).unwrap();
            qemu_io_fill(&src, 0, (1 + rng.below(8) as u64) * (64 << 10), 0x3c).unwrap();
            let body = std::fs::read(&src).unwrap();
            std::fs::remove_file(&src).unwrap();
            let sha = sha256(&body);
            let how =
                if rng.below(3) == 0 { Serve::Whole { body, delay: Duration::ZERO } } else { Serve::Drip { body } };
            let url = s.http.serve(&format!("/images/{id}.qcow2"), how);
            let target = h.path(&format!("imagecache/template/{id}/{id}.qcow2"));
            let cmd = json!({"url": url, "sha256": sha, "installPath": target});
            ("/image/cache", cmd, Expect::Downloaded { target, sha })
        }
        "merge" => {
            // A snapshot on the base image (96 MiB of data), with data of its own.
            let (id, vol) = root_volume_path(h);
            let snapshot = vol.parent().unwrap().join(format!("snapshots/{}.qcow2", uuid()));
            std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
            let (base, snap) = (s.base.path.to_str().unwrap(), snapshot.to_str().unwrap());
            qemu_img(&["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", snap]).unwrap();
            qemu_io_fill(&snapshot, rng.below(64) as u64 * MIB, 4 * MIB, 0xc3).unwrap();
            let snapshot_sha = file_sha256(&snapshot).unwrap();
            let workspace = h.path(&format!("snapshotWorkspace/{id}/{id}.qcow2"));
            let cmd = json!({"snapshotInstallPath": snapshot, "workspaceInstallPath": workspace, "volumeUuid": id});
            ("/localstorage/snapshot/merge", cmd, Expect::Merged { workspace, snapshot, snapshot_sha })
        }
        "ls-create" => {
            // ZStack's local-storage creates, thin and quick: the kill lands before, during or
            // after the new volume is in place, or after the task's result is recorded.
            let (id, target) = root_volume_path(h);
            let base = s.base.path.to_str().unwrap();
            let dir = target.parent().unwrap().to_path_buf();
            std::fs::create_dir_all(&dir).unwrap();
            let made = dir.join("made.qcow2");
            qemu_img(&["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", made.to_str().unwrap()]).unwrap();
            let before = vec![made.clone()];
            let all_or_nothing = |path: &'static str, cmd: Value| {
                let paths = vec![target.display().to_string()];
                (path, cmd, Expect::AllOrNothing { paths, domains: Vec::new(), defined: false })
            };
            match rng.below(5) {
                0 => all_or_nothing(
                    "/localstorage/volume/createvolumefromcache",
                    json!({"templatePathInCache": base, "installUrl": target, "volumeUuid": id}),
                ),
                1 => all_or_nothing(
                    "/localstorage/volume/createempty",
                    json!({"installUrl": target, "size": 64 * MIB, "volumeUuid": id, "backingFile": made}),
                ),
                2 => all_or_nothing(
                    "/localstorage/volume/createwithbacking",
                    json!({"templatePathInCache": made, "installPath": target, "volumeUuid": id}),
                ),
                3 => {
                    let cmd = json!({"snapshotInstallPath": made, "volumeUuid": id});
                    ("/localstorage/snapshot/revert", cmd, Expect::NewFileIn { dir, before })
                }
                _ => {
                    let cmd = json!({"imagePath": base, "volumePath": made});
                    ("/localstorage/reinit/image", cmd, Expect::NewFileIn { dir, before })
                }
            }
        }
        "create" => {
            let vm = uuid();
            h.track_vm(&vm);
            let (root_uuid, root) = root_volume_path(h);
            let (data_uuid, data) = data_volume_path(h);
            let mut cmd = json!({
                "vm": {"vmInstanceUuid": vm, "vmName": "t-create", "memory": 128 * MIB, "cpuNum": 1},
                "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": s.base.path, "provisioning": "thick"},
                "dataVolumes": [{"volumeUuid": data_uuid, "installPath": data, "size": 64 * MIB, "provisioning": "thick"}],
                "strategy": "CreateStopped",
            });
            let mut paths = vec![root.display().to_string(), data.display().to_string()];
            // Every other round a UEFI VM with a TPM and a cloud-init seed: its NVRAM and seed,
            // beside the root, are made with it or not at all.
            if rng.below(2) == 0 {
                cmd["firmware"] = json!("uefi");
                cmd["cloudInit"] = json!({"hostname": "t-create"});
                cmd["vm"]["tpm"] = json!({"enable": true});
                let dir = root.parent().unwrap();
                paths.extend(
                    [dir.join(format!("{vm}.nvram.fd")), dir.join(format!("cidata-{vm}.iso"))]
                        .map(|p| p.display().to_string()),
                );
            }
            ("/vm/create", cmd, Expect::AllOrNothing { paths, domains: vec![vm], defined: true })
        }
        "clone" => {
            let (mut clones, mut paths, mut domains) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..2 {
                let (c, (_, root), (_, data)) = (uuid(), root_volume_path(h), data_volume_path(h));
                h.track_vm(&c);
                clones.push(json!({"uuid": c, "rootInstallPath": root, "dataInstallPaths": [data]}));
                paths.extend([root.display().to_string(), data.display().to_string()]);
                domains.push(c);
            }
            let cmd = json!({"vmUuid": s.clone_source, "mode": "copy", "full": true, "strategy": "CreateStopped", "clones": clones});
            ("/vm/clone", cmd, Expect::AllOrNothing { paths, domains, defined: true })
        }
        "changeimage" => {
            let (vm, root) = vm(h, s, "CreateStopped").await;
            let (_, new) = root_volume_path(h);
            let cmd = json!({"vmUuid": vm, "imagePath": s.image.path, "newRootInstallPath": new});
            ("/vm/changeimage", cmd, Expect::Replaced { vm, old: root, new })
        }
        "clone-linked" => {
            // A fresh stopped source: the freeze switches its record to new tops.
            let (source, _) = vm(h, s, "CreateStopped").await;
            let (c, (_, root), (_, data)) = (uuid(), root_volume_path(h), data_volume_path(h));
            h.track_vm(&c);
            let clones = [json!({"uuid": c, "rootInstallPath": root, "dataInstallPaths": [data]})];
            let cmd = json!({"vmUuid": source, "mode": "linked", "full": true, "strategy": "CreateStopped", "clones": clones});
            let paths = vec![root.display().to_string(), data.display().to_string()];
            ("/vm/clone", cmd, Expect::AllOrNothing { paths, domains: vec![c], defined: true })
        }
        "backup" => {
            let (vm, _) = vm(h, s, "InstantStart").await;
            let volumes = h.recorded_paths(&vm).unwrap();
            let group = uuid();
            let dir = backup_dir(h, &group);
            ("/vm/backup", json!({"vmUuid": vm, "groupUuid": group}), Expect::Backup { vm, group: dir, volumes })
        }
        "backup-incremental" | "rbd-backup" => {
            // A full point (not killed), then writes on both volumes: the killed command is the
            // incremental point, by bitmaps (a local VM, running or stopped) or by RBD snapshot
            // diff.
            let on_ceph = kind == "rbd-backup";
            let vm = if on_ceph {
                rbd_vm(h, s).await
            } else {
                vm(h, s, if rng.below(2) == 0 { "InstantStart" } else { "CreateStopped" }).await.0
            };
            println!("{kind}: a {} VM", domstate(&vm).unwrap_or_default());
            let marks = BackupMarks { volumes: h.recorded_paths(&vm).unwrap(), vm, group: uuid(), on_ceph };
            let full = h.call_ok("/vm/backup", &json!({"vmUuid": marks.vm, "groupUuid": marks.group})).await.unwrap();
            assert_eq!(full["point"], 0, "{full}");
            assert!(marks.only_of(0), "the full point marks every volume");
            for i in 0..marks.volumes.len() {
                // Both volumes are 16 MiB or more: up to 4 MiB within the first 16.
                let len = (1 + rng.below(4) as u64) * MIB;
                let offset = rng.below(((16 * MIB - len) >> 12) as usize) as u64 * 4096;
                marks.write(i, offset, len, 0x40 + i as u8);
            }
            let dir = backup_dir(h, &marks.group);
            let before = files(&dir);
            let cmd = json!({"vmUuid": marks.vm, "mode": "incremental", "groupUuid": marks.group});
            ("/vm/backup", cmd, Expect::Incremental { marks, dir, before })
        }
        "flatten-offline" | "flatten-live" => {
            let live = kind == "flatten-live";
            let (vm, root) = vm(h, s, if live { "InstantStart" } else { "CreateStopped" }).await;
            let reference = h.path(&format!("reference-{vm}.qcow2"));
            qemu_img(&["convert", "-U", "-O", "qcow2", root.to_str().unwrap(), reference.to_str().unwrap()]).unwrap();
            ("/vm/flatten", json!({"vmUuid": vm}), Expect::Flat { vm, root, reference })
        }
        "rbd-create" => {
            let vm = uuid();
            h.track_vm(&vm);
            let root = format!("ceph://rbd/vol-{}", uuid());
            let img = &s.rbd_image;
            let cmd = json!({
                "vm": {"vmInstanceUuid": vm, "vmName": "t-rbd", "memory": 128 * MIB, "cpuNum": 1},
                "rootVolume": {"volumeUuid": uuid(), "installPath": root, "imagePath": format!("ceph://rbd/{img}@{img}"), "provisioning": "thick"},
                "ceph": {"monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
                "strategy": "JustCreate",
            });
            ("/vm/create", cmd, Expect::AllOrNothing { paths: vec![root], domains: vec![vm], defined: false })
        }
        other => panic!("unknown torture kind {other}"),
    }
}

/// Every file under `dir` (regular files only).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files(&e.path()));
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    out
}

fn check(h: &Host, s: &Setup, result: &Value, expect: &Expect) {
    // A clone command succeeds even when each of its clones failed (and left nothing): what
    // counts is whether its clone was made.
    let ok = result["success"] == true && result["numberOfClonedVm"] != 0;
    match expect {
        Expect::AllOrNothing { paths, domains, defined } => {
            for p in paths {
                assert_eq!(exists(p), ok, "{p} exists exactly when the operation succeeded: {result}");
            }
            for d in domains {
                let wanted = ok && *defined;
                // A define the killed agent sent may run in libvirtd after recovery undid it; the
                // restarted agent removes such a domain again within a minute.
                let deadline = std::time::Instant::now() + Duration::from_secs(70);
                while !wanted && domstate(d).is_some() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(250));
                }
                assert_eq!(domstate(d).is_some(), wanted, "domain {d}: {result}");
            }
        }
        Expect::Replaced { vm, old, new } => {
            assert_ne!(old.exists(), new.exists(), "one root only: {result}");
            assert!(!ok || new.exists(), "{result}");
            let root = &h.recorded_paths(vm).unwrap()[0];
            assert!(Path::new(root).exists(), "the VM's record names the root that is there: {root}");
            let xml = kvmagent_host_tests::checks::dumpxml(vm).unwrap();
            assert!(xml.contains(root.as_str()), "the domain is defined on the recorded root {root}: {xml}");
        }
        Expect::Backup { vm, group, volumes } => {
            assert_eq!(group.join("manifest.json").exists(), ok, "{result}");
            assert_eq!(group.exists(), ok, "a failed backup leaves no group: {result}");
            let xml = kvmagent_host_tests::checks::dumpxml(vm).unwrap();
            for v in volumes {
                assert!(xml.contains(v.as_str()), "the VM is back on {v}: {xml}");
            }
        }
        Expect::Incremental { marks, dir, before } => {
            let manifest: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
            let points = manifest["points"].as_array().unwrap().len();
            assert_eq!(
                points,
                1 + usize::from(ok),
                "the manifest records the point exactly when it succeeded: {result}"
            );
            let mut now = files(dir);
            now.retain(|f| !before.contains(f));
            if ok {
                assert_eq!(result["point"], 1, "{result}");
            } else {
                assert!(now.is_empty(), "a failed point leaves no file of its own: {now:?}: {result}");
            }
            let xml = kvmagent_host_tests::checks::dumpxml(&marks.vm).unwrap();
            for v in &marks.volumes {
                assert!(xml.contains(&rbd_spec(v)), "the VM is back on {v}: {xml}");
            }
            // QEMU writes a running VM's bitmaps into its files as it exits (SIGTERM).
            if domstate(&marks.vm).as_deref() == Some("running") {
                virsh(&["destroy", "--graceful", &marks.vm]).unwrap();
            }
            if !marks.only_of(points - 1) {
                assert!(!ok, "a recorded point marks every volume: {result}");
                println!("the point was undone after the older marks went: none is left");
            }
            if marks.on_ceph {
                // A backup makes no RBD image, only the points' snapshots (checked above).
                let img = &s.rbd_image;
                assert_eq!(ceph::snapshots(&format!("rbd/{img}")), vec![img.clone()], "the cached image's snapshots");
            }
        }
        Expect::Flat { vm, root, reference } => {
            assert!(ok, "an interrupted flatten is resumed to the end: {result}");
            if domstate(vm).as_deref() == Some("running") {
                guest_disk_flush(vm, "virtio-disk0").unwrap();
            }
            assert!(qemu_img_info(root).unwrap()["backing-filename"].is_null(), "{}", root.display());
            let same = qemu_img(&["compare", "-U", reference.to_str().unwrap(), root.to_str().unwrap()]).unwrap();
            assert!(same.contains("identical"), "{same}");
        }
        Expect::Downloaded { target, sha } => {
            // A download killed after the verified image was published keeps it (the task is
            // reported interrupted; the retry answers with the image at once): never a partial one.
            assert!(!ok || target.exists(), "{} is there after a success: {result}", target.display());
            if target.exists() {
                assert_eq!(&file_sha256(target).unwrap(), sha, "bit-identical to the source");
            }
        }
        Expect::Merged { workspace, snapshot, snapshot_sha } => {
            assert_eq!(
                workspace.exists(),
                ok,
                "{} exists exactly when the merge succeeded: {result}",
                workspace.display()
            );
            if ok {
                let (ws, snap) = (workspace.to_str().unwrap(), snapshot.to_str().unwrap());
                assert!(qemu_img_info(workspace).unwrap()["backing-filename"].is_null(), "a flat copy: {ws}");
                let same = qemu_img(&["compare", "-U", ws, snap]).unwrap();
                assert!(same.contains("identical"), "{same}");
            }
            assert_eq!(&file_sha256(snapshot).unwrap(), snapshot_sha, "the snapshot was not written");
        }
        Expect::NewFileIn { dir, before } => {
            let new: Vec<PathBuf> = files(dir).into_iter().filter(|f| !before.contains(f)).collect();
            assert_eq!(new.len(), usize::from(ok), "new files in {}: {new:?}: {result}", dir.display());
            if ok {
                assert_eq!(result["newVolumeInstallPath"].as_str(), new[0].to_str(), "{result}");
            }
        }
    }
    let all = files(&h.path(""));
    let temporary: Vec<&PathBuf> = all.iter().filter(|p| p.to_string_lossy().contains(".kvmagent-tmp-")).collect();
    assert!(temporary.is_empty(), "temporary files left: {temporary:?}");
    for f in all.iter().filter(|p| p.extension().is_some_and(|e| e == "qcow2")) {
        qemu_img(&["check", "-U", "-q", f.to_str().unwrap()]).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
    // No VM record names a file that is gone.
    for e in std::fs::read_dir(h.state_dir.join("vms")).unwrap().flatten() {
        let rec: Value = serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
        for (_, p) in record_volumes(&rec).iter().filter(|(_, p)| !p.starts_with("ceph://")) {
            assert!(Path::new(p).exists(), "the record {} names {p}, which is gone", e.path().display());
        }
    }
    let undo = h.state_dir.join("undo");
    assert_eq!(std::fs::read_dir(&undo).map(|d| d.count()).unwrap_or(0), 0, "every undo log was played or dropped");
    assert_eq!(file_sha256(&s.base.path).unwrap(), s.base_sha, "the base image was not written");
    for (p, sha) in &s.clone_source_shas {
        assert_eq!(&file_sha256(p).unwrap(), sha, "the clone source was not written");
    }
}

/// What the host held before a round: once the round is checked, what it made goes, so that
/// a long run holds one round's VMs, files and RBD images, not all of them.
struct Made {
    vms: usize,
    files: Vec<PathBuf>,
}

impl Made {
    fn now(h: &Host) -> Made {
        Made { vms: h.tracked_vms().len(), files: Made::files(h) }
    }

    /// The files of the storage and backup roots.
    fn files(h: &Host) -> Vec<PathBuf> {
        let mut all = files(&h.path(""));
        all.extend(files(&h.state_dir.parent().unwrap().join("backup")));
        all
    }

    /// Removes the round's VMs through the agent (domain, record and the agent's own files),
    /// then their files and RBD images.
    async fn remove_since(self, h: &Host, expect: &Expect) {
        // A round's VMs are tracked, so their records name their images; a create's are also
        // named by what it expects.
        let mut images: Vec<String> = match expect {
            Expect::AllOrNothing { paths, .. } => paths.clone(),
            _ => Vec::new(),
        };
        for vm in &h.tracked_vms()[self.vms..] {
            images.extend(h.recorded_paths(vm).unwrap_or_default());
            h.call_ok("/vm/destroy", &json!({"uuid": vm})).await.unwrap();
        }
        // The files older VMs still recorded (the clone source) name stay, wherever they came from.
        let kept: Vec<PathBuf> = h.tracked_vms()[..self.vms]
            .iter()
            .flat_map(|vm| h.recorded_paths(vm).unwrap_or_default())
            .map(PathBuf::from)
            .collect();
        for f in Made::files(h).into_iter().filter(|f| !self.files.contains(f) && !kept.contains(f)) {
            std::fs::remove_file(&f).unwrap_or_else(|e| panic!("removing {}: {e}", f.display()));
        }
        images.sort();
        images.dedup();
        for p in images.iter().filter(|p| p.starts_with("ceph://")) {
            ceph::remove_all(&rbd_spec(p));
        }
    }
}

/// The entries of `dir` whose names start with `prefix`.
fn files_named(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries.filter(|e| e.file_name().to_string_lossy().starts_with(prefix)).map(|e| e.path()).collect()
}

#[tokio::test]
async fn kill_the_agent_at_random_moments() {
    let kinds: Vec<String> = match std::env::var("KVMAGENT_TORTURE_KINDS") {
        Ok(k) => k.split(',').map(str::to_owned).collect(),
        Err(_) => KINDS.iter().map(|k| k.to_string()).collect(),
    };
    for k in &kinds {
        assert!(KINDS.contains(&k.as_str()), "unknown torture kind {k:?}: one of {KINDS:?}");
    }
    // Only the RBD rounds need the Ceph cluster.
    let rbd = kinds.iter().any(|k| k.starts_with("rbd-"));
    let mut h = Host::start_with(&if rbd { agent_config() } else { String::new() }).await.unwrap();
    let rounds: usize =
        std::env::var("KVMAGENT_TORTURE_COUNT").ok().and_then(|n| n.parse().ok()).unwrap_or(KINDS.len());
    let seed: u64 = std::env::var("KVMAGENT_TORTURE_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| u64::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap()) | 1);
    println!("torture: {rounds} rounds, KVMAGENT_TORTURE_SEED={seed}");
    let mut rng = Rng(seed);

    // Real data, so that copies and flattens take long enough to be cut in the middle.
    let base = BaseImage::create(&h, 128 * MIB).unwrap();
    qemu_io_fill(&base.path, 2 * MIB, 96 * MIB, 0x5a).unwrap();
    let image = BaseImage::create(&h, 64 * MIB).unwrap();
    let rbd_image = format!("image-{}", uuid());
    if rbd {
        ceph::rbd(&["create", "--size", "96M", &format!("rbd/{rbd_image}")]).unwrap();
        let fill = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 7 0 64M", &ceph::qemu_name(&format!("rbd/{rbd_image}"))])
            .output()
            .unwrap();
        assert!(fill.status.success());
        ceph::rbd(&["snap", "create", &format!("rbd/{rbd_image}@{rbd_image}")]).unwrap();
    }
    let mut s = Setup {
        base_sha: file_sha256(&base.path).unwrap(),
        base,
        image,
        rbd_image,
        clone_source: String::new(),
        clone_source_shas: Vec::new(),
        http: HttpServer::start().await,
    };
    let (source, _) = vm(&h, &s, "CreateStopped").await;
    for p in h.recorded_paths(&source).unwrap().into_iter().map(PathBuf::from) {
        s.clone_source_shas.push((p.clone(), file_sha256(&p).unwrap()));
    }
    s.clone_source = source;

    let (mut before, mut interrupted, mut resumed) = (0, 0, 0);
    for i in 0..rounds {
        let kind = kinds[i % kinds.len()].as_str();
        let made_before = Made::now(&h);
        let (path, cmd, expect) = round(&h, &s, kind, &mut rng).await;
        // The quick local-storage creates and a change of image (a thin overlay) take tens of
        // milliseconds: they are killed within their first 100 and 50. An RBD backup point
        // takes seconds (each snapshot made or dropped up to one): it is killed anywhere in it,
        // and sometimes finishes first.
        let window = match kind {
            "ls-create" => 100,
            "changeimage" => 50,
            "rbd-backup" => 5000,
            _ => 600,
        };
        let delay = Duration::from_millis(rng.next_u64() % window);
        let task = h.send(path, &cmd).await.unwrap();
        tokio::time::sleep(delay).await;
        let killed = h.pid().expect("the agent runs");
        h.kill_agent().unwrap();
        let finished = h.callbacks.results(&task).is_some();
        h.restart_agent().unwrap();
        let result = h.callbacks.wait(&task, Duration::from_secs(300)).await.unwrap();
        let report = h.recovery_report().await;
        // The killed agent's NBD servers died with it; recovery removes their socket directories.
        let nbd_dirs = files_named(&std::env::temp_dir(), &format!("kvmagent-nbd-{killed}-"));
        assert!(nbd_dirs.is_empty(), "round {i}: the killed agent's NBD directories are left: {nbd_dirs:?}");
        if finished {
            before += 1;
        } else if report["resumed"].as_array().is_some_and(|r| r.iter().any(|t| t == &json!(task))) {
            resumed += 1;
        } else {
            interrupted += 1;
        }
        println!("round {i}: {kind}, killed after {delay:?}: success={}", result["success"]);
        if std::env::var("KVMAGENT_TORTURE_LOG").is_ok() {
            println!("{}", h.log());
        }
        // A failed check shows the agent's log (every run of it): what the kill interrupted.
        let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&h, &s, &result, &expect)));
        if let Err(panic) = checked {
            println!("round {i} failed; the agent's log:\n{}", h.log());
            std::panic::resume_unwind(panic);
        }
        made_before.remove_since(&h, &expect).await;
    }
    println!(
        "torture: {rounds} rounds: {before} finished before the kill, {interrupted} killed and rolled back, {resumed} killed and resumed"
    );
    if rbd {
        ceph::remove_all(&format!("rbd/{}", s.rbd_image));
    }
}
