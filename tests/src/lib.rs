//! Harness for host-level tests: each [`Host`] runs the real `kvmagent` binary with its own
//! storage root, state directory and port, plus a callback receiver, and offers the checks the
//! tests make on real effects (`qemu-img info`, `virsh domstate`, file bytes).
//!
//! These tests need a running libvirtd (`tests/host/libvirtd.sh start`) and the test guest
//! (`tests/guest/build.sh`); they fail, never skip, when either is missing.

pub mod bench;
pub mod callbacks;
pub mod ceph;
pub mod certs;
pub mod checks;
pub mod cli;
pub mod consistency;
pub mod guest;
pub mod http_server;
pub mod images;
pub mod load;
pub mod mn;
pub mod mn_types;
pub mod sources;
pub mod sshd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub use callbacks::Callbacks;

/// A small seeded generator (xorshift): runs that print their seed can be replayed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A fresh 32-hex uuid, as the management plane uses for VMs, volumes and tasks.
pub fn uuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The uuids of the clones a `/vm/clone` answer made (its failed entries have none).
pub fn clone_uuids(answer: &Value) -> Vec<String> {
    let entries = answer["inventories"].as_array().map(Vec::as_slice).unwrap_or_default();
    entries.iter().filter_map(|i| i["inventory"]["uuid"].as_str().map(str::to_owned)).collect()
}

/// The failed clones of a `/vm/clone` answer, a line each (name, error code, message): what a
/// failed assertion should show first, before the whole answer.
pub fn clone_failures(answer: &Value) -> String {
    let entries = answer["inventories"].as_array().map(Vec::as_slice).unwrap_or_default();
    let failed = entries.iter().filter(|i| i.get("inventory").is_none());
    failed.map(|f| format!("{} ({}): {}\n", f["name"], f["error"], f["message"])).collect()
}

/// A command body as the management node's `KVMHost.Http` sends it: the command's own fields
/// plus `kvmHostAddons` (`KVMHost.java:553-560`) and the thread context every `AgentCommand`
/// carries (`HasThreadContextAspect.aj`), `api` naming the API call it serves.
pub fn with_mn_context(mut body: Value, api: &str) -> Value {
    if let Some(m) = body.as_object_mut() {
        m.entry("kvmHostAddons").or_insert_with(|| serde_json::json!({}));
        m.insert("threadContext".into(), serde_json::json!({"api": api, "task-name": "test"}));
        m.insert("threadContextStack".into(), serde_json::json!([]));
        m.insert("taskContext".into(), serde_json::json!({}));
    }
    body
}

/// The agent binary built next to this test binary (`cargo build` builds it; `.ci/run` does).
pub fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("KVMAGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test> → target/<profile>/kvmagent
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>");
    let bin = profile_dir.join("kvmagent");
    assert!(bin.exists(), "{} is missing: build it first with `cargo build -p kvmagent`", bin.display());
    static CHECKED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    CHECKED.get_or_init(|| {
        // A binary from before a change of the agent would test the old agent.
        let out = std::process::Command::new(&bin).arg("--version").output().expect("kvmagent --version");
        let version = String::from_utf8_lossy(&out.stdout);
        assert!(
            version.contains(kvmagent::SOURCE_ID),
            "{} is built from other sources than this test ({} is not {}): build it again with \
             `cargo build -p kvmagent` (`--release` for the benches)",
            bin.display(),
            version.trim(),
            kvmagent::SOURCE_ID
        );
    });
    bin
}

/// Where `tests/guest/build.sh` put the test guest's kernel and initramfs.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("KVMAGENT_TEST_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/kvmagent/test-guest".into());
    for f in ["vmlinuz", "initrd.img"] {
        assert!(dir.join(f).exists(), "test guest file {} is missing: run tests/guest/build.sh", dir.join(f).display());
    }
    dir
}

/// A running agent with its own directories, and the VMs a test made (destroyed on drop).
pub struct Host {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub port: u16,
    pub callbacks: Callbacks,
    child: Option<Child>,
    /// Extra environment of the agent process.
    env: Vec<(String, String)>,
    vms: std::sync::Mutex<Vec<String>>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// The agent config used by the tests: TCG domains, everything under one temp dir.
fn config_text(root: &Path, state: &Path, port: u16, server_extra: &str, extra: &str) -> String {
    format!(
        "state_dir = \"{}\"\n[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_secs = 10\n{server_extra}\n[storage]\nroots = [\"{}\"]\n[backup]\nroots = [\"{}/backup\"]\n[libvirt]\ndomain_type = \"qemu\"\n{extra}",
        state.display(),
        root.display(),
        state.parent().unwrap_or(state).display()
    )
}

/// `(volume uuid, install path)` of each volume a VM record names, root first. A record is
/// `{formatVersion, vm: {volumes: [{uuid, location}, ...]}}` (see the agent's model).
pub fn record_volumes(record: &Value) -> Vec<(String, String)> {
    (record["vm"]["volumes"].as_array().into_iter().flatten())
        .filter_map(|v| Some((v["uuid"].as_str()?.to_owned(), v["location"].as_str()?.to_owned())))
        .collect()
}

impl Host {
    /// The volumes VM `vm`'s record names on this host, root first (see [`record_volumes`]).
    pub fn recorded_volumes(&self, vm: &str) -> Result<Vec<(String, String)>> {
        let file = self.state_dir.join(format!("vms/{vm}.json"));
        let text = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
        Ok(record_volumes(&serde_json::from_slice(&text)?))
    }

    /// The install paths VM `vm`'s record names, root first.
    pub fn recorded_paths(&self, vm: &str) -> Result<Vec<String>> {
        Ok(self.recorded_volumes(vm)?.into_iter().map(|(_, p)| p).collect())
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts an agent and waits until it answers `/host/echo`.
    pub async fn start() -> Result<Host> {
        Self::start_with("").await
    }

    /// Like [`start`](Self::start), with extra TOML appended to the config.
    pub async fn start_with(extra_config: &str) -> Result<Host> {
        Self::start_with_env(extra_config, &[]).await
    }

    /// Like [`start_with`](Self::start_with), with extra environment for the agent process.
    pub async fn start_with_env(extra_config: &str, env: &[(&str, &str)]) -> Result<Host> {
        Self::start_configured("", extra_config, env).await
    }

    /// The general form: `server_extra` goes into the `[server]` table, `extra_config` after
    /// the other tables, `env` into the agent's environment.
    pub async fn start_configured(server_extra: &str, extra_config: &str, env: &[(&str, &str)]) -> Result<Host> {
        checks::require_libvirtd()?;
        let dir = tempfile::Builder::new().prefix("kvmagent-test-").tempdir_in(test_tmp())?;
        let root = dir.path().join("local");
        let state_dir = dir.path().join("state");
        std::fs::create_dir_all(&root)?;
        let callbacks = Callbacks::start().await?;
        let port = free_port()?;
        let config = dir.path().join("kvmagent.toml");
        std::fs::write(&config, config_text(&root, &state_dir, port, server_extra, extra_config))?;
        let mut host = Host {
            dir,
            root,
            state_dir,
            port,
            callbacks,
            child: None,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            vms: Default::default(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        };
        host.spawn_agent()?;
        Ok(host)
    }

    fn spawn_agent(&mut self) -> Result<()> {
        // The port `free_port` found may be taken by another test's agent before ours binds it:
        // ours then exits (it cannot listen) and is started again on another port, rather than
        // this Host talking to the other agent.
        for _ in 0..5 {
            let listened = self.log().matches("kvmagent listening").count();
            let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("agent.log"))?;
            let child = Command::new(agent_binary())
                .args(["serve", "--config"])
                .arg(self.dir.path().join("kvmagent.toml"))
                .env("KVMAGENT_LOG", "debug")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting the agent binary")?;
            self.child = Some(child);
            // Listening is enough (the agent may speak TLS or want a token): requests queue until
            // it serves.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(status) = self.child.as_mut().expect("just spawned").try_wait()? {
                    if !self.log().contains(&format!("cannot listen on 127.0.0.1:{}:", self.port)) {
                        bail!("the agent exited ({status}); log:\n{}", self.log());
                    }
                    self.move_to_another_port()?;
                    break;
                }
                if self.log().matches("kvmagent listening").count() > listened
                    && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                {
                    return Ok(());
                }
                if std::time::Instant::now() > deadline {
                    bail!("the agent did not listen within 20 s; log:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        bail!("no port the agent could listen on after 5 tries; log:\n{}", self.log())
    }

    /// Rewrites the agent's config to listen on another free port.
    fn move_to_another_port(&mut self) -> Result<()> {
        let config = self.dir.path().join("kvmagent.toml");
        let port = free_port()?;
        let text = std::fs::read_to_string(&config)?;
        let text =
            text.replace(&format!("listen = \"127.0.0.1:{}\"", self.port), &format!("listen = \"127.0.0.1:{port}\""));
        std::fs::write(&config, text)?;
        self.port = port;
        Ok(())
    }

    /// Stops the agent with SIGTERM and waits for it to exit.
    pub fn stop_agent(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("agent not running")?;
        sigterm(&child);
        Ok(child.wait()?)
    }

    /// Kills the agent with SIGKILL (no chance to clean up) and waits for it to be gone.
    pub fn kill_agent(&mut self) -> Result<()> {
        let mut child = self.child.take().context("agent not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts the agent again on the same directories and port.
    pub fn restart_agent(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop_agent()?;
        }
        // Pooled keep-alive connections point at the old process.
        self.client = Client::builder(TokioExecutor::new()).build_http();
        self.spawn_agent()
    }

    /// `GET /recovery`, once the start-up recovery has finished (generously bounded).
    pub async fn recovery_report(&self) -> Value {
        for _ in 0..600 {
            let report: Value = serde_json::from_str(&self.get("/recovery").await.unwrap().1).unwrap();
            if !report.is_null() {
                return report;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("the recovery did not finish within 5 minutes; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A raw POST: returns status and body.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Result<(u16, String)> {
        self.post_to(self.port, path, headers, body).await
    }

    /// A raw POST to another port of the agent's (the Ceph agent port).
    pub async fn post_to(
        &self,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<(u16, String)> {
        let mut req = hyper::Request::post(format!("http://127.0.0.1:{port}{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.client.request(req.body(Full::new(body.into()))?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        let resp = self.client.get(self.url(path).parse()?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Sends an async command with a fresh taskuuid; returns the taskuuid after the 200 ack.
    pub async fn send(&self, path: &str, body: &Value) -> Result<String> {
        let task = uuid();
        self.send_as(&task, path, body).await?;
        Ok(task)
    }

    pub async fn send_as(&self, task: &str, path: &str, body: &Value) -> Result<()> {
        self.send_to(self.port, task, path, body).await
    }

    async fn send_to(&self, port: u16, task: &str, path: &str, body: &Value) -> Result<()> {
        let cb = self.callbacks.url();
        let headers = [("taskuuid", task), ("callbackurl", cb.as_str())];
        let (status, text) = self.post_to(port, path, &headers, body.to_string()).await?;
        if status != 200 || !text.is_empty() {
            bail!("{path}: expected an empty 200 ack, got {status} {text}");
        }
        Ok(())
    }

    /// Sends an async command and waits for its callback (up to `timeout`).
    pub async fn call_within(&self, path: &str, body: &Value, timeout: Duration) -> Result<Value> {
        let task = self.send(path, body).await?;
        self.callbacks
            .wait(&task, timeout)
            .await
            .with_context(|| format!("waiting for the result of {path}; agent log:\n{}", self.log()))
    }

    /// Sends an async command to another port of the agent's and waits (120 s) for its result.
    pub async fn call_at(&self, port: u16, path: &str, body: &Value) -> Result<Value> {
        let task = uuid();
        self.send_to(port, &task, path, body).await?;
        self.callbacks
            .wait(&task, Duration::from_secs(120))
            .await
            .with_context(|| format!("waiting for the result of {path} on port {port}; agent log:\n{}", self.log()))
    }

    /// [`call_within`](Self::call_within) with a 120 s limit (TCG guests are slow).
    pub async fn call(&self, path: &str, body: &Value) -> Result<Value> {
        self.call_within(path, body, Duration::from_secs(120)).await
    }

    /// Calls and requires `success: true`.
    pub async fn call_ok(&self, path: &str, body: &Value) -> Result<Value> {
        let r = self.call(path, body).await?;
        if r["success"] != Value::Bool(true) {
            bail!("{path} failed: {r}");
        }
        Ok(r)
    }

    /// Calls and requires `success: false`; returns the error text.
    pub async fn call_err(&self, path: &str, body: &Value) -> Result<String> {
        let r = self.call(path, body).await?;
        if r["success"] != Value::Bool(false) {
            bail!("{path} unexpectedly succeeded: {r}");
        }
        if r["error"].as_str().is_none_or(str::is_empty) || r["errorCode"]["code"].as_str().is_none() {
            bail!("{path} failure lacks error/errorCode: {r}");
        }
        Ok(r["error"].as_str().unwrap_or_default().to_owned())
    }

    /// Remembers a VM uuid so that it is destroyed and undefined when the test ends.
    pub fn track_vm(&self, vm_uuid: &str) {
        self.vms.lock().unwrap().push(vm_uuid.to_owned());
    }

    /// The VMs [`Host::track_vm`] was told of, oldest first.
    pub fn tracked_vms(&self) -> Vec<String> {
        self.vms.lock().unwrap().clone()
    }

    /// A path inside this host's storage root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for vm in self.vms.lock().unwrap().drain(..) {
            let _ = checks::virsh(&["destroy", &vm]);
            let _ = checks::virsh(&["undefine", "--nvram", "--tpm", &vm]);
        }
        if let Some(mut c) = self.child.take() {
            sigterm(&c);
            let _ = c.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Temp files go under /var/tmp: big images should not land in a RAM-backed /tmp.
fn test_tmp() -> PathBuf {
    let p = PathBuf::from(std::env::var("KVMAGENT_TEST_TMP").unwrap_or_else(|_| "/var/tmp".into()));
    let _ = std::fs::create_dir_all(&p);
    p
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}
