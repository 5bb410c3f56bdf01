//! `ceph://<pool>/<image>[@<snap>]` install paths, validated: names are what `rbd` accepts and
//! nothing that could be read as an option or another path.

use std::fmt;

use crate::error::AgentError;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CephPath {
    pub pool: String,
    pub image: String,
    pub snap: Option<String>,
}

/// A pool, image or snapshot name: what `rbd` accepts, and never `.` or `..`, which would read
/// as path components where the name becomes part of a path (QEMU's and libvirt's RBD specs).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('-')
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl CephPath {
    /// Parses `ceph://pool/image[@snap]`; ZStack also sends `pool/image[@snap]` without the scheme.
    pub fn parse(s: &str) -> Result<CephPath, AgentError> {
        let bad = || AgentError::invalid(format!("{s:?} is not a Ceph path (ceph://<pool>/<image>[@<snapshot>])"));
        let rest = s.strip_prefix("ceph://").unwrap_or(s);
        let (pool, image) = rest.split_once('/').ok_or_else(bad)?;
        let (image, snap) = match image.split_once('@') {
            Some((i, snap)) => (i, Some(snap)),
            None => (image, None),
        };
        if !valid_name(pool) || !valid_name(image) || snap.is_some_and(|n| !valid_name(n)) {
            return Err(bad());
        }
        Ok(CephPath { pool: pool.into(), image: image.into(), snap: snap.map(str::to_owned) })
    }

    /// The same path with a snapshot name (which must not already have one).
    pub fn with_snap(&self, snap: &str) -> CephPath {
        CephPath { snap: Some(snap.to_owned()), ..self.clone() }
    }

    pub fn image_spec(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }

    /// `pool/image@snap`, or `pool/image`.
    pub fn spec(&self) -> String {
        match &self.snap {
            Some(s) => format!("{}/{}@{s}", self.pool, self.image),
            None => self.image_spec(),
        }
    }

    pub fn require_snap(&self) -> Result<&str, AgentError> {
        self.snap
            .as_deref()
            .ok_or_else(|| AgentError::invalid(format!("{self} names no snapshot (ceph://pool/image@snap)")))
    }

    pub fn require_image(&self) -> Result<(), AgentError> {
        match &self.snap {
            Some(_) => Err(AgentError::invalid(format!("{self} names a snapshot; an image is expected here"))),
            None => Ok(()),
        }
    }
}

impl fmt::Display for CephPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ceph://{}", self.spec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let p = CephPath::parse("ceph://rbd/vol-1@snap.2").unwrap();
        assert_eq!((p.pool.as_str(), p.image.as_str(), p.snap.as_deref()), ("rbd", "vol-1", Some("snap.2")));
        assert_eq!(CephPath::parse("rbd/img").unwrap().to_string(), "ceph://rbd/img");
        assert_eq!(CephPath::parse("ceph://.rgw.root/..img").unwrap().image, "..img", "dots within a name are fine");
        for bad in [
            "ceph://rbd",
            "ceph:///img",
            "ceph://rbd/a/b",
            "ceph://rbd/-rf",
            "ceph://rbd/a@",
            "ceph://rbd/a b",
            "ceph://rbd/a;x",
            "ceph://../etc",
            "ceph://./img",
            "ceph://rbd/..",
            "ceph://rbd/img@.",
            "../etc",
            "/tmp/x",
        ] {
            assert!(CephPath::parse(bad).is_err(), "{bad}");
        }
    }
}
