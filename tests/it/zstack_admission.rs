//! Host admission as a stock ZStack management node (MN) runs it, against the real agent and
//! libvirtd: echo → fact → connect → /localstorage/init → /host/capacity → /vm/vmsync, with
//! bodies shaped as the MN's Gson sends them (nulls absent, primitives present, `kvmHostAddons`
//! and thread context added), each reply decoded into the MN's Java types
//! ([`kvmagent_host_tests::mn_types`]); then a second MN of the same deployment taking the host
//! over (ping, `/host/update/configuration`) while the first still gets its results, and a
//! progress report of a long task decoded as the MN's `ProgressReportCmd`.

use std::net::Ipv4Addr;
use std::time::Duration;

use kvmagent_host_tests::checks::TestNic;
use kvmagent_host_tests::mn_types::{
    self, AgentResponse, ConnectResponse, HostCapacityResponse, HostFactResponse, LocalStorageInitRsp, PingResponse,
    ProgressReportCmd, UpdateHostConfigurationResponse, VmSyncResponse,
};
use kvmagent_host_tests::{uuid, with_mn_context, Host};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1 << 20;

/// POSTs from source address `from` (another "management node" on this machine) with a
/// hand-written HTTP/1.1 request; returns the status and body.
async fn post_from(from: Ipv4Addr, port: u16, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut stream = socket.connect((Ipv4Addr::LOCALHOST, port).into()).await.unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// `kvm`'s `ignore_msrs` as it is now, so that the connect asks for what is already there and
/// the test changes nothing on the host.
fn current_ignore_msrs() -> bool {
    std::fs::read_to_string("/sys/module/kvm/parameters/ignore_msrs").is_ok_and(|v| matches!(v.trim(), "Y" | "1"))
}

fn connect_cmd(host_uuid: &str, send_command_url: &str) -> Value {
    // ConnectCmd (KVMAgentCommands.java:265-272) from KVMHost.connectToAgent: a plain
    // restf.syncJsonPost, so no kvmHostAddons; the primitives always present.
    json!({
        "hostUuid": host_uuid,
        "sendCommandUrl": send_command_url,
        "iptablesRules": [],
        "ignoreMsrs": current_ignore_msrs(),
        "pageTableExtensionDisabled": false,
        "tcpServerPort": 7123,
        "version": "5.1.0",
    })
}

#[tokio::test]
async fn a_management_node_admits_the_host_and_every_reply_has_its_types() {
    let h = Host::start().await.unwrap();
    let host = uuid();
    let api = uuid();

    // Echo: the MN posts an empty body and wants any 2xx (RESTFacadeImpl.echo).
    assert_eq!(h.post("/host/echo", &[], "").await.unwrap().0, 200);

    let fact = h.call_ok("/host/fact", &with_mn_context(json!({}), &api)).await.unwrap();
    let f: HostFactResponse = mn_types::decode(&fact).unwrap();
    let v = f.virtualizer_info.expect("virtualizerInfo: the MN dereferences it (KVMHost.java:5727)");
    assert_eq!(v.virtualizer.as_deref(), Some("qemu-kvm"));
    assert!(v.version.is_some_and(|s| s.starts_with(|c: char| c.is_ascii_digit())), "{fact}");
    assert!(f.libvirt_version.is_some(), "compared unconditionally (KVMHost.java:5840)");
    assert!(matches!(f.hvm_cpu_flag.as_deref(), None | Some("vmx" | "svm")), "{fact}");
    assert!(f.cpu_ghz.unwrap().parse::<f64>().is_ok(), "{fact}");
    assert!(f.cpu_processor_num.unwrap().parse::<u32>().unwrap() >= 1);
    assert!(f.cpu_model_name.is_some(), "libvirt's host CPU model: {fact}");
    for (name, value) in [
        ("hostCpuModelName", &f.host_cpu_model_name),
        ("systemSerialNumber", &f.system_serial_number),
        ("osDistribution", &f.os_distribution),
        ("qemuImgVersion", &f.qemu_img_version),
    ] {
        assert!(value.as_deref().is_some_and(|s| !s.is_empty()), "{name}: {fact}");
    }
    assert!(f.ip_addresses.is_some() && f.libvirt_capabilities.is_some());

    let (status, text) =
        h.post("/host/connect", &[], connect_cmd(&host, &h.callbacks.send_command_url()).to_string()).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let c: ConnectResponse = mn_types::decode(&serde_json::from_str(&text).unwrap()).unwrap();
    assert!(c.base.success, "{text}");
    assert!(c.libvirt_version.is_some() && c.qemu_version.is_some(), "the MN's LIVE_SNAPSHOT check reads both: {text}");

    // Facts after connect name the host (VirtualizerInfoTO.uuid, as the Python agent fills it).
    let fact = h.call_ok("/host/fact", &with_mn_context(json!({}), &api)).await.unwrap();
    assert_eq!(mn_types::decode::<HostFactResponse>(&fact).unwrap().virtualizer_info.unwrap().uuid, Some(host.clone()));

    // LocalStorageKvmFactory's connect extension: InitCmd {path, hostUuid, initFilePath} plus the
    // local storage AgentCommand's {uuid, storagePath}.
    let root = h.root.to_str().unwrap();
    let init = json!({"path": root, "hostUuid": host, "initFilePath": format!("{root}/zstack_smp_init_file"),
                      "uuid": uuid(), "storagePath": root, "primaryStorageUuid": uuid()});
    let r = h.call_ok("/localstorage/init", &with_mn_context(init, &api)).await.unwrap();
    let i: LocalStorageInitRsp = mn_types::decode(&r).unwrap();
    assert!(i.total_capacity.is_some_and(|t| t > 0) && i.available_capacity.is_some(), "{r}");

    // KVMConnectExtensionForL2Network: the L2 networks of the cluster, each interface checked,
    // then its bridge made and checked (a veth pair of this test's stands in for the NIC).
    let nic = TestNic::create();
    let (status, text) = h
        .post("/network/checkphysicalnetworkinterface", &[], json!({"interfaceNames": [nic.name]}).to_string())
        .await
        .unwrap();
    let check: AgentResponse = mn_types::decode(&serde_json::from_str(&text).unwrap()).unwrap();
    assert!(status == 200 && check.success, "{text}");
    let bridge = json!({"physicalInterfaceName": nic.name, "bridgeName": nic.bridge, "l2NetworkUuid": uuid(),
                        "disableIptables": false, "mtu": 1500, "isolated": false});
    for path in ["/network/l2novlan/createbridge", "/network/l2novlan/checkbridge"] {
        let r = h.call_ok(path, &with_mn_context(bridge.clone(), &api)).await.unwrap();
        assert!(mn_types::decode::<AgentResponse>(&r).unwrap().success, "{path}: {r}");
    }
    assert_eq!(nic.ports(), std::slice::from_ref(&nic.name), "the NIC is the bridge's port");

    let r = h.call_ok("/host/capacity", &with_mn_context(json!({}), &api)).await.unwrap();
    let cap: HostCapacityResponse = mn_types::decode(&r).unwrap();
    assert!(cap.cpu_num >= 1 && cap.cpu_speed > 0 && cap.total_memory > 0 && cap.cpu_sockets >= 1, "{r}");

    let r = h.call_ok("/vm/vmsync", &with_mn_context(json!({}), &api)).await.unwrap();
    let sync: VmSyncResponse = mn_types::decode(&r).unwrap();
    assert!(sync.states.is_some(), "{r}");

    let r = h.call_ok("/host/ping", &with_mn_context(json!({"hostUuid": host}), &api)).await.unwrap();
    let p: PingResponse = mn_types::decode(&r).unwrap();
    assert_eq!((p.host_uuid.as_deref(), p.version.as_deref()), (Some(host.as_str()), Some("5.1.0")));
    assert_eq!(p.send_command_url, Some(h.callbacks.send_command_url()));
}

#[tokio::test]
async fn a_second_management_node_of_the_deployment_takes_the_host_over_and_the_first_still_gets_results() {
    let h = Host::start().await.unwrap();
    let host = uuid();
    let mn1 = h.callbacks.send_command_url();
    let (status, text) = h.post("/host/connect", &[], connect_cmd(&host, &mn1).to_string()).await.unwrap();
    assert_eq!(status, 200, "{text}");

    // MN2 is 127.0.0.2; its URLs name 127.1 (the same receiver, a host name no one named yet).
    let mn2 = Ipv4Addr::new(127, 0, 0, 2);
    let mn2_callback = h.callbacks.url().replace("127.0.0.1", "127.1");
    let mn2_send = mn1.replace("127.0.0.1", "127.1");
    let async_from = |from: Ipv4Addr, path: &'static str, body: Value, callback: String| {
        let port = h.port;
        async move {
            let task = uuid();
            let headers = [("taskuuid", task.as_str()), ("callbackurl", callback.as_str())];
            let (status, text) = post_from(from, port, path, &headers, &body.to_string()).await;
            (status, text, task)
        }
    };

    // A stranger naming another host uuid is refused and learns nothing.
    let stranger = Ipv4Addr::new(127, 0, 0, 3);
    let (status, text) =
        post_from(stranger, h.port, "/host/connect", &[], &connect_cmd(&uuid(), &mn2_send).to_string()).await;
    assert_eq!(status, 403, "{text}");
    let (status, _, _) = async_from(stranger, "/host/capacity", json!({}), mn2_callback.clone()).await;
    assert_eq!(status, 403);

    // MN2 pings (its hash ring took the host over): answered, to MN2's callback.
    let (status, text, task) =
        async_from(mn2, "/host/ping", with_mn_context(json!({"hostUuid": host}), &uuid()), mn2_callback.clone()).await;
    assert_eq!(status, 200, "{text}");
    let r = h.callbacks.wait(&task, Duration::from_secs(30)).await.unwrap();
    let p: PingResponse = mn_types::decode(&r).unwrap();
    assert_eq!(p.send_command_url.as_deref(), Some(mn1.as_str()), "the MN sees another sendCommandUrl");

    // ... so it sends /host/update/configuration (UpdateHostConfigurationCmd {hostUuid, sendCommandUrl}).
    let body = with_mn_context(json!({"hostUuid": host, "sendCommandUrl": mn2_send}), &uuid());
    let (status, text, task) = async_from(mn2, "/host/update/configuration", body, mn2_callback.clone()).await;
    assert_eq!(status, 200, "{text}");
    let r = h.callbacks.wait(&task, Duration::from_secs(30)).await.unwrap();
    let u: UpdateHostConfigurationResponse = mn_types::decode(&r).unwrap();
    assert!(u.success, "{r}");

    // Both nodes are served now, each with its own callback.
    let (status, text, task) = async_from(mn2, "/host/capacity", json!({}), mn2_callback.clone()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(h.callbacks.wait(&task, Duration::from_secs(30)).await.unwrap()["success"], true);
    let r = h.call_ok("/host/ping", &json!({"hostUuid": host})).await.unwrap();
    assert_eq!(r["sendCommandUrl"], mn2_send.as_str(), "reports go to the node that took over");
    let (status, _, _) = async_from(stranger, "/host/capacity", json!({}), h.callbacks.url()).await;
    assert_eq!(status, 403, "still refused");
}

#[tokio::test]
async fn progress_of_a_long_task_decodes_as_the_management_nodes_progress_report() {
    let h = Host::start().await.unwrap();
    let host = uuid();
    let (status, text) =
        h.post("/host/connect", &[], connect_cmd(&host, &h.callbacks.send_command_url()).to_string()).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let volume = h.path(&format!("dataVolumes/acct-test/vol-{0}/{0}.qcow2", uuid()));
    h.call_ok("/localstorage/volume/createempty", &json!({"installUrl": volume, "size": 64 * MIB})).await.unwrap();
    let template = h.path(&format!("imagecache/template/{0}/{0}.qcow2", uuid()));
    let api = uuid();
    let mut body = with_mn_context(json!({"volumePath": volume, "installPath": template}), &api);
    body["threadContext"]["task-stage"] = json!("10-90");
    h.call_ok("/localstorage/volume/createtemplate", &body).await.unwrap();

    let reports: Vec<ProgressReportCmd> = (h.callbacks.progress_reports().iter())
        .filter(|p| p["processType"] == "/localstorage/volume/createtemplate")
        .map(|p| mn_types::decode(p).unwrap())
        .collect();
    assert!(!reports.is_empty(), "a progress report was posted");
    for r in &reports {
        let percent: u32 = r.progress.as_deref().unwrap().parse().unwrap();
        assert!((10..=90).contains(&percent), "{percent} is scaled into the task's stage 10-90");
        assert_eq!(r.thread_context_map.as_ref().unwrap()["api"], api, "the MN finds the API by it");
        assert_eq!(r.server_uuid.as_deref(), Some(host.as_str()));
        assert!(r.detail.as_ref().is_some_and(|d| d.contains_key("step")));
    }
}
