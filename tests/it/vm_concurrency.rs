//! Concurrency on one running VM: snapshot groups, linked clones (root only, and with the data
//! volume), backups (full, then incremental into the same group) and live flattens, sent all
//! at once, round after round. Commands may be refused with a conflict, but whatever order
//! they ran in, the host must end consistent (see `kvmagent_host_tests::consistency`): the
//! VM's record names the files its domain really uses, every chain is clean, and no volume
//! file is left that nothing references.

use std::time::Duration;

use kvmagent_host_tests::checks::{domstate, guest_disk_flush};
use kvmagent_host_tests::consistency::{self, Tally};
use kvmagent_host_tests::images::BaseImage;
use kvmagent_host_tests::sources::SourceVm;
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// Rounds of commands; each round's are sent at once and all answered before the next.
const ROUNDS: usize = 12;
/// Snapshot groups and linked clones per round (each freezes the VM's files).
const FREEZES: usize = 2;

/// Round `r`'s commands against VM `vm`, each round led by another kind of command; clones get
/// uuids made here (tracked for clean-up).
fn round(h: &Host, vm: &str, r: usize, backup_group: &Option<String>) -> Vec<(&'static str, Value)> {
    let mut cmds = Vec::new();
    for i in 0..FREEZES {
        cmds.push(("/vm/snapshotgroup/take", json!({"vmUuid": vm})));
        let clone = uuid();
        h.track_vm(&clone);
        // Root only, or with the data volume: a clone may freeze some of the VM's disks.
        cmds.push((
            "/vm/clone",
            json!({"vmUuid": vm, "mode": "linked", "full": i % 2 == 1, "strategy": "CreateStopped",
                   "clones": [{"uuid": clone}]}),
        ));
    }
    cmds.push(match backup_group {
        Some(g) => ("/vm/backup", json!({"vmUuid": vm, "mode": "incremental", "groupUuid": g})),
        None => ("/vm/backup", json!({"vmUuid": vm, "mode": "full", "groupUuid": uuid()})),
    });
    cmds.push(("/vm/flatten", json!({"vmUuid": vm})));
    let n = cmds.len();
    cmds.rotate_left(r % n);
    cmds
}

#[tokio::test]
async fn snapshot_groups_clones_backups_and_flattens_at_once_leave_the_vm_consistent() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let src = SourceVm::local(&h, &base, true).await.unwrap();
    let start = std::time::Instant::now();
    let mut tally = Tally::default();
    let mut backup_group = None;
    for r in 0..ROUNDS {
        // The guest writes between rounds: a lost overlay would lose these.
        src.write_both(0x20 + r as u8).unwrap();
        let cmds = round(&h, &src.vm, r, &backup_group);
        let h = &h;
        let sends = cmds.iter().map(|(path, body)| async move { h.send(path, body).await.map(|t| (*path, body, t)) });
        let tasks = futures::future::try_join_all(sends).await.unwrap();
        for (path, body, task) in &tasks {
            let result = h.callbacks.wait(task, Duration::from_secs(300)).await.unwrap();
            tally.add(path, task, &result);
            if *path == "/vm/backup" && body["mode"] == "full" && result["success"] == true {
                backup_group = body["groupUuid"].as_str().map(str::to_owned);
            }
        }
        for (path, _, task) in &tasks {
            let n = h.callbacks.results(task).map_or(0, |r| r.len());
            assert_eq!(n, 1, "{path} (task {task}) got {n} callbacks");
        }
    }
    println!(
        "{ROUNDS} rounds in {:?}: successes {:?}, conflicts {:?}, other failures {}",
        start.elapsed(),
        tally.successes,
        tally.conflicts,
        tally.failures.len()
    );

    assert_eq!(domstate(&src.vm).as_deref(), Some("running"), "the VM ran through it all");
    for alias in ["virtio-disk0", "virtio-disk1"] {
        guest_disk_flush(&src.vm, alias).unwrap();
    }
    let mut problems = consistency::problems(&h).unwrap();
    problems.extend(tally.failures.iter().map(|f| format!("failed, and not by a conflict: {f}")));
    assert!(
        problems.is_empty(),
        "{} problem(s) after {ROUNDS} rounds (successes {:?}, conflicts {:?}):\n  {}",
        problems.len(),
        tally.successes,
        tally.conflicts,
        problems.join("\n  ")
    );
    for path in ["/vm/snapshotgroup/take", "/vm/clone", "/vm/backup", "/vm/flatten"] {
        assert!(tally.succeeded(path) > 0, "no {path} succeeded: {:?}", tally.successes);
    }
}
