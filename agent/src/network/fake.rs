//! Links, addresses and routes in memory, for unit tests of the bridge logic. It enforces what
//! the kernel would (a name is taken once, a VLAN device needs its parent, deleting an address
//! takes its gateway routes along) and counts every change, so a test can say "nothing changed".
//! The next call of a named operation can be made to fail.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{GatewayRoute, IfAddr, Link, LinkChange, LinkKind, NetError, Netlink};

#[derive(Default)]
struct State {
    links: BTreeMap<u32, Link>,
    addresses: BTreeMap<u32, Vec<IfAddr>>,
    routes: BTreeMap<u32, Vec<GatewayRoute>>,
    next_index: u32,
    changes: usize,
    failing: HashSet<&'static str>,
}

#[derive(Default)]
pub struct FakeNet {
    state: Mutex<State>,
}

fn refused(what: impl Into<String>, reason: &str) -> NetError {
    NetError::Refused { what: what.into(), reason: reason.to_owned() }
}

impl State {
    fn add(&mut self, name: &str, kind: LinkKind, up: bool) -> Result<u32, NetError> {
        if self.links.values().any(|l| l.name == name) {
            return Err(refused(format!("adding {name}"), "File exists"));
        }
        self.next_index += 1;
        let index = self.next_index;
        let mac = vec![2, 0, 0, 0, 0, index as u8];
        let link = Link { index, name: name.to_owned(), kind, master: None, up, mtu: 1500, mac, alias: None };
        self.links.insert(index, link);
        Ok(index)
    }

    fn get(&mut self, link: &Link) -> Result<&mut Link, NetError> {
        self.links.get_mut(&link.index).ok_or_else(|| refused(format!("changing {}", link.name), "No such device"))
    }

    fn step(&mut self, op: &'static str) -> Result<(), NetError> {
        if self.failing.remove(op) {
            return Err(refused(op, "injected failure"));
        }
        self.changes += 1;
        Ok(())
    }
}

impl FakeNet {
    /// Adds a NIC (a link of no particular kind); returns its index.
    pub fn add_nic(&self, name: &str, up: bool) -> u32 {
        self.state.lock().unwrap().add(name, LinkKind::Other, up).unwrap()
    }

    pub fn put_address(&self, index: u32, addr: IfAddr) {
        self.state.lock().unwrap().addresses.entry(index).or_default().push(addr);
    }

    pub fn put_route(&self, index: u32, route: GatewayRoute) {
        self.state.lock().unwrap().routes.entry(index).or_default().push(route);
    }

    pub fn set_down(&self, name: &str) {
        let mut s = self.state.lock().unwrap();
        if let Some(l) = s.links.values_mut().find(|l| l.name == name) {
            l.up = false;
        }
    }

    pub fn link(&self, name: &str) -> Option<Link> {
        self.state.lock().unwrap().links.values().find(|l| l.name == name).cloned()
    }

    fn index(&self, name: &str) -> u32 {
        self.link(name).map_or(0, |l| l.index)
    }

    /// The addresses of `name`, sorted.
    pub fn addresses_of(&self, name: &str) -> Vec<IfAddr> {
        let i = self.index(name);
        let mut a = self.state.lock().unwrap().addresses.get(&i).cloned().unwrap_or_default();
        a.sort();
        a
    }

    pub fn routes_of(&self, name: &str) -> Vec<GatewayRoute> {
        let i = self.index(name);
        self.state.lock().unwrap().routes.get(&i).cloned().unwrap_or_default()
    }

    /// Every link with its addresses and routes.
    pub fn snapshot(&self) -> Vec<(Link, Vec<IfAddr>, Vec<GatewayRoute>)> {
        let s = self.state.lock().unwrap();
        fn of<T: Clone>(m: &BTreeMap<u32, Vec<T>>, i: u32) -> Vec<T> {
            m.get(&i).cloned().unwrap_or_default()
        }
        s.links.values().map(|l| (l.clone(), of(&s.addresses, l.index), of(&s.routes, l.index))).collect()
    }

    /// How many changes were made so far.
    pub fn changes(&self) -> usize {
        self.state.lock().unwrap().changes
    }

    /// Makes the next call of operation `op` (a trait method's name) fail.
    pub fn fail_next(&self, op: &'static str) {
        self.state.lock().unwrap().failing.insert(op);
    }
}

#[async_trait]
impl Netlink for FakeNet {
    async fn links(&self) -> Result<Vec<Link>, NetError> {
        Ok(self.state.lock().unwrap().links.values().cloned().collect())
    }

    async fn add_bridge(&self, name: &str) -> Result<(), NetError> {
        let mut s = self.state.lock().unwrap();
        s.step("add_bridge")?;
        s.add(name, LinkKind::Bridge, true).map(drop)
    }

    async fn add_vlan(&self, name: &str, parent: u32, id: u16) -> Result<(), NetError> {
        let mut s = self.state.lock().unwrap();
        s.step("add_vlan")?;
        if !s.links.contains_key(&parent) {
            return Err(refused(format!("adding {name}"), "No such device"));
        }
        s.add(name, LinkKind::Vlan { parent, id }, true).map(drop)
    }

    async fn change(&self, link: &Link, change: LinkChange) -> Result<(), NetError> {
        let mut s = self.state.lock().unwrap();
        s.step("change")?;
        if let LinkChange::Master(m) = change {
            if !matches!(s.links.get(&m), Some(b) if b.kind == LinkKind::Bridge) {
                return Err(refused(format!("enslaving {}", link.name), "not a bridge"));
            }
        }
        let l = s.get(link)?;
        match change {
            LinkChange::Up => l.up = true,
            LinkChange::Master(m) => l.master = Some(m),
            LinkChange::Mtu(m) => l.mtu = m,
            LinkChange::Mac(m) => l.mac = m,
            LinkChange::Alias(a) => l.alias = Some(a),
        }
        Ok(())
    }

    async fn delete(&self, link: &Link) -> Result<(), NetError> {
        let mut s = self.state.lock().unwrap();
        s.step("delete")?;
        s.get(link)?;
        s.links.remove(&link.index);
        s.addresses.remove(&link.index);
        s.routes.remove(&link.index);
        for l in s.links.values_mut().filter(|l| l.master == Some(link.index)) {
            l.master = None;
        }
        Ok(())
    }

    async fn addresses(&self, link: &Link) -> Result<Vec<IfAddr>, NetError> {
        Ok(self.state.lock().unwrap().addresses.get(&link.index).cloned().unwrap_or_default())
    }

    async fn add_address(&self, link: &Link, addr: IfAddr) -> Result<(), NetError> {
        let mut s = self.state.lock().unwrap();
        s.step("add_address")?;
        let a = s.addresses.entry(link.index).or_default();
        if a.contains(&addr) {
            return Err(refused(format!("adding {addr} to {}", link.name), "File exists"));
        }
        a.push(addr);
        Ok(())
    }

    async fn del_address(&self, link: &Link, addr: IfAddr) -> Result<(), NetError> {
        let mut s = self.state.lock().unwrap();
        s.step("del_address")?;
        let a = s.addresses.entry(link.index).or_default();
        let before = a.len();
        a.retain(|x| *x != addr);
        if a.len() == before {
            return Err(refused(format!("deleting {addr} from {}", link.name), "Cannot assign requested address"));
        }
        // The kernel drops the routes whose gateway the address no longer reaches; the fake
        // drops those of the same family.
        s.routes.entry(link.index).or_default().retain(|r| r.gateway.is_ipv4() != addr.ip.is_ipv4());
        Ok(())
    }

    async fn gateway_routes(&self, link: &Link) -> Result<Vec<GatewayRoute>, NetError> {
        Ok(self.state.lock().unwrap().routes.get(&link.index).cloned().unwrap_or_default())
    }

    async fn add_route(&self, link: &Link, route: GatewayRoute) -> Result<(), NetError> {
        let mut s = self.state.lock().unwrap();
        s.step("add_route")?;
        s.routes.entry(link.index).or_default().push(route);
        Ok(())
    }

    async fn del_route(&self, link: &Link, route: GatewayRoute) -> Result<(), NetError> {
        let mut s = self.state.lock().unwrap();
        s.step("del_route")?;
        s.routes.entry(link.index).or_default().retain(|r| *r != route);
        Ok(())
    }
}
