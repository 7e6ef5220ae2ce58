//! Keeping staging and metadata in agreement: copies metadata no longer needs here are
//! dropped, and copies it lists here but that are missing or damaged are reported lost.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use elea_metadata::MetaApi as _;

use super::{Worker, ms_of};
use crate::error::CacheError;
use crate::node::Node;
use crate::node::staging::{BlockId, now_ms};

/// Drops the staged copies metadata no longer lists here (tiered, replaced, deleted or never
/// committed), each after a grace period; then scrubs: every block metadata lists here,
/// committed longer than the same grace ago, must have its staged file of the right size,
/// and one that does not is reported lost (repair restores it).
pub(crate) struct Reconcile {
    node: Arc<Node>,
}

impl Reconcile {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Every block metadata lists on this node, committed longer than the stale grace ago (so
    /// no put in flight can race it: a node is listed only after its copy was stored), must
    /// be staged here with a file of the right size. The ones that are not are reported
    /// lost; repair then copies them back from another holder.
    async fn scrub(&self) -> Result<usize, CacheError> {
        let node = &self.node;
        let me = node.cfg.node_id;
        let grace = node.cfg.stale_grace.as_millis() as u64;
        let now = now_ms();
        let mine: Vec<BlockId> = node
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
        let lost = node.staging.scrub(mine).await?;
        Ok(node.report_lost(&lost).await)
    }

    async fn drop_unlisted(&self) -> Result<usize, CacheError> {
        let node = &self.node;
        let me = node.cfg.node_id;
        let now = now_ms();
        let grace = node.cfg.stale_grace.as_millis() as u64;
        let orphan = node.cfg.orphan_grace.as_millis() as u64;
        let gc_delay = node.cfg.gc_delay.as_millis() as u64;
        let old: Vec<_> = node
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
            node.meta.slice_locs(&ids).await?.into_iter().collect();
        let mut dropped = 0;
        for ((slice, index), m) in old {
            let age = now.saturating_sub(m.created_ms);
            let drop = match locs.get(&slice).and_then(|l| l.as_ref()) {
                None => age >= orphan,
                Some(l) => match (l.deleted, l.blocks.get(index as usize)) {
                    (Some(t), _) => now.saturating_sub(ms_of(t)) >= gc_delay,
                    (None, None) => true,
                    (None, Some(b)) => !b.tiered.is_empty() || !b.nodes.contains(&me),
                },
            };
            if drop {
                tracing::debug!(slice, index, "dropping a staged copy metadata no longer needs here");
                node.staging.remove((slice, index)).await?;
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::info!(dropped, "dropped staged copies metadata no longer needs here");
        }
        Ok(dropped)
    }
}

impl Worker for Reconcile {
    const NAME: &'static str = "reconcile";

    fn period(&self) -> Duration {
        self.node.cfg.reconcile_interval
    }

    /// Drops unneeded local copies, compacts the staging log, then scrubs; one failing does
    /// not stop the others.
    async fn round(&mut self) -> Result<usize, CacheError> {
        let dropped = self.drop_unlisted().await;
        if let Err(e) = &dropped {
            tracing::warn!(error = %e, "dropping unneeded staged copies failed");
        }
        if let Err(e) = self.node.staging.compact().await {
            tracing::warn!(error = %e, "compacting the staging log failed");
        }
        let scrubbed = self.scrub().await;
        Ok(dropped? + scrubbed?)
    }
}

/// Reports the copies staging found lost (discarded at open, or on a read) as soon as they
/// are queued; a report that fails is left to the scrub.
pub(crate) struct LostCopies {
    node: Arc<Node>,
}

impl LostCopies {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

impl Worker for LostCopies {
    const NAME: &'static str = "lost-copies";

    fn period(&self) -> Duration {
        self.node.cfg.reconcile_interval
    }

    async fn round(&mut self) -> Result<usize, CacheError> {
        let lost = self.node.staging.take_lost();
        if lost.is_empty() {
            return Ok(0);
        }
        Ok(self.node.report_lost(&lost).await)
    }

    fn woken(&self) -> impl Future<Output = ()> + Send + 'static {
        let staging = self.node.staging.clone();
        async move { staging.lost_queued().await }
    }
}
