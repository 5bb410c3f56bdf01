//! The cloud-init NoCloud seed of a VM: an ISO 9660 image labelled `cidata` holding `meta-data`
//! (instance-id = the VM's uuid, local-hostname, public-keys), `user-data` and, when NICs are
//! set up, `network-config` (version 2). The YAML files are written as JSON, which YAML 1.2
//! (and cloud-init's loader) reads as YAML. The ISO is built by `xorriso` beside the root
//! volume, attached as a read-only CD-ROM ([`crate::domain`]), and removed with the VM.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::undo::{UndoLog, UndoStep};
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::model::{Addressing, CloudInit, Nic, VmSpec};
use crate::storage::location::Location;
use crate::wire::cloud_init::{CloudInitChoice, CloudInitSpec};

/// Where the seeds of VMs whose root is on Ceph go, under the first storage root.
pub const RBD_SEED_DIR: &str = "cloud-init";
/// CD-ROM drives a domain has (see [`crate::domain`]); the seed takes the last.
pub const CDROM_DRIVES: usize = 3;
/// The volume label NoCloud looks for.
const SEED_LABEL: &str = "cidata";

/// `over`'s fields where it gives them, `base`'s elsewhere.
pub fn merge(base: CloudInitChoice, over: &CloudInitChoice) -> CloudInitChoice {
    CloudInitChoice {
        hostname: over.hostname.clone().or(base.hostname),
        user_data: over.user_data.clone().or(base.user_data),
        ssh_keys: over.ssh_keys.clone().or(base.ssh_keys),
        network: over.network.clone().or(base.network),
    }
}

/// What a clone of `source` with NICs `nics` inherits: the source's settings without its
/// hostname (each clone has its own), NIC settings moved to the clone's NIC in the same position.
/// A NIC with static addresses would clash with the source's: the clone must be given its own
/// (`network_given`), or it is refused.
pub fn inherit(source: &VmSpec, nics: &[Nic], network_given: bool) -> AgentResult<CloudInitChoice> {
    let Some(ci) = &source.cloud_init else { return Ok(CloudInitChoice::default()) };
    let network = if network_given || ci.network.is_empty() {
        None
    } else {
        let mut moved = Vec::new();
        for setup in &ci.network {
            if matches!(setup.addressing, Addressing::Static { .. }) {
                return Err(AgentError::invalid(format!(
                    "the source's NIC {} has static addresses; give the clone its own in cloudInit.network",
                    setup.mac
                )));
            }
            let at = source.nics.iter().position(|n| n.mac.eq_ignore_ascii_case(&setup.mac));
            if let Some(nic) = at.and_then(|i| nics.get(i)) {
                moved.push(crate::model::NicSetup { mac: nic.mac.to_ascii_lowercase(), ..setup.clone() });
            }
        }
        Some(moved)
    };
    Ok(CloudInitChoice {
        hostname: None,
        user_data: ci.user_data.clone(),
        ssh_keys: Some(ci.ssh_keys.clone()),
        network,
    })
}

/// The seed of new VM `spec` from `choice`, checked against the VM (its NICs, a free CD-ROM
/// drive) and the host (a seed path inside the roots, free).
pub fn settle(app: &App, spec: &VmSpec, choice: CloudInitChoice) -> AgentResult<CloudInit> {
    if spec.cd_roms.len() >= CDROM_DRIVES {
        return Err(AgentError::invalid(format!(
            "cloudInit: the seed needs one of the {CDROM_DRIVES} CD-ROM drives, and cdRoms takes them all"
        )));
    }
    let network = choice.network.unwrap_or_default();
    for (i, n) in network.iter().enumerate() {
        if !spec.nics.iter().any(|nic| nic.mac.eq_ignore_ascii_case(&n.mac)) {
            return Err(AgentError::invalid(format!("cloudInit.network[{i}]: mac {} is not a NIC of the VM", n.mac)));
        }
    }
    let seed = seed_path(app, spec)?;
    if seed.symlink_metadata().is_ok() {
        return Err(AgentError::conflict(format!("cloud-init seed {} already exists", seed.display())));
    }
    Ok(CloudInit {
        hostname: choice.hostname.unwrap_or_else(|| default_hostname(spec)),
        user_data: choice.user_data,
        ssh_keys: choice.ssh_keys.unwrap_or_default(),
        network,
        seed,
    })
}

/// The VM's name made into a DNS label (lowercase letters, digits, hyphens; at most 63), or
/// `vm-<uuid prefix>` when nothing of it is left.
pub fn default_hostname(spec: &VmSpec) -> String {
    let mapped: String =
        spec.name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let label: String = mapped.trim_matches('-').chars().take(63).collect();
    let label = label.trim_end_matches('-');
    if label.is_empty() {
        format!("vm-{}", &spec.uuid[..spec.uuid.len().min(8)])
    } else {
        label.to_owned()
    }
}

/// `cidata-<vm>.iso` beside a file root; under the first storage root's `cloud-init/` for an RBD
/// root.
fn seed_path(app: &App, spec: &VmSpec) -> AgentResult<PathBuf> {
    let name = format!("cidata-{}.iso", spec.uuid);
    let path = match &spec.root().location {
        Location::File(root) => root.parent().unwrap_or(Path::new("/")).join(name),
        Location::Rbd(_) => {
            let first = app.storage.roots().roots().first().ok_or_else(|| {
                AgentError::invalid("cloudInit: an RBD root needs a storage root for its seed; none is configured")
            })?;
            first.join(RBD_SEED_DIR).join(name)
        }
    };
    Ok(app.storage.roots().confine(&path.display().to_string())?)
}

/// The three files of the seed: name and content.
pub fn render(spec: &VmSpec, ci: &CloudInit) -> Vec<(&'static str, String)> {
    let mut meta = Map::new();
    meta.insert("instance-id".into(), json!(spec.uuid));
    meta.insert("local-hostname".into(), json!(ci.hostname));
    if !ci.ssh_keys.is_empty() {
        meta.insert("public-keys".into(), json!(ci.ssh_keys));
    }
    let mut files = vec![
        ("meta-data", pretty(&Value::Object(meta))),
        // NoCloud needs the file; an empty cloud-config changes nothing.
        ("user-data", ci.user_data.clone().unwrap_or_else(|| "#cloud-config\n".into())),
    ];
    if !ci.network.is_empty() {
        files.push(("network-config", pretty(&network_config(ci))));
    }
    files
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// network-config version 2: one `ethernets` entry per NIC, matched by MAC.
fn network_config(ci: &CloudInit) -> Value {
    let ethernets: Map<String, Value> = (ci.network.iter().enumerate())
        .map(|(i, n)| {
            let mut eth = Map::new();
            eth.insert("match".into(), json!({ "macaddress": n.mac }));
            match &n.addressing {
                Addressing::Dhcp => {
                    eth.insert("dhcp4".into(), json!(true));
                }
                Addressing::Static { addresses, gateway } => {
                    eth.insert("addresses".into(), json!(addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>()));
                    if let Some(g) = gateway {
                        let to = if g.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
                        eth.insert("routes".into(), json!([{ "to": to, "via": g.to_string() }]));
                    }
                }
            }
            if !n.dns.is_empty() {
                let dns: Vec<String> = n.dns.iter().map(|d| d.to_string()).collect();
                eth.insert("nameservers".into(), json!({ "addresses": dns }));
            }
            (format!("nic{i}"), Value::Object(eth))
        })
        .collect();
    json!({ "version": 2, "ethernets": ethernets })
}

/// Builds the seed of `spec` at `ci.seed`: the files and the ISO in a work directory beside it,
/// the ISO renamed into place. Both are in `undo` first.
pub async fn make_seed(
    app: &App,
    spec: &VmSpec,
    ci: &CloudInit,
    undo: &mut UndoLog,
    stop: &crate::stop::Stop,
) -> AgentResult<()> {
    let seed = &ci.seed;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        AgentError::failed(format!("cannot build the cloud-init seed of VM {}", spec.uuid), format!("{what}: {e}"))
    };
    let dir = seed.parent().ok_or_else(|| AgentError::internal(format!("seed {} has no directory", seed.display())))?;
    let work = dir.join(format!(".cidata-{}.work", spec.uuid));
    undo.push(UndoStep::RemoveFile { path: seed.clone() });
    undo.push(UndoStep::RemoveTree { path: work.clone() });
    let files = work.join("files");
    tokio::fs::create_dir_all(&files).await.map_err(|e| failed(&files.display().to_string(), &e))?;
    for (name, content) in render(spec, ci) {
        let path = files.join(name);
        tokio::fs::write(&path, content).await.map_err(|e| failed(&path.display().to_string(), &e))?;
    }
    let iso = work.join("seed.iso");
    app.iso.write(&files, SEED_LABEL, &iso, stop).await.map_err(|e| failed("xorriso", &e))?;
    tokio::fs::rename(&iso, seed).await.map_err(|e| failed(&seed.display().to_string(), &e))?;
    tokio::fs::remove_dir_all(&work).await.map_err(|e| failed(&work.display().to_string(), &e))?;
    Ok(())
}

/// Removes the seed of a VM that is going away; one already gone is fine.
pub async fn remove_seed(spec: &VmSpec) -> AgentResult<()> {
    let Some(ci) = &spec.cloud_init else { return Ok(()) };
    match tokio::fs::remove_file(&ci.seed).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(AgentError::failed(
            format!("cannot remove the cloud-init seed of VM {}", spec.uuid),
            format!("{}: {e}", ci.seed.display()),
        )),
        _ => Ok(()),
    }
}

/// Gives new VM `spec` (made by `/vm/create`, or from a snapshot group or a backup) the seed
/// `given` asks for, if any.
pub fn for_new_vm(app: &App, spec: &mut VmSpec, given: Option<&CloudInitSpec>) -> AgentResult<()> {
    spec.cloud_init = match given {
        Some(g) => Some(settle(app, spec, g.validate("cloudInit")?)?),
        None => None,
    };
    Ok(())
}
