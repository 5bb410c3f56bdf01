//! Local qcow2 volumes under the storage roots. Every new volume is built under a temporary
//! name in its target directory, flushed, and then linked into place with `link(2)`, which
//! refuses an existing target: a failed or stopped build leaves no half-made volume, and an
//! existing volume is never overwritten.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{AgentError, AgentResult, ErrorKind};
use crate::qemu_img::{self, Convert, CreateOptions, QemuImg};
use crate::stop::{Stop, Stoppable};
use crate::storage::roots::StorageRoots;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    Thin,
    Thick,
}

/// How thick volumes are allocated: reserved with fallocate, not written (fast, and the space
/// is guaranteed).
const THICK: &str = "falloc";

/// What to do when a new volume's target exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse: a volume is never overwritten.
    Refuse,
    /// Replace it when it is an overlay on the same image that holds no data of its own and no
    /// process has open (what a failed earlier attempt left); refuse anything else.
    ReplaceLeftover,
}

/// How a volume is made from an image.
#[derive(Debug, Clone, Copy)]
pub struct FromImage<'a> {
    /// Grows the volume beyond the image's virtual size.
    pub size: Option<u64>,
    pub provisioning: Provisioning,
    /// `kvmHostAddons.qcow2Options` (preallocation is dropped for overlays).
    pub opts: &'a CreateOptions,
    pub existing: Existing,
}

impl FromImage<'_> {
    /// A thin overlay of the image's size with default options; an existing target is refused.
    pub const THIN: FromImage<'static> = FromImage {
        size: None,
        provisioning: Provisioning::Thin,
        opts: &CreateOptions { pairs: Vec::new() },
        existing: Existing::Refuse,
    };
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Capacity {
    pub total: u64,
    pub available: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct FlattenEstimate {
    pub virtual_size: u64,
    pub flat_size: u64,
    pub bytes_to_add: u64,
}

#[derive(Clone)]
pub struct LocalStorage {
    roots: StorageRoots,
    qemu_img: Arc<dyn QemuImg>,
}

/// The infix of this process's temporary files: `kvmagent-tmp-<run>-`, with `<run>` drawn once
/// per process. The start-up recovery removes every temporary file without it, whatever its age:
/// a killed run's copy may still be finishing a write when the next run starts.
pub(crate) fn temporary_infix() -> &'static str {
    static INFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INFIX.get_or_init(|| format!("kvmagent-tmp-{}-", &uuid::Uuid::new_v4().simple().to_string()[..12]))
}

/// A volume file being built beside its final name; removed on drop unless published.
pub(crate) struct Building {
    tmp: PathBuf,
    published: bool,
}

impl Building {
    pub(crate) fn beside(dst: &Path) -> Building {
        let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dst.with_file_name(format!(".{name}.{}{}", temporary_infix(), uuid::Uuid::new_v4().simple()));
        Building { tmp, published: false }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes the new file and links it to `dst`; fails if `dst` appeared meanwhile.
    pub(crate) fn publish(self, dst: &Path) -> AgentResult<()> {
        crate::atomic_file::blocking(|| self.publish_here(dst))
    }

    fn publish_here(mut self, dst: &Path) -> AgentResult<()> {
        let fail = |e: std::io::Error| {
            AgentError::failed("cannot put the new volume in place", format!("{}: {e}", dst.display()))
        };
        std::fs::File::open(&self.tmp).and_then(|f| f.sync_all()).map_err(fail)?;
        std::fs::hard_link(&self.tmp, dst).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                exists(dst)
            } else {
                fail(e)
            }
        })?;
        self.published = true;
        let _ = std::fs::remove_file(&self.tmp);
        if let Some(dir) = dst.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
        }
        Ok(())
    }
}

impl Building {
    /// Flushes the new file and renames it over `dst`, which it replaces atomically (flatten,
    /// rebase: same volume, new content).
    fn replace(self, dst: &Path) -> AgentResult<()> {
        crate::atomic_file::blocking(|| self.replace_here(dst))
    }

    fn replace_here(mut self, dst: &Path) -> AgentResult<()> {
        let fail = |e: std::io::Error| {
            AgentError::failed("cannot put the rewritten volume in place", format!("{}: {e}", dst.display()))
        };
        std::fs::File::open(&self.tmp).and_then(|f| f.sync_all()).map_err(fail)?;
        std::fs::rename(&self.tmp, dst).map_err(fail)?;
        self.published = true;
        if let Some(dir) = dst.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
        }
        Ok(())
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn exists(dst: &Path) -> AgentError {
    AgentError::conflict(format!(
        "volume {} already exists; delete it first or choose another install path",
        dst.display()
    ))
}

fn stopped_or(e: qemu_img::QemuImgError, stop: &Stop, what: &str) -> AgentError {
    if e.was_stopped() {
        stop.error(what)
    } else {
        AgentError::from(e).context(format!("{what} failed"))
    }
}

/// The largest virtual size a qcow2 made with `opts` can hold: QEMU's L1 table has at most 2^22
/// entries, each mapping an L2 table of `cluster / 8` entries (`cluster / 16` with extended L2).
pub fn max_virtual_size(opts: &CreateOptions) -> u64 {
    let get = |key: &str| opts.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let cluster = get("cluster_size").and_then(|v| v.parse::<u64>().ok()).unwrap_or(64 << 10);
    let entry = if get("extended_l2") == Some("on") { 16 } else { 8 };
    (1u64 << 22).saturating_mul(cluster / entry).saturating_mul(cluster)
}

/// Refuses a size qemu-img would refuse, before anything is made (qemu-img fails on it only
/// after it created the file).
pub fn check_size(size: u64, opts: &CreateOptions) -> AgentResult<()> {
    let max = max_virtual_size(opts);
    if size > max {
        return Err(AgentError::invalid(format!(
            "size {size} is larger than a qcow2 volume with these options can be ({max} bytes)"
        )));
    }
    Ok(())
}

impl LocalStorage {
    pub fn new(roots: StorageRoots, qemu_img: Arc<dyn QemuImg>) -> Self {
        LocalStorage { roots, qemu_img }
    }

    pub fn roots(&self) -> &StorageRoots {
        &self.roots
    }

    /// Free and total bytes of the file system holding `path` (or the first root).
    pub fn capacity(&self, path: Option<&Path>) -> Capacity {
        let target = path.and_then(|p| p.ancestors().find(|a| a.exists())).unwrap_or_else(|| &self.roots.roots()[0]);
        match nix::sys::statvfs::statvfs(target) {
            Ok(s) => {
                Capacity { total: s.blocks() * s.fragment_size(), available: s.blocks_available() * s.fragment_size() }
            }
            Err(_) => Capacity::default(),
        }
    }

    /// Checks a new volume's target: inside the roots, not existing; creates its directory.
    fn prepare_target(&self, dst: &str) -> AgentResult<PathBuf> {
        let dst = self.roots.confine(dst)?;
        if dst.symlink_metadata().is_ok() {
            return Err(exists(&dst));
        }
        if let Some(dir) = dst.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                AgentError::failed("cannot create the volume directory", format!("{}: {e}", dir.display()))
            })?;
        }
        Ok(dst)
    }

    /// A new volume at `dst` from the cached image `image`: a thin overlay on it, or a thick
    /// (flat, preallocated) copy. `spec.size` grows the volume beyond the image's virtual size.
    pub async fn create_from_image(
        &self,
        image: &str,
        dst: &str,
        spec: &FromImage<'_>,
        stop: &Stop,
    ) -> AgentResult<PathBuf> {
        let image = self.roots.confine_chain(image).map_err(|e| match e {
            crate::storage::roots::PathError::Missing(p) => {
                AgentError::not_found(format!("unable to find image in cache: {p}"))
            }
            other => other.into(),
        })?;
        let header = qemu_img::read_header(&image).map_err(|e| AgentError::invalid(e.to_string()))?;
        let image_size =
            self.qemu_img.info(&image, stop).await.map_err(|e| stopped_or(e, stop, "reading the image"))?.virtual_size;
        let grow = match spec.size {
            Some(s) if s > image_size => {
                check_size(s, spec.opts)?;
                Some(s)
            }
            Some(s) if s != 0 && s < image_size => {
                return Err(AgentError::invalid(format!(
                    "size {s} is smaller than the image's virtual size {image_size}; volumes cannot shrink"
                )))
            }
            _ => None,
        };
        let (dst, leftover) = match (self.prepare_target(dst), spec.existing) {
            (Ok(dst), _) => (dst, false),
            (Err(e), Existing::ReplaceLeftover) if e.kind == ErrorKind::Conflict => {
                (self.leftover_overlay(dst, &image).ok_or(e)?, true)
            }
            (Err(e), _) => return Err(e),
        };
        let building = Building::beside(&dst);
        match spec.provisioning {
            Provisioning::Thin => self
                .qemu_img
                .create_overlay(&image, header.format, &building.tmp, grow, spec.opts, stop)
                .await
                .map_err(|e| stopped_or(e, stop, "creating the overlay"))?,
            Provisioning::Thick => {
                let mut opts = spec.opts.without_preallocation();
                opts.pairs.push(("preallocation".into(), THICK.into()));
                self.copy_into(&image, header.format, &building, &opts, stop, &mut |_| {}).await?;
                if let Some(s) = grow {
                    self.qemu_img
                        .resize(&building.tmp, s, stop)
                        .await
                        .map_err(|e| stopped_or(e, stop, "resizing the copy"))?;
                }
            }
        }
        stop.check("creating the volume")?;
        if !leftover {
            building.publish(&dst)?;
            return Ok(dst);
        }
        // A leftover holds nothing of its own when it is no larger than the fresh overlay (every
        // guest write allocates clusters at the file's end).
        let len = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.len()).unwrap_or(u64::MAX);
        if len(&dst) > len(&building.tmp) || is_open_by_any_process(&dst) {
            return Err(exists(&dst));
        }
        building.replace(&dst)?;
        Ok(dst)
    }

    /// `dst` when it is a thin overlay on `image` that no process has open: what an earlier
    /// attempt of the same create left (the caller checks it holds no data).
    fn leftover_overlay(&self, dst: &str, image: &Path) -> Option<PathBuf> {
        let dst = self.roots.confine(dst).ok()?;
        if !std::fs::symlink_metadata(&dst).ok()?.is_file() || is_open_by_any_process(&dst) {
            return None;
        }
        let backing = qemu_img::read_header(&dst).ok()?.backing_file?;
        let backing = std::fs::canonicalize(dst.parent()?.join(backing)).ok()?;
        (backing == image).then_some(dst)
    }

    /// A new empty qcow2 at `dst`, optionally on a backing file. Without one, thick volumes are
    /// preallocated.
    pub async fn create_empty(
        &self,
        dst: &str,
        size: u64,
        backing: Option<&str>,
        provisioning: Provisioning,
        opts: CreateOptions,
        stop: &Stop,
    ) -> AgentResult<PathBuf> {
        let backing = match backing.filter(|b| !b.is_empty()) {
            Some(b) => {
                let b = self.roots.confine_chain(b)?;
                let fmt = qemu_img::read_header(&b).map_err(|e| AgentError::invalid(e.to_string()))?.format;
                Some((b, fmt))
            }
            None if size == 0 => {
                return Err(AgentError::invalid("size must be greater than 0 for a volume without a backing file"))
            }
            None => None,
        };
        check_size(size, &opts)?;
        let dst = self.prepare_target(dst)?;
        let building = Building::beside(&dst);
        let result = match &backing {
            Some((b, fmt)) => {
                self.qemu_img.create_overlay(b, fmt, &building.tmp, (size > 0).then_some(size), &opts, stop).await
            }
            None => {
                let mut opts = opts;
                if provisioning == Provisioning::Thick && !opts.pairs.iter().any(|(k, _)| k == "preallocation") {
                    opts.pairs.push(("preallocation".into(), THICK.into()));
                }
                self.qemu_img.create(&building.tmp, size, &opts, stop).await
            }
        };
        result.map_err(|e| stopped_or(e, stop, "creating the volume"))?;
        stop.check("creating the volume")?;
        building.publish(&dst)?;
        Ok(dst)
    }

    /// A flat, sparse qcow2 copy of `src` and its whole backing chain at `dst` (a template, a
    /// full clone). `on_progress` gets percentages. The source is only read.
    pub async fn create_flat_copy(
        &self,
        src: &str,
        dst: &str,
        opts: &CreateOptions,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> AgentResult<PathBuf> {
        let src = self.roots.confine_chain(src)?;
        self.copy_flat(&src, dst, opts, stop, on_progress).await
    }

    /// Like [`create_flat_copy`](Self::create_flat_copy) from a chain the caller has already
    /// confined (to other roots: a backup chain).
    pub async fn copy_flat(
        &self,
        src: &Path,
        dst: &str,
        opts: &CreateOptions,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> AgentResult<PathBuf> {
        let format = qemu_img::read_header(src).map_err(|e| AgentError::invalid(e.to_string()))?.format;
        let dst = self.prepare_target(dst)?;
        let building = Building::beside(&dst);
        self.copy_into(src, format, &building, opts, stop, on_progress).await?;
        stop.check("copying the volume")?;
        building.publish(&dst)?;
        Ok(dst)
    }

    /// An existing volume no running process has open, to rewrite offline.
    fn offline_volume(&self, path: &str) -> AgentResult<PathBuf> {
        let path = self.roots.confine_chain(path)?;
        if let Some(holder) = process_holding(&path) {
            return Err(AgentError::conflict(format!(
                "volume {} is in use by {holder}; flatten a running VM's disk live instead",
                path.display()
            )));
        }
        Ok(path)
    }

    /// Flattens a volume offline: a flat copy of its chain is built beside it and renamed over
    /// it, so it never is half-flattened. Returns false (and does nothing) when it has no backing
    /// file.
    pub async fn flatten_offline(
        &self,
        path: &str,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> AgentResult<bool> {
        let path = self.offline_volume(path)?;
        let header = qemu_img::read_header(&path).map_err(|e| AgentError::invalid(e.to_string()))?;
        if header.backing_file.is_none() {
            return Ok(false);
        }
        let building = Building::beside(&path);
        self.copy_into(&path, header.format, &building, &CreateOptions::default(), stop, on_progress).await?;
        stop.check("flattening the volume")?;
        building.replace(&path)?;
        Ok(true)
    }

    /// Rebases a volume offline onto `backing` (safe mode: it reads the same afterwards), on a
    /// copy that then replaces it.
    pub async fn rebase_offline(&self, path: &str, backing: &str, stop: &Stop) -> AgentResult<()> {
        let path = self.offline_volume(path)?;
        let backing = self.roots.confine_chain(backing)?;
        let fmt = qemu_img::read_header(&backing).map_err(|e| AgentError::invalid(e.to_string()))?.format;
        let building = Building::beside(&path);
        // A whole volume: the runtime worker's other requests move elsewhere meanwhile.
        crate::atomic_file::blocking(|| std::fs::copy(&path, &building.tmp)).map_err(|e| {
            AgentError::failed("cannot copy the volume to rebase it", format!("{}: {e}", path.display()))
        })?;
        self.qemu_img
            .rebase(&building.tmp, &backing, fmt, stop)
            .await
            .map_err(|e| stopped_or(e, stop, "rebasing the volume"))?;
        stop.check("rebasing the volume")?;
        building.replace(&path)?;
        Ok(())
    }

    /// What flattening `path` would do, from metadata only (`qemu-img measure` walks allocation
    /// maps; no data is read): `(virtual size, bytes of the flat result, bytes it adds)`.
    pub async fn estimate_flatten(&self, path: &str, stop: &Stop) -> AgentResult<FlattenEstimate> {
        let path = self.roots.confine_chain(path)?;
        let info = self.qemu_img.info(&path, stop).await?;
        if info.backing_filename.is_none() {
            return Ok(FlattenEstimate {
                virtual_size: info.virtual_size,
                flat_size: info.actual_size,
                bytes_to_add: 0,
            });
        }
        let m = self.qemu_img.measure(&path, &info.format, stop).await?;
        Ok(FlattenEstimate {
            virtual_size: info.virtual_size,
            flat_size: m.required,
            bytes_to_add: m.required.saturating_sub(info.actual_size),
        })
    }

    /// `(virtual size, bytes allocated on disk)` of an existing volume.
    pub async fn sizes(&self, path: &str, stop: &Stop) -> AgentResult<(u64, u64)> {
        let path = self.roots.confine_existing(path)?;
        Ok(self.qemu_img.sizes(&path, stop).await?)
    }

    /// Deletes a volume file. Returns `false` (and deletes nothing) when a process has it open.
    /// A file that is already gone is success.
    pub fn delete(&self, path: &str) -> AgentResult<bool> {
        let path = self.roots.confine(path)?;
        if path.symlink_metadata().is_err() {
            return Ok(true);
        }
        if !path.is_file() {
            return Err(AgentError::invalid(format!("{} is not a volume file", path.display())));
        }
        if is_open_by_any_process(&path) {
            return Ok(false);
        }
        std::fs::remove_file(&path)
            .map_err(|e| AgentError::failed("cannot delete the volume", format!("{}: {e}", path.display())))?;
        // ZStack gives each volume its own vol-<uuid> directory: remove it once empty.
        if let Some(dir) =
            path.parent().filter(|d| d.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vol-")))
        {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(true)
    }

    /// Converts `src` (with its chain) into the file being built.
    async fn copy_into(
        &self,
        src: &Path,
        format: &str,
        into: &Building,
        opts: &CreateOptions,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> AgentResult<()> {
        self.qemu_img
            .convert(Convert::to_qcow2(src, format, &into.tmp, opts), stop, on_progress)
            .await
            .map_err(|e| stopped_or(e, stop, "copying the volume"))
    }
}

/// Whether any process holds `path` open (scans `/proc/*/fd`).
pub fn is_open_by_any_process(path: &Path) -> bool {
    process_holding(path).is_some()
}

/// A process that holds `path` open, as `pid N (name)`, for errors an operator acts on.
/// Processes already being killed (a killed agent, or a copy it ran, still finishing a write
/// before it can exit) hold the file only until then: they are not users of the volume.
pub fn process_holding(path: &Path) -> Option<String> {
    let procs = std::fs::read_dir("/proc").ok()?;
    procs.flatten().filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit())).find_map(|p| {
        let holds = std::fs::read_dir(p.path().join("fd"))
            .map(|fds| fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == path)))
            .unwrap_or(false);
        if !holds || being_killed(&p.path()) {
            return None;
        }
        let name = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        Some(format!("pid {} ({})", p.file_name().to_string_lossy(), name.trim()))
    })
}

/// Whether any thread of process `dir` (`/proc/<pid>`) has a SIGKILL pending or is exiting:
/// the thread that took the signal may be on its way out while another finishes a write.
fn being_killed(dir: &Path) -> bool {
    let threads = std::fs::read_dir(dir.join("task")).into_iter().flatten().flatten();
    threads.map(|t| t.path()).any(|t| {
        std::fs::read_to_string(t.join("status")).is_ok_and(|s| kill_pending(&s))
            || std::fs::read_to_string(t.join("stat")).is_ok_and(|s| exiting(&s))
    })
}

/// Whether `/proc/<pid>/task/<tid>/stat` text shows the thread exiting (`PF_EXITING` in its
/// flags, the 9th field; the command name before it may hold spaces and parentheses).
fn exiting(stat: &str) -> bool {
    const PF_EXITING: u64 = 0x4;
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after_name.split_whitespace().nth(6).and_then(|f| f.parse::<u64>().ok()).is_some_and(|f| f & PF_EXITING != 0)
}

/// Whether `/proc/<pid>/status` text shows a SIGKILL pending, or the task dying (zombie or
/// dead): the process is being killed.
fn kill_pending(status: &str) -> bool {
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    status.lines().any(|l| {
        let pending = l.strip_prefix("SigPnd:").or_else(|| l.strip_prefix("ShdPnd:"));
        let dying = l.strip_prefix("State:").is_some_and(|s| matches!(s.trim().chars().next(), Some('Z' | 'X')));
        dying || pending.is_some_and(|mask| u64::from_str_radix(mask.trim(), 16).is_ok_and(|m| m & SIGKILL_BIT != 0))
    })
}

/// Parses `kvmHostAddons.qcow2Options` (e.g. `" -o cluster_size=2097152 -o preallocation=metadata"`)
/// into whitelisted options. Anything else is refused: this string must never be able to add
/// other qemu-img arguments.
pub fn parse_qcow2_options(s: &str) -> AgentResult<CreateOptions> {
    let bad = |why: String| {
        AgentError::new(
            ErrorKind::InvalidArgument,
            "invalid command",
            format!("kvmHostAddons.qcow2Options {s:?}: {why}"),
        )
    };
    let mut words = s.split_whitespace();
    let mut pairs = Vec::new();
    while let Some(w) = words.next() {
        if w != "-o" {
            return Err(bad(format!("unexpected {w:?}; only `-o key=value` is accepted")));
        }
        let spec = words.next().ok_or_else(|| bad("`-o` without a value".into()))?;
        for kv in spec.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
            let ok = match k {
                "cluster_size" => v.parse::<u64>().is_ok_and(|n| n.is_power_of_two() && (512..=2 << 20).contains(&n)),
                "preallocation" => matches!(v, "off" | "metadata" | "falloc" | "full"),
                "lazy_refcounts" | "extended_l2" => matches!(v, "on" | "off"),
                "compat" => matches!(v, "0.10" | "1.1"),
                _ => return Err(bad(format!("option {k:?} is not allowed"))),
            };
            if !ok {
                return Err(bad(format!("value {v:?} is not valid for {k}")));
            }
            pairs.push((k.to_owned(), v.to_owned()));
        }
    }
    Ok(CreateOptions { pairs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_img::cli::QemuImgCli;

    #[test]
    fn a_process_being_killed_is_told_by_its_pending_sigkill() {
        let status =
            |sig: &str, shd: &str| format!("Name:\tqemu-img\nState:\tD (disk sleep)\nSigPnd:\t{sig}\nShdPnd:\t{shd}\n");
        assert!(kill_pending(&status("0000000000000000", "0000000000000100")), "a kill sent to the process");
        assert!(kill_pending(&status("0000000000000100", "0000000000000000")), "a kill sent to the thread");
        assert!(!kill_pending(&status("0000000000000000", "0000000000004002")), "SIGTERM and SIGINT are not SIGKILL");
        assert!(!kill_pending("Name:\tx\n"));
        assert!(kill_pending("Name:\tqemu-img\nState:\tZ (zombie)\nSigPnd:\t0000000000000000\n"), "a zombie");
        let stat = |flags: u64| format!("4242 (qemu-img (x)) D 1 4242 4242 0 -1 {flags} 0 0");
        assert!(exiting(&stat(0x404044)) && !exiting(&stat(0x400040)), "PF_EXITING in the flags");
        // This very thread is not exiting: the flags are read from the right field.
        let own = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        assert!(!exiting(&own), "{own}");
        // A living process that holds the file counts.
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("v");
        std::fs::write(&f, b"x").unwrap();
        let held = std::fs::File::open(&f).unwrap();
        assert!(is_open_by_any_process(&f.canonicalize().unwrap()));
        drop(held);
    }

    fn setup() -> (tempfile::TempDir, LocalStorage, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        let root = std::fs::canonicalize(root).unwrap();
        (dir, LocalStorage::new(StorageRoots::new(std::slice::from_ref(&root)).unwrap(), Arc::new(QemuImgCli)), root)
    }

    async fn empty(s: &LocalStorage, path: &str, size: u64, p: Provisioning) -> PathBuf {
        s.create_empty(path, size, None, p, CreateOptions::default(), &Stop::new()).await.unwrap()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn sizes_qcow2_cannot_hold_are_refused_before_anything_is_made() {
        let (_dir, s, root) = setup();
        let wide = parse_qcow2_options("-o cluster_size=2097152").unwrap();
        assert_eq!(max_virtual_size(&CreateOptions::default()), 2 << 50, "2 PiB with 64 KiB clusters");
        assert_eq!(max_virtual_size(&wide), 2 << 60);
        assert_eq!(max_virtual_size(&parse_qcow2_options("-o extended_l2=on").unwrap()), 1 << 50);
        // qemu-img agrees at the edge: the largest size is made, one cluster more is not.
        let edge = root.join("edge/edge.qcow2");
        empty(&s, edge.to_str().unwrap(), 2 << 50, Provisioning::Thin).await;
        for size in [(2 << 50) + (64 << 10), 4 << 60, u64::MAX] {
            let target = root.join("vol-x/x.qcow2");
            let e = s
                .create_empty(
                    target.to_str().unwrap(),
                    size,
                    None,
                    Provisioning::Thin,
                    CreateOptions::default(),
                    &Stop::new(),
                )
                .await
                .unwrap_err();
            assert!(e.to_string().contains("larger than a qcow2"), "{e}");
            assert!(!root.join("vol-x").exists(), "no directory is made for a refused size");
        }
        let img = image(&root).await;
        let target = root.join("vol-y/y.qcow2");
        let e = s
            .create_from_image(
                img.to_str().unwrap(),
                target.to_str().unwrap(),
                &FromImage { size: Some(u64::MAX), provisioning: Provisioning::Thin, ..FromImage::THIN },
                &Stop::new(),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than a qcow2"), "{e}");
        assert!(!root.join("vol-y").exists());
    }

    async fn image(root: &Path) -> PathBuf {
        let img = root.join("imagecache/img.qcow2");
        std::fs::create_dir_all(img.parent().unwrap()).unwrap();
        QemuImgCli.create(&img, 8 << 20, &CreateOptions::default(), &Stop::new()).await.unwrap();
        img
    }

    #[tokio::test]
    async fn thin_and_thick_roots_from_an_image() {
        let (_d, s, root) = setup();
        let img = image(&root).await;
        let before = std::fs::read(&img).unwrap();
        let thin = s
            .create_from_image(
                img.to_str().unwrap(),
                root.join("v/thin.qcow2").to_str().unwrap(),
                &FromImage { size: Some(16 << 20), provisioning: Provisioning::Thin, ..FromImage::THIN },
                &Stop::new(),
            )
            .await
            .unwrap();
        let i = QemuImgCli.info(&thin, &Stop::new()).await.unwrap();
        assert_eq!(i.backing_filename.as_deref(), img.to_str());
        assert_eq!(i.backing_filename_format.as_deref(), Some("qcow2"));
        assert_eq!(i.virtual_size, 16 << 20);
        let thick = s
            .create_from_image(
                img.to_str().unwrap(),
                root.join("v/thick.qcow2").to_str().unwrap(),
                &FromImage { size: None, provisioning: Provisioning::Thick, ..FromImage::THIN },
                &Stop::new(),
            )
            .await
            .unwrap();
        let i = QemuImgCli.info(&thick, &Stop::new()).await.unwrap();
        assert!(i.backing_filename.is_none());
        assert!(i.actual_size >= 8 << 20, "thick copy is allocated: {}", i.actual_size);
        assert_eq!(std::fs::read(&img).unwrap(), before, "the image is never written");
        assert_eq!(entries(&root.join("v")), ["thick.qcow2", "thin.qcow2"], "no temporaries left");
    }

    #[tokio::test]
    async fn existing_targets_are_refused_and_left_alone() {
        let (_d, s, root) = setup();
        let img = image(&root).await;
        let dst = root.join("v/x.qcow2");
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::write(&dst, b"precious").unwrap();
        let e = s
            .create_from_image(
                img.to_str().unwrap(),
                dst.to_str().unwrap(),
                &FromImage { size: None, provisioning: Provisioning::Thin, ..FromImage::THIN },
                &Stop::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
        let e = s
            .create_empty(
                dst.to_str().unwrap(),
                1 << 20,
                None,
                Provisioning::Thin,
                CreateOptions::default(),
                &Stop::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Conflict, "{e}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
        assert_eq!(entries(dst.parent().unwrap()), ["x.qcow2"]);
    }

    #[tokio::test]
    async fn a_missing_image_or_stopped_build_leaves_nothing() {
        let (_d, s, root) = setup();
        let e = s
            .create_from_image(
                root.join("nope.qcow2").to_str().unwrap(),
                root.join("v/a.qcow2").to_str().unwrap(),
                &FromImage { size: None, provisioning: Provisioning::Thin, ..FromImage::THIN },
                &Stop::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotFound);
        assert!(e.to_string().contains("unable to find image in cache"), "{e}");
        assert!(!root.join("v").exists(), "nothing made for a refused command");

        let img = image(&root).await;
        let stop = Stop::new();
        stop.fire(crate::stop::StopReason::Cancelled);
        let e = s
            .create_from_image(
                img.to_str().unwrap(),
                root.join("v/b.qcow2").to_str().unwrap(),
                &FromImage { size: None, provisioning: Provisioning::Thick, ..FromImage::THIN },
                &stop,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Cancelled, "{e}");
        let left = if root.join("v").exists() { entries(&root.join("v")) } else { Vec::new() };
        assert_eq!(left, Vec::<String>::new(), "no temporary or half-made volume");
    }

    #[tokio::test]
    async fn empty_volumes_thin_thick_and_with_backing() {
        let (_d, s, root) = setup();
        let thin = empty(&s, root.join("d/thin.qcow2").to_str().unwrap(), 64 << 20, Provisioning::Thin).await;
        let thick = empty(&s, root.join("d/thick.qcow2").to_str().unwrap(), 64 << 20, Provisioning::Thick).await;
        let (v1, a1) = s.sizes(thin.to_str().unwrap(), &Stop::new()).await.unwrap();
        let (v2, a2) = s.sizes(thick.to_str().unwrap(), &Stop::new()).await.unwrap();
        assert_eq!((v1, v2), (64 << 20, 64 << 20));
        assert!(a1 < 4 << 20 && a2 >= 64 << 20, "thin {a1} thick {a2}");
        let opts = parse_qcow2_options(" -o cluster_size=2097152 -o preallocation=metadata").unwrap();
        let over = s
            .create_empty(
                root.join("d/over.qcow2").to_str().unwrap(),
                0,
                thin.to_str(),
                Provisioning::Thin,
                opts,
                &Stop::new(),
            )
            .await
            .unwrap();
        let i = QemuImgCli.info(&over, &Stop::new()).await.unwrap();
        assert_eq!(i.backing_filename.as_deref(), thin.to_str());
        assert_eq!(i.cluster_size, Some(2 << 20));
    }

    #[test]
    fn qcow2_options_cannot_inject_arguments() {
        for bad in [
            "-o x; rm -rf /",
            "--help",
            " -f raw",
            "-o backing_file=/etc/passwd",
            "-o cluster_size=3",
            "-o",
            "-o preallocation=full -b /x",
        ] {
            assert!(parse_qcow2_options(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_qcow2_options("").unwrap(), CreateOptions::default());
    }

    #[tokio::test]
    async fn delete_refuses_open_files_and_is_idempotent() {
        let (_d, s, root) = setup();
        let v = empty(&s, root.join("vol-1/v.qcow2").to_str().unwrap(), 1 << 20, Provisioning::Thin).await;
        let held = std::fs::File::open(&v).unwrap();
        assert!(!s.delete(v.to_str().unwrap()).unwrap(), "in use");
        assert!(v.exists());
        drop(held);
        assert!(s.delete(v.to_str().unwrap()).unwrap());
        assert!(!root.join("vol-1").exists(), "the emptied vol- directory goes too");
        assert!(s.delete(v.to_str().unwrap()).unwrap(), "deleting again is success");
        assert!(s.delete("/etc/passwd").is_err(), "outside the roots");
    }
}
