//! Who may command this host, and where results may go. Commands are taken only from the
//! configured `server.management_hosts` or, when none are configured, from the management nodes
//! this host was connected from: the first successful `/host/connect` is trusted (trust on first
//! connect), and a further management node is learned when it proves it belongs to the same
//! deployment by naming this host's uuid in `/host/connect` or `/host/update/configuration` (a
//! ZStack deployment with several management nodes shares one database, so each knows it).
//! Results and progress may go to the host of each `sendCommandUrl` those commands named.
//! Persisted in `state_dir/trusted-source.json` and forgotten by
//! `kvmagent forget-management-node`. Before any connect, any address may command, as with
//! ZStack's agent.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::atomic_file;

/// How many management nodes (and callback hosts) are remembered; past it the oldest is
/// forgotten first.
const MAX_LEARNED: usize = 16;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Learned {
    /// The one node an earlier version remembered; read, merged into `management_nodes`.
    #[serde(skip_serializing)]
    management_node: Option<IpAddr>,
    management_nodes: Vec<IpAddr>,
    /// Hosts (as written in `sendCommandUrl`, lower case) results may be posted to.
    callback_hosts: Vec<String>,
}

fn remember<T: PartialEq>(list: &mut Vec<T>, item: T) -> bool {
    if list.contains(&item) {
        return false;
    }
    if list.len() == MAX_LEARNED {
        list.remove(0);
    }
    list.push(item);
    true
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

/// The host part of a URL, lower case.
pub fn url_host(url: &str) -> Option<String> {
    url.parse::<http::Uri>().ok()?.host().map(str::to_ascii_lowercase)
}

impl TrustedSources {
    pub fn load(state_dir: &Path) -> std::io::Result<TrustedSources> {
        let file = file(state_dir);
        let mut learned: Learned = atomic_file::read_json(&file)?.unwrap_or_default();
        if let Some(old) = learned.management_node.take() {
            remember(&mut learned.management_nodes, old);
        }
        Ok(TrustedSources { file, learned: RwLock::new(learned) })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Learned> {
        self.learned.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The management nodes learned from connects, oldest first.
    pub fn learned(&self) -> Vec<IpAddr> {
        self.read().management_nodes.clone()
    }

    /// The hosts results and progress may be posted to, learned from connects.
    pub fn callback_hosts(&self) -> Vec<String> {
        self.read().callback_hosts.clone()
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
        let nodes = self.learned();
        if nodes.is_empty() || nodes.contains(&peer) {
            return Ok(());
        }
        Err(format!(
            "{peer} is not a management node this host was connected from ({nodes:?}); another management node of \
             the same deployment is taken when its /host/connect names this host's uuid; an operator can reset \
             the list with `kvmagent forget-management-node`"
        ))
    }

    /// After a successful `/host/connect` (or a `/host/update/configuration` naming this host)
    /// from `peer`: commands are taken from it from now on.
    pub fn learn(&self, peer: IpAddr) -> std::io::Result<()> {
        let peer = canonical(peer);
        if self.update(|l| remember(&mut l.management_nodes, peer))? {
            tracing::info!(node = %peer, "commands are now taken from this management node too");
        }
        Ok(())
    }

    /// After `/host/connect` or `/host/update/configuration` named `send_command_url`: results
    /// and progress may go to its host from now on.
    pub fn learn_callback_host(&self, send_command_url: &str) -> std::io::Result<()> {
        let Some(host) = url_host(send_command_url) else { return Ok(()) };
        self.update(|l| remember(&mut l.callback_hosts, host)).map(|_| ())
    }

    /// Applies `change`, persisting first when it changed anything; returns whether it did.
    fn update(&self, change: impl FnOnce(&mut Learned) -> bool) -> std::io::Result<bool> {
        let mut learned = self.learned.write().unwrap_or_else(|p| p.into_inner());
        let mut next = learned.clone();
        if !change(&mut next) {
            return Ok(false);
        }
        atomic_file::write_json(&self.file, &next)?;
        *learned = next;
        Ok(true)
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
        s.learn_callback_host("http://mn1:8080/zstack/asyncrest/sendcommand").unwrap();
        assert!(s.check(mn, &[]).await.is_ok());
        assert!(s.check(other, &[]).await.unwrap_err().contains("forget-management-node"));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(s.check(mapped, &[]).await.is_ok(), "an IPv4 client of an IPv6 socket is the same node");
        let reloaded = TrustedSources::load(dir.path()).unwrap();
        assert!(reloaded.check(other, &[]).await.is_err(), "remembered across restarts");
        assert_eq!(reloaded.callback_hosts(), ["mn1"]);
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

    #[tokio::test]
    async fn every_management_node_learned_is_kept_and_the_list_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = TrustedSources::load(dir.path()).unwrap();
        let (mn1, mn2): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        s.learn(mn1).unwrap();
        s.learn(mn2).unwrap();
        s.learn_callback_host("http://10.0.0.1:8080/zstack/asyncrest/sendcommand").unwrap();
        s.learn_callback_host("http://MN2.example:8080/zstack/asyncrest/sendcommand").unwrap();
        assert!(
            s.check(mn1, &[]).await.is_ok() && s.check(mn2, &[]).await.is_ok(),
            "a second node does not evict the first"
        );
        assert_eq!(s.callback_hosts(), ["10.0.0.1", "mn2.example"]);
        for i in 0..40u8 {
            s.learn(IpAddr::from([10, 1, 0, i])).unwrap();
        }
        let nodes = TrustedSources::load(dir.path()).unwrap().learned();
        assert_eq!(nodes.len(), MAX_LEARNED);
        assert_eq!(nodes.last(), Some(&IpAddr::from([10, 1, 0, 39])), "the newest is kept, the oldest go");
    }

    #[tokio::test]
    async fn the_single_node_an_earlier_version_remembered_is_still_trusted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(file(dir.path()), r#"{"managementNode":"10.0.0.9"}"#).unwrap();
        let s = TrustedSources::load(dir.path()).unwrap();
        assert!(s.check("10.0.0.9".parse().unwrap(), &[]).await.is_ok());
        assert!(s.check("10.0.0.8".parse().unwrap(), &[]).await.is_err());
    }
}
