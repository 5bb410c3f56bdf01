//! The control channel: a shared token, TLS with client certificates, and results posted only
//! to the management nodes the agent knows.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kvmagent_host_tests::certs::client_auth_tls;
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// Posts an async `createempty` of a new volume; returns the HTTP status and the volume path.
async fn create_volume(h: &Host, auth: &[(&str, &str)], task: &str) -> (u16, std::path::PathBuf) {
    let path = h.path(&format!("dataVolumes/acct-test/vol-{task}/{task}.qcow2"));
    let cb = h.callbacks.url();
    let mut headers = vec![("taskuuid", task), ("callbackurl", cb.as_str())];
    headers.extend_from_slice(auth);
    let body = json!({"installUrl": path, "size": MIB}).to_string();
    let (status, _) = h.post("/localstorage/volume/createempty", &headers, body).await.unwrap();
    (status, path)
}

#[tokio::test]
async fn without_the_token_nothing_is_done() {
    let h = Host::start_configured("token = \"s3cret-token\"", "", &[]).await.unwrap();
    for auth in [vec![], vec![("Authorization", "Bearer wrong-token!")], vec![("X-Kvmagent-Token", "s3cret-toke")]] {
        let task = uuid();
        let (status, path) = create_volume(&h, &auth, &task).await;
        assert_eq!(status, 401, "{auth:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!path.exists() && h.callbacks.results(&task).is_none(), "a refused command does nothing: {auth:?}");
    }
    let (status, body) = h.get("/metrics").await.unwrap();
    assert_eq!(status, 401, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["errorCode"]["description"], "not authorized");

    let task = uuid();
    let (status, path) = create_volume(&h, &[("Authorization", "Bearer s3cret-token")], &task).await;
    assert_eq!(status, 200);
    let r = h.callbacks.wait(&task, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r["success"], true, "{r}");
    assert!(path.exists());
    let (status, _) = h.post("/host/echo", &[("X-Kvmagent-Token", "s3cret-token")], "").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn results_go_only_to_known_management_nodes() {
    // Commands come from 127.0.0.1, a configured management host; results are asked for at
    // `127.1` (the same machine, another name), which no configuration or connect named yet.
    let host = Host::start_configured("management_hosts = [\"127.0.0.1\"]", "", &[]).await.unwrap();
    let h = &host;
    let elsewhere = |url: String| url.replace("127.0.0.1", "127.1");
    let send = move |task: String| {
        let path = h.path(&format!("dataVolumes/acct-test/vol-{task}/{task}.qcow2"));
        let body = json!({"installUrl": path, "size": MIB}).to_string();
        let cb = elsewhere(h.callbacks.url());
        async move {
            let headers = [("taskuuid", task.as_str()), ("callbackurl", cb.as_str())];
            (h.post("/localstorage/volume/createempty", &headers, body).await.unwrap().0, path)
        }
    };
    let (status, path) = send(uuid()).await;
    assert_eq!(status, 400, "a callback to 127.1 is not to a management node");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!path.exists(), "the refused command did nothing");

    // /host/connect names the management node: from now on its host is allowed too.
    let connect = json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807", "sendCommandUrl": elsewhere(h.callbacks.send_command_url())});
    assert_eq!(h.post("/host/connect", &[], connect.to_string()).await.unwrap().0, 200);
    let task = uuid();
    let (status, path) = send(task.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(h.callbacks.wait(&task, Duration::from_secs(30)).await.unwrap()["success"], true);
    assert!(path.exists());
}

/// `curl` POST of `/host/echo` over TLS, as the client `client` (none: no certificate).
fn echo(dir: &Path, port: u16, client: Option<&str>) -> Result<String, String> {
    let url = format!("https://127.0.0.1:{port}/host/echo");
    let mut args = vec![
        "-sS".to_owned(),
        "-X".into(),
        "POST".into(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "--cacert".into(),
        "ca.pem".into(),
    ];
    if let Some(c) = client {
        args.extend(["--cert".into(), format!("{c}.pem"), "--key".into(), format!("{c}.key")]);
    }
    args.push(url);
    let out = Command::new("curl").args(&args).current_dir(dir).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    let tls = client_auth_tls(d, "mn");
    let h = Host::start_configured(&tls, "", &[]).await.unwrap();
    assert_eq!(echo(d, h.port, Some("mn")).as_deref(), Ok("200"), "a management node with a CA-signed certificate");
    assert!(echo(d, h.port, None).is_err(), "no client certificate: the handshake fails");
    assert!(echo(d, h.port, Some("stranger")).is_err(), "a certificate from another CA is refused");
    let plain = h.post("/host/echo", &[], "").await;
    assert!(plain.is_err() || plain.unwrap().0 != 200, "plain HTTP is not served");
}

/// POSTs from source address `from` (another loopback address), over a plain HTTP/1.1
/// connection; returns the status and the body.
async fn post_from(h: &Host, from: &str, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(format!("127.0.0.1:{}", h.port).parse().unwrap()).await.unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A command from `stranger` is refused in-band (403, the envelope says how to reset) and runs
/// nothing.
async fn refused_from(h: &Host, stranger: &str) {
    let task = uuid();
    let path = h.path(&format!("dataVolumes/acct-test/vol-{task}/{task}.qcow2"));
    let body = json!({"installUrl": path, "size": MIB}).to_string();
    let cb = h.callbacks.url();
    let headers = [("taskuuid", task.as_str()), ("callbackurl", cb.as_str())];
    let (status, answer) = post_from(h, stranger, "/localstorage/volume/createempty", &headers, &body).await;
    assert_eq!(status, 403, "{answer}");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["success"], false);
    assert!(answer["error"].as_str().unwrap().contains("forget-management-node"), "{answer}");
    assert!(!path.exists(), "nothing was made");
    assert!(h.callbacks.wait(&task, Duration::from_millis(500)).await.is_err(), "nothing was run");
}

#[tokio::test]
async fn after_the_first_connect_only_that_management_node_may_command_the_host() {
    let mut h = Host::start().await.unwrap();
    let stranger = "127.0.0.2";
    assert_eq!(post_from(&h, stranger, "/host/echo", &[], "").await.0, 200, "a fresh host answers anyone");
    let connect =
        json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807", "sendCommandUrl": h.callbacks.send_command_url()});
    let (_, body) = h.post("/host/connect", &[], connect.to_string()).await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["success"], true, "{body}");

    refused_from(&h, stranger).await;
    assert_eq!(post_from(&h, stranger, "/host/echo", &[], "").await.0, 200, "echo stays open");
    let task = uuid();
    let (status, path) = create_volume(&h, &[], &task).await;
    assert_eq!(status, 200, "the management node still commands the host");
    assert_eq!(h.callbacks.wait(&task, Duration::from_secs(30)).await.unwrap()["success"], true);
    assert!(path.exists());

    h.restart_agent().unwrap();
    refused_from(&h, stranger).await;

    // The operator's reset: the next connect is trusted again.
    h.stop_agent().unwrap();
    let config = h.dir.path().join("kvmagent.toml");
    let out = Command::new(kvmagent_host_tests::agent_binary())
        .args(["forget-management-node", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    h.restart_agent().unwrap();
    let (status, _) =
        post_from(&h, stranger, "/host/ping", &[("taskuuid", &uuid()), ("callbackurl", &h.callbacks.url())], "{}")
            .await;
    assert_eq!(status, 200, "after the reset any address may command until the next connect");
}
