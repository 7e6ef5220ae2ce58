//! A multi-site bed: each site is a network namespace of its own, and traffic between
//! sites crosses a WAN link ([`crate::wan`]) with a delay, a bandwidth cap and a cut.
//!
//! Site `i` of bed `N` is namespace `elsw<N>s<i>` with address 10.(214+i).N.2 on a veth pair
//! whose other end (10.(214+i).N.1) is in the namespace of the process that made the bed, so
//! it and the command-line tools it runs reach every site directly (they stand for an
//! operator, not for a site). Every process of a site listens on the site's address, on ports given up front.
//!
//! This kernel has neither netem nor netfilter, so nothing can delay or redirect packets in
//! flight. Instead each site holds the other sites' addresses itself (on its loopback
//! device), and for each of their ports a relay listens there, inside the site's namespace,
//! and carries the connection to the real address from the bed maker's namespace, over
//! the link between the two sites. A process in site A that connects to an address of site B
//! therefore reaches B only across the A-B link, with no change to the addresses the
//! processes advertise. Needs root and iproute2.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;

use crate::wan::{Link, LinkConfig, Relay};

/// Runs a command; its stderr is the error when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Whether site beds can be made here: root, and `ip` (iproute2) and `nsenter` (util-linux)
/// present. When they cannot, the reason.
pub fn unavailable() -> Option<String> {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root {
        return Some("not running as root".into());
    }
    for tool in ["ip", "nsenter"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` is missing"));
        }
    }
    None
}

/// One site of the bed.
#[derive(Debug, Clone)]
pub struct Site {
    pub name: String,
    /// Namespace name (`ip netns`).
    pub netns: String,
    /// The address every process of the site listens on.
    pub ip: Ipv4Addr,
}

impl Site {
    /// The command prefix that runs a program in this site (its network namespace only: the
    /// mount namespace stays the host's, so FUSE mounts made inside are visible outside).
    pub fn command_prefix(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", self.netns), "--".into()]
    }

    /// `IP:PORT` of this site.
    pub fn addr(&self, port: u16) -> String {
        format!("{}:{port}", self.ip)
    }
}

/// Sites joined by WAN links. Dropping it stops the relays and removes the namespaces (and
/// kills whatever still runs in them).
pub struct SiteBed {
    pub sites: Vec<Site>,
    /// The link between sites `i < j`, by (i, j).
    links: Vec<((usize, usize), Arc<Link>)>,
    relays: Vec<Relay>,
}

impl SiteBed {
    /// Sites named `names` (at most 3), every pair joined by a link of `cfg`, with relays for
    /// `ports` of every site. Runs inside a tokio runtime (the relays are tasks of it). What
    /// was made before a failure is removed again.
    pub fn create(names: &[&str], cfg: LinkConfig, ports: &[u16]) -> Result<Self, String> {
        if !(1..=3).contains(&names.len()) {
            return Err(format!("a bed has 1 to 3 sites, not {}", names.len()));
        }
        // Beds are made one at a time on this machine: the clean-up below must not take a
        // bed another process is making for a leftover.
        let lock = std::fs::File::create("/run/elea-site-bed.lock")
            .map_err(|e| format!("/run/elea-site-bed.lock: {e}"))?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("locking /run/elea-site-bed.lock: {e}"))?;
        remove_leftovers();
        let index = (1..=250u8)
            .find(|n| run("ip", &["netns", "add", &format!("elsw{n}s0")]).is_ok())
            .ok_or("no free index for a site bed (250 in use)")?;
        // Registered before anything else is made: dropping the bed removes what exists.
        let mut bed = Self { sites: Vec::new(), links: Vec::new(), relays: Vec::new() };
        for (i, name) in names.iter().enumerate() {
            bed.sites.push(Site {
                name: name.to_string(),
                netns: format!("elsw{index}s{i}"),
                ip: Ipv4Addr::new(10, 214 + i as u8, index, 2),
            });
        }
        bed.build(index, cfg, ports)?;
        Ok(bed)
    }

    fn build(&mut self, index: u8, cfg: LinkConfig, ports: &[u16]) -> Result<(), String> {
        let me = std::process::id();
        for (i, site) in self.sites.iter().enumerate() {
            let (netns, ip) = (site.netns.as_str(), site.ip);
            if i > 0 {
                run("ip", &["netns", "add", netns])?;
            }
            // The host end is named as the namespace; its alias names the owning process.
            run("ip", &["link", "add", netns, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
            run("ip", &["link", "set", netns, "alias", &format!("elea-sites pid={me}")])?;
            run("ip", &["addr", "add", &format!("10.{}.{index}.1/24", 214 + i), "dev", netns])?;
            run("ip", &["link", "set", netns, "up"])?;
            run("ip", &["-n", netns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", netns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            run("ip", &["-n", netns, "link", "set", "eth0", "up"])?;
        }
        for i in 0..self.sites.len() {
            for j in i + 1..self.sites.len() {
                self.links.push(((i, j), Link::new(cfg)));
            }
        }
        for (i, site) in self.sites.clone().iter().enumerate() {
            for (j, other) in self.sites.clone().iter().enumerate() {
                if i == j {
                    continue;
                }
                // The other site's address, here: its relays listen on it.
                run("ip", &["-n", &site.netns, "addr", "add", &format!("{}/32", other.ip), "dev", "lo"])?;
                let link = self.link(i, j);
                let dir = if i < j { 0 } else { 1 };
                for &port in ports {
                    let addr = SocketAddr::new(other.ip.into(), port);
                    let relay = bind_in(&site.netns, addr)
                        .and_then(|l| Relay::start_on(l, addr, link.clone(), dir))
                        .map_err(|e| format!("relay for {addr} in site {}: {e}", site.name))?;
                    self.relays.push(relay);
                }
            }
        }
        Ok(())
    }

    /// The site named `name`.
    pub fn site(&self, name: &str) -> &Site {
        self.sites.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no site {name}"))
    }

    fn index(&self, name: &str) -> usize {
        self.sites.iter().position(|s| s.name == name).unwrap_or_else(|| panic!("no site {name}"))
    }

    fn link(&self, i: usize, j: usize) -> Arc<Link> {
        let key = (i.min(j), i.max(j));
        self.links.iter().find(|(k, _)| *k == key).map(|(_, l)| l.clone()).expect("a link between two sites")
    }

    /// Cuts (or heals) every link of site `name`: nothing crosses between it and the others.
    pub fn set_site_cut(&self, name: &str, cut: bool) {
        let i = self.index(name);
        for ((a, b), l) in &self.links {
            if *a == i || *b == i {
                l.set_cut(cut);
            }
        }
    }

    /// Bytes the link between sites `from` and `to` carried from `from` to `to`.
    pub fn carried(&self, from: &str, to: &str) -> u64 {
        let (i, j) = (self.index(from), self.index(to));
        let (ab, ba) = self.link(i, j).carried();
        if i < j { ab } else { ba }
    }
}

impl Drop for SiteBed {
    fn drop(&mut self) {
        self.relays.clear();
        for s in &self.sites {
            remove_namespace(&s.netns);
        }
    }
}

/// A listening socket made inside namespace `netns` (on a thread that enters it and ends:
/// a socket stays in the namespace it was made in).
fn bind_in(netns: &str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let path = format!("/run/netns/{netns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            std::net::TcpListener::bind(addr)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the binding thread panicked")))
    })
}

/// Kills what still runs in namespace `netns`, then removes it (with its veth pair).
fn remove_namespace(netns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = run("kill", &["-9", pid]);
        }
    }
    let _ = run("ip", &["netns", "del", netns]);
    let _ = run("ip", &["link", "del", netns]);
}

/// Removes the namespaces of beds whose owning process is gone.
fn remove_leftovers() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("elsw") {
            continue;
        }
        let alias = std::fs::read_to_string(format!("/sys/class/net/{name}/ifalias")).unwrap_or_default();
        let owner_alive = alias
            .trim()
            .strip_prefix("elea-sites pid=")
            .is_some_and(|pid| std::path::Path::new("/proc").join(pid).exists());
        if !owner_alive {
            remove_namespace(&name);
        }
    }
}
