//! The repair worker: restores the replica count of staged blocks that lost a copy.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use elea_fsm::StagedBlock;
use elea_metadata::MetaApi as _;

use super::Worker;
use crate::error::CacheError;
use crate::node::Node;
use crate::placement::rank;
use crate::proto::BlockRef;

/// Re-replication: for a staged block with fewer live copies than its volume's replica
/// count, the first live holder copies it to the next node of the site in placement order
/// and records the new replica (in place of a dead one, if any).
pub(crate) struct Repair {
    node: Arc<Node>,
}

impl Repair {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
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
        let node = &self.node;
        let data = match node.staging.get((b.slice, b.index)).await {
            Ok(Some((_, d))) => d,
            _ => node.staged_bytes(b).await?,
        };
        let crc = crc32c::crc32c(&data);
        let r = BlockRef { vol: b.vol, slice: b.slice, index: b.index };
        node.peers.put(addr, r, Bytes::from(data), crc).await?;
        let old = b.nodes.iter().copied().find(|n| !alive.contains(n));
        node.meta.replace_replica(b.slice, b.index, old, target).await?;
        Ok(old)
    }
}

impl Worker for Repair {
    const NAME: &'static str = "repair";

    fn period(&self) -> Duration {
        self.node.cfg.repair_interval
    }

    async fn round(&mut self) -> Result<usize, CacheError> {
        let node = &self.node;
        let me = node.cfg.node_id;
        let reg = node.registry();
        if !reg.iter().any(|n| n.id == me && n.alive) {
            return Ok(0);
        }
        let alive = node.alive_set();
        let blocks = node.staged_blocks_all().await?;
        let mut repaired = 0;
        let mut failed = None;
        for b in blocks {
            let holders: Vec<u64> = b.nodes.iter().copied().filter(|n| alive.contains(n)).collect();
            if holders.first() != Some(&me) {
                continue;
            }
            let want = match node.vols.get(b.vol).await {
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
                .filter(|n| n.alive && n.site == node.cfg.site && !b.nodes.contains(&n.id))
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
            let Some(addr) = node.addr_of(target) else { continue };
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
}
