//! The data client a gateway embeds: writes slices (split into blocks, placed by rendezvous
//! hashing, stored on `R` cache nodes, then committed to metadata) and reads byte ranges of
//! files by resolving their slices.
//!
//! Reads fetch in one of two ways. A sequential reader fetches whole blocks, and its caller
//! has the next [`DataConfig::readahead`] blocks' worth of the file fetched ahead of it
//! ([`DataClient::readahead_due`], [`DataClient::prefetch`]): by file offset, across slice and
//! chunk boundaries, nearest first. Any other read fetches only the aligned windows
//! ([`DataConfig::window`] bytes) of each block that hold the bytes it wants, as ranges from
//! the cache nodes, so a small random read moves a window instead of a 4 MiB block (a read
//! that wants at least half of a block still fetches all of it). Whole blocks and windows
//! share one cache bounded by bytes; concurrent readers of the same piece share its fetch.
//! Slices are immutable, so nothing cached by slice id ever goes stale.
//!
//! Where each slice's blocks live (`slice_data`) is remembered too. A location can go stale
//! (a slice is tiered and its staged copies freed, a dead node's copies are replaced): a
//! fetch that fails drops the slice's entry and asks metadata again, so a stale entry costs
//! a retry, never wrong bytes (every copy of a block has the same, checksummed bytes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use elea_common::ids::BLOCK_SIZE;
use elea_common::{Ino, VolumeId};
use elea_fsm::{Attr, CacheNodeInfo, Slice, SliceData, SliceLoc, block_len};
use elea_metadata::MetaApi as _;
use elea_metadata::client::MetaClient;
use elea_store::StoreConfig;
use foyer::{Cache, CacheBuilder, LruConfig};
use futures::StreamExt as _;
use tokio::sync::OnceCell;

use crate::client::blocks::{BlockClientConfig, BlockClients};
use crate::client::datapath::{ChunkSource, DataPath, MetaChunks, Staged, group_by_chunk, pack, wants};
use crate::error::CacheError;
use crate::placement::rank;
use crate::proto::{BlockRef, ByteRange, GetRequest};
use crate::volumes::Volumes;

/// Settings of a data client.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// The site whose cache nodes take this client's writes.
    pub site: String,
    /// Block transfers in flight per call.
    pub concurrency: usize,
    /// How far ahead of a sequential reader its file is fetched, in blocks (`BLOCK_SIZE`
    /// bytes each). Zero turns read-ahead off.
    pub readahead: usize,
    /// Bytes of whole blocks and windows kept in the client's cache. Default 256 MiB.
    pub cache_bytes: usize,
    /// Bytes a read that is not sequential fetches per block piece: aligned windows of this
    /// size (a power of two, 4 KiB to 4 MiB; rounded to one). Default 128 KiB.
    pub window: u32,
    /// Slice locations remembered. Default 65536.
    pub locations: usize,
    /// How long the cache node list is trusted before it is read again.
    pub node_refresh: Duration,
    /// How long a read keeps retrying while no copy of a block is reachable (nodes
    /// restarting, a store outage) before it fails.
    pub read_timeout: Duration,
    /// Largest slice a flush commits inline (its bytes in the metadata commit: one durable
    /// round trip instead of a put to the cache nodes and then a commit). Zero turns it off.
    /// Default and most [`elea_fsm::limits::INLINE_MAX`].
    pub inline_max: u32,
    /// How long a write waits for enough of the site's cache nodes to be registered and
    /// alive (a whole site restarting) before it fails with `NoNodes`. Default 60 s.
    pub node_wait: Duration,
    pub store: StoreConfig,
    /// Calls to the cache nodes (timeouts, TLS).
    pub blocks: BlockClientConfig,
}

impl DataConfig {
    pub fn new(site: &str) -> Self {
        Self {
            site: site.to_string(),
            concurrency: 16,
            readahead: 8,
            cache_bytes: 256 << 20,
            window: 128 << 10,
            locations: 65536,
            node_refresh: Duration::from_secs(2),
            read_timeout: Duration::from_secs(30),
            node_wait: Duration::from_secs(60),
            inline_max: elea_fsm::limits::INLINE_MAX,
            store: StoreConfig::default(),
            blocks: BlockClientConfig::default(),
        }
    }
}

/// A cached piece of a block: all of it ([`WHOLE`]) or window `piece` of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PieceKey {
    slice: u64,
    index: u32,
    piece: u32,
}

const WHOLE: u32 = u32::MAX;

/// How far (bytes) a read may start from where the inode's last read ended and still count
/// towards a sequential run (concurrent read-ahead requests of the kernel arrive slightly out
/// of order).
const SEQ_SLACK: u64 = 256 << 10;

/// Block fetches of one read-ahead in flight at once: in file order, so the block the reader
/// wants next does not share the disk with the whole window.
const READAHEAD_PARALLEL: usize = 4;

/// Per inode: where its last read ended, how many reads in a row started near there, whether
/// that read was sequential, and how far the file has been fetched ahead of it.
#[derive(Debug, Clone, Copy)]
struct ReadRun {
    end: u64,
    run: u32,
    sequential: bool,
    ahead: u64,
}

type Cell = Arc<OnceCell<Bytes>>;

struct Inner {
    meta: MetaClient,
    cfg: DataConfig,
    /// `cfg.window`, a power of two.
    window: u32,
    blocks: BlockClients,
    vols: Volumes,
    nodes: Mutex<(Option<Instant>, Vec<CacheNodeInfo>)>,
    /// Reserved slice ids: next, end.
    ids: tokio::sync::Mutex<(u64, u64)>,
    /// Whole blocks and windows, weighed by bytes.
    cache: Cache<PieceKey, Bytes>,
    /// Piece fetches in flight, shared by concurrent readers.
    inflight: Mutex<HashMap<PieceKey, Cell>>,
    /// Slice locations as metadata last gave them.
    locs: Cache<u64, Arc<SliceLoc>>,
    /// Each inode's recent reads, to detect sequential readers.
    last_read: Mutex<HashMap<(VolumeId, Ino), ReadRun>>,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct DataClient {
    inner: Arc<Inner>,
}

impl DataClient {
    pub fn new(meta: MetaClient, cfg: DataConfig) -> Self {
        let vols = Volumes::new(meta.clone(), cfg.store.clone());
        let blocks = BlockClients::new(cfg.blocks.clone());
        let window = cfg.window.clamp(4 << 10, BLOCK_SIZE as u32).next_power_of_two();
        let cache = CacheBuilder::new(cfg.cache_bytes.max(BLOCK_SIZE as usize))
            .with_name("elea-data-client")
            .with_shards(8)
            .with_eviction_config(LruConfig::default())
            .with_weighter(|_k: &PieceKey, v: &Bytes| v.len())
            .build();
        let locs = CacheBuilder::new(cfg.locations.max(16))
            .with_name("elea-slice-locations")
            .with_shards(8)
            .with_eviction_config(LruConfig::default())
            .with_weighter(|_k: &u64, _v: &Arc<SliceLoc>| 1)
            .build();
        Self {
            inner: Arc::new(Inner {
                meta,
                cfg,
                window,
                blocks,
                vols,
                nodes: Mutex::new((None, Vec::new())),
                ids: tokio::sync::Mutex::new((0, 0)),
                cache,
                inflight: Mutex::default(),
                locs,
                last_read: Mutex::default(),
            }),
        }
    }

    pub fn meta(&self) -> &MetaClient {
        &self.inner.meta
    }

    /// Whether the client's cache holds block `index` of `slice` whole (diagnostics).
    pub fn holds(&self, slice: u64, index: u32) -> bool {
        self.inner.cache.contains(&PieceKey { slice, index, piece: WHOLE })
    }

    /// The cache node registry (refreshed every `node_refresh`, or now with `force`).
    pub async fn nodes(&self, force: bool) -> Result<Vec<CacheNodeInfo>, CacheError> {
        {
            let g = self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner());
            if !force && g.0.is_some_and(|t| t.elapsed() < self.inner.cfg.node_refresh) {
                return Ok(g.1.clone());
            }
        }
        let n = self.inner.meta.cache_nodes().await?;
        *self.inner.nodes.lock().unwrap_or_else(|p| p.into_inner()) = (Some(Instant::now()), n.clone());
        Ok(n)
    }

    async fn site_nodes(&self, force: bool) -> Result<Vec<CacheNodeInfo>, CacheError> {
        Ok(self
            .nodes(force)
            .await?
            .into_iter()
            .filter(|n| n.alive && n.site == self.inner.cfg.site)
            .collect())
    }

    async fn next_slice_id(&self) -> Result<u64, CacheError> {
        let mut g = self.inner.ids.lock().await;
        if g.0 >= g.1 {
            let start = self.inner.meta.alloc_slices(1024).await?;
            *g = (start, start + 1024);
        }
        let id = g.0;
        g.0 += 1;
        Ok(id)
    }

    /// Stores one block on `replicas` nodes of the site; returns the nodes that hold it.
    async fn put_block(
        &self,
        vol: VolumeId,
        slice: u64,
        index: u32,
        data: Bytes,
        replicas: usize,
    ) -> Result<Vec<u64>, CacheError> {
        let crc = crc32c::crc32c(&data);
        let block = BlockRef { vol, slice, index };
        let mut failed: Vec<u64> = Vec::new();
        let mut held: Vec<u64> = Vec::new();
        let mut last_err: Option<CacheError> = None;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            let live = self.site_nodes(attempt > 0).await?;
            attempt += 1;
            let ids: Vec<u64> = live.iter().map(|n| n.id).filter(|id| !failed.contains(id)).collect();
            let order = rank(slice, index, &ids);
            let need = replicas - held.len();
            let targets: Vec<&CacheNodeInfo> = order
                .iter()
                .filter(|id| !held.contains(id))
                .take(need)
                .filter_map(|id| live.iter().find(|n| n.id == *id))
                .collect();
            if targets.len() < need {
                // Too few nodes now (a site restarting, a node just died): wait for them to
                // register or come back, like any other backpressure, up to `node_wait`.
                // Nodes that failed a put are tried again after a while.
                let e = CacheError::NoNodes(format!(
                    "site {:?} has {} usable cache nodes, the volume needs {replicas} copies",
                    self.inner.cfg.site,
                    ids.len()
                ));
                if started.elapsed() + backoff > self.inner.cfg.node_wait {
                    // A put's own failure says more than the count of nodes left.
                    return Err(last_err.unwrap_or(e));
                }
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::warn!(error = %e, waited_ms = started.elapsed().as_millis() as u64, "waiting for cache nodes");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                failed.clear();
                continue;
            }
            let puts = targets.iter().map(|n| {
                let data = data.clone();
                async move { (n.id, self.inner.blocks.put(&n.addr, block, data, crc).await) }
            });
            for (id, r) in futures::future::join_all(puts).await {
                match r {
                    Ok(()) => held.push(id),
                    Err(e) => {
                        tracing::warn!(node = id, slice, index, error = %e, "storing a block failed; trying another node");
                        failed.push(id);
                        last_err = Some(e);
                    }
                }
            }
            if held.len() >= replicas {
                return Ok(held);
            }
        }
    }

    /// Stores a new slice's bytes as blocks on `replicas` nodes each; returns each block's
    /// holders (what `WriteSlice` records).
    async fn put_slice(
        &self,
        vol: VolumeId,
        slice: u64,
        bytes: &Bytes,
        replicas: usize,
    ) -> Result<Vec<Vec<u64>>, CacheError> {
        let nblocks = elea_fsm::blocks_of(bytes.len() as u32);
        futures::stream::iter(0..nblocks)
            .map(|i| {
                let start = i * BLOCK_SIZE as usize;
                let end = (start + BLOCK_SIZE as usize).min(bytes.len());
                self.put_block(vol, slice, i as u32, bytes.slice(start..end), replicas)
            })
            .buffered(self.inner.cfg.concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    /// Stores sorted, disjoint extents as new slices (see [`DataPath::stage`]): each chunk's
    /// pieces packed into one slice, its blocks on `replicas` cache nodes, up to four chunks
    /// at a time. A slice of at most [`DataConfig::inline_max`] bytes is not stored: its
    /// bytes go with the commit.
    async fn stage_extents(&self, vol: VolumeId, extents: &[(u64, Bytes)]) -> Result<Staged, CacheError> {
        let replicas = usize::from(self.inner.vols.get(vol).await?.config.replicas);
        let inline_max = self.inner.cfg.inline_max.min(elea_fsm::limits::INLINE_MAX) as usize;
        let groups = group_by_chunk(extents)?;
        /// Where a chunk's new slice is: staged on these nodes (per block), or in `Inline`.
        enum Held {
            Nodes(Vec<Vec<u64>>),
            Inline(Bytes),
        }
        let chunks: Vec<(u64, Vec<Slice>, Held)> = futures::stream::iter(groups)
            .map(|(chunk, pieces)| async move {
                let id = self.next_slice_id().await?;
                let (list, bytes) = pack(id, &pieces);
                if bytes.len() <= inline_max {
                    return Ok::<_, CacheError>((chunk, list, Held::Inline(bytes)));
                }
                let holders = self.put_slice(vol, id, &bytes, replicas).await?;
                Ok((chunk, list, Held::Nodes(holders)))
            })
            .buffered(4)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut staged = Staged::default();
        for (chunk, list, held) in chunks {
            match held {
                Held::Nodes(holders) => staged.push(chunk, list, holders),
                Held::Inline(bytes) => staged.push_inline(chunk, list, bytes),
            }
        }
        Ok(staged)
    }

    /// Commits `staged` (see [`DataPath::commit`]). An inline chunk metadata refuses for
    /// want of room (`EAGAIN`: it holds all the inline bytes it may) is stored on cache
    /// nodes and committed as a staged slice instead.
    async fn commit_staged(
        &self,
        vol: VolumeId,
        ino: Ino,
        staged: &mut Staged,
    ) -> Result<Option<Attr>, CacheError> {
        loop {
            match staged.commit_with(&self.inner.meta, vol, ino).await {
                Ok(a) => return Ok(a),
                Err(CacheError::Meta(e)) if e.errno() == elea_common::Errno::EAGAIN => {
                    let Some((id, bytes)) = staged.next_inline() else { return Err(CacheError::Meta(e)) };
                    let replicas = usize::from(self.inner.vols.get(vol).await?.config.replicas);
                    let holders = self.put_slice(vol, id, &bytes, replicas).await?;
                    staged.staged_instead(holders);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores and commits extents of a file in one go (for tools; a VFS stages and commits
    /// separately, so that a failed commit is retried without uploading again). Returns the
    /// attributes after the last commit.
    pub async fn write_extents(
        &self,
        vol: VolumeId,
        ino: Ino,
        extents: &[(u64, Bytes)],
    ) -> Result<Option<Attr>, CacheError> {
        let mut staged = self.stage_extents(vol, extents).await?;
        self.commit_staged(vol, ino, &mut staged).await
    }

    /// Reads up to `len` bytes at `offset` of a file, its size and slice lists read from
    /// metadata (for tools; short at the end of the file, holes read as zeros). The same
    /// read path as a VFS's, read-ahead included.
    pub async fn read_file(
        &self,
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, CacheError> {
        let size = self.inner.meta.getattr(vol, ino).await?.size;
        let end = size.min(offset.saturating_add(len as u64));
        let src = Arc::new(MetaChunks { meta: self.inner.meta.clone(), vol, ino });
        self.read_range(vol, ino, offset, end, size, src).await
    }

    /// Reads bytes `[offset, end)` of a file of `size` bytes (see [`DataPath::read`]), and
    /// starts a read-ahead when the read continues a sequential run.
    async fn read_range(
        &self,
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        end: u64,
        size: u64,
        src: Arc<dyn ChunkSource>,
    ) -> Result<Vec<u8>, CacheError> {
        if end <= offset {
            return Ok(Vec::new());
        }
        let chunks = src.chunks(offset, end).await?;
        let out = self.read_slices(vol, ino, offset, end, &chunks).await?;
        if let Some((from, to)) = self.readahead_due(vol, ino, size) {
            // A sequential reader: the next stretch of the file is fetched in the background,
            // past the end of this slice and chunk too.
            let this = self.clone();
            tokio::spawn(async move {
                let r = match src.chunks(from, to).await {
                    Ok(chunks) => this.prefetch(vol, from, to, &chunks).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    tracing::debug!(ino, from, to, error = %e, "read-ahead failed");
                }
            });
        }
        Ok(out)
    }

    /// Reads bytes `[offset, end)` of a file whose chunk slice lists are resolved (`chunks`:
    /// every chunk the range touches, with its list oldest first). The caller clips `end` to
    /// the file size; ranges no slice covers read as zeros.
    async fn read_slices(
        &self,
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        end: u64,
        chunks: &[(u64, Arc<Vec<Slice>>)],
    ) -> Result<Vec<u8>, CacheError> {
        if end <= offset {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let wants = wants(offset, end, chunks);
        if wants.is_empty() {
            return Ok(out);
        }
        let mut ids: Vec<u64> = wants.iter().map(|w| w.slice).collect();
        ids.sort_unstable();
        ids.dedup();
        let locs = self.locations(&ids).await?;
        let sequential = self.note_read(vol, ino, offset, end);
        // Every piece the read needs, fetched concurrently: whole blocks for a sequential
        // reader or a read that wants most of a block, otherwise the windows it touches.
        let win = u64::from(self.inner.window);
        let mut pieces: Vec<(PieceKey, u32)> = Vec::new();
        for w in &wants {
            let (start, end) = (w.slice_off, w.slice_off + w.len as u64);
            for i in start / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
                let base = i * BLOCK_SIZE;
                let (a, b) = (start.max(base) - base, end.min(base + BLOCK_SIZE) - base);
                let index = i as u32;
                let key = |piece| PieceKey { slice: w.slice, index, piece };
                if sequential || 2 * (b - a) >= BLOCK_SIZE {
                    pieces.push((key(WHOLE), w.slice_len));
                } else {
                    pieces.extend((a / win..=(b - 1) / win).map(|p| (key(p as u32), w.slice_len)));
                }
            }
        }
        pieces.sort_unstable_by_key(|(k, _)| (k.slice, k.index, k.piece));
        pieces.dedup();
        let fetched: HashMap<PieceKey, Bytes> = futures::stream::iter(pieces)
            .map(|(key, slice_len)| {
                let loc = locs.get(&key.slice).cloned().flatten();
                async move {
                    let d = self.piece(vol, key, slice_len, loc).await?;
                    Ok::<_, CacheError>((key, d))
                }
            })
            .buffer_unordered(self.inner.cfg.concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        for w in &wants {
            let mut done = 0usize;
            while done < w.len {
                let at = w.slice_off + done as u64;
                let index = (at / BLOCK_SIZE) as u32;
                let in_block = at % BLOCK_SIZE;
                let whole = PieceKey { slice: w.slice, index, piece: WHOLE };
                let (d, in_piece) = match fetched.get(&whole) {
                    Some(d) => (d, in_block as usize),
                    None => {
                        let p = in_block / win;
                        let k = PieceKey { piece: p as u32, ..whole };
                        let d = fetched.get(&k).ok_or_else(|| {
                            CacheError::Internal(format!("block {}/{index}: piece {p} not fetched", w.slice))
                        })?;
                        (d, (in_block - p * win) as usize)
                    }
                };
                let n = (d.len().saturating_sub(in_piece)).min(w.len - done);
                if n == 0 {
                    return Err(CacheError::Checksum(format!(
                        "slice {} is shorter than its metadata says",
                        w.slice
                    )));
                }
                out[w.out_off + done..w.out_off + done + n].copy_from_slice(&d[in_piece..in_piece + n]);
                done += n;
            }
        }
        Ok(out)
    }

    /// Records a read of `[offset, end)`; true when it continues a sequential run: it starts
    /// exactly where the inode's last read ended, or it is the second read in a row to start
    /// near there.
    fn note_read(&self, vol: VolumeId, ino: Ino, offset: u64, end: u64) -> bool {
        let mut g = self.inner.last_read.lock().unwrap_or_else(|p| p.into_inner());
        if g.len() > 4096 {
            g.clear();
        }
        let prev = g.get(&(vol, ino)).copied();
        let near = prev.is_some_and(|p| offset.abs_diff(p.end) <= SEQ_SLACK);
        let run = if near { prev.map_or(0, |p| p.run).saturating_add(1) } else { 0 };
        let sequential = prev.is_some_and(|p| p.end == offset) || run >= 2;
        // What was fetched ahead still counts while the run goes on.
        let ahead = match prev {
            Some(p) if sequential => p.ahead.max(end),
            _ => end,
        };
        g.insert((vol, ino), ReadRun { end, run, sequential, ahead });
        sequential
    }

    /// The part of a file of `size` bytes to fetch ahead of its reader now: `Some` when the
    /// inode's last read (through [`Self::read_slices`]) was sequential and the read-ahead
    /// window past it reaches a block further than what was already asked for. The range
    /// counts as asked for from here on (public for tests that check what a read-ahead
    /// would fetch).
    pub fn readahead_due(&self, vol: VolumeId, ino: Ino, size: u64) -> Option<(u64, u64)> {
        let window = (self.inner.cfg.readahead as u64).saturating_mul(BLOCK_SIZE);
        if window == 0 {
            return None;
        }
        let mut g = self.inner.last_read.lock().unwrap_or_else(|p| p.into_inner());
        let r = g.get_mut(&(vol, ino)).filter(|r| r.sequential)?;
        // Whole blocks at a time (the end of the file excepted), so that one read-ahead is
        // asked for per block the reader passes, not per read.
        let reach = r.end.saturating_add(window);
        let to = if reach >= size { size } else { reach - reach % BLOCK_SIZE };
        if to <= r.ahead {
            return None;
        }
        let from = r.ahead.max(r.end);
        r.ahead = to;
        Some((from, to))
    }

    /// Fetches the blocks that hold bytes `[from, to)` of a file (`chunks`: the slice lists
    /// of the chunks the range touches, as for [`Self::read_slices`]) into the client's cache,
    /// whole, nearest first, a few at a time. Blocks already cached or in flight are not
    /// fetched again.
    async fn prefetch(
        &self,
        vol: VolumeId,
        from: u64,
        to: u64,
        chunks: &[(u64, Arc<Vec<Slice>>)],
    ) -> Result<(), CacheError> {
        let wants = wants(from, to, chunks);
        let mut ids: Vec<u64> = wants.iter().map(|w| w.slice).collect();
        ids.sort_unstable();
        ids.dedup();
        let locs = self.locations(&ids).await?;
        let mut pieces: Vec<(PieceKey, u32)> = Vec::new();
        for w in &wants {
            let (start, end) = (w.slice_off, w.slice_off + w.len as u64);
            for i in start / BLOCK_SIZE..=(end - 1) / BLOCK_SIZE {
                let key = PieceKey { slice: w.slice, index: i as u32, piece: WHOLE };
                if !pieces.iter().any(|(k, _)| *k == key) && !self.inner.cache.contains(&key) {
                    pieces.push((key, w.slice_len));
                }
            }
        }
        let mut fetches = futures::stream::iter(pieces)
            .map(|(key, slice_len)| {
                let loc = locs.get(&key.slice).cloned().flatten();
                async move { self.piece(vol, key, slice_len, loc).await.map(|_| ()) }
            })
            .buffered(READAHEAD_PARALLEL);
        while let Some(r) = fetches.next().await {
            r?;
        }
        Ok(())
    }

    /// Locations of `ids`, from the location cache or metadata (`None`: metadata has none).
    /// The bytes of inline slices that metadata sends along go to the block cache (as their
    /// whole block 0), where reads find them; their locations are not remembered, so one
    /// that is evicted is asked for again.
    async fn locations(&self, ids: &[u64]) -> Result<HashMap<u64, Option<Arc<SliceLoc>>>, CacheError> {
        let mut out = HashMap::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match self.inner.locs.get(id) {
                Some(e) => {
                    out.insert(*id, Some(e.value().clone()));
                }
                None => missing.push(*id),
            }
        }
        if !missing.is_empty() {
            for d in self.inner.meta.slice_data(&missing).await? {
                let id = d.id;
                out.insert(id, self.take_slice_data(d).0);
            }
        }
        Ok(out)
    }

    /// Asks metadata where a slice is now, replacing what the location cache holds; with
    /// its bytes when it is inline.
    async fn refresh_location(
        &self,
        slice: u64,
    ) -> Result<(Option<Arc<SliceLoc>>, Option<Bytes>), CacheError> {
        self.inner.locs.remove(&slice);
        match self.inner.meta.slice_data(&[slice]).await?.pop() {
            Some(d) => Ok(self.take_slice_data(d)),
            None => Ok((None, None)),
        }
    }

    /// A slice's location as metadata sent it: remembered, or, for an inline slice, its
    /// bytes put in the block cache instead.
    fn take_slice_data(&self, d: SliceData) -> (Option<Arc<SliceLoc>>, Option<Bytes>) {
        match d.inline {
            Some(bytes) => {
                let bytes = Bytes::from(bytes);
                self.inner.cache.insert(PieceKey { slice: d.id, index: 0, piece: WHOLE }, bytes.clone());
                (d.loc.map(Arc::new), Some(bytes))
            }
            None => (d.loc.map(|l| self.remember(d.id, l)), None),
        }
    }

    fn remember(&self, id: u64, l: SliceLoc) -> Arc<SliceLoc> {
        let l = Arc::new(l);
        // A slice waiting for garbage collection is not worth keeping.
        if l.deleted.is_none() {
            self.inner.locs.insert(id, l.clone());
        }
        l
    }

    /// One piece of a block, from the client's cache (a window also from its whole block)
    /// or fetched once (concurrent callers share the fetch).
    async fn piece(
        &self,
        vol: VolumeId,
        key: PieceKey,
        slice_len: u32,
        loc: Option<Arc<SliceLoc>>,
    ) -> Result<Bytes, CacheError> {
        if let Some(e) = self.inner.cache.get(&key) {
            return Ok(e.value().clone());
        }
        let blen = block_len(slice_len, key.index);
        let range = if key.piece == WHOLE {
            None
        } else {
            let win = self.inner.window;
            let start = u64::from(key.piece) * u64::from(win);
            if start >= u64::from(blen) {
                return Err(CacheError::Internal(format!(
                    "block {}/{}: window {} is past its {blen} bytes",
                    key.slice, key.index, key.piece
                )));
            }
            let start = start as u32;
            let len = win.min(blen - start);
            if let Some(e) = self.inner.cache.get(&PieceKey { piece: WHOLE, ..key })
                && e.value().len() >= (start + len) as usize
            {
                return Ok(e.value().slice(start as usize..(start + len) as usize));
            }
            Some((start, len))
        };
        let cell = {
            let mut g = self.inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
            g.entry(key).or_default().clone()
        };
        let r = cell
            .get_or_try_init(|| async {
                let d = Bytes::from(self.fetch(vol, key.slice, key.index, slice_len, range, loc).await?);
                self.inner.cache.insert(key, d.clone());
                Ok::<_, CacheError>(d)
            })
            .await
            .cloned();
        {
            let mut g = self.inner.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if g.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                g.remove(&key);
            }
        }
        r
    }

    /// Bytes of one block (`range`: offset and length within it; `None`: all of it), from
    /// the copies `loc` lists, retried with a fresh location while the failure is transient.
    async fn fetch(
        &self,
        vol: VolumeId,
        slice: u64,
        index: u32,
        slice_len: u32,
        range: Option<(u32, u32)>,
        loc: Option<Arc<SliceLoc>>,
    ) -> Result<Vec<u8>, CacheError> {
        let mut loc = loc;
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        let mut attempt = 0u32;
        loop {
            if attempt > 0 || loc.is_none() {
                // The block may have been tiered or re-replicated since the location was read.
                let (l, inline) = self.refresh_location(slice).await?;
                if let Some(d) = inline.filter(|_| index == 0) {
                    return match range {
                        None => Ok(d.to_vec()),
                        Some((off, n)) => {
                            d.get(off as usize..(off + n) as usize).map(<[u8]>::to_vec).ok_or_else(|| {
                                CacheError::Checksum(format!(
                                    "slice {slice} is shorter than its metadata says"
                                ))
                            })
                        }
                    };
                }
                loc = l;
            }
            let Some(l) = &loc else {
                return Err(CacheError::NotFound(format!("slice {slice} has no recorded location")));
            };
            let Some(b) = l.blocks.get(index as usize) else {
                return Err(CacheError::NotFound(format!("slice {slice} has no block {index}")));
            };
            let len = block_len(slice_len, index);
            match self.fetch_from(vol, slice, index, len, range, b, attempt > 0).await {
                Ok(d) => return Ok(d),
                // One immediate retry with a fresh location (the block may have moved); then
                // keep retrying while the failure is transient.
                Err(e)
                    if attempt == 0
                        || (e.is_retryable() && started.elapsed() < self.inner.cfg.read_timeout) =>
                {
                    if attempt > 0 {
                        tracing::debug!(slice, index, error = %e, "no copy reachable yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
                Err(e) => return Err(e),
            }
            attempt += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_from(
        &self,
        vol: VolumeId,
        slice: u64,
        index: u32,
        len: u32,
        range: Option<(u32, u32)>,
        b: &elea_fsm::BlockLoc,
        fresh: bool,
    ) -> Result<Vec<u8>, CacheError> {
        let nodes = self.nodes(fresh).await?;
        let addr = |id: u64| nodes.iter().find(|n| n.id == id && n.alive).map(|n| n.addr.clone());
        let block = Some(BlockRef { vol, slice, index });
        let want = range.map(|(offset, len)| ByteRange { offset, len });
        // Retryable: holders may be restarting or out of touch with metadata for a while.
        let mut last = CacheError::NoNodes(format!("block {slice}/{index}: no copy reachable"));
        // Holders the registry calls alive first, then the others (one that lost touch with
        // metadata may still serve); this site's before other sites'.
        let dead = |id: u64| nodes.iter().find(|n| n.id == id && !n.alive).map(|n| n.addr.clone());
        let here = |id: &u64| nodes.iter().any(|n| n.id == *id && n.site == self.inner.cfg.site);
        let (local, remote): (Vec<u64>, Vec<u64>) = b.nodes.iter().partition(|id| here(id));
        let holders = |ids: &[u64]| -> Vec<String> {
            ids.iter().filter_map(|id| addr(*id)).chain(ids.iter().filter_map(|id| dead(*id))).collect()
        };
        for a in holders(&local) {
            let req =
                GetRequest { block, len, tiered_stores: vec![], peers: vec![], cache: false, range: want };
            match self.inner.blocks.get(&a, req).await {
                Ok(d) => return Ok(d),
                Err(e) => last = e,
            }
        }
        // Then this site's cache nodes in placement order: they fetch the whole block (from the
        // store, or from the other sites' holders), verify it and keep it in their read cache,
        // so the next reader in this site finds it here.
        let remote = holders(&remote);
        let site: Vec<u64> =
            nodes.iter().filter(|n| n.alive && n.site == self.inner.cfg.site).map(|n| n.id).collect();
        if !b.tiered.is_empty() || !remote.is_empty() {
            for id in rank(slice, index, &site).into_iter().take(2) {
                let Some(a) = addr(id) else { continue };
                let req = GetRequest {
                    block,
                    len,
                    tiered_stores: b.tiered.iter().map(u32::from).collect(),
                    peers: remote.clone(),
                    cache: true,
                    range: want,
                };
                match self.inner.blocks.get(&a, req).await {
                    Ok(d) => return Ok(d),
                    Err(e) => last = e,
                }
            }
        }
        // This site has no cache node that could: the other sites' holders, then the store.
        for a in remote {
            let req =
                GetRequest { block, len, tiered_stores: vec![], peers: vec![], cache: false, range: want };
            match self.inner.blocks.get(&a, req).await {
                Ok(d) => return Ok(d),
                Err(e) => last = e,
            }
        }
        // Each store that holds it in turn (one may miss the object: a migration's source
        // whose objects were deleted, a store being restored).
        if b.tiered.is_empty() {
            return Err(last);
        }
        let key = self.inner.vols.key(vol, slice, index, len).await?;
        let mut got = None;
        for store in b.tiered.iter() {
            match self.inner.vols.store(vol, store).await {
                Ok(s) => match s.get(&key).await {
                    Ok(d) => {
                        got = Some(d);
                        break;
                    }
                    Err(e) => last = e.into(),
                },
                Err(CacheError::NotFound(_)) => {}
                Err(e) => last = e,
            }
        }
        let Some(d) = got else { return Err(last) };
        let Some((off, n)) = range else { return Ok(d) };
        let (off, n) = (off as usize, n as usize);
        if d.len() < off + n {
            return Err(CacheError::Checksum(format!(
                "block {slice}/{index} is shorter than its metadata says"
            )));
        }
        // The whole block came anyway: keep it for the reads around this one.
        let d = Bytes::from(d);
        self.inner.cache.insert(PieceKey { slice, index, piece: WHOLE }, d.clone());
        Ok(d[off..off + n].to_vec())
    }

    /// Drops the client's own cache of blocks and windows (slice locations stay).
    pub fn clear_cache(&self) {
        self.inner.cache.clear();
    }
}

impl DataPath for DataClient {
    async fn stage(&self, vol: VolumeId, extents: &[(u64, Bytes)]) -> Result<Staged, CacheError> {
        self.stage_extents(vol, extents).await
    }

    async fn commit(&self, vol: VolumeId, ino: Ino, staged: &mut Staged) -> Result<Option<Attr>, CacheError> {
        self.commit_staged(vol, ino, staged).await
    }

    async fn read(
        &self,
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        end: u64,
        size: u64,
        src: Arc<dyn ChunkSource>,
    ) -> Result<Vec<u8>, CacheError> {
        self.read_range(vol, ino, offset, end, size, src).await
    }
}
