//! The on-disk backup group format (README, "Backup groups"): one directory per group under
//! a backup root, holding `manifest.json` and, per volume, a chain of qcow2 files — a full copy
//! at point 0, then incrementals whose backing file is the previous point's file, named
//! relatively so that a group can be moved or mounted elsewhere. Every file has a SHA-256 in
//! the manifest; a restore checks them all, and the backing chain, before reading anything.

use schemars::JsonSchema;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic_file;
use crate::error::{AgentError, AgentResult};
use crate::storage::roots::StorageRoots;
use crate::wire::vm::StartVmCmd;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub format_version: u32,
    pub group_uuid: String,
    pub vm_uuid: String,
    /// Point 0 is the full backup; every later one an incremental on the one before.
    pub points: Vec<Point>,
    pub volumes: Vec<BackupVolume>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    Full,
    Incremental,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Point {
    pub index: usize,
    pub kind: PointKind,
    /// Seconds since the Unix epoch.
    pub taken_at: u64,
    /// The VM's spec at that point.
    pub vm: StartVmCmd,
    /// Whether the guest's filesystems were frozen for the point (false in points written
    /// before this field existed).
    #[serde(default)]
    pub quiesced: bool,
    /// The SHA-256 of the copy of the VM's NVRAM taken at that point ([`nvram_file_name`]),
    /// when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram_sha256: Option<String>,
    /// Whether the VM's TPM state at that point was kept ([`tpm_dir_name`]).
    #[serde(default)]
    pub tpm: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupVolume {
    pub volume_uuid: String,
    /// `Root` or `Data`.
    pub volume_type: String,
    pub device_id: u32,
    /// At the newest point.
    pub virtual_size: u64,
    /// One file per point, oldest first.
    pub chain: Vec<BackupFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupFile {
    pub point: usize,
    /// Relative to the group directory: `<volumeUuid>/<point>.qcow2`.
    pub file: String,
    pub virtual_size: u64,
    /// The file's length.
    pub bytes: u64,
    pub sha256: String,
}

/// The relative name of a volume's file at `point`.
pub fn file_name(volume_uuid: &str, point: usize) -> String {
    format!("{volume_uuid}/{point}.qcow2")
}

/// The relative name of the copy of the VM's NVRAM at `point`.
pub fn nvram_file_name(point: usize) -> String {
    format!("nvram/{point}.fd")
}

/// Where a point keeps the VM's TPM state (swtpm's directory, copied at the instant).
pub fn tpm_dir_name(point: usize) -> String {
    format!("tpm/{point}")
}

/// A group directory, inside a backup root.
#[derive(Debug, Clone)]
pub struct Group {
    pub uuid: String,
    pub dir: PathBuf,
}

impl Group {
    /// The group `uuid` under `root` (which must be inside a backup root; the first root when
    /// not given).
    pub fn locate(roots: &StorageRoots, root: Option<&str>, uuid: &str) -> AgentResult<Group> {
        crate::domain::check_uuid(uuid).map_err(|e| e.context("groupUuid"))?;
        let base = match root {
            Some(r) => roots.confine(r).map_err(|e| AgentError::from(e).context("backupRoot"))?,
            None => {
                roots.roots().first().cloned().ok_or_else(|| AgentError::invalid("no backup root is configured"))?
            }
        };
        let dir = base.join(uuid);
        let dir = roots.confine(&dir.to_string_lossy())?;
        Ok(Group { uuid: uuid.to_owned(), dir })
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    /// The manifest; NotFound when the group has none.
    pub fn manifest(&self) -> AgentResult<Manifest> {
        let m: Manifest = match atomic_file::read_json(&self.dir.join(MANIFEST)) {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(AgentError::not_found(format!(
                    "backup group {} has no manifest at {}",
                    self.uuid,
                    self.dir.display()
                )))
            }
            Err(e) => {
                return Err(AgentError::invalid(format!("backup group {}: manifest is unreadable: {e}", self.uuid)))
            }
        };
        if m.format_version != FORMAT_VERSION || m.group_uuid != self.uuid {
            return Err(AgentError::invalid(format!(
                "backup group {}: manifest is for group {} in format {} (this agent reads format {FORMAT_VERSION})",
                self.uuid, m.group_uuid, m.format_version
            )));
        }
        Ok(m)
    }

    /// Forgets the points from `points` on (a point whose task was killed before its result
    /// was recorded, and whose files are removed with it); a manifest with no more is kept.
    pub fn truncate(&self, points: usize) -> AgentResult<()> {
        let mut m = self.manifest()?;
        if m.points.len() <= points {
            return Ok(());
        }
        m.points.truncate(points);
        for v in &mut m.volumes {
            v.chain.retain(|f| f.point < points);
            v.virtual_size = v.chain.last().map_or(v.virtual_size, |f| f.virtual_size);
        }
        self.write_manifest(&m)
    }

    pub fn write_manifest(&self, m: &Manifest) -> AgentResult<()> {
        atomic_file::write_json(&self.dir.join(MANIFEST), m)
            .map_err(|e| AgentError::failed("cannot write the backup manifest", format!("{}: {e}", self.dir.display())))
    }

    /// Checks every file of every volume's chain up to `point` — name, presence, SHA-256, and
    /// that its backing file is exactly the previous file of the chain (so reading it opens
    /// nothing else) — and returns, per volume, the top file of the chain at that point.
    pub fn verify(&self, m: &Manifest, point: usize, roots: &StorageRoots) -> AgentResult<Vec<(String, PathBuf)>> {
        let mut tops = Vec::new();
        for v in &m.volumes {
            let chain: Vec<&BackupFile> = v.chain.iter().filter(|f| f.point <= point).collect();
            if chain.len() != point + 1 || chain.iter().enumerate().any(|(i, f)| f.point != i) {
                return Err(AgentError::invalid(format!(
                    "backup group {}: volume {} has no complete chain up to point {point}",
                    self.uuid, v.volume_uuid
                )));
            }
            let mut previous: Option<&str> = None;
            for f in &chain {
                if f.file != file_name(&v.volume_uuid, f.point) {
                    return Err(AgentError::invalid(format!(
                        "backup group {}: unexpected file name {:?} in the manifest",
                        self.uuid, f.file
                    )));
                }
                let path = roots.confine_existing(&self.path(&f.file).to_string_lossy()).map_err(|e| {
                    AgentError::not_found(format!(
                        "backup group {}: file {} is missing or unusable: {e}",
                        self.uuid, f.file
                    ))
                })?;
                let sum = sha256_file(&path)?;
                if sum != f.sha256 {
                    return Err(AgentError::invalid(format!(
                        "backup group {}: file {} is corrupted (SHA-256 {sum}, manifest says {}); restore from another group",
                        self.uuid, f.file, f.sha256
                    )));
                }
                let header = crate::qemu_img::read_header(&path)
                    .map_err(|e| AgentError::invalid(format!("backup group {}: {}: {e}", self.uuid, f.file)))?;
                let expected = previous.map(|p| Path::new(p).file_name().map(|n| n.to_string_lossy().into_owned()));
                let backing = header.backing_file.clone();
                if header.format != "qcow2" || header.external_data || backing != expected.flatten() {
                    return Err(AgentError::invalid(format!(
                        "backup group {}: {} is not a qcow2 file of this chain (backing file {backing:?})",
                        self.uuid, f.file
                    )));
                }
                previous = Some(&f.file);
            }
            let top = chain.last().expect("a chain has point + 1 files");
            tops.push((v.volume_uuid.clone(), roots.confine_chain(&self.path(&top.file).to_string_lossy())?));
        }
        Ok(tops)
    }
}

/// The lowercase hex SHA-256 of a file's bytes (blocking: call off the async runtime).
pub fn sha256_file(path: &Path) -> AgentResult<String> {
    let fail = |e: std::io::Error| AgentError::failed("cannot read a backup file", format!("{}: {e}", path.display()));
    let mut f = std::fs::File::open(path).map_err(fail)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(fail)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn groups_stay_inside_the_backup_roots() {
        let dir = tempfile::tempdir().unwrap();
        let roots = StorageRoots::new(&[dir.path().to_path_buf()]).unwrap();
        let uuid = "0123456789abcdef0123456789abcdef";
        assert!(Group::locate(&roots, None, uuid).unwrap().dir.starts_with(std::fs::canonicalize(dir.path()).unwrap()));
        assert!(Group::locate(&roots, None, "../x").is_err());
        assert!(Group::locate(&roots, Some("/etc"), uuid).is_err());
    }
}
