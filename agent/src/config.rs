//! Agent configuration: a TOML file in which every key has a default, so the agent also runs with
//! no file at all. Unknown keys are refused so that a typo is not silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub libvirt: LibvirtConfig,
    pub tasks: TaskConfig,
    pub clone: CloneConfig,
    pub ceph: CephConfig,
    pub backup: BackupConfig,
    pub uefi: UefiConfig,
    /// Where the agent keeps its task journal, host identity and VM records.
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the management plane connects to. ZStack's agent listens on all interfaces, port
    /// 7070; bind to the management address on hosts with several networks.
    pub listen: SocketAddr,
    /// On SIGTERM, how long running tasks get to finish before the agent exits anyway.
    pub shutdown_grace_secs: u64,
    /// A shared secret every request must carry (`Authorization: Bearer <token>` or
    /// `X-Kvmagent-Token: <token>`). None by default: ZStack's management node sends none.
    pub token: Option<String>,
    /// The token, read from this file (trimmed) at start; instead of `token`.
    pub token_file: Option<PathBuf>,
    /// TLS on the control port; plain HTTP without it.
    pub tls: Option<TlsConfig>,
    /// Hosts (names or addresses) commands are taken from, and results and progress may be
    /// posted to. Without them, commands are taken from the address of the first successful
    /// `/host/connect` (until `kvmagent forget-management-node`) and results go to the node it
    /// named; on a fresh agent, any host (ZStack's way).
    pub management_hosts: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of the agent.
    pub cert: PathBuf,
    /// PEM private key of the agent.
    pub key: PathBuf,
    /// PEM CA certificates; when given, a client must present a certificate signed by one.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Every path a command names, and every backing file of a qcow2 chain, must resolve inside
    /// one of these directories.
    pub roots: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LibvirtConfig {
    pub uri: String,
    /// `kvm` on real hosts; `qemu` (TCG) where hardware virtualisation is unavailable.
    pub domain_type: String,
    /// QEMU binary named in the domain's `<emulator>`; empty lets libvirt choose.
    pub emulator: String,
    /// Where libvirt keeps swtpm state (`<dir>/<vm uuid>/`); clones get a copy there.
    pub swtpm_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloneConfig {
    /// How many clones of one `/vm/clone` are built at the same time.
    pub parallelism: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupConfig {
    /// Backup groups are written and read only under these directories (local paths or mounted
    /// shares); the first is the default. They are created at start when missing.
    pub roots: Vec<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig { roots: vec![PathBuf::from("/var/lib/kvmagent/backup")] }
    }
}

/// OVMF, the UEFI firmware VMs with `firmware` `uefi` / `uefi-secure` boot (Debian's `ovmf`
/// package by default). Each VM gets its own copy of a variable-store template as its NVRAM.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UefiConfig {
    /// Firmware code of `uefi` VMs.
    pub code: PathBuf,
    /// Variable-store template of `uefi` VMs (no keys enrolled).
    pub vars: PathBuf,
    /// Firmware code of `uefi-secure` VMs: built with Secure Boot and SMM.
    pub secure_code: PathBuf,
    /// Variable-store template of `uefi-secure` VMs: Microsoft's keys enrolled, Secure Boot on.
    pub secure_vars: PathBuf,
    /// Where VMs whose root volume is an RBD image keep their NVRAM; by default `nvram/` in the
    /// first storage root. Must lie inside a storage root.
    pub nvram_dir: Option<PathBuf>,
}

impl UefiConfig {
    /// The firmware code and variable-store template of `firmware`; none for BIOS.
    pub fn files(&self, firmware: crate::model::Firmware) -> Option<(&Path, &Path)> {
        use crate::model::Firmware;
        match firmware {
            Firmware::Bios => None,
            Firmware::Uefi => Some((&self.code, &self.vars)),
            Firmware::UefiSecure => Some((&self.secure_code, &self.secure_vars)),
        }
    }
}

impl Default for UefiConfig {
    fn default() -> Self {
        let ovmf = Path::new("/usr/share/OVMF");
        UefiConfig {
            code: ovmf.join("OVMF_CODE_4M.fd"),
            vars: ovmf.join("OVMF_VARS_4M.fd"),
            secure_code: ovmf.join("OVMF_CODE_4M.secboot.fd"),
            secure_vars: ovmf.join("OVMF_VARS_4M.ms.fd"),
            nvram_dir: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CephConfig {
    /// The cluster's ceph.conf (monitor addresses).
    pub conf: PathBuf,
    /// The cephx user the agent acts as (`client.<id>`).
    pub id: String,
    /// Its keyring; by default the one ceph.conf names.
    pub keyring: Option<PathBuf>,
    /// Where the `/ceph/primarystorage/*` paths are also served, as ZStack's Ceph agent serves
    /// them to the management node (port 7762 of the monitor hosts). On port 7762 of all
    /// addresses once a `[ceph]` table is written; `"off"` (or no `[ceph]` table) turns it off.
    #[serde(default = "default_ceph_agent_listen", deserialize_with = "address_or_off")]
    pub agent_listen: Option<SocketAddr>,
    /// How RBD images are reached: `"librbd"` (in the agent's process over one shared cluster
    /// connection) or `"cli"` (the `rbd` command line, a process per call).
    pub client: CephClient,
    /// How long one quick RBD call (create, clone, snapshot, remove, info) may take before it
    /// fails; a full cluster or pool makes writes wait rather than fail. Copies and flattens
    /// are bounded by their task instead.
    pub call_timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CephClient {
    #[default]
    Librbd,
    Cli,
}

fn default_ceph_agent_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([0, 0, 0, 0], 7762)))
}

fn address_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| serde::de::Error::custom(format!("agent_listen {s:?}: {e}; give ip:port or \"off\"")))
}

impl Default for CephConfig {
    /// No `[ceph]` table: the Ceph agent port stays closed.
    fn default() -> Self {
        CephConfig {
            conf: PathBuf::from("/etc/ceph/ceph.conf"),
            id: "admin".into(),
            keyring: None,
            agent_listen: None,
            client: CephClient::default(),
            call_timeout_secs: crate::ceph::rbd::CALL_TIMEOUT.as_secs(),
        }
    }
}

impl Default for CloneConfig {
    fn default() -> Self {
        CloneConfig { parallelism: 4 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    /// How long a callback POST is retried (with backoff) before the result is kept only for
    /// `GET /task/<id>` and a later duplicate request.
    pub callback_retry_secs: u64,
    /// Finished tasks older than this are dropped from the journal.
    pub retention_secs: u64,
    /// Commands running (or queued on a lock) at once; one more is refused as busy.
    pub max_running: usize,
    /// Finished tasks kept (memory and journal); past it the oldest are dropped first.
    pub max_finished: usize,
    /// Bytes the finished tasks' records may hold together (results as JSON); past it the
    /// oldest are dropped first.
    pub max_finished_bytes: usize,
    /// Whole-image copies (`qemu-img convert`, safe rebase, `rbd deep cp`, `rbd flatten`) run
    /// at nice +10 and the lowest best-effort I/O priority, so that they do not slow the agent's
    /// answers and the VMs down.
    pub low_priority_copies: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            storage: StorageConfig::default(),
            libvirt: LibvirtConfig::default(),
            tasks: TaskConfig::default(),
            clone: CloneConfig::default(),
            ceph: CephConfig::default(),
            backup: BackupConfig::default(),
            uefi: UefiConfig::default(),
            state_dir: PathBuf::from("/var/lib/kvmagent/state"),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:7070".parse().expect("literal address"),
            shutdown_grace_secs: 30,
            token: None,
            token_file: None,
            tls: None,
            management_hosts: Vec::new(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { roots: vec![PathBuf::from("/var/lib/kvmagent/local")] }
    }
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: "qemu:///system".into(),
            domain_type: "kvm".into(),
            emulator: String::new(),
            swtpm_dir: PathBuf::from("/var/lib/libvirt/swtpm"),
        }
    }
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            callback_retry_secs: 120,
            retention_secs: 24 * 3600,
            max_running: 1024,
            max_finished: 10_000,
            max_finished_bytes: 16 << 20,
            low_priority_copies: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("config file {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

impl Config {
    /// Loads `path`, or the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let invalid = |problem| ConfigError::Invalid { path: path.to_owned(), problem };
        config.validate().map_err(invalid)?;
        if let Some(file) = &config.server.token_file {
            let token = std::fs::read_to_string(file)
                .map_err(|e| invalid(format!("server.token_file {}: {e}", file.display())))?;
            config.server.token = Some(token.trim().to_owned()).filter(|t| !t.is_empty());
            if config.server.token.is_none() {
                return Err(invalid(format!("server.token_file {} is empty", file.display())));
            }
        }
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.storage.roots.is_empty() {
            return Err("storage.roots must name at least one directory".into());
        }
        if let Some(r) = self.storage.roots.iter().find(|r| !r.is_absolute()) {
            return Err(format!("storage root {} must be an absolute path", r.display()));
        }
        crate::libvirt::endpoint::Endpoint::parse(&self.libvirt.uri)?;
        if !matches!(self.libvirt.domain_type.as_str(), "kvm" | "qemu") {
            return Err(format!("libvirt.domain_type must be \"kvm\" or \"qemu\", not {:?}", self.libvirt.domain_type));
        }
        if !(1..=64).contains(&self.clone.parallelism) {
            return Err(format!("clone.parallelism must be 1 to 64, not {}", self.clone.parallelism));
        }
        if !(1..=3600).contains(&self.ceph.call_timeout_secs) {
            return Err(format!("ceph.call_timeout_secs must be 1 to 3600, not {}", self.ceph.call_timeout_secs));
        }
        if self.server.token.is_some() && self.server.token_file.is_some() {
            return Err("give server.token or server.token_file, not both".into());
        }
        if self.server.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err("server.token is empty".into());
        }
        if let Some(d) = self.uefi.nvram_dir.as_ref().filter(|d| !d.is_absolute()) {
            return Err(format!("uefi.nvram_dir {} must be an absolute path", d.display()));
        }
        if !self.state_dir.is_absolute() {
            return Err("state_dir must be an absolute path".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.server.listen.port(), 7070);
        assert_eq!(c.libvirt.domain_type, "kvm");
        assert!(c.validate().is_ok());
    }

    #[test]
    fn the_ceph_agent_port_opens_with_a_ceph_table_and_can_be_moved_or_closed() {
        let listen = |toml: &str| toml::from_str::<Config>(toml).map(|c| c.ceph.agent_listen);
        assert_eq!(listen("").unwrap(), None, "no [ceph]: closed");
        assert_eq!(listen("[ceph]\nid = \"admin\"\n").unwrap(), Some("0.0.0.0:7762".parse().unwrap()));
        assert_eq!(listen("[ceph]\nagent_listen = \"127.0.0.1:9\"\n").unwrap(), Some("127.0.0.1:9".parse().unwrap()));
        assert_eq!(listen("[ceph]\nagent_listen = \"off\"\n").unwrap(), None);
        assert!(listen("[ceph]\nagent_listen = \"7762\"\n").unwrap_err().to_string().contains("off"));
    }

    #[test]
    fn rbd_goes_through_librbd_unless_the_cli_is_asked_for() {
        let client = |toml: &str| toml::from_str::<Config>(toml).map(|c| c.ceph.client);
        assert_eq!(client("").unwrap(), CephClient::Librbd);
        assert_eq!(client("[ceph]\nclient = \"cli\"\n").unwrap(), CephClient::Cli);
        assert!(client("[ceph]\nclient = \"rados\"\n").is_err());
    }

    #[test]
    fn the_rbd_call_timeout_is_two_minutes_unless_set_within_an_hour() {
        let c = |toml: &str| toml::from_str::<Config>(toml).unwrap();
        assert_eq!(c("").ceph.call_timeout_secs, 120);
        assert!(c("[ceph]\ncall_timeout_secs = 5\n").validate().is_ok());
        for bad in ["0", "3601"] {
            let e = c(&format!("[ceph]\ncall_timeout_secs = {bad}\n")).validate().unwrap_err();
            assert_eq!(e, format!("ceph.call_timeout_secs must be 1 to 3600, not {bad}"));
        }
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = toml::from_str::<Config>("[server]\nlisten_port = 1\n").unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }

    #[test]
    fn token_and_token_file_exclude_each_other() {
        let c: Config = toml::from_str("[server]\ntoken = \"a\"\ntoken_file = \"/t\"\n").unwrap();
        assert!(c.validate().unwrap_err().contains("not both"));
        let dir = tempfile::tempdir().unwrap();
        let (conf, token) = (dir.path().join("c.toml"), dir.path().join("token"));
        std::fs::write(&token, "  s3cret\n").unwrap();
        std::fs::write(&conf, format!("[server]\ntoken_file = \"{}\"\n", token.display())).unwrap();
        assert_eq!(Config::load(Some(&conf)).unwrap().server.token.as_deref(), Some("s3cret"));
        std::fs::write(&token, "\n").unwrap();
        assert!(Config::load(Some(&conf)).unwrap_err().to_string().contains("empty"));
        std::fs::write(&conf, "[server.tls]\ncert = \"/c\"\n").unwrap();
        assert!(Config::load(Some(&conf)).unwrap_err().to_string().contains("key"));
    }

    #[test]
    fn copies_yield_unless_turned_off() {
        assert!(toml::from_str::<Config>("").unwrap().tasks.low_priority_copies);
        let off: Config = toml::from_str("[tasks]\nlow_priority_copies = false\n").unwrap();
        assert!(!off.tasks.low_priority_copies);
        let err = toml::from_str::<Config>("[tasks]\nlow_priority_copies = \"no\"\n").unwrap_err();
        assert!(err.to_string().contains("low_priority_copies"), "{err}");
    }

    #[test]
    fn relative_root_is_refused() {
        let c: Config = toml::from_str("[storage]\nroots = [\"rel/dir\"]\n").unwrap();
        assert!(c.validate().unwrap_err().contains("absolute"));
    }
}
