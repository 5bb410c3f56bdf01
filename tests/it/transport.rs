//! The wire contract of spec §1 against the real agent binary.

use std::time::Duration;

use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

#[tokio::test]
async fn sync_and_async_styles_are_enforced() {
    let h = Host::start().await.unwrap();
    let (s, body) = h.post("/host/echo", &[], "").await.unwrap();
    assert_eq!((s, body.as_str()), (200, ""));
    let (s, _) = h.post("/host/echo/", &[], "").await.unwrap();
    assert_eq!(s, 200, "trailing slash is served too");
    let (s, body) = h.post("/host/echo", &[("taskuuid", &uuid())], "").await.unwrap();
    assert_eq!(s, 400, "sync path with taskuuid: {body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["success"], false);

    let (s, body) = h.post("/host/ping", &[], "{}").await.unwrap();
    assert_eq!(s, 400);
    assert!(body.contains("taskuuid"), "{body}");
    let (s, _) = h.post("/host/ping", &[("taskuuid", "not-hex")], "{}").await.unwrap();
    assert_eq!(s, 400);
    let (s, body) = h.post("/no/such/path", &[("taskuuid", &uuid())], "{}").await.unwrap();
    assert_eq!(s, 404);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["success"], false, "JSON envelope even for 404");
}

#[tokio::test]
async fn bad_input_is_answered_in_band() {
    let h = Host::start().await.unwrap();
    let task = uuid();
    let (s, body) =
        h.post("/host/ping", &[("taskuuid", &task), ("callbackurl", &h.callbacks.url())], "{not json").await.unwrap();
    assert_eq!((s, body.as_str()), (200, ""));
    let r = h.callbacks.wait(&task, Duration::from_secs(10)).await.unwrap();
    assert_eq!(r["success"], false);
    assert!(r["error"].as_str().unwrap().contains("not valid JSON"), "{r}");
    assert_eq!(r["errorCode"]["code"], "SYS.1007");

    let e = h.call_err("/job/cancel", &json!({})).await.unwrap();
    assert!(e.contains("cancellationApiId"), "the missing field is named: {e}");
    let e = h.call_err("/job/cancel", &json!({"cancellationApiId": 42})).await.unwrap();
    assert!(e.contains("cancellationApiId"), "the mistyped field is named: {e}");
}

#[tokio::test]
async fn duplicate_taskuuid_gets_the_stored_result_even_after_restart() {
    let mut h = Host::start().await.unwrap();
    let sendurl = h.callbacks.send_command_url();
    let connect =
        json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807", "sendCommandUrl": sendurl, "version": "5.1.0"});
    let (s, body) = h.post("/host/connect", &[], connect.to_string()).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["success"], true, "{body}");

    let task = uuid();
    h.send_as(&task, "/host/ping", &json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807"})).await.unwrap();
    let first = h.callbacks.wait(&task, Duration::from_secs(10)).await.unwrap();
    assert_eq!(first["version"], "5.1.0");

    h.restart_agent().unwrap();
    // A changed identity would change a re-run's answer; the stored result must come back instead.
    let other = json!({"hostUuid": "6b2d1f2e3e0d4a1f8e2d4d3c2b1a0918", "sendCommandUrl": sendurl, "version": "9.9"});
    assert_eq!(h.post("/host/connect", &[], other.to_string()).await.unwrap().0, 200);
    // The same task id in capitals is the same task.
    h.send_as(&task.to_uppercase(), "/host/ping", &json!({"hostUuid": "5a1c0e1d2d9c4f0e9d1c3c2b1a090807"}))
        .await
        .unwrap();
    let all = h.callbacks.wait_count(&task, 2, Duration::from_secs(10)).await.unwrap();
    assert_eq!(all[1], first, "the stored result is re-posted, not re-run");

    let (s, status) = h.get(&format!("/task/{task}")).await.unwrap();
    assert_eq!(s, 200);
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["result"], first);

    // The persisted version survives the restart for a fresh ping.
    let r = h.call_ok("/host/ping", &json!({})).await.unwrap();
    assert_eq!(r["version"], "9.9");
}

#[tokio::test]
async fn host_facts_capacity_and_metrics() {
    let h = Host::start().await.unwrap();
    let f = h.call_ok("/host/fact", &json!({})).await.unwrap();
    for key in ["libvirtVersion", "qemuImgVersion", "cpuArchitecture", "osDistribution"] {
        assert!(f[key].is_string(), "{key} must be a non-null string: {f}");
    }
    // `vmx`/`svm`, or absent where the CPU has neither (the MN reads "" as a flag).
    assert!(matches!(f.get("hvmCpuFlag").map(|v| v.as_str()), None | Some(Some("vmx" | "svm"))), "{f}");
    let c = h.call_ok("/host/capacity", &json!({})).await.unwrap();
    assert!(c["cpuNum"].as_u64().unwrap() >= 1 && c["totalMemory"].as_u64().unwrap() > 0, "{c}");
    let s = h.call_ok("/vm/vmsync", &json!({})).await.unwrap();
    assert!(s["states"].is_object(), "{s}");

    let (code, text) = h.get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(text.contains("kvmagent_tasks_total{outcome=\"succeeded\",path=\"/host/fact\"}"), "{text}");
    assert!(text.contains("kvmagent_libvirt_call_duration_seconds"), "{text}");
    assert!(text.contains("kvmagent_tasks_in_flight 0"), "{text}");
}

#[tokio::test]
async fn cancel_without_a_matching_task_says_so_and_sigterm_exits_cleanly() {
    let mut h = Host::start().await.unwrap();
    let e = h.call_err("/job/cancel", &json!({"cancellationApiId": "nothing-runs"})).await.unwrap();
    assert!(e.contains("no matched job"), "{e}");
    let status = h.stop_agent().unwrap();
    assert!(status.success(), "agent exit status after SIGTERM: {status}");
}

/// The largest command a management node sends fits the body limit: a size query for 18,000
/// volumes of a host (ZStack's install paths, about 200 bytes a volume) is taken; one byte over
/// 4 MiB is refused before it is read.
#[tokio::test]
async fn a_size_query_for_every_volume_of_a_big_host_fits_the_body_limit() {
    let h = Host::start().await.unwrap();
    let account = uuid();
    let paths: serde_json::Map<String, Value> = (0..18_000)
        .map(|_| {
            let vol = uuid();
            let path = h.path(&format!("dataVolumes/acct-{account}/vol-{vol}/{vol}.qcow2"));
            (vol, json!(path))
        })
        .collect();
    let body = json!({"volumeUuidInstallPaths": paths, "uuid": uuid(), "storagePath": h.root}).to_string();
    assert!(body.len() > 3 << 20 && body.len() < 4 << 20, "{} bytes", body.len());
    let r = h.call_ok("/localstorage/volume/batchgetsize", &serde_json::from_str(&body).unwrap()).await.unwrap();
    assert!(r["actualSizes"].is_object(), "answered (none of the volumes exists): {}", &r.to_string()[..200]);
    let (task, cb) = (uuid(), h.callbacks.url());
    let headers = [("taskuuid", task.as_str()), ("callbackurl", cb.as_str())];
    let (status, text) =
        h.post("/localstorage/volume/batchgetsize", &headers, vec![b' '; (4 << 20) + 1]).await.unwrap();
    assert_eq!(status, 413, "{text}");
    // The refusal reads the body on (dropping it), answers, and closes the connection and says
    // so: a client never sends its next request down a connection about to close.
    let answer = tokio::task::spawn_blocking({
        let port = h.port;
        move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            let len = (5 << 20) + 1;
            let head = format!("POST /host/echo HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&vec![b' '; len]).expect("the whole body is taken before the answer");
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer
        }
    })
    .await
    .unwrap();
    let head = answer.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 413") && head.contains("connection: close"), "{answer}");
    for _ in 0..20 {
        assert_eq!(h.post("/host/echo", &[], "").await.unwrap().0, 200, "a fresh connection after the refusal");
    }
}
