//! The end state a host must be in after any mix of operations, however they interleaved:
//!
//! - every VM record (`state_dir/vms/<vm>.json`) names, for each volume, the file its domain
//!   really uses (the `<disk>` whose serial is the volume uuid, in the live XML of a running VM
//!   or the definition of a stopped one);
//! - every file of every chain (the VMs' volumes, through their backing files, and the snapshots
//!   of every snapshot group) is there and passes `qemu-img check`;
//! - no file under the storage root is left that no chain references (cached images, which the
//!   management plane owns, the test guest's kernel, and backup roots aside).
//!
//! Also how a command's result counts: a success, a conflict (a legitimate refusal when
//! commands race), or any other failure (never legitimate).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::checks::{qemu_img, qemu_img_check, virsh};
use crate::Host;

/// The `errorCode.description` of a conflict (`SYS.1006` is shared with plain failures).
const CONFLICT: &str = "resource is in a conflicting state";

/// How a command's result counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Refused because of the state another command left (somewhere in its `errorCode` causes).
    Conflict,
    /// Any other failure, with its error text.
    Failed(String),
}

impl Outcome {
    pub fn of(result: &Value) -> Outcome {
        if result["success"] == true {
            return Outcome::Success;
        }
        let mut code = &result["errorCode"];
        while code.is_object() {
            if code["description"] == CONFLICT {
                return Outcome::Conflict;
            }
            code = &code["cause"];
        }
        Outcome::Failed(result["error"].as_str().unwrap_or_default().to_owned())
    }
}

/// Successes and conflicts per command path, and every other failure.
#[derive(Debug, Default)]
pub struct Tally {
    pub successes: BTreeMap<String, usize>,
    pub conflicts: BTreeMap<String, usize>,
    pub failures: Vec<String>,
}

impl Tally {
    pub fn add(&mut self, path: &str, task: &str, result: &Value) {
        match Outcome::of(result) {
            Outcome::Success => *self.successes.entry(path.to_owned()).or_default() += 1,
            Outcome::Conflict => *self.conflicts.entry(path.to_owned()).or_default() += 1,
            Outcome::Failed(e) => self.failures.push(format!("{path} (task {task}) failed: {e}")),
        }
    }

    pub fn succeeded(&self, path: &str) -> usize {
        self.successes.get(path).copied().unwrap_or(0)
    }
}

/// Fails, listing every problem, unless the host is in a consistent end state (see the module
/// docs). A running VM's disks should be flushed first (`checks::guest_disk_flush`), so that
/// `qemu-img check` beside it sees the metadata QEMU caches.
pub fn assert_consistent(h: &Host) -> Result<()> {
    let problems = problems(h)?;
    if !problems.is_empty() {
        bail!("{} problem(s) in the end state:\n  {}", problems.len(), problems.join("\n  "));
    }
    Ok(())
}

/// Every inconsistency of the end state, as readable lines (empty when consistent).
pub fn problems(h: &Host) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    // The tops every chain starts from: each VM's volumes (its record's and its domain's) and
    // each snapshot group's snapshots.
    let mut tops: BTreeSet<PathBuf> = BTreeSet::new();
    for (vm, record) in json_files(&h.state_dir.join("vms"))? {
        let volumes = crate::record_volumes(&record);
        let disks = domain_disks(&vm)?;
        for (uuid, recorded) in &volumes {
            tops.insert(PathBuf::from(recorded));
            let Some(disks) = &disks else { continue };
            match disks.get(uuid) {
                None => problems.push(format!("VM {vm}: its domain has no disk with serial {uuid}")),
                Some(used) => {
                    tops.insert(PathBuf::from(used));
                    if !same_file(used, recorded) {
                        problems.push(format!(
                            "VM {vm}: the record names {recorded} for volume {uuid}, but the domain uses {used}"
                        ));
                    }
                }
            }
        }
    }
    for (group, g) in json_files(&h.state_dir.join("snapshot-groups"))? {
        for s in g["snapshots"].as_array().into_iter().flatten() {
            match s["snapshotPath"].as_str() {
                Some(p) => {
                    tops.insert(PathBuf::from(p));
                }
                None => problems.push(format!("snapshot group {group}: a snapshot without snapshotPath: {s}")),
            }
        }
    }

    // Every file of every chain: present, clean, and so referenced.
    let mut referenced: BTreeSet<PathBuf> = BTreeSet::new();
    for top in tops.iter().filter(|t| !t.to_string_lossy().starts_with("ceph://")) {
        match chain(top) {
            Ok(files) => referenced.extend(files),
            Err(e) => problems.push(format!("the chain of {}: {e:#}", top.display())),
        }
    }
    for f in &referenced {
        if let Err(e) = qemu_img_check(f) {
            problems.push(format!("qemu-img check {}: {e:#}", f.display()));
        }
    }

    // Nothing under the storage root that no chain holds.
    let backup_roots = backup_roots(h);
    let mut files = Vec::new();
    walk(&h.root, &mut files)?;
    let not_volumes = [h.root.join("imagecache"), h.root.join("guest")];
    for f in files {
        if not_volumes.iter().chain(&backup_roots).any(|d| f.starts_with(d)) {
            continue;
        }
        let canonical = std::fs::canonicalize(&f).unwrap_or_else(|_| f.clone());
        if !referenced.contains(&canonical) {
            problems.push(format!("{} is referenced by no VM, clone or snapshot group", f.display()));
        }
    }
    Ok(problems)
}

/// The file each disk of domain `vm` uses, by disk serial; `None` when there is no domain.
fn domain_disks(vm: &str) -> Result<Option<BTreeMap<String, String>>> {
    let Ok(xml) = virsh(&["dumpxml", vm]) else { return Ok(None) };
    let doc = roxmltree::Document::parse(&xml).with_context(|| format!("the XML of domain {vm}"))?;
    let mut disks = BTreeMap::new();
    for d in doc.descendants().filter(|n| n.has_tag_name("disk")) {
        let child = |tag: &str| d.children().find(|c| c.has_tag_name(tag));
        let (Some(serial), Some(source)) = (child("serial").and_then(|s| s.text()), child("source")) else {
            continue;
        };
        let used = match (source.attribute("file"), source.attribute("name")) {
            (Some(file), _) => file.to_owned(),
            (None, Some(rbd)) => format!("ceph://{rbd}"),
            (None, None) => String::new(),
        };
        disks.insert(serial.to_owned(), used);
    }
    Ok(Some(disks))
}

/// The canonical path of every file of the chain that starts at `top`, top first.
fn chain(top: &Path) -> Result<Vec<PathBuf>> {
    let out = qemu_img(&["info", "-U", "--backing-chain", "--output=json", &top.to_string_lossy()])?;
    let images: Vec<Value> = serde_json::from_str(&out).context("qemu-img info --backing-chain")?;
    images
        .iter()
        .map(|i| {
            let f = i["filename"].as_str().context("an image without filename")?;
            std::fs::canonicalize(f).with_context(|| format!("{f} (in the chain of {})", top.display()))
        })
        .collect()
}

fn same_file(a: &str, b: &str) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Every `*.json` in `dir` (none when it does not exist), by file stem.
fn json_files(dir: &Path) -> Result<Vec<(String, Value)>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for e in entries {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == "json") {
            let text = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            let v = serde_json::from_slice(&text).with_context(|| format!("parsing {}", p.display()))?;
            out.push((p.file_stem().unwrap_or_default().to_string_lossy().into_owned(), v));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The backup roots of the host's config (the test harness puts one beside the state dir).
fn backup_roots(h: &Host) -> Vec<PathBuf> {
    let mut roots = vec![h.state_dir.parent().unwrap_or(&h.state_dir).join("backup")];
    roots.extend(roots.clone().iter().filter_map(|r| std::fs::canonicalize(r).ok()));
    roots
}

/// Every regular file under `dir`, recursively (symlinks are not followed).
fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let t = e.file_type()?;
        if t.is_dir() {
            walk(&e.path(), out)?;
        } else if t.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}
