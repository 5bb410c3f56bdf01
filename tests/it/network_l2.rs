//! L2 networks on a real kernel: the agent runs inside a network namespace this test makes, with
//! veth pairs standing in for the host's NICs, and is driven over the management node's paths.
//! The effects are read with `ip -j`. Nothing outside the namespace is touched: the test's own
//! HTTP client, its callback receiver and the agent all live in it (the test's thread enters it
//! before it starts them), and the namespace is deleted when the test ends, also on failure.

use std::os::fd::AsRawFd;

use anyhow::{bail, ensure, Context, Result};
use kvmagent_host_tests::checks::ip;
use kvmagent_host_tests::{uuid, Host};
use serde_json::{json, Value};

/// A network namespace; the one [`Netns::new`] made is deleted on drop (its links go with it).
struct Netns {
    name: String,
    owner: bool,
}

impl Netns {
    fn new() -> Result<Netns> {
        let name = format!("kvl2-{}", &uuid()[..10]);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name, owner: true };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The same namespace, not deleted when this handle is dropped.
    fn view(&self) -> Netns {
        Netns { name: self.name.clone(), owner: false }
    }

    /// `ip -n <ns> <args>`: its output.
    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `ip -n <ns> -j <args>`, parsed.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        let out = self.ip(&all)?;
        serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out }).context("parsing ip -j")
    }

    /// The link named `name`, from `ip -d -j link show`, or `None`.
    fn link(&self, name: &str) -> Result<Option<Value>> {
        let all = self.json(&["-d", "link", "show"])?;
        Ok(all.as_array().into_iter().flatten().find(|l| l["ifname"] == name).cloned())
    }

    /// `a.b.c.d/len` and `x::y/len` addresses of `dev` other than link-local ones.
    fn addresses(&self, dev: &str) -> Result<Vec<String>> {
        let v = self.json(&["addr", "show", "dev", dev])?;
        let infos = v.as_array().into_iter().flatten().flat_map(|l| l["addr_info"].as_array().into_iter().flatten());
        Ok(infos
            .filter(|a| a["scope"] != "link")
            .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
            .collect())
    }

    /// Gateway routes (`<dst> via <gw>`) out of `dev`, both families.
    fn gateway_routes(&self, dev: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for family in ["-4", "-6"] {
            let v = self.json(&[family, "route", "show", "dev", dev])?;
            for r in v.as_array().into_iter().flatten().filter(|r| r["gateway"].is_string()) {
                out.push(format!("{} via {}", r["dst"].as_str().unwrap_or("?"), r["gateway"].as_str().unwrap_or("?")));
            }
        }
        out.sort();
        Ok(out)
    }

    /// What a create may change: every link's name, kind, VLAN id, master, MTU, MAC and up
    /// flag, with its addresses and gateway routes.
    fn state(&self) -> Result<Vec<Value>> {
        let links = self.json(&["-d", "link", "show"])?;
        let mut out = Vec::new();
        for l in links.as_array().into_iter().flatten() {
            let name = l["ifname"].as_str().unwrap_or_default();
            let up = l["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP"));
            out.push(json!({
                "name": name, "kind": l["linkinfo"]["info_kind"], "vlan": l["linkinfo"]["info_data"]["id"],
                "master": l["master"], "mtu": l["mtu"], "mac": l["address"], "up": up,
                "addresses": self.addresses(name)?, "routes": self.gateway_routes(name)?,
            }));
        }
        Ok(out)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cannot delete network namespace {}: {e}", self.name);
        }
    }
}

/// Runs [`scenario`] on a thread that has entered namespace `ns`, with a tokio runtime of its
/// own: every socket it opens and every process it starts is in the namespace.
fn inside(ns: &Netns) -> Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{}", ns.name)).context("opening the namespace")?;
    let view = ns.view();
    let thread = std::thread::spawn(move || -> Result<()> {
        // SAFETY: setns(2) on a valid descriptor; it changes this thread's namespace only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(scenario(&view))
    });
    thread.join().map_err(|_| anyhow::anyhow!("the test body panicked"))?
}

fn is_up(link: &Value) -> bool {
    link["flags"].as_array().is_some_and(|f| f.iter().any(|x| x == "UP"))
}

/// Two NICs: eth0 carries the host's addresses and routes, eth1 none (a VLAN trunk).
fn nics(ns: &Netns) -> Result<()> {
    for (nic, peer) in [("eth0", "eth0p"), ("eth1", "eth1p"), ("eth2", "eth2p")] {
        ns.ip(&["link", "add", nic, "type", "veth", "peer", "name", peer])?;
        ns.ip(&["link", "set", peer, "up"])?;
    }
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["addr", "add", "192.0.2.10/24", "dev", "eth0"])?;
    ns.ip(&["addr", "add", "2001:db8::10/64", "dev", "eth0", "nodad"])?;
    ns.ip(&["route", "add", "default", "via", "192.0.2.1", "dev", "eth0"])?;
    ns.ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.1", "dev", "eth0"])?;
    ns.ip(&["-6", "route", "add", "2001:db8:1::/48", "via", "2001:db8::1", "dev", "eth0"])?;
    Ok(())
}

/// A create body as the management node's Gson sends it (primitives present, the extra keys).
fn create_body(iface: &str, bridge: &str, vlan: Option<u16>) -> Value {
    let mut b = json!({
        "physicalInterfaceName": iface, "bridgeName": bridge, "l2NetworkUuid": uuid(),
        "disableIptables": false, "mtu": 1500, "isolated": false, "kvmHostAddons": {},
    });
    if let Some(v) = vlan {
        b["vlan"] = json!(v);
    }
    b
}

#[test]
fn bridges_and_vlan_devices_are_made_checked_and_deleted_in_a_namespace() -> Result<()> {
    let ns = Netns::new()?;
    nics(&ns)?;
    inside(&ns)
}

async fn scenario(ns: &Netns) -> Result<()> {
    let h = Host::start().await?;
    let eth0_mac = ns.link("eth0")?.context("eth0")?["address"].clone();

    // A bridge on the NIC that carries the host's addresses: they move, with the routes.
    let novlan = create_body("eth0", "br_eth0", None);
    h.call_ok("/network/l2novlan/createbridge", &novlan).await?;
    let br = ns.link("br_eth0")?.context("br_eth0 was not made")?;
    ensure!(br["linkinfo"]["info_kind"] == "bridge" && is_up(&br), "br_eth0: {br}");
    ensure!(br["linkinfo"]["info_data"]["stp_state"] == 0, "STP off: {br}");
    ensure!(br["linkinfo"]["info_data"]["forward_delay"] == 0, "no forwarding delay: {br}");
    ensure!(br["address"] == eth0_mac, "the bridge takes the NIC's MAC: {br}");
    let eth0 = ns.link("eth0")?.context("eth0")?;
    ensure!(eth0["master"] == "br_eth0" && is_up(&eth0), "eth0 enslaved: {eth0}");
    ensure!(ns.addresses("br_eth0")? == ["192.0.2.10/24", "2001:db8::10/64"], "{:?}", ns.addresses("br_eth0")?);
    ensure!(ns.addresses("eth0")?.is_empty(), "eth0 keeps no address: {:?}", ns.addresses("eth0")?);
    let routes = ns.gateway_routes("br_eth0")?;
    ensure!(
        routes == ["198.51.100.0/24 via 192.0.2.1", "2001:db8:1::/48 via 2001:db8::1", "default via 192.0.2.1"],
        "routes on the bridge: {routes:?}"
    );

    // A VLAN bridge on the other NIC: the device <iface>.<vlan> is the bridge's port. A kernel
    // without 802.1Q (some VM kernels) refuses the device: in-band, and nothing changes.
    let vlan = create_body("eth1", "br_eth1_100", Some(100));
    let vlans = ns.ip(&["link", "add", "link", "eth2", "name", "probe.7", "type", "vlan", "id", "7"]).is_ok();
    if vlans {
        ns.ip(&["link", "del", "probe.7"])?;
        h.call_ok("/network/l2vlan/createbridge", &vlan).await?;
        let dev = ns.link("eth1.100")?.context("eth1.100 was not made")?;
        ensure!(dev["linkinfo"]["info_kind"] == "vlan" && dev["linkinfo"]["info_data"]["id"] == 100, "{dev}");
        ensure!(dev["link"] == "eth1" && dev["master"] == "br_eth1_100" && is_up(&dev), "{dev}");
        ensure!(is_up(&ns.link("eth1")?.context("eth1")?), "the trunk NIC is up");
        ensure!(ns.link("eth1")?.context("eth1")?["master"].is_null(), "the trunk NIC itself is no port");
    } else {
        eprintln!("this kernel has no 802.1Q VLAN devices: checking that the agent refuses in-band");
        let before = ns.state()?;
        let e = h.call_err("/network/l2vlan/createbridge", &vlan).await?;
        ensure!(e.contains("adding VLAN device eth1.100"), "{e}");
        ensure!(ns.state()? == before, "a refused VLAN changed something");
    }

    // Idempotent: the same calls again succeed and change nothing.
    let before = ns.state()?;
    h.call_ok("/network/l2novlan/createbridge", &novlan).await?;
    if vlans {
        h.call_ok("/network/l2vlan/createbridge", &vlan).await?;
    }
    ensure!(ns.state()? == before, "a second create changed something:\n{before:?}\n{:?}", ns.state()?);

    // Checks: the MN sends the VLAN check the whole create command.
    h.call_ok("/network/l2novlan/checkbridge", &json!({"physicalInterfaceName": "eth0", "bridgeName": "br_eth0"}))
        .await?;
    if vlans {
        h.call_ok("/network/l2vlan/checkbridge", &vlan).await?;
    } else {
        let e = h.call_err("/network/l2vlan/checkbridge", &vlan).await?;
        ensure!(e.contains("can not find bridge br_eth1_100"), "{e}");
    }
    let e = h
        .call_err("/network/l2novlan/checkbridge", &json!({"physicalInterfaceName": "eth2", "bridgeName": "br_eth2"}))
        .await?;
    ensure!(e.contains("can not find bridge br_eth2"), "{e}");
    let (status, body) = h
        .post("/network/checkphysicalnetworkinterface", &[], json!({"interfaceNames": ["eth1", "eth9"]}).to_string())
        .await?;
    let r: Value = serde_json::from_str(&body)?;
    ensure!(status == 200 && r["success"] == false && r["failedInterfaceNames"] == json!(["eth9"]), "{status} {body}");

    // Bad input is refused in-band and changes nothing.
    let before = ns.state()?;
    for (path, body, says) in [
        ("/network/l2vlan/createbridge", create_body("eth2", "br_eth2_4095", Some(4095)), "vlan 4095"),
        ("/network/l2vlan/createbridge", create_body("eth2", "br_eth2_0", Some(0)), "vlan 0"),
        ("/network/l2novlan/createbridge", create_body("eth2", "br_eth2_0123456789", None), "bridgeName"),
        ("/network/l2novlan/createbridge", create_body("eth2", "br eth2", None), "bridgeName"),
        ("/network/l2novlan/createbridge", create_body("eth9", "br_eth9", None), "eth9 does not exist"),
        ("/network/l2novlan/createbridge", create_body("eth0", "br_other", None), "already a port of br_eth0"),
        ("/network/l2novlan/createbridge", create_body("eth2", "eth1", None), "not a bridge"),
    ] {
        let e = h.call_err(path, &body).await?;
        ensure!(e.contains(says), "{path} {body}: {e}");
    }
    ensure!(ns.state()? == before, "a refused command changed something");

    // Network services the agent does not provide: an in-band error naming the service.
    for (path, service) in [
        ("/flatnetworkprovider/dhcp/connect", "flat DHCP"),
        ("/flatnetworkprovider/userdata/apply", "flat user data"),
        ("/flatnetworkprovider/eip/apply", "flat EIP"),
        ("/securitygroup/applyrules", "security groups"),
    ] {
        let e = h.call_err(path, &json!({})).await?;
        ensure!(e.contains(&format!("{service} is not provided")), "{path}: {e}");
    }

    // Deletes: the VLAN bridge goes with its VLAN device; the bridge that carries the host's
    // addresses stays (as ZStack's agent leaves it); one without addresses goes.
    h.call_ok("/network/l2vlan/deletebridge", &vlan).await?;
    ensure!(ns.link("br_eth1_100")?.is_none() && ns.link("eth1.100")?.is_none(), "VLAN bridge deleted");
    ensure!(ns.link("eth1")?.is_some(), "the NIC stays");
    h.call_ok("/network/l2vlan/deletebridge", &vlan).await?;
    h.call_ok("/network/l2novlan/deletebridge", &novlan).await?;
    ensure!(ns.link("br_eth0")?.is_some(), "the bridge with the host's addresses stays");
    ensure!(ns.addresses("br_eth0")?.len() == 2, "and keeps them");
    let plain = create_body("eth2", "br_eth2", None);
    h.call_ok("/network/l2novlan/createbridge", &plain).await?;
    ensure!(ns.link("eth2")?.context("eth2")?["master"] == "br_eth2", "eth2 enslaved");
    h.call_ok("/network/l2novlan/deletebridge", &plain).await?;
    ensure!(ns.link("br_eth2")?.is_none(), "br_eth2 deleted");
    let eth2 = ns.link("eth2")?.context("eth2 stays")?;
    ensure!(eth2["master"].is_null() && is_up(&eth2), "eth2 free and up: {eth2}");
    Ok(())
}
