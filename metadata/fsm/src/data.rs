//! The data path's metadata: volume placement policies, the cache node registry, where each
//! slice's blocks live (staged on cache nodes, tiered in an object store), and the deleted
//! slices that wait for garbage collection.
//!
//! Blocks never change, so this is the only state the data path needs to agree on: a block
//! is readable from any node or store listed here. As in the namespace, every mutating
//! function validates first and changes the state only when nothing can fail any more.

use std::ops::Bound;

pub use elea_common::layout::{block_len, blocks_of};
use elea_common::{Errno, SliceId, Timespec, VolumeId};

use crate::state::{CacheNode, State};
use crate::types::{
    BlockCodec, BlockLoc, CacheNodeInfo, CacheStats, OpResult, Reply, Slice, SliceLoc, StagedBlock, StoreSet,
    VolumeConfig, limits,
};

type R<T> = Result<T, Errno>;

/// Milliseconds from `a` to `b` (0 when `b` is not later).
pub fn millis_between(a: Timespec, b: Timespec) -> u64 {
    let na = i128::from(a.sec) * 1_000_000_000 + i128::from(a.nsec);
    let nb = i128::from(b.sec) * 1_000_000_000 + i128::from(b.nsec);
    u64::try_from((nb - na).max(0) / 1_000_000).unwrap_or(u64::MAX)
}

/// A volume's placement policy is valid: 1..=REPLICAS_MAX replicas, at most STORES_MAX
/// distinct non-empty store URLs, a zstd level in 1..=22.
pub(crate) fn check_config(c: &VolumeConfig) -> R<()> {
    if c.replicas == 0 || c.replicas > limits::REPLICAS_MAX || c.stores.len() > limits::STORES_MAX {
        return Err(Errno::EINVAL);
    }
    for (i, s) in c.stores.iter().enumerate() {
        if s.is_empty() || s.len() > limits::STORE_URL_MAX || c.stores[..i].contains(s) {
            return Err(Errno::EINVAL);
        }
    }
    if let BlockCodec::Zstd(l) = c.compression
        && !(1..=22).contains(&l)
    {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

fn check_batch<T>(items: &[T]) -> R<()> {
    if items.is_empty() || items.len() > limits::BATCH_MAX { Err(Errno::EINVAL) } else { Ok(()) }
}

impl State {
    /// `staged` (one node list per block of `slice`) is well formed and names registered
    /// nodes; a slice seen before must belong to the same volume.
    pub(crate) fn check_staged(&self, vol: VolumeId, slice: &Slice, staged: &[Vec<u64>]) -> R<()> {
        if let Some(l) = self.slices.locs.get(&slice.id) {
            return if l.vol == vol { Ok(()) } else { Err(Errno::EINVAL) };
        }
        if staged.is_empty() {
            return Ok(());
        }
        if staged.len() != blocks_of(slice.slice_len) {
            return Err(Errno::EINVAL);
        }
        for nodes in staged {
            if nodes.is_empty() || nodes.len() > usize::from(limits::REPLICAS_MAX) {
                return Err(Errno::EINVAL);
            }
            for (i, n) in nodes.iter().enumerate() {
                if !self.cache_nodes.contains_key(n) || nodes[..i].contains(n) {
                    return Err(Errno::EINVAL);
                }
            }
        }
        Ok(())
    }

    /// Record where a new slice's blocks are (checked by [`State::check_staged`]).
    pub(crate) fn record_loc(&mut self, vol: VolumeId, slice: &Slice, staged: &[Vec<u64>], now: Timespec) {
        if staged.is_empty() || self.slices.locs.contains_key(&slice.id) {
            return;
        }
        let blocks = staged.iter().map(|n| BlockLoc { nodes: n.clone(), tiered: StoreSet::EMPTY }).collect();
        self.slices
            .locs
            .insert(slice.id, SliceLoc { vol, len: slice.slice_len, created: now, deleted: None, blocks });
    }

    pub(crate) fn register_cache_node(
        &mut self,
        id: u64,
        site: &str,
        addr: &str,
        incarnation: u64,
        now: Timespec,
    ) -> OpResult {
        crate::sites::check_site(site)?;
        if id == 0 || addr.is_empty() || addr.len() > limits::NODE_ADDR_MAX {
            return Err(Errno::EINVAL);
        }
        let lost = self.cache_nodes.get(&id).is_some_and(|n| n.incarnation != incarnation);
        if lost
            && self
                .cache_nodes
                .get(&id)
                .is_some_and(|n| millis_between(n.last_seen, now) <= limits::CACHE_DEAD_AFTER_MS)
        {
            // Another process with this id is alive (or was until moments ago): two nodes
            // sharing an id must not take turns wiping each other's copies from the registry.
            return Err(Errno::EBUSY);
        }
        if lost {
            // The node came back without its disk: none of its staged copies exist any more.
            for l in self.slices.locs.values_mut() {
                for b in &mut l.blocks {
                    b.nodes.retain(|n| *n != id);
                }
            }
        }
        let n = self
            .cache_nodes
            .entry(id)
            .or_insert_with(|| CacheNode { registered: now, ..CacheNode::default() });
        if lost {
            n.registered = now;
            n.stats = CacheStats::default();
        }
        n.site = site.to_string();
        n.addr = addr.to_string();
        // A node's site is known from then on (never fails: checked above, and a cluster
        // whose site table is full refuses nothing that registers in a known site).
        let _ = self.sites.ensure(site);
        n.incarnation = incarnation;
        n.last_seen = now;
        Ok(Reply::Ok)
    }

    pub(crate) fn cache_heartbeat(
        &mut self,
        id: u64,
        incarnation: u64,
        stats: &CacheStats,
        now: Timespec,
    ) -> OpResult {
        match self.cache_nodes.get_mut(&id) {
            Some(n) if n.incarnation == incarnation => {
                n.last_seen = now;
                n.stats = stats.clone();
                Ok(Reply::Ok)
            }
            _ => Err(Errno::ESTALE),
        }
    }

    pub(crate) fn mark_tiered(&mut self, store: u16, blocks: &[(SliceId, u32)]) -> OpResult {
        check_batch(blocks)?;
        for (id, index) in blocks {
            let Some(l) = self.slices.locs.get(id) else { continue };
            let stores = self.volumes.get(&l.vol).map_or(0, |v| v.config.stores.len());
            if usize::from(store) >= stores || *index as usize >= l.blocks.len() {
                return Err(Errno::EINVAL);
            }
            // A migration's source (or a detached store) takes no new objects: the node
            // tiering there read the volume's stores before the migration began.
            if !self.store_writable(l.vol, store) {
                return Err(Errno::EROFS);
            }
        }
        for (id, index) in blocks {
            if self.is_inline(*id) {
                // Nothing holds a copy to upload yet.
                continue;
            }
            if let Some(b) = self.slices.locs.get_mut(id).and_then(|l| l.blocks.get_mut(*index as usize)) {
                b.tiered.insert(store);
                b.nodes.clear();
            }
        }
        Ok(Reply::Ok)
    }

    pub(crate) fn replace_replica(
        &mut self,
        slice: SliceId,
        index: u32,
        old: Option<u64>,
        new: u64,
    ) -> OpResult {
        if !self.cache_nodes.contains_key(&new) {
            return Err(Errno::EINVAL);
        }
        if old == Some(new) || self.is_inline(slice) {
            return Ok(Reply::Ok);
        }
        let Some(l) = self.slices.locs.get_mut(&slice) else { return Ok(Reply::Ok) };
        let Some(b) = l.blocks.get_mut(index as usize) else { return Err(Errno::EINVAL) };
        if l.deleted.is_some() || !b.tiered.is_empty() {
            return Ok(Reply::Ok);
        }
        let has_new = b.nodes.contains(&new);
        match old.and_then(|o| b.nodes.iter().position(|n| *n == o)) {
            Some(i) if has_new => {
                b.nodes.remove(i);
            }
            Some(i) => b.nodes[i] = new,
            None if !has_new => b.nodes.push(new),
            None => {}
        }
        Ok(Reply::Ok)
    }

    pub(crate) fn drop_replica(&mut self, slice: SliceId, index: u32, node: u64) -> OpResult {
        let Some(l) = self.slices.locs.get_mut(&slice) else { return Ok(Reply::Ok) };
        if l.deleted.is_some() {
            return Ok(Reply::Ok);
        }
        if let Some(b) = l.blocks.get_mut(index as usize)
            && b.tiered.is_empty()
        {
            b.nodes.retain(|n| *n != node);
        }
        Ok(Reply::Ok)
    }

    pub(crate) fn forget_slices(&mut self, ids: &[SliceId]) -> OpResult {
        check_batch(ids)?;
        for id in ids {
            if self.slices.to_delete.remove(id).is_some() {
                self.slices.locs.remove(id);
                self.inline.remove(*id);
            }
        }
        Ok(Reply::Ok)
    }

    pub(crate) fn cache_nodes(&self) -> OpResult {
        let nodes = self
            .cache_nodes
            .iter()
            .map(|(id, n)| CacheNodeInfo {
                id: *id,
                site: n.site.clone(),
                addr: n.addr.clone(),
                incarnation: n.incarnation,
                registered: n.registered,
                last_seen: n.last_seen,
                alive: millis_between(n.last_seen, self.clock) <= limits::CACHE_DEAD_AFTER_MS,
                stats: n.stats.clone(),
            })
            .collect();
        Ok(Reply::CacheNodes(nodes))
    }

    pub(crate) fn slice_locs(&self, ids: &[SliceId]) -> OpResult {
        check_batch(ids)?;
        Ok(Reply::SliceLocs(ids.iter().map(|id| (*id, self.slices.locs.get(id).cloned())).collect()))
    }

    pub(crate) fn staged_blocks(&self, after: (SliceId, u32), limit: u32) -> OpResult {
        let limit = (limit as usize).clamp(1, limits::BATCH_MAX);
        let mut out = Vec::new();
        for (id, l) in self.slices.locs.range(after.0..) {
            if l.deleted.is_some() {
                continue;
            }
            for (i, b) in l.blocks.iter().enumerate() {
                let index = i as u32;
                if (*id, index) <= after || !b.tiered.is_empty() {
                    continue;
                }
                if out.len() == limit {
                    return Ok(Reply::Blocks { blocks: out, more: true });
                }
                out.push(StagedBlock {
                    vol: l.vol,
                    slice: *id,
                    index,
                    len: block_len(l.len, index),
                    created: l.created,
                    nodes: b.nodes.clone(),
                });
            }
        }
        Ok(Reply::Blocks { blocks: out, more: false })
    }

    pub(crate) fn pending_deletes(&self, after: SliceId, limit: u32) -> OpResult {
        let limit = (limit as usize).clamp(1, limits::BATCH_MAX);
        let mut it = self.slices.to_delete.range((Bound::Excluded(after), Bound::Unbounded));
        let slices: Vec<_> =
            it.by_ref().take(limit).map(|(id, t)| (*id, *t, self.slices.locs.get(id).cloned())).collect();
        Ok(Reply::Deletes { slices, more: it.next().is_some() })
    }
}
