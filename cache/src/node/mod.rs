//! The server half: the cache node process. [`Node`] holds a running node's state; [`serve`]
//! starts one (staging, read cache, registration, heartbeats, workers, the block service)
//! and runs it until shutdown.
//!
//! - [`staging`]: durable copies of blocks not yet tiered; [`readcache`]: clean blocks.
//! - `service`: the tonic block service, a thin adapter over [`Node`]'s put and get.
//! - `workers`: tiering, re-replication, garbage collection, reconcile.
//!
//! The node talks to its peers with the block client ([`BlockClients`]) and offers itself to
//! block clients of its own process as a [`BlockService`].

pub mod readcache;
mod service;
pub mod stagelog;
pub mod staging;
mod workers;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use elea_common::ids::BLOCK_SIZE;
use elea_fsm::{CacheNodeInfo, CacheStats, SiteMap, StoreSet};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientConfig, ClientError, MetaClient};
use elea_store::StoreConfig;
use tokio::sync::{Notify, watch};

use crate::BoxFut;
use crate::client::BlockClients;
use crate::client::blocks::BlockClientConfig;
use crate::error::CacheError;
use crate::node::readcache::ReadCache;
use crate::node::service::Svc;
use crate::node::staging::{BlockId, Staging, now_ms};
use crate::proto::block_server::BlockServer;
use crate::proto::{BlockRef, GetRequest, WarmResult};
use crate::volumes::Volumes;
use crate::wire::{BLOCK_WINDOW, BlockService, FRAME, MAX_MESSAGE};

/// Settings of one cache node. Durations are the workers' periods and safety margins.
#[derive(Debug, Clone)]
pub struct CacheNodeConfig {
    pub node_id: u64,
    pub site: String,
    /// Address other nodes and gateways reach the block service at.
    pub advertise: String,
    pub data_dir: PathBuf,
    pub meta: Vec<String>,
    /// Staging capacity in bytes (writers wait when it is full).
    pub staging_size: u64,
    pub cache_mem: u64,
    /// Read cache on disk, bytes (0 = memory only).
    pub cache_disk: u64,
    pub heartbeat: Duration,
    /// How often the tiering worker looks for due blocks.
    pub tier_interval: Duration,
    /// Above this fraction of the staging capacity, blocks are tiered regardless of age.
    pub high_watermark: f64,
    /// How often re-replication checks for blocks below their replica count.
    pub repair_interval: Duration,
    /// How often inline slices (small writes committed with their bytes in metadata) are
    /// looked for and staged here.
    pub spill_interval: Duration,
    /// How often the garbage collector runs, and how long a deleted slice waits first.
    pub gc_interval: Duration,
    pub gc_delay: Duration,
    /// How often staged blocks are checked against metadata (and scrubbed).
    pub reconcile_interval: Duration,
    /// How often every volume's object stores are probed (a write, a read and a delete).
    pub store_probe_interval: Duration,
    /// A staged block metadata does not list here is dropped once older than this; a block
    /// metadata lists here is scrubbed once committed longer than this ago.
    pub stale_grace: Duration,
    /// A staged block of a slice metadata never committed is dropped once older than this.
    pub orphan_grace: Duration,
    pub store: StoreConfig,
    /// Also serve block clients of this process directly, without gRPC over loopback (what
    /// `elea up` does: its gateway and cache node share the process). Peers and other
    /// processes use gRPC either way.
    pub in_process: bool,
    /// Mutual TLS for the block service and for calls to other cache nodes: every caller
    /// must present a certificate of the cluster, and each call is checked against its role
    /// (see `service.rs`). Plaintext, and every call allowed, when none.
    pub tls: Option<elea_auth::tls::Tls>,
}

impl CacheNodeConfig {
    pub fn new(node_id: u64, site: &str, advertise: &str, data_dir: PathBuf, meta: Vec<String>) -> Self {
        Self {
            node_id,
            site: site.to_string(),
            advertise: advertise.to_string(),
            data_dir,
            meta,
            staging_size: 10 << 30,
            cache_mem: 256 << 20,
            cache_disk: 0,
            heartbeat: Duration::from_secs(1),
            tier_interval: Duration::from_secs(1),
            high_watermark: 0.8,
            repair_interval: Duration::from_secs(2),
            spill_interval: Duration::from_millis(250),
            gc_interval: Duration::from_secs(5),
            gc_delay: Duration::from_secs(60),
            reconcile_interval: Duration::from_secs(30),
            store_probe_interval: Duration::from_secs(300),
            stale_grace: Duration::from_secs(60),
            orphan_grace: Duration::from_secs(3600),
            store: StoreConfig::default(),
            in_process: false,
            tls: None,
        }
    }
}

/// Why a cache node could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Shared state of a running node.
pub struct Node {
    pub cfg: CacheNodeConfig,
    pub staging: Arc<Staging>,
    pub cache: ReadCache,
    pub meta: MetaClient,
    pub peers: BlockClients,
    pub vols: Volumes,
    pub incarnation: u64,
    /// Volumes asked to tier now, with the time of the request (blocks staged before it).
    pub(crate) tier_now: Mutex<HashMap<u64, u64>>,
    pub(crate) tier_wake: Notify,
    pub(crate) backlog: (AtomicU64, AtomicU64),
    /// The registry as of the last heartbeat.
    pub(crate) nodes: Mutex<Vec<CacheNodeInfo>>,
    /// What each background worker is doing.
    pub(crate) workers: workers::WorkerBoard,
    /// Block calls refused for their caller's role or volumes.
    pub(crate) refused_calls: AtomicU64,
    /// The data directory is known to name this cluster (`check_data_dir`).
    marked: std::sync::atomic::AtomicBool,
    /// The site map of each group and when it was read (see [`Node::site_map`]).
    sites: Mutex<HashMap<elea_common::GroupId, (Arc<SiteMap>, std::time::Instant)>>,
    /// Bytes and blocks this node fetched from other sites (their cache nodes and stores),
    /// by the site they came from.
    pub(crate) from_sites: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Blocks being fetched to keep (see [`Node::fetch_guard`]).
    fetching: Mutex<HashMap<BlockId, Arc<tokio::sync::Mutex<()>>>>,
}

/// A block fetch in progress here (see [`Node::fetch_guard`]); forgets the block's lock when
/// the last holder or waiter is gone.
struct FetchGuard<'a> {
    node: &'a Node,
    id: BlockId,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.node.fetching.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and ours: nobody else waits for this block.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.id);
        }
    }
}

/// How long a heartbeat round waits for the control group's list of volume groups before it
/// uses the list as last read.
pub(crate) const LIST_GROUPS_WAIT: Duration = Duration::from_millis(500);

/// How long a node uses the site map it read before reading it again.
const SITE_MAP_TTL: Duration = Duration::from_secs(5);

/// Reads or creates the data directory's incarnation (random, fsynced once).
fn incarnation(dir: &std::path::Path) -> Result<u64, CacheError> {
    let p = dir.join("incarnation");
    match std::fs::read_to_string(&p) {
        Ok(s) => s.trim().parse().map_err(|_| {
            CacheError::Internal(format!("{} is corrupt: remove the data directory", p.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = crate::random_u64() | 1;
            let tmp = dir.join("incarnation.tmp");
            let write = || -> std::io::Result<()> {
                std::fs::write(&tmp, id.to_string())?;
                std::fs::File::open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, &p)?;
                std::fs::File::open(dir)?.sync_all()
            };
            write().map_err(|e| CacheError::io("writing", &p, e))?;
            Ok(id)
        }
        Err(e) => Err(CacheError::io("reading", &p, e)),
    }
}

/// How long a heartbeat round waits to learn the cluster's data identity, until it knows it.
const IDENTITY_CHECK_WAIT: Duration = Duration::from_millis(500);

/// The file in a cache node's data directory that names the cluster whose blocks it stages.
const CLUSTER_FILE: &str = "cluster-id";

impl Node {
    /// Checks that the data directory stages this cluster's blocks (its `cluster-id` names this
    /// cluster's data identity), and names the cluster there once it has an identity. A
    /// directory of another cluster is a `BadRequest` that says whose it is.
    pub(crate) async fn check_data_dir(&self) -> Result<(), CacheError> {
        let path = self.cfg.data_dir.join(CLUSTER_FILE);
        let ours = self.vols.identity().await?.map(|i| i.cluster_hex());
        let theirs = match std::fs::read_to_string(&path) {
            Ok(s) => Some(s.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(CacheError::io("reading", &path, e)),
        };
        match (theirs, ours) {
            (Some(t), Some(o)) if t == o => {
                self.marked.store(true, Ordering::Relaxed);
                Ok(())
            }
            (Some(t), o) => Err(CacheError::BadRequest(format!(
                "{} holds the staged blocks of another Elea cluster ({t}; this one is {}): give this \
                 node an empty data directory, or start it with the cluster it belongs to",
                self.cfg.data_dir.display(),
                o.as_deref().unwrap_or("new")
            ))),
            (None, Some(o)) => {
                let tmp = self.cfg.data_dir.join("cluster-id.tmp");
                // A heartbeat round and a put may both mark the directory at once: one writes,
                // the other finds it written (both through one temporary file).
                static MARKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
                let _marking = MARKING.lock().unwrap_or_else(|p| p.into_inner());
                let write = || -> std::io::Result<()> {
                    if std::fs::read_to_string(&path).is_ok_and(|t| t.trim() == o) {
                        return Ok(());
                    }
                    std::fs::write(&tmp, format!("{o}\n"))?;
                    std::fs::File::open(&tmp)?.sync_all()?;
                    std::fs::rename(&tmp, &path)?;
                    std::fs::File::open(&self.cfg.data_dir)?.sync_all()
                };
                write().map_err(|e| CacheError::io("writing", &path, e))?;
                tracing::info!(cluster = %o, "data directory marked as this cluster's");
                self.marked.store(true, Ordering::Relaxed);
                Ok(())
            }
            (None, None) => Ok(()),
        }
    }

    /// The registry's nodes as last seen.
    pub fn registry(&self) -> Vec<CacheNodeInfo> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The site map of volume `vol`'s group (which names its stores' sites), read at most
    /// every [`SITE_MAP_TTL`] (the last one read when the metadata service cannot answer;
    /// `None` before any).
    pub(crate) async fn site_map(&self, vol: u64) -> Option<Arc<SiteMap>> {
        let meta = match self.meta.for_volume(vol).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "finding the volume's group");
                self.meta.clone()
            }
        };
        let group = meta.group();
        let cached = self.sites.lock().unwrap_or_else(|p| p.into_inner()).get(&group).cloned();
        if let Some((m, at)) = &cached
            && at.elapsed() < SITE_MAP_TTL
        {
            return Some(m.clone());
        }
        match meta.sites().await {
            Ok(m) => {
                let m = Arc::new(m);
                self.sites
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(group, (m.clone(), std::time::Instant::now()));
                Some(m)
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading the site map");
                cached.map(|(m, _)| m)
            }
        }
    }

    /// The store this node tiers volume `vol`'s blocks to: its site's store of the volume,
    /// else the volume's write store (its first unless a migration moved it).
    pub(crate) async fn tier_store(&self, vol: u64) -> u16 {
        self.site_map(vol).await.map_or(0, |m| m.tier_store(vol, &self.cfg.site))
    }

    /// Forgets the site maps read so far: the next [`Node::site_map`] asks again (a store the
    /// map named for writes no longer takes them).
    pub(crate) fn forget_site_maps(&self) {
        self.sites.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Counts a block of `bytes` that came from site `from` (nothing when it is this one's or
    /// unknown).
    fn count_from(&self, from: Option<&str>, bytes: usize) {
        let Some(from) = from.filter(|s| *s != self.cfg.site) else { return };
        let mut m = self.from_sites.lock().unwrap_or_else(|p| p.into_inner());
        let e = m.entry(from.to_string()).or_default();
        e.0 += bytes as u64;
        e.1 += 1;
    }

    /// Waits until no other task of this node fetches block `id` to keep it, and holds that
    /// until the guard is dropped.
    async fn fetch_guard(&self, id: BlockId) -> FetchGuard<'_> {
        let lock = self.fetching.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default().clone();
        let guard = lock.clone().lock_owned().await;
        FetchGuard { node: self, id, lock, guard: Some(guard) }
    }

    /// The site of the cache node at `addr`, from the registry.
    fn site_of_addr(&self, addr: &str) -> Option<String> {
        self.registry().into_iter().find(|n| n.addr == addr).map(|n| n.site)
    }

    pub(crate) fn addr_of(&self, id: u64) -> Option<String> {
        self.registry().into_iter().find(|n| n.id == id).map(|n| n.addr)
    }

    fn stats(&self) -> CacheStats {
        let s = self.staging.stats();
        let (hits, misses) = self.cache.counters();
        CacheStats {
            staged_bytes: s.bytes,
            staged_blocks: s.blocks,
            staging_capacity: s.capacity,
            oldest_staged_ms: s.oldest_ms.map_or(0, |t| now_ms().saturating_sub(t)),
            read_hits: hits,
            read_misses: misses,
            tier_backlog_blocks: self.backlog.0.load(Ordering::Relaxed),
            tier_backlog_bytes: self.backlog.1.load(Ordering::Relaxed),
        }
    }

    async fn register(&self) -> Result<(), ClientError> {
        self.register_in(&self.meta).await
    }

    /// Registers this node in the registry of `meta`'s group.
    async fn register_in(&self, meta: &MetaClient) -> Result<(), ClientError> {
        meta.register_cache_node(self.cfg.node_id, &self.cfg.site, &self.cfg.advertise, self.incarnation)
            .await
    }

    /// One heartbeat to `meta`'s group, registering there when it does not know this node
    /// (a volume's group this node has not joined yet, or one that lost track of it).
    async fn heartbeat_in(&self, meta: &MetaClient) {
        match meta.cache_heartbeat(self.cfg.node_id, self.incarnation, self.stats()).await {
            Ok(_) => {}
            Err(ClientError::Fs(elea_common::Errno::ESTALE)) => {
                tracing::info!(group = meta.group(), "registering in a group that does not know this node");
                if let Err(e) = self.register_in(meta).await {
                    tracing::warn!(group = meta.group(), error = %e, "registering");
                }
            }
            Err(e) => tracing::warn!(group = meta.group(), error = %e, "heartbeat failed"),
        }
    }

    /// Heartbeats go to the control group and to every volume's group, each of which keeps a
    /// registry of the cache nodes that stage its blocks; one that does not answer does not
    /// hold up the others.
    async fn heartbeat_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let wait = self.cfg.heartbeat.max(Duration::from_millis(500)) * 2;
        loop {
            let groups = self.group_clients().await;
            let beats = futures::future::join_all(
                groups.iter().map(|c| tokio::time::timeout(wait, self.heartbeat_in(c))),
            );
            let regs =
                futures::future::join_all(groups.iter().map(|c| tokio::time::timeout(wait, c.cache_nodes())));
            let (beats, regs) = tokio::join!(beats, regs);
            for (c, r) in groups.iter().zip(beats) {
                if r.is_err() {
                    tracing::warn!(group = c.group(), "heartbeat not answered in {wait:?}");
                }
            }
            // The registry as the control group has it, or as the first group that answered
            // has it when the control group did not.
            let mut registry = None;
            for (c, r) in groups.iter().zip(regs) {
                match r {
                    Ok(Ok(n)) => {
                        registry = Some(n);
                        break;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(group = c.group(), error = %e, "reading the cache node registry")
                    }
                    Err(_) => tracing::warn!(group = c.group(), "reading the cache node registry timed out"),
                }
            }
            if let Some(n) = registry {
                *self.nodes.lock().unwrap_or_else(|p| p.into_inner()) = n;
            }
            // The cluster's data identity as soon as it has one (its first volume), so that
            // this node's first put does not wait to learn it: it could not, quickly, while
            // the control group's site is lost.
            if !self.marked.load(Ordering::Relaxed)
                && let Ok(Err(e)) = tokio::time::timeout(IDENTITY_CHECK_WAIT, self.check_data_dir()).await
            {
                tracing::warn!(error = %e, "checking the data directory's cluster");
            }
            if sleep_or_stop(&mut stop, self.cfg.heartbeat).await {
                return;
            }
        }
    }

    /// Stages a block here; succeeds once it is durable. `crc` is the block's crc32c, checked
    /// against the bytes before anything is stored.
    pub(crate) async fn store_block(&self, b: BlockRef, data: Bytes, crc: u32) -> Result<(), CacheError> {
        let id = check_ref(&b)?;
        if !self.marked.load(Ordering::Relaxed) {
            // The cluster's first blocks here: its volume exists, so it has its identity.
            self.check_data_dir().await?;
        }
        if data.is_empty() || data.len() as u64 > BLOCK_SIZE {
            return Err(CacheError::BadRequest(format!("bad block length {}", data.len())));
        }
        self.staging.put(b.vol, id, data, crc).await
    }

    /// Reads a block, or the range of it the request names, for a client or peer: staging,
    /// read cache, then the object store or the peers named in the request. Every byte
    /// returned was verified against a checksum on the way (a staged file's or cache entry's
    /// segments, an object's own checksum, or a peer's reply).
    pub async fn read_block(&self, req: &GetRequest) -> Result<Vec<u8>, CacheError> {
        let b = req.block.as_ref().ok_or_else(|| CacheError::BadRequest("missing block".into()))?;
        let id = check_ref(b)?;
        if u64::from(req.len) > BLOCK_SIZE || req.len == 0 {
            return Err(CacheError::BadRequest(format!("bad block length {}", req.len)));
        }
        let (off, n) = check_range(req)?;
        match self.staging.get_range(id, req.len, off, n).await {
            Ok(Some(data)) => return Ok(data),
            Ok(None) => {}
            Err(e @ (CacheError::Conflict(_) | CacheError::BadRequest(_))) => return Err(e),
            Err(e) => tracing::warn!(error = %e, "staged copy unreadable; trying other copies"),
        }
        if let Some((len, d)) = self.cache.get_range(id, Some((off, n))).await
            && len == req.len
        {
            return Ok(d);
        }
        // One fetch per block at a time for a copy to keep: concurrent readers of a block
        // missing here (a reader's window and its readahead, two gateways) wait for the first
        // and read what it kept, instead of each pulling it across the network again.
        let _fetching = if req.cache { Some(self.fetch_guard(id).await) } else { None };
        if _fetching.is_some()
            && let Some((len, d)) = self.cache.get_range(id, Some((off, n))).await
            && len == req.len
        {
            return Ok(d);
        }
        let mut last = CacheError::NotFound(format!("block {id:?} is not staged or cached here"));
        if !req.tiered_stores.is_empty() {
            let set: StoreSet = req
                .tiered_stores
                .iter()
                .map(|i| u16::try_from(*i).ok().filter(|i| *i < StoreSet::BITS))
                .collect::<Option<_>>()
                .ok_or_else(|| CacheError::BadRequest("bad store index".into()))?;
            let key = self.vols.key(b.vol, id.0, id.1, req.len).await?;
            let map = self.site_map(b.vol).await;
            let order = match &map {
                Some(m) => m.read_order(b.vol, &self.cfg.site, set),
                None => set.iter().collect(),
            };
            // An object is compressed and checksummed as a unit: fetch and verify all of it,
            // keep it, and serve the range from it. A store that misses it (or fails) is
            // followed by the next one that holds it.
            for idx in order {
                match self.vols.store(b.vol, idx).await {
                    Ok(s) => match s.get(&key).await {
                        Ok(d) => {
                            self.count_from(map.as_ref().and_then(|m| m.site_of_store(b.vol, idx)), d.len());
                            if req.cache {
                                self.cache.insert(id, &d);
                            }
                            return cut(d, off, n);
                        }
                        Err(e) => last = e.into(),
                    },
                    Err(e) => last = e,
                }
            }
        }
        // A copy wanted in the cache is fetched whole from a peer; otherwise only the range.
        let range = if req.cache { None } else { req.range };
        for peer in req.peers.iter().filter(|p| **p != self.cfg.advertise) {
            let r = GetRequest {
                block: Some(*b),
                len: req.len,
                tiered_stores: vec![],
                peers: vec![],
                cache: false,
                range,
            };
            let asked = std::time::Instant::now();
            match self.peers.get(peer, r).await {
                Ok(d) => {
                    tracing::debug!(
                        slice = id.0,
                        index = id.1,
                        peer = %peer,
                        bytes = d.len(),
                        ms = asked.elapsed().as_secs_f64() * 1e3,
                        "fetched a block from a peer"
                    );
                    self.count_from(self.site_of_addr(peer).as_deref(), d.len());
                    if range.is_none() {
                        if req.cache {
                            self.cache.insert(id, &d);
                        }
                        return cut(d, off, n);
                    }
                    return Ok(d);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Blocks one warm call fetches at once.
const WARM_CONCURRENCY: usize = 8;

impl Node {
    /// Fetches each block into the read cache unless it is staged or cached here already
    /// (`elea warmup`); one result per block, in order.
    pub async fn warm(&self, blocks: Vec<GetRequest>) -> Vec<WarmResult> {
        use futures::StreamExt as _;
        futures::stream::iter(blocks)
            .map(|mut req| async move {
                let Some(id) = req.block.as_ref().and_then(|b| check_ref(b).ok()) else {
                    return WarmResult { ok: false, present: false, error: "missing or bad block".into() };
                };
                let here = self.staging.contains(id) || self.cache.contains(id);
                if here {
                    return WarmResult { ok: true, present: true, error: String::new() };
                }
                req.cache = true;
                req.range = None;
                match self.read_block(&req).await {
                    Ok(_) => WarmResult { ok: true, present: false, error: String::new() },
                    Err(e) => WarmResult { ok: false, present: false, error: e.to_string() },
                }
            })
            .buffered(WARM_CONCURRENCY)
            .collect()
            .await
    }
}

impl BlockService for Node {
    fn put(&self, block: BlockRef, data: Bytes, crc: u32) -> BoxFut<'_, Result<(), CacheError>> {
        Box::pin(self.store_block(block, data, crc))
    }

    fn get<'a>(&'a self, req: &'a GetRequest) -> BoxFut<'a, Result<Vec<u8>, CacheError>> {
        Box::pin(self.read_block(req))
    }
}

/// The range a get asks for, as (offset, length) within its block (the whole block when it
/// names none); a clear error when it is empty or reaches past the block.
pub(crate) fn check_range(req: &GetRequest) -> Result<(u32, u32), CacheError> {
    let Some(r) = req.range else { return Ok((0, req.len)) };
    if r.len == 0 || u64::from(r.offset) + u64::from(r.len) > u64::from(req.len) {
        return Err(CacheError::BadRequest(format!(
            "range of {} bytes at {} is outside the block of {} bytes",
            r.len, r.offset, req.len
        )));
    }
    Ok((r.offset, r.len))
}

/// Bytes `[off, off + n)` of a block fetched whole; an error when it is shorter than that.
fn cut(mut d: Vec<u8>, off: u32, n: u32) -> Result<Vec<u8>, CacheError> {
    let (off, n) = (off as usize, n as usize);
    if d.len() < off + n {
        return Err(CacheError::Checksum(format!(
            "a block of {} bytes has no bytes {off}..{}",
            d.len(),
            off + n
        )));
    }
    if off == 0 {
        d.truncate(n);
        return Ok(d);
    }
    Ok(d[off..off + n].to_vec())
}

/// Validates a block reference.
pub(crate) fn check_ref(b: &BlockRef) -> Result<BlockId, CacheError> {
    if b.slice == 0 || b.vol == 0 || u64::from(b.index) >= elea_common::ids::CHUNK_SIZE / BLOCK_SIZE {
        return Err(CacheError::BadRequest(format!("bad block reference {b:?}")));
    }
    Ok((b.slice, b.index))
}

/// Sleeps for `d`; true when the node is stopping.
pub(crate) async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// Runs a cache node on `listener` until `shutdown` resolves.
pub async fn serve(
    cfg: CacheNodeConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if cfg.node_id == 0 {
        return Err(ServeError::Config("--node-id must be positive".into()));
    }
    if cfg.meta.is_empty() {
        return Err(ServeError::Config("no metadata addresses".into()));
    }
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| CacheError::io("creating", &cfg.data_dir, e))?;
    let incarnation = incarnation(&cfg.data_dir)?;
    let staging = Staging::open(&cfg.data_dir.join("staging"), cfg.staging_size)?;
    let cache = ReadCache::open(&cfg.data_dir.join("read-cache"), cfg.cache_mem, cfg.cache_disk).await?;
    let connector = |role| match &cfg.tls {
        Some(tls) => tls.connector(&[role]).map(Some).map_err(|e| ServeError::Config(e.to_string())),
        None => Ok(None),
    };
    let meta_cfg = ClientConfig { tls: connector(elea_auth::Role::Meta)?, ..ClientConfig::default() };
    let peer_tls = connector(elea_auth::Role::Cache)?;
    let meta = MetaClient::connect(&cfg.meta, meta_cfg).map_err(CacheError::from)?;
    let vols = Volumes::new(meta.clone(), cfg.store.clone());
    let node = Arc::new(Node {
        cfg,
        staging,
        cache,
        meta,
        peers: BlockClients::new(BlockClientConfig { tls: peer_tls, ..BlockClientConfig::default() }),
        vols,
        incarnation,
        tier_now: Mutex::default(),
        tier_wake: Notify::new(),
        backlog: (AtomicU64::new(0), AtomicU64::new(0)),
        workers: workers::WorkerBoard::default(),
        refused_calls: AtomicU64::new(0),
        nodes: Mutex::default(),
        marked: std::sync::atomic::AtomicBool::new(false),
        sites: Mutex::default(),
        from_sites: Mutex::default(),
        fetching: Mutex::default(),
    });
    // Register before serving, retrying while the metadata service is unreachable. Until
    // then connections are accepted and closed at once: clients that still list this address
    // (a restart with a wiped disk waits out the old incarnation) fail fast and go to another
    // copy instead of waiting on a node that does not answer yet.
    let refuse = async {
        loop {
            match listener.accept().await {
                Ok((conn, _)) => drop(conn),
                // Out of descriptors, say: do not spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    tokio::select! {
        r = async {
            register_until_accepted(&node).await?;
            // Staging is keyed by slice id: another cluster's blocks must never be served.
            node.check_data_dir().await.map_err(|e| match e {
                CacheError::BadRequest(m) => ServeError::Config(m),
                e => ServeError::Cache(e),
            })
        } => r?,
        () = refuse => {}
    }
    tracing::info!(
        node = node.cfg.node_id,
        site = %node.cfg.site,
        addr = %node.cfg.advertise,
        incarnation = node.incarnation,
        "cache node registered"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = vec![tokio::spawn(node.clone().heartbeat_loop(stop_rx.clone()))];
    workers.extend(crate::node::workers::spawn_all(&node, &stop_rx));
    let svc = BlockServer::new(Svc(node.clone()))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    // Clients in this process reach the node directly while it serves, if asked to.
    let _local = node.cfg.in_process.then(|| crate::local::register(&node.cfg.advertise, node.clone()));
    let mut graceful = stop_rx.clone();
    let stopper = tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let router = tonic::transport::Server::builder()
        // A client that stops answering pings (gone without closing) is dropped.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .initial_stream_window_size(BLOCK_WINDOW)
        .initial_connection_window_size(4 * BLOCK_WINDOW)
        .max_frame_size(FRAME)
        .add_service(svc);
    let stopped = async move {
        let _ = graceful.wait_for(|s| *s).await;
    };
    let r = match &node.cfg.tls {
        Some(tls) => router.serve_with_incoming_shutdown(tls.incoming(listener), stopped).await,
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, stopped).await
        }
    };
    stopper.abort();
    for w in workers {
        w.abort();
    }
    node.cache.close().await;
    tracing::info!("cache node stopped");
    Ok(r?)
}

/// Registers the node, retrying while the metadata service is unreachable or the previous
/// incarnation of this id is still considered alive.
async fn register_until_accepted(node: &Node) -> Result<(), ServeError> {
    loop {
        match node.register().await {
            Ok(()) => return Ok(()),
            Err(ClientError::Fs(elea_common::Errno::EBUSY)) => {
                tracing::warn!(
                    node = node.cfg.node_id,
                    "another cache node with this id is alive (or died less than 10 s ago): waiting"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e @ (ClientError::Fs(_) | ClientError::Rejected(_))) => {
                return Err(ServeError::Config(format!("the metadata service refused this node: {e}")));
            }
            Err(e) => {
                tracing::warn!(error = %e, "registering with the metadata service; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
