//! Images into the local-storage cache from real servers on loopback that the test starts: an
//! `sshd` of its own (own config, host key and authorized key, unprivileged port) for ZStack's
//! `/localstorage/sftp/download` and `/upload` and for `sftp://` URLs, and a small HTTP server
//! for `/image/cache`. Checked: the cached image is bit-identical to the source, two concurrent
//! requests for one image fetch it once, a wrong-checksum, truncated or corrupt download leaves
//! nothing, a killed download leaves nothing after the restart, bad input is refused in-band and
//! changes nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvmagent_host_tests::checks::{file_sha256, qemu_img};
use kvmagent_host_tests::http_server::{image_bytes, sha256, HttpServer, Serve};
use kvmagent_host_tests::sshd::Sshd;
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: usize = 1 << 20;

/// Every file under `dir` (recursively, symlinks not followed), sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&p, out);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, &mut v);
    v.sort();
    v
}

fn temporaries(dir: &Path) -> Vec<String> {
    files(dir).into_iter().filter(|f| f.contains(".kvmagent-tmp-") || f.contains(".tmp-")).collect()
}

/// Where ZStack puts an image in the cache: `<root>/imagecache/template/<image>/<image>.qcow2`.
fn cache_path(h: &Host) -> PathBuf {
    let image = uuid();
    h.path(&format!("imagecache/template/{image}/{image}.qcow2"))
}

#[tokio::test]
async fn http_images_are_cached_once_and_bit_identical() {
    let h = Host::start().await.unwrap();
    let server = HttpServer::start().await;
    let bytes = image_bytes(8 * MIB, 1);
    let sha = sha256(&bytes);
    let url = server.serve("/images/a.raw", Serve::Whole { body: bytes.clone(), delay: Duration::from_secs(1) });
    let target = cache_path(&h);
    let cmd = json!({"url": url, "sha256": sha, "installPath": target});

    // Two requests at once for the same image: one download, both answered with the image.
    let (a, b) = tokio::join!(h.call_ok("/image/cache", &cmd), h.call_ok("/image/cache", &cmd));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(server.hits("/images/a.raw"), 1, "fetched once: {a} {b}");
    let downloaded: Vec<bool> = [&a, &b].iter().map(|r| r["downloaded"].as_bool().unwrap()).collect();
    assert!(downloaded.contains(&true) && downloaded.contains(&false), "{a} {b}");
    for r in [&a, &b] {
        assert_eq!(r["sha256"], sha);
        assert_eq!(r["size"].as_u64(), Some(bytes.len() as u64));
        assert_eq!(r["installPath"].as_str(), target.to_str());
    }
    assert_eq!(file_sha256(&target).unwrap(), sha, "bit-identical to the source");
    assert_eq!(std::fs::read(&target).unwrap(), bytes);

    // Later requests find it cached; one asking for another checksum is refused, nothing changes.
    let r = h.call_ok("/image/cache", &cmd).await.unwrap();
    assert_eq!((r["downloaded"].as_bool(), server.hits("/images/a.raw")), (Some(false), 1));
    let other = json!({"url": url, "sha256": "ab".repeat(32), "installPath": target});
    let e = h.call_err("/image/cache", &other).await.unwrap();
    assert!(e.contains("already cached"), "{e}");
    assert_eq!(file_sha256(&target).unwrap(), sha);

    // A redirect is followed; a qcow2 made by qemu-img is cached as it is.
    let q = h.dir.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &q.to_string_lossy(), "64M"]).unwrap();
    let qbytes = std::fs::read(&q).unwrap();
    server.serve("/images/q.qcow2", Serve::Whole { body: qbytes.clone(), delay: Duration::ZERO });
    let moved = server.serve("/moved", Serve::Redirect { to: "/images/q.qcow2".into() });
    let target = cache_path(&h);
    let cmd = json!({"url": moved, "sha256": sha256(&qbytes), "installPath": target});
    h.call_ok("/image/cache", &cmd).await.unwrap();
    assert_eq!((server.hits("/moved"), server.hits("/images/q.qcow2")), (1, 1));
    assert_eq!(std::fs::read(&target).unwrap(), qbytes);
    assert!(temporaries(&h.root).is_empty(), "{:?}", temporaries(&h.root));
}

#[tokio::test]
async fn bad_downloads_leave_nothing() {
    let h = Host::start().await.unwrap();
    let server = HttpServer::start().await;
    let bytes = image_bytes(4 * MIB, 2);
    let sha = sha256(&bytes);
    let before = files(&h.root);
    let mut corrupt = bytes.clone();
    corrupt[MIB] ^= 0xff;
    // A qcow2 whose backing file is outside the cache: with its right checksum, still refused.
    let evil = h.dir.path().join("evil.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "/etc/passwd", "-F", "raw", &evil.to_string_lossy(), "1M"])
        .unwrap();
    let evil = std::fs::read(&evil).unwrap();
    let cases = [
        (
            "wrong checksum",
            server.serve("/a", Serve::Whole { body: bytes.clone(), delay: Duration::ZERO }),
            "ab".repeat(32),
            "SHA-256",
        ),
        ("corrupt", server.serve("/c", Serve::Whole { body: corrupt, delay: Duration::ZERO }), sha.clone(), "SHA-256"),
        ("truncated", server.serve("/t", Serve::Truncated { body: bytes.clone(), sent: MIB }), sha.clone(), "/t"),
        (
            "backing file",
            server.serve("/e", Serve::Whole { body: evil.clone(), delay: Duration::ZERO }),
            sha256(&evil),
            "backing file",
        ),
        ("not found", format!("http://127.0.0.1:{}/missing", server.port), sha.clone(), "404"),
        ("nobody listens", "http://127.0.0.1:9/x".to_owned(), sha.clone(), "cannot connect"),
    ];
    for (what, url, sha, says) in cases {
        let target = cache_path(&h);
        let e = h.call_err("/image/cache", &json!({"url": url, "sha256": sha, "installPath": target})).await.unwrap();
        assert!(e.contains(says), "{what}: {e}");
        assert!(!target.exists(), "{what}: nothing is published");
        let left: Vec<String> = files(&h.root).into_iter().filter(|f| !before.contains(f)).collect();
        assert!(left.is_empty(), "{what} left {left:?}");
    }
}

#[tokio::test]
async fn a_killed_download_leaves_nothing_after_the_restart() {
    let mut h = Host::start().await.unwrap();
    let server = HttpServer::start().await;
    let bytes = image_bytes(8 * MIB, 3);
    let url = server.serve("/slow", Serve::Drip { body: bytes.clone() });
    let target = cache_path(&h);
    let task =
        h.send("/image/cache", &json!({"url": url, "sha256": sha256(&bytes), "installPath": target})).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while temporaries(&h.root).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the download never started: {}", h.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.kill_agent().unwrap();
    assert!(!temporaries(&h.root).is_empty(), "the killed download left its temporary file");
    assert!(!target.exists());
    h.restart_agent().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !temporaries(&h.root).is_empty() {
        assert!(std::time::Instant::now() < deadline, "recovery left {:?}", temporaries(&h.root));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!target.exists(), "nothing half-made is published");
    drop(task);
}

#[tokio::test]
async fn sftp_download_and_upload_against_a_real_sshd() {
    let h = Host::start().await.unwrap();
    let sshd = Sshd::start();
    let bytes = image_bytes(16 * MIB, 4);
    let sha = sha256(&bytes);
    let src = sshd.put("image with 'quote'.raw", &bytes);
    let target = cache_path(&h);
    let cmd = sshd.cmd(&src, &target);

    // The management node's sequence for an uncached image, twice at once: one transfer.
    let (a, b) =
        tokio::join!(h.call_ok("/localstorage/sftp/download", &cmd), h.call_ok("/localstorage/sftp/download", &cmd));
    let (a, b) = (a.unwrap(), b.unwrap());
    for r in [&a, &b] {
        assert!(r["totalCapacity"].as_u64().unwrap() > 0 && r["availableCapacity"].as_u64().is_some(), "{r}");
    }
    assert_eq!(sshd.logins(), 1, "downloaded once");
    assert_eq!(file_sha256(&target).unwrap(), sha, "bit-identical to the source");
    let r = h.call_ok("/localstorage/checkbits", &json!({"path": target})).await.unwrap();
    assert_eq!(r["existing"], true);

    // The same through an sftp:// URL, with the server's host key pinned; a wrong pin fails.
    let pinned = cache_path(&h);
    let url = format!("sftp://root@127.0.0.1:{}{}", sshd.port, src.display().to_string().replace(' ', "%20"));
    let native =
        json!({"url": url, "sha256": sha, "installPath": pinned, "sshKey": sshd.key, "hostKey": sshd.host_key});
    let r = h.call_ok("/image/cache", &native).await.unwrap();
    assert_eq!((r["downloaded"].as_bool(), r["sha256"].as_str()), (Some(true), Some(sha.as_str())));
    assert_eq!(file_sha256(&pinned).unwrap(), sha);
    let other = cache_path(&h);
    let wrong_pin = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZha2Vfa2V5X2Zvcl90ZXN0c19vbmx5X25vdF9yZWFsXw";
    let mut bad = native.clone();
    bad["hostKey"] = json!(wrong_pin);
    bad["installPath"] = json!(other);
    let e = h.call_err("/image/cache", &bad).await.unwrap();
    assert!(e.contains("ssh") && !other.exists(), "{e}");

    // A missing remote file and a damaged qcow2 header (ZStack sends no checksum) leave nothing.
    let before = files(&h.root);
    let e = h
        .call_err("/localstorage/sftp/download", &sshd.cmd(&sshd.dir.path().join("bs/none"), &cache_path(&h)))
        .await
        .unwrap();
    assert!(e.contains("No such file"), "ssh's stderr is kept: {e}");
    let mut damaged = b"QFI\xfb\0\0\0\x03".to_vec();
    damaged.extend_from_slice(&4096u64.to_be_bytes());
    damaged.extend_from_slice(&64u32.to_be_bytes());
    damaged.resize(512, 0);
    let e = h
        .call_err("/localstorage/sftp/download", &sshd.cmd(&sshd.put("damaged.qcow2", &damaged), &cache_path(&h)))
        .await
        .unwrap();
    assert!(e.contains("damaged qcow2 header"), "{e}");
    assert_eq!(files(&h.root), before, "nothing left behind");

    // Upload (an image made from a volume) back to the backup storage.
    let dest = sshd.dir.path().join("bs/templates/new/image.qcow2");
    h.call_ok("/localstorage/sftp/upload", &sshd.cmd(&dest, &target)).await.unwrap();
    assert_eq!(file_sha256(&dest).unwrap(), sha);
    assert!(temporaries(&sshd.dir.path().join("bs")).is_empty());
    // No key file outlives its transfer.
    let keys: Vec<String> = files(&h.state_dir).into_iter().filter(|f| f.contains("sftp-")).collect();
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test]
async fn bad_input_is_refused_in_band_and_changes_nothing() {
    let h = Host::start().await.unwrap();
    let sshd = Sshd::start();
    let src = sshd.put("i.raw", &image_bytes(MIB, 5));
    let sha = "ab".repeat(32);
    let ok_path = cache_path(&h);
    std::os::unix::fs::symlink("/etc", h.path("out")).unwrap();
    let before = files(&h.root);
    let cases: Vec<(&str, Value)> = vec![
        ("/image/cache", json!({"url": "http://127.0.0.1:9/i", "sha256": sha, "installPath": "/etc/evil.qcow2"})),
        ("/image/cache", json!({"url": "http://127.0.0.1:9/i", "sha256": sha, "installPath": h.path("out/evil")})),
        (
            "/image/cache",
            json!({"url": "http://127.0.0.1:9/i", "sha256": sha, "installPath": format!("{}/../x", h.root.display())}),
        ),
        ("/image/cache", json!({"url": "file:///etc/shadow", "sha256": sha, "installPath": ok_path})),
        ("/image/cache", json!({"url": "ftp://127.0.0.1/i", "sha256": sha, "installPath": ok_path})),
        ("/image/cache", json!({"url": "http://u:p@127.0.0.1:9/i", "sha256": sha, "installPath": ok_path})),
        ("/image/cache", json!({"url": "http://127.0.0.1:9/i", "sha256": "abc", "installPath": ok_path})),
        ("/image/cache", json!({"url": "http://127.0.0.1:9/i", "sha256": sha, "installPath": ok_path, "bandWidth": 1})),
        (
            "/image/cache",
            json!({"url": "http://127.0.0.1:9/i", "sha256": sha, "installPath": ok_path, "sshKey": sshd.key}),
        ),
        (
            "/image/cache",
            json!({"url": format!("sftp://127.0.0.1:{}{}", sshd.port, src.display()), "sha256": sha, "installPath": ok_path}),
        ),
        (
            "/image/cache",
            json!({"url": "sftp://-oProxyCommand=touch%20/tmp/x/i", "sha256": sha, "installPath": ok_path, "sshKey": sshd.key}),
        ),
        ("/localstorage/sftp/download", json!({"hostname": "127.0.0.1"})),
        ("/localstorage/sftp/download", sshd.cmd(&src, Path::new("/etc/evil.qcow2"))),
        ("/localstorage/sftp/download", {
            let mut c = sshd.cmd(&src, &ok_path);
            c["hostname"] = json!("-oProxyCommand=touch /tmp/x");
            c
        }),
        ("/localstorage/sftp/download", {
            let mut c = sshd.cmd(&src, &ok_path);
            c["sshPort"] = json!(70000);
            c
        }),
        ("/localstorage/sftp/download", {
            let mut c = sshd.cmd(&src, &ok_path);
            c["sshKey"] = json!("password");
            c
        }),
        ("/localstorage/sftp/upload", sshd.cmd(&sshd.dir.path().join("bs/u"), Path::new("/etc/passwd"))),
        ("/localstorage/sftp/upload", sshd.cmd(&sshd.dir.path().join("bs/u"), &h.path("none.qcow2"))),
    ];
    for (path, body) in &cases {
        let e = h.call_err(path, body).await.unwrap_or_else(|e| panic!("{path} {body}: {e}"));
        assert!(!e.is_empty());
        let now = files(&h.root);
        assert_eq!(now, before, "{path} {body} changed the storage: {e}");
    }
    assert_eq!(sshd.logins(), 0, "bad input never reaches the server");
    assert!(!Path::new("/tmp/x").exists());
}

/// The hostile corpus's entries for the image paths (all of it runs in `hostile_input`, with
/// domain checks that take long on a busy host): each refused in-band, the storage unchanged.
#[tokio::test]
async fn the_hostile_corpus_entries_of_the_image_paths_are_refused() {
    use base64::Engine;
    let h = Host::start().await.unwrap();
    let image = h.path("imagecache/base.qcow2");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", &image.to_string_lossy(), "16M"]).unwrap();
    std::fs::create_dir_all(h.path("evil")).unwrap();
    std::os::unix::fs::symlink("/etc", h.path("evil/link-out")).unwrap();
    let (root, image) = (h.root.display().to_string(), image.display().to_string());
    let corpus = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/corpus/hostile.jsonl")).unwrap();
    let before = files(&h.root);
    let mut n = 0;
    for line in corpus.lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        let path = entry["path"].as_str().unwrap();
        if !["/image/cache", "/localstorage/sftp/download", "/localstorage/sftp/upload"].contains(&path) {
            continue;
        }
        let body = match entry["raw"].as_str() {
            Some(b64) => base64::engine::general_purpose::STANDARD.decode(b64).unwrap(),
            None => entry["body"].to_string().replace("{root}", &root).replace("{image}", &image).into_bytes(),
        };
        let task = uuid();
        let headers = [("taskuuid", task.as_str()), ("callbackurl", &h.callbacks.url())];
        let (status, text) = h.post(path, &headers, body).await.unwrap();
        assert!(status < 500, "{entry}: HTTP {status}: {text}");
        let r: Value = if status == 200 && text.is_empty() {
            h.callbacks.wait(&task, Duration::from_secs(60)).await.unwrap()
        } else {
            serde_json::from_str(&text).unwrap()
        };
        assert_eq!(r["success"], false, "{entry}: {r}");
        assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{entry}: {r}");
        assert_eq!(files(&h.root), before, "{entry} changed the storage: {r}");
        n += 1;
    }
    assert!(n >= 40, "{n} entries");
    assert!(!Path::new("/tmp/pwned").exists());
}
