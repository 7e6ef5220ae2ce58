//! The store prober: every volume's object stores must take writes, reads and deletes from
//! this node, and be this cluster's.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use elea_metadata::MetaApi as _;

use super::Worker;
use crate::error::CacheError;
use crate::node::Node;

/// Probes each object store of every volume (an object written, read back and deleted; see
/// `Store::probe`) when the node starts and every `store_probe_interval` after. A store that
/// fails makes the round fail: the worker board, and so `elea status`, shows the volume, the
/// store and the error, long before a growing tiering backlog would. A store another cluster
/// claimed (`Store::check_owner`) fails too; one nobody claimed is claimed for this cluster.
pub(crate) struct StoreProbe {
    node: Arc<Node>,
}

impl StoreProbe {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

impl Worker for StoreProbe {
    const NAME: &'static str = "stores";

    fn period(&self) -> Duration {
        self.node.cfg.store_probe_interval
    }

    async fn round(&mut self) -> Result<usize, CacheError> {
        let node = &self.node;
        let who = format!("cache-{}", node.cfg.node_id);
        let mut seen = HashSet::new();
        let mut failed = Vec::new();
        // A cluster that made its identity since this node started: name it in the data
        // directory too.
        if let Err(e) = node.check_data_dir().await {
            failed.push(e.to_string());
        }
        let ours = node.vols.identity().await?.map(|i| i.cluster_hex());
        for v in node.meta.list_volumes().await? {
            // A store a migration detached is not used any more (it may be gone).
            let detached = node.site_map(v.id).await.map(|m| m.roles(v.id).detached).unwrap_or_default();
            for (i, url) in v.config.stores.iter().enumerate() {
                let i = i as u16;
                if detached.contains(i) || !seen.insert(url.clone()) {
                    continue;
                }
                let store = match node.vols.store(v.id, i).await {
                    Ok(s) => s,
                    Err(e) => {
                        failed.push(format!("volume {:?} store {url}: {e}", v.name));
                        continue;
                    }
                };
                let checked = async {
                    store.probe(&who).await?;
                    store.check_owner(ours.as_deref()).await?;
                    match &ours {
                        Some(o) => store.claim(o).await,
                        None => Ok(()),
                    }
                };
                if let Err(e) = checked.await {
                    tracing::warn!(volume = %v.name, store = store.url(), error = %e, "an object store failed its check");
                    failed.push(format!("volume {:?} store {}: {e}", v.name, store.url()));
                }
            }
        }
        if failed.is_empty() { Ok(seen.len()) } else { Err(CacheError::StoresFailing(failed.join("; "))) }
    }
}
