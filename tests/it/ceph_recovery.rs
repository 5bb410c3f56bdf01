//! A kill of the agent while it has an RBD image open, against the real one-node cluster
//! (tests/ceph/start.sh): the killed client's watch stays on the half-made image, and the
//! restarted agent blocklists that client (the address it recorded at connect) before its
//! recovery removes the image, instead of waiting for the cluster to time the watch out.

use std::time::Duration;

use kvmagent_host_tests::ceph::{self, agent_config, info, qemu_name, rbd, MadeImages};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// The addresses of the clients watching `spec` (`rbd status`); empty when it does not exist.
fn watchers(spec: &str) -> Vec<String> {
    let Ok(out) = rbd(&["status", "--format", "json", spec]) else { return Vec::new() };
    let status: Value = serde_json::from_str(&out).unwrap();
    let list = status["watchers"].as_array().cloned().unwrap_or_default();
    list.iter().filter_map(|w| w["address"].as_str().map(str::to_owned)).collect()
}

/// The client addresses the agent recorded in its state directory.
fn recorded_clients(h: &Host) -> Vec<String> {
    let files = std::fs::read_dir(h.state_dir.join("ceph-clients")).into_iter().flatten().flatten();
    let records = files.filter(|e| e.path().extension().is_some_and(|x| x == "json"));
    let read = |p: std::path::PathBuf| serde_json::from_slice::<Value>(&std::fs::read(p).unwrap()).unwrap();
    records.filter_map(|e| read(e.path())["addr"].as_str().map(str::to_owned)).collect()
}

fn blocklisted() -> String {
    ceph::ceph(&["osd", "blocklist", "ls", "--format", "json"]).unwrap()
}

#[tokio::test]
async fn a_kill_during_a_thick_rbd_create_is_rolled_back_after_blocklisting_the_dead_client() {
    // Real data in the image, so that the thick root's flatten keeps the clone open a while.
    let image = format!("rbd/watched-src-{}", uuid());
    let _made = MadeImages(vec![image.clone()]);
    rbd(&["create", "--size", "384M", &image]).unwrap();
    let fill = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P 7 0 {}", 384 * MIB), &qemu_name(&image)])
        .output()
        .unwrap();
    assert!(fill.status.success(), "{}", String::from_utf8_lossy(&fill.stderr));
    rbd(&["snap", "create", &format!("{image}@s")]).unwrap();

    let mut h = Host::start_with(&agent_config()).await.unwrap();
    let (vm, root) = (uuid(), format!("rbd/vol-{}", uuid()));
    h.track_vm(&vm);
    let cmd = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "t-rbd", "memory": 128 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": uuid(), "installPath": format!("ceph://{root}"),
                       "imagePath": format!("ceph://{image}@s"), "provisioning": "thick"},
        "ceph": {"monInfo": [{"hostname": "127.0.0.1", "port": 6789}]},
        "strategy": "JustCreate",
    });
    let _made_root = MadeImages(vec![root.clone()]);
    let task = h.send("/vm/create", &cmd).await.unwrap();

    // The clone is made, then flattened with the agent's client holding it open. The agent is
    // frozen while the test looks, so a watch seen is still held when the kill lands (looking at
    // a running agent raced the end of the flatten).
    let pid = h.pid().unwrap() as i32;
    let mut held = Vec::new();
    while held.is_empty() {
        assert!(
            h.callbacks.results(&task).is_none(),
            "the create finished before its image was seen watched (make the source larger); log:\n{}",
            h.log()
        );
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        held = watchers(&root);
        if held.is_empty() {
            unsafe { libc::kill(pid, libc::SIGCONT) };
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    h.kill_agent().unwrap();
    let ours = recorded_clients(&h);
    assert_eq!(ours.len(), 1, "the agent recorded its one connection: {ours:?}");
    let dead = ours[0].clone();
    assert_eq!(held, ours, "the watcher is the agent's recorded client");
    assert_eq!(watchers(&root), ours, "the killed client's watch outlives it");

    h.restart_agent().unwrap();
    let report = h.recovery_report().await;
    let rolled_back = report["rolledBack"].as_array().unwrap();
    assert!(
        rolled_back.iter().any(|r| r["taskUuid"] == json!(task) && r["failures"] == json!([])),
        "{report}; log:\n{}",
        h.log()
    );
    assert!(info(&root).is_none(), "the half-made root is gone");
    assert_eq!(report["blocklistedClients"], json!([dead]), "{report}");
    assert!(blocklisted().contains(&format!("\"{dead}\"")), "{dead} is blocklisted: {}", blocklisted());
    let log = h.log();
    assert!(log.contains("blocklisted the previous run's Ceph client"), "{log}");
    assert!(!log.contains("waiting for it to expire"), "the removal did not wait out the watch:\n{log}");
    let result = h.callbacks.wait(&task, Duration::from_secs(300)).await.unwrap();
    assert_eq!(result["success"], json!(false), "{result}");
    // This run connected anew: only its own client is on record now.
    assert!(!recorded_clients(&h).contains(&dead), "the dead client's record is done with");
    let _ = ceph::ceph(&["osd", "blocklist", "rm", &dead]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_librbd_client_records_itself_and_never_blocklists_its_own_address() {
    use kvmagent::ceph::librbd::RbdLib;
    use kvmagent::ceph::rbd::{Connection, Rbd, CALL_TIMEOUT};
    use kvmagent::stop::Stop;

    let state = tempfile::tempdir().unwrap();
    let connection = Connection { conf: ceph::conf(), id: "admin".into(), keyring: None, call_timeout: CALL_TIMEOUT };
    let client = RbdLib::recording_clients(connection, state.path().to_path_buf());
    let image = format!("rbd/self-{}", uuid());
    let _made = MadeImages(vec![image.clone()]);
    let stop = Stop::new();
    client.create(&kvmagent::ceph::path::CephPath::parse(&image).unwrap(), MIB, &stop).await.unwrap();

    let records = kvmagent::ceph::clients::recorded(state.path());
    assert_eq!(records.len(), 1, "the connection is recorded as it opens: {records:?}");
    let me = &records[0].client;
    let fsid: Value = serde_json::from_str(&ceph::ceph(&["fsid", "--format", "json"]).unwrap()).unwrap();
    assert_eq!(fsid["fsid"].as_str(), Some(me.fsid.as_str()));
    let err = client.blocklist(&me.addr, Duration::from_secs(60), &stop).await.unwrap_err();
    assert!(err.to_string().contains("own connection"), "{err}");
    assert!(!blocklisted().contains(&format!("\"{}\"", me.addr)), "{}", blocklisted());
}
