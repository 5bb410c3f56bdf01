//! Named read/write locks: one per VM or volume, so two commands on the same resource never run
//! at once while reads (e.g. getsize) may share. Entries disappear when nobody holds them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

#[derive(Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

/// Holds a lock; the map entry is dropped with the last holder.
pub struct Held<G> {
    _guard: G,
    key: String,
    locks: Arc<KeyedLocks>,
}

impl<G> Drop for Held<G> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Two references left (the map's and the guard's owned one) means nobody else waits.
        if map.get(&self.key).is_some_and(|l| Arc::strong_count(l) <= 2) {
            map.remove(&self.key);
        }
    }
}

impl KeyedLocks {
    fn entry(&self, key: &str) -> Arc<RwLock<()>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_owned()).or_default().clone()
    }

    pub async fn write(self: &Arc<Self>, key: &str) -> Held<OwnedRwLockWriteGuard<()>> {
        let guard = self.entry(key).write_owned().await;
        Held { _guard: guard, key: key.to_owned(), locks: self.clone() }
    }

    pub async fn read(self: &Arc<Self>, key: &str) -> Held<OwnedRwLockReadGuard<()>> {
        let guard = self.entry(key).read_owned().await;
        Held { _guard: guard, key: key.to_owned(), locks: self.clone() }
    }

    /// Write-locks several keys in a fixed (sorted) order, so that two multi-resource commands
    /// cannot deadlock.
    pub async fn write_all(self: &Arc<Self>, keys: &[String]) -> Vec<Held<OwnedRwLockWriteGuard<()>>> {
        let mut sorted: Vec<&String> = keys.iter().collect();
        sorted.sort();
        sorted.dedup();
        let mut held = Vec::with_capacity(sorted.len());
        for k in sorted {
            held.push(self.write(k).await);
        }
        held
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn writers_exclude_each_other_and_readers_share() {
        let locks = Arc::new(KeyedLocks::default());
        let w = locks.write("vol").await;
        let l2 = locks.clone();
        let waiting = tokio::spawn(async move { l2.read("vol").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a reader waits for the writer");
        drop(w);
        let r1 = waiting.await.unwrap();
        let r2 = tokio::time::timeout(Duration::from_secs(1), locks.read("vol")).await.expect("readers share");
        drop((r1, r2));
        assert_eq!(locks.len(), 0, "entries are dropped with the last holder");
    }

    #[tokio::test]
    async fn different_keys_do_not_block() {
        let locks = Arc::new(KeyedLocks::default());
        let _a = locks.write("a").await;
        tokio::time::timeout(Duration::from_secs(1), locks.write("b")).await.expect("independent keys");
    }
}
