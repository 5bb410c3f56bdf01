//! Files to and from an SSH server (ZStack's SFTP backup storage), with `ssh` run directly as
//! a subprocess — never through a local shell — and the private key the management plane sends
//! written to a file of mode 0600 in the state directory for the length of one transfer.
//!
//! The remote side runs POSIX shell commands (as ZStack's own agent does with `scp` and
//! `ssh mkdir`), with every path single-quoted: a download reads `wc -c` (the size to expect)
//! and then `cat`; an upload streams into a temporary name that the remote side renames into
//! place only when it has every byte.
//!
//! Host keys: ZStack sends none, and its agent connects with `StrictHostKeyChecking=no` and
//! `UserKnownHostsFile=/dev/null`; so does this one, when no host key is given. With a host key
//! (`/image/cache` `hostKey`), it is the only one accepted.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{Receiver, STALL};
use crate::error::{AgentError, AgentResult};
use crate::stop::Stop;
use crate::tasks::TaskCtx;

/// The most of ssh's stderr an error message keeps.
const MAX_STDERR: usize = 16 << 10;
/// The name the given host key is filed under (`HostKeyAlias`), whatever the host is called.
const HOST_KEY_ALIAS: &str = "kvmagent-image-source";
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("hostname {0:?} is not a host name or an IP address")]
    BadHost(String),
    #[error("username {0:?} is not a user name (letters, digits, '.', '_', '-'; not starting with '-')")]
    BadUser(String),
    #[error("sshPort {0} is not a TCP port")]
    BadPort(u32),
    #[error("remote path {0:?} must be an absolute file path without control characters")]
    BadPath(String),
    #[error("url {0:?} is not sftp://[user@]host[:port]/absolute/path")]
    BadUrl(String),
    #[error("the ssh key is empty or not a private key in text form")]
    BadKey,
    #[error("hostKey {0:?} is not `<type> <base64>` as in known_hosts")]
    BadHostKey(String),
    #[error("cannot write the ssh key file {path}: {source}")]
    KeyFile { path: String, source: std::io::Error },
    #[error("could not start `ssh`: {0}; is openssh-client installed?")]
    Spawn(std::io::Error),
    #[error("{what} {remote} over ssh failed ({status}): {stderr}")]
    Failed { what: &'static str, remote: String, status: ExitStatus, stderr: String },
    #[error("{remote} announced its size as {line:?}, not a number of bytes")]
    BadSize { remote: String, line: String },
    #[error("no data moved to or from {remote} for {secs} s; the transfer was abandoned", secs = STALL.as_secs())]
    Stalled { remote: String },
    #[error("{what} {remote} over ssh failed: {source}")]
    Io { what: &'static str, remote: String, source: std::io::Error },
}

impl From<SshError> for AgentError {
    fn from(e: SshError) -> Self {
        match e {
            SshError::BadHost(_)
            | SshError::BadUser(_)
            | SshError::BadPort(_)
            | SshError::BadPath(_)
            | SshError::BadUrl(_)
            | SshError::BadKey
            | SshError::BadHostKey(_) => AgentError::invalid(e.to_string()),
            _ => AgentError::failed("the ssh transfer failed", e.to_string()),
        }
    }
}

/// A file on an SSH server and how to reach it.
#[derive(Debug, Clone)]
pub struct SshSource {
    host: String,
    port: u16,
    user: String,
    path: String,
    key: String,
    host_key: Option<String>,
}

fn check_host(host: &str) -> Result<String, SshError> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let ok = !bare.is_empty()
        && bare.len() <= 253
        && !bare.starts_with('-')
        && bare.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:_".contains(&b));
    if ok {
        Ok(bare.to_owned())
    } else {
        Err(SshError::BadHost(host.chars().take(300).collect()))
    }
}

fn check_user(user: &str) -> Result<String, SshError> {
    let ok = !user.is_empty()
        && user.len() <= 64
        && !user.starts_with('-')
        && user.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(user.to_owned())
    } else {
        Err(SshError::BadUser(user.chars().take(80).collect()))
    }
}

fn check_path(path: &str) -> Result<String, SshError> {
    let ok = path.starts_with('/') && path.len() <= 4096 && !path.ends_with('/') && !path.chars().any(char::is_control);
    if ok {
        Ok(path.to_owned())
    } else {
        Err(SshError::BadPath(path.chars().take(300).collect()))
    }
}

fn check_key(key: &str) -> Result<String, SshError> {
    let key = key.trim();
    if !key.starts_with("-----BEGIN ") || !key.contains("PRIVATE KEY-----") || key.len() > 64 << 10 {
        return Err(SshError::BadKey);
    }
    Ok(format!("{key}\n"))
}

fn check_host_key(k: &str) -> Result<String, SshError> {
    let parts: Vec<&str> = k.split_whitespace().collect();
    let ok = matches!(parts.as_slice(), [kind, data, ..] if parts.len() <= 3
        && kind.bytes().all(|b| b.is_ascii_alphanumeric() || b"-@.".contains(&b))
        && data.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)))
        && !k.chars().any(|c| c.is_control() && c != ' ')
        && k.len() <= 16 << 10;
    if ok {
        Ok(format!("{} {}", parts[0], parts[1]))
    } else {
        Err(SshError::BadHostKey(k.chars().take(80).collect()))
    }
}

/// `s` as one word of a POSIX shell command.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Percent-decodes a URL path.
fn unescape(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = (bytes.next()? as char).to_digit(16)?;
            let lo = (bytes.next()? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

impl SshSource {
    /// ZStack's fields: `hostname`, `sshPort` (0 is 22), `username` (absent is root), the remote
    /// path and the private key.
    pub fn new(
        host: &str,
        port: u32,
        user: Option<&str>,
        path: &str,
        key: &str,
        host_key: Option<&str>,
    ) -> Result<SshSource, SshError> {
        let port = match port {
            0 => 22,
            p => u16::try_from(p).map_err(|_| SshError::BadPort(p))?,
        };
        Ok(SshSource {
            host: check_host(host)?,
            port,
            user: check_user(user.filter(|u| !u.is_empty()).unwrap_or("root"))?,
            path: check_path(path)?,
            key: check_key(key)?,
            host_key: host_key.map(check_host_key).transpose()?,
        })
    }

    /// `sftp://[user@]host[:port]/absolute/path` (percent-escapes decoded).
    pub fn from_url(url: &str, key: &str, host_key: Option<&str>) -> Result<SshSource, SshError> {
        let bad = || SshError::BadUrl(url.chars().take(300).collect());
        let rest = url.strip_prefix("sftp://").ok_or_else(bad)?;
        let (authority, path) = rest.find('/').map(|i| rest.split_at(i)).ok_or_else(bad)?;
        let (user, host_port) = match authority.rsplit_once('@') {
            Some((u, h)) if !u.contains(':') => (Some(u), h),
            Some(_) => return Err(bad()), // a password: keys only
            None => (None, authority),
        };
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
                (h, p.parse::<u32>().ok().filter(|p| *p > 0).ok_or_else(bad)?)
            }
            _ => (host_port, 22),
        };
        let path = unescape(path).ok_or_else(bad)?;
        Self::new(host, port, user, &path, key, host_key)
    }

    pub fn describe(&self) -> String {
        format!("{}@{}:{}:{}", self.user, self.host, self.port, self.path)
    }

    /// Reads the remote file into `rx`.
    pub async fn download(&self, state_dir: &Path, rx: &mut Receiver<'_>, stop: &Stop) -> AgentResult<()> {
        let p = quote(&self.path);
        let remote = format!("wc -c < {p} && exec cat < {p}");
        let creds = Credentials::write(state_dir, self)?;
        let mut child = self.spawn(&creds, &remote, Stdio::null())?;
        let (stdout, stderr) = pipes(&mut child)?;
        let errors = tokio::spawn(read_bounded(stderr));
        let streamed = tokio::select! {
            r = self.receive(stdout, rx) => r,
            _ = stop.stopped() => Err(stop.error(&format!("downloading {}", self.describe()))),
        };
        self.finish(child, errors, streamed, "reading").await?;
        if rx.expected.is_none() {
            // The size comes first; without it nothing says the bytes are all there.
            return Err(SshError::BadSize { remote: self.describe(), line: String::new() }.into());
        }
        Ok(())
    }

    async fn receive(&self, stdout: impl AsyncRead + Unpin, rx: &mut Receiver<'_>) -> AgentResult<()> {
        let mut r = BufReader::new(stdout);
        let mut line = Vec::new();
        let n = self.stalling((&mut r).take(64).read_until(b'\n', &mut line)).await?;
        if n == 0 {
            return Ok(()); // ssh failed before the size: its exit status says why
        }
        let line = String::from_utf8_lossy(&line).trim().to_owned();
        let size = line.parse::<u64>().map_err(|_| SshError::BadSize { remote: self.describe(), line })?;
        rx.expect(size)?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match self.stalling(r.read(&mut buf)).await? {
                0 => return Ok(()),
                n => rx.write(&buf[..n]).await?,
            }
        }
    }

    /// Writes the local file `file` to the remote path: into a temporary name beside it, renamed
    /// into place once the remote side has all of its bytes.
    pub async fn upload(&self, state_dir: &Path, file: &Path, ctx: &TaskCtx) -> AgentResult<()> {
        let mut local = tokio::fs::File::open(file)
            .await
            .map_err(|e| AgentError::failed("cannot read the file to upload", format!("{}: {e}", file.display())))?;
        let size = local
            .metadata()
            .await
            .map_err(|e| AgentError::failed("cannot read the file to upload", format!("{}: {e}", file.display())))?
            .len();
        let (dir, name) = self.path.rsplit_once('/').unwrap_or(("", &self.path));
        let tmp = format!("{dir}/.{name}.kvmagent-tmp-{}", uuid::Uuid::new_v4().simple());
        let (d, t, p) = (quote(if dir.is_empty() { "/" } else { dir }), quote(&tmp), quote(&self.path));
        let remote = format!(
            "mkdir -p -- {d} && cat > {t} && test $(wc -c < {t}) -eq {size} && mv -f -- {t} {p} || {{ rm -f -- {t}; exit 1; }}"
        );
        let creds = Credentials::write(state_dir, self)?;
        let mut child = self.spawn(&creds, &remote, Stdio::piped())?;
        let mut stdin = child.stdin.take().ok_or_else(|| AgentError::internal("ssh has no stdin pipe"))?;
        let (_, stderr) = pipes(&mut child)?;
        let errors = tokio::spawn(read_bounded(stderr));
        let send = async {
            let mut buf = vec![0u8; CHUNK];
            let (mut sent, mut reported) = (0u64, None);
            loop {
                let n = local.read(&mut buf).await.map_err(|e| {
                    AgentError::failed("cannot read the file to upload", format!("{}: {e}", file.display()))
                })?;
                if n == 0 {
                    break;
                }
                self.stalling(stdin.write_all(&buf[..n])).await?;
                sent += n as u64;
                let percent = (sent.saturating_mul(100) / size.max(1)).min(99) as u8;
                if reported != Some(percent) {
                    reported = Some(percent);
                    ctx.progress(percent, &format!("uploading to {}", self.describe()));
                }
            }
            self.stalling(stdin.shutdown()).await?;
            drop(stdin);
            Ok::<(), AgentError>(())
        };
        let streamed = tokio::select! {
            r = send => r,
            _ = ctx.stop.stopped() => Err(ctx.stop.error(&format!("uploading to {}", self.describe()))),
        };
        self.finish(child, errors, streamed, "writing").await
    }

    /// `io` with the stall bound; an I/O error or a stall is the transfer's failure.
    async fn stalling<T>(&self, io: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T, SshError> {
        match tokio::time::timeout(STALL, io).await {
            Ok(r) => r.map_err(|source| SshError::Io { what: "transferring", remote: self.describe(), source }),
            Err(_) => Err(SshError::Stalled { remote: self.describe() }),
        }
    }

    fn spawn(&self, creds: &Credentials, remote: &str, stdin: Stdio) -> Result<tokio::process::Child, SshError> {
        let mut args: Vec<String> = vec!["-F".into(), "/dev/null".into()];
        let mut opt = |o: String| args.extend(["-o".to_owned(), o]);
        opt(format!("IdentityFile={}", creds.key.display()));
        for o in [
            "IdentitiesOnly=yes",
            "BatchMode=yes",
            "PasswordAuthentication=no",
            "KbdInteractiveAuthentication=no",
            "ConnectTimeout=30",
            "ServerAliveInterval=15",
            "ServerAliveCountMax=4",
            "LogLevel=ERROR",
            "GlobalKnownHostsFile=/dev/null",
        ] {
            opt(o.to_owned());
        }
        match &creds.known_hosts {
            Some(kh) => {
                opt(format!("UserKnownHostsFile={}", kh.display()));
                opt("StrictHostKeyChecking=yes".to_owned());
                opt(format!("HostKeyAlias={HOST_KEY_ALIAS}"));
            }
            None => {
                opt("UserKnownHostsFile=/dev/null".to_owned());
                opt("StrictHostKeyChecking=no".to_owned());
            }
        }
        args.extend(["-p".to_owned(), self.port.to_string(), "-l".to_owned(), self.user.clone()]);
        args.extend(["--".to_owned(), self.host.clone(), remote.to_owned()]);
        let mut cmd = crate::process::child_command("ssh", &args);
        cmd.stdin(stdin);
        cmd.spawn().map_err(SshError::Spawn)
    }

    /// Ends a transfer: stops ssh if the local side failed, waits for it, and reports the
    /// local failure or else ssh's own (with its stderr).
    async fn finish(
        &self,
        mut child: tokio::process::Child,
        errors: tokio::task::JoinHandle<String>,
        streamed: AgentResult<()>,
        what: &'static str,
    ) -> AgentResult<()> {
        if streamed.is_err() {
            let _ = child.start_kill();
        }
        let status = child.wait().await;
        let stderr = errors.await.unwrap_or_default();
        streamed?;
        let status = status.map_err(|source| SshError::Io { what, remote: self.describe(), source })?;
        if !status.success() {
            let stderr = stderr.trim().to_owned();
            return Err(SshError::Failed { what, remote: self.describe(), status, stderr }.into());
        }
        Ok(())
    }
}

fn pipes(child: &mut tokio::process::Child) -> AgentResult<(tokio::process::ChildStdout, tokio::process::ChildStderr)> {
    match (child.stdout.take(), child.stderr.take()) {
        (Some(o), Some(e)) => Ok((o, e)),
        _ => Err(AgentError::internal("ssh has no output pipes")),
    }
}

/// All of `r`, of which the last [`MAX_STDERR`] bytes are kept.
async fn read_bounded(mut r: impl AsyncRead + Unpin) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > MAX_STDERR {
            kept.drain(..kept.len() - MAX_STDERR);
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The private key (and the pinned host key) as files of mode 0600 in the state directory,
/// removed on drop. Named `.<what>.tmp-<id>`: the start-up recovery removes those a killed
/// agent left.
struct Credentials {
    key: PathBuf,
    known_hosts: Option<PathBuf>,
}

impl Credentials {
    fn write(state_dir: &Path, source: &SshSource) -> Result<Credentials, SshError> {
        let id = uuid::Uuid::new_v4().simple();
        let mut creds = Credentials { key: state_dir.join(format!(".sftp-key.tmp-{id}")), known_hosts: None };
        private_file(&creds.key, &source.key)?;
        if let Some(hk) = &source.host_key {
            let kh = state_dir.join(format!(".sftp-known-hosts.tmp-{id}"));
            creds.known_hosts = Some(kh.clone());
            private_file(&kh, &format!("{HOST_KEY_ALIAS} {hk}\n"))?;
        }
        Ok(creds)
    }
}

fn private_file(path: &Path, content: &str) -> Result<(), SshError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |source| SshError::KeyFile { path: path.display().to_string(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(fail)?;
    f.write_all(content.as_bytes()).map_err(fail)
}

impl Drop for Credentials {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.key);
        if let Some(kh) = &self.known_hosts {
            let _ = std::fs::remove_file(kh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----";

    #[test]
    fn zstack_fields_are_checked() {
        let s = SshSource::new("10.0.0.5", 0, None, "/bs/image.qcow2", KEY, None).unwrap();
        assert_eq!(s.describe(), "root@10.0.0.5:22:/bs/image.qcow2");
        assert!(s.key.ends_with("KEY-----\n"));
        for (host, port, user, path, key) in [
            ("-oProxyCommand=x", 22, "root", "/a", KEY),
            ("h;rm", 22, "root", "/a", KEY),
            ("", 22, "root", "/a", KEY),
            ("h", 70000, "root", "/a", KEY),
            ("h", 22, "-l", "/a", KEY),
            ("h", 22, "ro ot", "/a", KEY),
            ("h", 22, "root", "relative", KEY),
            ("h", 22, "root", "/a\nb", KEY),
            ("h", 22, "root", "/dir/", KEY),
            ("h", 22, "root", "/a", "not a key"),
        ] {
            assert!(SshSource::new(host, port, Some(user), path, key, None).is_err(), "{host} {port} {user} {path}");
        }
        assert!(SshSource::new("h", 22, None, "/a", KEY, Some("ssh-ed25519 AAAA\nx")).is_err());
        assert!(SshSource::new("h", 22, None, "/a", KEY, Some("ssh-ed25519 AAAAC3Nz+/= comment")).is_ok());
    }

    #[test]
    fn urls_are_parsed() {
        let s = SshSource::from_url("sftp://bs@[::1]:2222/images/a%20b.qcow2", KEY, None).unwrap();
        assert_eq!(
            (s.user.as_str(), s.host.as_str(), s.port, s.path.as_str()),
            ("bs", "::1", 2222, "/images/a b.qcow2")
        );
        let s = SshSource::from_url("sftp://host.example/i", KEY, None).unwrap();
        assert_eq!((s.user.as_str(), s.port), ("root", 22));
        for bad in ["sftp://h", "sftp://u:pw@h/i", "sftp://h:0/i", "sftp://h:x/i", "sftp://h/%zz", "http://h/i"] {
            assert!(SshSource::from_url(bad, KEY, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn quoting_keeps_one_word() {
        assert_eq!(quote("/a b/it's"), r"'/a b/it'\''s'");
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s {}", quote("$(id) `x` 'q' \\"))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "$(id) `x` 'q' \\");
    }

    #[test]
    fn key_files_are_private_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = SshSource::new("h", 22, None, "/a", KEY, Some("ssh-ed25519 AAAA")).unwrap();
        let creds = Credentials::write(dir.path(), &s).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&creds.key).unwrap().permissions().mode() & 0o777, 0o600);
        let kh = std::fs::read_to_string(creds.known_hosts.as_ref().unwrap()).unwrap();
        assert_eq!(kh, format!("{HOST_KEY_ALIAS} ssh-ed25519 AAAA\n"));
        drop(creds);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
