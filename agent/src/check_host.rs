//! `kvmagent check-host`: whether this host can run the agent's work, one line per check, each
//! problem with what to do about it. Read-only: nothing on the host is changed (a storage root's
//! writability is tried with a file that is removed at once).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::ceph::cluster::{CephCli, Cluster};
use crate::ceph::rbd::Connection;
use crate::config::Config;
use crate::libvirt::Libvirt;

/// How long a check waits for a daemon (libvirtd, the Ceph monitors).
const DAEMON_TIMEOUT: Duration = Duration::from_secs(15);
/// Less free space than this in a root is worth a warning.
const LOW_SPACE: u64 = 1 << 30;
/// A clock before this is certainly wrong (TLS certificates and task deadlines depend on it).
const CLOCK_FLOOR_UNIX: u64 = 1_704_067_200; // 2024-01-01

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Ok,
    /// Works, but not fully (TCG only, no TPM, little space).
    Degraded,
    /// The agent cannot do its work.
    NotReady,
}

impl Status {
    /// The process exit code for this verdict.
    pub fn exit_code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Degraded => 1,
            Status::NotReady => 2,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Degraded => "degraded",
            Status::NotReady => "not ready",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do, when the status is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, status: Status::Ok, detail: detail.into(), fix: None }
    }

    fn problem(name: &'static str, status: Status, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, status, detail: detail.into(), fix: Some(fix.into()) }
    }

    /// One line for people: status, name, what was found, and the fix.
    pub fn line(&self) -> String {
        let fix = self.fix.as_deref().map(|f| format!(" — {f}")).unwrap_or_default();
        format!("{:<10} {:<14} {}{fix}", self.status.label(), self.name, self.detail)
    }
}

/// The host's verdict: the worst of its checks.
pub fn verdict(checks: &[Check]) -> Status {
    checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok)
}

/// Every check, in a fixed order.
pub async fn run(config: &Config) -> Vec<Check> {
    let mut checks = vec![kvm(config), libvirtd(config).await, qemu_versions(config).await, swtpm().await, ovmf()];
    checks.extend(config.storage.roots.iter().map(|r| root("storage root", r, Status::NotReady)));
    checks.extend(config.backup.roots.iter().map(|r| root("backup root", r, Status::Degraded)));
    checks.push(ceph(config).await);
    checks.push(listen_port(config));
    checks.push(clock());
    checks
}

/// KVM is usable when `/dev/kvm` opens and the CPU shows hardware virtualisation (a paravirtual
/// `/dev/kvm` without vmx/svm runs firmware but not a Linux guest).
fn kvm(config: &Config) -> Check {
    let device = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flag = ["vmx", "svm"].into_iter().find(|f| cpuinfo.split_whitespace().any(|w| w == *f));
    let unusable = match (&device, flag) {
        (Ok(_), Some(_)) => None,
        (Err(e), _) => Some(format!("/dev/kvm cannot be opened ({e})")),
        (Ok(_), None) => Some("/dev/kvm is there but the CPU shows no vmx/svm flag (paravirtual KVM)".to_owned()),
    };
    let tcg = config.libvirt.domain_type == "qemu";
    match (unusable, tcg) {
        (None, false) => Check::ok("kvm", format!("KVM usable ({})", flag.unwrap_or_default())),
        (None, true) => Check::problem(
            "kvm",
            Status::Degraded,
            "KVM usable, but libvirt.domain_type = \"qemu\": guests run under TCG",
            "set libvirt.domain_type = \"kvm\"",
        ),
        (Some(why), true) => Check::problem(
            "kvm",
            Status::Degraded,
            format!("TCG only: {why}"),
            "guests run emulated (slow); use a host with hardware virtualisation for production",
        ),
        (Some(why), false) => Check::problem(
            "kvm",
            Status::NotReady,
            format!("KVM not usable ({why}), yet libvirt.domain_type = \"kvm\""),
            "enable hardware virtualisation (BIOS, kvm_intel/kvm_amd) or set libvirt.domain_type = \"qemu\"",
        ),
    }
}

async fn libvirtd(config: &Config) -> Check {
    let libvirt = Libvirt::new(&config.libvirt.uri);
    match tokio::time::timeout(DAEMON_TIMEOUT, libvirt.versions()).await {
        Ok(Ok((libvirt_version, qemu))) => {
            Check::ok("libvirtd", format!("{} answers: libvirt {libvirt_version}, QEMU {qemu}", config.libvirt.uri))
        }
        Ok(Err(e)) => Check::problem(
            "libvirtd",
            Status::NotReady,
            format!("not reachable at {}: {e}", config.libvirt.uri),
            "start libvirtd (systemctl start libvirtd) or fix libvirt.uri",
        ),
        Err(_) => Check::problem(
            "libvirtd",
            Status::NotReady,
            format!("no answer from {} within {} s", config.libvirt.uri, DAEMON_TIMEOUT.as_secs()),
            "restart libvirtd",
        ),
    }
}

/// `<program> --version`'s first `X.Y.Z` after the word "version".
async fn version_of(program: &str) -> Result<String, String> {
    let out = tokio::process::Command::new(program)
        .arg("--version")
        .output()
        .await
        .map_err(|e| format!("{program} cannot be run ({e})"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace().skip_while(|w| *w != "version").skip(1);
    let version = words.next().map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()));
    version.map(str::to_owned).ok_or_else(|| format!("{program} --version printed no version: {text:?}"))
}

/// qemu-img and the QEMU that runs the guests, from the same release (a mismatch has broken
/// hosts: a newer qemu-img writes images an older QEMU refuses).
async fn qemu_versions(config: &Config) -> Check {
    let emulator = if config.libvirt.emulator.is_empty() { "qemu-system-x86_64" } else { &config.libvirt.emulator };
    let fix = "install qemu-utils and qemu-system-x86 from the same release";
    match (version_of("qemu-img").await, version_of(emulator).await) {
        (Ok(img), Ok(qemu)) => {
            let release = |v: &str| v.split('.').take(2).collect::<Vec<_>>().join(".");
            if release(&img) == release(&qemu) {
                Check::ok("qemu", format!("qemu-img {img}, {emulator} {qemu}"))
            } else {
                Check::problem("qemu", Status::Degraded, format!("qemu-img {img} but {emulator} {qemu}"), fix)
            }
        }
        (Err(e), _) | (_, Err(e)) => Check::problem("qemu", Status::NotReady, e, fix),
    }
}

async fn swtpm() -> Check {
    match version_of("swtpm").await {
        Ok(v) => Check::ok("swtpm", format!("swtpm {v}")),
        Err(e) => Check::problem(
            "swtpm",
            Status::Degraded,
            format!("{e}: VMs with a TPM cannot start"),
            "apt-get install swtpm swtpm-tools",
        ),
    }
}

/// The distribution's OVMF builds UEFI guests need (plain and Secure Boot).
fn ovmf() -> Check {
    const FILES: [&str; 4] = [
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
        "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.ms.fd",
    ];
    let missing: Vec<&str> = FILES.into_iter().filter(|f| !Path::new(f).is_file()).collect();
    if missing.is_empty() {
        Check::ok("ovmf", "OVMF firmware and variable templates present (UEFI, Secure Boot)")
    } else {
        Check::problem(
            "ovmf",
            Status::Degraded,
            format!("missing {}: UEFI VMs cannot be made", missing.join(", ")),
            "apt-get install ovmf",
        )
    }
}

/// A root directory: there, a directory, writable, its free space and file system.
fn root(name: &'static str, dir: &Path, missing: Status) -> Check {
    let shown = dir.display();
    match std::fs::metadata(dir) {
        Err(e) => {
            return Check::problem(
                name,
                missing,
                format!("{shown} is missing ({e})"),
                format!("create it (mkdir -p {shown}; `kvmagent serve` also creates it) or fix the configuration"),
            )
        }
        Ok(m) if !m.is_dir() => {
            return Check::problem(
                name,
                Status::NotReady,
                format!("{shown} is not a directory"),
                "point it at a directory",
            )
        }
        Ok(_) => {}
    }
    let probe = dir.join(format!(".kvmagent-check-host-{}", std::process::id()));
    if let Err(e) = std::fs::write(&probe, b"") {
        return Check::problem(
            name,
            Status::NotReady,
            format!("{shown} is not writable ({e})"),
            "run as root or fix its permissions",
        );
    }
    let _ = std::fs::remove_file(&probe);
    let free = nix::sys::statvfs::statvfs(dir).map(|s| s.blocks_available() * s.fragment_size());
    let fs = nix::sys::statfs::statfs(dir).map(|s| filesystem_name(s.filesystem_type().0)).unwrap_or("?");
    match free {
        Ok(free) if free < LOW_SPACE => Check::problem(
            name,
            Status::Degraded,
            format!("{shown} ({fs}): only {} MiB free", free >> 20),
            "free space or add a root",
        ),
        Ok(free) => {
            Check::ok(name, format!("{shown} ({fs}): writable, {:.1} GiB free", free as f64 / (1u64 << 30) as f64))
        }
        Err(e) => {
            Check::problem(name, Status::Degraded, format!("{shown}: free space unknown ({e})"), "check the mount")
        }
    }
}

/// The usual names of the file systems a root may be on (`statfs` magic numbers).
fn filesystem_name(magic: i64) -> &'static str {
    match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x6969 => "nfs",
        0x794C_7630 => "overlayfs",
        0x2FC1_2FC1 => "zfs",
        0xFF53_4D42 => "cifs",
        0x0065_735F => "fuse",
        _ => "other",
    }
}

/// The cluster, when one is configured (a `[ceph]` table, or the default ceph.conf present).
async fn ceph(config: &Config) -> Check {
    let c = &config.ceph;
    if c.agent_listen.is_none() && !c.conf.exists() {
        return Check::ok("ceph", "not configured");
    }
    let cluster = CephCli(Connection::configured(c));
    match tokio::time::timeout(DAEMON_TIMEOUT, cluster.fsid()).await {
        Ok(Ok(fsid)) => Check::ok("ceph", format!("cluster {fsid} answers client.{}", c.id)),
        Ok(Err(e)) => Check::problem(
            "ceph",
            Status::NotReady,
            format!("cluster of {} does not answer client.{}: {e}", c.conf.display(), c.id),
            "check the monitors, ceph.conf and the keyring (ceph.id, ceph.keyring)",
        ),
        Err(_) => Check::problem(
            "ceph",
            Status::NotReady,
            format!("no answer from the monitors of {} within {} s", c.conf.display(), DAEMON_TIMEOUT.as_secs()),
            "check that the monitors run and are reachable",
        ),
    }
}

fn listen_port(config: &Config) -> Check {
    let addr = config.server.listen;
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Check::ok("listen", format!("{addr} is free")),
        Err(e) => Check::problem(
            "listen",
            Status::Degraded,
            format!("{addr} cannot be bound ({e}); an agent may be running already"),
            "stop what holds the port, or change server.listen",
        ),
    }
}

/// The clock is in a sane range; whether NTP keeps it in step is reported (the kernel's view).
fn clock() -> Check {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if now < CLOCK_FLOOR_UNIX {
        return Check::problem(
            "clock",
            Status::NotReady,
            format!("the system clock says {now} s since 1970, before 2024"),
            "set the clock and run an NTP client (chrony)",
        );
    }
    // SAFETY: adjtimex with modes 0 only reads the kernel's clock state into `tx`.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    let synced = state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0;
    let sync = if synced { "synchronised" } else { "not marked synchronised by an NTP client" };
    Check::ok("clock", format!("{now} s since 1970; {sync}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_is_the_worst_check_and_each_problem_says_what_to_do() {
        let ok = Check::ok("a", "fine");
        let degraded = Check::problem("b", Status::Degraded, "slow", "do x");
        assert_eq!(verdict(std::slice::from_ref(&ok)), Status::Ok);
        assert_eq!(verdict(&[ok.clone(), degraded.clone()]), Status::Degraded);
        let missing = root("storage root", Path::new("/nonexistent/kvmagent-root"), Status::NotReady);
        assert_eq!(verdict(&[ok, degraded, missing.clone()]).exit_code(), 2);
        assert!(missing.line().contains("/nonexistent/kvmagent-root is missing"), "{}", missing.line());
        assert!(missing.fix.unwrap().contains("mkdir -p /nonexistent/kvmagent-root"));
    }

    #[test]
    fn a_writable_root_reports_its_space_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = root("storage root", dir.path(), Status::NotReady);
        assert_eq!(c.status, Status::Ok, "{}", c.line());
        assert!(c.detail.contains("writable") && c.detail.contains("GiB free"), "{}", c.line());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the probe file is gone");
    }
}
