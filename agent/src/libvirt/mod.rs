//! The libvirt connection. Every libvirt call blocks, so each runs on a blocking thread through
//! [`Libvirt::call`], which also times it and reconnects once when the daemon was restarted.

pub mod backup;
pub mod blockjob;
pub mod domains;
pub mod endpoint;
pub mod guest_agent;
pub mod rpc;
pub mod secrets;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use rpc::client::RpcError;
use rpc::Connection;

use crate::error::{AgentError, ErrorKind};
use crate::metrics;

/// libvirt's error codes (`virErrorNumber`) the agent tells apart.
pub mod code {
    pub const INTERNAL_ERROR: i32 = 1;
    pub const INVALID_ARG: i32 = 8;
    pub const NO_DOMAIN: i32 = 42;
    pub const AUTH_FAILED: i32 = 45;
    pub const OPERATION_INVALID: i32 = 55;
    pub const NO_SECRET: i32 = 66;
    pub const AGENT_UNRESPONSIVE: i32 = 86;
    pub const NO_DOMAIN_CHECKPOINT: i32 = 103;
}

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot connect to libvirt at {uri}: {message}; is libvirtd running?")]
    Connect { uri: String, message: String },
    #[error("libvirt {call} failed: {message}")]
    Call { call: &'static str, message: String, code: i32 },
    #[error("libvirt {call} failed: {message}; the agent reconnects at its next call")]
    Lost { call: &'static str, message: String },
    #[error("libvirt {call} did not complete: the blocking worker failed")]
    Worker { call: &'static str },
}

impl LibvirtError {
    pub fn from_rpc(call: &'static str, e: RpcError) -> Self {
        match e {
            RpcError::Remote { code, message } => LibvirtError::Call { call, message, code },
            RpcError::Lost(_) => LibvirtError::Lost { call, message: e.to_string() },
            RpcError::Reply(_) => LibvirtError::Call { call, message: e.to_string(), code: code::INTERNAL_ERROR },
        }
    }

    /// libvirt's own "no domain" error, as a fake hypervisor answers it.
    #[cfg(test)]
    pub fn no_domain(vm: &str) -> Self {
        LibvirtError::Call {
            call: "lookupByName",
            message: format!("Domain not found: no domain with matching name '{vm}'"),
            code: code::NO_DOMAIN,
        }
    }

    fn has_code(&self, wanted: i32) -> bool {
        matches!(self, LibvirtError::Call { code, .. } if *code == wanted)
    }

    /// libvirt's "no domain with matching name/uuid" (VIR_ERR_NO_DOMAIN).
    pub fn is_no_domain(&self) -> bool {
        self.has_code(code::NO_DOMAIN)
    }

    /// libvirt's "domain is not running" (VIR_ERR_OPERATION_INVALID), as a call that needs a
    /// running guest answers for a stopped one.
    pub fn is_not_running(&self) -> bool {
        self.has_code(code::OPERATION_INVALID)
    }

    fn is_connection_lost(&self) -> bool {
        matches!(self, LibvirtError::Lost { .. })
    }
}

impl From<LibvirtError> for AgentError {
    fn from(e: LibvirtError) -> Self {
        let kind = if e.is_no_domain() { ErrorKind::NotFound } else { ErrorKind::OperationFailed };
        AgentError::new(kind, "libvirt operation failed", e.to_string())
    }
}

#[derive(Clone)]
pub struct Libvirt {
    uri: Arc<str>,
    conn: Arc<Mutex<Option<Arc<Connection>>>>,
}

impl Libvirt {
    /// Connects lazily: the agent starts (and answers echo) even while libvirtd is down.
    pub fn new(uri: &str) -> Self {
        Libvirt { uri: uri.into(), conn: Arc::new(Mutex::new(None)) }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn connection(&self) -> Result<Arc<Connection>, LibvirtError> {
        let mut slot = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = slot.as_ref().filter(|c| c.is_alive()) {
            return Ok(c.clone());
        }
        let failed = |message: String| LibvirtError::Connect { uri: self.uri.to_string(), message };
        let endpoint = endpoint::Endpoint::parse(&self.uri).map_err(failed)?;
        let socket = endpoint.socket();
        let c = Connection::connect(&socket).map_err(|e| failed(format!("{}: {e}", socket.display())))?;
        c.open(&endpoint.name).map_err(|e| failed(e.to_string()))?;
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `f` with the connection on a blocking thread. `f` may run twice (once more on a
    /// new connection) when the first attempt finds the connection lost, so it must be a single
    /// idempotent libvirt call or a read.
    pub async fn call<T, F>(&self, call: &'static str, f: F) -> Result<T, LibvirtError>
    where
        T: Send + 'static,
        F: Fn(&Connection) -> Result<T, LibvirtError> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let mut result = this.connection().and_then(|c| f(&c));
            if matches!(&result, Err(e) if e.is_connection_lost()) {
                result = this.connection().and_then(|c| f(&c));
            }
            metrics::observe_libvirt(call, start);
            result
        })
        .await
        .map_err(|_| LibvirtError::Worker { call })?
    }

    /// `(libvirt version, hypervisor version)` as dotted strings, e.g. `("9.0.0", "10.0.2")`.
    pub async fn versions(&self) -> Result<(String, String), LibvirtError> {
        self.call("getVersion", |c| Ok((dotted(c.lib_version()?), dotted(c.hyp_version()?)))).await
    }

    pub async fn capabilities(&self) -> Result<String, LibvirtError> {
        self.call("getCapabilities", |c| c.capabilities()).await
    }

    pub async fn domain_capabilities(&self, virt_type: &str, machine: &str) -> Result<String, LibvirtError> {
        let (virt_type, machine) = (virt_type.to_owned(), machine.to_owned());
        self.call("getDomainCapabilities", move |c| c.domain_capabilities("x86_64", &machine, &virt_type)).await
    }
}

/// The real hypervisor: each call forwards to the libvirt call of the same name.
#[async_trait::async_trait]
impl crate::hypervisor::Hypervisor for Libvirt {
    async fn versions(&self) -> Result<(String, String), LibvirtError> {
        Libvirt::versions(self).await
    }
    async fn capabilities(&self) -> Result<String, LibvirtError> {
        Libvirt::capabilities(self).await
    }
    async fn domain_capabilities(&self, virt_type: &str, machine: &str) -> Result<String, LibvirtError> {
        Libvirt::domain_capabilities(self, virt_type, machine).await
    }
    async fn domain_state(&self, vm: &str) -> Result<Option<domains::VmState>, LibvirtError> {
        Libvirt::domain_state(self, vm).await
    }
    async fn list_vm_states(&self) -> Result<(Vec<(String, domains::VmState)>, Vec<String>), LibvirtError> {
        Libvirt::list_vm_states(self).await
    }
    async fn define(&self, xml: String) -> Result<(), LibvirtError> {
        Libvirt::define(self, xml).await
    }
    async fn start(&self, vm: &str, paused: bool) -> Result<(), LibvirtError> {
        Libvirt::start(self, vm, paused).await
    }
    async fn xml(&self, vm: &str) -> Result<String, LibvirtError> {
        Libvirt::xml(self, vm).await
    }
    async fn destroy(&self, vm: &str) -> Result<(), LibvirtError> {
        Libvirt::destroy(self, vm).await
    }
    async fn shutdown(&self, vm: &str) -> Result<(), LibvirtError> {
        Libvirt::shutdown(self, vm).await
    }
    async fn undefine(&self, vm: &str, remove_tpm_state: bool) -> Result<(), LibvirtError> {
        Libvirt::undefine(self, vm, remove_tpm_state).await
    }
    async fn suspend(&self, vm: &str) -> Result<(), LibvirtError> {
        Libvirt::suspend(self, vm).await
    }
    async fn resume(&self, vm: &str) -> Result<(), LibvirtError> {
        Libvirt::resume(self, vm).await
    }
    async fn snapshot_disks(&self, vm: &str, disks: Vec<(String, Option<String>)>) -> Result<(), LibvirtError> {
        Libvirt::snapshot_disks(self, vm, disks).await
    }
    async fn block_pull(&self, vm: &str, disk: &str, base: Option<&str>) -> Result<(), LibvirtError> {
        Libvirt::block_pull(self, vm, disk, base).await
    }
    async fn block_job(&self, vm: &str, disk: &str) -> Result<Option<blockjob::JobProgress>, LibvirtError> {
        Libvirt::block_job(self, vm, disk).await
    }
    async fn block_commit_active(&self, vm: &str, disk: &str) -> Result<(), LibvirtError> {
        Libvirt::block_commit_active(self, vm, disk).await
    }
    async fn block_job_abort(&self, vm: &str, disk: &str, pivot: bool) -> Result<(), LibvirtError> {
        Libvirt::block_job_abort(self, vm, disk, pivot).await
    }
    async fn backup_begin(
        &self,
        vm: &str,
        backup_xml: String,
        checkpoint_xml: String,
        reuse_targets: bool,
    ) -> Result<(), LibvirtError> {
        Libvirt::backup_begin(self, vm, backup_xml, checkpoint_xml, reuse_targets).await
    }
    async fn backup_job(&self, vm: &str) -> Result<backup::BackupJobState, LibvirtError> {
        Libvirt::backup_job(self, vm).await
    }
    async fn abort_job(&self, vm: &str) -> Result<(), LibvirtError> {
        Libvirt::abort_job(self, vm).await
    }
    async fn checkpoint_redefine(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        Libvirt::checkpoint_redefine(self, vm, xml).await
    }
    async fn checkpoint_names(&self, vm: &str) -> Result<Vec<String>, LibvirtError> {
        Libvirt::checkpoint_names(self, vm).await
    }
    async fn checkpoint_delete(&self, vm: &str, name: &str, metadata_only: bool) -> Result<(), LibvirtError> {
        Libvirt::checkpoint_delete(self, vm, name, metadata_only).await
    }
    async fn attach_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        Libvirt::change_device(self, vm, rpc::DeviceCall::Attach, xml).await
    }
    async fn detach_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        Libvirt::change_device(self, vm, rpc::DeviceCall::Detach, xml).await
    }
    async fn update_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        Libvirt::change_device(self, vm, rpc::DeviceCall::Update, xml).await
    }
    async fn set_ceph_secret(&self, uuid: &str, key: Vec<u8>) -> Result<(), LibvirtError> {
        Libvirt::set_ceph_secret(self, uuid, key).await
    }
    async fn set_vtpm_secret(&self, uuid: &str, vm: &str, key: Vec<u8>) -> Result<(), LibvirtError> {
        Libvirt::set_vtpm_secret(self, uuid, vm, key).await
    }
    async fn vtpm_secret_value(&self, uuid: &str) -> Result<Option<Vec<u8>>, LibvirtError> {
        Libvirt::vtpm_secret_value(self, uuid).await
    }
    async fn remove_vtpm_secret(&self, uuid: &str) -> Result<(), LibvirtError> {
        Libvirt::remove_vtpm_secret(self, uuid).await
    }
    async fn guest_agent_connected(&self, vm: &str) -> Result<bool, LibvirtError> {
        Libvirt::guest_agent_connected(self, vm).await
    }
    async fn guest_fs_freeze(&self, vm: &str, timeout: std::time::Duration) -> Result<u32, LibvirtError> {
        Libvirt::guest_fs_freeze(self, vm, timeout).await
    }
    async fn guest_fs_thaw(&self, vm: &str, timeout: std::time::Duration) -> Result<(), LibvirtError> {
        Libvirt::guest_fs_thaw(self, vm, timeout).await
    }
}

/// libvirt encodes versions as `major * 1_000_000 + minor * 1_000 + release`.
pub fn dotted(v: u64) -> String {
    format!("{}.{}.{}", v / 1_000_000, (v / 1_000) % 1_000, v % 1_000)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::thread::JoinHandle;

    use super::rpc::client::{call_packet, read_packet};
    use super::rpc::xdr::{Decoder, Encoder};
    use super::*;

    #[test]
    fn dotted_versions() {
        assert_eq!(super::dotted(9_000_000), "9.0.0");
        assert_eq!(super::dotted(10_000_002), "10.0.2");
    }

    /// A fake daemon on `socket`: it accepts `connections` connections one after the other and
    /// answers the calls of the handshake and of [`Libvirt::versions`], offering `auth` types;
    /// each connection is closed, unanswered, at its `drop_at`-th call. Its thread returns
    /// the URIs the connections opened and the procedures called, in order.
    fn daemon(
        listener: UnixListener,
        connections: usize,
        auth: i32,
        drop_at: usize,
    ) -> JoinHandle<(Vec<String>, Vec<i32>)> {
        std::thread::spawn(move || {
            let (mut opened, mut called) = (Vec::new(), Vec::new());
            for _ in 0..connections {
                let (mut s, _) = listener.accept().unwrap();
                for n in 1.. {
                    let Ok(call) = read_packet(&mut s) else { break };
                    called.push(call.header.procedure);
                    if n == drop_at {
                        break;
                    }
                    let mut ret = Encoder::new();
                    match call.header.procedure {
                        66 => drop(ret.u32(1).i32(auth)),
                        70 => drop(ret.i32(1)),
                        1 => opened
                            .push(Decoder::new(&call.payload).optional("uri", |d| d.string("uri")).unwrap().unwrap()),
                        157 => drop(ret.u64(9_000_000)),
                        4 => drop(ret.u64(8_002_000)),
                        p => panic!("unexpected procedure {p}"),
                    }
                    let mut reply = call_packet(call.header.procedure, call.header.serial, &ret.into_bytes());
                    reply[16..20].copy_from_slice(&1i32.to_be_bytes()); // VIR_NET_REPLY
                    std::io::Write::write_all(&mut s, &reply).unwrap();
                }
            }
            (opened, called)
        })
    }

    fn socket_and_uri(dir: &tempfile::TempDir) -> (UnixListener, String) {
        let path = dir.path().join("libvirt-sock");
        (UnixListener::bind(&path).unwrap(), format!("qemu+unix:///system?socket={}", path.display()))
    }

    #[tokio::test]
    async fn a_call_on_a_connection_the_daemon_dropped_is_made_again_on_a_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, uri) = socket_and_uri(&dir);
        // The first connection answers the handshake and one versions() (4 calls), then drops.
        let daemon = daemon(listener, 2, 0, 5);
        let libvirt = Libvirt::new(&uri);
        assert_eq!(libvirt.versions().await.unwrap(), ("9.0.0".into(), "8.2.0".into()));
        assert_eq!(libvirt.versions().await.unwrap(), ("9.0.0".into(), "8.2.0".into()));
        drop(libvirt);
        let (opened, called) = daemon.join().unwrap();
        assert_eq!(opened, ["qemu:///system", "qemu:///system"], "two connections opened");
        assert_eq!(called, [66, 1, 157, 4, 157, 66, 1, 157, 4], "the dropped call is made again");
    }

    #[tokio::test]
    async fn a_daemon_asking_for_polkit_is_answered_as_libvirts_client_does() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, uri) = socket_and_uri(&dir);
        let daemon = daemon(listener, 1, 2, 0);
        let libvirt = Libvirt::new(&uri);
        assert_eq!(libvirt.versions().await.unwrap(), ("9.0.0".into(), "8.2.0".into()));
        drop(libvirt);
        assert_eq!(daemon.join().unwrap(), (vec!["qemu:///system".to_string()], vec![66, 70, 1, 157, 4]));
    }

    #[tokio::test]
    async fn a_daemon_asking_for_sasl_is_refused_saying_what_is_supported() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, uri) = socket_and_uri(&dir);
        let daemon = daemon(listener, 1, 1, 0);
        let e = Libvirt::new(&uri).versions().await.unwrap_err();
        assert!(matches!(e, LibvirtError::Connect { .. }) && e.to_string().contains("SASL"), "{e}");
        assert!(e.to_string().contains("polkit"), "{e}");
        assert_eq!(daemon.join().unwrap(), (vec![], vec![66]), "nothing opened");
    }

    #[tokio::test]
    async fn no_daemon_is_a_connect_error_naming_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("qemu:///system?socket={}/none", dir.path().display());
        let e = Libvirt::new(&uri).versions().await.unwrap_err();
        assert!(matches!(e, LibvirtError::Connect { .. }) && e.to_string().contains("/none"), "{e}");
    }
}
