//! Everything a handler can reach: configuration, the task registry, the host identity, and the
//! back ends (libvirt, storage).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;

use crate::callbacks::client::Poster;
use crate::ceph::cluster::{CephCli, Cluster};
use crate::ceph::librbd::RbdLib;
use crate::ceph::rbd::{Connection, Rbd, RbdCli};
use crate::config::{CephClient, Config};
use crate::host_identity::HostIdentity;
use crate::hypervisor::Hypervisor;
use crate::iso::{IsoWriter, Xorriso};
use crate::libvirt::Libvirt;
use crate::network::rtnl::RtNetlink;
use crate::network::Netlink;
use crate::ops::owner::Vms;
use crate::qemu_img::cli::QemuImgCli;
use crate::qemu_img::QemuImg;
use crate::recovery::{Inherited, Report};
use crate::storage::local::LocalStorage;
use crate::storage::roots::StorageRoots;
use crate::storage::volume_locks::VolumeLocks;
use crate::tasks::journal::Journal;
use crate::tasks::registry::{Limits, TaskRegistry};
use crate::trusted_sources::TrustedSources;

/// The external systems the agent drives, each behind its trait.
pub struct Backends {
    pub libvirt: Arc<dyn Hypervisor>,
    pub rbd: Arc<dyn Rbd>,
    pub ceph: Arc<dyn Cluster>,
    pub qemu_img: Arc<dyn QemuImg>,
    pub net: Arc<dyn Netlink>,
    pub iso: Arc<dyn IsoWriter>,
}

pub struct App {
    pub config: Config,
    pub tasks: Arc<TaskRegistry>,
    pub identity: Arc<HostIdentity>,
    /// Who may command this host (configured management hosts, or the first connect's).
    pub sources: TrustedSources,
    pub poster: Poster,
    /// The hypervisor port (libvirt; a fake in unit tests).
    pub libvirt: Arc<dyn Hypervisor>,
    pub storage: LocalStorage,
    /// RBD (the `rbd` command line; a fake in unit tests).
    pub rbd: Arc<dyn Rbd>,
    /// The Ceph cluster itself: capacity, pools, monitors (`ceph`/`rados`; a fake in unit tests).
    pub ceph: Arc<dyn Cluster>,
    /// qcow2 work (the `qemu-img` command; a fake in unit tests).
    pub qemu_img: Arc<dyn QemuImg>,
    /// Links, addresses and routes of the host (rtnetlink; a fake in unit tests).
    pub net: Arc<dyn Netlink>,
    /// ISO images: cloud-init seeds (`xorriso`; a fake in unit tests).
    pub iso: Arc<dyn IsoWriter>,
    /// One bridge command at a time (each reads the links, then changes them).
    pub bridges: tokio::sync::Mutex<()>,
    /// Every VM's lock and record: one owner per VM at a time.
    pub vms: Vms,
    /// Where backup groups may be written and read.
    pub backup_roots: StorageRoots,
    /// Per volume (resolved file or RBD image): writers exclusive, readers shared.
    pub volume_locks: VolumeLocks,
    /// What the last `/vm/volumesync` found unused, by storage path (ZStack reports a volume
    /// only once it was unused at two syncs in a row).
    pub inactive_volumes: std::sync::Mutex<std::collections::BTreeMap<String, std::collections::BTreeSet<String>>>,
    shutting_down: AtomicBool,
    /// What the start-up recovery found.
    pub recovery: OnceLock<Report>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot prepare state directory {dir}: {source}")]
    StateDir { dir: String, source: std::io::Error },
    #[error("storage roots {roots:?} are not usable: {source}; create them or fix storage.roots")]
    Roots { roots: Vec<std::path::PathBuf>, source: std::io::Error },
    #[error("backup roots {roots:?} cannot be created or resolved: {source}; fix backup.roots")]
    BackupRoots { roots: Vec<std::path::PathBuf>, source: std::io::Error },
}

impl App {
    /// Builds the application state. Returns the tasks a previous run left unfinished or
    /// undelivered, for [`crate::recovery`].
    pub fn new(config: Config) -> Result<(Arc<App>, Inherited), StartupError> {
        let c = &config.ceph;
        let connection = Connection::configured(c);
        let backends = Backends {
            libvirt: Arc::new(Libvirt::new(&config.libvirt.uri)),
            rbd: match c.client {
                CephClient::Librbd => Arc::new(RbdLib::recording_clients(connection.clone(), config.state_dir.clone())),
                CephClient::Cli => Arc::new(RbdCli(connection.clone())),
            },
            ceph: Arc::new(CephCli(connection)),
            qemu_img: Arc::new(QemuImgCli),
            net: Arc::new(RtNetlink),
            iso: Arc::new(Xorriso),
        };
        App::with_backends(config, backends)
    }

    /// Like [`new`](Self::new), on the given external systems (fakes in unit tests).
    pub fn with_backends(config: Config, backends: Backends) -> Result<(Arc<App>, Inherited), StartupError> {
        let Backends { libvirt, rbd, ceph, qemu_img, net, iso } = backends;
        let state_err = |source| StartupError::StateDir { dir: config.state_dir.display().to_string(), source };
        std::fs::create_dir_all(&config.state_dir).map_err(state_err)?;
        let identity = Arc::new(HostIdentity::load(&config.state_dir).map_err(state_err)?);
        let sources = TrustedSources::load(&config.state_dir).map_err(state_err)?;
        let poster = Poster::default();
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        let limits = Limits {
            max_running: config.tasks.max_running,
            max_finished: config.tasks.max_finished,
            max_finished_bytes: config.tasks.max_finished_bytes,
        };
        let (tasks, undelivered, interrupted) =
            TaskRegistry::open(Journal::open(&config.state_dir).map_err(state_err)?, Some(progress_tx), limits)
                .map_err(state_err)?;
        crate::callbacks::progress::spawn_forwarder(progress_rx, identity.clone(), poster.clone());
        let roots = StorageRoots::new(&config.storage.roots)
            .map_err(|source| StartupError::Roots { roots: config.storage.roots.clone(), source })?;
        let backup_err = |source| StartupError::BackupRoots { roots: config.backup.roots.clone(), source };
        for r in &config.backup.roots {
            std::fs::create_dir_all(r).map_err(backup_err)?;
        }
        let backup_roots = StorageRoots::new(&config.backup.roots).map_err(backup_err)?;
        // Read before anything connects: this run's own connections are recorded beside them.
        let ceph_clients = crate::ceph::clients::recorded(&config.state_dir);
        let vms = Vms::new(&config.state_dir);
        vms.migrate();
        let volume_locks = VolumeLocks::new(roots.clone());
        let app = App {
            config,
            tasks,
            identity,
            sources,
            poster,
            libvirt,
            storage: LocalStorage::new(roots, qemu_img.clone()),
            backup_roots,
            rbd,
            ceph,
            qemu_img,
            net,
            iso,
            bridges: tokio::sync::Mutex::new(()),
            vms,
            volume_locks,
            inactive_volumes: Default::default(),
            shutting_down: AtomicBool::new(false),
            recovery: OnceLock::new(),
        };
        Ok((Arc::new(app), Inherited { undelivered, interrupted, ceph_clients }))
    }

    /// Whether results and progress may be posted to `url`: its host must be one of
    /// `server.management_hosts` or the management node learned at `/host/connect`. When
    /// neither names one (a fresh agent, no config), any host is, as with ZStack's agent.
    pub fn callback_allowed(&self, url: &str) -> Result<(), String> {
        let host_of = crate::trusted_sources::url_host;
        let current = self.identity.get().send_command_url.as_deref().and_then(host_of);
        let allowed: Vec<String> = (self.config.server.management_hosts.iter().map(|h| h.to_ascii_lowercase()))
            .chain(self.sources.callback_hosts())
            .chain(current)
            .collect();
        if allowed.is_empty() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("no management node is known yet (server.management_hosts, /host/connect): callbacks may go to any host")
            });
            return Ok(());
        }
        let host = host_of(url).ok_or_else(|| format!("{url} names no host"))?;
        if allowed.contains(&host) {
            Ok(())
        } else {
            Err(format!(
                "{host} is not a management node of this agent; results go only to server.management_hosts {:?} or the nodes /host/connect named",
                self.config.server.management_hosts
            ))
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }
}
