//! A wire fuzzer of our own: against the real agent with a fixture VM, seeded mutations of a
//! command for every path (wrong types, extreme numbers, huge and control-character strings,
//! path tricks, arrays for objects, unknown and missing fields, bad headers), sent in bursts,
//! with replays of earlier task ids. After each burst: the agent answers, every accepted task
//! got exactly one result (one more per replay), memory and the state directory stay bounded,
//! and no file, domain, libvirt secret or RBD image exists that no successful command named.
//! The fuzzed agent has the test Ceph cluster: the Ceph paths' commands name images `fz-<run>-<uuid>`
//! and read a source image the test made.
//!
//! CI runs a fixed seed (`KVMAGENT_FUZZ_REQUESTS`, default 2000); `KVMAGENT_FUZZ_SEED` picks
//! another, e.g. `KVMAGENT_FUZZ_REQUESTS=20000 KVMAGENT_FUZZ_SEED=7 cargo test -p
//! kvmagent-host-tests --test wire_fuzz -- --nocapture`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kvmagent_host_tests::ceph;
use kvmagent_host_tests::checks::{rss, tree_size};
use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::{agent_binary, uuid, Host, Rng};
use serde_json::{json, Map, Value};

const MIB: u64 = 1 << 20;
const BURST: usize = 16;

/// Strings that have broken agents: traversal, other files, protocols, control characters,
/// markup, sizes.
fn nasty_string(rng: &mut Rng, root: &str) -> String {
    let picks = [
        "../../etc/passwd".to_owned(),
        "/etc/passwd".to_owned(),
        format!("{root}/../outside.qcow2"),
        format!("{root}//fz/./x.qcow2"),
        format!("{root}/fz/\u{0}nul.qcow2"),
        "ceph://rbd/-rf".to_owned(),
        "nbd:127.0.0.1:10809".to_owned(),
        "json:{\"driver\":\"file\"}".to_owned(),
        "<domain/>&'\"".to_owned(),
        "line\nbreak\r\u{7}".to_owned(),
        "é".repeat(3000),
        "x".repeat(70_000),
        String::new(),
        uuid().to_uppercase(),
    ];
    rng.pick(&picks).clone()
}

fn random_value(rng: &mut Rng, root: &str, depth: usize) -> Value {
    match rng.below(if depth > 2 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.below(2) == 0),
        2 => json!(*rng.pick(&[-1i64, 0, 1, i64::MAX, i64::MIN])),
        3 => json!(*rng.pick(&[u64::MAX, 1 << 63, 18_446_744_073_709_551_615u64])),
        4 => Value::String(nasty_string(rng, root)),
        5 => Value::Array((0..rng.below(4)).map(|_| random_value(rng, root, depth + 1)).collect()),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(3) {
                m.insert(nasty_string(rng, root).chars().take(20).collect(), random_value(rng, root, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// Changes one thing somewhere in `v`.
fn mutate(rng: &mut Rng, v: &mut Value, root: &str) {
    match v {
        Value::Object(m) if !m.is_empty() && rng.below(3) > 0 => {
            let key = m.keys().nth(rng.below(m.len())).cloned().unwrap_or_default();
            match rng.below(5) {
                0 => drop(m.remove(&key)),
                1 => drop(m.insert(format!("unknown{}", rng.below(100)), random_value(rng, root, 0))),
                _ => mutate(rng, m.get_mut(&key).expect("a key of the map"), root),
            }
        }
        Value::Array(a) if !a.is_empty() && rng.below(2) == 0 => {
            let i = rng.below(a.len());
            mutate(rng, &mut a[i], root)
        }
        Value::Object(_) if rng.below(4) == 0 => *v = Value::Array(vec![v.clone()]),
        _ => *v = random_value(rng, root, 0),
    }
}

/// The libvirt secret a run may define, undefined when the run ends, however it ends.
struct Secret(String);

impl Drop for Secret {
    fn drop(&mut self) {
        let _ = std::process::Command::new("virsh").args(["secret-undefine", &self.0]).output();
    }
}

/// What the commands work on: the storage root, a cached image, an RBD image with a protected
/// snapshot `s` (`pool/name`), the fixture VM and a uuid for VMs the commands make.
struct Targets {
    root: String,
    image: String,
    rbd_source: String,
    vm: String,
    other_vm: String,
    /// The libvirt secret the fuzzer may define (removed at the end).
    secret: String,
    /// Names this run's RBD images (`fz-<run>-<uuid>`), so runs side by side tell theirs apart.
    run: String,
}

/// A command that would work on each path, from which mutations start.
fn template(path: &str, t: &Targets) -> Value {
    let u = uuid();
    let Targets { root, image, rbd_source, vm, other_vm, secret, run } = t;
    let new_image = format!("ceph://rbd/fz-{run}-{u}");
    match path {
        "/ceph/primarystorage/volume/createempty" => json!({"installPath": new_image, "size": MIB}),
        "/ceph/primarystorage/volume/clone" => {
            json!({"srcPath": format!("ceph://{rbd_source}@s"), "dstPath": new_image})
        }
        "/ceph/primarystorage/volume/cp" => json!({"srcPath": format!("ceph://{rbd_source}"), "dstPath": new_image}),
        "/ceph/primarystorage/snapshot/create" | "/ceph/primarystorage/snapshot/protect" => {
            json!({"snapshotPath": format!("ceph://{rbd_source}@fz-{u}")})
        }
        "/ceph/primarystorage/delete" => json!({"installPath": new_image}),
        "/ceph/primarystorage/volume/flatten" | "/ceph/primarystorage/getvolumesize" => {
            json!({"installPath": format!("ceph://{rbd_source}")})
        }
        "/localstorage/volume/createempty" => {
            json!({"installUrl": format!("{root}/fz/{u}/{u}.qcow2"), "size": MIB, "volumeUuid": u})
        }
        "/localstorage/volume/createvolumefromcache" => {
            json!({"templatePathInCache": image, "installUrl": format!("{root}/fz/{u}/r.qcow2"), "volumeUuid": u})
        }
        "/localstorage/checkbits" => json!({"path": image}),
        "/localstorage/volume/getsize" | "/localstorage/volume/getbackingchain" => json!({"installPath": image}),
        "/localstorage/delete" => json!({"path": format!("{root}/fz/{u}.qcow2")}),
        "/vm/create" => json!({
            "vm": {"vmInstanceUuid": other_vm, "vmName": "fz", "memory": 64 * MIB, "cpuNum": 1},
            "rootVolume": {"volumeUuid": u, "installPath": format!("{root}/fz/{u}/root.qcow2"), "imagePath": image},
            "strategy": "JustCreate"}),
        "/vm/flatten" => json!({"vmUuid": vm, "dryRun": true}),
        "/vm/snapshotgroup/take" => json!({"vmUuid": vm}),
        "/vm/clone" => json!({"vmUuid": vm, "clones": [{"uuid": other_vm, "name": "fz"}], "strategy": "JustCreate"}),
        "/vm/stop" | "/vm/destroy" => json!({"uuid": other_vm, "type": "cold"}),
        "/host/connect" => json!({"hostUuid": uuid(), "sendCommandUrl": "http://127.0.0.1:1/x"}),
        "/vm/createcephsecret" => {
            json!({"userKey": "QVFCSmFrMWxBQUFBQUJBQWhUcjBaaVdDOHZBQzVHNVhqV2c9PQ==", "uuid": secret})
        }
        _ => json!({}),
    }
}

fn files(dir: &Path, out: &mut BTreeSet<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files(&e.path(), out);
        } else {
            out.insert(e.path());
        }
    }
}

/// Every string inside `v` (keys too), for "was this named by a successful command".
fn strings(v: &Value, out: &mut HashSet<String>) {
    match v {
        Value::String(s) => drop(out.insert(s.clone())),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.iter().for_each(|(k, x)| {
            out.insert(k.clone());
            strings(x, out)
        }),
        _ => {}
    }
}

#[tokio::test]
async fn seeded_mutations_of_every_command_keep_the_agent_sound() {
    let requests: usize = std::env::var("KVMAGENT_FUZZ_REQUESTS").ok().and_then(|n| n.parse().ok()).unwrap_or(2000);
    let seed: u64 = std::env::var("KVMAGENT_FUZZ_SEED").ok().and_then(|n| n.parse().ok()).unwrap_or(0x5eed_f022);
    println!("wire fuzz: {requests} requests, KVMAGENT_FUZZ_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let secret_guard = Secret(uuid::Uuid::new_v4().to_string());
    let secret = secret_guard.0.clone();
    let run = uuid()[..8].to_owned();
    let h = Host::start_with(&ceph::agent_config()).await.unwrap();
    let root = h.root.display().to_string();
    let image = BaseImage::create(&h, 4 * MIB).unwrap().path.display().to_string();
    let rbd_source = format!("rbd/fzsrc-{}", uuid());
    ceph::rbd(&["create", "--size", "4", &rbd_source]).unwrap();
    ceph::rbd(&["snap", "create", &format!("{rbd_source}@s")]).unwrap();
    ceph::rbd(&["snap", "protect", &format!("{rbd_source}@s")]).unwrap();
    let made = ceph::MadeImages(vec![rbd_source.clone()]);
    let (vm, other_vm) = (uuid(), uuid());
    h.track_vm(&vm);
    h.track_vm(&other_vm);
    let fixture = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "fixture", "memory": 64 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("{root}/fixture/root.qcow2"), "imagePath": image},
        "strategy": "JustCreate"});
    h.call_ok("/vm/create", &fixture).await.unwrap();
    let targets = Targets {
        root: root.clone(),
        image,
        rbd_source,
        vm: vm.clone(),
        other_vm: other_vm.clone(),
        secret: secret.clone(),
        run: run.clone(),
    };

    let out = std::process::Command::new(agent_binary()).arg("paths").output().unwrap();
    let paths: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(style, _)| *style == "Async")
        .map(|(_, p)| p.to_owned())
        .collect();
    assert!(paths.len() > 30, "{paths:?}");

    let mut before = BTreeSet::new();
    files(&h.root, &mut before);
    // The agent loads Ceph's libraries and opens its cluster connection on the first RBD call:
    // a one-time cost, in place before the baseline so that the bound measures growth.
    h.call_ok("/ceph/primarystorage/getvolumesize", &json!({"installPath": format!("ceph://{}", targets.rbd_source)}))
        .await
        .unwrap();
    let baseline = rss(h.pid().unwrap());
    let mut named: HashSet<String> = HashSet::new();
    strings(&fixture, &mut named);
    let mut sent: Vec<(String, String, Value)> = Vec::new();
    let mut expected: HashMap<String, usize> = HashMap::new();
    let mut elsewhere: Vec<(String, Value)> = Vec::new();
    // The commands of the last two bursts, whatever became of them (for a failure's report).
    let mut recent: std::collections::VecDeque<(String, String, Value)> = Default::default();
    let (mut touched, mut taken): (Vec<String>, Vec<(String, Value)>) = (Vec::new(), Vec::new());
    let cb = h.callbacks.url();
    let mut rbd_images_seen = BTreeSet::new();
    // Images a run killed before its cleanup left are not this run's.
    let fuzz_images =
        || ceph::images("rbd").into_iter().filter(|i| i.starts_with(&format!("fz-{run}-"))).collect::<BTreeSet<_>>();
    let rbd_before = fuzz_images();

    let mut done = 0;
    while done < requests {
        let mut burst = Vec::new();
        for _ in 0..BURST.min(requests - done) {
            done += 1;
            // A replay of an earlier task, or a new (mutated) command.
            if !sent.is_empty() && rng.below(12) == 0 {
                let (task, path, body) = sent[rng.below(sent.len())].clone();
                let task = if rng.below(2) == 0 { task.to_uppercase() } else { task };
                burst.push((task, path, body, true));
                continue;
            }
            let path = rng.pick(&paths).clone();
            let mut body = template(&path, &targets);
            for _ in 0..rng.below(3) {
                mutate(&mut rng, &mut body, &root);
            }
            burst.push((uuid(), path, body, false));
        }
        let h = &h;
        // Now and then a bad header: a callback on port 0, a task id one digit too long, or a
        // callback to another host (accepted by a fresh agent, but then never ours to count).
        let headers: Vec<u64> = burst.iter().map(|_| rng.next_u64() % 20).collect();
        let answers = futures::future::join_all(burst.iter().zip(&headers).map(|((task, path, body, _), bad)| {
            let callback = match bad {
                0 => "http://127.0.0.1:0/cb".to_owned(),
                1 => "http://127.0.0.1:1/elsewhere".to_owned(),
                _ => cb.clone(),
            };
            let task = if *bad == 2 { format!("{task}0") } else { task.clone() };
            async move {
                h.post(path, &[("taskuuid", task.as_str()), ("callbackurl", callback.as_str())], body.to_string()).await
            }
        }))
        .await;
        for (((task, path, body, replay), answer), bad) in burst.into_iter().zip(answers).zip(headers) {
            let (status, text) = answer.unwrap_or_else(|e| panic!("{path}: no answer: {e}"));
            if recent.len() == 2 * BURST {
                recent.pop_front();
            }
            recent.push_back((task.to_lowercase(), path.clone(), body.clone()));
            assert!(status < 500 || status == 503, "{path} {body}: HTTP {status}: {text}");
            if status == 200 && text.is_empty() && bad == 1 {
                elsewhere.push((task.to_lowercase(), body));
                continue;
            }
            if status == 200 && text.is_empty() {
                let key = task.to_lowercase();
                *expected.entry(key.clone()).or_default() += 1;
                touched.push(key.clone());
                taken.push((key.clone(), body.clone()));
                if !replay {
                    sent.push((key, path, body));
                }
            } else {
                let envelope: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{path}: HTTP {status} without an envelope ({e}): {text}"));
                assert_eq!(envelope["success"], false, "{path}: {envelope}");
            }
        }
        // Every task this burst touched gets exactly its results: one, and one more per replay.
        for task in touched.drain(..) {
            let n = &expected[&task];
            let task = &task;
            let what = sent.iter().find(|(t, _, _)| t == task).map(|(_, p, b)| format!("{p} {b}")).unwrap_or_default();
            let got = match h.callbacks.wait_count(task, *n, Duration::from_secs(120)).await {
                Ok(got) => got,
                Err(e) => panic!("{what}: {e}; the agent says {:?}", h.get(&format!("/task/{task}")).await),
            };
            assert_eq!(got.len(), *n, "task {task} ({what}): {got:?}");
        }
        // Every successful result names what it made: a replay of a task the agent has forgotten
        // (past `tasks.max_finished`) runs again, and may succeed where the first run failed.
        for (task, body) in taken.drain(..) {
            for r in h.callbacks.results(&task).unwrap_or_default().iter().filter(|r| r["success"] == true) {
                strings(&body, &mut named);
                strings(r, &mut named);
            }
        }
        // Results posted elsewhere are read with `GET /task`, once finished.
        for (task, body) in elsewhere.drain(..) {
            let result = loop {
                let (_, text) = h.get(&format!("/task/{task}")).await.unwrap();
                let status: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if status["state"] != "running" {
                    break status["result"].clone();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if result["success"] == true {
                strings(&body, &mut named);
                strings(&result, &mut named);
            }
        }
        assert_eq!(h.post("/host/echo", &[], "").await.unwrap().0, 200, "the agent is up");
        let now = rss(h.pid().unwrap());
        assert!(now < baseline + 100 * MIB, "RSS grew from {baseline} to {now} bytes");
        assert!(tree_size(&h.state_dir) < 64 * MIB, "the state directory grew past 64 MiB");
        let mut after = BTreeSet::new();
        files(&h.root, &mut after);
        for f in after.difference(&before) {
            let shown = f.display().to_string();
            if !named.contains(&shown) {
                // What ran since the last check: the commands of the last bursts, with their
                // results, and what the agent warned about.
                let recent: Vec<String> = recent
                    .iter()
                    .map(|(t, p, b)| {
                        format!("{t} {p} {b}\n  -> {:?}", h.callbacks.results(t)).chars().take(3000).collect()
                    })
                    .collect();
                let log = h.log();
                let warned: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
                panic!(
                    "{shown} exists, but no successful command named it; recent commands:\n{}\nthe agent's last warnings:\n{}",
                    recent.join("\n"),
                    warned[warned.len().saturating_sub(40)..].join("\n")
                );
            }
        }
        before = after;
        // Domains and secrets (each a `virsh` call, so every few bursts and at the end): only
        // those of the uuids the fuzzer sends may appear, and only once a successful command
        // named them.
        if !(done / BURST).is_multiple_of(8) && done < requests {
            continue;
        }
        for d in [&vm, &other_vm] {
            if kvmagent_host_tests::checks::domstate(d).is_some() {
                assert!(named.contains(d.as_str()), "domain {d} exists, but no successful command named it");
            }
        }
        let defined = std::process::Command::new("virsh").args(["secret-dumpxml", &secret]).output();
        if defined.is_ok_and(|o| o.status.success()) {
            assert!(named.contains(&secret), "secret {secret} exists, but no successful command named it");
        }
        for image in fuzz_images().difference(&rbd_before) {
            let url = format!("ceph://rbd/{image}");
            assert!(named.contains(&url), "RBD image {url} exists, but no successful command named it");
            rbd_images_seen.insert(url);
        }
    }
    let fuzzed = fuzz_images().difference(&rbd_before).map(|i| format!("rbd/{i}")).collect();
    drop(ceph::MadeImages(fuzzed));
    drop(made);
    drop(secret_guard);
    println!(
        "wire fuzz: {done} requests, {} accepted tasks, {} RBD images made, agent sound",
        expected.len(),
        rbd_images_seen.len()
    );
}
