//! `kvmagent smoke` against the real agent: every step passes and nothing it made is left;
//! interrupted half-way, it still removes everything and exits non-zero.

use std::path::Path;

use kvmagent_host_tests::checks::domstate;
use kvmagent_host_tests::cli::texts;
use kvmagent_host_tests::Host;
use tokio::io::{AsyncBufReadExt, BufReader};

/// The VM uuids and the directory smoke names on its first line
/// (`smoke-<id>: vms <uuid>... in <dir>`).
fn announced(first_line: &str) -> (Vec<String>, String) {
    let (_, rest) = first_line.split_once(": vms ").expect("smoke announces its VMs first");
    let (vms, dir) = rest.rsplit_once(" in ").expect("and its directory");
    (vms.split_whitespace().map(str::to_owned).collect(), dir.to_owned())
}

/// Nothing of the pass is left: no domain, no VM record, no console log, no directory.
fn assert_nothing_left(h: &Host, vms: &[String], dir: &str) {
    assert_eq!(vms.len(), 4, "{vms:?}");
    for vm in vms {
        assert_eq!(domstate(vm), None, "domain {vm} is gone");
        assert!(!h.state_dir.join(format!("vms/{vm}.json")).exists(), "record of {vm} is gone");
        assert!(!h.state_dir.join(format!("console/{vm}.log")).exists(), "console log of {vm} is gone");
    }
    assert!(dir.starts_with(h.root.to_str().unwrap()), "{dir} is under the storage root");
    assert!(!Path::new(dir).exists(), "{dir} is removed");
    let groups = std::fs::read_dir(h.state_dir.join("snapshot-groups")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(groups, 0, "no snapshot group record is left");
}

#[tokio::test]
async fn smoke_passes_every_step_and_leaves_nothing_behind() {
    let h = Host::start().await.unwrap();
    let out = h.cli(&["smoke"], None).await.unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}\n{}", h.log());
    let passed = stdout.lines().filter(|l| l.starts_with("PASS ")).count();
    assert_eq!(passed, 9, "{stdout}");
    assert!(!stdout.contains("FAIL"), "{stdout}");
    for step in [
        "create",
        "clone x2",
        "snapshot group",
        "flatten (dry run)",
        "flatten (live)",
        "change image",
        "backup",
        "create from backup",
        "destroy",
    ] {
        assert!(stdout.lines().any(|l| l.starts_with("PASS ") && l.contains(step)), "{step}: {stdout}");
    }
    let (vms, dir) = announced(stdout.lines().next().unwrap());
    assert_nothing_left(&h, &vms, &dir);
}

#[tokio::test]
async fn smoke_interrupted_after_the_first_steps_cleans_up_and_fails() {
    let h = Host::start().await.unwrap();
    let mut child = h.cli_command(&["smoke"]).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().expect("the announcement");
    let (vms, dir) = announced(&first);
    let mut seen = vec![first];
    while let Some(line) = lines.next_line().await.unwrap() {
        let cloned = line.starts_with("PASS ") && line.contains("clone x2");
        seen.push(line);
        if cloned {
            break;
        }
    }
    assert!(seen.last().unwrap().contains("clone x2"), "{seen:?}");
    assert!(Path::new(&dir).exists(), "the pass made its directory");
    // SAFETY: kill(2) on the child we spawned and have not reaped.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    while let Some(line) = lines.next_line().await.unwrap() {
        seen.push(line);
    }
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), Some(130), "{seen:?}");
    assert!(seen.iter().any(|l| l.starts_with("cleanup: removed")), "{seen:?}");
    assert!(!seen.iter().any(|l| l.contains("every step passed")), "{seen:?}");
    assert_nothing_left(&h, &vms, &dir);
}
