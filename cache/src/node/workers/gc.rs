//! The garbage collector: removes the blocks of deleted slices, then forgets the slices.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use elea_metadata::MetaApi as _;

use super::{Worker, ms_of};
use crate::error::CacheError;
use crate::node::Node;
use crate::node::staging::now_ms;
use crate::proto::BlockRef;

/// Longest wait before garbage collection retries a slice whose object delete keeps failing.
const GC_MAX_BACKOFF_MS: u64 = 5 * 60 * 1000;

/// Garbage collection, on the lowest-numbered live node only: deletes the staged copies and
/// objects of slices deleted longer than the node's `gc-delay` ago, then forgets the slices.
/// It pages through the metadata list of deleted slices (never a bucket), and keeps the retry
/// schedule of the slices whose object delete failed.
pub(crate) struct Gc {
    node: Arc<Node>,
    backoff: GcBackoff,
}

impl Gc {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node, backoff: GcBackoff::default() }
    }
}

impl Worker for Gc {
    const NAME: &'static str = "gc";

    fn period(&self) -> Duration {
        self.node.cfg.gc_interval
    }

    async fn round(&mut self) -> Result<usize, CacheError> {
        let node = &self.node;
        let reg = node.registry();
        if reg.iter().filter(|n| n.alive).map(|n| n.id).min() != Some(node.cfg.node_id) {
            return Ok(0);
        }
        let delay = u64::try_from(node.cfg.gc_delay.as_millis()).unwrap_or(u64::MAX);
        let base = u64::try_from(node.cfg.gc_interval.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        let mut forgotten = 0;
        // Slices with a retry schedule still on the deleted list.
        let mut backing_off = HashSet::new();
        // Each group's list on its own: one that cannot answer leaves the others collected.
        let groups = node.group_clients().await;
        let mut first_err = None;
        for meta in &groups {
            match self.collect_group(meta, delay, base, now, &mut backing_off).await {
                Ok(n) => forgotten += n,
                Err(e) => {
                    tracing::warn!(group = meta.group(), error = %e, "collecting a group's deleted slices");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if forgotten == 0 => Err(e),
            _ => {
                if first_err.is_none() {
                    self.backoff.retain(&backing_off);
                }
                Ok(forgotten)
            }
        }
    }
}

impl Gc {
    /// One group's deleted slices older than the delay: their blocks deleted everywhere, then
    /// forgotten. Returns how many were forgotten.
    async fn collect_group(
        &mut self,
        meta: &elea_metadata::client::MetaClient,
        delay: u64,
        base: u64,
        now: u64,
        backing_off: &mut HashSet<u64>,
    ) -> Result<usize, CacheError> {
        let node = self.node.clone();
        let mut after = 0;
        let mut forgotten = 0;
        loop {
            let (page, more) = meta.pending_deletes(after, 256).await?;
            let mut forget = Vec::new();
            for (id, t, loc) in page {
                after = id;
                if now.saturating_sub(ms_of(t)) < delay {
                    continue;
                }
                if self.backoff.contains(id) {
                    backing_off.insert(id);
                    if !self.backoff.due(id, now) {
                        continue;
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
                    for s in b.tiered.iter() {
                        let key = match node.vols.key(l.vol, id, index, len).await {
                            Ok(k) => k,
                            Err(e) => {
                                tracing::warn!(slice = id, error = %e, "cannot name a deleted block's object");
                                ok = false;
                                continue;
                            }
                        };
                        let r = match node.vols.store(l.vol, s).await {
                            Ok(store) => store.delete(&key).await.map_err(CacheError::from),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = r {
                            tracing::warn!(slice = id, index, error = %e, "deleting an object failed");
                            ok = false;
                        }
                    }
                    for n in &b.nodes {
                        if let Some(addr) = node.addr_of(*n) {
                            let r = BlockRef { vol: l.vol, slice: id, index };
                            if let Err(e) = node.peers.delete(&addr, r).await {
                                // A node that is down drops the copy itself (reconcile).
                                tracing::debug!(node = n, error = %e, "deleting a staged copy");
                            }
                        }
                    }
                }
                if ok {
                    forget.push(id);
                } else {
                    let wait = self.backoff.failed(id, now, base);
                    backing_off.insert(id);
                    tracing::warn!(slice = id, retry_in_ms = wait, "collecting a deleted slice failed");
                }
            }
            if !forget.is_empty() {
                forgotten += forget.len();
                meta.forget_slices(forget.clone()).await?;
                for id in forget {
                    self.backoff.done(id);
                    backing_off.remove(&id);
                }
            }
            if !more {
                return Ok(forgotten);
            }
        }
    }
}

/// When garbage collection retries each slice whose object delete failed: a delay that
/// starts at the GC period and doubles per failure up to [`GC_MAX_BACKOFF_MS`], so a delete
/// that keeps failing (no permission, a removed store) costs one attempt every few minutes
/// instead of one every round.
#[derive(Debug, Default)]
struct GcBackoff {
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
