//! What `/host/connect` tells the agent about its management node, persisted so that `/host/ping`
//! answers the same after a restart (the management node reconnects a host whose `version` or
//! `hostUuid` changed).

use std::path::PathBuf;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::atomic_file;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
pub struct Identity {
    pub host_uuid: Option<String>,
    pub send_command_url: Option<String>,
    pub version: Option<String>,
}

pub struct HostIdentity {
    file: PathBuf,
    current: RwLock<Identity>,
}

impl HostIdentity {
    pub fn load(state_dir: &std::path::Path) -> std::io::Result<HostIdentity> {
        let file = state_dir.join("host.json");
        let current = atomic_file::read_json(&file)?.unwrap_or_default();
        Ok(HostIdentity { file, current: RwLock::new(current) })
    }

    pub fn get(&self) -> Identity {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the identity, on disk first so memory never claims what a restart would lose.
    pub fn set(&self, identity: Identity) -> std::io::Result<()> {
        atomic_file::write_json(&self.file, &identity)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = identity;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity {
            host_uuid: Some("h".into()),
            send_command_url: Some("http://mn/x".into()),
            version: Some("5.1".into()),
        };
        HostIdentity::load(dir.path()).unwrap().set(id.clone()).unwrap();
        assert_eq!(HostIdentity::load(dir.path()).unwrap().get(), id);
    }
}
