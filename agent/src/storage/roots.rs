//! Path confinement (spec §5): every path a command names, and every backing file of a qcow2
//! chain, must resolve — after symlinks — inside a configured storage root. A qcow2 whose
//! backing file points elsewhere (another tenant's disk, `/dev/sda`, `nbd:`...) is the classic
//! backing-file injection; it is refused before anything is opened by QEMU.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use crate::error::{AgentError, ErrorKind};
use crate::qemu_img::{read_header, HeaderError};

const MAX_CHAIN: usize = 64;
/// Linux's limit on a path.
const PATH_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} must be absolute")]
    NotAbsolute(String),
    #[error("a path of {0} bytes is longer than the {PATH_MAX} a path may have")]
    TooLong(usize),
    #[error("path {0:?} contains control characters")]
    BadCharacters(String),
    #[error("path {0:?} contains '..'; name the file directly")]
    DotDot(String),
    #[error("{path} is outside the storage roots {roots}; only paths under the configured storage roots may be used")]
    Outside { path: String, roots: String },
    #[error("{0} does not exist")]
    Missing(String),
    #[error("{0} is not a regular file")]
    NotRegular(String),
    #[error("{image} has backing file {backing:?}, which is not a plain file path; refusing it")]
    BackingProtocol { image: String, backing: String },
    #[error("{0} keeps its data in an external data file; such images are refused")]
    ExternalData(String),
    #[error("the backing chain of {0} is deeper than {MAX_CHAIN} images")]
    ChainTooDeep(String),
    #[error("the backing chain of {0} loops")]
    ChainLoop(String),
    #[error("backing file of {image}: {source}")]
    Backing { image: String, source: Box<PathError> },
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("cannot resolve {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl From<PathError> for AgentError {
    fn from(e: PathError) -> Self {
        let missing = matches!(&e, PathError::Missing(_))
            || matches!(&e, PathError::Backing { source, .. } if matches!(**source, PathError::Missing(_)));
        if missing {
            AgentError::new(ErrorKind::NotFound, "file not found", e.to_string())
        } else {
            AgentError::invalid(e.to_string())
        }
    }
}

/// `p` with its deepest existing ancestor canonicalised (following symlinks) and the rest
/// appended.
fn resolve(p: &Path) -> std::io::Result<PathBuf> {
    let mut existing = p.to_path_buf();
    let mut tail = Vec::new();
    let resolved = loop {
        match std::fs::canonicalize(&existing) {
            Ok(c) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let Some(name) = existing.file_name() else {
                    return Err(e);
                };
                tail.push(name.to_owned());
                existing.pop();
            }
            Err(e) => return Err(e),
        }
    };
    Ok(tail.iter().rev().fold(resolved, |acc, n| acc.join(n)))
}

#[derive(Debug, Clone)]
pub struct StorageRoots {
    roots: Vec<PathBuf>,
}

impl StorageRoots {
    /// The roots are canonicalised so that symlinked roots compare correctly. A root that does
    /// not exist yet is resolved from its deepest existing ancestor (`/localstorage/init` creates
    /// it).
    pub fn new(roots: &[PathBuf]) -> std::io::Result<StorageRoots> {
        let roots = roots.iter().map(|r| resolve(r)).collect::<std::io::Result<Vec<_>>>()?;
        Ok(StorageRoots { roots })
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    fn describe(&self) -> String {
        format!("[{}]", self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "))
    }

    /// Resolves `path` (which need not exist yet) and checks it lies inside a root: the deepest
    /// existing ancestor is canonicalised (following symlinks), the rest appended.
    pub fn confine(&self, path: &str) -> Result<PathBuf, PathError> {
        let full = self.checked(path)?;
        if self.roots.iter().any(|r| full.starts_with(r) && full != *r) {
            Ok(full)
        } else {
            Err(PathError::Outside { path: path.to_owned(), roots: self.describe() })
        }
    }

    /// Like [`confine`](Self::confine), and a storage root itself is accepted too (a directory
    /// the management node names: the storage path, a search directory).
    pub fn confine_dir(&self, path: &str) -> Result<PathBuf, PathError> {
        let full = self.checked(path)?;
        if self.roots.iter().any(|r| full.starts_with(r)) {
            Ok(full)
        } else {
            Err(PathError::Outside { path: path.to_owned(), roots: self.describe() })
        }
    }

    /// Whether `path` is one of the roots (after resolving it).
    pub fn is_root(&self, path: &Path) -> bool {
        self.roots.iter().any(|r| r == path)
    }

    /// `path` checked for shape and resolved (symlinks followed as far as it exists).
    fn checked(&self, path: &str) -> Result<PathBuf, PathError> {
        if path.len() > PATH_MAX {
            return Err(PathError::TooLong(path.len()));
        }
        if path.chars().any(char::is_control) {
            return Err(PathError::BadCharacters(path.to_owned()));
        }
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(PathError::NotAbsolute(path.to_owned()));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(PathError::DotDot(path.to_owned()));
        }
        resolve(p).map_err(|source| PathError::Io { path: path.to_owned(), source })
    }

    /// Like [`confine`](Self::confine), and the file must exist and be a regular file.
    pub fn confine_existing(&self, path: &str) -> Result<PathBuf, PathError> {
        let p = self.confine(path)?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(p),
            Ok(_) => Err(PathError::NotRegular(p.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(PathError::Missing(p.display().to_string())),
            Err(source) => Err(PathError::Io { path: path.to_owned(), source }),
        }
    }

    /// Confines an existing image and every file of its backing chain. Returns the image's
    /// resolved path.
    pub fn confine_chain(&self, path: &str) -> Result<PathBuf, PathError> {
        let top = self.confine_existing(path)?;
        let mut seen = HashSet::from([top.clone()]);
        let mut current = top.clone();
        for _ in 0..MAX_CHAIN {
            let header = read_header(&current)?;
            if header.external_data {
                return Err(PathError::ExternalData(current.display().to_string()));
            }
            let Some(backing) = header.backing_file else {
                return Ok(top);
            };
            let image = current.display().to_string();
            if backing.contains(':') && !backing.starts_with('/') {
                return Err(PathError::BackingProtocol { image, backing });
            }
            let joined = current.parent().map(|d| d.join(&backing)).unwrap_or_else(|| PathBuf::from(&backing));
            let next = self
                .confine_existing(&joined.to_string_lossy())
                .map_err(|source| PathError::Backing { image: image.clone(), source: Box::new(source) })?;
            if !seen.insert(next.clone()) {
                return Err(PathError::ChainLoop(top.display().to_string()));
            }
            current = next;
        }
        Err(PathError::ChainTooDeep(top.display().to_string()))
    }

    /// The files of `path`'s backing chain, parent first (not including `path`). Call after
    /// [`confine_chain`](Self::confine_chain).
    pub fn backing_chain(&self, path: &Path) -> Result<Vec<PathBuf>, PathError> {
        let mut chain = Vec::new();
        let mut current = path.to_path_buf();
        while let Some(b) = read_header(&current)?.backing_file {
            let next = current.parent().map(|d| d.join(&b)).unwrap_or_else(|| PathBuf::from(&b));
            let next = std::fs::canonicalize(&next).map_err(|source| PathError::Io { path: b, source })?;
            if chain.len() >= MAX_CHAIN || chain.contains(&next) {
                return Err(PathError::ChainLoop(path.display().to_string()));
            }
            chain.push(next.clone());
            current = next;
        }
        Ok(chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_img::cli::QemuImgCli;
    use crate::qemu_img::{CreateOptions, QemuImg};
    use crate::stop::Stop;

    fn setup() -> (tempfile::TempDir, StorageRoots) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let roots = StorageRoots::new(&[root]).unwrap();
        (dir, roots)
    }

    #[test]
    fn paths_inside_pass_and_escapes_fail() {
        let (dir, roots) = setup();
        let root = dir.path().join("root");
        assert!(roots.confine(&format!("{}/a/b/new.qcow2", root.display())).is_ok());
        let sibling = dir.path().join("rootX");
        std::fs::create_dir_all(&sibling).unwrap();
        for bad in [
            format!("{}/new.qcow2", sibling.display()),
            format!("{}/a/../../etc/passwd", root.display()),
            "relative/path".to_owned(),
            format!("{}", root.display()),
            format!("{}/x\u{0}y", root.display()),
        ] {
            assert!(roots.confine(&bad).is_err(), "{bad} must be refused");
        }
        std::os::unix::fs::symlink("/etc", root.join("escape")).unwrap();
        let e = roots.confine(&format!("{}/escape/passwd", root.display())).unwrap_err();
        assert!(matches!(e, PathError::Outside { .. }), "{e}");
    }

    #[tokio::test]
    async fn chains_leaving_the_roots_are_refused() {
        let (dir, roots) = setup();
        let root = dir.path().join("root");
        let stop = Stop::new();
        let outside = dir.path().join("outside.qcow2");
        QemuImgCli.create(&outside, 1 << 20, &CreateOptions::default(), &stop).await.unwrap();
        let evil = root.join("evil.qcow2");
        QemuImgCli.create_overlay(&outside, "qcow2", &evil, None, &CreateOptions::default(), &stop).await.unwrap();
        let e = roots.confine_chain(&evil.to_string_lossy()).unwrap_err();
        assert!(e.to_string().contains("outside the storage roots"), "{e}");

        let dev = root.join("dev.qcow2");
        QemuImgCli
            .create_overlay(Path::new("/dev/null"), "raw", &dev, Some(1 << 20), &CreateOptions::default(), &stop)
            .await
            .unwrap();
        assert!(roots.confine_chain(&dev.to_string_lossy()).is_err());

        // An image whose data lives in a file outside the roots.
        let data = dir.path().join("outside.raw");
        let ext = root.join("ext.qcow2");
        let opt = format!("data_file={}", data.display());
        crate::process::run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &opt, ext.to_str().unwrap(), "1M"],
            &stop,
        )
        .await
        .unwrap();
        assert!(matches!(roots.confine_chain(&ext.to_string_lossy()), Err(PathError::ExternalData(_))));

        let base = root.join("base.qcow2");
        let good = root.join("good.qcow2");
        QemuImgCli.create(&base, 1 << 20, &CreateOptions::default(), &stop).await.unwrap();
        QemuImgCli.create_overlay(&base, "qcow2", &good, None, &CreateOptions::default(), &stop).await.unwrap();
        assert!(roots.confine_chain(&good.to_string_lossy()).is_ok());
        assert_eq!(roots.backing_chain(&good).unwrap(), vec![std::fs::canonicalize(&base).unwrap()]);
    }
}
