//! In-process test cluster for the gateway: one metadata voter, cache nodes and a `file://`
//! object store in a temporary directory, and gateways (a [`Vfs`] with its own metadata and
//! data clients) on it.
//!
//! Each test crate uses part of it.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use elea_cache::{CacheNodeConfig, DataClient, DataConfig, DataPath, MemData};
use elea_common::{Errno, Ino, VolumeId};
use elea_fsm::{Attr, DirEntry, LockInfo, LockKind, StatFs, VolumeConfig};
use elea_gateway::{Creds, SetAttrReq, Vfs, VfsConfig};
use elea_metadata::MetaApi;
use elea_metadata::client::{ClientConfig, MetaClient};
use elea_metadata::mem::MemMeta;
use elea_metadata::server::{MetaNodeConfig, parse_initial_cluster, serve};
use elea_store::StoreConfig;
use tokio::sync::oneshot;

pub struct TestCluster {
    tmp: tempfile::TempDir,
    meta_addr: String,
    meta: MetaClient,
    nodes: Vec<tokio::task::JoinHandle<()>>,
    meta_stop: Option<oneshot::Sender<()>>,
    next_volume: AtomicU64,
    /// How long gateways' writes wait for enough cache nodes (see `DataConfig::node_wait`).
    pub node_wait: Duration,
    /// The largest flush gateways commit inline (see `DataConfig::inline_max`).
    pub inline_max: u32,
}

async fn free_listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind")
}

impl TestCluster {
    /// A metadata voter and `n` cache nodes (ids 1..=n, site "a"), all alive.
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
        std::fs::create_dir_all(tmp.path().join("store")).expect("store dir");
        let mut c = TestCluster {
            tmp,
            meta_addr,
            meta,
            nodes: Vec::new(),
            meta_stop: Some(tx),
            next_volume: AtomicU64::new(0),
            node_wait: Duration::from_secs(2),
            inline_max: elea_fsm::limits::INLINE_MAX,
        };
        for id in 1..=n {
            c.start_node(id).await;
        }
        wait_until(Duration::from_secs(20), "cache nodes alive", || async {
            c.meta
                .cache_nodes()
                .await
                .map(|v| v.iter().filter(|x| x.alive).count() >= n as usize)
                .unwrap_or(false)
        })
        .await;
        c
    }

    fn store_url(&self) -> String {
        format!("file://{}", self.tmp.path().join("store").display())
    }

    fn store_cfg() -> StoreConfig {
        StoreConfig {
            timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(2),
            retries: 1,
            ..StoreConfig::default()
        }
    }

    /// Starts cache node `id` and waits until metadata lists it alive.
    pub async fn add_node(&mut self, id: u64) {
        self.start_node(id).await;
        let meta = self.meta.clone();
        wait_until(Duration::from_secs(20), "the new cache node alive", || async {
            meta.cache_nodes().await.map(|v| v.iter().any(|x| x.id == id && x.alive)).unwrap_or(false)
        })
        .await;
    }

    async fn start_node(&mut self, id: u64) {
        let l = free_listener().await;
        let addr = l.local_addr().unwrap().to_string();
        let mut cfg = CacheNodeConfig::new(
            id,
            "a",
            &addr,
            self.tmp.path().join(format!("cache{id}")),
            vec![self.meta_addr.clone()],
        );
        cfg.staging_size = 256 << 20;
        cfg.cache_mem = 16 << 20;
        cfg.heartbeat = Duration::from_millis(200);
        cfg.gc_interval = Duration::from_millis(300);
        cfg.gc_delay = Duration::from_secs(1);
        cfg.store = Self::store_cfg();
        self.nodes.push(tokio::spawn(async move {
            if let Err(e) = elea_cache::serve(cfg, l, async { std::future::pending::<()>().await }).await {
                panic!("cache node {id} failed: {e}");
            }
        }));
    }

    /// A new volume (one copy of each block, nothing tiered during a test).
    pub async fn volume(&self) -> VolumeId {
        self.volume_with_replicas(1).await
    }

    /// A new volume with `replicas` copies of each block.
    pub async fn volume_with_replicas(&self, replicas: u8) -> VolumeId {
        let n = self.next_volume.fetch_add(1, Ordering::Relaxed) + 1;
        let config = VolumeConfig {
            stores: vec![self.store_url()],
            replicas,
            tier_after_ms: 3_600_000,
            ..VolumeConfig::default()
        };
        let name = format!("v{n}");
        self.meta.create_volume(&name, config).await.expect("create volume").id
    }

    /// A gateway on `vol` with clients of its own. Buffered writes are only flushed when
    /// asked (`flush_delay` is an hour), so what another gateway sees is deterministic.
    pub async fn gateway(&self, vol: VolumeId, name: &str) -> Gw {
        let cfg = VfsConfig { flush_delay: Duration::from_secs(3600), ..VfsConfig::default() };
        self.gateway_with(vol, name, cfg).await
    }

    /// The cluster's metadata client (for checks below the VFS).
    pub fn meta(&self) -> &MetaClient {
        &self.meta
    }

    /// A data client of its own, with nothing cached: reads go to the cache nodes (or the
    /// store).
    pub fn data(&self) -> DataClient {
        let mut dcfg = DataConfig::new("a");
        dcfg.store = Self::store_cfg();
        dcfg.node_refresh = Duration::from_millis(200);
        DataClient::new(self.meta.clone(), dcfg)
    }

    /// A gateway on `vol` with the given settings (its session is named `name`).
    pub async fn gateway_with(&self, vol: VolumeId, name: &str, cfg: VfsConfig) -> Gw {
        let meta = MetaClient::connect(std::slice::from_ref(&self.meta_addr), ClientConfig::default())
            .expect("metadata client");
        let mut dcfg = DataConfig::new("a");
        dcfg.store = Self::store_cfg();
        dcfg.node_refresh = Duration::from_millis(200);
        // Writes wait this long for enough cache nodes (tests that add one later wait on).
        dcfg.node_wait = self.node_wait;
        dcfg.inline_max = self.inline_max;
        let data = DataClient::new(meta.clone(), dcfg);
        let cfg = VfsConfig { session_name: name.to_string(), ..cfg };
        Gw(Vfs::new(meta, data, vol, cfg).await.expect("vfs"))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.abort();
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

/// A gateway as the tests drive it: a [`Vfs`] whose results carry a bare [`Errno`], so they
/// compare with expected results directly.
pub struct Gw<M = MetaClient, D = DataClient>(pub Vfs<M, D>);

impl<M, D> Clone for Gw<M, D> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

macro_rules! forward {
    ($( fn $name:ident($($a:ident : $t:ty),*) -> $r:ty; )*) => {
        impl<M: MetaApi, D: DataPath> Gw<M, D> {
            $(
                #[allow(clippy::too_many_arguments)]
                pub async fn $name(&self, $($a: $t),*) -> Result<$r, Errno> {
                    self.0.$name($($a),*).await.map_err(Errno::from)
                }
            )*
        }
    };
}

forward! {
    fn lookup(c: &Creds, parent: Ino, name: &[u8]) -> Attr;
    fn getattr(ino: Ino) -> Attr;
    fn setattr(c: &Creds, ino: Ino, req: SetAttrReq) -> Attr;
    fn mknod(c: &Creds, parent: Ino, name: &[u8], mode: u32, umask: u32, rdev: u64) -> Attr;
    fn mkdir(c: &Creds, parent: Ino, name: &[u8], mode: u32, umask: u32) -> Attr;
    fn symlink(c: &Creds, parent: Ino, name: &[u8], target: &[u8]) -> Attr;
    fn readlink(ino: Ino) -> Vec<u8>;
    fn link(c: &Creds, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Attr;
    fn unlink(c: &Creds, parent: Ino, name: &[u8]) -> ();
    fn rmdir(c: &Creds, parent: Ino, name: &[u8]) -> ();
    fn rename(c: &Creds, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], flags: u32) -> ();
    fn open(c: &Creds, ino: Ino, flags: i32) -> (u64, Attr);
    fn create(c: &Creds, parent: Ino, name: &[u8], mode: u32, umask: u32, flags: i32) -> (u64, Attr);
    fn read(fh: u64, offset: u64, len: u32) -> Bytes;
    fn write(fh: u64, offset: u64, data: &[u8]) -> u32;
    fn drop_setid_after_write(fh: u64) -> ();
    fn flush(fh: u64) -> ();
    fn fsync(fh: u64) -> ();
    fn release(fh: u64) -> ();
    fn fallocate(fh: u64, offset: u64, len: u64, mode: u32) -> ();
    fn copy_file_range(fh_in: u64, off_in: u64, fh_out: u64, off_out: u64, len: u64) -> u64;
    fn opendir(c: &Creds, ino: Ino) -> u64;
    fn readdir(fh: u64, cookie: u64, plus: bool) -> (Vec<DirEntry>, bool);
    fn releasedir(fh: u64) -> ();
    fn statfs() -> StatFs;
    fn access(c: &Creds, ino: Ino, mask: u32) -> ();
    fn setxattr(c: &Creds, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> ();
    fn getxattr(c: &Creds, ino: Ino, name: &[u8]) -> Vec<u8>;
    fn listxattr(c: &Creds, ino: Ino) -> Vec<Vec<u8>>;
    fn removexattr(c: &Creds, ino: Ino, name: &[u8]) -> ();
    fn getlk(fh: u64, owner: u64, kind: LockKind, start: u64, end: u64) -> Option<LockInfo>;
    fn release_locks(fh: u64, owner: u64) -> ();
    fn flush_all() -> ();
    fn shutdown() -> ();
}

impl<M: MetaApi, D: DataPath> Gw<M, D> {
    pub fn dirty_bytes(&self) -> usize {
        self.0.dirty_bytes()
    }

    /// `F_SETLK`/`F_SETLKW` for a caller that `interrupted` says gave up, or not.
    #[allow(clippy::too_many_arguments)]
    pub async fn setlk(
        &self,
        fh: u64,
        owner: u64,
        pid: u32,
        kind: LockKind,
        start: u64,
        end: u64,
        wait: bool,
        interrupted: bool,
    ) -> Result<(), Errno> {
        let f = move || interrupted;
        self.0.setlk(fh, owner, pid, kind, start, end, wait, &f).await.map_err(Errno::from)
    }

    pub async fn release_closed(&self) {
        self.0.release_closed().await
    }
}

/// Gateways on the in-memory metadata service and data path: the same VFS, no sockets, no
/// disks. Every gateway of one `MemCluster` shares its metadata and its slices.
pub struct MemCluster {
    pub meta: MemMeta,
    pub data: MemData<MemMeta>,
    next_volume: AtomicU64,
}

pub type MemGw = Gw<MemMeta, MemData<MemMeta>>;

impl Default for MemCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl MemCluster {
    pub fn new() -> Self {
        let meta = MemMeta::new();
        Self { data: MemData::new(meta.clone()), meta, next_volume: AtomicU64::new(0) }
    }

    pub async fn volume(&self) -> VolumeId {
        let n = self.next_volume.fetch_add(1, Ordering::Relaxed) + 1;
        self.meta.create_volume(&format!("v{n}"), VolumeConfig::default()).await.expect("create volume").id
    }

    /// A gateway as [`TestCluster::gateway`] makes one (flushes only when asked).
    pub async fn gateway(&self, vol: VolumeId, name: &str) -> MemGw {
        let cfg = VfsConfig { flush_delay: Duration::from_secs(3600), ..VfsConfig::default() };
        self.gateway_with(vol, name, cfg).await
    }

    pub async fn gateway_with(&self, vol: VolumeId, name: &str, cfg: VfsConfig) -> MemGw {
        let cfg = VfsConfig { session_name: name.to_string(), ..cfg };
        Gw(Vfs::new(self.meta.clone(), self.data.clone(), vol, cfg).await.expect("vfs"))
    }
}
