//! The real [`QemuImg`]: the `qemu-img` command, run directly with its arguments (never through
//! a shell), timed into the metrics, killed when the task is stopped.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::time::Instant;

use async_trait::async_trait;

use super::nbd::Chunk;
use super::{read_header, Convert, CreateOptions, ImageInfo, Measure, QemuImg, QemuImgError};
use crate::metrics;
use crate::process::{self, Priority};
use crate::stop::Stop;

pub struct QemuImgCli;

async fn run(subcommand: &'static str, path: &Path, args: &[OsString], stop: &Stop) -> Result<String, QemuImgError> {
    run_as(subcommand, path, args, stop, Priority::Normal).await
}

async fn run_as(
    subcommand: &'static str,
    path: &Path,
    args: &[OsString],
    stop: &Stop,
    priority: Priority,
) -> Result<String, QemuImgError> {
    let start = Instant::now();
    let out = process::run_with_lines_as("qemu-img", args, stop, priority, |_| {}).await;
    metrics::observe_qemu_img(subcommand, start);
    out.map(|o| o.stdout).map_err(|source| QemuImgError::Run { subcommand, path: path.display().to_string(), source })
}

fn parse<T: serde::de::DeserializeOwned>(subcommand: &'static str, path: &Path, out: &str) -> Result<T, QemuImgError> {
    serde_json::from_str(out).map_err(|e| QemuImgError::Parse {
        subcommand,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn args<const N: usize>(a: [&OsStr; N]) -> Vec<OsString> {
    a.iter().map(|s| s.to_os_string()).collect()
}

/// `-o k=v,...` when there are options.
fn push_options(args: &mut Vec<OsString>, opts: &CreateOptions) {
    if !opts.pairs.is_empty() {
        let joined = opts.pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        args.extend(["-o".into(), joined.into()]);
    }
}

/// `qemu-img rebase -f qcow2 -F <fmt> -b <backing> <path>`: safe (the data is kept readable),
/// or with `header_only` (`-u`) only the backing file's name in the header is changed.
async fn rebase(path: &Path, backing: &Path, fmt: &str, header_only: bool, stop: &Stop) -> Result<(), QemuImgError> {
    let mut a = args(["rebase".as_ref(), "-q".as_ref()]);
    if header_only {
        a.push("-u".into());
    }
    a.extend(["-f".into(), "qcow2".into(), "-F".into(), fmt.into(), "-b".into(), backing.into(), path.into()]);
    // A safe rebase copies every cluster the new backing chain reads differently.
    let priority = if header_only { Priority::Normal } else { Priority::Copy };
    run_as("rebase", path, &a, stop, priority).await.map(drop)
}

/// `qemu-img convert -p` prints `    (12.34/100%)`.
fn parse_progress(line: &str) -> Option<u8> {
    let inner = line.trim().strip_prefix('(')?.split('/').next()?;
    inner.trim().parse::<f64>().ok().map(|p| p.clamp(0.0, 100.0) as u8)
}

/// The backing name and size of an overlay the agent writes itself ([`super::overlay`]): default
/// options on a local qcow2 or raw file that is what `backing_fmt` says (resolved beside `dst`
/// when relative, as QEMU does). Anything else, and every error to report, is qemu-img's.
fn writable_overlay(
    backing: &Path,
    backing_fmt: &str,
    dst: &Path,
    size: Option<u64>,
    opts: &CreateOptions,
) -> Option<(String, u64)> {
    if !opts.without_preallocation().pairs.is_empty() || !matches!(backing_fmt, "qcow2" | "raw") {
        return None;
    }
    let name = backing.to_str()?;
    let resolved = if backing.is_absolute() { backing.to_owned() } else { dst.parent()?.join(backing) };
    let header = read_header(&resolved).ok()?;
    let size = size.unwrap_or(header.virtual_size);
    let usable = header.format == backing_fmt && !header.external_data && resolved.is_file();
    (usable && super::overlay::can_write(name, backing_fmt, size)).then(|| (name.to_owned(), size))
}

#[async_trait]
impl QemuImg for QemuImgCli {
    /// `--force-share` so that images in use by a running VM can be read too.
    async fn info(&self, path: &Path, stop: &Stop) -> Result<ImageInfo, QemuImgError> {
        let a = args(["info".as_ref(), "--force-share".as_ref(), "--output=json".as_ref(), path.as_os_str()]);
        parse("info", path, &run("info", path, &a, stop).await?)
    }

    /// From the header and the file's allocated blocks, as `qemu-img info` counts them, without
    /// running it (a VM's creation or clone answers with its volumes' sizes); an image whose
    /// data is in another file is asked.
    async fn sizes(&self, path: &Path, stop: &Stop) -> Result<(u64, u64), QemuImgError> {
        use std::os::unix::fs::MetadataExt;
        let read = || -> Option<(u64, u64)> {
            let h = read_header(path).ok().filter(|h| !h.external_data)?;
            Some((h.virtual_size, std::fs::metadata(path).ok()?.blocks() * 512))
        };
        match read() {
            Some(sizes) => Ok(sizes),
            None => self.info(path, stop).await.map(|i| (i.virtual_size, i.actual_size)),
        }
    }

    async fn create(&self, dst: &Path, size: u64, opts: &CreateOptions, stop: &Stop) -> Result<(), QemuImgError> {
        let mut a = args(["create".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref()]);
        push_options(&mut a, opts);
        a.extend([dst.into(), size.to_string().into()]);
        run("create", dst, &a, stop).await.map(drop)
    }

    /// `-F` is always given: qemu-img ≥ 6 requires it.
    async fn create_overlay(
        &self,
        backing: &Path,
        backing_fmt: &str,
        dst: &Path,
        size: Option<u64>,
        opts: &CreateOptions,
        stop: &Stop,
    ) -> Result<(), QemuImgError> {
        if let Some((name, size)) = writable_overlay(backing, backing_fmt, dst, size, opts) {
            let (fmt, path) = (backing_fmt.to_owned(), dst.to_owned());
            let written = tokio::task::spawn_blocking(move || super::overlay::write(&name, &fmt, &path, size)).await;
            let written = written.unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            return written.map_err(|source| QemuImgError::Write { path: dst.display().to_string(), source });
        }
        let mut a = args(["create".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), "-F".as_ref()]);
        a.extend([backing_fmt.into(), "-b".into(), backing.into()]);
        push_options(&mut a, &opts.without_preallocation());
        a.push(dst.into());
        a.extend(size.map(|s| s.to_string().into()));
        run("create", dst, &a, stop).await.map(drop)
    }

    async fn convert(
        &self,
        c: Convert<'_>,
        stop: &Stop,
        on_progress: &mut (dyn FnMut(u8) + Send),
    ) -> Result<(), QemuImgError> {
        let mut a = args(["convert".as_ref(), "-p".as_ref(), "-f".as_ref(), c.src_fmt.as_ref(), "-O".as_ref()]);
        a.push(c.dst_fmt.into());
        if c.into_zeroed {
            a.extend(["-n".into(), "--target-is-zero".into()]);
        }
        push_options(&mut a, c.opts);
        a.extend([c.src.into(), c.dst.into()]);
        let start = Instant::now();
        let out = process::run_with_lines_as("qemu-img", &a, stop, Priority::Copy, |line| {
            if let Some(p) = parse_progress(line) {
                on_progress(p);
            }
        })
        .await;
        metrics::observe_qemu_img("convert", start);
        out.map(drop).map_err(|source| QemuImgError::Run {
            subcommand: "convert",
            path: c.src.to_string_lossy().into_owned(),
            source,
        })
    }

    async fn resize(&self, path: &Path, size: u64, stop: &Stop) -> Result<(), QemuImgError> {
        let mut a = args(["resize".as_ref(), "-q".as_ref(), path.as_os_str()]);
        a.push(size.to_string().into());
        run("resize", path, &a, stop).await.map(drop)
    }

    async fn rebase(&self, path: &Path, backing: &Path, backing_fmt: &str, stop: &Stop) -> Result<(), QemuImgError> {
        rebase(path, backing, backing_fmt, false, stop).await
    }

    async fn rename_backing(
        &self,
        path: &Path,
        backing: &Path,
        backing_fmt: &str,
        stop: &Stop,
    ) -> Result<(), QemuImgError> {
        rebase(path, backing, backing_fmt, true, stop).await
    }

    async fn commit(&self, path: &Path, stop: &Stop) -> Result<(), QemuImgError> {
        let a = args(["commit".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str()]);
        run("commit", path, &a, stop).await.map(drop)
    }

    async fn measure(&self, path: &Path, fmt: &str, stop: &Stop) -> Result<Measure, QemuImgError> {
        let a = args([
            "measure".as_ref(),
            "--force-share".as_ref(),
            "--output=json".as_ref(),
            "-f".as_ref(),
            fmt.as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
        ]);
        parse("measure", path, &run("measure", path, &a, stop).await?)
    }

    async fn bitmaps(&self, path: &Path, stop: &Stop) -> Result<Vec<super::bitmaps::Bitmap>, QemuImgError> {
        match super::bitmap_directory::read(path) {
            Some(list) => Ok(list),
            None => super::bitmaps::list(path, stop).await,
        }
    }

    async fn change_bitmap(&self, path: &Path, name: &str, add: bool, stop: &Stop) -> Result<(), QemuImgError> {
        super::bitmaps::change(path, name, add, stop).await
    }

    async fn repair_leaks(&self, path: &Path, stop: &Stop) -> Result<(), QemuImgError> {
        let a = args([
            "check".as_ref(),
            "-q".as_ref(),
            "-r".as_ref(),
            "leaks".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
        ]);
        run("check", path, &a, stop).await.map(drop)
    }

    async fn copy_dirty(&self, src: &Path, bitmap: &str, dst: &Path, stop: &Stop) -> Result<(), QemuImgError> {
        super::bitmaps::copy_dirty(src, bitmap, dst, stop).await
    }

    async fn write_chunks(
        &self,
        dst: &Path,
        chunks: std::sync::mpsc::Receiver<Chunk>,
        stop: &Stop,
    ) -> Result<(), QemuImgError> {
        super::bitmaps::write_chunks(dst, chunks, stop).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::{read_header, sniff_format, Header};
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
        let q = QemuImgCli;
        q.create(&base, 1 << 20, &CreateOptions::default(), &stop).await.unwrap();
        q.create_overlay(&base, "qcow2", &top, None, &CreateOptions::preallocation("full"), &stop).await.unwrap();
        let header = Header { format: "qcow2", backing_file: None, external_data: false, virtual_size: 1 << 20 };
        assert_eq!(read_header(&base).unwrap(), header);
        assert_eq!(read_header(&top).unwrap().backing_file.as_deref(), base.to_str());
        let i = q.info(&top, &stop).await.unwrap();
        assert_eq!(i.backing_filename_format.as_deref(), Some("qcow2"));
        assert_eq!(i.virtual_size, 1 << 20);
        assert_eq!(q.sizes(&top, &stop).await.unwrap(), (i.virtual_size, i.actual_size), "as qemu-img counts them");
        let raw = dir.path().join("raw.img");
        std::fs::write(&raw, b"QFI").unwrap();
        assert_eq!(sniff_format(&raw).unwrap(), "raw");
        let i = q.info(&raw, &stop).await.unwrap();
        assert_eq!(q.sizes(&raw, &stop).await.unwrap(), (i.virtual_size, i.actual_size));
    }

    #[tokio::test]
    async fn an_overlay_written_in_process_reads_its_size_and_backing_as_qemu_img_would() {
        let dir = tempfile::tempdir().unwrap();
        let stop = Stop::new();
        let q = QemuImgCli;
        // A raw backing of partial sectors: qemu-img rounds its size up to whole ones.
        std::fs::write(dir.path().join("r.raw"), vec![7u8; 1000]).unwrap();
        let top = dir.path().join("top.qcow2");
        q.create_overlay(Path::new("r.raw"), "raw", &top, None, &CreateOptions::default(), &stop).await.unwrap();
        let i = q.info(&top, &stop).await.unwrap();
        assert_eq!((i.virtual_size, i.backing_filename.as_deref()), (1024, Some("r.raw")));
        assert_eq!(i.backing_filename_format.as_deref(), Some("raw"));
        // A backing that is not what the command says is qemu-img's to refuse, in its words.
        let e = q.create_overlay(Path::new("r.raw"), "qcow2", &top, None, &CreateOptions::default(), &stop).await;
        assert!(e.unwrap_err().to_string().contains("qcow2"), "qemu-img's error");
        let opts = CreateOptions::default();
        let missing = q.create_overlay(Path::new("nope.qcow2"), "qcow2", &top, Some(1 << 20), &opts, &stop).await;
        assert!(missing.unwrap_err().to_string().contains("nope.qcow2"));
    }

    #[tokio::test]
    async fn failure_keeps_qemu_img_stderr() {
        let e = QemuImgCli.info(Path::new("/nonexistent/x.qcow2"), &Stop::new()).await.unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.qcow2"), "{e}");
        assert!(e.to_string().contains("No such file"), "{e}");
    }
}
