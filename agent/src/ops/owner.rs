//! One owner per VM. Every operation on a VM — native or compat — first takes the VM's lock
//! through [`Vms::lock`] and only then reads the VM's record, through the [`VmGuard`] it got;
//! writing the record back needs the same guard. So no operation works from a record another
//! one changed while it waited (a snapshot group moving the VM to a new top while a clone
//! queued, say), and no stale record is ever saved over a newer one.
//!
//! The records themselves are the last spec of every VM this agent started or created, kept in
//! `state_dir/vms/<uuid>.json` (written atomically, with the model's format version), so that
//! operations naming only a `vmUuid` (clone, change image) know the VM's volumes, NICs and
//! devices even while it is stopped. Records of an older format are migrated at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::OwnedRwLockWriteGuard;

use serde_json::Value;

use crate::atomic_file;
use crate::error::{AgentError, AgentResult};
use crate::locks::{Held, KeyedLocks};
use crate::model::{VmRecord, VmSpec, FORMAT_VERSION};
use crate::wire::vm::StartVmCmd;

/// The registry of VMs: their locks and their records.
pub struct Vms {
    locks: Arc<KeyedLocks>,
    dir: PathBuf,
}

/// The lock of one VM, held: the only way to read or write its record.
pub struct VmGuard {
    uuid: String,
    dir: PathBuf,
    _held: Held<OwnedRwLockWriteGuard<()>>,
}

impl Vms {
    pub fn new(state_dir: &Path) -> Vms {
        Vms { locks: Default::default(), dir: state_dir.join("vms") }
    }

    /// Waits for VM `vm` to be free and takes it. `vm` must be a uuid (it names a file).
    pub async fn lock(&self, vm: &str) -> AgentResult<VmGuard> {
        crate::domain::check_uuid(vm)?;
        let held = self.locks.write(vm).await;
        Ok(VmGuard { uuid: vm.to_owned(), dir: self.dir.clone(), _held: held })
    }

    /// Takes several VMs, in one (sorted) order so that two callers cannot deadlock.
    pub async fn lock_all(&self, vms: impl IntoIterator<Item = String>) -> AgentResult<Vec<VmGuard>> {
        let mut vms: Vec<String> = vms.into_iter().collect();
        vms.sort();
        vms.dedup();
        let mut guards = Vec::with_capacity(vms.len());
        for vm in vms {
            guards.push(self.lock(&vm).await?);
        }
        Ok(guards)
    }

    /// Rewrites records of an older format in the current one (at start, before serving).
    /// Returns the VMs migrated; a record that cannot be read is logged and left as it is.
    pub fn migrate(&self) -> Vec<String> {
        let mut migrated = Vec::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = e.path();
            // Only `<uuid>.json` is a record (a kill may leave an atomic write's temporary).
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.strip_suffix(".json").is_some_and(|vm| crate::domain::check_uuid(vm).is_ok()) {
                continue;
            }
            let Ok(Some(v)) = atomic_file::read_json::<Value>(&path) else { continue };
            if v.get("formatVersion").is_some() {
                continue;
            }
            let upgraded = crate::wire::decode::<StartVmCmd>(&v)
                .and_then(|cmd| cmd.to_spec())
                .and_then(|vm| write_record(&path, vm.clone()).map(|_| vm.uuid));
            match upgraded {
                Ok(vm) => migrated.push(vm),
                Err(e) => tracing::error!(file = %path.display(), error = %e, "cannot migrate a VM record"),
            }
        }
        if !migrated.is_empty() {
            tracing::info!(vms = ?migrated, version = FORMAT_VERSION, "VM records migrated");
        }
        migrated
    }

    /// Whether VM `vm` has a record here. A hint only (it may change the next moment): a
    /// decision that must hold is made under the VM's lock.
    pub fn is_known(&self, vm: &str) -> bool {
        crate::domain::check_uuid(vm).is_ok() && record_file(&self.dir, vm).exists()
    }
}

fn record_file(dir: &Path, vm: &str) -> PathBuf {
    dir.join(format!("{vm}.json"))
}

fn write_record(file: &Path, vm: VmSpec) -> AgentResult<()> {
    atomic_file::write_json(file, &VmRecord { format_version: FORMAT_VERSION, vm })
        .map_err(|e| AgentError::failed("cannot record the VM", format!("{}: {e}", file.display())))
}

impl VmGuard {
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    fn file(&self) -> PathBuf {
        record_file(&self.dir, &self.uuid)
    }

    /// The VM's record, or None when this host has none.
    pub fn record(&self) -> AgentResult<Option<VmSpec>> {
        match atomic_file::read_json::<VmRecord>(&self.file()) {
            Ok(r) => Ok(r.map(|r| r.vm)),
            Err(e) => Err(AgentError::failed("cannot read the VM record", format!("{}: {e}", self.uuid))),
        }
    }

    /// The VM's record; a NotFound error when this host has none.
    pub fn load(&self) -> AgentResult<VmSpec> {
        self.record()?.ok_or_else(|| {
            AgentError::not_found(format!("VM {} is not known to this host; start or create it here first", self.uuid))
        })
    }

    /// Records `spec`, which must be this VM's.
    pub fn save(&self, spec: &VmSpec) -> AgentResult<()> {
        if spec.uuid != self.uuid {
            return Err(AgentError::internal(format!(
                "the record of VM {} cannot be saved under the lock of VM {}",
                spec.uuid, self.uuid
            )));
        }
        write_record(&self.file(), spec.clone())?;
        #[cfg(test)]
        super::undo::kill_point::reached();
        Ok(())
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(self.file());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn wire(vm: &str) -> serde_json::Value {
        serde_json::json!({
            "vmInstanceUuid": vm, "vmName": "t", "memory": 1 << 30, "cpuNum": 1,
            "rootVolume": {"installPath": "/r/a.qcow2", "volumeUuid": "a", "deviceId": 0}
        })
    }

    fn spec(vm: &str) -> VmSpec {
        crate::wire::decode::<StartVmCmd>(&wire(vm)).unwrap().to_spec().unwrap()
    }

    #[tokio::test]
    async fn the_record_is_read_only_after_the_lock_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let vms = Arc::new(Vms::new(dir.path()));
        let vm = "0123456789abcdef0123456789abcdef";
        let first = vms.lock(vm).await.unwrap();
        first.save(&spec(vm)).unwrap();
        let (v2, name) = (vms.clone(), vm.to_owned());
        // A second operation queues; it must see what the first one saved last.
        let waiting = tokio::spawn(async move {
            let g = v2.lock(&name).await.unwrap();
            g.load().unwrap().root().install_path()
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the second operation waits for the lock");
        let mut moved = first.load().unwrap();
        moved.root_mut().location = crate::storage::location::Location::File("/r/top.qcow2".into());
        first.save(&moved).unwrap();
        drop(first);
        assert_eq!(waiting.await.unwrap(), "/r/top.qcow2");
    }

    #[tokio::test]
    async fn a_guard_saves_only_its_own_vm() {
        let dir = tempfile::tempdir().unwrap();
        let vms = Vms::new(dir.path());
        let g = vms.lock("0123456789abcdef0123456789abcdef").await.unwrap();
        assert!(g.save(&spec("fedcba9876543210fedcba9876543210")).is_err());
        assert!(g.record().unwrap().is_none());
        assert!(vms.lock("../etc").await.is_err(), "a VM is named by its uuid only");
    }

    #[tokio::test]
    async fn lock_all_takes_each_vm_once() {
        let dir = tempfile::tempdir().unwrap();
        let vms = Vms::new(dir.path());
        let a = "0123456789abcdef0123456789abcdef".to_owned();
        let b = "fedcba9876543210fedcba9876543210".to_owned();
        let held = tokio::time::timeout(Duration::from_secs(1), vms.lock_all([b.clone(), a.clone(), b]))
            .await
            .expect("no self-deadlock")
            .unwrap();
        assert_eq!(
            held.iter().map(VmGuard::uuid).collect::<Vec<_>>(),
            [a.as_str(), "fedcba9876543210fedcba9876543210"]
        );
    }

    #[tokio::test]
    async fn records_of_the_first_format_are_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let vms = Vms::new(dir.path());
        let vm = "0123456789abcdef0123456789abcdef";
        std::fs::create_dir_all(dir.path().join("vms")).unwrap();
        atomic_file::write_json(&dir.path().join(format!("vms/{vm}.json")), &wire(vm)).unwrap();
        assert_eq!(vms.migrate(), [vm]);
        assert_eq!(vms.lock(vm).await.unwrap().load().unwrap(), spec(vm));
        assert!(vms.migrate().is_empty(), "a migrated record is left alone");
    }
}
