//! `kvmagent check-host` on this machine: every check ready except what the machine lacks
//! (here hardware virtualisation: TCG only), and exactly the broken part named, with a non-zero
//! exit, when libvirtd cannot be reached or a storage root is missing.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use kvmagent_host_tests::agent_binary;
use serde_json::Value;

/// `check-host --json` with `config` (TOML): the exit code and the checks by name.
fn check_host(dir: &Path, config: &str) -> (i32, Value) {
    let file = dir.join("kvmagent.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(agent_binary()).args(["check-host", "--json", "--config"]).arg(&file).output().unwrap();
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap(), report)
}

fn by_name<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["checks"].as_array().unwrap().iter().filter(|c| c["name"] == name).collect()
}

/// Whether this machine's CPU shows hardware virtualisation and `/dev/kvm` opens.
fn kvm_usable() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flag = cpuinfo.split_whitespace().any(|w| w == "vmx" || w == "svm");
    flag && std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

fn config(dir: &Path, uri: &str, storage: &Path) -> String {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let backup = dir.join("backup");
    std::fs::create_dir_all(&backup).unwrap();
    format!(
        "state_dir = \"{state}\"\n[server]\nlisten = \"127.0.0.1:{port}\"\n[storage]\nroots = [\"{storage}\"]\n\
         [backup]\nroots = [\"{backup}\"]\n[libvirt]\nuri = \"{uri}\"\ndomain_type = \"qemu\"\n",
        state = dir.join("state").display(),
        storage = storage.display(),
        backup = backup.display(),
    )
}

#[test]
fn this_host_is_ready_but_for_what_it_lacks_and_a_broken_part_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("local");
    std::fs::create_dir_all(&storage).unwrap();

    // As configured for this machine (TCG): everything ready; KVM degraded exactly when the
    // hardware lacks it (the test machine's /dev/kvm is paravirtual).
    let (code, report) = check_host(dir.path(), &config(dir.path(), "qemu:///system", &storage));
    let kvm = by_name(&report, "kvm")[0];
    assert_eq!(kvm["status"], "degraded", "{kvm}");
    let tcg_only = !kvm_usable();
    assert_eq!(kvm["detail"].as_str().unwrap().starts_with("TCG only"), tcg_only, "{kvm}");
    for c in report["checks"].as_array().unwrap().iter().filter(|c| c["name"] != "kvm") {
        assert_eq!(c["status"], "ok", "{c}");
    }
    assert_eq!((code, &report["verdict"]), (1, &Value::from("degraded")), "{report}");
    let root = by_name(&report, "storage root")[0]["detail"].as_str().unwrap().to_owned();
    assert!(root.contains(&storage.display().to_string()) && root.contains("writable"), "{root}");
    assert_eq!(std::fs::read_dir(&storage).unwrap().count(), 0, "the writability probe left nothing");

    // libvirtd unreachable (a socket nobody listens on): named, not ready.
    let uri = format!("qemu:///system?socket={}/no-libvirtd.sock", dir.path().display());
    let (code, report) = check_host(dir.path(), &config(dir.path(), &uri, &storage));
    let libvirtd = by_name(&report, "libvirtd")[0];
    assert_eq!(libvirtd["status"], "not-ready", "{libvirtd}");
    assert!(libvirtd["detail"].as_str().unwrap().contains("not reachable"), "{libvirtd}");
    assert!(libvirtd["fix"].as_str().unwrap().contains("start libvirtd"), "{libvirtd}");
    assert_eq!(code, 2, "{report}");

    // A storage root that does not exist: named, not ready, and not made by the check.
    let missing = dir.path().join("missing-root");
    let (code, report) = check_host(dir.path(), &config(dir.path(), "qemu:///system", &missing));
    let root = by_name(&report, "storage root")[0];
    assert_eq!(root["status"], "not-ready", "{root}");
    assert!(root["detail"].as_str().unwrap().contains(&format!("{} is missing", missing.display())), "{root}");
    assert_eq!(by_name(&report, "libvirtd")[0]["status"], "ok");
    assert_eq!(code, 2, "{report}");
    assert!(!missing.exists(), "check-host changes nothing");
}
