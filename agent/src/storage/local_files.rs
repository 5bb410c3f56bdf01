//! Files and directories of local storage as ZStack's management node manages them besides
//! volumes: usage, directories removed whole, extra hard links dropped, who references an
//! image. Every path is confined to the storage roots; symlinks inside a tree are never
//! followed.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{AgentError, AgentResult};
use crate::qemu_img::read_header;
use crate::storage::roots::StorageRoots;

/// Every regular file under `dir` (not following symlinks), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), out),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// Bytes `path` takes on disk, each inode counted once (`du --block-size=1`).
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(p: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
        let Ok(m) = std::fs::symlink_metadata(p) else { return 0 };
        if !seen.insert((m.dev(), m.ino())) {
            return 0;
        }
        let own = m.blocks() * 512;
        if !m.is_dir() {
            return own;
        }
        own + std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| walk(&e.path(), seen)).sum::<u64>()
    }
    walk(path, &mut HashSet::new())
}

/// The files every process has open (one scan of `/proc/*/fd`).
fn open_files() -> HashSet<PathBuf> {
    let mut out = HashSet::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        for fd in std::fs::read_dir(p.path().join("fd")).into_iter().flatten().flatten() {
            if let Ok(t) = std::fs::read_link(fd.path()) {
                out.insert(t);
            }
        }
    }
    out
}

/// The file a qcow2 file's header names as its backing file, resolved beside it; `None` for
/// anything else.
pub fn backing_of(file: &Path) -> Option<PathBuf> {
    let b = read_header(file).ok()?.backing_file?;
    std::fs::canonicalize(file.parent()?.join(b)).ok()
}

/// A directory inside the roots (a root itself is refused: it is never removed).
fn confine_tree(roots: &StorageRoots, path: &str, what: &str) -> AgentResult<PathBuf> {
    let p = roots.confine(path).map_err(|e| AgentError::from(e).context(what.to_owned()))?;
    if std::fs::symlink_metadata(Path::new(path)).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(AgentError::invalid(format!("{what} {path} is a symbolic link; name the directory itself")));
    }
    Ok(p)
}

/// What a directory removal found.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// A process has this file open: nothing was removed.
    InUse(PathBuf),
}

/// Removes the directory `path` and everything in it, unless a process has a file in it open
/// or a file elsewhere under the roots is backed by one in it (removing it would break that
/// volume). A directory already gone is success.
pub fn delete_dir(roots: &StorageRoots, path: &str) -> AgentResult<Removal> {
    let dir = confine_tree(roots, path, "path")?;
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Removal::Removed),
        Err(e) => return Err(AgentError::failed("cannot read the directory", format!("{}: {e}", dir.display()))),
        Ok(m) if !m.is_dir() => {
            return Err(AgentError::invalid(format!(
                "{} is not a directory; delete a volume file with /localstorage/delete",
                dir.display()
            )))
        }
        Ok(_) => {}
    }
    let inside = files_under(&dir);
    let open = open_files();
    if let Some(f) = inside.iter().find(|f| open.contains(*f)) {
        return Ok(Removal::InUse(f.clone()));
    }
    let user = roots
        .roots()
        .iter()
        .flat_map(|r| files_under(r))
        .filter(|f| !f.starts_with(&dir))
        .find(|f| backing_of(f).is_some_and(|b| b.starts_with(&dir)));
    if let Some(user) = user {
        return Err(AgentError::conflict(format!(
            "{} is the backing file of {}, which is outside {}; delete or flatten that volume first",
            backing_of(&user).map(|b| b.display().to_string()).unwrap_or_default(),
            user.display(),
            dir.display()
        )));
    }
    std::fs::remove_dir_all(&dir)
        .map_err(|e| AgentError::failed("cannot delete the directory", format!("{}: {e}", dir.display())))?;
    Ok(Removal::Removed)
}

/// Drops the link `path` (or each file's link under the directory `path`) when the file has
/// another link, so no data goes; single-link files are kept. Refused, changing nothing, when a
/// process has one of them open. A path already gone is success.
pub fn unlink_extra_links(roots: &StorageRoots, path: &str) -> AgentResult<Removal> {
    let p = confine_tree(roots, path, "installPath")?;
    let files = match std::fs::symlink_metadata(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Removal::Removed),
        Err(e) => return Err(AgentError::failed("cannot read the path", format!("{}: {e}", p.display()))),
        Ok(m) if m.is_dir() => files_under(&p),
        Ok(m) if m.is_file() => vec![p.clone()],
        Ok(_) => return Err(AgentError::invalid(format!("{} is neither a file nor a directory", p.display()))),
    };
    let linked: Vec<PathBuf> =
        files.into_iter().filter(|f| std::fs::symlink_metadata(f).is_ok_and(|m| m.nlink() > 1)).collect();
    let open = open_files();
    if let Some(f) = linked.iter().find(|f| open.contains(*f)) {
        return Ok(Removal::InUse(f.clone()));
    }
    for f in &linked {
        std::fs::remove_file(f)
            .map_err(|e| AgentError::failed("cannot unlink the file", format!("{}: {e}", f.display())))?;
    }
    Ok(Removal::Removed)
}

/// Files under `dir` whose backing file is `target`.
pub fn references(dir: &Path, target: &Path) -> Vec<PathBuf> {
    files_under(dir).into_iter().filter(|f| backing_of(f).as_deref() == Some(target)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_each_inode_once_and_unlink_keeps_single_links() {
        let d = tempfile::tempdir().unwrap();
        let roots = StorageRoots::new(&[d.path().to_path_buf()]).unwrap();
        let a = d.path().join("src/a");
        std::fs::create_dir_all(a.parent().unwrap()).unwrap();
        std::fs::write(&a, vec![1u8; 8192]).unwrap();
        std::fs::create_dir_all(d.path().join("dst")).unwrap();
        std::fs::write(d.path().join("src/single"), b"x").unwrap();
        let before = disk_usage(d.path());
        assert!(before >= 8192);
        std::fs::hard_link(&a, d.path().join("dst/a")).unwrap();
        assert_eq!(disk_usage(d.path()), before, "a second link adds no data");
        let src = d.path().join("src").display().to_string();
        assert_eq!(unlink_extra_links(&roots, &src).unwrap(), Removal::Removed);
        assert!(!a.exists() && d.path().join("dst/a").exists() && d.path().join("src/single").exists());
        assert_eq!(unlink_extra_links(&roots, &format!("{src}/gone")).unwrap(), Removal::Removed);
        assert!(unlink_extra_links(&roots, "/etc").is_err());
        assert!(unlink_extra_links(&roots, &d.path().display().to_string()).is_err(), "a root itself");
    }

    #[test]
    fn a_directory_a_process_uses_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let roots = StorageRoots::new(&[d.path().to_path_buf()]).unwrap();
        let f = d.path().join("v/x");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, b"x").unwrap();
        let held = std::fs::File::open(&f).unwrap();
        let v = d.path().join("v").display().to_string();
        assert_eq!(delete_dir(&roots, &v).unwrap(), Removal::InUse(f.canonicalize().unwrap()));
        drop(held);
        // A child another test is spawning holds a copy of our descriptors until its exec.
        let removed = (0..100).any(|_| {
            let r = delete_dir(&roots, &v).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(10));
            r == Removal::Removed
        });
        assert!(removed, "still in use after the file was closed");
        assert!(!d.path().join("v").exists());
        assert_eq!(delete_dir(&roots, &v).unwrap(), Removal::Removed, "again: already gone");
        std::os::unix::fs::symlink("/etc", d.path().join("link")).unwrap();
        assert!(delete_dir(&roots, &d.path().join("link").display().to_string()).is_err());
        assert!(std::path::Path::new("/etc/passwd").exists());
    }
}
