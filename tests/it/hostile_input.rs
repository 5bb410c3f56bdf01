//! Hostile input: every command of `tests/corpus/hostile.jsonl` (malformed JSON, wrong types,
//! huge numbers, metacharacters in identifiers, `..` and symlink escapes, images whose backing
//! file leaves the roots or is a device or a protocol, raw files posing as qcow2, callbacks to
//! other hosts, bad task ids) is replayed against a real agent. Each must be answered in-band
//! with an error envelope, the agent must stay up, and nothing may change: the storage tree
//! (paths, sizes, modification times) and the domains the test could have made are compared
//! around every entry. Domains that are none of the test's (VMs beside it) are not looked at,
//! and the corpus is also replayed while such a VM is defined, started, stopped and undefined.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use kvmagent_host_tests::checks::{qemu_img, virsh};
use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::{uuid, Host};
use serde_json::{Map, Value};

const SYNC: &[&str] =
    &["/host/echo", "/host/connect", "/ceph/primarystorage/echo", "/network/checkphysicalnetworkinterface"];

/// Every file and directory under `dir`: size and modification time (symlinks not followed).
fn tree(dir: &Path, out: &mut BTreeMap<String, (u64, Option<SystemTime>)>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let m = e.path().symlink_metadata().unwrap();
        out.insert(e.path().display().to_string(), (m.len(), m.modified().ok()));
        if m.is_dir() {
            tree(&e.path(), out);
        }
    }
}

/// The host's storage tree: every path under its root, with size and modification time.
fn files(h: &Host) -> BTreeMap<String, (u64, Option<SystemTime>)> {
    let mut files = BTreeMap::new();
    tree(&h.root, &mut files);
    files
}

/// The domains on this host that the test or its agent could have made: those named by one of
/// `names` (the strings of the entry being replayed, where the VM uuids it gives are), and those
/// whose definition names the host's storage root or state directory (every domain the agent
/// defines logs its console into the state directory; a clone's generated uuid is in no entry).
/// Every other domain belongs to someone else and is not looked at.
fn our_domains(h: &Host, names: &BTreeSet<String>) -> BTreeSet<String> {
    let dirs = [&h.root, &h.state_dir].map(|d| format!("{}/", d.display()));
    let mine = |name: &String| {
        // A domain undefined between the listing and here is gone, and so is none of ours.
        names.contains(name) || virsh(&["dumpxml", name]).is_ok_and(|xml| dirs.iter().any(|d| xml.contains(d)))
    };
    all_domains().into_iter().filter(mine).collect()
}

/// The names of all domains on the host, defined or running.
fn all_domains() -> BTreeSet<String> {
    let list = virsh(&["list", "--all", "--name"]).unwrap();
    list.lines().map(str::trim).filter(|n| !n.is_empty()).map(str::to_owned).collect()
}

/// Every string of a request, keys included: the names a domain made for it could have.
fn names(body: &[u8], headers: &[(String, String)]) -> BTreeSet<String> {
    fn strings(v: &Value, out: &mut BTreeSet<String>) {
        match v {
            Value::String(s) => {
                out.insert(s.clone());
            }
            Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            Value::Object(o) => o.iter().for_each(|(k, v)| {
                out.insert(k.clone());
                strings(v, out)
            }),
            _ => {}
        }
    }
    let mut out: BTreeSet<String> = headers.iter().map(|(_, v)| v.clone()).collect();
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        strings(&v, &mut out);
    }
    out
}

/// A TCG domain of 32 MiB with no disk (SeaBIOS finds nothing to boot and waits), plus `devices`.
fn tiny_domain_xml(name: &str, devices: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64'>hvm</type></os><features><acpi/></features><devices>{devices}</devices></domain>"
    )
}

fn define(xml: &str) -> anyhow::Result<()> {
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), xml)?;
    virsh(&["define", &file.path().to_string_lossy()]).map(|_| ())
}

/// A VM that is none of the test's: defined, started, stopped and undefined with `virsh` in a
/// loop on a thread of its own until [`finish`](Self::finish) or drop (also on a panic), or
/// until its time is up. Removed at the end.
struct UnrelatedVm {
    name: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<usize>>>,
}

impl UnrelatedVm {
    fn start(limit: Duration) -> UnrelatedVm {
        let name = format!("kvmagent-unrelated-{}", uuid());
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (name.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            let xml = tiny_domain_xml(&n, "");
            let mut cycles = 0;
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline {
                define(&xml)?;
                virsh(&["start", &n])?;
                std::thread::sleep(Duration::from_millis(300));
                virsh(&["destroy", &n])?;
                virsh(&["undefine", &n])?;
                cycles += 1;
            }
            Ok(cycles)
        });
        UnrelatedVm { name, stop, thread: Some(thread) }
    }

    /// Stops the loop; returns how many full cycles it made, or what failed.
    fn finish(&mut self) -> anyhow::Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let result = match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the loop panicked"))),
            None => Err(anyhow::anyhow!("already finished")),
        };
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name]);
        result
    }
}

impl Drop for UnrelatedVm {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.finish();
        }
    }
}

/// The hostile files the corpus names, under `<root>/evil`.
fn hostile_files(h: &Host) {
    let evil = h.path("evil");
    std::fs::create_dir_all(&evil).unwrap();
    let p = |n: &str| evil.join(n).display().to_string();
    let unsafe_overlay = |name: &str, backing: &str| {
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", &p(name), "1M"]).unwrap();
    };
    qemu_img(&["create", "-q", "-f", "qcow2", &p("plain.qcow2"), "1M"]).unwrap();
    unsafe_overlay("backing-outside.qcow2", "/etc/passwd");
    unsafe_overlay("backing-device.qcow2", "/dev/sda");
    unsafe_overlay("backing-nbd.qcow2", "nbd:127.0.0.1:10809");
    unsafe_overlay("backing-json.qcow2", r#"json:{"driver":"file","filename":"/etc/shadow"}"#);
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", &p("loop-b.qcow2"), "-F", "qcow2", &p("loop-a.qcow2"), "1M"])
        .unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", &p("loop-a.qcow2"), "-F", "qcow2", &p("loop-b.qcow2"), "1M"])
        .unwrap();
    // What a guest could write into a raw disk: a qcow2 header naming a file outside the roots.
    std::fs::copy(p("backing-outside.qcow2"), p("raw-posing.qcow2")).unwrap();
    let data = format!("data_file={},data_file_raw=on", p("external.raw"));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", &data, &p("external-data.qcow2"), "1M"]).unwrap();
    std::os::unix::fs::symlink("/etc", evil.join("link-out")).unwrap();
}

/// The body and headers of an entry, placeholders filled in.
fn request(entry: &Value, fill: &dyn Fn(&str) -> String, h: &Host) -> (Vec<u8>, Vec<(String, String)>) {
    let body = match (&entry["raw"], &entry["generate"]) {
        (Value::String(b64), _) => base64::engine::general_purpose::STANDARD.decode(b64).unwrap(),
        (_, g) if g["nested"].is_u64() => {
            let n = g["nested"].as_u64().unwrap() as usize;
            format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n)).into_bytes()
        }
        (_, g) if g["oversize"].is_u64() => vec![b' '; g["oversize"].as_u64().unwrap() as usize],
        _ => fill(&entry["body"].to_string()).into_bytes(),
    };
    let path = entry["path"].as_str().unwrap();
    let mut headers: Map<String, Value> = Map::new();
    if !SYNC.contains(&path) {
        headers.insert("taskuuid".into(), Value::String(uuid()));
        headers.insert("callbackurl".into(), Value::String(h.callbacks.url()));
    }
    if let Some(given) = entry["headers"].as_object() {
        for (k, v) in given {
            headers.insert(k.clone(), v.clone());
        }
    }
    let headers = headers.into_iter().filter_map(|(k, v)| v.as_str().map(|v| (k, fill(v)))).collect();
    (body, headers)
}

/// The error envelope the agent answered `entry` with, in the response or by callback.
async fn answer(h: &Host, entry: &Value, body: Vec<u8>, headers: &[(String, String)]) -> Value {
    let path = entry["path"].as_str().unwrap();
    let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, text) = h.post(path, &hdrs, body).await.unwrap_or_else(|e| panic!("{entry}: no answer: {e}"));
    assert!(status < 500, "{entry}: HTTP {status}: {text}");
    if status == 200 && text.is_empty() {
        let task = headers.iter().find(|(k, _)| k == "taskuuid").map(|(_, v)| v.clone()).unwrap();
        return h.callbacks.wait(&task, Duration::from_secs(120)).await.unwrap_or_else(|e| panic!("{entry}: {e}"));
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{entry}: HTTP {status} without an envelope ({e}): {text}"))
}

/// Starts an agent and replays the whole corpus against it, checking each entry; returns how
/// many entries were replayed.
async fn replay_corpus() -> usize {
    let h = Host::start_configured("management_hosts = [\"127.0.0.1\"]", "", &[]).await.unwrap();
    let image = BaseImage::create(&h, 16 << 20).unwrap();
    hostile_files(&h);
    let (root, image, vm, vol) = (h.root.display().to_string(), image.path.display().to_string(), uuid(), uuid());
    let fill = move |s: &str| {
        s.replace("{root}", &root).replace("{image}", &image).replace("{vm}", &vm).replace("{vol}", &vol)
    };
    let corpus = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/hostile.jsonl")).unwrap();
    let entries: Vec<Value> = corpus.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(entries.len() >= 200, "the corpus has {} entries", entries.len());

    let before = files(&h);
    // Domains there before the first command are someone else's, whatever their names.
    let others = all_domains();
    for entry in &entries {
        let (body, headers) = request(entry, &fill, &h);
        let names = &names(&body, &headers) - &others;
        let domains = our_domains(&h, &names);
        let r = answer(&h, entry, body, &headers).await;
        assert_eq!(r["success"], false, "{entry}: {r}");
        let description = r["errorCode"]["description"].as_str().unwrap_or_default();
        assert!(!description.is_empty() && r["error"].as_str().is_some_and(|e| !e.is_empty()), "{entry}: {r}");
        assert_eq!(h.post("/host/echo", &[], "").await.unwrap().0, 200, "the agent is up after {entry}");
        assert_eq!(files(&h), before, "{entry} changed the storage tree: {r}");
        assert_eq!(our_domains(&h, &names), domains, "{entry} changed the domains: {r}");
    }
    entries.len()
}

#[tokio::test]
async fn the_domain_check_counts_what_the_test_could_have_made_and_nothing_else() {
    let h = Host::start().await.unwrap();
    let [named, on_disk, logging, other] =
        ["named", "disk", "log", "other"].map(|n| format!("kvmagent-{n}-{}", uuid()));
    for vm in [&named, &on_disk, &logging, &other] {
        h.track_vm(vm);
    }
    let disk = format!(
        "<disk type='file' device='disk'><source file='{}'/><target dev='vda' bus='virtio'/></disk>",
        h.path("rootVolumes/x.qcow2").display()
    );
    let log = format!(
        "<serial type='file'><source path='{}'/><target port='0'/></serial>",
        h.state_dir.join("console/x.log").display()
    );
    for (name, devices) in [(&named, ""), (&on_disk, disk.as_str()), (&logging, log.as_str()), (&other, "")] {
        define(&tiny_domain_xml(name, devices)).unwrap();
    }
    let names = BTreeSet::from([named.clone(), "hostile".to_owned()]);
    assert_eq!(our_domains(&h, &names), BTreeSet::from([named, on_disk, logging]));
}

#[tokio::test]
async fn every_hostile_command_is_refused_in_band_and_changes_nothing() {
    let n = replay_corpus().await;
    println!("hostile input: {n} commands refused in-band, nothing changed");
}

#[tokio::test]
async fn hostile_commands_beside_an_unrelated_vm_that_comes_and_goes() {
    let mut other = UnrelatedVm::start(Duration::from_secs(900));
    let n = replay_corpus().await;
    let cycles = other.finish().unwrap_or_else(|e| panic!("the unrelated VM: {e}"));
    assert!(cycles > 0, "the unrelated VM never went through a full cycle");
    println!("hostile input: {n} commands refused in-band beside an unrelated VM ({cycles} cycles)");
}
