//! Persistent dirty bitmaps of qcow2 files nothing has open (a stopped VM's volumes), and
//! reading which clusters one marks: `qemu-nbd -B` exports the bitmap read-only on a unix
//! socket, and `qemu-img map` with `x-dirty-bitmap` lists its dirty extents, which are then
//! copied one window at a time with `qemu-img convert`. No shell; the server is killed when
//! the read ends, fails or is stopped.

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::QemuImgError;
use crate::process::{self, Priority, ProcessError};
use crate::stop::Stop;

/// One bitmap of a qcow2 file, as `qemu-img info` lists it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    /// `auto` (kept up to date while the image is open), `in-use` (left open by a process that
    /// died: its content cannot be trusted).
    #[serde(default)]
    pub flags: Vec<String>,
}

impl Bitmap {
    /// Whether the bitmap has tracked every write since it was made.
    pub fn is_consistent(&self) -> bool {
        self.flags.iter().any(|f| f == "auto") && !self.flags.iter().any(|f| f == "in-use")
    }
}

fn qemu_img_error(subcommand: &'static str, path: &Path, source: ProcessError) -> QemuImgError {
    QemuImgError::Run { subcommand, path: path.display().to_string(), source }
}

async fn qemu_img(
    subcommand: &'static str,
    path: &Path,
    args: &[OsString],
    stop: &Stop,
) -> Result<String, QemuImgError> {
    process::run_with_lines_as("qemu-img", args, stop, Priority::Normal, |_| {})
        .await
        .map(|o| o.stdout)
        .map_err(|e| qemu_img_error(subcommand, path, e))
}

/// The bitmaps of qcow2 file `path` (not of its backing files).
pub async fn list(path: &Path, stop: &Stop) -> Result<Vec<Bitmap>, QemuImgError> {
    #[derive(Deserialize)]
    struct Info {
        #[serde(rename = "format-specific")]
        format_specific: Option<Specific>,
    }
    #[derive(Deserialize)]
    struct Specific {
        data: Option<Data>,
    }
    #[derive(Deserialize)]
    struct Data {
        #[serde(default)]
        bitmaps: Vec<Bitmap>,
    }
    let args = ["info", "--force-share", "--output=json", "-f", "qcow2"].map(OsString::from);
    let mut args = args.to_vec();
    args.push(path.into());
    let out = qemu_img("info", path, &args, stop).await?;
    let info: Info = serde_json::from_str(&out).map_err(|e| QemuImgError::Parse {
        subcommand: "info",
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(info.format_specific.and_then(|s| s.data).map(|d| d.bitmaps).unwrap_or_default())
}

/// Adds (`add`) or removes a persistent bitmap of `path`.
pub async fn change(path: &Path, name: &str, add: bool, stop: &Stop) -> Result<(), QemuImgError> {
    let op = if add { "--add" } else { "--remove" };
    let args: Vec<OsString> = vec!["bitmap".into(), op.into(), "-f".into(), "qcow2".into(), path.into(), name.into()];
    qemu_img("bitmap", path, &args, stop).await.map(drop)
}

/// One byte range, `(offset, length)`.
pub type Extent = (u64, u64);

/// Gaps shorter than this between dirty extents are copied too: one copy process instead of
/// two, for a little more data.
const MERGE_GAP: u64 = 1 << 20;

/// The extents bitmap `name` of qcow2 file `path` marks dirty, merged across short gaps.
/// `socket` is a path in a private directory for the export.
async fn dirty_extents(path: &Path, name: &str, socket: &Path, stop: &Stop) -> Result<Vec<Extent>, QemuImgError> {
    let mut server = process::child_command(
        "qemu-nbd",
        &[
            OsString::from("--read-only"),
            "--format=qcow2".into(),
            "--bitmap".into(),
            name.into(),
            "--socket".into(),
            socket.into(),
            path.into(),
        ],
    )
    .stdout(std::process::Stdio::null())
    .spawn()
    .map_err(|source| qemu_img_error("map", path, ProcessError::Spawn { program: "qemu-nbd".into(), source }))?;
    let result = async {
        // The socket appears once the export is ready; a server that exits first failed.
        while !socket.exists() {
            if let Ok(Some(status)) = server.try_wait() {
                let stderr = match server.stderr.take() {
                    Some(mut e) => {
                        let mut s = String::new();
                        let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut s).await;
                        s
                    }
                    None => String::new(),
                };
                let command = format!("qemu-nbd --bitmap {name} {}", path.display());
                return Err(qemu_img_error(
                    "map",
                    path,
                    ProcessError::Failed { command, status, stdout: String::new(), stderr },
                ));
            }
            if stop.is_stopped() {
                return Err(qemu_img_error("map", path, ProcessError::Stopped { command: "qemu-nbd".into() }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
            socket.display()
        );
        let args: Vec<OsString> = vec!["map".into(), "--output=json".into(), "--image-opts".into(), opts.into()];
        let out = qemu_img("map", path, &args, stop).await?;
        parse_dirty(&out).map_err(|reason| QemuImgError::Parse {
            subcommand: "map",
            path: path.display().to_string(),
            reason,
        })
    }
    .await;
    let _ = server.start_kill();
    let _ = server.wait().await;
    result
}

/// `qemu-img map` over a dirty-bitmap export reports dirty extents as holes (`data: false`).
fn parse_dirty(out: &str) -> Result<Vec<Extent>, String> {
    #[derive(Deserialize)]
    struct Entry {
        start: u64,
        length: u64,
        data: bool,
    }
    let entries: Vec<Entry> = serde_json::from_str(out).map_err(|e| e.to_string())?;
    Ok(merge_close(entries.into_iter().filter(|e| !e.data && e.length > 0).map(|e| (e.start, e.length))))
}

/// Extents in offset order, those less than [`MERGE_GAP`] apart merged into one.
fn merge_close(sorted: impl IntoIterator<Item = Extent>) -> Vec<Extent> {
    let mut extents: Vec<Extent> = Vec::new();
    for (offset, length) in sorted {
        match extents.last_mut() {
            Some((start, len)) if offset <= *start + *len + MERGE_GAP => *len = (*len).max(offset + length - *start),
            _ => extents.push((offset, length)),
        }
    }
    extents
}

/// Copies into `dst` (an overlay on an earlier copy of `src`) the extents of qcow2 file `src`
/// that bitmap `name` marks dirty.
pub async fn copy_dirty(src: &Path, name: &str, dst: &Path, stop: &Stop) -> Result<(), QemuImgError> {
    // A private directory with a short path: unix socket paths are limited to 108 bytes.
    let dir = std::env::temp_dir().join(format!("kvmagent-nbd-{}", uuid::Uuid::new_v4().simple()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir).map_err(|source| {
        qemu_img_error("map", src, ProcessError::Io { command: format!("mkdir {}", dir.display()), source })
    })?;
    let extents = dirty_extents(src, name, &dir.join("nbd.sock"), stop).await;
    let _ = std::fs::remove_dir_all(&dir);
    copy_extents(&src.display().to_string(), "qcow2", &extents?, dst, stop).await
}

/// Copies into `dst` (an overlay on an earlier copy of `src`) the byte ranges `extents` (in
/// offset order) of image `src`: a file of format `src_fmt`, or an RBD image or snapshot by
/// its QEMU name (`rbd:...`, raw).
pub async fn copy_extents(
    src: &str,
    src_fmt: &str,
    extents: &[Extent],
    dst: &Path,
    stop: &Stop,
) -> Result<(), QemuImgError> {
    for e in merge_close(extents.iter().map(|&e| sectors(e))) {
        copy_extent(src, src_fmt, dst, e, stop).await?;
    }
    Ok(())
}

/// The whole 512-byte sectors that cover `extent`: the windows of the raw driver are in
/// sectors (image sizes are whole sectors, so the last one is inside the image).
fn sectors((offset, length): Extent) -> Extent {
    let start = offset / 512 * 512;
    (start, (offset + length).div_ceil(512) * 512 - start)
}

/// `driver=raw` over a window of an image: a file of format `fmt` (with its backing chain),
/// or an RBD image by its QEMU name.
fn window(src: &str, fmt: &str, (offset, length): Extent) -> String {
    // Commas in a name are doubled in image options.
    let name = src.replace(',', ",,");
    let under = if src.starts_with("rbd:") {
        format!("file.driver=rbd,file.filename={name}")
    } else {
        format!("file.driver={fmt},file.file.driver=file,file.file.filename={name}")
    };
    format!("driver=raw,offset={offset},size={length},{under}")
}

/// Copies the bytes of `extent` of image `src` (see [`window`]) into the same range of qcow2
/// file `dst`, zeros as zero clusters.
async fn copy_extent(src: &str, src_fmt: &str, dst: &Path, extent: Extent, stop: &Stop) -> Result<(), QemuImgError> {
    let args: Vec<OsString> = vec![
        "convert".into(),
        "-n".into(),
        "--image-opts".into(),
        "--target-image-opts".into(),
        window(src, src_fmt, extent).into(),
        window(&dst.display().to_string(), "qcow2", extent).into(),
    ];
    process::run_with_lines_as("qemu-img", &args, stop, Priority::Copy, |_| {})
        .await
        .map(drop)
        .map_err(|e| qemu_img_error("convert", dst, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_extents_are_the_holes_merged_across_short_gaps() {
        let out = r#"[{"start":0,"length":65536,"depth":0,"present":true,"zero":false,"data":true},
            {"start":65536,"length":65536,"depth":0,"present":false,"zero":false,"data":false},
            {"start":131072,"length":65536,"depth":0,"present":true,"zero":false,"data":true},
            {"start":196608,"length":65536,"depth":0,"present":false,"zero":false,"data":false},
            {"start":262144,"length":67108864,"depth":0,"present":true,"zero":false,"data":true},
            {"start":67371008,"length":4096,"depth":0,"present":false,"zero":false,"data":false}]"#;
        assert_eq!(parse_dirty(out).unwrap(), vec![(65536, 196608), (67371008, 4096)]);
        assert!(parse_dirty("nonsense").is_err());
    }

    #[test]
    fn extents_close_together_are_copied_as_one_and_rbd_sources_are_read_through_librbd() {
        let mb = 1 << 20;
        let merged = merge_close([(0, 4096), (mb / 2, 4096), (4 * mb, 65536), (4 * mb + 4096, 4096)]);
        assert_eq!(merged, vec![(0, mb / 2 + 4096), (4 * mb, 65536)]);
        assert_eq!(sectors((1000, 64)), (512, 1024), "windows are whole sectors");
        assert_eq!(sectors((1024, 512)), (1024, 512));
        let w = window("rbd:p/i@s:conf=/etc/ceph/a,b.conf", "raw", (4096, 512));
        assert_eq!(
            w,
            "driver=raw,offset=4096,size=512,file.driver=rbd,file.filename=rbd:p/i@s:conf=/etc/ceph/a,,b.conf"
        );
        assert!(window("/v/a.qcow2", "qcow2", (0, 1))
            .ends_with("file.driver=qcow2,file.file.driver=file,file.file.filename=/v/a.qcow2"));
    }

    #[test]
    fn a_bitmap_left_in_use_is_not_consistent() {
        let b = |flags: &[&str]| Bitmap { name: "b".into(), flags: flags.iter().map(|f| f.to_string()).collect() };
        assert!(b(&["auto"]).is_consistent());
        assert!(!b(&["in-use", "auto"]).is_consistent());
        assert!(!b(&[]).is_consistent());
    }
}
