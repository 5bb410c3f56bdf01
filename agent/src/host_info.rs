//! Facts about this host read from `/proc`, `/sys`, `/etc/os-release`, libvirt's capabilities
//! and `qemu-img --version`.

use crate::error::{AgentError, AgentResult};
use crate::stop::Stop;

pub struct CpuInfo {
    /// `vmx` or `svm`; `None` when the CPU offers neither (the management node then refuses
    /// the host, asking to enable virtualization in the BIOS).
    pub hvm_flag: Option<&'static str>,
    /// `ept` when the CPU has Intel's EPT. Not `npt` on AMD: ZStack's agent reports only `ept`,
    /// and the management node compares this flag between hosts and, without it, asks
    /// `/host/connect` for EPT off (which only `kvm_intel` has).
    pub ept_flag: Option<&'static str>,
    /// The first `model name` of `/proc/cpuinfo`, e.g. `AMD EPYC 7B13 64-Core Processor`.
    pub model_name: String,
    pub mhz: f64,
    pub logical_cpus: u32,
    pub sockets: u32,
}

impl CpuInfo {
    /// The clock in GHz as ZStack's agent reports it: the figure in the model name when it
    /// has one (`... @ 2.40GHz` → `2.40`), else the current clock with two decimals.
    pub fn ghz(&self) -> String {
        let named = self.model_name.split_whitespace().find_map(|w| {
            let n = w.strip_suffix("GHz")?;
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit() || b == b'.')).then(|| n.to_owned())
        });
        named.unwrap_or_else(|| format!("{:.2}", self.mhz / 1000.0))
    }
}

pub fn cpu_info() -> CpuInfo {
    parse_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default())
}

fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info =
        CpuInfo { hvm_flag: None, ept_flag: None, model_name: String::new(), mhz: 0.0, logical_cpus: 0, sockets: 0 };
    let mut sockets = std::collections::BTreeSet::new();
    let mut flags_seen = false;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => info.logical_cpus += 1,
            "model name" if info.model_name.is_empty() => info.model_name = value.to_owned(),
            "cpu MHz" if info.mhz == 0.0 => info.mhz = value.parse::<f64>().unwrap_or(0.0),
            "physical id" => {
                sockets.insert(value.to_owned());
            }
            "flags" if !flags_seen => {
                flags_seen = true;
                let flags: Vec<&str> = value.split_whitespace().collect();
                info.hvm_flag = ["vmx", "svm"].into_iter().find(|f| flags.contains(f));
                info.ept_flag = flags.contains(&"ept").then_some("ept");
            }
            _ => {}
        }
    }
    info.sockets = sockets.len().max(1) as u32;
    info.logical_cpus = info.logical_cpus.max(1);
    info
}

/// What the firmware says about the machine (SMBIOS, read from `/sys/class/dmi/id` and
/// `/sys/firmware/dmi/entries`, what `dmidecode` prints). A value the firmware leaves empty is
/// `unknown`, as ZStack's agent reports it.
pub struct Dmi {
    pub product_name: String,
    pub serial_number: String,
    pub manufacturer: String,
    pub uuid: String,
    pub bios_vendor: String,
    pub bios_version: String,
    pub bios_release_date: String,
    /// The number of memory device entries (SMBIOS type 17), when the table is readable.
    pub memory_slots: Option<u32>,
}

pub fn dmi() -> Dmi {
    dmi_from(std::path::Path::new("/sys"))
}

fn dmi_from(sys: &std::path::Path) -> Dmi {
    let id = sys.join("class/dmi/id");
    let read =
        |name: &str| std::fs::read_to_string(id.join(name)).map(|v| v.trim().to_owned()).ok().filter(|v| !v.is_empty());
    let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "unknown".to_owned());
    let memory_slots = std::fs::read_dir(sys.join("firmware/dmi/entries")).ok().map(|entries| {
        entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("17-")).count() as u32
    });
    Dmi {
        product_name: or_unknown(read("product_name").or_else(|| read("board_name"))),
        serial_number: or_unknown(read("product_serial")),
        manufacturer: or_unknown(read("sys_vendor")),
        uuid: or_unknown(read("product_uuid")),
        bios_vendor: or_unknown(read("bios_vendor")),
        bios_version: or_unknown(read("bios_version")),
        bios_release_date: or_unknown(read("bios_date")),
        memory_slots,
    }
}

/// The host's IPv4 addresses but loopback ones and those of ZStack's own `*zs` devices, as
/// ZStack's agent lists them.
pub fn ipv4_addresses() -> Vec<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list freed below with freeifaddrs; every
    // node and its name and address stay valid until then, and are only read.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut node = list;
    while !node.is_null() {
        let ifa = unsafe { &*node };
        node = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        if !ip.is_loopback() && !name.ends_with("zs") && !out.contains(&ip.to_string()) {
            out.push(ip.to_string());
        }
    }
    unsafe { libc::freeifaddrs(list) };
    out
}

/// The iSCSI initiator name from `/etc/iscsi/initiatorname.iscsi`, when open-iscsi is set up.
pub fn iscsi_initiator_name() -> Option<String> {
    parse_initiator_name(&std::fs::read_to_string("/etc/iscsi/initiatorname.iscsi").ok()?)
}

fn parse_initiator_name(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("InitiatorName="))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// When the host booted, in local time as `uptime -s` prints it (`2024-05-01 08:30:00`).
pub fn boot_time() -> Option<String> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: libc::time_t = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    local_time(btime)
}

fn local_time(t: libc::time_t) -> Option<String> {
    // SAFETY: localtime_r writes only into `tm`, which lives for the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return None;
    }
    Some(format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    ))
}

/// What libvirt's capabilities say about the host: the CPU model (`<host><cpu><model>`) and the
/// guest features ZStack's agent reports (`incrementaldrivemirror`, `blockcopynetworktarget`:
/// features of ZStack's own libvirt build, absent from upstream libvirt).
pub struct LibvirtCaps {
    pub cpu_model: Option<String>,
    pub features: Vec<String>,
}

pub fn parse_capabilities(xml: &str) -> Result<LibvirtCaps, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("libvirt capabilities are not XML: {e}"))?;
    let root = doc.root_element();
    fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
        n.children().find(|c| c.has_tag_name(name))
    }
    let cpu_model = child(root, "host")
        .and_then(|h| child(h, "cpu"))
        .and_then(|c| child(c, "model"))
        .and_then(|m| m.text())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty());
    let features = child(root, "guest")
        .and_then(|g| child(g, "features"))
        .map(|f| {
            ["incrementaldrivemirror", "blockcopynetworktarget"]
                .into_iter()
                .filter(|name| child(f, name).is_some())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Ok(LibvirtCaps { cpu_model, features })
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
        assert_eq!((c.hvm_flag, c.ept_flag), (Some("vmx"), Some("ept")));
        assert_eq!((c.logical_cpus, c.sockets), (2, 2));
        assert_eq!(c.model_name, "Test CPU");
        assert_eq!(c.ghz(), "2.40", "the current clock when the model name has none");
    }

    #[test]
    fn a_cpu_without_virtualization_has_no_hvm_flag_rather_than_an_empty_one() {
        let c = parse_cpuinfo("processor\t: 0\nflags\t\t: fpu sse\n");
        assert_eq!((c.hvm_flag, c.ept_flag), (None, None));
        let amd = parse_cpuinfo("processor\t: 0\nflags\t\t: fpu svm npt\n");
        assert_eq!((amd.hvm_flag, amd.ept_flag), (Some("svm"), None), "as ZStack's agent: ept only");
    }

    #[test]
    fn ghz_comes_from_the_model_name_when_it_names_one() {
        let c = parse_cpuinfo("model name\t: Intel(R) Xeon(R) CPU E5-2630 v4 @ 2.20GHz\ncpu MHz\t: 1199.9\n");
        assert_eq!(c.ghz(), "2.20");
    }

    #[test]
    fn dmi_values_the_firmware_leaves_empty_are_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("class/dmi/id");
        std::fs::create_dir_all(&id).unwrap();
        std::fs::write(id.join("product_serial"), "SN123\n").unwrap();
        std::fs::write(id.join("sys_vendor"), "  \n").unwrap();
        std::fs::write(id.join("board_name"), "Board X\n").unwrap();
        let entries = dir.path().join("firmware/dmi/entries");
        for e in ["17-0", "17-1", "16-0"] {
            std::fs::create_dir_all(entries.join(e)).unwrap();
        }
        let d = dmi_from(dir.path());
        assert_eq!(d.serial_number, "SN123");
        assert_eq!(d.manufacturer, "unknown");
        assert_eq!(d.product_name, "Board X", "the board names the product when the system does not");
        assert_eq!(d.memory_slots, Some(2));
        assert_eq!(dmi_from(&dir.path().join("none")).memory_slots, None);
    }

    #[test]
    fn initiator_name_is_read_past_comments() {
        let text = "## generated\nInitiatorName=iqn.1994-05.com.redhat:abc\n";
        assert_eq!(parse_initiator_name(text).as_deref(), Some("iqn.1994-05.com.redhat:abc"));
        assert_eq!(parse_initiator_name("InitiatorName=\n"), None);
    }

    #[test]
    fn capabilities_give_the_cpu_model_and_only_zstack_features_libvirt_has() {
        let xml = "<capabilities><host><cpu><arch>x86_64</arch><model>EPYC-Rome</model></cpu></host>\
                   <guest><features><acpi/><incrementaldrivemirror/></features></guest></capabilities>";
        let c = parse_capabilities(xml).unwrap();
        assert_eq!(c.cpu_model.as_deref(), Some("EPYC-Rome"));
        assert_eq!(c.features, ["incrementaldrivemirror"]);
        let bare = parse_capabilities("<capabilities><host/></capabilities>").unwrap();
        assert_eq!((bare.cpu_model, bare.features.len()), (None, 0));
        assert!(parse_capabilities("<capabilities").is_err());
    }

    #[test]
    fn boot_time_reads_like_uptime_s() {
        let t = local_time(1_700_000_000).unwrap();
        assert_eq!((t.len(), &t[4..5], &t[10..11]), (19, "-", " "), "{t}");
    }

    #[tokio::test]
    async fn qemu_img_version_is_read() {
        let v = qemu_img_version(&Stop::new()).await.unwrap();
        assert!(v.chars().next().unwrap().is_ascii_digit(), "{v}");
    }
}
