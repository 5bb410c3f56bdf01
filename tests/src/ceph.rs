//! The Ceph cluster `tests/ceph/start.sh` started, as the RBD tests see it.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// The cluster's ceph.conf; fails (never skips) when the cluster is not up.
pub fn conf() -> PathBuf {
    let dir =
        std::env::var_os("KVMAGENT_CEPH_DIR").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/kvmagent-ceph".into());
    let conf = dir.join("ceph.conf");
    assert!(conf.exists(), "no Ceph cluster at {}: start one with tests/ceph/start.sh", dir.display());
    conf
}

/// The agent config section pointing at the test cluster (the Ceph agent port closed: tests run
/// side by side).
pub fn agent_config() -> String {
    format!("[ceph]\nconf = \"{}\"\nagent_listen = \"off\"\n", conf().display())
}

/// Like [`agent_config`], also serving the Ceph agent paths on `listen`.
pub fn agent_config_serving(listen: &str) -> String {
    format!("[ceph]\nconf = \"{}\"\nagent_listen = \"{listen}\"\n", conf().display())
}

pub fn rbd(args: &[&str]) -> Result<String> {
    use std::os::unix::process::ExitStatusExt;
    let conf = conf();
    let run = || Command::new("timeout").arg("60").arg("rbd").arg("-c").arg(&conf).args(args).output();
    let mut out = run().context("running rbd")?;
    // The command line itself aborted once in a long run (a Ceph client library assertion): a
    // crash of the checker is not the agent's failure, so it gets one more try.
    if out.status.signal().is_some() || out.status.code() == Some(128 + libc::SIGABRT) {
        out = run().context("running rbd")?;
    }
    if !out.status.success() {
        bail!("rbd {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `ceph` command line on the test cluster.
pub fn ceph(args: &[&str]) -> Result<String> {
    let out = Command::new("timeout")
        .arg("30")
        .arg("ceph")
        .arg("-c")
        .arg(conf())
        .args(args)
        .output()
        .context("running ceph")?;
    if !out.status.success() {
        bail!("ceph {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `rbd info --format json` of `pool/image[@snap]`, or `None` when it does not exist.
pub fn info(spec: &str) -> Option<Value> {
    rbd(&["info", "--format", "json", spec]).ok().and_then(|s| serde_json::from_str(&s).ok())
}

/// Every image in the pool.
pub fn images(pool: &str) -> Vec<String> {
    let mut v: Vec<String> =
        serde_json::from_str(&rbd(&["ls", "--format", "json", pool]).unwrap_or_else(|_| "[]".into()))
            .unwrap_or_default();
    v.sort();
    v
}

/// QEMU's name for an RBD image of the test cluster.
pub fn qemu_name(spec: &str) -> String {
    format!("rbd:{spec}:conf={}", conf().display())
}

/// The client.admin key of the test cluster (base64, as Ceph prints it).
pub fn admin_key() -> String {
    let keyring = conf().with_file_name("ceph.client.admin.keyring");
    let text = std::fs::read_to_string(&keyring).expect("admin keyring");
    text.lines().find_map(|l| l.trim().strip_prefix("key = ")).expect("a key line in the keyring").trim().to_owned()
}

/// Writes `bytes` at `offset` of an RBD image through QEMU's rbd driver.
pub fn write(spec: &str, offset: u64, bytes: &[u8]) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), bytes).unwrap();
    qemu_io(spec, &format!("write -s {} {offset} {}", file.path().display(), bytes.len()));
}

/// Fills `len` bytes at `offset` of an RBD image with `byte`, through QEMU's rbd driver.
pub fn fill(spec: &str, offset: u64, len: u64, byte: u8) {
    qemu_io(spec, &format!("write -P {byte} {offset} {len}"));
}

/// Runs one `qemu-io` command on an RBD image as raw.
fn qemu_io(spec: &str, cmd: &str) {
    let out = Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &qemu_name(spec)]).output().unwrap();
    assert!(out.status.success(), "qemu-io on {spec}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The names of an RBD image's snapshots.
pub fn snapshots(spec: &str) -> Vec<String> {
    let list: Value = serde_json::from_str(&rbd(&["snap", "ls", "--format", "json", spec]).unwrap()).unwrap();
    list.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_owned()).collect()
}

/// Removes an image with all its snapshots (test clean-up; errors ignored).
pub fn remove_all(spec: &str) {
    if let Ok(list) = rbd(&["snap", "ls", "--format", "json", spec]) {
        let snaps: Vec<Value> = serde_json::from_str(&list).unwrap_or_default();
        for s in snaps {
            let _ = rbd(&["snap", "unprotect", &format!("{spec}@{}", s["name"].as_str().unwrap_or_default())]);
        }
    }
    let _ = rbd(&["snap", "purge", "--no-progress", spec]);
    let _ = rbd(&["rm", "--no-progress", spec]);
}

/// The images a test made, removed (with their snapshots) in reverse order when it ends, also
/// when it fails: clones before their parents.
pub struct MadeImages(pub Vec<String>);

impl Drop for MadeImages {
    fn drop(&mut self) {
        for spec in self.0.iter().rev() {
            remove_all(spec);
        }
    }
}
