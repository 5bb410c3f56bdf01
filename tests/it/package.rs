//! The Debian package (`systemd/build-deb.sh`), built from the agent binary under test and
//! installed into a clean root with dpkg (maintainer scripts run against that root): the files
//! land where the unit expects them, the configuration is a conffile readable by the `kvmagent`
//! group only, the dependencies are declared, the binary runs, and a purge removes it all but
//! the state.

use std::path::Path;
use std::process::Command;

use kvmagent_host_tests::agent_binary;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty root dpkg can install into: its database and the account files groupadd edits.
fn clean_root(root: &Path) {
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers", "var/log", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for (f, text) in [
        ("var/lib/dpkg/status", ""),
        ("etc/group", "root:x:0:\n"),
        ("etc/gshadow", "root:*::\n"),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
    ] {
        std::fs::write(root.join(f), text).unwrap();
    }
}

fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display())).args(["--force-script-chrootless", "--force-depends"]);
    c
}

/// The `NEEDED` entries of the agent binary: what the dynamic linker loads at exec.
fn needed_libraries() -> Vec<String> {
    let dynamic = run(Command::new("readelf").arg("-d").arg(agent_binary()));
    let needed: Vec<String> = dynamic.lines().filter(|l| l.contains("(NEEDED)")).map(str::to_owned).collect();
    assert!(needed.iter().any(|l| l.contains("libc.so")), "readelf lists the needed libraries: {dynamic}");
    needed
}

/// librbd and librados (and the 12 MiB of libceph-common, boost and libstdc++ they bring) are
/// loaded by the first Ceph call: the dynamic linker must not load them at exec.
#[test]
fn the_binary_does_not_link_ceph_libraries() {
    let needed = needed_libraries();
    for lib in ["librbd", "librados", "libceph"] {
        assert!(!needed.iter().any(|l| l.contains(lib)), "{lib} is not needed at exec: {needed:#?}");
    }
}

/// The agent speaks libvirt's RPC protocol itself: libvirt (and the ~50 libraries it brings,
/// libcrypto, gnutls, glib, xml2, ...) is not loaded at all.
#[test]
fn the_binary_does_not_link_libvirt() {
    let needed = needed_libraries();
    for lib in ["libvirt", "libgnutls", "libcrypto", "libxml2", "libglib"] {
        assert!(!needed.iter().any(|l| l.contains(lib)), "{lib} is not needed: {needed:#?}");
    }
}

#[test]
fn the_package_installs_into_a_clean_root_and_purges() {
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/build-deb.sh");
    let deb = run(Command::new("bash").arg(&script).arg(agent_binary()).arg(dir.path().join("out")));
    let deb = deb.trim();

    let depends = run(Command::new("dpkg-deb").args(["-f", deb, "Depends"]));
    for dep in ["libvirt-daemon", "qemu-system-x86", "qemu-utils", "swtpm", "ovmf", "xorriso"] {
        assert!(depends.split([',', ' ', '\n']).any(|d| d == dep), "{dep} is declared: {depends}");
    }
    // The daemon, not its client library: the agent speaks the RPC protocol itself.
    assert!(!depends.split([',', ' ', '\n']).any(|d| d == "libvirt0"), "libvirt0 is not required: {depends}");
    // Ceph's client libraries are loaded on first use, so hosts without Ceph need not have them.
    let recommends = run(Command::new("dpkg-deb").args(["-f", deb, "Recommends"]));
    for dep in ["librbd1", "librados2", "ceph-common"] {
        assert!(recommends.split([',', ' ', '\n']).any(|d| d == dep), "{dep} is recommended: {recommends}");
        assert!(!depends.split([',', ' ', '\n']).any(|d| d == dep), "{dep} is not required: {depends}");
    }
    assert_eq!(run(Command::new("dpkg-deb").args(["-I", deb, "conffiles"])).trim(), "/etc/kvmagent/kvmagent.toml");

    let root = dir.path().join("root");
    clean_root(&root);
    run(dpkg(&root).args(["-i", deb]));
    let status = run(Command::new("dpkg").arg(format!("--root={}", root.display())).args(["-s", "kvmagent"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    for f in ["usr/bin/kvmagent", "lib/systemd/system/kvmagent.service", "usr/share/doc/kvmagent/alerts.yml"] {
        assert!(root.join(f).is_file(), "{f} installed");
    }
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/kvmagent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/kvmagent serve --config /etc/kvmagent/kvmagent.toml"), "{unit}");

    // The group, and the configuration readable by it only.
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("kvmagent:x:"))
        .and_then(|r| r.trim_end_matches(':').parse().ok())
        .unwrap_or_else(|| panic!("a kvmagent group: {group}"));
    use std::os::unix::fs::MetadataExt;
    let conf = std::fs::metadata(root.join("etc/kvmagent/kvmagent.toml")).unwrap();
    assert_eq!((conf.gid(), conf.mode() & 0o777), (gid, 0o640));
    assert_eq!(std::fs::metadata(root.join("etc/kvmagent")).unwrap().mode() & 0o777, 0o750);
    // The installed binary runs and reads its installed configuration.
    let shown = run(Command::new(root.join("usr/bin/kvmagent"))
        .args(["show-config", "--config"])
        .arg(root.join("etc/kvmagent/kvmagent.toml")));
    assert!(shown.contains("storage"), "{shown}");

    // Purge: the files, the conffile and the group go.
    run(dpkg(&root).args(["--purge", "kvmagent"]));
    assert!(!root.join("usr/bin/kvmagent").exists() && !root.join("etc/kvmagent/kvmagent.toml").exists());
    assert!(!std::fs::read_to_string(root.join("etc/group")).unwrap().contains("kvmagent"), "the group is removed");
}
