//! A typed wrapper around `qemu-img`, run directly (never through a shell), plus reading the
//! qcow2 header to learn a file's format and backing file without trusting any command.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Deserialize;

use crate::error::{AgentError, ErrorKind};
use crate::metrics;
use crate::process::{self, ProcessError};
use crate::stop::Stop;

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("qemu-img {subcommand} on {path}: {source}")]
    Run { subcommand: &'static str, path: String, source: ProcessError },
    #[error("qemu-img {subcommand} on {path} printed output that is not understood: {reason}")]
    Parse { subcommand: &'static str, path: String, reason: String },
}

impl QemuImgError {
    pub fn was_stopped(&self) -> bool {
        matches!(self, QemuImgError::Run { source: ProcessError::Stopped { .. }, .. })
    }
}

impl From<QemuImgError> for AgentError {
    fn from(e: QemuImgError) -> Self {
        AgentError::new(ErrorKind::OperationFailed, "qemu-img failed", e.to_string())
    }
}

/// What `qemu-img info --output=json` says of one image.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    pub filename: String,
    pub format: String,
    pub virtual_size: u64,
    #[serde(default)]
    pub actual_size: u64,
    #[serde(default)]
    pub cluster_size: Option<u64>,
    #[serde(default)]
    pub backing_filename: Option<String>,
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    #[serde(default)]
    pub backing_filename_format: Option<String>,
}

/// `qemu-img measure` of an image converted to qcow2.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Measure {
    pub required: u64,
    pub fully_allocated: u64,
}

async fn run(
    subcommand: &'static str,
    path: &Path,
    args: &[&std::ffi::OsStr],
    stop: &Stop,
) -> Result<String, QemuImgError> {
    let start = Instant::now();
    let out = process::run("qemu-img", args, stop).await;
    metrics::observe_qemu_img(subcommand, start);
    out.map(|o| o.stdout).map_err(|source| QemuImgError::Run { subcommand, path: path.display().to_string(), source })
}

fn os<S: AsRef<std::ffi::OsStr> + ?Sized>(s: &S) -> &std::ffi::OsStr {
    s.as_ref()
}

/// `qemu-img info`; `--force-share` so that images in use by a running VM can be read too.
pub async fn info(path: &Path, stop: &Stop) -> Result<ImageInfo, QemuImgError> {
    let out =
        run("info", path, &[os("info"), os("--force-share"), os("--output=json"), path.as_os_str()], stop).await?;
    serde_json::from_str(&out).map_err(|e| QemuImgError::Parse {
        subcommand: "info",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Options of a new qcow2 image, each a whitelisted `-o key=value`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    pub pairs: Vec<(String, String)>,
}

impl CreateOptions {
    pub fn preallocation(mode: &str) -> Self {
        CreateOptions { pairs: vec![("preallocation".into(), mode.into())] }
    }

    fn without_preallocation(&self) -> Vec<&(String, String)> {
        self.pairs.iter().filter(|(k, _)| k != "preallocation").collect()
    }

    fn to_arg(pairs: &[&(String, String)]) -> Option<String> {
        (!pairs.is_empty()).then(|| pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
    }
}

/// `qemu-img create -f qcow2 -F <fmt> -b <backing> <dst> [size]`: a thin overlay. `-F` is always
/// given (qemu-img ≥ 6 requires it and guessing is unsafe); preallocation is dropped because
/// qemu-img refuses it with a backing file.
pub async fn create_overlay(
    backing: &Path,
    backing_fmt: &str,
    dst: &Path,
    size: Option<u64>,
    opts: &CreateOptions,
    stop: &Stop,
) -> Result<(), QemuImgError> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        backing_fmt.into(),
        "-b".into(),
        backing.into(),
    ];
    if let Some(o) = CreateOptions::to_arg(&opts.without_preallocation()) {
        args.extend(["-o".into(), o.into()]);
    }
    args.push(dst.into());
    if let Some(s) = size {
        args.push(s.to_string().into());
    }
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run("create", dst, &args, stop).await.map(|_| ())
}

/// `qemu-img create -f qcow2 [-o ...] <dst> <size>`: an empty image.
pub async fn create(dst: &Path, size: u64, opts: &CreateOptions, stop: &Stop) -> Result<(), QemuImgError> {
    let mut args: Vec<std::ffi::OsString> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    let all: Vec<&(String, String)> = opts.pairs.iter().collect();
    if let Some(o) = CreateOptions::to_arg(&all) {
        args.extend(["-o".into(), o.into()]);
    }
    args.push(dst.into());
    args.push(size.to_string().into());
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run("create", dst, &args, stop).await.map(|_| ())
}

/// `qemu-img convert -p -f <fmt> -O qcow2 [-o ...] <src> <dst>`: a full, flat copy of `src` and
/// its whole backing chain. `on_progress` gets percentages as qemu-img reports them.
pub async fn convert(
    src: &Path,
    src_fmt: &str,
    dst: &Path,
    opts: &CreateOptions,
    stop: &Stop,
    on_progress: impl FnMut(u8),
) -> Result<(), QemuImgError> {
    let c = Convert { src: src.as_os_str(), src_fmt, dst: dst.as_os_str(), dst_fmt: "qcow2", opts, into_zeroed: false };
    convert_image(c, stop, on_progress).await
}

/// One `qemu-img convert`: `src` and `dst` are files or `rbd:` names.
pub struct Convert<'a> {
    pub src: &'a std::ffi::OsStr,
    pub src_fmt: &'a str,
    pub dst: &'a std::ffi::OsStr,
    pub dst_fmt: &'a str,
    pub opts: &'a CreateOptions,
    /// `dst` exists already and reads as zeros (a new RBD image): only data is written.
    pub into_zeroed: bool,
}

pub async fn convert_image(c: Convert<'_>, stop: &Stop, mut on_progress: impl FnMut(u8)) -> Result<(), QemuImgError> {
    let mut args: Vec<std::ffi::OsString> =
        vec!["convert".into(), "-p".into(), "-f".into(), c.src_fmt.into(), "-O".into(), c.dst_fmt.into()];
    if c.into_zeroed {
        args.extend(["-n".into(), "--target-is-zero".into()]);
    }
    let all: Vec<&(String, String)> = c.opts.pairs.iter().collect();
    if let Some(o) = CreateOptions::to_arg(&all) {
        args.extend(["-o".into(), o.into()]);
    }
    args.push(c.src.into());
    args.push(c.dst.into());
    let start = Instant::now();
    let out = process::run_with_lines("qemu-img", &args, stop, |line| {
        if let Some(p) = parse_progress(line) {
            on_progress(p);
        }
    })
    .await;
    metrics::observe_qemu_img("convert", start);
    out.map(|_| ()).map_err(|source| QemuImgError::Run {
        subcommand: "convert",
        path: c.src.to_string_lossy().into_owned(),
        source,
    })
}

/// `qemu-img convert -p` prints `    (12.34/100%)`.
fn parse_progress(line: &str) -> Option<u8> {
    let inner = line.trim().strip_prefix('(')?.split('/').next()?;
    inner.trim().parse::<f64>().ok().map(|p| p.clamp(0.0, 100.0) as u8)
}

/// `qemu-img resize <path> <size>` (grow only; the caller checks).
pub async fn resize(path: &Path, size: u64, stop: &Stop) -> Result<(), QemuImgError> {
    run("resize", path, &[os("resize"), os("-q"), path.as_os_str(), os(&size.to_string())], stop).await.map(|_| ())
}

/// Safe `qemu-img rebase -f qcow2 -F <fmt> -b <backing> <path>`: rewrites `path` in place so
/// that it reads the same on `backing` as on its old chain. Callers run it on a copy.
pub async fn rebase(path: &Path, backing: &Path, backing_fmt: &str, stop: &Stop) -> Result<(), QemuImgError> {
    let args = [
        os("rebase"),
        os("-q"),
        os("-f"),
        os("qcow2"),
        os("-F"),
        os(backing_fmt),
        os("-b"),
        backing.as_os_str(),
        path.as_os_str(),
    ];
    run("rebase", path, &args, stop).await.map(|_| ())
}

/// `qemu-img commit -f qcow2 <path>`: writes `path`'s data into its backing file (which
/// then reads as `path` did). Only for a top nothing has open.
pub async fn commit(path: &Path, stop: &Stop) -> Result<(), QemuImgError> {
    run("commit", path, &[os("commit"), os("-q"), os("-f"), os("qcow2"), path.as_os_str()], stop).await.map(|_| ())
}

/// `qemu-img measure -O qcow2`: bytes a flat qcow2 copy of the image (with its chain) needs.
pub async fn measure(path: &Path, fmt: &str, stop: &Stop) -> Result<Measure, QemuImgError> {
    let out = run(
        "measure",
        path,
        &[
            os("measure"),
            os("--force-share"),
            os("--output=json"),
            os("-f"),
            os(fmt),
            os("-O"),
            os("qcow2"),
            path.as_os_str(),
        ],
        stop,
    )
    .await?;
    serde_json::from_str(&out).map_err(|e| QemuImgError::Parse {
        subcommand: "measure",
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// The backing file name as stored (may be relative to the image's directory).
    pub backing_file: Option<String>,
    /// qcow2 v3 "external data file": the image's data lives in another file, which QEMU opens
    /// by a name stored in the header.
    pub external_data: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} has a damaged qcow2 header: {reason}")]
    Corrupt { path: PathBuf, reason: &'static str },
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// A backing file name is at most 1023 bytes (qemu's limit).
const MAX_BACKING_NAME: u32 = 1023;

/// Reads the format and backing file name from the qcow2 header (magic, then the backing file
/// offset at byte 8 (u64 BE) and its length at byte 16 (u32 BE)); anything else is raw.
pub fn read_header(path: &Path) -> Result<Header, HeaderError> {
    let io = |source| HeaderError::Io { path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 80];
    let n = read_full(&mut f, &mut head).map_err(io)?;
    if n < 4 || &head[..4] != QCOW2_MAGIC {
        return Ok(Header { format: "raw", backing_file: None, external_data: false });
    }
    if n < 20 {
        return Err(HeaderError::Corrupt { path: path.to_owned(), reason: "header shorter than 20 bytes" });
    }
    let version = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
    // v3 headers carry incompatible feature bits at byte 72; bit 2 is "external data file".
    let external_data =
        version >= 3 && n >= 80 && u64::from_be_bytes(head[72..80].try_into().expect("8 bytes")) & (1 << 2) != 0;
    let offset = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
    if offset == 0 || len == 0 {
        return Ok(Header { format: "qcow2", backing_file: None, external_data });
    }
    if len > MAX_BACKING_NAME {
        return Err(HeaderError::Corrupt { path: path.to_owned(), reason: "backing file name longer than 1023 bytes" });
    }
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut name = vec![0u8; len as usize];
    if read_full(&mut f, &mut name).map_err(io)? != name.len() {
        return Err(HeaderError::Corrupt {
            path: path.to_owned(),
            reason: "backing file name runs past the end of the file",
        });
    }
    let name = String::from_utf8(name)
        .map_err(|_| HeaderError::Corrupt { path: path.to_owned(), reason: "backing file name is not UTF-8" })?;
    Ok(Header { format: "qcow2", backing_file: Some(name), external_data })
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The format of the file at `path`, from its header.
pub fn sniff_format(path: &Path) -> Result<&'static str, HeaderError> {
    read_header(path).map(|h| h.format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        assert_eq!(parse_progress("    (12.34/100%)"), Some(12));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100));
        assert_eq!(parse_progress("something else"), None);
    }

    #[tokio::test]
    async fn header_reading_matches_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        let stop = Stop::new();
        create(&base, 1 << 20, &CreateOptions::default(), &stop).await.unwrap();
        create_overlay(&base, "qcow2", &top, None, &CreateOptions::preallocation("full"), &stop).await.unwrap();
        assert_eq!(read_header(&base).unwrap(), Header { format: "qcow2", backing_file: None, external_data: false });
        assert_eq!(read_header(&top).unwrap().backing_file.as_deref(), base.to_str());
        let i = info(&top, &stop).await.unwrap();
        assert_eq!(i.backing_filename_format.as_deref(), Some("qcow2"));
        assert_eq!(i.virtual_size, 1 << 20);
        let raw = dir.path().join("raw.img");
        std::fs::write(&raw, b"QFI").unwrap();
        assert_eq!(sniff_format(&raw).unwrap(), "raw");
    }

    #[tokio::test]
    async fn failure_keeps_qemu_img_stderr() {
        let e = info(Path::new("/nonexistent/x.qcow2"), &Stop::new()).await.unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.qcow2"), "{e}");
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
