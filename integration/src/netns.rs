//! Network namespaces for the fault scenarios: every process of a deployment gets its own
//! namespace with one end of a veth pair, the other end plugged into a bridge in the host's
//! namespace, so the test process reaches every node and the nodes reach each other over a
//! real (virtual) link that can be cut, healed and slowed:
//!
//! - a cut between two nodes makes each side drop every packet it sends to the other: a tc u32
//!   filter steers them into an htb class whose queue holds nothing. A silent partition, as a
//!   failed switch port is, not an instant refusal;
//! - a slow link caps the rate of everything a node sends (the htb class all other traffic
//!   goes through), so its packets queue up: delay that grows with load. (tc's netem, which
//!   adds a fixed delay, is a kernel module that not every kernel ships.)
//!
//! Needs root and iproute2 (`ip`, `tc`) and the kernel's htb, pfifo and u32 tc modules. Namespaces are named `elea<N>n<K>` and bridges
//! `elbr<N>`, where N is a per-deployment index (subnet 10.213.N.0/24); each bridge's alias
//! names the owning process, so what a killed test run left behind is removed by the next.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use elea_sandbox::sites::run;

/// The rate of an unthrottled link.
const FULL_RATE: &str = "10gbit";

fn must(program: &str, args: &[&str]) {
    if let Err(e) = run(program, args) {
        panic!("network setup failed: {e}");
    }
}

/// Whether namespaces can be used here: root, `ip` and `tc` present, and not turned off with
/// `CHAOS_NETNS=0`. When they cannot, the reason is returned.
pub fn unavailable() -> Option<String> {
    if std::env::var("CHAOS_NETNS").as_deref() == Ok("0") {
        return Some("CHAOS_NETNS=0".into());
    }
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root {
        return Some("not running as root".into());
    }
    for tool in ["ip", "tc", "nsenter"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is missing"));
        }
    }
    None
}

/// One node's place on the virtual network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Namespace name (`ip netns`), also its file under /run/netns.
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Node number on the subnet (the last octet).
    pub k: u8,
}

impl Host {
    /// The command prefix that runs a program in this namespace (and no other: the mount
    /// namespace stays the host's, so FUSE mounts made inside are visible outside).
    pub fn command_prefix(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", self.netns), "--".into()]
    }
}

/// A bridge with namespaces plugged into it. Dropping it removes them all.
pub struct Network {
    index: u8,
    bridge: String,
    hosts: Mutex<Vec<Host>>,
    /// Cut (from, to) pairs in force: packets from `to` are dropped on `from`'s ingress.
    cuts: Mutex<BTreeSet<(u8, u8)>>,
}

impl Network {
    /// Creates a bridge on the first free subnet 10.213.N.0/24 (N in 1..=250), removing
    /// leftovers of runs whose process is gone.
    pub fn create() -> Self {
        remove_leftovers();
        let me = std::process::id();
        for index in 1..=250u8 {
            let bridge = format!("elbr{index}");
            if run("ip", &["link", "add", &bridge, "type", "bridge"]).is_err() {
                continue; // taken by a running deployment
            }
            must("ip", &["link", "set", &bridge, "alias", &format!("elea-chaos pid={me}")]);
            must("ip", &["addr", "add", &format!("10.213.{index}.1/24"), "dev", &bridge]);
            must("ip", &["link", "set", &bridge, "up"]);
            return Self { index, bridge, hosts: Mutex::new(Vec::new()), cuts: Mutex::new(BTreeSet::new()) };
        }
        panic!("no free subnet for a test network (250 bridges elbr* in use)");
    }

    /// The host's own address on the bridge.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 1)
    }

    /// A new namespace for node number `k` (2..=254), plugged into the bridge.
    pub fn add_host(&self, k: u8) -> Host {
        assert!((2..=254).contains(&k), "node number {k} out of range");
        let netns = format!("elea{}n{k}", self.index);
        let veth = format!("elv{}n{k}", self.index);
        let ip = Ipv4Addr::new(10, 213, self.index, k);
        must("ip", &["netns", "add", &netns]);
        let host = Host { netns: netns.clone(), ip, k };
        // Registered at once: dropping the network removes it even if the rest fails.
        self.hosts.lock().unwrap_or_else(|p| p.into_inner()).push(host.clone());
        must("ip", &["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns]);
        must("ip", &["link", "set", &veth, "master", &self.bridge]);
        must("ip", &["link", "set", &veth, "up"]);
        must("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        must("ip", &["-n", &netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        must("ip", &["-n", &netns, "link", "set", "eth0", "up"]);
        // Egress: class 1:10 carries everything (its rate is the link speed), class 1:20 has
        // a queue of length 0 (whatever a cut steers into it is dropped).
        let tc = |args: &[&str]| {
            let mut a = vec!["-n", netns.as_str()];
            a.extend_from_slice(args);
            must("tc", &a);
        };
        tc(&["qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10", "r2q", "100000"]);
        tc(&["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate", FULL_RATE]);
        tc(&["class", "add", "dev", "eth0", "parent", "1:", "classid", "1:20", "htb", "rate", FULL_RATE]);
        tc(&["qdisc", "add", "dev", "eth0", "parent", "1:20", "handle", "20:", "pfifo", "limit", "0"]);
        host
    }

    fn filter_pref(peer: u8) -> String {
        // One filter per cut peer, found again by its preference.
        (1000 + u32::from(peer)).to_string()
    }

    /// Drops every packet `at` sends to `peer` (one direction).
    fn drop_from(&self, at: &Host, peer: &Host) {
        if !self.cuts.lock().unwrap_or_else(|p| p.into_inner()).insert((at.k, peer.k)) {
            return;
        }
        must(
            "tc",
            &[
                "-n",
                &at.netns,
                "filter",
                "add",
                "dev",
                "eth0",
                "parent",
                "1:",
                "protocol",
                "ip",
                "pref",
                &Self::filter_pref(peer.k),
                "u32",
                "match",
                "ip",
                "dst",
                &format!("{}/32", peer.ip),
                "flowid",
                "1:20",
            ],
        );
    }

    fn allow_from(&self, at: &Host, peer: &Host) {
        if !self.cuts.lock().unwrap_or_else(|p| p.into_inner()).remove(&(at.k, peer.k)) {
            return;
        }
        must(
            "tc",
            &[
                "-n",
                &at.netns,
                "filter",
                "del",
                "dev",
                "eth0",
                "parent",
                "1:",
                "protocol",
                "ip",
                "pref",
                &Self::filter_pref(peer.k),
            ],
        );
    }

    /// Cuts the link between `a` and `b` both ways (packets silently dropped).
    pub fn cut(&self, a: &Host, b: &Host) {
        self.drop_from(a, b);
        self.drop_from(b, a);
    }

    /// Restores the link between `a` and `b`.
    pub fn heal(&self, a: &Host, b: &Host) {
        self.allow_from(a, b);
        self.allow_from(b, a);
    }

    /// Cuts every link between the two sides.
    pub fn partition(&self, side_a: &[Host], side_b: &[Host]) {
        for a in side_a {
            for b in side_b {
                self.cut(a, b);
            }
        }
    }

    /// Restores every cut link.
    pub fn heal_all(&self) {
        let cuts: Vec<(u8, u8)> =
            self.cuts.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        let hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let find = |k: u8| hosts.iter().find(|h| h.k == k).cloned();
        for (at, from) in cuts {
            if let (Some(a), Some(b)) = (find(at), find(from)) {
                self.allow_from(&a, &b);
            }
        }
    }

    /// Caps the rate of everything `host` sends at `kbit` kilobits per second (`None`: the
    /// full rate again).
    pub fn throttle(&self, host: &Host, kbit: Option<u32>) {
        let rate = kbit.map_or(FULL_RATE.to_string(), |k| format!("{k}kbit"));
        must(
            "tc",
            &[
                "-n",
                &host.netns,
                "class",
                "change",
                "dev",
                "eth0",
                "parent",
                "1:",
                "classid",
                "1:10",
                "htb",
                "rate",
                &rate,
            ],
        );
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let hosts = std::mem::take(&mut *self.hosts.lock().unwrap_or_else(|p| p.into_inner()));
        for h in hosts {
            // Removing the namespace destroys its veth pair too.
            remove_namespace(&h.netns);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

/// Kills what still runs in namespace `netns` (a test run that died without cleaning up
/// leaves its processes behind), then removes it.
fn remove_namespace(netns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = run("kill", &["-9", pid]);
        }
    }
    let _ = run("ip", &["netns", "del", netns]);
}

/// Removes bridges (and their namespaces) whose owning process is gone.
fn remove_leftovers() {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = name.strip_prefix("elbr").and_then(|n| n.parse::<u8>().ok()) else { continue };
        let alias = std::fs::read_to_string(entry.path().join("ifalias")).unwrap_or_default();
        let Some(pid) = alias.trim().strip_prefix("elea-chaos pid=") else { continue };
        if std::path::Path::new("/proc").join(pid).exists() {
            continue;
        }
        let prefix = format!("elea{index}n");
        if let Ok(ns) = std::fs::read_dir("/run/netns") {
            for n in ns.flatten() {
                let n = n.file_name().to_string_lossy().into_owned();
                if n.strip_prefix(&prefix).is_some_and(|k| k.parse::<u8>().is_ok()) {
                    remove_namespace(&n);
                }
            }
        }
        // Host ends whose namespace lives on unnamed.
        let veth = format!("elv{index}n");
        if let Ok(links) = std::fs::read_dir("/sys/class/net") {
            for l in links.flatten() {
                let l = l.file_name().to_string_lossy().into_owned();
                if l.strip_prefix(&veth).is_some_and(|k| k.parse::<u8>().is_ok()) {
                    let _ = run("ip", &["link", "del", &l]);
                }
            }
        }
        let _ = run("ip", &["link", "del", &name]);
    }
}
