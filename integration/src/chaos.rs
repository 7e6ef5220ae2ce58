//! The fault-injection harness: a whole Elea deployment of real processes (metadata voters,
//! cache nodes, FUSE gateways) with ports chosen at run time, each in its own network
//! namespace when running as root (see [`crate::netns`]; plain loopback otherwise), fault
//! actions on them (kill -9, SIGSTOP/SIGCONT, restart, restart with a wiped data directory,
//! cut and heal links, slow a link), a timestamped record of everything done, and a workload
//! whose history is checked afterwards.
//!
//! The workload: writers on several mounts create files with self-describing, checksummed
//! content, fsync them, replace them atomically (write a temporary file, fsync, rename over),
//! rename and delete them, and record every operation with its start and end time; readers
//! on other mounts read acknowledged files at the same time; one appender per mount appends
//! fixed-size records to one shared file with `O_APPEND` under an `fcntl` write lock, each
//! fsynced before the lock is let go. The checker then verifies that every read returned
//! complete, checksummed content, that the history of every path is linearizable (see
//! [`crate::history`]), that the final tree holds exactly what was acknowledged (operations
//! that failed may or may not have taken effect), and that the shared file holds whole records
//! only, none twice, each appender's in order, every acknowledged one among them. Every error
//! an application call saw is reported with how long it waited.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientConfig, MetaClient};
use elea_store::testing::S3TestServer;

use crate::history::{self, History, Value};
use crate::netns::{self, Host, Network};
use crate::{MetaProc, MountProc, elea_cli_env, free_port, wait_leader};

/// What the harness did and when, relative to its start (also written to `events.log`).
pub struct Events {
    start: Instant,
    lines: Mutex<Vec<String>>,
    file: Mutex<File>,
}

impl Events {
    /// Starts the clock; every line logged is also appended to the file at `path`.
    pub fn new(path: &Path) -> Self {
        let file = File::create(path).expect("events log");
        Self { start: Instant::now(), lines: Mutex::new(Vec::new()), file: Mutex::new(file) }
    }

    /// Time since the harness started.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn log(&self, what: &str) {
        let line = format!("{:>9.3}s {what}", self.now().as_secs_f64());
        eprintln!("[chaos] {line}");
        if let Ok(mut f) = self.file.lock() {
            let _ = writeln!(f, "{line}");
        }
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The shape of a deployment.
#[derive(Debug, Clone)]
pub struct TopologyConfig {
    /// Metadata voters.
    pub metas: u64,
    /// Cache nodes (all in site "a").
    pub caches: u64,
    /// `elea mount` gateways of the one volume.
    pub mounts: usize,
    /// Copies of each staged block.
    pub replicas: u8,
    /// Where the volume's objects go.
    pub store: StoreKind,
    /// The volume's `--tier-after` (1 h by default: nothing is tiered during a run).
    pub tier_after: Duration,
    /// Cache nodes whose data directory is a tmpfs of the given size in bytes (a small disk
    /// that [`Topology::fill_disk`] fills); needs root. Unmounted when the topology is
    /// dropped.
    pub small_disks: Vec<(u64, u64)>,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            metas: 3,
            caches: 2,
            mounts: 2,
            replicas: 2,
            store: StoreKind::Dir,
            tier_after: Duration::from_secs(3600),
            small_disks: Vec::new(),
        }
    }
}

/// The volume's object store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StoreKind {
    /// A local directory (`file://`).
    #[default]
    Dir,
    /// An S3 protocol server (`elea-s3-test-server`) in a process of its own, which
    /// [`Topology::store_outage`] and [`Topology::store_hang`] stop, hang and bring back.
    S3,
}

/// A running deployment in a temporary directory. Dropping it stops everything (mounts are
/// detached), even when a test fails half-way; `CHAOS_KEEP=1` keeps the directory (logs,
/// data, `events.log`) for a post-mortem.
pub struct Topology {
    pub metas: Vec<MetaProc>,
    pub caches: Vec<MetaProc>,
    pub mounts: Vec<MountProc>,
    pub meta_addrs: Vec<String>,
    pub events: Arc<Events>,
    /// Per mount: a counter bumped when the mount goes down and again when it is back (odd
    /// while down), so readers can tell an outage of their mount from a missing file.
    pub mount_gen: Arc<Vec<AtomicU64>>,
    pub cfg: TopologyConfig,
    /// Each process's network namespace, by name ("meta1", "cache2", "mount0", "s3").
    hosts: BTreeMap<String, Host>,
    /// The S3 server of [`StoreKind::S3`].
    pub s3: Option<S3Proc>,
    /// The tmpfs mounts of [`TopologyConfig::small_disks`] (unmounted after every process
    /// above has stopped).
    pub small_disks: Vec<Tmpfs>,
    /// Removed after every process above has stopped.
    net: Option<Network>,
    // Last: removed after every process above has stopped.
    pub dir: tempfile::TempDir,
}

/// Node numbers on the test subnet: metadata voters, cache nodes and mounts.
const META_K: u64 = 10;
const CACHE_K: u64 = 30;
const MOUNT_K: u64 = 50;
const S3_K: u64 = 70;

impl Topology {
    pub async fn start(cfg: TopologyConfig) -> Self {
        let mut dir = tempfile::tempdir().expect("tempdir");
        if std::env::var("CHAOS_KEEP").as_deref() == Ok("1") {
            dir.disable_cleanup(true);
            eprintln!("[chaos] keeping {}", dir.path().display());
        }
        let events = Arc::new(Events::new(&dir.path().join("events.log")));
        let net = match netns::unavailable() {
            None => Some(Network::create()),
            Some(why) => {
                events.log(&format!("every process on plain loopback (no network namespaces: {why})"));
                None
            }
        };
        let mut t = Self {
            metas: Vec::new(),
            caches: Vec::new(),
            mounts: Vec::new(),
            meta_addrs: Vec::new(),
            events,
            mount_gen: Arc::new((0..cfg.mounts).map(|_| AtomicU64::new(0)).collect()),
            cfg: cfg.clone(),
            hosts: BTreeMap::new(),
            s3: None,
            small_disks: Vec::new(),
            net,
            dir,
        };
        let meta_places: Vec<(String, Vec<String>)> =
            (1..=cfg.metas).map(|id| t.place(&format!("meta{id}"), META_K + id)).collect();
        t.meta_addrs = meta_places.iter().map(|(ip, _)| format!("{ip}:{}", free_port())).collect();
        let ic = t.meta_addrs.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>();
        let args = vec!["--initial-cluster".to_string(), ic.join(",")];
        for (i, (_, wrap)) in meta_places.iter().enumerate() {
            let id = i as u64 + 1;
            let d = t.dir.path().join(format!("meta{id}"));
            t.metas.push(MetaProc::start_wrapped("meta", id, &t.meta_addrs[i], &d, &args, wrap, &[]));
        }
        t.events.log(&format!("started {} metadata voters{}", cfg.metas, t.net_note()));
        let c = t.client();
        wait_leader(&c, &t.meta_addrs, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("no metadata leader\n{}", t.logs()));
        let all = t.meta_addrs.join(",");
        // The object store and small disks (TopologyConfig::store, ::small_disks).
        t.start_store_and_disks();
        let env = t.store_env();
        for id in 1..=cfg.caches {
            let (ip, wrap) = t.place(&format!("cache{id}"), CACHE_K + id);
            let addr = format!("{ip}:{}", free_port());
            let d = t.dir.path().join(format!("cache{id}"));
            let args: Vec<String> =
                ["--site", "a", "--meta", &all, "--staging-size", "1G"].map(String::from).into();
            t.caches.push(MetaProc::start_wrapped("cache", id, &addr, &d, &args, &wrap, &env));
        }
        let want: Vec<u64> = (1..=cfg.caches).collect();
        t.wait_cache_nodes(&want, Duration::from_secs(30)).await;
        t.events.log(&format!("started {} cache nodes", cfg.caches));
        let store = t.store_url();
        let replicas = cfg.replicas.to_string();
        let tier_after = format!("{}ms", cfg.tier_after.as_millis());
        let mut create = vec![
            "volume",
            "create",
            "v",
            "--meta",
            &all,
            "--store",
            &store,
            "--replicas",
            &replicas,
            "--tier-after",
            &tier_after,
        ];
        // Every cache node of the harness runs on this host and sees the same directory.
        if store.starts_with("file://") {
            create.push("--shared-file-store");
        }
        let (ok, out, err) = elea_cli_env(&create, &env);
        assert!(ok, "volume create: {out}{err}");
        for i in 0..cfg.mounts {
            let (_, wrap) = t.place(&format!("mount{i}"), MOUNT_K + i as u64);
            let mp = t.dir.path().join(format!("mnt{i}"));
            let log = t.dir.path().join(format!("mount{i}.log"));
            let args: Vec<String> = ["mount", "--meta", &all, "--volume", "v", "--site", "a"]
                .iter()
                .map(|s| s.to_string())
                .chain([mp.display().to_string()])
                .collect();
            t.mounts.push(MountProc::start_wrapped(&args, &mp, &log, &wrap, &env));
        }
        t.events.log(&format!("mounted {} gateways", cfg.mounts));
        t
    }

    /// Gives process `name` its own namespace (node number `k` on the subnet) when namespaces
    /// are in use; returns the address it should listen on and its command prefix.
    fn place(&mut self, name: &str, k: u64) -> (String, Vec<String>) {
        match &self.net {
            Some(net) => {
                let host = net.add_host(u8::try_from(k).expect("node number"));
                let out = (host.ip.to_string(), host.command_prefix());
                self.hosts.insert(name.to_string(), host);
                out
            }
            None => ("127.0.0.1".into(), Vec::new()),
        }
    }

    fn net_note(&self) -> String {
        match &self.net {
            Some(n) => {
                format!(", each process in its own network namespace on a bridge ({}/24)", n.gateway_ip())
            }
            None => String::new(),
        }
    }

    /// Whether processes have their own namespaces (links can be cut and slowed).
    pub fn has_network(&self) -> bool {
        self.net.is_some()
    }

    /// The network namespace of process `name` ("meta1", "cache2", "mount0").
    fn host(&self, name: &str) -> Host {
        self.hosts.get(name).cloned().unwrap_or_else(|| panic!("{name} has no network namespace"))
    }

    fn network(&self) -> &Network {
        self.net.as_ref().expect("this deployment has no network namespaces (see has_network)")
    }

    /// Cuts every link between the processes of `side_a` and those of `side_b` (names as in
    /// [`Self::host`]); packets are dropped silently, both ways. The test process still
    /// reaches everyone.
    pub fn partition(&self, side_a: &[String], side_b: &[String]) {
        self.events.log(&format!("cut every link between {side_a:?} and {side_b:?}"));
        let a: Vec<Host> = side_a.iter().map(|n| self.host(n)).collect();
        let b: Vec<Host> = side_b.iter().map(|n| self.host(n)).collect();
        self.network().partition(&a, &b);
    }

    /// Restores every cut link.
    pub fn heal(&self) {
        self.events.log("heal every link");
        self.network().heal_all();
    }

    /// Caps what process `name` sends at `kbit` kilobits per second (a slow link: its packets
    /// queue up); `None` lifts the cap.
    pub fn throttle(&self, name: &str, kbit: Option<u32>) {
        match kbit {
            Some(k) => self.events.log(&format!("{name}: outgoing link capped at {k} kbit/s")),
            None => self.events.log(&format!("{name}: outgoing link at full speed again")),
        }
        self.network().throttle(&self.host(name), kbit);
    }

    /// Every process name, for building partition sides.
    pub fn names(&self) -> Vec<String> {
        let metas = self.metas.iter().map(|m| format!("meta{}", m.id));
        let caches = self.caches.iter().map(|c| format!("cache{}", c.id));
        let mounts = (0..self.mounts.len()).map(|i| format!("mount{i}"));
        metas.chain(caches).chain(mounts).chain(self.s3.iter().map(|_| "s3".to_string())).collect()
    }

    /// Waits until a node other than `old` leads, as seen by a majority of the voters
    /// (an isolated old leader may still believe it leads); returns its id.
    pub async fn wait_new_leader(&self, old: u64, timeout: Duration) -> u64 {
        let c = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            let st = crate::statuses(&c, &self.meta_addrs).await;
            for s in &st {
                let agree = st.iter().filter(|o| o.leader_id == s.node_id).count();
                if s.role == "leader" && s.node_id != old && agree * 2 > self.metas.len() {
                    return s.node_id;
                }
            }
            assert!(Instant::now() < deadline, "no new leader in place of {old}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until metadata node `id` has applied everything the leader had committed when
    /// the wait began.
    pub async fn wait_caught_up(&self, id: u64, timeout: Duration) {
        let c = self.client();
        let leader = self.wait_new_leader(0, timeout).await;
        let la = self.metas.iter().find(|m| m.id == leader).map(|m| m.addr.clone()).unwrap_or_default();
        let target = c.status_of(&la).await.map(|s| s.commit_index).unwrap_or(0);
        let addr = self.metas.iter().find(|m| m.id == id).map(|m| m.addr.clone()).unwrap_or_default();
        crate::wait_status(&c, &addr, timeout, |s| s.applied_index >= target)
            .await
            .unwrap_or_else(|| panic!("metadata node {id} did not catch up\n{}", self.logs()));
        self.events.log(&format!("metadata node {id} caught up (applied index {target})"));
    }

    pub fn client(&self) -> MetaClient {
        MetaClient::connect(&self.meta_addrs, ClientConfig::default()).expect("client")
    }

    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.mounts.iter().map(|m| m.mountpoint.clone()).collect()
    }

    /// The current metadata leader's node id.
    pub async fn leader(&self) -> u64 {
        let c = self.client();
        wait_leader(&c, &self.meta_addrs, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("no metadata leader\n{}", self.logs()))
            .node_id
    }

    /// Waits until exactly the cache nodes `want` are alive in the registry.
    pub async fn wait_cache_nodes(&self, want: &[u64], timeout: Duration) {
        let c = self.client();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(n) = c.cache_nodes().await
                && want.iter().all(|id| n.iter().any(|x| x.id == *id && x.alive))
            {
                return;
            }
            assert!(Instant::now() < deadline, "cache nodes {want:?} not alive\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn meta(&mut self, id: u64) -> &mut MetaProc {
        self.metas.iter_mut().find(|m| m.id == id).expect("no such metadata node")
    }

    pub fn cache(&mut self, id: u64) -> &mut MetaProc {
        self.caches.iter_mut().find(|m| m.id == id).expect("no such cache node")
    }

    pub fn kill9_meta(&mut self, id: u64) {
        self.events.log(&format!("kill -9 metadata node {id}"));
        self.meta(id).kill9();
    }

    pub fn restart_meta(&mut self, id: u64) {
        self.events.log(&format!("restart metadata node {id}"));
        self.meta(id).restart();
    }

    /// SIGSTOP (a hung node) or SIGCONT.
    pub fn pause_meta(&mut self, id: u64, paused: bool) {
        self.events.log(&format!("{} metadata node {id}", if paused { "SIGSTOP" } else { "SIGCONT" }));
        self.meta(id).signal(if paused { "STOP" } else { "CONT" });
    }

    pub fn kill9_cache(&mut self, id: u64) {
        self.events.log(&format!("kill -9 cache node {id}"));
        self.cache(id).kill9();
    }

    /// Restarts a cache node; with `wipe`, on an empty data directory (a replaced disk), and
    /// waits until the metadata service knows it as a new incarnation (its old copies are
    /// then gone from every holder list).
    pub async fn restart_cache(&mut self, id: u64, wipe: bool) {
        self.events.log(&format!("restart cache node {id}{}", if wipe { " with a wiped disk" } else { "" }));
        let c = self.client();
        let incarnation =
            |nodes: &[elea_fsm::CacheNodeInfo]| nodes.iter().find(|n| n.id == id).map(|n| n.incarnation);
        let before = c.cache_nodes().await.ok().and_then(|n| incarnation(&n));
        let p = self.cache(id);
        p.kill9();
        if wipe {
            let _ = std::fs::remove_dir_all(&p.dir);
        }
        p.restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(n) = c.cache_nodes().await
                && n.iter().any(|x| x.id == id && x.alive)
                && (!wipe || incarnation(&n) != before)
            {
                break;
            }
            assert!(Instant::now() < deadline, "cache node {id} did not come back\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.events.log(&format!("cache node {id} is registered again"));
    }

    /// A rolling restart: every metadata node, then every cache node, then every mount, one
    /// at a time, each stopped with SIGTERM (a clean stop) and started again, waiting for it to
    /// be back in service before the next: a metadata node caught up with the leader, a cache
    /// node registered, a mount mounted.
    pub async fn rolling_restart(&mut self) {
        let c = self.client();
        for i in 0..self.metas.len() {
            let (id, addr) = (self.metas[i].id, self.metas[i].addr.clone());
            self.events.log(&format!("rolling: SIGTERM metadata node {id}"));
            let clean = self.metas[i].terminate(Duration::from_secs(20)).is_some_and(|s| s.success());
            assert!(clean, "metadata node {id} did not stop cleanly\n{}", self.logs());
            self.metas[i].restart();
            let leader = self.leader().await;
            let la = self.meta(leader).addr.clone();
            let target = c.status_of(&la).await.map(|s| s.commit_index).unwrap_or(0);
            crate::wait_status(&c, &addr, Duration::from_secs(30), |s| s.applied_index >= target)
                .await
                .unwrap_or_else(|| panic!("metadata node {id} did not catch up\n{}", self.logs()));
            self.events.log(&format!("rolling: metadata node {id} is back and caught up"));
        }
        for i in 0..self.caches.len() {
            let id = self.caches[i].id;
            let before = self.caches[i].log_count("cache node registered");
            self.events.log(&format!("rolling: SIGTERM cache node {id}"));
            let clean = self.caches[i].terminate(Duration::from_secs(20)).is_some_and(|s| s.success());
            assert!(clean, "cache node {id} did not stop cleanly\n{}", self.logs());
            self.caches[i].restart();
            // Back once the new process has registered (and serves); the registry cannot tell,
            // the old registration of the same incarnation stays alive across the restart.
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.caches[i].log_count("cache node registered") <= before {
                assert!(Instant::now() < deadline, "cache node {id} did not register again\n{}", self.logs());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.events.log(&format!("rolling: cache node {id} is back"));
        }
        for i in 0..self.mounts.len() {
            self.events.log(&format!("rolling: SIGTERM mount {i}"));
            self.mount_gen[i].fetch_add(1, Ordering::SeqCst);
            let clean = self.mounts[i].terminate(Duration::from_secs(20)).is_some_and(|s| s.success());
            assert!(clean, "mount {i} did not stop cleanly\n{}", self.logs());
            self.mounts[i].restart();
            self.mount_gen[i].fetch_add(1, Ordering::SeqCst);
            self.events.log(&format!("rolling: mount {i} is back"));
        }
    }

    /// kill -9 of every process at once (mounts included; their mount points are detached).
    pub fn kill9_everything(&mut self) {
        self.events.log("kill -9 of every process");
        for (i, m) in self.mounts.iter_mut().enumerate() {
            self.mount_gen[i].fetch_add(1, Ordering::SeqCst);
            m.crash();
        }
        for c in &mut self.caches {
            c.kill9();
        }
        for m in &mut self.metas {
            m.kill9();
        }
    }

    /// Starts every process again after [`Self::kill9_everything`] (metadata, cache nodes,
    /// then the mounts).
    pub async fn restart_everything(&mut self) {
        self.events.log("restart every process");
        for m in &mut self.metas {
            m.restart();
        }
        self.leader().await;
        for c in &mut self.caches {
            c.restart();
        }
        let want: Vec<u64> = (1..=self.cfg.caches).collect();
        self.wait_cache_nodes(&want, Duration::from_secs(30)).await;
        for (i, m) in self.mounts.iter_mut().enumerate() {
            if self.mount_gen[i].load(Ordering::SeqCst).is_multiple_of(2) {
                self.mount_gen[i].fetch_add(1, Ordering::SeqCst);
            }
            m.restart();
            self.mount_gen[i].fetch_add(1, Ordering::SeqCst);
        }
        self.events.log("every process is back");
    }

    /// Waits until every staged block that is not tiered has at least `replicas` holders in
    /// metadata, each a registered node; returns how long that took (`None`: not within
    /// `timeout`). A node that comes back with a wiped disk leaves every holder list when it
    /// registers again, and one declared dead is replaced by re-replication, so a listed
    /// holder is a copy. Holders are not required to be alive at the instant of a check: under
    /// load on two cores a heartbeat can be late for a moment, and every block of that node
    /// would then count one copy short although nothing was lost (such moments are logged).
    pub async fn wait_redundancy(&self, replicas: usize, timeout: Duration) -> Option<Duration> {
        let c = self.client();
        let t0 = Instant::now();
        let mut noted = Instant::now();
        while t0.elapsed() < timeout {
            if let (Ok(nodes), Ok(blocks)) = (c.cache_nodes().await, c.staged_blocks().await) {
                let known = |id: &u64| nodes.iter().any(|n| n.id == *id);
                let alive = |id: &u64| nodes.iter().any(|n| n.id == *id && n.alive);
                let short =
                    blocks.iter().filter(|b| b.nodes.iter().filter(|n| known(n)).count() < replicas).count();
                if short == 0 {
                    return Some(t0.elapsed());
                }
                if noted.elapsed() >= Duration::from_secs(10) {
                    noted = Instant::now();
                    let short_live = blocks
                        .iter()
                        .filter(|b| b.nodes.iter().filter(|n| alive(n)).count() < replicas)
                        .count();
                    self.events.log(&format!(
                        "{short} of {} staged blocks have fewer than {replicas} holders ({short_live} fewer live ones)",
                        blocks.len()
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// Waits until every block that was staged with fewer than `replicas` holders when called
    /// (the blocks that lost a copy) has at least `replicas` again, or left staging; returns
    /// how long that took. Blocks written later are not waited for: under continuous load a
    /// few fresh blocks are seen short at any moment (see docs/RELIABILITY.md), and a check of
    /// every block at one instant then passes only by luck. How many are short is logged.
    pub async fn wait_redundancy_of_short(&self, replicas: usize, timeout: Duration) -> Option<Duration> {
        let c = self.client();
        let t0 = Instant::now();
        let holders = |b: &elea_fsm::StagedBlock, nodes: &[elea_fsm::CacheNodeInfo]| {
            b.nodes.iter().filter(|n| nodes.iter().any(|x| x.id == **n)).count()
        };
        let short: std::collections::BTreeSet<(u64, u32)> = loop {
            if let (Ok(nodes), Ok(blocks)) = (c.cache_nodes().await, c.staged_blocks().await) {
                break blocks
                    .iter()
                    .filter(|b| holders(b, &nodes) < replicas)
                    .map(|b| (b.slice, b.index))
                    .collect();
            }
            if t0.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        self.events.log(&format!("{} staged blocks have fewer than {replicas} holders", short.len()));
        let mut noted = Instant::now();
        while t0.elapsed() < timeout {
            if let (Ok(nodes), Ok(blocks)) = (c.cache_nodes().await, c.staged_blocks().await) {
                let still = blocks
                    .iter()
                    .filter(|b| short.contains(&(b.slice, b.index)) && holders(b, &nodes) < replicas)
                    .count();
                if still == 0 {
                    let others = blocks.iter().filter(|b| holders(b, &nodes) < replicas).count();
                    self.events.log(&format!(
                        "all of them have {replicas} again ({others} blocks written since are short now)"
                    ));
                    return Some(t0.elapsed());
                }
                if noted.elapsed() >= Duration::from_secs(10) {
                    noted = Instant::now();
                    self.events.log(&format!("{still} of them are still short"));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// Where the logs, data and `events.log` are (removed when the topology is dropped,
    /// unless `CHAOS_KEEP=1`).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Every process's log tail and the event record, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.metas {
            out += &format!("--- meta {} ---\n{}\n", m.id, m.log_tail());
        }
        for c in &self.caches {
            out += &format!("--- cache {} ---\n{}\n", c.id, c.log_tail());
        }
        for (i, m) in self.mounts.iter().enumerate() {
            out += &format!("--- mount {i} ---\n{}\n", m.log_tail());
        }
        if let Some(s3) = &self.s3 {
            out += &format!("--- S3 server ---\n{}\n", s3.log_tail());
        }
        out += "--- events ---\n";
        out += &self.events.lines().join("\n");
        out
    }
}

// ---- object store and disks ---------------------------------------------------------------

/// The S3 server's bucket.
const S3_BUCKET: &str = "elea";

/// The `elea-s3-test-server` binary: `$ELEA_S3_SERVER_BIN`, or the one in this test
/// executable's target directory (`cargo build -p elea-integration` builds it, and so does
/// `cargo test -p elea-integration`).
pub fn s3_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ELEA_S3_SERVER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("elea-s3-test-server");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p elea-integration` first (or set ELEA_S3_SERVER_BIN)",
        bin.display()
    );
    bin
}

/// An `elea-s3-test-server` process (an S3 protocol server over a local directory) on a
/// fixed port, so that it can be stopped and brought back where clients expect it.
pub struct S3Proc {
    /// The address it listens on (its namespace's, or 127.0.0.1).
    pub ip: String,
    pub port: u16,
    /// Command prefix (its network namespace).
    wrap: Vec<String>,
    /// Objects are files under `root/elea/`.
    pub root: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl S3Proc {
    /// Starts the server and waits (up to 10 s) until it accepts connections.
    pub fn start(root: &Path, ip: &str, port: u16, log: &Path, wrap: &[String]) -> Self {
        let mut p = Self {
            ip: ip.to_string(),
            port,
            wrap: wrap.to_vec(),
            root: root.to_path_buf(),
            child: None,
            log: log.to_path_buf(),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut cmd = match self.wrap.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(s3_server_bin());
                c
            }
            None => Command::new(s3_server_bin()),
        };
        let child = cmd
            .arg("--root")
            .arg(&self.root)
            .args(["--bucket", S3_BUCKET, "--host", &self.ip, "--port", &self.port.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn elea-s3-test-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((self.ip.as_str(), self.port)).is_err() {
            let running = self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
            assert!(
                running && Instant::now() < deadline,
                "the S3 server did not start on port {}: {}",
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The store URL of the volume (prefix `data`).
    pub fn url(&self) -> String {
        format!("s3://{S3_BUCKET}/data?endpoint=http://{}:{}&region=us-east-1", self.ip, self.port)
    }

    /// The credentials every process that opens the store needs.
    pub fn env() -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), S3TestServer::ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), S3TestServer::SECRET_KEY.into()),
        ]
    }

    /// SIGKILL: connections are reset and refused until [`Self::restart`].
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and root.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Sends a signal by name ("STOP", "CONT").
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").arg(format!("-{sig}")).arg(c.id().to_string()).status();
        }
    }

    /// Objects stored under the volume's prefix (each is one file; the server keeps its
    /// temporary and internal files elsewhere).
    pub fn objects(&self) -> usize {
        fn count(dir: &Path) -> usize {
            let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
            rd.flatten()
                .map(|e| {
                    let p = e.path();
                    if p.is_dir() {
                        count(&p)
                    } else {
                        usize::from(!e.file_name().to_string_lossy().starts_with('.'))
                    }
                })
                .sum()
        }
        count(&self.root.join(S3_BUCKET).join("data"))
    }

    pub fn log_tail(&self) -> String {
        crate::log_tail(&self.log)
    }
}

impl Drop for S3Proc {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        self.kill9();
    }
}

/// A tmpfs mounted on a directory (a small disk), unmounted when dropped.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` on `path` (created); needs root.
    pub fn mount(path: &Path, bytes: u64) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs on {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Self { path: path.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if crate::is_mounted(&self.path) {
            // Lazy: a process that still holds a file there must not keep the mount alive.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

impl Topology {
    /// Starts what [`TopologyConfig::store`] and [`TopologyConfig::small_disks`] ask for,
    /// before the cache nodes.
    fn start_store_and_disks(&mut self) {
        if self.cfg.store == StoreKind::S3 {
            let port = free_port();
            let root = self.dir.path().join("s3");
            let (ip, wrap) = self.place("s3", S3_K);
            self.s3 = Some(S3Proc::start(&root, &ip, port, &self.dir.path().join("s3.log"), &wrap));
            self.events.log(&format!("started the S3 server at {ip}:{port}"));
        }
        for (id, bytes) in self.cfg.small_disks.clone() {
            let d = self.dir.path().join(format!("cache{id}"));
            let m = Tmpfs::mount(&d, bytes).unwrap_or_else(|e| panic!("cache node {id}: {e}"));
            self.small_disks.push(m);
            self.events.log(&format!("cache node {id}: data directory on a tmpfs of {} MiB", bytes >> 20));
        }
    }

    /// Environment variables of every process that opens the volume's store.
    fn store_env(&self) -> Vec<(String, String)> {
        if self.s3.is_some() { S3Proc::env() } else { Vec::new() }
    }

    /// The volume's store URL.
    fn store_url(&self) -> String {
        match &self.s3 {
            Some(s3) => s3.url(),
            None => {
                let store = self.dir.path().join("objects");
                std::fs::create_dir_all(&store).expect("store dir");
                format!("file://{}", store.display())
            }
        }
    }

    fn s3(&mut self) -> &mut S3Proc {
        self.s3.as_mut().expect("the topology has no S3 server (TopologyConfig::store)")
    }

    /// An object store outage: with `down`, kill -9 of the S3 server (connections reset, then
    /// refused); otherwise it starts again on the same port and data.
    pub fn store_outage(&mut self, down: bool) {
        if down {
            self.events.log("object store down (kill -9 of the S3 server)");
            self.s3().kill9();
        } else {
            self.events.log("object store: restarting the S3 server");
            self.s3().restart();
            self.events.log("object store back");
        }
    }

    /// A hung object store: with `hung`, SIGSTOP of the S3 server (the kernel still accepts
    /// connections, nothing answers); otherwise SIGCONT.
    pub fn store_hang(&mut self, hung: bool) {
        self.events.log(&format!("object store {} (S3 server)", if hung { "SIGSTOP" } else { "SIGCONT" }));
        self.s3().signal(if hung { "STOP" } else { "CONT" });
    }

    /// Objects in the S3 server under the volume's prefix.
    pub fn store_objects(&self) -> usize {
        self.s3.as_ref().map_or(0, S3Proc::objects)
    }

    /// Blocks committed and not tiered yet (deleted slices excluded).
    pub async fn staged_blocks(&self) -> Vec<elea_fsm::StagedBlock> {
        let c = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.staged_blocks().await {
                Ok(b) => return b,
                Err(e) => assert!(Instant::now() < deadline, "staged blocks: {e}\n{}", self.logs()),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until none of `blocks` (slice, index) is staged any more (each was tiered, or
    /// its file deleted); returns how long that took (`None`: not within `timeout`).
    pub async fn wait_tiered(&self, blocks: &[(u64, u32)], timeout: Duration) -> Option<Duration> {
        let c = self.client();
        let want: std::collections::HashSet<(u64, u32)> = blocks.iter().copied().collect();
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(staged) = c.staged_blocks().await
                && !staged.iter().any(|b| want.contains(&(b.slice, b.index)))
            {
                return Some(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    fn small_disk(&self, id: u64) -> &Path {
        let want = self.dir.path().join(format!("cache{id}"));
        &self.small_disks.iter().find(|d| d.path == want).expect("cache node has no small disk").path
    }

    /// Fills cache node `id`'s small disk: writes a filler file until the disk is full.
    /// Returns the bytes written.
    pub fn fill_disk(&self, id: u64) -> u64 {
        let path = self.small_disk(id).join("filler");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("filler");
        let chunk = vec![0xa5u8; 64 << 10];
        let mut n = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        self.events.log(&format!("cache node {id}: disk full ({} MiB of filler written)", n >> 20));
        n
    }

    /// Frees cache node `id`'s small disk: removes the filler file.
    pub fn free_disk(&self, id: u64) {
        let path = self.small_disk(id).join("filler");
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
        self.events.log(&format!("cache node {id}: filler removed, the disk has room again"));
    }

    /// Reads up to `n` of the staged blocks metadata lists on cache node `id` from that node
    /// alone (no peers, no store). Returns (blocks tried, blocks read and checked, first
    /// error).
    pub async fn read_staged_from(&self, id: u64, n: usize) -> (usize, usize, Option<String>) {
        let addr = self.caches.iter().find(|c| c.id == id).expect("no such cache node").addr.clone();
        let blocks: Vec<_> =
            self.staged_blocks().await.into_iter().filter(|b| b.nodes.contains(&id)).take(n).collect();
        let clients = elea_cache::client::BlockClients::default();
        let (mut ok, mut first_err) = (0, None);
        for b in &blocks {
            let req = elea_cache::proto::GetRequest {
                block: Some(elea_cache::proto::BlockRef { vol: b.vol, slice: b.slice, index: b.index }),
                len: b.len,
                tiered_stores: vec![],
                peers: Vec::new(),
                cache: false,
                range: None,
            };
            match clients.get(&addr, req).await {
                Ok(d) if d.len() == b.len as usize => ok += 1,
                Ok(d) => {
                    first_err.get_or_insert(format!("block {}/{}: {} bytes", b.slice, b.index, d.len()));
                }
                Err(e) => {
                    first_err.get_or_insert(format!("block {}/{}: {e}", b.slice, b.index));
                }
            }
        }
        (blocks.len(), ok, first_err)
    }
}

// ---- content ------------------------------------------------------------------------------

const MAGIC: &[u8; 4] = b"ELEA";
const HEADER: usize = 24;

/// Self-describing content: magic, file id, version, total length, crc32c of the body, then a
/// body derived from (id, version).
pub fn content(id: u64, version: u32, len: usize) -> Vec<u8> {
    let len = len.max(HEADER);
    let body = elea_common::pattern::pattern(id.wrapping_mul(1_000_003) ^ u64::from(version), len - HEADER);
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    v.extend_from_slice(&body);
    v
}

/// The (id, version) of complete, intact content; an error says what is wrong with it.
pub fn parse_content(b: &[u8]) -> Result<(u64, u32), String> {
    if b.len() < HEADER || &b[..4] != MAGIC {
        return Err(format!("{} bytes without a valid header", b.len()));
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let id = u64::from_le_bytes(b[4..12].try_into().unwrap_or_default());
    let (version, len, crc) = (u32_at(12), u32_at(16) as usize, u32_at(20));
    if len != b.len() {
        return Err(format!("file {id} v{version}: header says {len} bytes, read {}", b.len()));
    }
    if crc32c::crc32c(&b[HEADER..]) != crc {
        return Err(format!("file {id} v{version}: body does not match its checksum"));
    }
    Ok((id, version))
}

// ---- workload -----------------------------------------------------------------------------

/// One application call and what came of it.
#[derive(Debug, Clone)]
pub struct Call {
    pub who: String,
    pub op: String,
    pub start: Duration,
    pub end: Duration,
    /// `None`: success; otherwise the error.
    pub error: Option<String>,
}

/// What the checker expects of one logical file at the end.
#[derive(Debug, Clone, Default)]
struct FileFate {
    /// Acceptable final (path, version) states; `None` path = deleted.
    outcomes: Vec<(Option<String>, u32)>,
}

/// Per-path state shared between writers and readers (which pick acknowledged paths).
#[derive(Debug, Clone)]
struct PathState {
    /// Whether a write of this path has been acknowledged.
    acked: bool,
    /// Whether a move or unlink of this path began (the file may be gone from then on).
    leaving: bool,
}

#[derive(Default)]
struct Shared {
    paths: BTreeMap<String, PathState>,
    fates: BTreeMap<u64, FileFate>,
    calls: Vec<Call>,
    violations: Vec<String>,
    /// Paths that an acknowledged rename or unlink took away (never reused).
    gone: Vec<String>,
    /// Every write and read of every path, for the linearizability check.
    history: History,
    /// Records of the shared append log, as (appender, sequence number): every one whose
    /// write was attempted, and those acknowledged (written and fsynced under the lock).
    append_tried: BTreeSet<(u32, u64)>,
    appended: BTreeSet<(u32, u64)>,
    /// Waiting `F_SETLKW` calls that returned errno 512 (see [`appender`]).
    lock_errno_512: u64,
}

impl Shared {
    /// Records a write of `path` by `who` that began at `start` (`end` is `None` when the call
    /// failed and its effect is unknown).
    fn wrote(&mut self, who: &str, path: &str, value: Value, start: Duration, end: Option<Duration>) {
        self.history.write(path, history::Write { value, start, end, who: who.to_string() });
    }
}

/// Writers and readers running on mounts until stopped.
pub struct Workload {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    shared: Arc<Mutex<Shared>>,
    events: Arc<Events>,
    mounts: Vec<PathBuf>,
}

/// What a workload did, and what the checker found.
#[derive(Debug)]
pub struct Report {
    pub acked: BTreeMap<String, u64>,
    pub errors: Vec<Call>,
    pub longest_call: Duration,
    pub reads_checked: u64,
    pub violations: Vec<String>,
    pub files_checked: usize,
    /// Every call, in the order recorded.
    pub all_calls: Vec<Call>,
    /// Acknowledged operations whose effect is missing at the end (must be 0).
    pub lost: usize,
    /// Acknowledged records of the shared append log (each checked through every mount).
    pub records_appended: usize,
    /// Waiting `F_SETLKW` calls that returned errno 512 (ERESTARTSYS) and were retried (the
    /// checks require none).
    pub lock_errno_512: u64,
}

impl Report {
    /// Prints the summary and the first failed calls, then fails the test (with `logs()`
    /// appended) on any violation or lost acknowledged operation, on a load too light to have
    /// shown anything, or on a waiting lock request that leaked the kernel's restart code.
    pub fn assert_clean(&self, name: &str, logs: impl FnOnce() -> String) {
        println!("{name}: {}", self.summary());
        for e in self.errors.iter().take(20) {
            println!(
                "  {} {} failed after {:?} at {:?}: {:?}",
                e.who,
                e.op,
                e.end - e.start,
                e.start,
                e.error
            );
        }
        assert!(
            self.violations.is_empty() && self.lost == 0,
            "{name}: {} violations, {} lost:\n{}\n{}",
            self.violations.len(),
            self.lost,
            self.violations.iter().take(30).cloned().collect::<Vec<_>>().join("\n"),
            logs()
        );
        assert!(
            self.acked.values().sum::<u64>() > 20,
            "{name}: too little was acknowledged: {:?}",
            self.acked
        );
        assert!(self.reads_checked > 10, "{name}: too few reads were checked ({})", self.reads_checked);
        assert!(
            self.records_appended > 5,
            "{name}: too few records were appended ({})",
            self.records_appended
        );
        assert_eq!(self.lock_errno_512, 0, "{name}: F_SETLKW failed with errno 512");
    }

    /// Acknowledged calls that ended after `t`: service went on.
    pub fn acked_after(&self, t: Duration) -> usize {
        self.all_calls.iter().filter(|c| c.error.is_none() && c.end > t).count()
    }

    pub fn summary(&self) -> String {
        let mut slow: Vec<&Call> = self.all_calls.iter().collect();
        slow.sort_by_key(|c| std::cmp::Reverse(c.end - c.start));
        let slow: Vec<String> = slow
            .iter()
            .take(3)
            .map(|c| format!("{} {} {:?} from {:?}", c.who, c.op, c.end - c.start, c.start))
            .collect();
        format!(
            "acknowledged {:?}; {} failed calls (longest {:?}); longest call {:?}; {} reads checked; \
             {} files and {} appended records checked at the end; {} lock waits answered errno 512 \
             (retried); {} lost; {} violations; slowest calls: {}",
            self.acked,
            self.errors.len(),
            self.errors.iter().map(|c| c.end - c.start).max().unwrap_or_default(),
            self.longest_call,
            self.reads_checked,
            self.files_checked,
            self.records_appended,
            self.lock_errno_512,
            self.lost,
            self.violations.len(),
            slow.join(", "),
        )
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn errno_of(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("errno {n} ({e})"),
        None => e.to_string(),
    }
}

/// Writes a whole file durably: create (exclusive), write, fsync, close.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl Workload {
    /// Starts `writers` writers (writer `w` on mount `w % n`, in its own directory),
    /// `readers` readers (on the mounts after their writers'), file sizes up to `max_len`, and
    /// one appender per mount on the shared append log.
    pub fn start(t: &Topology, writers: usize, readers: usize, max_len: usize) -> Self {
        Self::on_mounts(t.mount_points(), t.events.clone(), t.mount_gen.clone(), writers, readers, max_len)
    }

    /// [`Workload::start`] on mounts of one volume that a harness other than [`Topology`]
    /// started. `mount_gen[m]` is odd while mount `m` is being restarted (a reader that
    /// failed meanwhile is not counted as a failure of the file system).
    pub fn on_mounts(
        mounts: Vec<PathBuf>,
        events: Arc<Events>,
        mount_gen: Arc<Vec<AtomicU64>>,
        writers: usize,
        readers: usize,
        max_len: usize,
    ) -> Self {
        assert_eq!(mounts.len(), mount_gen.len(), "one generation counter per mount");
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let mut threads = Vec::new();
        File::create(mounts[0].join(APPEND_LOG)).and_then(|f| f.sync_all()).expect("append log");
        for (a, root) in mounts.iter().enumerate() {
            let (stop, shared, events, root) = (stop.clone(), shared.clone(), events.clone(), root.clone());
            threads.push(std::thread::spawn(move || appender(a as u32, &root, stop, shared, events)));
        }
        for w in 0..writers {
            let dir = mounts[w % mounts.len()].join(format!("w{w}"));
            std::fs::create_dir_all(&dir).expect("writer directory");
            let (stop, shared, events) = (stop.clone(), shared.clone(), events.clone());
            let root = mounts[w % mounts.len()].clone();
            threads.push(std::thread::spawn(move || writer(w, &root, stop, shared, events, max_len)));
        }
        for r in 0..readers {
            let m = (r + 1) % mounts.len();
            let mount = mounts[m].clone();
            let (stop, shared, events, gens) =
                (stop.clone(), shared.clone(), events.clone(), mount_gen.clone());
            threads.push(std::thread::spawn(move || {
                reader(r, &mount, stop, shared, events, move || gens[m].load(Ordering::SeqCst))
            }));
        }
        events.log(&format!(
            "workload started: {writers} writers, {readers} readers, {} appenders",
            mounts.len()
        ));
        Self { stop, threads, shared, events, mounts }
    }

    /// Stops the workload, then checks the final tree through every mount in turn.
    pub fn finish(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.events.log("workload stopped; checking");
        let sh = std::mem::take(&mut *self.shared.lock().unwrap_or_else(|p| p.into_inner()));
        let mut violations = sh.violations;
        // Every read of every path against every write of it: linearizable registers.
        violations.extend(sh.history.check());
        let mut lost = 0;
        for (i, (id, fate)) in sh.fates.iter().enumerate() {
            let mount = &self.mounts[i % self.mounts.len()];
            let mut seen = Vec::new();
            let ok = fate.outcomes.iter().any(|(path, version)| match path {
                Some(p) => match std::fs::read(mount.join(p)) {
                    Ok(b) => {
                        let got = parse_content(&b);
                        seen.push(format!("{p}: {got:?}"));
                        got == Ok((*id, *version))
                    }
                    Err(e) => {
                        seen.push(format!("{p}: {}", errno_of(&e)));
                        false
                    }
                },
                None => true,
            });
            // Unless deleting it was one of the possible outcomes, it must be found.
            if !ok && !fate.outcomes.iter().any(|(p, _)| p.is_none()) {
                lost += 1;
                violations.push(format!("file {id}: expected one of {:?}; found {seen:?}", fate.outcomes));
            }
        }
        for (i, p) in sh.gone.iter().enumerate() {
            let mount = &self.mounts[i % self.mounts.len()];
            if mount.join(p).exists() {
                lost += 1;
                violations.push(format!("{p}: renamed away or deleted (acknowledged), yet it exists"));
            }
        }
        for mount in &self.mounts {
            let (v, missing) = check_append_log(mount, &sh.append_tried, &sh.appended);
            violations.extend(v);
            lost += missing;
        }
        let mut acked: BTreeMap<String, u64> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut longest = Duration::ZERO;
        for c in &sh.calls {
            longest = longest.max(c.end - c.start);
            if c.error.is_some() {
                errors.push(c.clone());
            } else {
                *acked.entry(c.op.clone()).or_default() += 1;
            }
        }
        Report {
            acked,
            errors,
            longest_call: longest,
            reads_checked: sh.history.reads() as u64,
            violations,
            files_checked: sh.fates.len(),
            lost,
            records_appended: sh.appended.len(),
            lock_errno_512: sh.lock_errno_512,
            all_calls: sh.calls,
        }
    }
}

fn writer(
    w: usize,
    root: &Path,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
    events: Arc<Events>,
    max_len: usize,
) {
    let mut rng = Rng(0x9e37_79b9 ^ (w as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
    let who = format!("writer {w}");
    let dir = format!("w{w}");
    // Files this writer still owns: (path, id, version).
    let mut live: Vec<(String, u64, u32)> = Vec::new();
    let mut next = 0u64;
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    while !stop.load(Ordering::Relaxed) {
        let choice = if live.is_empty() { 0 } else { rng.below(10) };
        let len = 24 + rng.below(max_len as u64) as usize;
        let start = events.now();
        let (op, result) = match choice {
            0..=4 => {
                // A new file.
                next += 1;
                let id = ((w as u64) << 32) | next;
                let path = format!("{dir}/f{next}");
                lock().paths.insert(path.clone(), PathState { acked: false, leaving: false });
                let r = write_file(&root.join(&path), &content(id, 1, len));
                let mut sh = lock();
                let end = r.is_ok().then(|| events.now());
                sh.wrote(&who, &path, Some((id, 1)), start, end);
                let fate = sh.fates.entry(id).or_default();
                match &r {
                    Ok(()) => {
                        fate.outcomes = vec![(Some(path.clone()), 1)];
                        if let Some(s) = sh.paths.get_mut(&path) {
                            s.acked = true;
                        }
                        live.push((path, id, 1));
                    }
                    Err(_) => {
                        // It may exist or not: the checker does not insist on it.
                        fate.outcomes = vec![(Some(path.clone()), 1), (None, 0)];
                        sh.paths.remove(&path);
                    }
                }
                ("create", r)
            }
            5..=6 => {
                // Replace atomically: a temporary file, fsynced, renamed over the old one.
                let i = rng.below(live.len() as u64) as usize;
                let (path, id, version) = live[i].clone();
                let v = version + 1;
                let tmp = format!("{dir}/tmp{next}-{v}");
                next += 1;
                let r = write_file(&root.join(&tmp), &content(id, v, len))
                    .and_then(|()| std::fs::rename(root.join(&tmp), root.join(&path)));
                let mut sh = lock();
                let end = r.is_ok().then(|| events.now());
                sh.wrote(&who, &path, Some((id, v)), start, end);
                match &r {
                    Ok(()) => {
                        if let Some(s) = sh.paths.get_mut(&path) {
                            s.acked = true;
                        }
                        sh.fates.entry(id).or_default().outcomes = vec![(Some(path.clone()), v)];
                        sh.gone.push(tmp.clone());
                        live[i].2 = v;
                    }
                    Err(_) => {
                        sh.fates.entry(id).or_default().outcomes =
                            vec![(Some(path.clone()), version), (Some(path.clone()), v)];
                        live.swap_remove(i);
                    }
                }
                ("replace", r)
            }
            7..=8 => {
                // Move to a new name.
                let i = rng.below(live.len() as u64) as usize;
                let (path, id, version) = live.swap_remove(i);
                next += 1;
                let to = format!("{dir}/f{next}");
                {
                    let mut sh = lock();
                    if let Some(s) = sh.paths.get_mut(&path) {
                        s.leaving = true;
                    }
                    sh.paths.insert(to.clone(), PathState { acked: false, leaving: false });
                }
                let r = std::fs::rename(root.join(&path), root.join(&to));
                let mut sh = lock();
                let end = r.is_ok().then(|| events.now());
                sh.wrote(&who, &path, None, start, end);
                sh.wrote(&who, &to, Some((id, version)), start, end);
                match &r {
                    Ok(()) => {
                        if let Some(s) = sh.paths.get_mut(&to) {
                            s.acked = true;
                        }
                        sh.fates.entry(id).or_default().outcomes = vec![(Some(to.clone()), version)];
                        sh.gone.push(path.clone());
                        live.push((to, id, version));
                    }
                    Err(_) => {
                        sh.fates.entry(id).or_default().outcomes =
                            vec![(Some(path.clone()), version), (Some(to.clone()), version)];
                    }
                }
                ("rename", r)
            }
            _ => {
                let i = rng.below(live.len() as u64) as usize;
                let (path, id, version) = live.swap_remove(i);
                if let Some(s) = lock().paths.get_mut(&path) {
                    s.leaving = true;
                }
                let r = std::fs::remove_file(root.join(&path));
                let mut sh = lock();
                let end = r.is_ok().then(|| events.now());
                sh.wrote(&who, &path, None, start, end);
                if r.is_ok() {
                    sh.gone.push(path.clone());
                }
                sh.fates.entry(id).or_default().outcomes = match &r {
                    Ok(()) => vec![(None, 0)],
                    Err(_) => vec![(Some(path.clone()), version), (None, 0)],
                };
                ("unlink", r)
            }
        };
        let end = events.now();
        let error = result.as_ref().err().map(errno_of);
        let failed = error.is_some();
        if let Some(e) = &error {
            events.log(&format!("{who}: {op} failed after {:?}: {e}", end - start));
        }
        lock().calls.push(Call { who: who.clone(), op: op.into(), start, end, error });
        if failed {
            // Do not spin on a dead mount.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn reader(
    r: usize,
    mount: &Path,
    stop: Arc<AtomicBool>,
    shared: Arc<Mutex<Shared>>,
    events: Arc<Events>,
    mount_gen: impl Fn() -> u64,
) {
    let mut rng = Rng(0x5151_7777 ^ (r as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let who = format!("reader {r}");
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    while !stop.load(Ordering::Relaxed) {
        // An acknowledged path that is not being moved away.
        let pick = {
            let sh = lock();
            let acked: Vec<&String> =
                sh.paths.iter().filter(|(_, s)| s.acked && !s.leaving).map(|(p, _)| p).collect();
            (!acked.is_empty()).then(|| acked[rng.below(acked.len() as u64) as usize].clone())
        };
        let Some(path) = pick else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let start = events.now();
        let gen_before = mount_gen();
        let result = File::open(mount.join(&path)).and_then(|mut f| {
            let mut b = Vec::new();
            f.read_to_end(&mut b).map(|_| b)
        });
        let end = events.now();
        // The mount was down (or restarted) during the read: its directory is not Elea's.
        let outage = !gen_before.is_multiple_of(2) || mount_gen() != gen_before;
        let mut sh = lock();
        let seen = match &result {
            Ok(b) => match parse_content(b) {
                Ok(v) => Some(Some(v)),
                Err(e) => {
                    sh.violations.push(format!("{who}: {path} at {start:?}..{end:?}: {e}"));
                    None
                }
            },
            // Absent: the history check tells whether it may be.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !outage => Some(None),
            Err(e) => {
                let msg = errno_of(e);
                events.log(&format!("{who}: read of {path} failed after {:?}: {msg}", end - start));
                sh.calls.push(Call { who: who.clone(), op: "read".into(), start, end, error: Some(msg) });
                drop(sh);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if let Some(value) = seen {
            sh.history.read(&path, history::Read { value, start, end, who: who.clone() });
        }
        sh.calls.push(Call { who: who.clone(), op: "read".into(), start, end, error: None });
    }
}

// ---- appenders ----------------------------------------------------------------------------

/// The file the appenders share, in the volume's root.
const APPEND_LOG: &str = "append.log";
/// Length of one appended record.
const RECORD: usize = 64;
/// The kernel's "restart this system call" code, which leaks to applications as an errno when
/// no signal is pending.
const ERESTARTSYS: i32 = 512;

/// Record `seq` of appender `a`: magic, appender, sequence number, a body derived from both,
/// and the crc32c of everything before it.
fn record(a: u32, seq: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD);
    r.extend_from_slice(b"APND");
    r.extend_from_slice(&a.to_le_bytes());
    r.extend_from_slice(&seq.to_le_bytes());
    r.extend_from_slice(&elea_common::pattern::pattern((u64::from(a) << 48) ^ seq, RECORD - 20));
    let crc = crc32c::crc32c(&r);
    r.extend_from_slice(&crc.to_le_bytes());
    r
}

/// The (appender, sequence number) of one intact record.
fn parse_record(r: &[u8]) -> Option<(u32, u64)> {
    let (body, crc) = r.split_at_checked(RECORD - 4)?;
    if r.len() != RECORD || &body[..4] != b"APND" || crc32c::crc32c(body).to_le_bytes() != crc {
        return None;
    }
    let a = u32::from_le_bytes(body[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(body[8..16].try_into().ok()?);
    Some((a, seq))
}

/// Checks the append log as `mount` shows it: whole, intact records only (an overlapping or
/// torn append breaks one), each one a record that was written, none twice, each appender's
/// in the order appended; and every acknowledged record there. Returns the violations and
/// how many acknowledged records are missing.
fn check_append_log(
    mount: &Path,
    tried: &BTreeSet<(u32, u64)>,
    acked: &BTreeSet<(u32, u64)>,
) -> (Vec<String>, usize) {
    let path = mount.join(APPEND_LOG);
    let log = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => return (vec![format!("{}: {}", path.display(), errno_of(&e))], acked.len()),
    };
    let mut v = Vec::new();
    if log.len() % RECORD != 0 {
        v.push(format!(
            "{}: {} bytes, not a whole number of {RECORD}-byte records",
            path.display(),
            log.len()
        ));
    }
    let mut seen = BTreeSet::new();
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    for (i, r) in log.chunks(RECORD).enumerate() {
        let at = i * RECORD;
        let Some((a, seq)) = parse_record(r) else {
            v.push(format!("{}: offset {at}: not an intact record (torn or overwritten)", path.display()));
            continue;
        };
        if !tried.contains(&(a, seq)) {
            v.push(format!(
                "{}: offset {at}: record {seq} of appender {a} was never written",
                path.display()
            ));
        }
        if !seen.insert((a, seq)) {
            v.push(format!("{}: offset {at}: record {seq} of appender {a} a second time", path.display()));
        }
        if let Some(prev) = last.insert(a, seq)
            && prev >= seq
        {
            v.push(format!(
                "{}: offset {at}: appender {a}'s record {seq} after its record {prev}",
                path.display()
            ));
        }
    }
    let missing: Vec<&(u32, u64)> = acked.difference(&seen).collect();
    if !missing.is_empty() {
        v.push(format!(
            "{}: {} acknowledged records missing (appender, record): {:?}",
            path.display(),
            missing.len(),
            missing.iter().take(10).collect::<Vec<_>>()
        ));
    }
    (v, missing.len())
}

/// Appender `a`, on the mount at `root`: for each record, opens the shared log with
/// `O_APPEND`, waits for a write lock on the whole file (`F_SETLKW`), writes the record,
/// fsyncs, and closes (which lets the lock go). A record is acknowledged when its write and an
/// fsync succeeded. A failed fsync is retried under the lock for a while: the bytes stay
/// buffered on the mount and a later flush would commit them at the offset they were given,
/// so letting go of the lock with them pending would let them land over a later append.
fn appender(a: u32, root: &Path, stop: Arc<AtomicBool>, shared: Arc<Mutex<Shared>>, events: Arc<Events>) {
    let who = format!("appender {a}");
    let path = root.join(APPEND_LOG);
    let lock = || shared.lock().unwrap_or_else(|p| p.into_inner());
    let call = |op: &str, start: Duration, r: &Result<(), String>| {
        let end = events.now();
        if let Err(e) = r {
            events.log(&format!("{who}: {op} failed after {:?}: {e}", end - start));
        }
        let error = r.as_ref().err().cloned();
        lock().calls.push(Call { who: who.clone(), op: op.into(), start, end, error });
    };
    let whole_file = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let start = events.now();
        let f = match std::fs::OpenOptions::new().append(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                call("open for append", start, &Err(errno_of(&e)));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        // A waiting F_SETLKW must only end when the lock is granted (or a signal came): an
        // EINTR, or the kernel's restart code (errno 512, which reaches an application when
        // a gateway answers EINTR with no signal pending), is counted, retried, and fails
        // the scenario's check.
        let start = events.now();
        let locked = loop {
            let r = nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETLKW(&whole_file));
            let restart = r.is_err() && std::io::Error::last_os_error().raw_os_error() == Some(ERESTARTSYS);
            if restart {
                lock().lock_errno_512 += 1;
            }
            if (restart || r == Err(nix::errno::Errno::EINTR)) && !stop.load(Ordering::Relaxed) {
                continue;
            }
            break r.map(|_| ()).map_err(|e| (restart, e));
        };
        match locked {
            Ok(()) => call("lock", start, &Ok(())),
            // Stopped while waiting.
            Err((true, _) | (false, nix::errno::Errno::EINTR)) => break,
            Err((false, e)) => {
                call("lock", start, &Err(format!("errno {} ({e})", e as i32)));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        seq += 1;
        lock().append_tried.insert((a, seq));
        let start = events.now();
        let wrote = (&f).write_all(&record(a, seq)).map_err(|e| errno_of(&e));
        let mut synced = wrote.clone().and_then(|()| f.sync_all().map_err(|e| errno_of(&e)));
        call("append", start, &synced);
        let until = Instant::now() + Duration::from_secs(10);
        while wrote.is_ok() && synced.is_err() && Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let start = events.now();
            synced = f.sync_all().map_err(|e| errno_of(&e));
            call("fsync of an append", start, &synced);
        }
        if synced.is_ok() {
            lock().appended.insert((a, seq));
        }
        drop(f);
        if synced.is_err() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
