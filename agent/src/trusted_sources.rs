//! Who may command this host. Commands are taken only from the configured
//! `server.management_hosts` or, when none are configured, from the address that made the first
//! successful `/host/connect` (trust on first connect; persisted in `state_dir/trusted-source.json`
//! and forgotten by `kvmagent forget-management-node`). Before any connect, any address may
//! command, as with ZStack's agent.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::atomic_file;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Learned {
    management_node: Option<IpAddr>,
}

pub struct TrustedSources {
    file: PathBuf,
    learned: RwLock<Learned>,
}

fn file(state_dir: &Path) -> PathBuf {
    state_dir.join("trusted-source.json")
}

/// One form for an address: an IPv4 client of an IPv6 socket is its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

impl TrustedSources {
    pub fn load(state_dir: &Path) -> std::io::Result<TrustedSources> {
        let file = file(state_dir);
        let learned = atomic_file::read_json(&file)?.unwrap_or_default();
        Ok(TrustedSources { file, learned: RwLock::new(learned) })
    }

    /// The management node learned at the first connect, if any.
    pub fn learned(&self) -> Option<IpAddr> {
        self.learned.read().unwrap_or_else(|p| p.into_inner()).management_node
    }

    /// Whether `peer` may command this host, given the configured management hosts (names are
    /// resolved). The error says who may.
    pub async fn check(&self, peer: IpAddr, configured: &[String]) -> Result<(), String> {
        let peer = canonical(peer);
        if !configured.is_empty() {
            for host in configured {
                if resolve(host).await.contains(&peer) {
                    return Ok(());
                }
            }
            return Err(format!("{peer} is not one of server.management_hosts {configured:?}"));
        }
        match self.learned() {
            Some(node) if node != peer => Err(format!(
                "{peer} is not the management node this host was connected from ({node}); an operator can reset that with `kvmagent forget-management-node`"
            )),
            _ => Ok(()),
        }
    }

    /// After a successful `/host/connect` from `peer`: the first one is remembered.
    pub fn learn(&self, peer: IpAddr) -> std::io::Result<()> {
        let mut learned = self.learned.write().unwrap_or_else(|p| p.into_inner());
        if learned.management_node.is_some() {
            return Ok(());
        }
        let next = Learned { management_node: Some(canonical(peer)) };
        atomic_file::write_json(&self.file, &next)?;
        *learned = next;
        tracing::info!(node = %canonical(peer), "commands are now taken only from this management node");
        Ok(())
    }

    /// The operator's reset: the next `/host/connect` is trusted again. Returns whether a
    /// management node was remembered.
    pub fn forget(state_dir: &Path) -> std::io::Result<bool> {
        match std::fs::remove_file(file(state_dir)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

async fn resolve(host: &str) -> Vec<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return vec![canonical(ip)];
    }
    match tokio::net::lookup_host((host, 0)).await {
        Ok(addrs) => addrs.map(|a| canonical(a.ip())).collect(),
        Err(e) => {
            tracing::warn!(host, error = %e, "cannot resolve a configured management host");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_connect_is_trusted_and_remembered_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (mn, other): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let s = TrustedSources::load(dir.path()).unwrap();
        assert!(s.check(other, &[]).await.is_ok(), "a fresh host takes commands from anyone");
        s.learn(mn).unwrap();
        s.learn(other).unwrap();
        assert!(s.check(mn, &[]).await.is_ok());
        assert!(s.check(other, &[]).await.unwrap_err().contains("forget-management-node"));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(s.check(mapped, &[]).await.is_ok(), "an IPv4 client of an IPv6 socket is the same node");
        let reloaded = TrustedSources::load(dir.path()).unwrap();
        assert!(reloaded.check(other, &[]).await.is_err(), "remembered across restarts");
        assert!(TrustedSources::forget(dir.path()).unwrap());
        assert!(TrustedSources::load(dir.path()).unwrap().check(other, &[]).await.is_ok());
    }

    #[tokio::test]
    async fn configured_hosts_win_over_what_was_learned() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustedSources::load(dir.path()).unwrap();
        s.learn("127.0.0.1".parse().unwrap()).unwrap();
        let configured = ["127.0.0.2".to_owned(), "localhost".to_owned()];
        assert!(s.check("127.0.0.2".parse().unwrap(), &configured).await.is_ok());
        assert!(s.check("127.0.0.1".parse().unwrap(), &configured).await.is_ok(), "localhost resolves");
        assert!(s.check("127.0.0.3".parse().unwrap(), &configured).await.is_err());
    }
}
