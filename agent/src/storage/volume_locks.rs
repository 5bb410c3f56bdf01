//! Locks on volumes, keyed by what a volume is rather than how it was spelled: the resolved file
//! inside its storage root, or the RBD image (`pool/image`). Writers exclude each other and
//! readers; readers (sizes, chains) share.

use std::sync::Arc;

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard};

use super::location::Location;
use super::roots::StorageRoots;
use crate::error::AgentResult;
use crate::locks::{Held, KeyedLocks};

pub type WriteLock = Held<OwnedRwLockWriteGuard<()>>;
pub type ReadLock = Held<OwnedRwLockReadGuard<()>>;

pub struct VolumeLocks {
    locks: Arc<KeyedLocks>,
    roots: StorageRoots,
}

impl VolumeLocks {
    pub fn new(roots: StorageRoots) -> VolumeLocks {
        VolumeLocks { locks: Default::default(), roots }
    }

    fn key(&self, path: &str) -> AgentResult<String> {
        Ok(Location::confined(path, &self.roots)?.lock_key())
    }

    /// The volume at `path` (a file path or `ceph://`), for writing. A path that cannot be
    /// resolved inside the roots is refused: nothing may be done with it anyway.
    pub async fn write(&self, path: &str) -> AgentResult<WriteLock> {
        Ok(self.locks.write(&self.key(path)?).await)
    }

    pub async fn read(&self, path: &str) -> AgentResult<ReadLock> {
        Ok(self.locks.read(&self.key(path)?).await)
    }

    /// An RBD image (named by ZStack's Ceph paths, with or without the scheme).
    pub async fn write_rbd(&self, p: &crate::ceph::path::CephPath) -> WriteLock {
        self.locks.write(&Location::Rbd(p.clone()).lock_key()).await
    }

    pub async fn read_rbd(&self, p: &crate::ceph::path::CephPath) -> ReadLock {
        self.locks.read(&Location::Rbd(p.clone()).lock_key()).await
    }

    /// Several volumes for writing, in one order (no deadlock between two such callers).
    pub async fn write_all(&self, paths: &[String]) -> AgentResult<Vec<WriteLock>> {
        let keys = paths.iter().map(|p| self.key(p)).collect::<AgentResult<Vec<_>>>()?;
        Ok(self.locks.write_all(&keys).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn two_spellings_of_one_volume_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("d"), dir.path().join("link")).unwrap();
        let locks = Arc::new(VolumeLocks::new(StorageRoots::new(&[dir.path().to_path_buf()]).unwrap()));
        let r = dir.path().display().to_string();
        let held = locks.write(&format!("{r}/d/v.qcow2")).await.unwrap();
        for other in [format!("{r}//d/v.qcow2"), format!("{r}/./d/v.qcow2"), format!("{r}/link/v.qcow2")] {
            let l = locks.clone();
            let waiting = tokio::spawn(async move { l.write(&other).await.map(drop) });
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert!(!waiting.is_finished(), "a second spelling waits for the first");
            waiting.abort();
        }
        let other = tokio::time::timeout(Duration::from_secs(1), locks.write(&format!("{r}/d/w.qcow2"))).await;
        assert!(other.is_ok(), "another volume is independent");
        drop(held);
        assert!(locks.write("/etc/passwd").await.is_err(), "a path outside the roots is refused");
    }
}
