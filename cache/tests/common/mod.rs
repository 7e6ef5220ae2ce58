//! In-process test cluster: one metadata voter, cache nodes, an S3 protocol server.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elea_cache::{CacheNodeConfig, DataClient, DataConfig};
use elea_fsm::VolumeConfig;
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientConfig, MetaClient};
use elea_metadata::server::{MetaNodeConfig, parse_initial_cluster, serve};
use elea_store::StoreConfig;
use elea_store::testing::S3TestServer;
use tokio::sync::oneshot;

pub struct CacheProc {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct TestCluster {
    pub tmp: tempfile::TempDir,
    pub meta_addr: String,
    pub meta: MetaClient,
    pub s3: Option<S3TestServer>,
    pub s3_port: u16,
    pub nodes: Vec<CacheProc>,
    meta_stop: Option<oneshot::Sender<()>>,
}

async fn free_listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

impl TestCluster {
    /// A metadata voter, an S3 server and `n` cache nodes (ids 1..=n, site "a").
    pub async fn start(n: u64) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let l = free_listener().await;
        let meta_addr = l.local_addr().unwrap().to_string();
        let mut cfg = MetaNodeConfig::new(1, meta_addr.clone(), tmp.path().join("meta"));
        cfg.initial_cluster = parse_initial_cluster(&format!("1={meta_addr}")).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = serve(cfg, l, async move {
                let _ = rx.await;
            })
            .await;
        });
        let meta = MetaClient::connect(std::slice::from_ref(&meta_addr), ClientConfig::default()).unwrap();
        let s3 = S3TestServer::start(&tmp.path().join("s3"), "bkt").await.expect("s3");
        let s3_port = s3.port();
        let mut c = TestCluster {
            tmp,
            meta_addr,
            meta,
            s3: Some(s3),
            s3_port,
            nodes: Vec::new(),
            meta_stop: Some(tx),
        };
        for id in 1..=n {
            c.start_node(id).await;
        }
        c.wait_alive(n as usize).await;
        c
    }

    pub fn store_cfg(&self) -> StoreConfig {
        StoreConfig {
            credentials: Some((S3TestServer::ACCESS_KEY.into(), S3TestServer::SECRET_KEY.into())),
            timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(2),
            retries: 1,
            ..StoreConfig::default()
        }
    }

    pub fn store_url(&self) -> String {
        format!("s3://bkt/data?endpoint=http://127.0.0.1:{}&region=us-east-1", self.s3_port)
    }

    pub fn node_cfg(&self, id: u64, addr: &str) -> CacheNodeConfig {
        let mut cfg = CacheNodeConfig::new(
            id,
            "a",
            addr,
            self.tmp.path().join(format!("cache{id}")),
            vec![self.meta_addr.clone()],
        );
        cfg.staging_size = 256 << 20;
        cfg.cache_mem = 64 << 20;
        cfg.heartbeat = Duration::from_millis(200);
        cfg.tier_interval = Duration::from_millis(200);
        cfg.repair_interval = Duration::from_millis(500);
        cfg.gc_interval = Duration::from_millis(300);
        cfg.gc_delay = Duration::from_secs(1);
        cfg.reconcile_interval = Duration::from_millis(500);
        cfg.store_probe_interval = Duration::from_millis(500);
        cfg.stale_grace = Duration::from_secs(1);
        cfg.store = self.store_cfg();
        cfg
    }

    /// Starts node `id` (again, on its data directory, on a new port).
    pub async fn start_node(&mut self, id: u64) {
        self.start_node_with(id, |_| {}).await;
    }

    pub async fn start_node_with(&mut self, id: u64, tweak: impl FnOnce(&mut CacheNodeConfig)) {
        let l = free_listener().await;
        let addr = l.local_addr().unwrap().to_string();
        let mut cfg = self.node_cfg(id, &addr);
        tweak(&mut cfg);
        let dir = cfg.data_dir.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            if let Err(e) = elea_cache::serve(cfg, l, async move {
                let _ = rx.await;
            })
            .await
            {
                panic!("cache node {id} failed: {e}");
            }
        });
        self.nodes.retain(|n| n.id != id);
        self.nodes.push(CacheProc { id, addr, dir, stop: Some(tx), task });
    }

    /// Stops node `id` abruptly (its tasks are dropped; it stops heartbeating).
    pub fn kill_node(&mut self, id: u64) {
        if let Some(i) = self.nodes.iter().position(|n| n.id == id) {
            let n = self.nodes.remove(i);
            n.task.abort();
        }
    }

    pub async fn stop_node(&mut self, id: u64) {
        if let Some(i) = self.nodes.iter().position(|n| n.id == id) {
            let mut n = self.nodes.remove(i);
            if let Some(s) = n.stop.take() {
                let _ = s.send(());
            }
            let _ = n.task.await;
        }
    }

    pub async fn wait_alive(&self, n: usize) {
        wait_until(Duration::from_secs(20), "cache nodes alive", || async {
            self.meta.cache_nodes().await.map(|v| v.iter().filter(|x| x.alive).count() >= n).unwrap_or(false)
        })
        .await;
    }

    pub async fn volume(&self, name: &str, replicas: u8, tier_after_ms: u64) -> u64 {
        let config = VolumeConfig {
            stores: vec![self.store_url()],
            replicas,
            tier_after_ms,
            ..VolumeConfig::default()
        };
        self.meta.create_volume(name, config).await.expect("volume").id
    }

    pub fn data(&self) -> DataClient {
        let mut cfg = DataConfig::new("a");
        cfg.store = self.store_cfg();
        cfg.node_refresh = Duration::from_millis(200);
        DataClient::new(self.meta.clone(), cfg)
    }

    pub fn store(&self) -> elea_store::Store {
        elea_store::Store::open(&self.store_url(), &self.store_cfg()).expect("store")
    }

    /// The block keys of volume `vol` in the store.
    pub async fn stored_keys(&self, vol: u64) -> Vec<elea_store::BlockKey> {
        self.store().list_volume(self.key_tag(vol).await, vol).await.expect("list")
    }

    /// The cluster part of volume `vol`'s object keys.
    pub async fn key_tag(&self, vol: u64) -> u128 {
        use elea_metadata::MetaApi as _;
        let identity = self.meta.data_identity().await.expect("identity");
        elea_fsm::DataIdentity::key_tag(identity.as_ref(), vol)
    }

    pub async fn stop_s3(&mut self) {
        if let Some(s) = self.s3.take() {
            s.stop().await;
        }
    }

    /// With the S3 server stopped (see [`Self::stop_s3`]), a [`DeadStore`] on its port.
    pub async fn dead_store(&self) -> DeadStore {
        DeadStore::start(self.s3_port).await
    }

    pub async fn start_s3(&mut self) {
        let s3 = S3TestServer::start_on(&self.tmp.path().join("s3"), "bkt", self.s3_port)
            .await
            .expect("s3 restart");
        self.s3 = Some(s3);
    }
}

/// Stands in for a stopped S3 server on its port: accepts every connection, records the
/// request line it opens with (`PUT /bkt/data/v1/... HTTP/1.1`) and closes it unanswered. Each
/// request fails as it would against a store that is down, and every attempt shows.
pub struct DeadStore {
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DeadStore {
    async fn start(port: u16) -> Self {
        use tokio::io::AsyncReadExt as _;
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.expect("bind the store's port");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            // Owned here: stopping the task drops every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = l.accept() => {
                        let Ok((mut s, _)) = accepted else { continue };
                        let seen = seen.clone();
                        conns.spawn(async move {
                            let mut head = Vec::new();
                            let mut buf = [0u8; 1024];
                            while !head.contains(&b'\n') && head.len() < 8192 {
                                match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
                                    Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                                    _ => break,
                                }
                            }
                            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
                            let line = String::from_utf8_lossy(line).trim_end().to_string();
                            seen.lock().unwrap().push(line);
                            // Dropped unanswered.
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        DeadStore { requests, task }
    }

    /// The request lines received so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Stops listening and drops every connection; the port is free when this returns.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.task.abort();
        }
        if let Some(s) = self.meta_stop.take() {
            let _ = s.send(());
        }
    }
}

/// Polls `f` until it is true or `limit` passes (then panics naming `what`).
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub use elea_common::pattern::pattern as content;
