//! The daemon's copies yield: the `qemu-img convert` of an offline flatten runs at nice +10 and
//! the lowest best-effort I/O priority, and as the agent with `tasks.low_priority_copies = false`.

use std::path::Path;
use std::time::Duration;

use kvmagent_host_tests::checks::{qemu_img, qemu_io_fill_compressed};
use kvmagent_host_tests::{uuid, Host};
use serde_json::json;

const MIB: u64 = 1 << 20;

/// Niceness (field 19 of `/proc/<pid>/stat`) of a process.
fn nice(pid: u32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split_whitespace().nth(16)?.parse().ok()
}

/// The pid of a `qemu-img convert` child of `parent`, if one runs.
fn convert_child(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let ppid: u32 = stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_convert =
            args.first().is_some_and(|a| a.ends_with(b"qemu-img")) && args.get(1) == Some(&&b"convert"[..]);
        (ppid == parent && is_convert).then_some(pid)
    })
}

/// A two-layer chain whose base is compressed, so that flattening it takes a while.
fn slow_chain(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let (base, top) = (dir.join("base.qcow2"), dir.join("top.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1G"]).unwrap();
    qemu_io_fill_compressed(&base, 0, 512 * MIB, 0x5a).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.to_str().unwrap(), top.to_str().unwrap()])
        .unwrap();
    top
}

#[tokio::test]
async fn whole_image_copies_run_at_lower_priority_unless_turned_off() {
    for (config, lowered) in [("", true), ("[tasks]\nlow_priority_copies = false\n", false)] {
        let h = Host::start_with(config).await.unwrap();
        let agent = h.pid().unwrap();
        let top = slow_chain(&h.path(&format!("chain-{}", uuid())));
        let task =
            h.send("/localstorage/snapshot/offlinemerge", &json!({"destPath": top, "fullRebase": true})).await.unwrap();
        let child = loop {
            if let Some(pid) = convert_child(agent) {
                break pid;
            }
            assert!(h.callbacks.results(&task).is_none(), "the flatten ended before its qemu-img convert was seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let (child_nice, agent_nice) = (nice(child), nice(agent).unwrap());
        let io = std::process::Command::new("ionice").arg("-p").arg(child.to_string()).output().unwrap();
        let io = String::from_utf8_lossy(&io.stdout).trim().to_owned();
        let r = h.callbacks.wait(&task, Duration::from_secs(120)).await.unwrap();
        assert_eq!(r["success"], true, "{r}");
        if lowered {
            assert_eq!(child_nice, Some((agent_nice + 10).min(19)));
            assert_eq!(io, "best-effort: prio 7");
        } else {
            assert_eq!(child_nice, Some(agent_nice));
            assert_ne!(io, "best-effort: prio 7");
        }
    }
}
