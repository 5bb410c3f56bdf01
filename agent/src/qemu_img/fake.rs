//! qemu-img without QEMU, for unit tests of the orchestration. An image is a small file with a
//! real qcow2 header (so [`read_header`] and everything that follows backing chains reads it as
//! it reads a real image), its backing file's name where qcow2 keeps it, and after them the
//! image's own data: a map of 64 KiB blocks to the byte that fills each. Files rather than a map
//! in memory because the agent renames, links and removes volumes itself; the data travels with
//! the file.
//!
//! The operations keep qemu-img's semantics where the agent relies on them: an overlay reads
//! through to its backing file, a convert flattens the chain, a safe rebase keeps what the image
//! reads, a commit writes the top into its backing file and empties the top. Calls count in the
//! shared [`Faults`], so a test can fail one or kill the agent in the middle of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::nbd::Chunk;
use super::{read_header, Convert, CreateOptions, ImageInfo, Measure, QemuImg, QemuImgError};
use crate::faults::Faults;
use crate::process::ProcessError;
use crate::stop::Stop;

/// The unit of data: tests write and compare whole blocks.
pub const BLOCK: u64 = 64 << 10;
/// What an RBD image of the fake cluster reads as: this many zero bytes.
const RBD_SIZE: u64 = 8 << 20;
const NAME_OFFSET: usize = 512;
const DATA_OFFSET: usize = 4096;
const MARK: &[u8] = b"kvmagent fake qcow2\n";

/// What an image holds beside its header.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Data {
    backing_format: Option<String>,
    preallocated: bool,
    /// Block index → the byte that fills it; a block not here reads from the backing file.
    blocks: BTreeMap<u64, u8>,
    /// Names of persistent dirty bitmaps (the fake tracks no writes: a copy of what a bitmap
    /// marks copies what differs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    bitmaps: Vec<String>,
    /// Clusters left allocated by a `qemu-img bitmap` killed half-way, as the real one leaves
    /// them: `qemu-img check` reports them until they are repaired.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    leaked: bool,
}

#[derive(Debug, Clone)]
struct Image {
    size: u64,
    backing: Option<String>,
    data: Data,
}

/// Why a file is not an image the fake can use, in qemu-img's words where it has them.
type Failure = String;

fn read(path: &Path) -> Result<Image, Failure> {
    if is_rbd(path) {
        // The fake cluster keeps no data.
        return Ok(Image { size: RBD_SIZE, backing: None, data: Data::default() });
    }
    let header = read_header(path).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(path).map_err(|e| format!("Could not open '{}': {e}", path.display()))?;
    if header.format == "raw" {
        return Ok(Image { size: bytes.len() as u64, backing: None, data: Data::default() });
    }
    let size = u64::from_be_bytes(bytes[24..32].try_into().map_err(|_| "header too short")?);
    let data = bytes
        .get(DATA_OFFSET..)
        .and_then(|d| d.strip_prefix(MARK))
        .and_then(|d| serde_json::from_slice(d).ok())
        .ok_or_else(|| format!("{} is a qcow2 image the fake did not make", path.display()))?;
    Ok(Image { size, backing: header.backing_file, data })
}

fn write(path: &Path, img: &Image) -> Result<(), Failure> {
    let mut bytes = vec![0u8; DATA_OFFSET];
    bytes[..4].copy_from_slice(b"QFI\xfb");
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    if let Some(b) = &img.backing {
        bytes[8..16].copy_from_slice(&(NAME_OFFSET as u64).to_be_bytes());
        bytes[16..20].copy_from_slice(&(b.len() as u32).to_be_bytes());
        bytes[NAME_OFFSET..NAME_OFFSET + b.len()].copy_from_slice(b.as_bytes());
    }
    bytes[20..24].copy_from_slice(&16u32.to_be_bytes());
    bytes[24..32].copy_from_slice(&img.size.to_be_bytes());
    bytes[100..104].copy_from_slice(&104u32.to_be_bytes());
    bytes.extend_from_slice(MARK);
    bytes.extend(serde_json::to_vec(&img.data).expect("plain data"));
    std::fs::write(path, bytes).map_err(|e| format!("Could not create '{}': {e}", path.display()))
}

/// Whether `path` is an RBD image's QEMU name.
fn is_rbd(path: &Path) -> bool {
    path.to_string_lossy().starts_with("rbd:")
}

/// Backing file `name` of image `path`, resolved beside the image as QEMU does (an RBD name
/// as it is).
fn resolve(path: &Path, name: &Path) -> PathBuf {
    if is_rbd(name) {
        name.to_owned()
    } else {
        path.parent().unwrap_or(Path::new("/")).join(name)
    }
}

/// The backing file's path.
fn backing_path(path: &Path, img: &Image) -> Option<PathBuf> {
    img.backing.as_ref().map(|b| resolve(path, Path::new(b)))
}

/// What the image reads, block by block (zero blocks left out), and its size.
fn view(path: &Path) -> Result<(u64, BTreeMap<u64, u8>), Failure> {
    let top = read(path)?;
    let mut chain = vec![top.clone()];
    let mut cur = backing_path(path, &top);
    while let Some(p) = cur {
        let img = read(&p).map_err(|e| format!("Could not open backing file: {e}"))?;
        cur = backing_path(&p, &img);
        chain.push(img);
        if chain.len() > 64 {
            return Err(format!("the backing chain of {} is too long or a loop", path.display()));
        }
    }
    let mut blocks = BTreeMap::new();
    for img in chain.iter().rev() {
        blocks.retain(|b, _| b * BLOCK < img.size);
        blocks.extend(&img.data.blocks);
    }
    blocks.retain(|b, v| b * BLOCK < top.size && *v != 0);
    Ok((top.size, blocks))
}

/// Writes `byte` over the 64 KiB block at `offset` of the image (a guest's write).
pub fn write_block(path: &Path, offset: u64, byte: u8) {
    let mut img = read(path).unwrap_or_else(|e| panic!("{e}"));
    assert!(offset % BLOCK == 0 && offset < img.size, "a whole block inside the image");
    img.data.blocks.insert(offset / BLOCK, byte);
    write(path, &img).unwrap_or_else(|e| panic!("{e}"));
}

/// Whether the two images read the same (`qemu-img compare`: a larger one's tail reads zeros).
pub fn same_content(a: &Path, b: &Path) -> bool {
    view(a).map(|v| v.1) == view(b).map(|v| v.1)
}

/// What `qemu-img check` of a fake image checks: the image and its whole chain can be read,
/// and it leaks no cluster.
pub fn check(path: &Path) -> Result<(), String> {
    view(path)?;
    match read(path)?.data.leaked {
        true => Err(format!("{}: Leaked cluster 24 refcount=1 reference=0", path.display())),
        false => Ok(()),
    }
}

fn set_leaked(path: &Path, leaked: bool) -> Result<bool, Failure> {
    let mut img = read(path)?;
    let was = std::mem::replace(&mut img.data.leaked, leaked);
    write(path, &img)?;
    Ok(was)
}

/// A block pull of the top: it reads the same on `base` (or on nothing) as before.
pub fn pull(top: &Path, base: Option<&Path>) -> Result<(), String> {
    rebase_onto(top, base.map(|b| (b, "qcow2")))
}

/// `qemu-img commit` of `top` into its backing file; the top is emptied.
pub fn commit_top(top: &Path) -> Result<(), String> {
    let mut img = read(top)?;
    let base = backing_path(top, &img).ok_or_else(|| format!("{} has no backing file", top.display()))?;
    let mut b = read(&base)?;
    b.data.blocks.extend(std::mem::take(&mut img.data.blocks));
    b.size = b.size.max(img.size);
    write(&base, &b)?;
    write(top, &img)
}

/// Writes into `dst` every block where it reads differently from `src` (what a backup job or
/// a copy of the dirty extents writes into an overlay on the previous copy).
pub fn copy_changed(src: &Path, dst: &Path) -> Result<(), String> {
    let (_, want) = view(src)?;
    let (_, have) = view(dst)?;
    let mut img = read(dst)?;
    for k in want.keys().chain(have.keys()).copied().collect::<Vec<_>>() {
        let w = want.get(&k).copied().unwrap_or(0);
        if have.get(&k).copied().unwrap_or(0) != w {
            img.data.blocks.insert(k, w);
        }
    }
    write(dst, &img)
}

/// Writes each chunk into `dst`: every block it covers takes the chunk's byte at the block's start.
fn write_chunks(dst: &Path, chunks: &std::sync::mpsc::Receiver<Chunk>, stop: &Stop) -> Result<(), String> {
    let mut img = read(dst)?;
    for (offset, data) in chunks {
        if stop.is_stopped() {
            return Err("stopped".into());
        }
        let end = offset + data.len() as u64;
        for k in offset.div_ceil(BLOCK)..end.div_ceil(BLOCK) {
            img.data.blocks.insert(k, data[(k * BLOCK - offset) as usize]);
        }
    }
    write(dst, &img)
}

/// Adds (`add`) or removes bitmap `name` of the image (as QEMU does for a new checkpoint).
pub fn set_bitmap(path: &Path, name: &str, add: bool) -> Result<(), String> {
    let mut img = read(path)?;
    img.data.bitmaps.retain(|b| b != name);
    if add {
        img.data.bitmaps.push(name.to_owned());
    }
    write(path, &img)
}

fn rebase_onto(path: &Path, backing: Option<(&Path, &str)>) -> Result<(), String> {
    let (_, old) = view(path)?;
    let new = match backing {
        Some((b, _)) => view(&path.parent().unwrap_or(Path::new("/")).join(b))?.1,
        None => BTreeMap::new(),
    };
    let mut img = read(path)?;
    let keys: Vec<u64> = old.keys().chain(new.keys()).copied().collect();
    for k in keys {
        let (o, n) = (old.get(&k).copied().unwrap_or(0), new.get(&k).copied().unwrap_or(0));
        if o != n {
            img.data.blocks.insert(k, o);
        }
    }
    img.backing = backing.map(|(b, _)| b.display().to_string());
    img.data.backing_format = backing.map(|(_, f)| f.to_owned());
    write(path, &img)
}

/// A [`QemuImg`] on fake images; every call counts in `faults`.
pub struct FakeQemuImg {
    faults: Arc<Faults>,
}

impl FakeQemuImg {
    pub fn new(faults: Arc<Faults>) -> Self {
        FakeQemuImg { faults }
    }

    /// Counts the call (`name`, `qemu-img <subcommand>`, is what a test fails it by) and fails it
    /// when `faults` or `stop` say so.
    async fn enter(&self, name: &'static str, path: &Path, stop: &Stop) -> Result<(), QemuImgError> {
        let fail = self.faults.enter(name).await;
        let call = name.strip_prefix("qemu-img ").unwrap_or(name);
        let run = |source| QemuImgError::Run { subcommand: call, path: path.display().to_string(), source };
        if stop.is_stopped() {
            return Err(run(ProcessError::Stopped { command: format!("qemu-img {call}") }));
        }
        if fail {
            return Err(failed(call, path, "injected failure".into()));
        }
        Ok(())
    }
}

fn failed(call: &'static str, path: &Path, stderr: String) -> QemuImgError {
    use std::os::unix::process::ExitStatusExt;
    let status = std::process::ExitStatus::from_raw(1 << 8);
    let source = ProcessError::Failed { command: format!("qemu-img {call}"), status, stdout: String::new(), stderr };
    QemuImgError::Run { subcommand: call, path: path.display().to_string(), source }
}

/// `f`'s failure as qemu-img's.
fn or_failed<T>(call: &'static str, path: &Path, f: Result<T, Failure>) -> Result<T, QemuImgError> {
    f.map_err(|e| failed(call, path, e))
}

fn create_new(dst: &Path, img: &Image) -> Result<(), Failure> {
    if let Some(d) = dst.parent().filter(|d| !d.is_dir()) {
        return Err(format!("Could not create '{}': directory {} does not exist", dst.display(), d.display()));
    }
    write(dst, img)
}

#[async_trait]
impl QemuImg for FakeQemuImg {
    async fn info(&self, path: &Path, stop: &Stop) -> Result<ImageInfo, QemuImgError> {
        self.enter("qemu-img info", path, stop).await?;
        let img = or_failed("info", path, read(path))?;
        let header = or_failed("info", path, read_header(path).map_err(|e| e.to_string()))?;
        let allocated = if img.data.preallocated { img.size } else { img.data.blocks.len() as u64 * BLOCK };
        Ok(ImageInfo {
            filename: path.display().to_string(),
            format: header.format.into(),
            virtual_size: img.size,
            actual_size: DATA_OFFSET as u64 + allocated,
            cluster_size: (header.format == "qcow2").then_some(BLOCK),
            full_backing_filename: backing_path(path, &img).map(|p| p.display().to_string()),
            backing_filename: img.backing,
            backing_filename_format: img.data.backing_format,
        })
    }

    async fn create(&self, dst: &Path, size: u64, opts: &CreateOptions, stop: &Stop) -> Result<(), QemuImgError> {
        self.enter("qemu-img create", dst, stop).await?;
        let data = Data { preallocated: opts.preallocates(), ..Data::default() };
        or_failed("create", dst, create_new(dst, &Image { size, backing: None, data }))
    }

    async fn create_overlay(
        &self,
        backing: &Path,
        backing_fmt: &str,
        dst: &Path,
        size: Option<u64>,
        _opts: &CreateOptions,
        stop: &Stop,
    ) -> Result<(), QemuImgError> {
        self.enter("qemu-img create", dst, stop).await?;
        // A relative backing file is beside the new image, as qemu-img resolves it.
        let resolved = resolve(dst, backing);
        let base = or_failed("create", dst, read(&resolved).map_err(|e| format!("Could not open backing file: {e}")))?;
        let data = Data { backing_format: Some(backing_fmt.into()), ..Data::default() };
        let img = Image { size: size.unwrap_or(base.size), backing: Some(backing.display().to_string()), data };
        or_failed("create", dst, create_new(dst, &img))
    }

    async fn convert(
        &self,
        c: Convert<'_>,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> Result<(), QemuImgError> {
        let (src, dst) = (Path::new(c.src), Path::new(c.dst));
        self.enter("qemu-img convert", src, stop).await?;
        if c.dst_fmt != "qcow2" {
            return Err(failed("convert", src, format!("the fake converts files to qcow2 only, not to {}", c.dst_fmt)));
        }
        on_progress(0);
        let (size, blocks) = or_failed("convert", src, view(src))?;
        let data = Data { preallocated: c.opts.preallocates(), blocks, ..Data::default() };
        or_failed("convert", src, create_new(dst, &Image { size, backing: None, data }))?;
        on_progress(100);
        Ok(())
    }

    async fn resize(&self, path: &Path, size: u64, stop: &Stop) -> Result<(), QemuImgError> {
        self.enter("qemu-img resize", path, stop).await?;
        let mut img = or_failed("resize", path, read(path))?;
        if size < img.size {
            return Err(failed("resize", path, "Use the --shrink option to perform a shrink operation.".into()));
        }
        img.size = size;
        or_failed("resize", path, write(path, &img))
    }

    async fn rebase(&self, path: &Path, backing: &Path, backing_fmt: &str, stop: &Stop) -> Result<(), QemuImgError> {
        self.enter("qemu-img rebase", path, stop).await?;
        or_failed("rebase", path, rebase_onto(path, Some((backing, backing_fmt))))
    }

    async fn rename_backing(
        &self,
        path: &Path,
        backing: &Path,
        backing_fmt: &str,
        stop: &Stop,
    ) -> Result<(), QemuImgError> {
        self.enter("qemu-img rebase", path, stop).await?;
        let renamed = read(path).and_then(|mut img| {
            img.backing = Some(backing.display().to_string());
            img.data.backing_format = Some(backing_fmt.to_owned());
            write(path, &img)
        });
        or_failed("rebase", path, renamed)
    }

    async fn commit(&self, path: &Path, stop: &Stop) -> Result<(), QemuImgError> {
        self.enter("qemu-img commit", path, stop).await?;
        or_failed("commit", path, commit_top(path))
    }

    async fn measure(&self, path: &Path, _fmt: &str, stop: &Stop) -> Result<Measure, QemuImgError> {
        self.enter("qemu-img measure", path, stop).await?;
        let (size, blocks) = or_failed("measure", path, view(path))?;
        let overhead = DATA_OFFSET as u64;
        Ok(Measure { required: overhead + blocks.len() as u64 * BLOCK, fully_allocated: overhead + size })
    }

    async fn bitmaps(&self, path: &Path, stop: &Stop) -> Result<Vec<super::bitmaps::Bitmap>, QemuImgError> {
        self.enter("qemu-img info", path, stop).await?;
        let img = or_failed("info", path, read(path))?;
        let consistent = |name: &String| super::bitmaps::Bitmap { name: name.clone(), flags: vec!["auto".into()] };
        Ok(img.data.bitmaps.iter().map(consistent).collect())
    }

    async fn change_bitmap(&self, path: &Path, name: &str, add: bool, stop: &Stop) -> Result<(), QemuImgError> {
        // Killed in the call (it never returns), the change leaves leaked clusters behind.
        let was = or_failed("bitmap", path, set_leaked(path, true))?;
        let entered = self.enter("qemu-img bitmap", path, stop).await;
        or_failed("bitmap", path, set_leaked(path, was))?;
        entered?;
        or_failed("bitmap", path, set_bitmap(path, name, add))
    }

    async fn repair_leaks(&self, path: &Path, stop: &Stop) -> Result<(), QemuImgError> {
        self.enter("qemu-img check", path, stop).await?;
        or_failed("check", path, set_leaked(path, false).map(drop))
    }

    async fn copy_dirty(&self, src: &Path, bitmap: &str, dst: &Path, stop: &Stop) -> Result<(), QemuImgError> {
        self.enter("qemu-img convert", src, stop).await?;
        let has = read(src).map(|img| img.data.bitmaps.iter().any(|b| b == bitmap));
        if !or_failed("convert", src, has)? {
            return Err(failed("convert", src, format!("no bitmap {bitmap}")));
        }
        or_failed("convert", dst, copy_changed(src, dst))
    }

    /// Each block a chunk covers takes the chunk's byte at the block's start.
    async fn write_chunks(
        &self,
        dst: &Path,
        chunks: std::sync::mpsc::Receiver<Chunk>,
        stop: &Stop,
    ) -> Result<(), QemuImgError> {
        self.enter("qemu-nbd", dst, stop).await?;
        let (path, stop) = (dst.to_owned(), stop.clone());
        let written = tokio::task::spawn_blocking(move || write_chunks(&path, &chunks, &stop)).await;
        or_failed("nbd", dst, written.unwrap_or_else(|e| Err(e.to_string())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stop::Stoppable;

    fn fake() -> FakeQemuImg {
        FakeQemuImg::new(Arc::default())
    }

    #[tokio::test]
    async fn chains_read_through_and_convert_rebase_commit_keep_what_they_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let (q, stop, none) = (fake(), Stop::new(), CreateOptions::default());
        q.create(&p("base"), 4 * BLOCK, &none, &stop).await.unwrap();
        write_block(&p("base"), 0, 1);
        q.create_overlay(&p("base"), "qcow2", &p("top"), None, &none, &stop).await.unwrap();
        write_block(&p("top"), BLOCK, 2);
        assert_eq!(view(&p("top")).unwrap(), (4 * BLOCK, BTreeMap::from([(0, 1), (1, 2)])));
        assert_eq!(read_header(&p("top")).unwrap().backing_file, Some(p("base").display().to_string()));
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send((2 * BLOCK, vec![3; BLOCK as usize])).unwrap();
        drop(tx);
        q.write_chunks(&p("top"), rx, &stop).await.unwrap();
        assert_eq!(view(&p("top")).unwrap().1, BTreeMap::from([(0, 1), (1, 2), (2, 3)]), "a chunk lands in its block");

        q.convert(Convert::to_qcow2(&p("top"), "qcow2", &p("flat"), &none), &stop, &mut |_| {}).await.unwrap();
        assert!(same_content(&p("top"), &p("flat")));
        assert_eq!(read_header(&p("flat")).unwrap().backing_file, None);

        q.create(&p("other"), 4 * BLOCK, &none, &stop).await.unwrap();
        write_block(&p("other"), 2 * BLOCK, 3);
        q.rebase(&p("top"), &p("other"), "qcow2", &stop).await.unwrap();
        assert!(same_content(&p("top"), &p("flat")), "a safe rebase keeps what the image reads");

        write_block(&p("top"), 3 * BLOCK, 4);
        let before = view(&p("top")).unwrap();
        q.commit(&p("top"), &stop).await.unwrap();
        assert_eq!(view(&p("other")).unwrap(), before, "the backing file reads as the top did");
        assert_eq!(view(&p("top")).unwrap(), before, "and the emptied top still reads the same");
    }

    #[tokio::test]
    async fn failures_are_qemu_imgs_and_a_stop_is_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let q = FakeQemuImg::new(faults.clone());
        let none = CreateOptions::default();
        let (nope, t) = (dir.path().join("nope"), dir.path().join("t"));
        let e = q.create_overlay(&nope, "qcow2", &t, None, &none, &Stop::new()).await.unwrap_err();
        assert!(e.to_string().contains("Could not open backing file"), "{e}");
        assert!(!dir.path().join("t").exists());
        faults.fail("qemu-img create");
        assert!(q.create(&dir.path().join("a"), BLOCK, &none, &Stop::new()).await.is_err());
        let stop = Stop::new();
        stop.fire(crate::stop::StopReason::Cancelled);
        assert!(q.info(&dir.path().join("a"), &stop).await.unwrap_err().was_stopped());
    }
}
