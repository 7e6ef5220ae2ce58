//! The tiering worker: uploads staged blocks to the volume's object store of this node's site
//! (its first store when the site has none), records them tiered, then frees their staged
//! copies.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use elea_common::Errno;
use elea_fsm::StagedBlock;
use elea_metadata::MetaApi as _;
use elea_metadata::client::ClientError;
use elea_store::{BlockKey, encode_block};
use futures::StreamExt as _;

use super::{Worker, ms_of};
use crate::error::CacheError;
use crate::node::Node;
use crate::node::staging::now_ms;
use crate::proto::BlockRef;

/// Most blocks one tiering batch uploads before recording them.
const TIER_BATCH: usize = 64;
/// Uploads in flight per node.
const TIER_CONCURRENCY: usize = 8;

/// Tiers the staged blocks this node is primary for (the first live holder): once older than
/// the volume's `tier-after`, when staging is above its high watermark, or when asked (`elea
/// tier`, which also wakes it). Publishes the node's tiering backlog.
pub(crate) struct Tiering {
    node: Arc<Node>,
}

impl Tiering {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

impl Worker for Tiering {
    const NAME: &'static str = "tiering";

    fn period(&self) -> Duration {
        self.node.cfg.tier_interval
    }

    fn round(&mut self) -> impl Future<Output = Result<usize, CacheError>> + Send {
        tier_round(self.node.clone())
    }

    fn woken(&self) -> impl Future<Output = ()> + Send + 'static {
        let node = self.node.clone();
        async move { node.tier_wake.notified().await }
    }
}

async fn tier_round(node: Arc<Node>) -> Result<usize, CacheError> {
    let me = node.cfg.node_id;
    let alive = node.alive_set();
    if !alive.contains(&me) {
        return Ok(0);
    }
    let blocks = node.staged_blocks_all().await?;
    let forced = node.tier_now.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let over = node.staging.fill() > node.cfg.high_watermark;
    let now = now_ms();
    let mut due = Vec::new();
    let (mut n, mut bytes) = (0u64, 0u64);
    let mut forced_left: HashSet<u64> = HashSet::new();
    for b in blocks {
        if b.nodes.iter().find(|n| alive.contains(n)) != Some(&me) {
            continue;
        }
        let vol = match node.vols.get(b.vol).await {
            Ok(v) => v,
            Err(e) => {
                // One volume whose stores cannot be opened must not stop the others.
                tracing::warn!(vol = b.vol, error = %e, "cannot tier this volume's blocks");
                continue;
            }
        };
        if vol.stores.is_empty() {
            continue;
        }
        n += 1;
        bytes += u64::from(b.len);
        let created = ms_of(b.created);
        let forced_now = forced.get(&b.vol).is_some_and(|t| created <= *t);
        if forced_now {
            forced_left.insert(b.vol);
        }
        if over || forced_now || now.saturating_sub(created) >= vol.config.tier_after_ms {
            due.push(b);
        }
    }
    node.backlog.0.store(n, Ordering::Relaxed);
    node.backlog.1.store(bytes, Ordering::Relaxed);
    // Requests whose blocks are all gone are done.
    node.tier_now.lock().unwrap_or_else(|p| p.into_inner()).retain(|v, _| forced_left.contains(v));
    let mut done = 0;
    let mut round_err = None;
    // Each volume's blocks go to this site's store of it (else its first store); a batch is
    // recorded with one store, so blocks are grouped by it.
    let mut targets: HashMap<u64, u16> = HashMap::new();
    for b in &due {
        if let std::collections::hash_map::Entry::Vacant(e) = targets.entry(b.vol) {
            e.insert(node.tier_store(b.vol).await);
        }
    }
    due.sort_by_key(|b| targets.get(&b.vol).copied().unwrap_or(0));
    let batches: Vec<(u16, Vec<StagedBlock>)> = due
        .chunk_by(|a, b| targets.get(&a.vol) == targets.get(&b.vol))
        .flat_map(|same| {
            let store = targets.get(&same[0].vol).copied().unwrap_or(0);
            same.chunks(TIER_BATCH).map(move |c| (store, c.to_vec()))
        })
        .collect();
    for (store, batch) in batches {
        let results: Vec<(StagedBlock, Result<(), CacheError>)> =
            futures::stream::iter(batch.iter().cloned())
                .map(|b| {
                    let node = node.clone();
                    async move {
                        let r = upload(&node, &b, store).await;
                        (b, r)
                    }
                })
                .buffer_unordered(TIER_CONCURRENCY)
                .collect()
                .await;
        let mut ok = Vec::new();
        let mut first_err = None;
        for (b, r) in results {
            match r {
                Ok(()) => ok.push(b),
                Err(e) => {
                    tracing::warn!(slice = b.slice, index = b.index, error = %e, "tiering a block failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        if !ok.is_empty() {
            let blocks = ok.iter().map(|b| (b.slice, b.index)).collect();
            match node.meta.mark_tiered(store, blocks).await {
                Ok(()) => {}
                Err(ClientError::Fs(Errno::EROFS)) => {
                    // A migration made that store a read-only source after the roles were
                    // read: read them again and tier these blocks to the new store next round
                    // (what was uploaded to the old one is left for the source's deletion).
                    tracing::info!(
                        store,
                        "the store no longer takes new blocks; reading the volume's stores again"
                    );
                    node.forget_site_maps();
                    round_err.get_or_insert(CacheError::Meta(ClientError::Fs(Errno::EROFS)));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            done += ok.len();
            for b in &ok {
                free_copies(&node, b).await;
            }
        }
        // A block that fails now is retried next round; the other batches go on.
        if let Some(e) = first_err {
            round_err.get_or_insert(e);
        }
    }
    match round_err {
        Some(e) if done == 0 => Err(e),
        _ => Ok(done),
    }
}

/// Uploads one block to store `store` of its volume.
async fn upload(node: &Node, b: &StagedBlock, store: u16) -> Result<(), CacheError> {
    let vol = node.vols.get(b.vol).await?;
    let store = node.vols.store(b.vol, store).await?;
    let data = node.staged_bytes(b).await?;
    let c = vol.compression();
    let encoded = tokio::task::spawn_blocking(move || encode_block(&data, c))
        .await
        .map_err(|e| CacheError::Internal(format!("encoder: {e}")))?;
    let key = BlockKey { cluster: vol.key_tag, vol: b.vol, slice: b.slice, index: b.index, len: b.len };
    store.put(&key, Bytes::from(encoded)).await?;
    Ok(())
}

/// After a block is recorded tiered: drop every staged copy (best effort; reconcile catches
/// the ones that fail) and keep it in the read cache here.
async fn free_copies(node: &Node, b: &StagedBlock) {
    let id = (b.slice, b.index);
    if let Ok(Some((_, d))) = node.staging.get(id).await {
        node.cache.insert(id, &d);
    }
    if let Err(e) = node.staging.remove(id).await {
        tracing::warn!(error = %e, "freeing a tiered block");
    }
    for n in b.nodes.iter().filter(|n| **n != node.cfg.node_id) {
        if let Some(addr) = node.addr_of(*n) {
            let r = BlockRef { vol: b.vol, slice: b.slice, index: b.index };
            if let Err(e) = node.peers.delete(&addr, r).await {
                tracing::debug!(node = n, error = %e, "freeing a tiered block on a peer");
            }
        }
    }
}
