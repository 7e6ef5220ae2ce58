//! The spill worker: stages inline slices (small writes whose bytes were committed inside
//! the metadata command) on cache nodes like any other slice, and records where, so that
//! their bytes leave the metadata state within moments of their commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use elea_fsm::InlineSlice;
use elea_metadata::MetaApi as _;
use futures::StreamExt as _;

use super::Worker;
use crate::error::CacheError;
use crate::node::Node;
use crate::placement::rank;
use crate::proto::BlockRef;

/// Inline slices asked for per page.
const SPILL_PAGE: u32 = 512;
/// Slices being staged at once.
const SPILL_CONCURRENCY: usize = 16;

/// Spills the inline slices this node is first for in placement order among the live nodes
/// of the slice's volume's home site (every live node when the volume has no home, or its
/// home has none): each goes to the volume's replica count of nodes of this node's site, in
/// the same order a gateway's put would use; one metadata proposal records a page of them.
/// A volume's small files so stay in its home site; spilled anywhere, a site the volume does
/// not live in would hold them, and its loss would stall the volume's readers elsewhere.
pub(crate) struct Spill {
    node: Arc<Node>,
}

impl Spill {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

/// Stages `s` on `replicas` nodes of `site` (live node ids); returns those that hold it.
async fn stage(node: &Node, s: &InlineSlice, site: &[u64]) -> Result<Vec<u64>, CacheError> {
    let want = usize::from(node.vols.get(s.vol).await?.config.replicas);
    let data = Bytes::from(s.data.clone());
    let crc = crc32c::crc32c(&data);
    let block = BlockRef { vol: s.vol, slice: s.slice, index: 0 };
    let mut held = Vec::with_capacity(want);
    let mut last = None;
    for id in rank(s.slice, 0, site) {
        if held.len() == want {
            break;
        }
        let r = if id == node.cfg.node_id {
            node.store_block(block, data.clone(), crc).await
        } else {
            match node.addr_of(id) {
                Some(addr) => node.peers.put(&addr, block, data.clone(), crc).await,
                None => continue,
            }
        };
        match r {
            Ok(()) => held.push(id),
            Err(e) => {
                tracing::debug!(slice = s.slice, node = id, error = %e, "spilling an inline slice to a node failed");
                last = Some(e);
            }
        }
    }
    if held.len() < want {
        return Err(last.unwrap_or_else(|| {
            CacheError::NoNodes(format!(
                "site has {} live cache nodes, the volume needs {want} copies",
                site.len()
            ))
        }));
    }
    Ok(held)
}

impl Worker for Spill {
    const NAME: &'static str = "spill";

    fn period(&self) -> Duration {
        self.node.cfg.spill_interval
    }

    async fn round(&mut self) -> Result<usize, CacheError> {
        let node = &self.node;
        let me = node.cfg.node_id;
        let reg = node.registry();
        if !reg.iter().any(|n| n.id == me && n.alive) {
            return Ok(0);
        }
        let all: Vec<u64> = reg.iter().filter(|n| n.alive).map(|n| n.id).collect();
        let site: Vec<u64> =
            reg.iter().filter(|n| n.alive && n.site == node.cfg.site).map(|n| n.id).collect();
        // The nodes that may spill a volume's slices, by volume.
        let mut spillers: HashMap<u64, Vec<u64>> = HashMap::new();
        let (mut done, mut failed) = (0, None);
        // Each group's inline slices on their own: one that cannot answer leaves the others.
        for meta in node.group_clients().await {
            let mut after = 0;
            loop {
                let (page, more) = match meta.inline_slices(after, SPILL_PAGE).await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(group = meta.group(), error = %e, "listing a group's inline slices");
                        failed.get_or_insert(e.into());
                        break;
                    }
                };
                if let Some(s) = page.last() {
                    after = s.slice;
                }
                for v in page.iter().map(|s| s.vol) {
                    if let std::collections::hash_map::Entry::Vacant(e) = spillers.entry(v) {
                        let home = node.site_map(v).await.and_then(|m| m.home(v).map(str::to_string));
                        let there: Vec<u64> = reg
                            .iter()
                            .filter(|n| n.alive && home.as_deref() == Some(n.site.as_str()))
                            .map(|n| n.id)
                            .collect();
                        e.insert(if there.is_empty() { all.clone() } else { there });
                    }
                }
                let mine: Vec<InlineSlice> = page
                    .into_iter()
                    .filter(|s| rank(s.slice, 0, &spillers[&s.vol]).first() == Some(&me))
                    .collect();
                let site = &site;
                let results: Vec<(u64, Result<Vec<u64>, CacheError>)> = futures::stream::iter(mine)
                    .map(|s| async move { (s.slice, stage(node, &s, site).await) })
                    .buffer_unordered(SPILL_CONCURRENCY)
                    .collect()
                    .await;
                let mut ok = Vec::with_capacity(results.len());
                for (slice, r) in results {
                    match r {
                        Ok(nodes) => ok.push((slice, nodes)),
                        Err(e) => {
                            tracing::warn!(slice, error = %e, "spilling an inline slice failed; retried next round");
                            failed.get_or_insert(e);
                        }
                    }
                }
                if !ok.is_empty() {
                    done += ok.len();
                    meta.spill_inline(ok).await?;
                }
                if !more {
                    break;
                }
            }
        }
        match failed {
            Some(e) if done == 0 => Err(e),
            _ => Ok(done),
        }
    }
}
