//! The native `cloudInit` object: guest setup for cloud-init's NoCloud data source, validated
//! into typed values once, here. Every field may be left out; what is left out comes from the
//! source VM (clones) or a default (see [`crate::ops::cloud_init`]).

use schemars::JsonSchema;
use std::collections::HashSet;
use std::net::IpAddr;

use serde::Deserialize;

use super::vm_model::is_mac;
use crate::error::{AgentError, AgentResult};
use crate::model::{Addressing, IpCidr, NicSetup};

/// The longest `userData`: cloud-init reads seeds of any size, but a request body is no place
/// for more.
pub const MAX_USER_DATA: usize = 64 * 1024;
pub const MAX_SSH_KEYS: usize = 64;
pub const MAX_SSH_KEY_LINE: usize = 8 * 1024;
pub const MAX_NICS: usize = 16;
const MAX_ADDRESSES: usize = 16;
const MAX_DNS: usize = 8;

/// The first line of every user-data kind cloud-init acts on (its `INCLUSION_TYPES_MAP`, plus
/// MIME multipart and Jinja templates). Anything else it logs as unhandled and ignores, so it is
/// refused here instead of being carried to a guest that would silently do nothing with it.
const USER_DATA_STARTS: &[&str] =
    &["#cloud-config", "#!", "#include", "#cloud-boothook", "#part-handler", "## template: jinja", "Content-Type:"];

#[derive(Debug, Default, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInitSpec {
    /// `local-hostname`; by default the VM's name made into a DNS label.
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub user_data: Option<String>,
    #[serde(default)]
    pub ssh_keys: Option<Vec<String>>,
    #[serde(default)]
    pub network: Option<Vec<NicSetupSpec>>,
}

/// One NIC's settings: `dhcp: true`, or static `addresses` (CIDR) with an optional `gateway`;
/// `dns` servers with either.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicSetupSpec {
    pub mac: String,
    #[serde(default)]
    pub dhcp: bool,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
}

/// A validated `cloudInit` object: `None` fields were left out.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CloudInitChoice {
    pub hostname: Option<String>,
    pub user_data: Option<String>,
    pub ssh_keys: Option<Vec<String>>,
    pub network: Option<Vec<NicSetup>>,
}

impl CloudInitSpec {
    /// Validates every field; errors name the field under `at` (e.g. `cloudInit`).
    pub fn validate(&self, at: &str) -> AgentResult<CloudInitChoice> {
        let field = |f: &str| format!("{at}.{f}");
        if let Some(h) = &self.hostname {
            check_hostname(h).map_err(|e| AgentError::invalid(format!("{}: {e}", field("hostname"))))?;
        }
        if let Some(u) = &self.user_data {
            check_user_data(u).map_err(|e| AgentError::invalid(format!("{}: {e}", field("userData"))))?;
        }
        if let Some(keys) = &self.ssh_keys {
            if keys.len() > MAX_SSH_KEYS {
                return Err(AgentError::invalid(format!("{}: at most {MAX_SSH_KEYS} keys", field("sshKeys"))));
            }
            for (i, k) in keys.iter().enumerate() {
                check_ssh_key(k).map_err(|e| AgentError::invalid(format!("{}[{i}]: {e}", field("sshKeys"))))?;
            }
        }
        let network = match &self.network {
            None => None,
            Some(list) if list.len() > MAX_NICS => {
                return Err(AgentError::invalid(format!("{}: at most {MAX_NICS} NICs", field("network"))))
            }
            Some(list) => {
                let mut macs = HashSet::new();
                let mut out = Vec::new();
                for (i, n) in list.iter().enumerate() {
                    let at = format!("{}[{i}]", field("network"));
                    let setup = n.to_model().map_err(|e| AgentError::invalid(format!("{at}: {e}")))?;
                    if !macs.insert(setup.mac.clone()) {
                        return Err(AgentError::invalid(format!("{at}: mac {} is set twice", setup.mac)));
                    }
                    out.push(setup);
                }
                Some(out)
            }
        };
        Ok(CloudInitChoice {
            hostname: self.hostname.clone(),
            user_data: self.user_data.clone(),
            ssh_keys: self.ssh_keys.clone(),
            network,
        })
    }
}

impl NicSetupSpec {
    fn to_model(&self) -> Result<NicSetup, String> {
        if !is_mac(&self.mac) {
            return Err(format!("mac {:?} is not a MAC address (aa:bb:cc:dd:ee:ff)", self.mac));
        }
        let ip = |what: &str, s: &str| s.parse::<IpAddr>().map_err(|_| format!("{what} {s:?} is not an IP address"));
        if self.dns.len() > MAX_DNS {
            return Err(format!("at most {MAX_DNS} dns servers"));
        }
        let dns = self.dns.iter().map(|d| ip("dns", d)).collect::<Result<Vec<_>, _>>()?;
        let addressing = match (self.dhcp, self.addresses.is_empty()) {
            (true, false) => return Err("give dhcp or addresses, not both".into()),
            (false, true) => return Err("give dhcp: true or static addresses".into()),
            (true, true) if self.gateway.is_some() => return Err("a gateway goes with static addresses".into()),
            (true, true) => Addressing::Dhcp,
            (false, false) => {
                if self.addresses.len() > MAX_ADDRESSES {
                    return Err(format!("at most {MAX_ADDRESSES} addresses"));
                }
                let addresses = self.addresses.iter().map(|a| IpCidr::parse(a)).collect::<Result<Vec<_>, _>>()?;
                let gateway = self.gateway.as_deref().map(|g| ip("gateway", g)).transpose()?;
                if let Some(g) = gateway {
                    if !addresses.iter().any(|a| a.addr.is_ipv4() == g.is_ipv4()) {
                        return Err(format!("gateway {g} has no address of its family to go with"));
                    }
                }
                Addressing::Static { addresses, gateway }
            }
        };
        Ok(NicSetup { mac: self.mac.to_ascii_lowercase(), addressing, dns })
    }
}

/// A DNS label or a fully qualified name (RFC 1123): labels of 1 to 63 letters, digits and
/// inner hyphens, 253 characters in all.
pub fn check_hostname(h: &str) -> Result<(), String> {
    if h.is_empty() || h.len() > 253 {
        return Err(format!("{h:?} must be 1 to 253 characters"));
    }
    for label in h.strip_suffix('.').unwrap_or(h).split('.') {
        let ok = (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{h:?} is not a host name: each dot-separated label is 1 to 63 letters, digits or inner hyphens"
            ));
        }
    }
    Ok(())
}

fn check_user_data(u: &str) -> Result<(), String> {
    if u.len() > MAX_USER_DATA {
        return Err(format!("{} bytes; at most {MAX_USER_DATA}", u.len()));
    }
    if u.contains('\0') {
        return Err("contains a NUL character".into());
    }
    if !USER_DATA_STARTS.iter().any(|s| u.starts_with(s)) {
        return Err(format!(
            "must start with one of {} (cloud-init ignores anything else)",
            USER_DATA_STARTS.join(", ")
        ));
    }
    Ok(())
}

/// One `authorized_keys` line without options: `<type> <base64> [comment]`.
fn check_ssh_key(k: &str) -> Result<(), String> {
    if k.len() > MAX_SSH_KEY_LINE {
        return Err(format!("{} bytes; at most {MAX_SSH_KEY_LINE}", k.len()));
    }
    if k.contains(['\n', '\r', '\0']) {
        return Err("must be one line".into());
    }
    let mut words = k.split_ascii_whitespace();
    let kind = words.next().unwrap_or_default();
    let known = ["ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-"].iter().any(|p| kind.starts_with(p));
    let body = words.next().unwrap_or_default();
    let base64 = !body.is_empty() && body.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b));
    if !known || !base64 {
        return Err(
            "not an OpenSSH public key line (<type> <base64> [comment], e.g. ssh-ed25519 AAAA... me@host)".into()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn choice(v: serde_json::Value) -> AgentResult<CloudInitChoice> {
        crate::wire::decode::<CloudInitSpec>(&v)?.validate("cloudInit")
    }

    #[test]
    fn valid_settings_become_typed_values() {
        let c = choice(json!({
            "hostname": "web-1.example.org", "userData": "#cloud-config\npackages: [nginx]\n",
            "sshKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@host"],
            "network": [{"mac": "52:54:00:AA:bb:01", "addresses": ["10.0.0.5/24", "fd00::5/64"],
                         "gateway": "10.0.0.1", "dns": ["10.0.0.2"]},
                        {"mac": "52:54:00:aa:bb:02", "dhcp": true}]
        }))
        .unwrap();
        let net = c.network.unwrap();
        assert_eq!(net[0].mac, "52:54:00:aa:bb:01");
        let Addressing::Static { addresses, gateway } = &net[0].addressing else { panic!("static expected") };
        assert_eq!(addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(), ["10.0.0.5/24", "fd00::5/64"]);
        assert_eq!(gateway.unwrap().to_string(), "10.0.0.1");
        assert_eq!(net[1].addressing, Addressing::Dhcp);
        assert_eq!(choice(json!({})).unwrap(), CloudInitChoice::default());
    }

    #[test]
    fn bad_settings_are_refused_by_field() {
        let refused = |v: serde_json::Value, field: &str| {
            let e = choice(v.clone()).expect_err(&v.to_string());
            assert!(e.details.contains(field), "{v}: {}", e.details);
        };
        refused(json!({"hostname": "-bad"}), "cloudInit.hostname");
        refused(json!({"hostname": "a b"}), "cloudInit.hostname");
        refused(json!({"hostname": format!("{}.x", "a".repeat(64))}), "cloudInit.hostname");
        refused(json!({"hostname": "a.".repeat(130)}), "cloudInit.hostname");
        refused(json!({"userData": "packages: [nginx]"}), "cloudInit.userData");
        refused(json!({"userData": format!("#cloud-config\n{}", "x".repeat(MAX_USER_DATA))}), "cloudInit.userData");
        refused(json!({"sshKeys": ["ssh-rsa AAAA\nssh-rsa BBBB"]}), "cloudInit.sshKeys[0]");
        refused(json!({"sshKeys": ["hello world"]}), "cloudInit.sshKeys[0]");
        refused(json!({"sshKeys": ["ssh-ed25519"]}), "cloudInit.sshKeys[0]");
        refused(json!({"network": [{"mac": "zz", "dhcp": true}]}), "cloudInit.network[0]");
        refused(json!({"network": [{"mac": "52:54:00:00:00:01"}]}), "cloudInit.network[0]");
        refused(
            json!({"network": [{"mac": "52:54:00:00:00:01", "dhcp": true, "addresses": ["10.0.0.1/8"]}]}),
            "network[0]",
        );
        refused(json!({"network": [{"mac": "52:54:00:00:00:01", "addresses": ["10.0.0.1"]}]}), "network[0]");
        refused(json!({"network": [{"mac": "52:54:00:00:00:01", "addresses": ["10.0.0.1/33"]}]}), "network[0]");
        refused(
            json!({"network": [{"mac": "52:54:00:00:00:01", "addresses": ["10.0.0.1/8"], "gateway": "fd00::1"}]}),
            "network[0]",
        );
        refused(
            json!({"network": [{"mac": "52:54:00:00:00:01", "dhcp": true}, {"mac": "52:54:00:00:00:01", "dhcp": true}]}),
            "network[1]",
        );
        refused(json!({"network": [{"mac": "52:54:00:00:00:01", "dhcp": true, "vlan": 3}]}), "vlan");
        refused(json!({"hostName": "x"}), "hostName");
    }
}
