//! Test certificates made with `openssl`: a CA and certificates it signs.

use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (`<ca>.pem`, `<ca>.key`) and a certificate `<name>.pem`/`<name>.key` it signed, with
/// the X.509 extensions `ext` (openssl's extfile syntax), in `dir`.
fn certificate(dir: &Path, ca: &str, name: &str, ext: &str) {
    if !dir.join(format!("{ca}.pem")).exists() {
        let subj = format!("/CN={ca}");
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-days",
                "1",
                "-subj",
                &subj,
            ],
        );
    }
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

/// In `dir`: a CA `ca` with a server certificate for 127.0.0.1 (`server`) and a client
/// certificate `client`, and a client certificate `stranger` from another CA (`other-ca`).
/// Returns the agent's `[server.tls]` table that serves with `server` and asks for client
/// certificates of `ca` (it goes last in the `[server]` part).
pub fn client_auth_tls(dir: &Path, client: &str) -> String {
    certificate(dir, "ca", "server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n");
    certificate(dir, "ca", client, "extendedKeyUsage=clientAuth\n");
    certificate(dir, "other-ca", "stranger", "extendedKeyUsage=clientAuth\n");
    format!(
        "[server.tls]\ncert = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\nclient_ca = \"{0}/ca.pem\"\n",
        dir.display()
    )
}
