//! Checks on real effects: qemu-img's view of images, virsh's view of domains, file bytes.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const LIBVIRT_URI: &str = "qemu:///system";

fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        bail!("{program} {} failed ({}): {} {}", args.join(" "), out.status, stderr.trim(), stdout.trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn virsh(args: &[&str]) -> Result<String> {
    let mut all = vec!["-c", LIBVIRT_URI];
    all.extend_from_slice(args);
    run("virsh", &all)
}

/// `ip <args>`: its output.
pub fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

/// `target → source` of each of the VM's disks, as `virsh domblklist` lists them (`-` for an
/// empty drive).
pub fn disks(vm: &str) -> Result<Vec<(String, String)>> {
    let out = virsh(&["domblklist", vm])?;
    Ok((out.lines().skip(2))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.to_owned()))
        })
        .collect())
}

/// The source of the VM's disk `target` (`vdb`, `hdc`...), or `None` when it has no such disk.
pub fn disk_source(vm: &str, target: &str) -> Option<String> {
    disks(vm).ok()?.into_iter().find(|(t, _)| t == target).map(|(_, s)| s)
}

/// Waits until `cond` holds, up to 60 s (a guest under TCG is slow to release or reset devices).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !cond() {
        if std::time::Instant::now() >= deadline {
            bail!("{what}: not within 60 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Fails with instructions when libvirtd does not answer.
pub fn require_libvirtd() -> Result<()> {
    virsh(&["version"])
        .map(|_| ())
        .context("libvirtd is not reachable at qemu:///system; start it with tests/host/libvirtd.sh start")
}

/// `virsh domstate`, e.g. `running`, `shut off`, `paused`; `None` when no such domain exists.
pub fn domstate(vm: &str) -> Option<String> {
    virsh(&["domstate", vm]).ok().map(|s| s.trim().to_owned())
}

pub fn dumpxml(vm: &str) -> Result<String> {
    virsh(&["dumpxml", vm])
}

/// `qemu-img info --output=json` (shared lock, so it also reads images in use).
pub fn qemu_img_info(path: &Path) -> Result<Value> {
    Ok(serde_json::from_str(&run("qemu-img", &["info", "-U", "--output=json", &path.to_string_lossy()])?)?)
}

/// `qemu-img check`: fails unless the image is clean.
pub fn qemu_img_check(path: &Path) -> Result<()> {
    run("qemu-img", &["check", "-U", &path.to_string_lossy()]).map(|_| ())
}

pub fn qemu_img(args: &[&str]) -> Result<String> {
    run("qemu-img", args)
}

/// Writes `pattern` at `offset` into an image through qemu-io (format-aware).
pub fn qemu_io_write(path: &Path, offset: u64, pattern: &[u8]) -> Result<()> {
    let tmp = tempfile::NamedTempFile::new()?;
    std::fs::write(tmp.path(), pattern)?;
    // `write -s FILE` fills the write buffer from a pattern file: arbitrary bytes, no shell.
    qemu_io(path, &format!("write -s {} {offset} {}", tmp.path().display(), pattern.len()))
}

/// The SHA-256 of a file's bytes, to prove a source was not written.
pub fn file_sha256(path: &Path) -> Result<String> {
    Ok(run("sha256sum", &[&path.to_string_lossy()])?.split_whitespace().next().unwrap_or_default().to_owned())
}

/// Makes sure a Linux bridge named `name` exists and is up (for bridge NICs), shared by tests.
pub fn ensure_bridge(name: &str) -> Result<()> {
    if Path::new("/sys/class/net").join(name).exists() {
        return Ok(());
    }
    // Another test may create it at the same moment; only the end state matters.
    let _ = run("ip", &["link", "add", name, "type", "bridge"]);
    run("ip", &["link", "set", name, "up"]).map(|_| ())
}

/// The text of the first `<tag>` element in `xml` (parsed, so escaping does not matter).
pub fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let text = doc.descendants().find(|n| n.has_tag_name(tag))?.text()?.to_owned();
    Some(text)
}

/// Fills `len` bytes at `offset` of a qcow2 image with `byte` (real, non-zero data).
pub fn qemu_io_fill(path: &Path, offset: u64, len: u64, byte: u8) -> Result<()> {
    qemu_io(path, &format!("write -P {byte} {offset} {len}"))
}

/// Like [`qemu_io_fill`], as compressed clusters (`len` below 2 GiB): the file stays small, and
/// reading it back is CPU-bound decompression, so copying it takes seconds even from the page
/// cache (a copy slow enough to stop half-way).
pub fn qemu_io_fill_compressed(path: &Path, offset: u64, len: u64, byte: u8) -> Result<()> {
    qemu_io(path, &format!("write -c -P {byte} {offset} {len}"))
}

fn qemu_io(path: &Path, cmd: &str) -> Result<()> {
    run("qemu-io", &["-f", "qcow2", "-c", cmd, &path.to_string_lossy()]).map(|_| ())
}

/// Fills `len` bytes at `offset` of disk `alias` (e.g. `virtio-disk1`) of running VM `vm`
/// with `byte`, through the VM's own block layer (HMP `qemu-io`): a write the running VM makes,
/// while its image files are locked against other writers.
pub fn guest_disk_fill(vm: &str, alias: &str, offset: u64, len: u64, byte: u8) -> Result<()> {
    guest_qemu_io(vm, alias, &format!("write -P {byte} {offset} {len}"))
}

/// Flushes disk `alias` of running VM `vm`: QEMU writes out the qcow2 metadata it caches, so
/// that a reader beside the VM (`qemu-img -U`) sees what the guest sees.
pub fn guest_disk_flush(vm: &str, alias: &str) -> Result<()> {
    guest_qemu_io(vm, alias, "flush")
}

fn guest_qemu_io(vm: &str, alias: &str, command: &str) -> Result<()> {
    let cmd = format!("qemu-io -d /machine/peripheral/{alias}/virtio-backend \"{command}\"");
    let out = virsh(&["qemu-monitor-command", "--hmp", vm, &cmd])?;
    if out.trim().is_empty() {
        Ok(())
    } else {
        bail!("qemu-io in VM {vm} on {alias}: {}", out.trim())
    }
}

/// A tmpfs of a few MiB (mounted inside a storage or backup root): a disk that fills up.
/// Unmounted on drop.
pub struct SmallDisk(pub PathBuf);

impl SmallDisk {
    pub fn mount(at: PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .unwrap();
        assert!(ok.success(), "mounting a tmpfs needs root");
        SmallDisk(at)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Resident memory of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    kib * 1024
}

/// Bytes of all files under `dir`.
pub fn tree_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => tree_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// A veth pair standing in for the host's NIC, and the bridge the agent makes on it: both are
/// deleted when the test ends, also on failure. Nothing else is touched.
pub struct TestNic {
    pub name: String,
    pub bridge: String,
}

impl TestNic {
    pub fn create() -> TestNic {
        let name = format!("kvc{}", &crate::uuid()[..8]);
        let nic = TestNic { bridge: format!("br_{name}"), name };
        ip(&["link", "add", &nic.name, "type", "veth", "peer", "name", &format!("{}p", nic.name)]).unwrap();
        ip(&["link", "set", &format!("{}p", nic.name), "up"]).unwrap();
        nic
    }

    /// The names of the bridge's ports.
    pub fn ports(&self) -> Vec<String> {
        let out = ip(&["-j", "link", "show", "master", &self.bridge]).unwrap();
        let links: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).unwrap();
        links.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(str::to_owned)).collect()
    }
}

impl Drop for TestNic {
    fn drop(&mut self) {
        for link in [&self.bridge, &self.name] {
            if ip(&["link", "show", link]).is_ok() {
                if let Err(e) = ip(&["link", "del", link]) {
                    eprintln!("cannot delete {link}: {e}");
                }
            }
        }
    }
}

/// The names of VM `vm`'s libvirt checkpoints.
pub fn checkpoints(vm: &str) -> Vec<String> {
    virsh(&["checkpoint-list", "--name", vm])
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The names of qcow2 file `file`'s persistent dirty bitmaps.
pub fn bitmaps(file: &str) -> Vec<String> {
    let info: Value = serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", file]).unwrap()).unwrap();
    let list = info["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    list.iter().map(|b| b["name"].as_str().unwrap().to_owned()).collect()
}
