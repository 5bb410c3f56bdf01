//! `kvmagent call` and `kvmagent vm ...` against a running agent: results printed, exit codes
//! 0 (success), 1 (the command failed) and 2 (usage or transport).

use kvmagent_host_tests::certs::client_auth_tls;
use kvmagent_host_tests::checks::{domstate, dumpxml, qemu_img_info};
use kvmagent_host_tests::cli::texts;
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn call_prints_answers_and_exit_codes_tell_success_failure_and_usage() {
    let h = Host::start().await.unwrap();

    let out = h.cli(&["call", "/host/echo"], None).await.unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("\"success\": true"), "{stdout}");

    // A command the agent runs and fails: its error code and text, exit 1; by callback and by polling.
    let missing = json!({"vmUuid": uuid()}).to_string();
    for how in [&["call", "/vm/flatten", "--data", "-"][..], &["call", "/vm/flatten", "--data", "-", "--poll"]] {
        let out = h.cli(how, Some(&missing)).await.unwrap();
        let (stdout, stderr) = texts(&out);
        assert_eq!(out.status.code(), Some(1), "{how:?}: {stdout}{stderr}");
        assert!(stderr.contains("SYS.1003") && stderr.contains("is not known to this host"), "{stderr}");
    }

    // Usage and transport: a path the agent does not serve, a body that is not JSON, no agent.
    let out = h.cli(&["call", "/no/such/path"], None).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", texts(&out));
    assert!(texts(&out).1.contains("no command is served at /no/such/path"), "{:?}", texts(&out));
    let out = h.cli(&["call", "/vm/flatten", "--data", "-"], Some("{not json")).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", texts(&out));
    let out = h.cli(&["call", "/host/echo", "--url", "http://127.0.0.1:1"], None).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", texts(&out));
    assert!(texts(&out).1.contains("cannot reach the agent"), "{:?}", texts(&out));
}

#[tokio::test]
async fn call_creates_a_vm_from_a_file_and_vm_clone_prints_two_inventories() {
    let h = Host::start().await.unwrap();
    let base = BaseImage::create(&h, 32 * MIB).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, root) = root_volume_path(&h);
    let create = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "cli-made", "memory": 64 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "strategy": "InstantStart",
    });
    let file = h.dir.path().join("create.json");
    std::fs::write(&file, create.to_string()).unwrap();

    let out = h.cli(&["call", "/vm/create", "--data", file.to_str().unwrap(), "--json"], None).await.unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}\n{}", h.log());
    let printed: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((printed["uuid"].as_str(), printed["state"].as_str()), (Some(vm.as_str()), Some("Running")));
    assert_eq!(domstate(&vm).as_deref(), Some("running"));
    assert!(dumpxml(&vm).unwrap().contains(root.to_str().unwrap()));
    assert_eq!(qemu_img_info(&root).unwrap()["backing-filename"].as_str(), base.path.to_str());

    let out = h.cli(&["vm", "clone", &vm, "--count", "2", "--strategy", "CreateStopped"], None).await.unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two clones: {stdout}");
    assert!(lines[0].starts_with("UUID") && lines[0].contains("ROOT VOLUME"), "{stdout}");
    let prefix: String = vm.chars().take(8).collect();
    for (i, line) in lines[1..].iter().enumerate() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        let clone = cells[0];
        h.track_vm(clone);
        assert_eq!(cells[1], format!("{prefix}-clone-{}", i + 1), "{line}");
        assert_eq!(cells[2], "Stopped", "{line}");
        assert!(std::path::Path::new(cells[3]).exists(), "the clone's root volume exists: {line}");
        assert_eq!(domstate(clone).as_deref(), Some("shut off"), "{line}");
    }

    let out = h.cli(&["vm", "snapshot", &vm, "--name", "from-cli", "--json"], None).await.unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let group: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((group["vmUuid"].as_str(), group["name"].as_str()), (Some(vm.as_str()), Some("from-cli")));
    let snapshot = group["snapshots"][0]["snapshotPath"].as_str().unwrap();
    let top = std::path::PathBuf::from(group["snapshots"][0]["newInstallPath"].as_str().unwrap());
    assert_eq!(qemu_img_info(&top).unwrap()["backing-filename"].as_str(), Some(snapshot), "a new top on the snapshot");
    assert!(dumpxml(&vm).unwrap().contains(top.to_str().unwrap()), "the VM writes to the new top");

    let out = h.cli(&["vm", "flatten", &vm, "--dry-run", "--json"], None).await.unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let estimate: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(estimate["volumes"].as_array().map(Vec::len), Some(1), "{estimate}");
    assert_eq!(qemu_img_info(&top).unwrap()["backing-filename"].as_str(), Some(snapshot), "a dry run changes nothing");
}

/// A self-signed certificate for 127.0.0.1 (`cert.pem`, `key.pem`) in `dir`.
fn self_signed(dir: &std::path::Path) {
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out", "cert.pem"])
        .args(["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn call_speaks_tls_trusting_the_agents_certificate_and_sends_its_token() {
    let certs = tempfile::tempdir().unwrap();
    self_signed(certs.path());
    let server = format!(
        "token = \"cli-s3cret\"\n[server.tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\n",
        certs.path().display()
    );
    let h = Host::start_configured(&server, "", &[]).await.unwrap();

    let out = h.cli(&["call", "/host/echo"], None).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{:?}", texts(&out));
    // A path behind the token: the agent runs it (and fails: no such VM), so the token went along.
    let out =
        h.cli(&["call", "/vm/flatten", "--data", "-"], Some(&json!({"vmUuid": uuid()}).to_string())).await.unwrap();
    assert_eq!(out.status.code(), Some(1), "{:?}", texts(&out));
    assert!(texts(&out).1.contains("is not known to this host"), "{:?}", texts(&out));

    // Another certificate is not the agent's: refused before anything is sent.
    let other = tempfile::tempdir().unwrap();
    self_signed(other.path());
    let ca = other.path().join("cert.pem");
    let out = h.cli(&["call", "/host/echo", "--ca", ca.to_str().unwrap()], None).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "{:?}", texts(&out));
    assert!(texts(&out).1.contains("TLS"), "{:?}", texts(&out));
}

/// An agent that asks for client certificates (`server.tls.client_ca`): `call` with `--cert` and
/// `--key` from that CA is served; without, or from another CA, the handshake fails.
#[tokio::test]
async fn call_presents_a_client_certificate_when_the_agent_asks_for_one() {
    let certs = tempfile::tempdir().unwrap();
    let d = certs.path();
    let tls = client_auth_tls(d, "operator");
    let h = Host::start_configured(&tls, "", &[]).await.unwrap();
    let with = |client: &str| {
        let (cert, key) = (d.join(format!("{client}.pem")), d.join(format!("{client}.key")));
        let ca = d.join("ca.pem");
        let args = ["call", "/host/echo", "--ca", ca.to_str().unwrap(), "--cert", cert.to_str().unwrap()];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.extend(["--key".to_owned(), key.display().to_string()]);
        args
    };
    let h = &h;
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        h.cli(&args, None).await.unwrap()
    };
    let out = run(with("operator")).await;
    assert_eq!(out.status.code(), Some(0), "{:?}", texts(&out));
    let out = run(with("stranger")).await;
    assert_eq!(out.status.code(), Some(2), "another CA's certificate is refused: {:?}", texts(&out));
    let ca = d.join("ca.pem").display().to_string();
    let out = run(vec!["call".into(), "/host/echo".into(), "--ca".into(), ca]).await;
    assert_eq!(out.status.code(), Some(2), "no client certificate: {:?}", texts(&out));
    assert!(texts(&out).1.contains("cannot reach the agent"), "{:?}", texts(&out));
}

#[tokio::test]
async fn a_command_refused_for_its_source_says_how_to_allow_the_host() {
    let h = Host::start_configured("management_hosts = [\"192.0.2.1\"]", "", &[]).await.unwrap();
    let out =
        h.cli(&["call", "/vm/flatten", "--data", "-"], Some(&json!({"vmUuid": uuid()}).to_string())).await.unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("403") && stderr.contains("add \"127.0.0.1\" to server.management_hosts"), "{stderr}");
}

/// Runs the CLI with `args` on a terminal (a pty made by `script`): what the terminal showed, and
/// the percentages of the progress bar frames drawn for `path`.
async fn on_terminal(h: &Host, path: &str, args: &[&str]) -> (String, Vec<u32>) {
    let mut words = vec![kvmagent_host_tests::agent_binary().display().to_string()];
    words.extend(args.iter().map(|a| a.to_string()));
    words.extend(["--config".to_owned(), h.config_path().display().to_string()]);
    let out =
        tokio::process::Command::new("script").args(["-qefc", &words.join(" "), "/dev/null"]).output().await.unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args:?}: {shown}\n{}", h.log());
    let percents = shown
        .split('\r')
        .filter_map(|frame| frame.strip_prefix(&format!("{path} [")))
        .filter_map(|frame| frame.split(']').nth(1)?.trim().split('%').next()?.parse().ok())
        .collect();
    (shown, percents)
}

/// The progress bar: drawn on stderr only when it is a terminal, its percentage rising while a
/// slow download runs and ending at 100%; `vm clone` shows one too, then the clones.
#[tokio::test]
async fn call_and_vm_clone_draw_a_rising_progress_bar_on_a_terminal_only() {
    use kvmagent_host_tests::checks::{qemu_img, qemu_io_fill};
    use kvmagent_host_tests::http_server::{sha256, HttpServer, Serve};

    let h = Host::start().await.unwrap();
    let http = HttpServer::start().await;
    // A qcow2 of about 1.5 MiB, sent 64 KiB every 200 ms: several polls see it part-way.
    let download = |name: &str| {
        let src = h.dir.path().join(format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "16M"]).unwrap();
        qemu_io_fill(&src, 0, 3 * MIB / 2, 0x5a).unwrap();
        let body = std::fs::read(&src).unwrap();
        let cmd = json!({
            "url": http.serve(&format!("/images/{name}.qcow2"), Serve::Drip { body: body.clone() }),
            "sha256": sha256(&body),
            "installPath": h.path(&format!("imagecache/template/{name}/{name}.qcow2")),
        });
        let file = h.dir.path().join(format!("{name}.json"));
        std::fs::write(&file, cmd.to_string()).unwrap();
        file
    };

    let file = download("on-pty");
    let (shown, percents) =
        on_terminal(&h, "/image/cache", &["call", "/image/cache", "--data", file.to_str().unwrap()]).await;
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "the bar never goes back: {percents:?}");
    assert_eq!(percents.last(), Some(&100), "the bar ends full: {shown}");
    assert!(percents.iter().any(|p| (1..100).contains(p)), "the bar showed the download part-way: {shown}");

    // Piped stderr (a script, a log): no bar, only the answer.
    let out = h.cli(&["call", "/image/cache", "--data", download("piped").to_str().unwrap()], None).await.unwrap();
    let (stdout, stderr) = texts(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(!stderr.contains('\r') && !stderr.contains('%'), "no bar when stderr is not a terminal: {stderr:?}");

    // Four flat copies of 256 MiB of data take longer than a poll: the bar, then the table.
    let base = BaseImage::create(&h, 256 * MIB).unwrap();
    qemu_io_fill(&base.path, MIB, 255 * MIB, 0xa5).unwrap();
    let (vm, (root_uuid, root)) = (uuid(), root_volume_path(&h));
    h.track_vm(&vm);
    let create = json!({
        "vm": {"vmInstanceUuid": vm, "vmName": "cli-bar", "memory": 64 * MIB, "cpuNum": 1},
        "rootVolume": {"volumeUuid": root_uuid, "installPath": root, "imagePath": base.path},
        "strategy": "CreateStopped",
    });
    h.call_ok("/vm/create", &create).await.unwrap();
    let args = ["vm", "clone", &vm, "--count", "4", "--mode", "copy", "--strategy", "CreateStopped"];
    let (shown, percents) = on_terminal(&h, "/vm/clone", &args).await;
    let clones: Vec<&str> = shown.lines().filter(|l| l.contains("-clone-")).collect();
    for line in &clones {
        h.track_vm(line.trim_start_matches(|c: char| !c.is_ascii_alphanumeric()).split_whitespace().next().unwrap());
    }
    assert!(percents.len() >= 2, "vm clone drew its bar while it worked: {shown}");
    assert_eq!(percents.last(), Some(&100), "vm clone drew its bar to the end: {shown}");
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "the bar never goes back: {percents:?}");
    assert_eq!(clones.len(), 4, "then the four clones' inventories: {shown}");
}
