//! Guest setup delivered by cloud-init's NoCloud data source: what the seed ISO of a VM says
//! and where it lies. Validated at the edge ([`crate::wire::cloud_init`]).

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInit {
    /// `local-hostname`: a DNS label or a fully qualified name.
    pub hostname: String,
    /// The `user-data` file as given (a `#cloud-config` document, a script...); empty when absent.
    pub user_data: Option<String>,
    /// OpenSSH public key lines (meta-data `public-keys`).
    pub ssh_keys: Vec<String>,
    /// Per-NIC settings (network-config version 2); empty: the guest's own default (DHCP on the
    /// first NIC).
    pub network: Vec<NicSetup>,
    /// The seed ISO, inside the storage roots; made with the VM and removed with it.
    pub seed: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicSetup {
    /// The NIC it applies to (lowercase), one of the VM's.
    pub mac: String,
    pub addressing: Addressing,
    pub dns: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Addressing {
    Dhcp,
    Static { addresses: Vec<IpCidr>, gateway: Option<IpAddr> },
}

/// An address with its prefix length, `10.0.0.5/24` or `fd00::5/64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpCidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpCidr {
    pub fn parse(s: &str) -> Result<IpCidr, String> {
        let (addr, prefix) =
            s.split_once('/').ok_or_else(|| format!("{s:?} has no /prefix (CIDR form: 10.0.0.5/24)"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix
            .parse::<u8>()
            .ok()
            .filter(|p| (1..=max).contains(p))
            .ok_or_else(|| format!("{s:?}: the prefix length must be 1 to {max}"))?;
        Ok(IpCidr { addr, prefix })
    }
}

impl fmt::Display for IpCidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl TryFrom<String> for IpCidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        IpCidr::parse(&s)
    }
}

impl From<IpCidr> for String {
    fn from(c: IpCidr) -> String {
        c.to_string()
    }
}
