//! Byte ranges moved between images through `qemu-nbd`: one server per image on a unix socket
//! in a private directory, and a small blocking client of the NBD protocol (fixed newstyle
//! handshake, simple replies). A copy's reader (an export, or librbd in the agent) sends
//! chunks over a channel to the writer of its target export, so reading and writing overlap.
//! One server process per image instead of one `qemu-img convert` per range: an incremental
//! backup of scattered changes pays for one or two process starts, not for one per range.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::Duration;

use tokio::process::Child;

use super::QemuImgError;
use crate::process::{self, ProcessError};
use crate::stop::Stop;

/// One byte range, `(offset, length)`.
pub type Extent = (u64, u64);

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;
const SEND_WRITE_ZEROES: u16 = 1 << 6;

/// The most one request moves (qemu-nbd takes up to 32 MiB).
pub const MAX_REQUEST: u64 = 4 << 20;

/// A violation of the protocol or a failed request, in words for the error that carries it.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the server broke the NBD protocol: {0}")]
    Protocol(String),
    #[error("the server refused {what} of {length} bytes at offset {offset}: error {errno}")]
    Refused { what: &'static str, offset: u64, length: u64, errno: u32 },
    /// The task was stopped between two requests.
    #[error("stopped")]
    Stopped,
    /// The copy's writer went away (its own error says why).
    #[error("the copy's writer stopped")]
    WriterGone,
}

/// A connected NBD export.
pub struct Export {
    sock: UnixStream,
    /// The export's size in bytes.
    pub size: u64,
    flags: u16,
    cookie: u64,
}

fn u16_of(r: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn u32_of(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn u64_of(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Export {
    /// Connects to the default export of the server on `socket`.
    pub fn connect(socket: &Path) -> Result<Export, NbdError> {
        let mut sock = UnixStream::connect(socket)?;
        // A server that stops answering or reading must not hang the copy for ever.
        sock.set_read_timeout(Some(Duration::from_secs(300)))?;
        sock.set_write_timeout(Some(Duration::from_secs(300)))?;
        if u64_of(&mut sock)? != NBDMAGIC || u64_of(&mut sock)? != IHAVEOPT {
            return Err(NbdError::Protocol("not a newstyle NBD server".into()));
        }
        let server = u16_of(&mut sock)?;
        if server & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol("the server does not speak fixed newstyle".into()));
        }
        let no_zeroes = server & FLAG_NO_ZEROES != 0;
        let client = u32::from(FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 });
        let mut hello = Vec::with_capacity(20);
        hello.extend_from_slice(&client.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hello.extend_from_slice(&0u32.to_be_bytes());
        sock.write_all(&hello)?;
        let size = u64_of(&mut sock)?;
        let flags = u16_of(&mut sock)?;
        if !no_zeroes {
            sock.read_exact(&mut [0; 124])?;
        }
        Ok(Export { sock, size, flags, cookie: 0 })
    }

    fn request(&mut self, kind: u16, offset: u64, length: u64, data: &[u8]) -> Result<(), NbdError> {
        self.cookie += 1;
        let mut head = Vec::with_capacity(28 + data.len());
        head.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head.extend_from_slice(&0u16.to_be_bytes());
        head.extend_from_slice(&kind.to_be_bytes());
        head.extend_from_slice(&self.cookie.to_be_bytes());
        head.extend_from_slice(&offset.to_be_bytes());
        head.extend_from_slice(&(length as u32).to_be_bytes());
        head.extend_from_slice(data);
        self.sock.write_all(&head)?;
        Ok(())
    }

    /// Waits for the reply to the last request; `what` names it in an error.
    fn reply(&mut self, what: &'static str, offset: u64, length: u64) -> Result<(), NbdError> {
        if u32_of(&mut self.sock)? != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Protocol(format!("no simple reply to {what}")));
        }
        let errno = u32_of(&mut self.sock)?;
        if u64_of(&mut self.sock)? != self.cookie {
            return Err(NbdError::Protocol(format!("the reply to {what} names another request")));
        }
        match errno {
            0 => Ok(()),
            errno => Err(NbdError::Refused { what, offset, length, errno }),
        }
    }

    fn check(&self, offset: u64, length: u64) -> Result<(), NbdError> {
        if length > MAX_REQUEST || !offset.checked_add(length).is_some_and(|end| end <= self.size) {
            return Err(NbdError::Protocol(format!(
                "{length} bytes at offset {offset} are not inside the {}-byte export",
                self.size
            )));
        }
        Ok(())
    }

    /// Fills `buf` from `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let length = buf.len() as u64;
        self.check(offset, length)?;
        self.request(CMD_READ, offset, length, &[])?;
        self.reply("a read", offset, length)?;
        self.sock.read_exact(buf)?;
        Ok(())
    }

    /// Writes `data` at `offset`; all-zero data as zeroes, which a qcow2 file records without
    /// allocating data clusters.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let length = data.len() as u64;
        self.check(offset, length)?;
        if self.flags & SEND_WRITE_ZEROES != 0 && data.iter().all(|b| *b == 0) {
            self.request(CMD_WRITE_ZEROES, offset, length, &[])?;
            return self.reply("writing zeroes", offset, length);
        }
        self.request(CMD_WRITE, offset, length, data)?;
        self.reply("a write", offset, length)
    }

    /// Makes every write so far durable, then ends the session.
    pub fn finish(mut self) -> Result<(), NbdError> {
        self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply("a flush", 0, 0)?;
        self.disconnect()
    }

    /// Ends the session: a server without other clients then closes its image and exits.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.request(CMD_DISC, 0, 0, &[])
    }
}

/// A piece of a copy: bytes, and the offset they were read at and are written at.
pub type Chunk = (u64, Vec<u8>);

/// The channel of one copy's chunks: the reader may run this many chunks ahead of the writer,
/// so one reads while the other writes.
pub fn chunk_channel() -> (SyncSender<Chunk>, Receiver<Chunk>) {
    std::sync::mpsc::sync_channel(4)
}

/// Why sending the chunks of a copy ended early.
#[derive(Debug)]
pub enum SendError<E> {
    Read(E),
    Stopped,
    /// The receiving end is gone: the writer failed (its own error says why).
    WriterGone,
}

/// Reads `extents` in pieces of at most [`MAX_REQUEST`] bytes with `read(offset, buf)` and
/// sends each to `chunks`; gives up between pieces once `stop` fires.
pub fn send_chunks<E>(
    extents: &[Extent],
    chunks: &SyncSender<Chunk>,
    stop: &Stop,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<(), SendError<E>> {
    for &(offset, length) in extents {
        let mut done = 0;
        while done < length {
            if stop.is_stopped() {
                return Err(SendError::Stopped);
            }
            let n = (length - done).min(MAX_REQUEST);
            let mut buf = vec![0; n as usize];
            read(offset + done, &mut buf).map_err(SendError::Read)?;
            chunks.send((offset + done, buf)).map_err(|_| SendError::WriterGone)?;
            done += n;
        }
    }
    Ok(())
}

/// Writes each chunk `chunks` brings into `to` until its sender hangs up; gives up between
/// chunks once `stop` fires.
pub fn write_chunks(to: &mut Export, chunks: &Receiver<Chunk>, stop: &Stop) -> Result<(), NbdError> {
    for (offset, data) in chunks {
        if stop.is_stopped() {
            return Err(NbdError::Stopped);
        }
        to.write(offset, &data)?;
    }
    Ok(())
}

/// Extents in offset order, those that touch or overlap joined.
pub fn coalesce(extents: &[Extent]) -> Vec<Extent> {
    let mut sorted = extents.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<Extent> = Vec::new();
    for (offset, length) in sorted {
        match out.last_mut() {
            Some((start, len)) if offset <= *start + *len => *len = (*len).max(offset + length - *start),
            _ => out.push((offset, length)),
        }
    }
    out
}

const DIR_PREFIX: &str = "kvmagent-nbd-";

/// Removes the socket directories of servers a killed agent left (its servers died with it):
/// those whose agent's pid no longer runs. Other agents' directories stay, even on a shared
/// temporary directory.
pub fn remove_abandoned_dirs() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name.strip_prefix(DIR_PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        let abandoned = pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if abandoned && std::fs::remove_dir_all(e.path()).is_ok() {
            removed.push(e.path());
        }
    }
    removed
}

/// A `qemu-nbd` serving one image on a socket in a private directory; killed when dropped.
pub struct Server {
    child: Child,
    dir: PathBuf,
    pub socket: PathBuf,
    command: String,
    path: String,
}

impl Server {
    /// Starts `qemu-nbd <opts> --socket <socket> <image>` and waits until it listens.
    pub async fn start(image: &str, opts: &[&str], stop: &Stop) -> Result<Server, QemuImgError> {
        let err = |source| QemuImgError::Run { subcommand: "nbd", path: image.to_owned(), source };
        // A short private path: unix socket paths are limited to 108 bytes. The agent's pid in
        // the name tells a later start whose directory it is ([`remove_abandoned_dirs`]).
        let name = format!("{DIR_PREFIX}{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let dir = std::env::temp_dir().join(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| err(ProcessError::Io { command: format!("mkdir {}", dir.display()), source }))?;
        let socket = dir.join("nbd.sock");
        let mut args: Vec<OsString> = opts.iter().map(OsString::from).collect();
        args.extend(["--socket".into(), socket.clone().into(), image.into()]);
        let command = process::display("qemu-nbd", &args);
        let mut cmd = process::child_command("qemu-nbd", &args);
        cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err(ProcessError::Spawn { program: "qemu-nbd".into(), source }));
            }
        };
        let mut server = Server { child, dir, socket, command, path: image.to_owned() };
        // The socket appears once the export is ready; a server that exits first failed.
        while !server.socket.exists() {
            if let Ok(Some(status)) = server.child.try_wait() {
                let stderr = server.stderr().await;
                let failed =
                    ProcessError::Failed { command: server.command.clone(), status, stdout: String::new(), stderr };
                return Err(err(failed));
            }
            if stop.is_stopped() {
                return Err(err(ProcessError::Stopped { command: server.command.clone() }));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(server)
    }

    async fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut s).await;
        }
        s
    }

    /// The server's end as an error: how it `exited`, and what it printed after `cause`.
    async fn ended(&mut self, exited: std::io::Result<std::process::ExitStatus>, cause: String) -> QemuImgError {
        let command = self.command.clone();
        let source = match exited {
            Ok(status) => {
                let stderr = format!("{cause}{}", self.stderr().await.trim());
                ProcessError::Failed { command, status, stdout: String::new(), stderr }
            }
            Err(source) => ProcessError::Io { command, source },
        };
        QemuImgError::Run { subcommand: "nbd", path: self.path.clone(), source }
    }

    /// The error of a copy through this server: `e`, with what the server printed.
    pub async fn failed(mut self, e: NbdError, stop: &Stop) -> QemuImgError {
        if matches!(e, NbdError::Stopped) || stop.is_stopped() {
            let source = ProcessError::Stopped { command: self.command.clone() };
            return QemuImgError::Run { subcommand: "nbd", path: self.path.clone(), source };
        }
        let _ = self.child.start_kill();
        let exited = self.child.wait().await;
        self.ended(exited, format!("{e}; the server said: ")).await
    }

    /// Waits for a server whose only client has disconnected to exit, having closed its image
    /// (written a qcow2 file's metadata, let go of an RBD image: a killed client's watch would
    /// hold the image for half a minute); fails if it did not exit cleanly.
    pub async fn wait(mut self) -> Result<(), QemuImgError> {
        let exited = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        let exited = exited.unwrap_or_else(|_| Err(std::io::Error::other("it did not exit within 60 s")));
        match exited {
            Ok(status) if status.success() => Ok(()),
            exited => Err(self.ended(exited, String::new()).await),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn only_extents_that_touch_or_overlap_are_joined() {
        let joined = coalesce(&[(8192, 4096), (0, 4096), (4096, 4096), (65536, 512), (65000, 600)]);
        assert_eq!(joined, vec![(0, 12288), (65000, 1048)]);
        assert!(coalesce(&[]).is_empty());
    }

    #[test]
    fn the_directories_of_dead_agents_go_and_those_of_live_ones_stay() {
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        exited.wait().unwrap();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let dead = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{tag}", exited.id()));
        let live = std::env::temp_dir().join(format!("{DIR_PREFIX}{}-{tag}", std::process::id()));
        for d in [&dead, &live] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("nbd.sock"), b"").unwrap();
        }
        let removed = remove_abandoned_dirs();
        assert!(removed.contains(&dead) && !dead.exists(), "{removed:?}");
        assert!(live.exists() && !removed.contains(&live), "{removed:?}");
        std::fs::remove_dir_all(&live).unwrap();
    }

    /// A server that says `hello` to whoever connects, then hangs up.
    fn fake_server(hello: Vec<u8>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s");
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = listener.accept() {
                let _ = c.write_all(&hello);
                let _ = c.read(&mut [0; 64]);
            }
        });
        (dir, socket)
    }

    #[test]
    fn a_server_that_is_not_nbd_or_hangs_up_mid_handshake_is_an_error_not_a_hang() {
        let (_d, s) = fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
        assert!(matches!(Export::connect(&s), Err(NbdError::Protocol(_))));
        let mut oldstyle = NBDMAGIC.to_be_bytes().to_vec();
        oldstyle.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        let (_d, s) = fake_server(oldstyle);
        assert!(matches!(Export::connect(&s), Err(NbdError::Protocol(_))));
        let mut cut = NBDMAGIC.to_be_bytes().to_vec();
        cut.extend_from_slice(&IHAVEOPT.to_be_bytes());
        cut.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        let (_d, s) = fake_server(cut);
        assert!(matches!(Export::connect(&s), Err(NbdError::Io(_))), "no export size before the hang-up");
    }

    #[tokio::test]
    async fn ranges_read_and_written_through_qemu_nbd_land_where_asked_and_zeros_stay_unallocated() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.qcow2"));
        let mut data = vec![0u8; 4 << 20];
        data[..1 << 20].fill(0x5a);
        data[3 << 20..].fill(0xa5);
        std::fs::write(&src, &data).unwrap();
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&dst)
            .arg("4M")
            .status()
            .unwrap();
        assert!(made.success());
        let stop = Stop::new();
        let from = Server::start(&src.display().to_string(), &["--read-only", "--format=raw"], &stop).await.unwrap();
        let to = Server::start(&dst.display().to_string(), &["--format=qcow2"], &stop).await.unwrap();
        let (a, b) = (from.socket.clone(), to.socket.clone());
        // Out of the export, and the zeros in the middle, as ranges of their own.
        let extents = [(0, 1 << 20), (1 << 20, 1 << 20), ((3 << 20) + 512, (1 << 20) - 512)];
        let copied = tokio::task::spawn_blocking(move || {
            let (mut from, mut to) = (Export::connect(&a)?, Export::connect(&b)?);
            assert!(to.write(4 << 20, &[1]).is_err(), "past the end is refused before it is sent");
            let stopped = Stop::new();
            stopped.fire(crate::stop::StopReason::Cancelled);
            let (tx, rx) = chunk_channel();
            let sent = send_chunks(&extents, &tx, &stopped, |o, b| from.read(o, b));
            assert!(matches!(sent, Err(SendError::Stopped)), "{sent:?}");
            drop(rx);
            let sent = send_chunks(&extents, &tx, &Stop::new(), |o, b| from.read(o, b));
            assert!(matches!(sent, Err(SendError::WriterGone)), "{sent:?}");
            let (tx, rx) = chunk_channel();
            let writer = std::thread::spawn(move || {
                write_chunks(&mut to, &rx, &Stop::new())?;
                to.finish()
            });
            send_chunks(&extents, &tx, &Stop::new(), |o, b| from.read(o, b)).unwrap();
            drop(tx);
            writer.join().unwrap()
        })
        .await
        .unwrap();
        copied.unwrap();
        to.wait().await.unwrap();
        drop(from);
        let read = std::process::Command::new("qemu-img")
            .args(["dd", "-f", "qcow2", "-O", "raw", "bs=1M"])
            .arg(format!("if={}", dst.display()))
            .arg(format!("of={}", dir.path().join("out.raw").display()))
            .status()
            .unwrap();
        assert!(read.success());
        let mut want = data.clone();
        want[3 << 20..(3 << 20) + 512].fill(0);
        assert_eq!(std::fs::read(dir.path().join("out.raw")).unwrap(), want, "only the ranges asked for");
        let map = std::process::Command::new("qemu-img").args(["map", "--output=json"]).arg(&dst).output().unwrap();
        let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
        let zeros = map.as_array().unwrap().iter().find(|e| e["start"] == 1 << 20).unwrap();
        assert_eq!((zeros["zero"].as_bool(), zeros["data"].as_bool()), (Some(true), Some(false)), "{map}");
    }
}
