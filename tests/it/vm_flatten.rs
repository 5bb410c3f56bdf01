//! Flatten: offline and live, dry run, cancel, responsiveness, per-volume exclusion.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvmagent_host_tests::checks::{domstate, file_sha256, qemu_img, qemu_img_info, qemu_io_fill, qemu_io_write};
use kvmagent_host_tests::images::{root_volume_path, BaseImage};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A VM whose root is a three-layer chain (base ← middle ← top) with data in every layer.
struct Chained {
    vm: String,
    base: PathBuf,
    middle: PathBuf,
    top: PathBuf,
    /// A flat copy of the chain taken before anything ran: what the guest must keep seeing.
    reference: tempfile::TempDir,
}

impl Chained {
    fn reference(&self) -> PathBuf {
        self.reference.path().join("ref.qcow2")
    }
}

async fn chained_vm(h: &Host, strategy: &str, fill: u64) -> Chained {
    let base = BaseImage::create(h, 256 * MIB + 3 * fill).unwrap();
    qemu_io_fill(&base.path, MIB, fill, 0x11).unwrap();
    let vm = uuid();
    h.track_vm(&vm);
    let (root_uuid, middle) = root_volume_path(h);
    h.call_ok(
        "/vm/create",
        &json!({"vm": {"vmInstanceUuid": vm, "vmName": "flat", "memory": 128 * MIB, "cpuNum": 1},
                "rootVolume": {"volumeUuid": root_uuid, "installPath": middle, "imagePath": base.path}, "strategy": "JustCreate"}),
    )
    .await
    .unwrap();
    qemu_io_fill(&middle, MIB + fill, fill, 0x22).unwrap();
    qemu_io_write(&middle, 4096, b"MIDDLE-LAYER").unwrap();
    let top = middle.with_file_name(format!("{}.qcow2", uuid()));
    h.call_ok("/vm/volume/takesnapshot", &json!({"vmUuid": vm, "installPath": top, "volumeInstallPath": middle}))
        .await
        .unwrap();
    qemu_io_fill(&top, MIB + 2 * fill, fill, 0x33).unwrap();
    qemu_io_write(&top, 8192, b"TOP-LAYER").unwrap();
    if strategy == "run" {
        let start = json!({"vmInstanceUuid": vm, "vmName": "flat", "memory": 128 * MIB, "cpuNum": 1,
                           "rootVolume": {"volumeUuid": root_uuid, "installPath": top}});
        h.call_ok("/vm/start", &start).await.unwrap();
    }
    let reference = tempfile::tempdir().unwrap();
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "qcow2",
        top.to_str().unwrap(),
        reference.path().join("ref.qcow2").to_str().unwrap(),
    ])
    .unwrap();
    Chained { vm, base: base.path, middle, top, reference }
}

fn identical(a: &Path, b: &Path) -> bool {
    qemu_img(&["compare", "-U", a.to_str().unwrap(), b.to_str().unwrap()])
        .map(|o| o.contains("identical"))
        .unwrap_or(false)
}

fn actual_size(p: &Path) -> u64 {
    qemu_img_info(p).unwrap()["actual-size"].as_u64().unwrap()
}

fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("kvmagent-tmp"))
        .collect()
}

#[tokio::test]
async fn offline_flatten_keeps_every_byte_and_the_dry_run_predicts_it() {
    let h = Host::start().await.unwrap();
    let connect =
        json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807", "sendCommandUrl": h.callbacks.send_command_url()});
    assert_eq!(h.post("/host/connect", &[], connect.to_string()).await.unwrap().0, 200);
    let c = chained_vm(&h, "stopped", 16 * MIB).await;
    let (base_sha, middle_sha, top_sha) =
        (file_sha256(&c.base).unwrap(), file_sha256(&c.middle).unwrap(), file_sha256(&c.top).unwrap());

    let dry = h.call_ok("/vm/flatten", &json!({"vmUuid": c.vm, "dryRun": true})).await.unwrap();
    let estimate = dry["totalBytesToAdd"].as_u64().unwrap();
    assert_eq!(dry["volumes"][0]["bytesToAdd"].as_u64(), Some(estimate), "{dry}");
    assert_eq!(file_sha256(&c.top).unwrap(), top_sha, "a dry run changes nothing");

    let before = actual_size(&c.top);
    let r = h.call_ok("/vm/flatten", &json!({"vmUuid": c.vm})).await.unwrap();
    assert_eq!(r["allVolumes"][0]["installPath"].as_str(), c.top.to_str(), "the install path does not change: {r}");
    assert!(qemu_img_info(&c.top).unwrap()["backing-filename"].is_null(), "cut loose from its chain");
    assert!(identical(&c.reference(), &c.top), "every byte the guest saw is still there");
    let added = actual_size(&c.top) - before;
    let error = (estimate as f64 - added as f64).abs() / added as f64;
    assert!(error <= 0.01, "dry run predicted {estimate} bytes, flatten added {added} ({:.2}% off)", error * 100.0);
    assert_eq!(
        (file_sha256(&c.base).unwrap(), file_sha256(&c.middle).unwrap()),
        (base_sha, middle_sha),
        "backing files are never written"
    );
    assert!(temporaries(c.top.parent().unwrap()).is_empty());
    let reports = h.callbacks.progress_reports();
    assert!(
        reports.iter().any(|p| p["processType"] == "/vm/flatten" && p["progress"] == "100"),
        "progress reached the management node: {reports:?}"
    );

    // Once flat, a flatten is a no-op success and the dry run predicts nothing.
    let sha = file_sha256(&c.top).unwrap();
    h.call_ok("/localstorage/snapshot/offlinemerge", &json!({"destPath": c.top, "fullRebase": true})).await.unwrap();
    assert_eq!(file_sha256(&c.top).unwrap(), sha);
    let dry = h.call_ok("/vm/flatten", &json!({"vmUuid": c.vm, "dryRun": true})).await.unwrap();
    assert_eq!(dry["totalBytesToAdd"], 0);
}

#[tokio::test]
async fn live_flatten_of_a_running_vm_keeps_every_byte() {
    let h = Host::start().await.unwrap();
    let c = chained_vm(&h, "run", 16 * MIB).await;
    assert_eq!(domstate(&c.vm).as_deref(), Some("running"));
    let r = h.call_ok("/vm/flatten", &json!({"vmUuid": c.vm, "full": false})).await.unwrap();
    assert_eq!(r["state"], "Running", "{r}");
    assert_eq!(domstate(&c.vm).as_deref(), Some("running"), "the VM ran through it");
    assert!(qemu_img_info(&c.top).unwrap()["backing-filename"].is_null());

    // The compat path on a flat disk of a running VM: nothing to pull, success.
    h.call_ok("/vm/volume/mergesnapshot", &json!({"vmUuid": c.vm, "destPath": c.top, "fullRebase": true}))
        .await
        .unwrap();
    // QEMU keeps qcow2 metadata in memory while it runs: compare once it has stopped.
    h.call_ok("/vm/stop", &json!({"uuid": c.vm, "type": "cold"})).await.unwrap();
    assert!(identical(&c.reference(), &c.top), "every byte the guest saw is still there");
}

#[tokio::test]
async fn cancelling_a_flatten_leaves_the_volume_exactly_as_it_was() {
    let h = Host::start().await.unwrap();
    let c = chained_vm(&h, "stopped", 384 * MIB).await;
    let top_sha = file_sha256(&c.top).unwrap();
    let api = uuid();
    let task = h.send("/vm/flatten", &json!({"vmUuid": c.vm, "threadContext": {"api": api}})).await.unwrap();
    // Cancel once the flat copy is being written.
    let dir = c.top.parent().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while temporaries(&dir).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!temporaries(&dir).is_empty(), "the flatten started building its copy");
    h.call_ok("/job/cancel", &json!({"cancellationApiId": api})).await.unwrap();
    let r = h.callbacks.wait(&task, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r["success"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("cancelled"), "{r}");
    assert_eq!(file_sha256(&c.top).unwrap(), top_sha, "the volume is exactly as it was");
    assert!(temporaries(&dir).is_empty(), "no temporary left");
    assert_eq!(qemu_img_info(&c.top).unwrap()["backing-filename"].as_str(), c.middle.to_str());

    // The deadline from taskContext stops it the same way.
    let r = h
        .call_within(
            "/vm/flatten",
            &json!({"vmUuid": c.vm, "taskContext": {"__messagetimeout__": 300}}),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!((r["success"].as_bool(), r["errorCode"]["code"].as_str()), (Some(false), Some("SYS.1001")), "{r}");
    assert_eq!(file_sha256(&c.top).unwrap(), top_sha, "the volume is exactly as it was");
    assert!(temporaries(&dir).is_empty());
}

#[tokio::test]
async fn while_a_flatten_runs_the_agent_answers_and_the_volume_is_exclusive() {
    let h = Host::start().await.unwrap();
    let c = chained_vm(&h, "stopped", 384 * MIB).await;
    let other = BaseImage::create(&h, 16 * MIB).unwrap();
    let flatten = h.send("/vm/flatten", &json!({"vmUuid": c.vm})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A read of the same volume waits for the flatten; other work does not.
    let same = h.send("/localstorage/volume/getsize", &json!({"installPath": c.top})).await.unwrap();
    let ping = h.call_within("/host/ping", &json!({}), Duration::from_secs(10)).await.unwrap();
    assert_eq!(ping["success"], true);
    let elsewhere = h
        .call_within("/localstorage/volume/getsize", &json!({"installPath": other.path}), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(elsewhere["success"], true);
    let (_, status) = h.get(&format!("/task/{flatten}")).await.unwrap();
    assert!(
        status.contains("\"running\""),
        "ping and another volume's command answered while the flatten ran: {status}"
    );
    assert!(h.callbacks.results(&same).is_none(), "the same volume's command waits for the flatten");
    let done = h.callbacks.wait(&flatten, Duration::from_secs(120)).await.unwrap();
    assert_eq!(done["success"], true, "{done}");
    let size = h.callbacks.wait(&same, Duration::from_secs(30)).await.unwrap();
    assert_eq!(size["success"], true, "{size}");
    assert!(identical(&c.reference(), &c.top));
}

#[tokio::test]
async fn chains_outside_the_roots_are_refused_and_rebase_keeps_the_data() {
    let h = Host::start().await.unwrap();
    let outside = tempfile::tempdir().unwrap();
    let foreign = outside.path().join("foreign.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", foreign.to_str().unwrap(), "16M"]).unwrap();
    let evil = h.path("dataVolumes/evil.qcow2");
    std::fs::create_dir_all(evil.parent().unwrap()).unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", foreign.to_str().unwrap(), evil.to_str().unwrap()])
        .unwrap();
    let sha = file_sha256(&evil).unwrap();
    for path in ["/localstorage/snapshot/offlinemerge", "/localstorage/volume/estimatetemplatesize"] {
        let body = json!({"destPath": evil, "volumePath": evil, "fullRebase": true});
        let e = h.call_err(path, &body).await.unwrap();
        assert!(e.contains("outside the storage roots"), "{path}: {e}");
    }
    assert_eq!(file_sha256(&evil).unwrap(), sha);

    // Safe rebase of the top onto the base: the middle layer's data moves into the top.
    let c = chained_vm(&h, "stopped", 4 * MIB).await;
    h.call_ok(
        "/localstorage/snapshot/offlinemerge",
        &json!({"srcPath": c.base, "destPath": c.top, "fullRebase": false}),
    )
    .await
    .unwrap();
    assert_eq!(qemu_img_info(&c.top).unwrap()["backing-filename"].as_str(), c.base.to_str());
    assert!(identical(&c.reference(), &c.top));
    let est = h.call_ok("/localstorage/volume/estimatetemplatesize", &json!({"volumePath": c.top})).await.unwrap();
    assert!(est["actualSize"].as_u64().unwrap() > 4 * MIB && est["size"].as_u64().unwrap() > 0, "{est}");
}

#[tokio::test]
async fn cancelling_a_live_flatten_aborts_the_block_job_and_keeps_the_chain() {
    let h = Host::start().await.unwrap();
    let c = chained_vm(&h, "run", 384 * MIB).await;
    let api = uuid();
    let task = h.send("/vm/flatten", &json!({"vmUuid": c.vm, "threadContext": {"api": api}})).await.unwrap();
    // Cancel as soon as the block job reports progress.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, status) = h.get(&format!("/task/{task}")).await.unwrap();
        let status: Value = serde_json::from_str(&status).unwrap();
        if status["progress"].as_u64().unwrap_or(0) > 0
            || status["state"] != "running"
            || std::time::Instant::now() > deadline
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancel = h.call("/job/cancel", &json!({"cancellationApiId": api})).await.unwrap();
    let r = h.callbacks.wait(&task, Duration::from_secs(60)).await.unwrap();
    eprintln!("live cancel: cancel answered {}, flatten answered {}", cancel["success"], r["success"]);
    if cancel["success"] == true {
        assert_eq!(r["success"], false, "{r}");
        assert!(r["error"].as_str().unwrap().contains("cancelled"), "{r}");
        assert_eq!(
            qemu_img_info(&c.top).unwrap()["backing-filename"].as_str(),
            c.middle.to_str(),
            "the chain is intact"
        );
    } else {
        // The pull finished before the cancel arrived: then it must be complete and correct.
        assert_eq!(r["success"], true, "{r}");
    }
    assert_eq!(domstate(&c.vm).as_deref(), Some("running"));
    h.call_ok("/vm/stop", &json!({"uuid": c.vm, "type": "cold"})).await.unwrap();
    assert!(identical(&c.reference(), &c.top), "the guest's data is the same either way");
}
