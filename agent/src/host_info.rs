//! Facts about this host read from `/proc`, `/etc/os-release` and `qemu-img --version`.

use crate::error::{AgentError, AgentResult};
use crate::stop::Stop;

pub struct CpuInfo {
    pub hvm_flag: String,
    pub ept_flag: String,
    pub model_name: String,
    pub mhz: u64,
    pub logical_cpus: u32,
    pub sockets: u32,
}

pub fn cpu_info() -> CpuInfo {
    parse_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo {
        hvm_flag: String::new(),
        ept_flag: String::new(),
        model_name: String::new(),
        mhz: 0,
        logical_cpus: 0,
        sockets: 0,
    };
    let mut sockets = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => info.logical_cpus += 1,
            "model name" if info.model_name.is_empty() => info.model_name = value.to_owned(),
            "cpu MHz" if info.mhz == 0 => info.mhz = value.parse::<f64>().map(|m| m as u64).unwrap_or(0),
            "physical id" => {
                sockets.insert(value.to_owned());
            }
            "flags" if info.hvm_flag.is_empty() => {
                let flags: Vec<&str> = value.split_whitespace().collect();
                info.hvm_flag = ["vmx", "svm"].into_iter().find(|f| flags.contains(f)).unwrap_or_default().to_owned();
                info.ept_flag = ["ept", "npt"].into_iter().find(|f| flags.contains(f)).unwrap_or_default().to_owned();
            }
            _ => {}
        }
    }
    info.sockets = sockets.len().max(1) as u32;
    info.logical_cpus = info.logical_cpus.max(1);
    info
}

pub struct Memory {
    pub total: u64,
    pub available: u64,
}

/// Total and available memory in bytes.
pub fn memory() -> Memory {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Memory { total: kib("MemTotal"), available: kib("MemAvailable") }
}

pub struct OsRelease {
    pub distribution: String,
    pub version: String,
    pub release: String,
}

pub fn os_release() -> OsRelease {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_default()
    };
    OsRelease { distribution: get("ID"), version: get("VERSION_ID"), release: get("VERSION_CODENAME") }
}

pub fn architecture() -> String {
    nix::sys::utsname::uname().map(|u| u.machine().to_string_lossy().into_owned()).unwrap_or_default()
}

pub fn hostname() -> String {
    nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The version `qemu-img --version` prints, e.g. `10.0.2`.
pub async fn qemu_img_version(stop: &Stop) -> AgentResult<String> {
    let out = crate::process::run("qemu-img", &["--version"], stop)
        .await
        .map_err(|e| AgentError::failed("cannot read the qemu-img version", e.to_string()))?;
    out.stdout.split_whitespace().skip_while(|w| *w != "version").nth(1).map(str::to_owned).ok_or_else(|| {
        AgentError::failed("cannot read the qemu-img version", format!("unexpected output: {}", out.stdout.trim()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_flags_and_sockets() {
        let text = "processor\t: 0\nmodel name\t: Test CPU\ncpu MHz\t\t: 2399.998\nphysical id\t: 0\nflags\t\t: fpu vmx ept sse\n\n\
                    processor\t: 1\nphysical id\t: 1\nflags\t\t: fpu vmx ept sse\n";
        let c = parse_cpuinfo(text);
        assert_eq!((c.hvm_flag.as_str(), c.ept_flag.as_str()), ("vmx", "ept"));
        assert_eq!((c.logical_cpus, c.sockets, c.mhz), (2, 2, 2399));
        assert_eq!(c.model_name, "Test CPU");
    }

    #[tokio::test]
    async fn qemu_img_version_is_read() {
        let v = qemu_img_version(&Stop::new()).await.unwrap();
        assert!(v.chars().next().unwrap().is_ascii_digit(), "{v}");
    }
}
