//! A real `sshd` on loopback for the tests that fetch images from ZStack's SFTP backup storage.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::uuid;

/// A real `sshd` on a loopback port, with its own host key and one authorized client key, and
/// a directory standing for the SFTP backup storage.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
    /// The client's private key (what the management node sends as `sshKey`).
    pub key: String,
    /// The server's public host key, `<type> <base64>`.
    pub host_key: String,
}

const SSHD: &str = "/usr/sbin/sshd";

impl Sshd {
    pub fn start() -> Sshd {
        assert!(Path::new(SSHD).exists(), "{SSHD} is missing: run tests/host/install-deps.sh (openssh-server)");
        let dir = tempfile::Builder::new().prefix("kvmagent-sshd-").tempdir_in("/var/tmp").unwrap();
        let d = dir.path();
        for (name, file) in [("host", "host_key"), ("client", "client_key")] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                .arg(d.join(file))
                .output()
                .unwrap();
            assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all(d.join("bs")).unwrap();
        // sshd's privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\nPermitRootLogin yes\nStrictModes no\nLogLevel VERBOSE\n\
             Subsystem sftp internal-sftp\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let child = Command::new(SSHD)
            .args(["-D", "-f"])
            .arg(d.join("sshd_config"))
            .arg("-E")
            .arg(d.join("sshd.log"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "sshd did not listen: {}", Sshd::read_log(d));
            std::thread::sleep(Duration::from_millis(100));
        }
        let key = std::fs::read_to_string(d.join("client_key")).unwrap();
        let host_key = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        let host_key = host_key.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        Sshd { dir, port, child, key, host_key }
    }

    fn read_log(d: &Path) -> String {
        std::fs::read_to_string(d.join("sshd.log")).unwrap_or_default()
    }

    /// Logins so far (one per ssh connection the agent made).
    pub fn logins(&self) -> usize {
        Sshd::read_log(self.dir.path()).matches("Accepted publickey").count()
    }

    /// A file on the "backup storage".
    pub fn put(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join("bs").join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// ZStack's SftpDownloadBitsCmd / SftpUploadBitsCmd fields, as its Gson sends them.
    pub fn cmd(&self, bs_path: &Path, ps_path: &Path) -> Value {
        json!({
            "sshKey": self.key, "username": "root", "hostname": "127.0.0.1", "sshPort": self.port,
            "backupStorageInstallPath": bs_path, "primaryStorageInstallPath": ps_path,
            "storagePath": ps_path.parent().unwrap(), "imageName": "image",
            "threadContext": {"api": uuid()}, "kvmHostAddons": {}
        })
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
