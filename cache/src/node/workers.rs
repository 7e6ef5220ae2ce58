//! Background workers of a cache node. Each runs rounds on a period, backs off while the
//! metadata service or an object store fails, and stops with the node.
//!
//! - **tiering**: uploads the staged blocks this node is primary for (the first live node
//!   in the block's replica list) once they are older than the volume's `tier-after`, when
//!   staging is above its high watermark, or on request; records them tiered in one
//!   metadata proposal per batch; only then frees every staged copy.
//! - **repair** (re-replication): for a block with fewer live copies than its volume's
//!   replica count, the first live holder copies it to the next node in placement order and
//!   records the new replica.
//! - **gc**: on the lowest-numbered live node only, deletes the blocks of slices deleted
//!   longer than the delay ago (staged copies and objects), then forgets the slices.
//!   Incremental: it pages through the metadata list of deleted slices, never a bucket. A
//!   slice whose object delete fails is retried after a delay that doubles per failure, up
//!   to five minutes, instead of every round.
//! - **reconcile**: drops staged copies metadata no longer lists here (tiered, replaced,
//!   deleted, or never committed), each after a grace period. Then it scrubs: every block
//!   metadata lists here, committed longer than the same grace ago, must have its staged
//!   file (of the right size); for one that does not, this node leaves the block's holder
//!   list (`DropReplica`) so repair restores the missing copy.
//! - **lost copies**: a copy staging discards as torn or corrupt (at open or on a read) is
//!   reported the same way as soon as it is found (best effort: the scrub catches a report
//!   that fails).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use elea_fsm::StagedBlock;
use elea_metadata::MetaApi as _;
use elea_store::{BlockKey, encode_block};
use futures::StreamExt as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::CacheError;
use crate::node::staging::{BlockId, now_ms};
use crate::node::{Node, sleep_or_stop};
use crate::placement::rank;
use crate::proto::{BlockRef, GetRequest};

/// Most blocks one tiering batch uploads before recording them.
const TIER_BATCH: usize = 64;
/// Uploads in flight per node.
const TIER_CONCURRENCY: usize = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait before garbage collection retries a slice whose object delete keeps failing.
const GC_MAX_BACKOFF_MS: u64 = 5 * 60 * 1000;

/// When garbage collection retries each slice whose object delete failed: a delay that
/// starts at the GC period and doubles per failure up to [`GC_MAX_BACKOFF_MS`], so a delete
/// that keeps failing (no permission, a removed store) costs one attempt every few minutes
/// instead of one every round.
#[derive(Debug, Default)]
pub(crate) struct GcBackoff {
    /// Slice id → (next attempt, milliseconds since the epoch; current delay).
    slices: HashMap<u64, (u64, u64)>,
}

impl GcBackoff {
    fn contains(&self, id: u64) -> bool {
        self.slices.contains_key(&id)
    }

    /// Whether a slice may be tried at `now`.
    fn due(&self, id: u64, now: u64) -> bool {
        self.slices.get(&id).is_none_or(|(next, _)| now >= *next)
    }

    /// Records a failed attempt at `now`; returns the delay before the next one.
    fn failed(&mut self, id: u64, now: u64, base_ms: u64) -> u64 {
        let base = base_ms.clamp(1, GC_MAX_BACKOFF_MS);
        let e = self.slices.entry(id).or_insert((now, 0));
        e.1 = if e.1 == 0 { base } else { e.1.saturating_mul(2).min(GC_MAX_BACKOFF_MS) };
        e.0 = now.saturating_add(e.1);
        e.1
    }

    fn done(&mut self, id: u64) {
        self.slices.remove(&id);
    }

    /// Keeps only the slices in `seen` (the others left the deleted list some other way).
    fn retain(&mut self, seen: &HashSet<u64>) {
        self.slices.retain(|id, _| seen.contains(id));
    }
}

fn ms_of(t: elea_common::Timespec) -> u64 {
    u64::try_from(t.sec).unwrap_or(0) * 1000 + u64::from(t.nsec) / 1_000_000
}

/// Starts every worker.
pub(crate) fn spawn_all(node: &Arc<Node>, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let mut v = Vec::new();
    let n = node.clone();
    v.push(tokio::spawn(run("tiering", n.cfg.tier_interval, stop.clone(), n.clone(), |n| {
        Box::pin(async move { n.tier_round().await })
    })));
    v.push(tokio::spawn(run("repair", n.cfg.repair_interval, stop.clone(), n.clone(), |n| {
        Box::pin(async move { n.repair_round().await })
    })));
    v.push(tokio::spawn(run("gc", n.cfg.gc_interval, stop.clone(), n.clone(), |n| {
        Box::pin(async move { n.gc_round().await })
    })));
    v.push(tokio::spawn(run("reconcile", n.cfg.reconcile_interval, stop.clone(), n.clone(), |n| {
        Box::pin(async move { n.reconcile_round().await })
    })));
    v.push(tokio::spawn(report_lost_loop(n, stop.clone())));
    v
}

/// Reports the copies staging found lost (discarded at open, or on a read) as soon as they
/// are queued.
async fn report_lost_loop(node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    loop {
        let lost = node.staging.take_lost();
        if !lost.is_empty() {
            node.report_lost(&lost).await;
        }
        tokio::select! {
            _ = node.staging.lost_queued() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

type Round = std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize, CacheError>> + Send>>;

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPhase {
    /// Waiting for its next round.
    Idle,
    /// In a round.
    Busy,
    /// Waiting longer than its period after failed rounds.
    Backoff,
}

impl WorkerPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Backoff => "backoff",
        }
    }
}

/// A worker's state as `elea status` shows it.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub phase: WorkerPhase,
    pub rounds: u64,
    /// Items the last successful round handled.
    pub last_items: u64,
    pub consecutive_errors: u64,
    pub last_error: Option<(String, std::time::Instant)>,
}

impl WorkerStatus {
    fn new() -> Self {
        Self { phase: WorkerPhase::Idle, rounds: 0, last_items: 0, consecutive_errors: 0, last_error: None }
    }
}

/// Every worker's status, by name (what the block service's `Workers` call reports).
#[derive(Debug, Default)]
pub struct WorkerBoard(std::sync::Mutex<std::collections::BTreeMap<&'static str, WorkerStatus>>);

impl WorkerBoard {
    fn update(&self, name: &'static str, f: impl FnOnce(&mut WorkerStatus)) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(name).or_insert_with(WorkerStatus::new));
    }

    /// A copy of every worker's status, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, WorkerStatus)> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}

/// The shared worker shape: a round every `period`, exponential backoff after a failure,
/// an early wake-up for tiering requests, a clean stop; every round's outcome recorded on
/// the node's [`WorkerBoard`].
async fn run(
    name: &'static str,
    period: Duration,
    mut stop: watch::Receiver<bool>,
    node: Arc<Node>,
    round: impl Fn(Arc<Node>) -> Round,
) {
    let mut wait = period;
    node.workers.update(name, |_| {});
    loop {
        let wake = node.tier_wake.notified();
        node.workers.update(name, |w| w.phase = WorkerPhase::Busy);
        match round(node.clone()).await {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(worker = name, items = n, "round done");
                }
                wait = period;
                node.workers.update(name, |w| {
                    w.phase = WorkerPhase::Idle;
                    w.rounds += 1;
                    w.last_items = n as u64;
                    w.consecutive_errors = 0;
                });
            }
            Err(e) => {
                wait = (wait * 2).min(MAX_BACKOFF);
                tracing::warn!(worker = name, error = %e, retry_in = ?wait, "round failed");
                node.workers.update(name, |w| {
                    w.phase = WorkerPhase::Backoff;
                    w.rounds += 1;
                    w.consecutive_errors += 1;
                    w.last_error = Some((e.to_string(), std::time::Instant::now()));
                });
            }
        }
        if name == "tiering" {
            tokio::select! {
                stopping = sleep_or_stop(&mut stop, wait) => if stopping { return },
                _ = wake => {}
            }
        } else if sleep_or_stop(&mut stop, wait).await {
            return;
        }
    }
}

impl Node {
    fn alive_set(&self) -> HashSet<u64> {
        self.registry().into_iter().filter(|n| n.alive).map(|n| n.id).collect()
    }

    fn primary_of(&self, b: &StagedBlock, alive: &HashSet<u64>) -> Option<u64> {
        b.nodes.iter().copied().find(|n| alive.contains(n))
    }

    /// A staged block's bytes: from here, or from another holder.
    async fn staged_bytes(&self, b: &StagedBlock) -> Result<Vec<u8>, CacheError> {
        if let Ok(Some((_, d))) = self.staging.get((b.slice, b.index)).await {
            return Ok(d);
        }
        let peers: Vec<String> =
            b.nodes.iter().filter(|n| **n != self.cfg.node_id).filter_map(|n| self.addr_of(*n)).collect();
        let req = GetRequest {
            block: Some(BlockRef { vol: b.vol, slice: b.slice, index: b.index }),
            len: b.len,
            tiered_store: None,
            peers,
            cache: false,
            range: None,
        };
        self.read_block(&req).await
    }

    /// Uploads one block to the volume's first store.
    async fn upload(&self, b: &StagedBlock) -> Result<(), CacheError> {
        let vol = self.vols.get(b.vol).await?;
        let store = vol
            .stores
            .first()
            .ok_or_else(|| CacheError::NotFound(format!("volume {} has no store", b.vol)))?;
        let data = self.staged_bytes(b).await?;
        let c = vol.compression();
        let encoded = tokio::task::spawn_blocking(move || encode_block(&data, c))
            .await
            .map_err(|e| CacheError::Internal(format!("encoder: {e}")))?;
        let key = BlockKey { vol: b.vol, slice: b.slice, index: b.index, len: b.len };
        store.put(&key, Bytes::from(encoded)).await?;
        Ok(())
    }

    pub(crate) async fn tier_round(self: Arc<Self>) -> Result<usize, CacheError> {
        let me = self.cfg.node_id;
        let alive = self.alive_set();
        if !alive.contains(&me) {
            return Ok(0);
        }
        let blocks = self.meta.staged_blocks().await?;
        let forced = self.tier_now.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let over = self.staging.fill() > self.cfg.high_watermark;
        let now = now_ms();
        let mut due = Vec::new();
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut forced_left: HashSet<u64> = HashSet::new();
        for b in blocks {
            if self.primary_of(&b, &alive) != Some(me) {
                continue;
            }
            let vol = match self.vols.get(b.vol).await {
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
        self.backlog.0.store(n, Ordering::Relaxed);
        self.backlog.1.store(bytes, Ordering::Relaxed);
        // Requests whose blocks are all gone are done.
        self.tier_now.lock().unwrap_or_else(|p| p.into_inner()).retain(|v, _| forced_left.contains(v));
        let mut done = 0;
        let mut round_err = None;
        for batch in due.chunks(TIER_BATCH) {
            let results: Vec<(StagedBlock, Result<(), CacheError>)> =
                futures::stream::iter(batch.iter().cloned())
                    .map(|b| {
                        let node = self.clone();
                        async move {
                            let r = node.upload(&b).await;
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
                self.meta.mark_tiered(0, blocks).await?;
                done += ok.len();
                for b in &ok {
                    self.free_copies(b).await;
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

    /// After a block is recorded tiered: drop every staged copy (best effort; reconcile
    /// catches the ones that fail) and keep it in the read cache here.
    async fn free_copies(&self, b: &StagedBlock) {
        let id = (b.slice, b.index);
        if let Ok(Some((_, d))) = self.staging.get(id).await {
            self.cache.insert(id, &d);
        }
        if let Err(e) = self.staging.remove(id).await {
            tracing::warn!(error = %e, "freeing a tiered block");
        }
        for n in b.nodes.iter().filter(|n| **n != self.cfg.node_id) {
            if let Some(addr) = self.addr_of(*n) {
                let r = BlockRef { vol: b.vol, slice: b.slice, index: b.index };
                if let Err(e) = self.peers.delete(&addr, r).await {
                    tracing::debug!(node = n, error = %e, "freeing a tiered block on a peer");
                }
            }
        }
    }

    pub(crate) async fn repair_round(self: Arc<Self>) -> Result<usize, CacheError> {
        let me = self.cfg.node_id;
        let reg = self.registry();
        if !reg.iter().any(|n| n.id == me && n.alive) {
            return Ok(0);
        }
        let alive = self.alive_set();
        let blocks = self.meta.staged_blocks().await?;
        let mut repaired = 0;
        let mut failed = None;
        for b in blocks {
            let holders: Vec<u64> = b.nodes.iter().copied().filter(|n| alive.contains(n)).collect();
            if holders.first() != Some(&me) {
                continue;
            }
            let want = match self.vols.get(b.vol).await {
                Ok(v) => usize::from(v.config.replicas),
                Err(e) => {
                    tracing::warn!(vol = b.vol, error = %e, "cannot read the volume's policy");
                    continue;
                }
            };
            if holders.len() >= want {
                continue;
            }
            let candidates: Vec<u64> = reg
                .iter()
                .filter(|n| n.alive && n.site == self.cfg.site && !b.nodes.contains(&n.id))
                .map(|n| n.id)
                .collect();
            let Some(target) = rank(b.slice, b.index, &candidates).first().copied() else {
                tracing::warn!(
                    slice = b.slice,
                    index = b.index,
                    have = holders.len(),
                    want,
                    "no node to re-replicate to"
                );
                continue;
            };
            let Some(addr) = self.addr_of(target) else { continue };
            // One block that cannot be copied now must not hold up the others.
            match self.copy_to(&b, target, &addr, &alive).await {
                Ok(old) => {
                    tracing::info!(slice = b.slice, index = b.index, to = target, replaced = ?old, "re-replicated a block");
                    repaired += 1;
                }
                Err(e) => {
                    tracing::warn!(slice = b.slice, index = b.index, to = target, error = %e, "re-replication failed");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) if repaired == 0 => Err(e),
            _ => Ok(repaired),
        }
    }

    /// Copies a staged block to `target` and records it there; returns the dead holder it
    /// replaced, if any.
    async fn copy_to(
        &self,
        b: &StagedBlock,
        target: u64,
        addr: &str,
        alive: &HashSet<u64>,
    ) -> Result<Option<u64>, CacheError> {
        let data = match self.staging.get((b.slice, b.index)).await {
            Ok(Some((_, d))) => d,
            _ => self.staged_bytes(b).await?,
        };
        let crc = crc32c::crc32c(&data);
        let r = BlockRef { vol: b.vol, slice: b.slice, index: b.index };
        self.peers.put(addr, r, Bytes::from(data), crc).await?;
        let old = b.nodes.iter().copied().find(|n| !alive.contains(n));
        self.meta.replace_replica(b.slice, b.index, old, target).await?;
        Ok(old)
    }

    pub(crate) async fn gc_round(self: Arc<Self>) -> Result<usize, CacheError> {
        let reg = self.registry();
        if reg.iter().filter(|n| n.alive).map(|n| n.id).min() != Some(self.cfg.node_id) {
            return Ok(0);
        }
        let delay = u64::try_from(self.cfg.gc_delay.as_millis()).unwrap_or(u64::MAX);
        let base = u64::try_from(self.cfg.gc_interval.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        let mut after = 0;
        let mut forgotten = 0;
        // Slices with a retry schedule still on the deleted list.
        let mut backing_off = HashSet::new();
        loop {
            let (page, more) = self.meta.pending_deletes(after, 256).await?;
            let mut forget = Vec::new();
            for (id, t, loc) in page {
                after = id;
                if now.saturating_sub(ms_of(t)) < delay {
                    continue;
                }
                {
                    let b = self.gc_backoff.lock().unwrap_or_else(|p| p.into_inner());
                    if b.contains(id) {
                        backing_off.insert(id);
                        if !b.due(id, now) {
                            continue;
                        }
                    }
                }
                let Some(l) = loc else {
                    forget.push(id);
                    continue;
                };
                let mut ok = true;
                for (i, b) in l.blocks.iter().enumerate() {
                    let index = i as u32;
                    let len = elea_fsm::block_len(l.len, index);
                    if let Some(s) = b.tiered {
                        let key = BlockKey { vol: l.vol, slice: id, index, len };
                        let r = match self.vols.store(l.vol, s).await {
                            Ok(store) => store.delete(&key).await.map_err(CacheError::from),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = r {
                            tracing::warn!(slice = id, index, error = %e, "deleting an object failed");
                            ok = false;
                        }
                    }
                    for n in &b.nodes {
                        if let Some(addr) = self.addr_of(*n) {
                            let r = BlockRef { vol: l.vol, slice: id, index };
                            if let Err(e) = self.peers.delete(&addr, r).await {
                                // A node that is down drops the copy itself (reconcile).
                                tracing::debug!(node = n, error = %e, "deleting a staged copy");
                            }
                        }
                    }
                }
                if ok {
                    forget.push(id);
                } else {
                    let wait =
                        self.gc_backoff.lock().unwrap_or_else(|p| p.into_inner()).failed(id, now, base);
                    backing_off.insert(id);
                    tracing::warn!(slice = id, retry_in_ms = wait, "collecting a deleted slice failed");
                }
            }
            if !forget.is_empty() {
                forgotten += forget.len();
                self.meta.forget_slices(forget.clone()).await?;
                let mut b = self.gc_backoff.lock().unwrap_or_else(|p| p.into_inner());
                for id in forget {
                    b.done(id);
                    backing_off.remove(&id);
                }
            }
            if !more {
                self.gc_backoff.lock().unwrap_or_else(|p| p.into_inner()).retain(&backing_off);
                return Ok(forgotten);
            }
        }
    }

    /// Tells metadata this node no longer holds these blocks' staged copies, one proposal
    /// each; a failure is logged and left to the next scrub. Returns how many were recorded.
    pub(crate) async fn report_lost(&self, ids: &[BlockId]) -> usize {
        let me = self.cfg.node_id;
        let mut n = 0;
        for &(slice, index) in ids {
            match self.meta.drop_replica(slice, index, me).await {
                Ok(()) => {
                    tracing::warn!(slice, index, "lost a staged copy: removed this node from its holders");
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(slice, index, error = %e, "reporting a lost staged copy failed; the scrub retries")
                }
            }
        }
        n
    }

    /// Drops unneeded local copies, then scrubs; one failing does not stop the other.
    pub(crate) async fn reconcile_round(self: Arc<Self>) -> Result<usize, CacheError> {
        let dropped = self.drop_unlisted().await;
        if let Err(e) = &dropped {
            tracing::warn!(error = %e, "dropping unneeded staged copies failed");
        }
        let scrubbed = self.scrub().await;
        Ok(dropped? + scrubbed?)
    }

    /// Every block metadata lists on this node, committed longer than the stale grace ago (so
    /// no put in flight can race it: a node is listed only after its copy was stored), must
    /// be staged here with a file of the right size. The ones that are not are reported
    /// lost; repair then copies them back from another holder.
    async fn scrub(&self) -> Result<usize, CacheError> {
        let me = self.cfg.node_id;
        let grace = self.cfg.stale_grace.as_millis() as u64;
        let now = now_ms();
        let mine: Vec<BlockId> = self
            .meta
            .staged_blocks()
            .await?
            .into_iter()
            .filter(|b| b.nodes.contains(&me) && now.saturating_sub(ms_of(b.created)) >= grace)
            .map(|b| (b.slice, b.index))
            .collect();
        if mine.is_empty() {
            return Ok(0);
        }
        let lost = self.staging.scrub(mine).await?;
        Ok(self.report_lost(&lost).await)
    }

    async fn drop_unlisted(&self) -> Result<usize, CacheError> {
        let me = self.cfg.node_id;
        let now = now_ms();
        let grace = self.cfg.stale_grace.as_millis() as u64;
        let orphan = self.cfg.orphan_grace.as_millis() as u64;
        let gc_delay = self.cfg.gc_delay.as_millis() as u64;
        let old: Vec<_> = self
            .staging
            .list()
            .into_iter()
            .filter(|(_, m)| now.saturating_sub(m.created_ms) >= grace)
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        let ids: Vec<u64> = old.iter().map(|(id, _)| id.0).collect::<HashSet<_>>().into_iter().collect();
        let locs: HashMap<u64, Option<elea_fsm::SliceLoc>> =
            self.meta.slice_locs(&ids).await?.into_iter().collect();
        let mut dropped = 0;
        for ((slice, index), m) in old {
            let age = now.saturating_sub(m.created_ms);
            let drop = match locs.get(&slice).and_then(|l| l.as_ref()) {
                None => age >= orphan,
                Some(l) => match (l.deleted, l.blocks.get(index as usize)) {
                    (Some(t), _) => now.saturating_sub(ms_of(t)) >= gc_delay,
                    (None, None) => true,
                    (None, Some(b)) => b.tiered.is_some() || !b.nodes.contains(&me),
                },
            };
            if drop {
                tracing::debug!(slice, index, "dropping a staged copy metadata no longer needs here");
                self.staging.remove((slice, index)).await?;
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::info!(dropped, "dropped staged copies metadata no longer needs here");
        }
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = GcBackoff::default();
        assert!(b.due(7, 0));
        assert_eq!(b.failed(7, 1000, 300), 300);
        assert!(!b.due(7, 1299) && b.due(7, 1300) && b.due(8, 1000));
        assert_eq!(b.failed(7, 1300, 300), 600);
        assert!(!b.due(7, 1899) && b.due(7, 1900));
        let mut last = 0;
        for i in 0..20 {
            last = b.failed(7, 2000 + i, 300);
        }
        assert_eq!(last, GC_MAX_BACKOFF_MS);
        assert!(!b.due(7, 2019 + GC_MAX_BACKOFF_MS - 1) && b.due(7, 2019 + GC_MAX_BACKOFF_MS));
        // A base above the cap is capped; a zero base still waits.
        assert_eq!(b.failed(9, 0, u64::MAX), GC_MAX_BACKOFF_MS);
        assert_eq!(b.failed(10, 0, 0), 1);
        b.done(7);
        assert!(b.due(7, 0));
        assert_eq!(b.failed(7, 0, 300), 300, "a success starts the schedule over");
        b.retain(&HashSet::from([7]));
        assert!(b.contains(7) && !b.contains(9) && !b.contains(10));
    }
}
