//! A host for unit tests of the orchestration: an [`App`] on a temporary directory with fakes of
//! every external system (hypervisor, qemu-img, RBD) sharing one [`Faults`] plan. It can be
//! "restarted" (a new `App` on the same directories and the same hypervisor, as after a kill)
//! to test crash recovery.

/// The management node's Java reply and report types (shared with the host tests).
#[path = "../../tests/src/mn_types.rs"]
pub mod mn_types;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::app::{App, Backends};
use crate::ceph::fake::{FakeCluster, FakeRbd};
use crate::config::Config;
use crate::faults::Faults;
use crate::hypervisor::fake::FakeHypervisor;
use crate::network::fake::FakeNet;
use crate::qemu_img::fake::{self, FakeQemuImg, BLOCK};
use crate::qemu_img::{CreateOptions, QemuImg};
use crate::recovery::{Inherited, Runner};
use crate::tasks::journal::TaskRecord;
use crate::tasks::registry::{Admission, Intake};
use crate::tasks::TaskCtx;

pub struct TestHost {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub hv: Arc<FakeHypervisor>,
    pub rbd: Arc<FakeRbd>,
    /// Failures and kills of hypervisor and qemu-img calls.
    pub faults: Arc<Faults>,
    pub net: Arc<FakeNet>,
    pub ceph: Arc<FakeCluster>,
    pub app: Arc<App>,
    checked: Checked,
}

/// Recovery as a restarted agent runs it, without an HTTP runner: nothing is resumed and
/// results are not posted.
struct NoRunner;

impl Runner for NoRunner {
    fn resume(&self, _: &Arc<App>, _: &TaskRecord) -> bool {
        false
    }
    fn deliver(&self, _: &Arc<App>, _: String, _: String, _: Value) {}
}

pub fn uuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Files already checked, by path, size and modification time: unchanged ones are not
/// checked again (kill tests check the whole host after every kill).
type Checked = std::sync::Mutex<std::collections::HashMap<PathBuf, (u64, std::time::SystemTime)>>;

/// The backing file `path`'s header names, resolved beside it.
pub fn backing(path: &str) -> Option<PathBuf> {
    let h = crate::qemu_img::read_header(Path::new(path)).unwrap();
    h.backing_file.map(|b| Path::new(path).parent().unwrap().join(b))
}

/// Whether the two images read the same.
pub fn same_content(a: &str, b: &str) -> bool {
    fake::same_content(Path::new(a), Path::new(b))
}

/// Writes `byte` over the 64 KiB block at `offset` of the image (as a guest would).
pub fn write(path: &str, offset: u64, byte: u8) {
    fake::write_block(Path::new(path), offset, byte)
}

impl TestHost {
    pub fn start() -> TestHost {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let faults = Arc::new(Faults::default());
        let hv = Arc::new(FakeHypervisor::new(faults.clone()));
        let rbd = Arc::new(FakeRbd::default());
        let net = Arc::new(FakeNet::default());
        let ceph = Arc::new(FakeCluster::default());
        let app = start(dir.path(), &root, backends(&hv, &rbd, &ceph, &faults, &net)).0;
        TestHost { dir, root, hv, rbd, faults, net, ceph, app, checked: Default::default() }
    }

    /// A new agent on the same directories and hypervisor, after recovery: what a restart
    /// after a kill does.
    pub async fn restart_and_recover(&mut self) -> crate::recovery::Report {
        self.faults.revive();
        let fakes = backends(&self.hv, &self.rbd, &self.ceph, &self.faults, &self.net);
        let (app, inherited) = start(self.dir.path(), &self.root, fakes);
        self.app = app;
        self.recover(inherited).await
    }

    async fn recover(&self, inherited: Inherited) -> crate::recovery::Report {
        crate::recovery::recover(&self.app, inherited, &NoRunner).await
    }

    /// The image and its chain can be read (once per version of the file).
    pub fn check(&self, path: &Path) {
        let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let version = (m.len(), m.modified().unwrap());
        if self.checked.lock().unwrap().get(path) != Some(&version) {
            fake::check(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            self.checked.lock().unwrap().insert(path.to_path_buf(), version);
        }
    }

    /// A path under the storage root.
    pub fn path(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }

    /// A cached image of `size` bytes with a pattern written at its start.
    pub async fn image(&self, name: &str, size: u64) -> String {
        let p = self.path(&format!("imagecache/{name}.qcow2"));
        std::fs::create_dir_all(Path::new(&p).parent().unwrap()).unwrap();
        let q = FakeQemuImg::new(Arc::default());
        q.create(Path::new(&p), size.next_multiple_of(BLOCK), &CreateOptions::default(), &Default::default())
            .await
            .unwrap();
        write(&p, 0, 0x5a);
        p
    }

    /// Every file under the storage root.
    pub fn files(&self) -> BTreeSet<PathBuf> {
        fn walk(d: &Path, out: &mut BTreeSet<PathBuf>) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path(), out);
                } else {
                    out.insert(e.path());
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.root, &mut out);
        out
    }

    /// A task admitted as the HTTP server admits one (journaled as running).
    pub async fn task(&self, path: &str) -> TaskCtx {
        let id = uuid();
        let intake = Intake {
            task_id: &id,
            path,
            callback_url: None,
            raw_body: b"{}",
            api_id: None,
            thread_context: Value::Null,
            thread_context_stack: Value::Null,
        };
        match self.app.tasks.admit(intake).await.unwrap() {
            Admission::Start(ctx) => ctx,
            _ => unreachable!("a fresh task id"),
        }
    }

    /// A `/vm/create` body: a thin root on `image`, a data volume of 1 MiB, started.
    pub fn create_cmd(&self, vm: &str, image: &str) -> Value {
        json!({
            "vm": {"vmInstanceUuid": vm, "vmName": "t", "memory": 67108864, "cpuNum": 1},
            "rootVolume": {"volumeUuid": uuid(), "installPath": self.path(&format!("rootVolumes/vol-{vm}/root.qcow2")),
                           "imagePath": image},
            "dataVolumes": [{"volumeUuid": uuid(), "installPath": self.path(&format!("dataVolumes/vol-{vm}/data.qcow2")),
                             "size": 1048576}],
        })
    }

    /// Creates a running VM (root on a new image, one data volume); returns its uuid.
    pub async fn running_vm(&self) -> String {
        let vm = uuid();
        let image = self.image(&uuid(), 4 << 20).await;
        let cmd = crate::wire::decode_native(&self.create_cmd(&vm, &image)).unwrap();
        crate::ops::create::create(&self.app, &TaskCtx::detached("/vm/create"), cmd).await.unwrap();
        vm
    }

    /// The VM's recorded volume paths, root first.
    pub async fn recorded(&self, vm: &str) -> Vec<String> {
        let g = self.app.vms.lock(vm).await.unwrap();
        g.load().unwrap().volumes.iter().map(|v| v.install_path()).collect()
    }

    /// The VM's recorded NVRAM file.
    pub async fn nvram(&self, vm: &str) -> Option<PathBuf> {
        self.app.vms.lock(vm).await.unwrap().load().unwrap().nvram
    }

    /// The files the VM's domain uses, by disk serial (= volume uuid), root first.
    pub fn domain_files(&self, vm: &str) -> Vec<String> {
        let xml = self.hv.domain(vm).expect("a domain").xml;
        // Volumes carry their uuid as serial; the cloud-init seed has none.
        let disks = crate::domain::live_disks(&xml).unwrap().into_iter().filter(|d| d.serial.is_some());
        disks.filter_map(|d| d.file).collect()
    }
}

/// Stand-ins for OVMF's files: each holds its own name, so a VM's NVRAM shows which template
/// it was made from.
fn fake_ovmf(dir: &Path) -> crate::config::UefiConfig {
    std::fs::create_dir_all(dir).unwrap();
    let file = |name: &str| {
        let p = dir.join(name);
        std::fs::write(&p, name).unwrap();
        p
    };
    crate::config::UefiConfig {
        code: file("CODE.fd"),
        vars: file("VARS.fd"),
        secure_code: file("CODE.secboot.fd"),
        secure_vars: file("VARS.ms.fd"),
        nvram_dir: None,
    }
}

/// The fakes, as the external systems of an [`App`].
fn backends(
    hv: &Arc<FakeHypervisor>,
    rbd: &Arc<FakeRbd>,
    ceph: &Arc<FakeCluster>,
    faults: &Arc<Faults>,
    net: &Arc<FakeNet>,
) -> Backends {
    Backends {
        libvirt: hv.clone(),
        rbd: rbd.clone(),
        ceph: ceph.clone(),
        qemu_img: Arc::new(FakeQemuImg::new(faults.clone())),
        net: net.clone(),
        iso: Arc::new(crate::iso::fake::FakeIso { faults: faults.clone() }),
    }
}

fn start(dir: &Path, root: &Path, backends: Backends) -> (Arc<App>, Inherited) {
    let mut config = Config { state_dir: dir.join("state"), ..Config::default() };
    config.storage.roots = vec![root.to_path_buf()];
    config.backup.roots = vec![dir.join("backup")];
    config.libvirt.domain_type = "qemu".into();
    config.libvirt.swtpm_dir = dir.join("swtpm");
    config.uefi = fake_ovmf(&dir.join("ovmf"));
    App::with_backends(config, backends).unwrap()
}
