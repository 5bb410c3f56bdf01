//! Persistent dirty bitmaps of qcow2 files nothing has open (a stopped VM's volumes), and
//! copying the clusters one marks: `qemu-nbd -B` exports the image and its bitmap read-only,
//! `qemu-img map` with `x-dirty-bitmap` lists the dirty extents, and the agent copies them
//! over NBD into a second server's image ([`super::nbd`]). No shell; the servers are killed
//! when the copy ends, fails or is stopped.

use std::ffi::OsString;
use std::path::Path;
use std::sync::mpsc::{Receiver, SyncSender};

use serde::Deserialize;

use super::nbd::{self, Chunk, Export, Extent, NbdError, SendError, Server};
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

/// The extents bitmap `name` marks dirty, read from the server exporting it.
async fn dirty_extents(server: &Server, name: &str, stop: &Stop) -> Result<Vec<Extent>, QemuImgError> {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        server.socket.display()
    );
    let args: Vec<OsString> = vec!["map".into(), "--output=json".into(), "--image-opts".into(), opts.into()];
    let out = qemu_img("map", &server.socket, &args, stop).await?;
    parse_dirty(&out).map_err(|reason| QemuImgError::Parse {
        subcommand: "map",
        path: server.socket.display().to_string(),
        reason,
    })
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
    Ok(entries.into_iter().filter(|e| !e.data && e.length > 0).map(|e| (e.start, e.length)).collect())
}

/// Copies into `dst` (an overlay on an earlier copy of `src`) the extents of qcow2 file `src`
/// that bitmap `name` marks dirty.
pub async fn copy_dirty(src: &Path, name: &str, dst: &Path, stop: &Stop) -> Result<(), QemuImgError> {
    // The bitmap is read from the file itself when it is in the layout QEMU writes.
    let (file, bitmap) = (src.to_owned(), name.to_owned());
    let read = tokio::task::spawn_blocking(move || super::bitmap_directory::dirty_extents(&file, &bitmap));
    if let Ok(Some(extents)) = read.await {
        return copy_extents(&src.display().to_string(), "qcow2", &extents, dst, stop).await;
    }
    // The map reads from a server of its own, which exits once the map is done; the copy
    // starts another.
    let extents = {
        let opts = ["--read-only", "--format=qcow2", "--bitmap", name];
        let server = Server::start(&src.display().to_string(), &opts, stop).await?;
        dirty_extents(&server, name, stop).await?
    };
    copy_extents(&src.display().to_string(), "qcow2", &extents, dst, stop).await
}

/// Copies into `dst` (an overlay on an earlier copy of `src`) the byte ranges `extents` of
/// image `src`: a file of format `src_fmt`, or an RBD image or snapshot by its QEMU name
/// (`rbd:...`, raw). Nothing to copy leaves `dst` as it is.
pub async fn copy_extents(
    src: &str,
    src_fmt: &str,
    extents: &[Extent],
    dst: &Path,
    stop: &Stop,
) -> Result<(), QemuImgError> {
    if extents.is_empty() {
        return Ok(());
    }
    let (tx, rx) = nbd::chunk_channel();
    let (read, written) = tokio::join!(send_extents(src, src_fmt, extents, tx, stop), write_chunks(dst, rx, stop));
    // A writer that failed cut its reader short: its own error says why.
    written.and(read)
}

/// Sends the byte ranges `extents` of image `src` (format `src_fmt`) to `chunks`, read
/// through a read-only server of its own.
pub async fn send_extents(
    src: &str,
    src_fmt: &str,
    extents: &[Extent],
    chunks: SyncSender<Chunk>,
    stop: &Stop,
) -> Result<(), QemuImgError> {
    let server = Server::start(src, &["--read-only", &format!("--format={src_fmt}")], stop).await?;
    let (extents, halt) = (nbd::coalesce(extents), stop.clone());
    // Its one client gone, it closes the image and exits.
    served(server, stop, move |socket| {
        let mut from = Export::connect(socket)?;
        nbd::send_chunks(&extents, &chunks, &halt, |offset, buf| from.read(offset, buf)).map_err(|e| match e {
            SendError::Read(e) => e,
            SendError::Stopped => NbdError::Stopped,
            SendError::WriterGone => NbdError::WriterGone,
        })?;
        from.disconnect()
    })
    .await
}

/// Writes each chunk `chunks` brings into the same range of qcow2 file `dst` (zeros as zero
/// clusters) until its sender hangs up, through a server of its own.
pub async fn write_chunks(dst: &Path, chunks: Receiver<Chunk>, stop: &Stop) -> Result<(), QemuImgError> {
    // `dst` is a file being built, synced by the agent before it is published: the server's
    // own flushes (qcow2 orders its metadata writes with one each) would only slow the copy.
    let target = Server::start(&dst.display().to_string(), &["--format=qcow2", "--cache=unsafe"], stop).await?;
    let halt = stop.clone();
    served(target, stop, move |socket| {
        let mut to = Export::connect(socket)?;
        nbd::write_chunks(&mut to, &chunks, &halt)?;
        to.finish()
    })
    .await
}

/// Runs `client` with the socket of `server` on a blocking thread; then waits for the server,
/// its client gone, to exit cleanly, or, when the client failed, ends it and says what it
/// printed.
async fn served(
    server: Server,
    stop: &Stop,
    client: impl FnOnce(&Path) -> Result<(), NbdError> + Send + 'static,
) -> Result<(), QemuImgError> {
    let socket = server.socket.clone();
    let done = tokio::task::spawn_blocking(move || client(&socket))
        .await
        .unwrap_or_else(|e| Err(NbdError::Protocol(format!("the copy failed: {e}"))));
    match done {
        Ok(()) => server.wait().await,
        Err(e) => Err(server.failed(e, stop).await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_extents_are_the_holes() {
        let out = r#"[{"start":0,"length":65536,"depth":0,"present":true,"zero":false,"data":true},
            {"start":65536,"length":65536,"depth":0,"present":false,"zero":false,"data":false},
            {"start":131072,"length":65536,"depth":0,"present":true,"zero":false,"data":true},
            {"start":196608,"length":65536,"depth":0,"present":false,"zero":false,"data":false},
            {"start":262144,"length":0,"depth":0,"present":false,"zero":false,"data":false}]"#;
        assert_eq!(parse_dirty(out).unwrap(), vec![(65536, 65536), (196608, 65536)]);
        assert!(parse_dirty("nonsense").is_err());
    }

    fn run(program: &str, args: &[&str]) {
        let out = std::process::Command::new(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The dirty extents read from the file are those QEMU exports: at 512 B granules (a
    /// bitmap of four clusters), across a cluster's end, unaligned, at the disk's cut end.
    #[tokio::test]
    async fn the_dirty_extents_read_from_the_file_are_those_qemu_exports() {
        let dir = tempfile::tempdir().unwrap();
        let mib = 1u64 << 20;
        for (size, granularity, writes) in [
            (
                1024 * mib,
                "512",
                vec![
                    (0, 512),
                    (256 * mib - 4096, 8192),
                    (300 * mib, 10 * mib),
                    (700 * mib + 3, 100),
                    (1024 * mib - 512, 512),
                ],
            ),
            (64 * mib + 512, "65536", vec![(65536, 1), (64 * mib, 512), (5 * mib, 3 * 65536 + 1)]),
            (8 * mib, "65536", vec![]),
        ] {
            let img = dir.path().join(format!("{size}.qcow2"));
            let p = img.to_str().unwrap();
            run("qemu-img", &["create", "-q", "-f", "qcow2", p, &size.to_string()]);
            run("qemu-img", &["bitmap", "--add", "-g", granularity, p, "b"]);
            let mut args = vec!["-f".to_owned(), "qcow2".to_owned()];
            for (at, len) in &writes {
                args.extend(["-c".to_owned(), format!("write -P 7 {at} {len}")]);
            }
            args.push(p.to_owned());
            run("qemu-io", &args.iter().map(String::as_str).collect::<Vec<_>>());

            let ours = super::super::bitmap_directory::dirty_extents(&img, "b").expect("a bitmap this reads");
            let opts = ["--read-only", "--persistent", "--format=qcow2", "--bitmap", "b"];
            let server = Server::start(p, &opts, &Stop::new()).await.unwrap();
            let qemus = dirty_extents(&server, "b", &Stop::new()).await.unwrap();
            assert_eq!(ours, qemus, "{size} at {granularity}: {writes:?}");
            assert_eq!(ours.is_empty(), writes.is_empty());
        }
    }

    #[test]
    fn a_bitmap_left_in_use_is_not_consistent() {
        let b = |flags: &[&str]| Bitmap { name: "b".into(), flags: flags.iter().map(|f| f.to_string()).collect() };
        assert!(b(&["auto"]).is_consistent());
        assert!(!b(&["in-use", "auto"]).is_consistent());
        assert!(!b(&[]).is_consistent());
    }
}
