//! Where a volume lives, parsed once: a file under the storage roots, or an RBD image (or one
//! of its snapshots) named `ceph://<pool>/<image>[@<snap>]`. This is the only place that looks
//! at an install path's prefix; everything else asks a [`Location`].

use std::path::PathBuf;

use crate::ceph::path::CephPath;
use crate::error::AgentResult;
use crate::storage::roots::StorageRoots;

const RBD_SCHEME: &str = "ceph://";

/// Shown and persisted as its install path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A file path as given (see [`Location::confined`] for one resolved inside the roots).
    File(PathBuf),
    Rbd(CephPath),
}

impl Location {
    /// Parses an install path: `ceph://…` is an RBD image or snapshot (validated), anything
    /// else a file path (not yet confined).
    pub fn parse(s: &str) -> AgentResult<Location> {
        if s.starts_with(RBD_SCHEME) {
            Ok(Location::Rbd(CephPath::parse(s)?))
        } else {
            Ok(Location::File(PathBuf::from(s)))
        }
    }

    /// Like [`parse`](Self::parse), with a file path resolved inside `roots` (symlinks
    /// followed, so two spellings of one file give one location).
    pub fn confined(s: &str, roots: &StorageRoots) -> AgentResult<Location> {
        match Location::parse(s)? {
            Location::File(_) => Ok(Location::File(roots.confine(s)?)),
            rbd => Ok(rbd),
        }
    }

    /// Whether `s` names an RBD image or snapshot (by its scheme only; not validated).
    pub fn is_rbd(s: &str) -> bool {
        s.starts_with(RBD_SCHEME)
    }

    /// The identity two commands on one volume share: the resolved file, or `pool/image` (a
    /// snapshot of an image is guarded by its image's lock).
    pub fn lock_key(&self) -> String {
        match self {
            Location::File(p) => format!("file:{}", p.display()),
            Location::Rbd(p) => format!("rbd:{}", p.image_spec()),
        }
    }

    /// The install path of a new RBD image `image` in `pool`.
    pub fn rbd_image(pool: &str, image: &str) -> String {
        format!("{RBD_SCHEME}{pool}/{image}")
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Rbd(p) => write!(f, "{p}"),
        }
    }
}

impl serde::Serialize for Location {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Location {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Location::parse(&s).map_err(|e| serde::de::Error::custom(e.details))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds() {
        assert!(
            matches!(Location::parse("ceph://rbd/img@s").unwrap(), Location::Rbd(p) if p.snap.as_deref() == Some("s"))
        );
        assert_eq!(Location::parse("/a/b.qcow2").unwrap(), Location::File("/a/b.qcow2".into()));
        assert!(Location::parse("ceph://rbd/../x").is_err());
        assert!(Location::is_rbd("ceph://p/i") && !Location::is_rbd("/ceph://p/i"));
    }

    #[test]
    fn spellings_of_one_volume_share_a_key() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("d"), dir.path().join("link")).unwrap();
        let roots = StorageRoots::new(&[dir.path().to_path_buf()]).unwrap();
        let r = dir.path().display();
        let key = |s: &str| Location::confined(s, &roots).unwrap().lock_key();
        let plain = key(&format!("{r}/d/v.qcow2"));
        for other in [format!("{r}//d/v.qcow2"), format!("{r}/./d/v.qcow2"), format!("{r}/link/v.qcow2")] {
            assert_eq!(key(&other), plain, "{other}");
        }
        assert_ne!(key(&format!("{r}/d/w.qcow2")), plain);
        assert_eq!(key("ceph://p/i@snap"), key("ceph://p/i"));
    }
}
