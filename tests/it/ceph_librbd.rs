//! The agent's in-process librbd client (`RbdLib`) against the real test cluster
//! (tests/ceph/start.sh): every trait call, each checked with the `rbd` command line, and the
//! errors the agent relies on (not found, exists, busy, stopped).

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvmagent::ceph::librbd::RbdLib;
use kvmagent::ceph::path::CephPath;
use kvmagent::ceph::rbd::{Connection, Rbd, RbdCli, CALL_TIMEOUT};
use kvmagent::stop::{Stop, StopReason, Stoppable};
use kvmagent_host_tests::ceph::{self, info, MadeImages};
use kvmagent_host_tests::uuid;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn connection(call_timeout: Duration) -> Connection {
    Connection { conf: ceph::conf(), id: "admin".into(), keyring: None, call_timeout }
}

fn client() -> RbdLib {
    RbdLib::new(connection(CALL_TIMEOUT))
}

fn path(spec: &str) -> CephPath {
    CephPath::parse(spec).unwrap()
}

/// `rbd du` of the image's head, as the CLI computes it.
fn du(spec: &str) -> u64 {
    let v: Value = serde_json::from_str(&ceph::rbd(&["du", "--format", "json", spec]).unwrap()).unwrap();
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["snapshot"].is_null())
        .map(|i| i["used_size"].as_u64().unwrap())
        .sum()
}

/// Keeps `spec` open (watched) by a python-rbd client until the returned child's stdin closes
/// (Debian's python3-rbd, which ceph-common brings, so the system's Python).
fn hold_open(spec: &str) -> std::process::Child {
    let (pool, image) = spec.split_once('/').unwrap();
    let script = format!(
        "import rados, rbd, sys\n\
         c = rados.Rados(conffile='{}'); c.connect(); io = c.open_ioctx('{pool}')\n\
         img = rbd.Image(io, '{image}'); print('open', flush=True); sys.stdin.read(); img.close(); io.close(); c.shutdown()\n",
        ceph::conf().display()
    );
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "open", "the python client opened {spec}");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_snapshots_clones_flatten_copy_watchers_and_errors() {
    let rbd = client();
    let stop = Stop::new();
    let id = uuid();
    let (base, clone, copy) = (format!("rbd/lib-{id}"), format!("rbd/lib-c-{id}"), format!("rbd/lib-cp-{id}"));
    let _made = MadeImages(vec![base.clone(), clone.clone(), copy.clone()]);
    let (img, snap) = (path(&base), path(&format!("{base}@s1")));

    rbd.create(&img, 10 * MIB + 1, &stop).await.unwrap();
    assert_eq!(info(&base).unwrap()["size"].as_u64(), Some(11 * MIB), "sizes are whole MiB, as rbd create makes them");
    assert!(rbd.create(&img, MIB, &stop).await.unwrap_err().is_exists());
    let i = rbd.info(&img, &stop).await.unwrap();
    assert_eq!((i.size, i.object_size, i.parent.is_none()), (11 * MIB, 4 * MIB, true));
    ceph::write(&base, 0, &[0x42; 4096]);
    ceph::write(&base, 9 * MIB, &[0x43; 4096]);
    assert_eq!(rbd.used(&img, &stop).await.unwrap(), du(&base), "used is what rbd du says");
    assert_eq!(rbd.data_objects(&img, 4 * MIB, &stop).await.unwrap(), 2);

    rbd.resize(&img, 12 * MIB, &stop).await.unwrap();
    assert_eq!(info(&base).unwrap()["size"].as_u64(), Some(12 * MIB));
    assert!(rbd.resize(&img, MIB, &stop).await.is_err(), "never shrinks");
    assert_eq!(info(&base).unwrap()["size"].as_u64(), Some(12 * MIB));

    rbd.snap_create(&snap, &stop).await.unwrap();
    assert!(rbd.snap_create(&snap, &stop).await.unwrap_err().is_exists());
    let protected = |s: Vec<kvmagent::ceph::rbd::Snapshot>| -> Vec<(String, Option<String>)> {
        s.into_iter().map(|s| (s.name, s.protected)).collect()
    };
    assert_eq!(protected(rbd.snapshots(&img, &stop).await.unwrap()), [("s1".into(), Some("false".into()))]);
    rbd.snap_protect(&snap, &stop).await.unwrap();
    assert_eq!(protected(rbd.snapshots(&img, &stop).await.unwrap()), [("s1".into(), Some("true".into()))]);
    let listed: Value = serde_json::from_str(&ceph::rbd(&["snap", "ls", "--format", "json", &base]).unwrap()).unwrap();
    assert_eq!(listed[0]["protected"], "true", "the cluster agrees");
    assert_eq!(rbd.used(&img, &stop).await.unwrap(), du(&base), "nothing written since the snapshot");

    rbd.clone_snapshot(&snap, &path(&clone), &stop).await.unwrap();
    let parent = &info(&clone).unwrap()["parent"];
    assert_eq!((parent["image"].as_str(), parent["snapshot"].as_str()), (Some(&base[4..]), Some("s1")));
    let p = rbd.info(&path(&clone), &stop).await.unwrap().parent.unwrap();
    assert_eq!((p.pool.as_str(), p.image.as_str(), p.snapshot.as_str()), ("rbd", &base[4..], "s1"));
    assert_eq!(rbd.children(&snap, &stop).await.unwrap(), [path(&clone)]);
    assert_eq!(rbd.data_objects(&path(&clone), 4 * MIB, &stop).await.unwrap(), 2, "the parent's objects count");
    assert!(rbd.snap_unprotect(&snap, &stop).await.unwrap_err().is_busy(), "a clone depends on it");

    let percentages = Arc::new(Mutex::new(Vec::new()));
    let seen = percentages.clone();
    rbd.flatten(&path(&clone), &stop, &mut move |p| seen.lock().unwrap().push(p)).await.unwrap();
    assert!(info(&clone).unwrap().get("parent").is_none(), "flattened: {}", info(&clone).unwrap());
    let pcts = percentages.lock().unwrap().clone();
    assert!(!pcts.is_empty() && pcts.iter().all(|p| *p <= 100), "progress reported: {pcts:?}");
    assert!(rbd.children(&snap, &stop).await.unwrap().is_empty());

    rbd.deep_copy(&img, &path(&copy), &stop).await.unwrap();
    let copied: Value = serde_json::from_str(&ceph::rbd(&["snap", "ls", "--format", "json", &copy]).unwrap()).unwrap();
    assert_eq!(copied[0]["name"], "s1", "a deep copy carries the snapshots");

    assert_eq!(rbd.watchers(&img, &stop).await.unwrap(), 0);
    let mut holder = hold_open(&clone);
    assert_eq!(rbd.watchers(&path(&clone), &stop).await.unwrap(), 1, "the python client watches it");
    assert!(rbd.remove(&path(&clone), &stop).await.unwrap_err().is_busy(), "open elsewhere: busy");
    assert!(info(&clone).is_some(), "and still there");
    holder.stdin.take().unwrap().write_all(b"").unwrap();
    assert!(holder.wait().unwrap().success());
    assert_eq!(rbd.watchers(&path(&clone), &stop).await.unwrap(), 0);
    rbd.remove(&path(&clone), &stop).await.unwrap();
    assert!(info(&clone).is_none());

    let missing = path(&format!("rbd/lib-missing-{id}"));
    assert!(rbd.info(&missing, &stop).await.unwrap_err().is_not_found());
    assert!(!rbd.exists(&missing, &stop).await.unwrap());
    assert!(rbd.remove(&missing, &stop).await.unwrap_err().is_not_found());
    assert!(rbd.info(&path(&format!("{base}@nope")), &stop).await.unwrap_err().is_not_found());
    assert!(rbd.info(&path(&format!("nopool-{id}/x")), &stop).await.unwrap_err().is_not_found(), "no such pool");

    rbd.snap_unprotect(&snap, &stop).await.unwrap();
    rbd.snap_remove(&snap, &stop).await.unwrap();
    assert!(rbd.snapshots(&img, &stop).await.unwrap().is_empty());
    rbd.trash_move(&img, 3600, &stop).await.unwrap();
    assert!(info(&base).is_none(), "moved to the trash");
    let trash: Value = serde_json::from_str(&ceph::rbd(&["trash", "ls", "--format", "json", "rbd"]).unwrap()).unwrap();
    let entry = trash.as_array().unwrap().iter().find(|t| t["name"] == base[4..]).expect("in the trash").clone();
    ceph::rbd(&["trash", "rm", "--force", "--no-progress", &format!("rbd/{}", entry["id"].as_str().unwrap())]).unwrap();

    let stopped = Stop::new();
    stopped.fire(StopReason::Cancelled);
    let e = rbd.create(&path(&format!("rbd/lib-never-{id}")), MIB, &stopped).await.unwrap_err();
    assert!(e.was_stopped(), "{e}");
    assert!(info(&format!("rbd/lib-never-{id}")).is_none(), "a stopped task makes no call");
}

/// A size whose whole MiB overflow 64 bits is refused before librbd is asked (it wrapped to an
/// empty image), and an empty image's usage is 0 (librbd asserts, aborting the agent, when asked
/// for the extents of one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_size_past_64_bits_is_refused_and_an_empty_image_is_read() {
    let rbd = client();
    let stop = Stop::new();
    let id = uuid();
    let (huge, empty) = (format!("rbd/lib-huge-{id}"), format!("rbd/lib-empty-{id}"));
    let _made = MadeImages(vec![huge.clone(), empty.clone()]);
    let e = rbd.create(&path(&huge), u64::MAX, &stop).await.unwrap_err();
    assert!(e.to_string().contains("more than an image can hold"), "{e}");
    assert!(info(&huge).is_none(), "nothing is made");
    ceph::rbd(&["create", "--size", "0", &empty]).unwrap();
    assert_eq!(rbd.used(&path(&empty), &stop).await.unwrap(), 0);
    assert_eq!(rbd.data_objects(&path(&empty), 4 * MIB, &stop).await.unwrap(), 0);
    let e = rbd.resize(&path(&empty), u64::MAX, &stop).await.unwrap_err();
    assert!(e.to_string().contains("more than an image can hold"), "{e}");
    assert_eq!(info(&empty).unwrap()["size"].as_u64(), Some(0), "unchanged");
}

/// A flatten is aborted from librbd's progress callback once the task stops: the clone keeps
/// its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_flatten_aborts_and_keeps_the_parent() {
    let rbd = client();
    let id = uuid();
    let (base, clone) = (format!("rbd/libf-{id}"), format!("rbd/libf-c-{id}"));
    let _made = MadeImages(vec![base.clone(), clone.clone()]);
    let snap = format!("{base}@s");
    let stop = Stop::new();
    // 65536 objects: the flatten walks them all, so it is still running when the stop that its
    // first progress report fires reaches its next callback.
    rbd.create(&path(&base), 256 << 30, &stop).await.unwrap();
    rbd.snap_create(&path(&snap), &stop).await.unwrap();
    rbd.snap_protect(&path(&snap), &stop).await.unwrap();
    rbd.clone_snapshot(&path(&snap), &path(&clone), &stop).await.unwrap();

    let stopper = stop.clone();
    let e = rbd.flatten(&path(&clone), &stop, &mut move |_| stopper.fire(StopReason::Cancelled)).await.unwrap_err();
    assert!(e.was_stopped(), "{e}");
    assert_eq!(info(&clone).unwrap()["parent"]["snapshot"], "s", "still a clone");
}

/// A pool of its own over its quota, which the monitors report as `POOL_FULL`; deleted on drop.
struct FullPool(String);

impl FullPool {
    fn make() -> FullPool {
        let pool = FullPool(format!("full-{}", &uuid()[..8]));
        let name = pool.0.as_str();
        ceph::ceph(&["osd", "pool", "create", name, "8", "8"]).unwrap();
        ceph::ceph(&["osd", "pool", "application", "enable", name, "rbd"]).unwrap();
        ceph::ceph(&["osd", "pool", "set-quota", name, "max_bytes", "1"]).unwrap();
        let mut object = tempfile::NamedTempFile::new().unwrap();
        object.write_all(&[7; 4096]).unwrap();
        let put = Command::new("rados")
            .arg("-c")
            .arg(ceph::conf())
            .args(["-p", name, "put", "fill"])
            .arg(object.path())
            .status()
            .unwrap();
        assert!(put.success(), "rados put into {name}");
        // The monitors see the pool's bytes with the next statistics the OSD sends.
        let deadline = Instant::now() + Duration::from_secs(90);
        while !ceph::ceph(&["health", "detail"]).unwrap().contains(&format!("pool '{name}' is full")) {
            assert!(Instant::now() < deadline, "the monitors never reported pool {name} full");
            std::thread::sleep(Duration::from_millis(500));
        }
        pool
    }
}

impl Drop for FullPool {
    fn drop(&mut self) {
        let _ = ceph::ceph(&["osd", "pool", "delete", &self.0, &self.0, "--yes-i-really-really-mean-it"]);
    }
}

/// Writes into a full pool wait rather than fail: a call that gives up says the pool is full
/// and what to do, from the monitors, which still answer; in-process and by the command line.
#[tokio::test]
async fn a_call_that_a_full_pool_holds_up_times_out_naming_it() {
    let pool = FullPool::make();
    let after = Duration::from_secs(3);
    let clients: [Box<dyn Rbd>; 2] = [Box::new(RbdLib::new(connection(after))), Box::new(RbdCli(connection(after)))];
    for rbd in clients {
        let image = path(&format!("{}/{}", pool.0, uuid()));
        let e = rbd.create(&image, MIB, &Stop::new()).await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("did not answer within 3s; the cluster reports POOL_FULL"), "{text}");
        assert!(text.contains("raise the pool's quota"), "{text}");
        let e = kvmagent::error::AgentError::from(e);
        assert_eq!(e.kind, kvmagent::error::ErrorKind::Timeout, "{e}");
    }
}
