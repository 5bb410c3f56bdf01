//! The native API's OpenAPI document as the running agent serves it (`GET /api`) and prints it
//! (`kvmagent openapi`): the checked-in `agent/openapi.json`, and what it says the agent does.

use std::process::Command;

use kvmagent_host_tests::{agent_binary, Host};
use serde_json::{json, Value};

fn checked_in() -> Value {
    serde_json::from_str(include_str!("../../agent/openapi.json")).expect("agent/openapi.json is JSON")
}

async fn served(h: &Host) -> Value {
    let (status, body) = h.get("/api").await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET /api is not JSON ({e}): {body}"))
}

#[tokio::test]
async fn the_served_and_printed_document_is_the_checked_in_one() {
    let h = Host::start().await.unwrap();
    let served = served(&h).await;
    assert!(served == checked_in(), "GET /api differs from agent/openapi.json");
    let printed = Command::new(agent_binary()).arg("openapi").output().unwrap();
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    let printed: Value = serde_json::from_slice(&printed.stdout).expect("`kvmagent openapi` prints JSON");
    assert!(printed == served, "`kvmagent openapi` differs from GET /api");
}

#[tokio::test]
async fn a_field_the_document_does_not_list_is_refused_by_the_agent() {
    let h = Host::start().await.unwrap();
    let doc = served(&h).await;
    let schema = &doc["components"]["schemas"]["CacheImageCmd"];
    assert_eq!(schema["additionalProperties"], false, "{schema}");
    assert!(schema["properties"].get("md5sum").is_none() && schema["properties"].get("sha256").is_some(), "{schema}");
    let target = h.path("imagecache/template/api/api.qcow2");
    let body =
        json!({"url": "http://127.0.0.1:9/i.qcow2", "sha256": "0".repeat(64), "installPath": target, "md5sum": "x"});
    let e = h.call_err("/image/cache", &body).await.unwrap();
    assert!(e.contains("md5sum"), "{e}");
    assert!(!target.exists(), "a refused command makes nothing");
}
