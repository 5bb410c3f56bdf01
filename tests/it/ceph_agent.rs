//! The management node's Ceph primary-storage sequence against the agent's Ceph agent port
//! (7762, where the MN calls ZStack's Ceph agent) and the real one-node cluster: connect, ping,
//! init, a root volume cloned from an image, flatten, the backing chain, and deletes (of an image
//! a client holds open, then into the trash). Bodies are shaped as the MN's Gson sends them, and
//! every reply decodes into the MN's reply class.

use std::process::{Child, Command, Stdio};

use kvmagent_host_tests::ceph::{agent_config_serving, info, qemu_name, rbd};
use kvmagent_host_tests::mn_types::{
    decode, CephAgentResponse, CephBackingChainRsp, CephCloneRsp, CephDeleteRsp, CephInitRsp, CephPingFailure,
    CephPingRsp,
};
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

const PORT: u16 = 7762;

/// The `ceph` command line on the test cluster.
fn ceph_cli(args: &[&str]) -> String {
    kvmagent_host_tests::ceph::ceph(args).unwrap()
}

/// What every MN command to the Ceph agent carries (`CephPrimaryStorageBase.AgentCommand`).
fn mn(mut body: Value) -> Value {
    let common = json!({"uuid": uuid(), "fsId": "", "monUuid": uuid(), "kvmHostAddons": {}});
    body.as_object_mut().unwrap().extend(common.as_object().unwrap().clone());
    body
}

/// A client holding the image open (a watch), as a running VM would, for 8 s; dropping it waits
/// until the client has closed the image (a killed client's watch would outlive it by ~30 s).
struct Holder(Child);

impl Holder {
    fn open(spec: &str) -> Holder {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "sleep 8000", &qemu_name(spec)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if rbd(&["status", "--format", "json", spec]).is_ok_and(|s| s.contains("\"address\"")) {
                return Holder(child);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("qemu-io never opened {spec}");
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.wait();
    }
}

/// Removes what the test made, also when it fails.
struct Made(Vec<String>);

impl Drop for Made {
    fn drop(&mut self) {
        for spec in self.0.iter().rev() {
            let _ = rbd(&["snap", "unprotect", &format!("{spec}@s")]);
            let _ = rbd(&["snap", "purge", spec]);
            let _ = rbd(&["rm", "--no-progress", spec]);
        }
        if let Ok(list) = rbd(&["trash", "ls", "--format", "json", "rbd"]) {
            for t in serde_json::from_str::<Vec<Value>>(&list).unwrap_or_default() {
                if self.0.iter().any(|s| Some(s.trim_start_matches("rbd/")) == t["name"].as_str()) {
                    let _ = rbd(&["trash", "rm", "--force", &format!("rbd/{}", t["id"].as_str().unwrap_or_default())]);
                }
            }
        }
    }
}

#[tokio::test]
async fn the_management_nodes_ceph_sequence_on_the_ceph_agent_port() {
    let h = Host::start_with(&agent_config_serving(&format!("127.0.0.1:{PORT}"))).await.unwrap();
    let (image, root, other) = (format!("img-{}", uuid()), format!("root-{}", uuid()), format!("del-{}", uuid()));
    let made = Made(vec![format!("rbd/{image}"), format!("rbd/{root}"), format!("rbd/{other}")]);
    rbd(&["create", "--size", "16", &made.0[0]]).unwrap();
    rbd(&["snap", "create", &format!("rbd/{image}@s")]).unwrap();
    rbd(&["snap", "protect", &format!("rbd/{image}@s")]).unwrap();

    let (status, body) = h.post_to(PORT, "/ceph/primarystorage/echo", &[], "").await.unwrap();
    assert_eq!((status, body.as_str()), (200, ""));
    let (status, _) = h.post_to(PORT, "/host/fact", &[], "{}").await.unwrap();
    assert_eq!(status, 404, "the Ceph agent port serves only the Ceph paths");

    let r = h.call_at(PORT, "/ceph/primarystorage/connect", &mn(json!({}))).await.unwrap();
    let c: CephAgentResponse = decode(&r).unwrap();
    assert!(c.base.success, "{r}");
    // The capacity the cluster reports (tests/ceph/start.sh runs a mgr, which `ceph df` needs).
    let df: Value = serde_json::from_str(&ceph_cli(&["df", "--format", "json"])).unwrap();
    let total = df["stats"]["total_bytes"].as_i64().filter(|t| *t > 0);
    assert!(total.is_some(), "the test cluster reports its size: {df}");
    assert_eq!(c.total_capacity, total, "{r}");
    let available = c.available_capacity.expect("availableCapacity");
    assert!(available > 0 && Some(available) <= total, "{r}");

    // The monitor as the MN knows it (`monAddr:monPort`); tests/ceph/start.sh's v1 port.
    let port = std::env::var("KVMAGENT_CEPH_MON_PORT").unwrap_or_else(|_| "6789".into());
    let addr = &format!("127.0.0.1:{port}");
    let ping = |mon: &str| mn(json!({"monAddr": mon, "testImagePath": format!("rbd/zshb.ps.{}", uuid())}));
    let r = h.call_at(PORT, "/ceph/primarystorage/ping", &ping(addr)).await.unwrap();
    let p: CephPingRsp = decode(&r).unwrap();
    assert!(p.base.base.success && p.failure.is_none(), "{r}");
    let r = h.call_at(PORT, "/ceph/primarystorage/ping", &ping("10.255.255.1:6789")).await.unwrap();
    let p: CephPingRsp = decode(&r).unwrap();
    assert_eq!((p.base.base.success, p.failure), (false, Some(CephPingFailure::MonAddrChanged)), "{r}");

    let pools = |p: Value| mn(json!({"pools": p, "nocephx": false}));
    let r = h.call_at(PORT, "/ceph/primarystorage/init", &pools(json!([{"name": "rbd", "predefined": true}]))).await;
    let i: CephInitRsp = decode(&r.unwrap()).unwrap();
    assert!(i.base.base.success && i.fsid.is_some_and(|f| f.len() == 36) && i.user_key.is_some(), "init");
    let missing = format!("gone-{}", &uuid()[..8]);
    let r = h.call_at(PORT, "/ceph/primarystorage/init", &pools(json!([{"name": missing, "predefined": true}]))).await;
    assert_eq!(r.unwrap()["success"], false, "a predefined pool must exist");

    let clone = mn(json!({"srcPath": format!("ceph://rbd/{image}@s"), "dstPath": format!("ceph://rbd/{root}")}));
    let r = h.call_at(PORT, "/ceph/primarystorage/volume/clone", &clone).await.unwrap();
    let c: CephCloneRsp = decode(&r).unwrap();
    assert_eq!(c.install_path.as_deref(), Some(format!("ceph://rbd/{root}").as_str()), "{r}");
    assert_eq!(c.base.total_capacity, total, "capacity in every reply: {r}");
    let body = mn(json!({"volumePath": format!("ceph://rbd/{root}")}));
    let r = h.call_at(PORT, "/ceph/primarystorage/volume/getbackingchain", &body).await.unwrap();
    let chain: CephBackingChainRsp = decode(&r).unwrap();
    assert_eq!(chain.backing_chain.unwrap(), [format!("ceph://rbd/{image}@s")]);
    let body = mn(json!({"path": format!("ceph://rbd/{root}")}));
    let r = h.call_at(PORT, "/ceph/primarystorage/volume/flatten", &body).await.unwrap();
    let f: CephAgentResponse = decode(&r).unwrap();
    assert!(f.base.success);
    assert!(info(&format!("rbd/{root}")).unwrap()["parent"].is_null(), "flattened");

    let holder = Holder::open(&format!("rbd/{root}"));
    let delete = |spec: &str, expiration: u64| {
        mn(json!({"installPath": format!("ceph://{spec}"), "expirationTime": expiration}))
    };
    let r = h.call_at(PORT, "/ceph/primarystorage/delete", &delete(&format!("rbd/{root}"), 0)).await.unwrap();
    let d: CephDeleteRsp = decode(&r).unwrap();
    assert!(!d.base.base.success && d.in_use, "{r}");
    assert!(info(&format!("rbd/{root}")).is_some(), "an image in use is kept");
    drop(holder);
    let r = h.call_at(PORT, "/ceph/primarystorage/delete", &delete(&format!("rbd/{root}"), 0)).await.unwrap();
    let d: CephDeleteRsp = decode(&r).unwrap();
    assert!(d.base.base.success && !d.in_use, "{r}");
    assert!(info(&format!("rbd/{root}")).is_none(), "deleted once nobody uses it");

    rbd(&["create", "--size", "4", &format!("rbd/{other}")]).unwrap();
    let r = h.call_at(PORT, "/ceph/primarystorage/delete", &delete(&format!("rbd/{other}"), 3600)).await.unwrap();
    assert_eq!(r["success"], true, "{r}");
    assert!(info(&format!("rbd/{other}")).is_none(), "gone from the pool");
    let trash = rbd(&["trash", "ls", "--format", "json", "rbd"]).unwrap();
    assert!(trash.contains(&other), "and in its trash: {trash}");
    drop(made);
}
