//! qcow2 work as the agent needs it: one trait ([`QemuImg`]) for every `qemu-img` operation, the
//! real one ([`cli::QemuImgCli`]: the command run directly, never through a shell) and a fake
//! ([`fake::FakeQemuImg`]) for unit tests of the orchestration. Formats and backing files are
//! learned from the qcow2 header ([`header`]), never from a command's word.

mod bitmap_directory;
pub mod bitmaps;
pub mod cli;
pub mod fake;
mod header;
pub mod nbd;
mod overlay;

use std::ffi::OsStr;
use std::path::Path;

use async_trait::async_trait;
use serde::Deserialize;

pub use header::{read_header, sniff_format, Header, HeaderError};

use crate::error::{AgentError, ErrorKind};
use crate::process::ProcessError;
use crate::stop::{Stop, Stoppable};

#[derive(Debug, thiserror::Error)]
pub enum QemuImgError {
    #[error("qemu-img {subcommand} on {path}: {source}")]
    Run { subcommand: &'static str, path: String, source: ProcessError },
    #[error("qemu-img {subcommand} on {path} printed output that is not understood: {reason}")]
    Parse { subcommand: &'static str, path: String, reason: String },
    /// The agent's own write of an empty overlay ([`overlay`]) failed.
    #[error("cannot write the qcow2 overlay {path}: {source}; check the volume directory's space and permissions")]
    Write { path: String, source: std::io::Error },
}

impl Stoppable for QemuImgError {
    fn was_stopped(&self) -> bool {
        matches!(self, QemuImgError::Run { source: ProcessError::Stopped { .. }, .. })
    }
}

impl From<QemuImgError> for AgentError {
    fn from(e: QemuImgError) -> Self {
        AgentError::new(ErrorKind::OperationFailed, "qemu-img failed", e.to_string()).stopped_if(e.was_stopped())
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

/// Options of a new qcow2 image, each a whitelisted `-o key=value`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    pub pairs: Vec<(String, String)>,
}

impl CreateOptions {
    pub fn preallocation(mode: &str) -> Self {
        CreateOptions { pairs: vec![("preallocation".into(), mode.into())] }
    }

    /// The options without preallocation, which qemu-img refuses beside a backing file.
    pub fn without_preallocation(&self) -> CreateOptions {
        CreateOptions { pairs: self.pairs.iter().filter(|(k, _)| k != "preallocation").cloned().collect() }
    }

    /// Whether space is allocated up front (any preallocation but `off`).
    pub fn preallocates(&self) -> bool {
        self.pairs.iter().any(|(k, v)| k == "preallocation" && v != "off")
    }
}

/// One `qemu-img convert`: `src` and `dst` are files or `rbd:` names.
pub struct Convert<'a> {
    pub src: &'a OsStr,
    pub src_fmt: &'a str,
    pub dst: &'a OsStr,
    pub dst_fmt: &'a str,
    pub opts: &'a CreateOptions,
    /// `dst` exists already and reads as zeros (a new RBD image): only data is written.
    pub into_zeroed: bool,
}

impl<'a> Convert<'a> {
    /// A full, flat qcow2 copy of the file `src` and its whole backing chain.
    pub fn to_qcow2(src: &'a Path, src_fmt: &'a str, dst: &'a Path, opts: &'a CreateOptions) -> Self {
        Convert { src: src.as_os_str(), src_fmt, dst: dst.as_os_str(), dst_fmt: "qcow2", opts, into_zeroed: false }
    }
}

/// Every `qemu-img` operation the agent runs. Each fails with the tool's own words, and with a
/// "stopped" error ([`crate::stop::Stoppable`]) when `stop` fires first; the caller removes
/// whatever the call was building.
#[async_trait]
pub trait QemuImg: Send + Sync {
    /// `qemu-img info`, also of images a running VM has open.
    async fn info(&self, path: &Path, stop: &Stop) -> Result<ImageInfo, QemuImgError>;
    /// `(virtual size, bytes allocated on disk)`, as `info` gives them.
    async fn sizes(&self, path: &Path, stop: &Stop) -> Result<(u64, u64), QemuImgError> {
        self.info(path, stop).await.map(|i| (i.virtual_size, i.actual_size))
    }
    /// An empty qcow2 image of `size` bytes.
    async fn create(&self, dst: &Path, size: u64, opts: &CreateOptions, stop: &Stop) -> Result<(), QemuImgError>;
    /// A thin qcow2 overlay on `backing` (whose format is always given: guessing is unsafe), of
    /// `size` bytes or the backing file's size. Preallocation is dropped (refused with a backing
    /// file).
    async fn create_overlay(
        &self,
        backing: &Path,
        backing_fmt: &str,
        dst: &Path,
        size: Option<u64>,
        opts: &CreateOptions,
        stop: &Stop,
    ) -> Result<(), QemuImgError>;
    /// Copies `c.src` with its whole chain into `c.dst`; `on_progress` gets percentages.
    async fn convert(
        &self,
        c: Convert<'_>,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> Result<(), QemuImgError>;
    /// Grows the image to `size` bytes (the caller checks it grows).
    async fn resize(&self, path: &Path, size: u64, stop: &Stop) -> Result<(), QemuImgError>;
    /// Safe rebase onto `backing`: rewrites `path` in place so that it reads the same on
    /// `backing` as on its old chain. Callers run it on a copy.
    async fn rebase(&self, path: &Path, backing: &Path, backing_fmt: &str, stop: &Stop) -> Result<(), QemuImgError>;
    /// Unsafe rebase (`rebase -u`): only the backing-file name in `path`'s header changes. For
    /// when `backing` reads as the old backing file did (a hard link or copy of it).
    async fn rename_backing(
        &self,
        path: &Path,
        backing: &Path,
        backing_fmt: &str,
        stop: &Stop,
    ) -> Result<(), QemuImgError>;
    /// Writes `path`'s data into its backing file, which then reads as `path` did. Only for a
    /// top nothing has open.
    async fn commit(&self, path: &Path, stop: &Stop) -> Result<(), QemuImgError>;
    /// Bytes a flat qcow2 copy of the image (with its chain) needs.
    async fn measure(&self, path: &Path, fmt: &str, stop: &Stop) -> Result<Measure, QemuImgError>;
    /// The persistent dirty bitmaps of qcow2 file `path` (not of its backing files).
    async fn bitmaps(&self, path: &Path, stop: &Stop) -> Result<Vec<bitmaps::Bitmap>, QemuImgError>;
    /// Adds (`add`) or removes bitmap `name` of qcow2 file `path`, which nothing has open.
    async fn change_bitmap(&self, path: &Path, name: &str, add: bool, stop: &Stop) -> Result<(), QemuImgError>;
    /// `qemu-img check -r leaks`: frees the clusters that a write to qcow2 file `path` killed
    /// half-way (a `qemu-img bitmap` that died with the agent) left allocated. Only for a file
    /// nothing has open.
    async fn repair_leaks(&self, path: &Path, stop: &Stop) -> Result<(), QemuImgError>;
    /// Copies into `dst` (an overlay on an earlier copy of `src`) the extents of `src` that its
    /// bitmap `bitmap` marks dirty; `src` is a qcow2 file nothing writes.
    async fn copy_dirty(&self, src: &Path, bitmap: &str, dst: &Path, stop: &Stop) -> Result<(), QemuImgError>;
    /// Writes each chunk `chunks` brings into the same byte range of qcow2 file `dst` (an
    /// overlay on an earlier copy of what is read) until its sender hangs up.
    async fn write_chunks(
        &self,
        dst: &Path,
        chunks: std::sync::mpsc::Receiver<nbd::Chunk>,
        stop: &Stop,
    ) -> Result<(), QemuImgError>;
}
