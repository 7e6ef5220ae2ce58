//! `elea tier`: have the cache nodes tier a volume now, and wait for it.

use std::time::Duration;

use anyhow::{Context as _, bail};
use elea_metadata::MetaApi as _;
use elea_metadata::client::MetaClient;

use crate::cli::{TierArgs, client};

/// Asks every live cache node to tier the volume now; with `wait`, returns once no block of
/// the volume is staged any more.
pub async fn tier_volume(
    c: &MetaClient,
    peers: &elea_cache::client::BlockClients,
    vol: &elea_fsm::VolumeInfo,
    wait: bool,
) -> anyhow::Result<()> {
    if vol.config.stores.is_empty() {
        bail!("volume {:?} has no object store: its blocks stay staged", vol.name);
    }
    let mut last_print = std::time::Instant::now();
    loop {
        let nodes = c.cache_nodes().await?;
        let alive: Vec<_> = nodes.iter().filter(|n| n.alive).collect();
        if alive.is_empty() {
            bail!("no cache node is alive");
        }
        for n in &alive {
            if let Err(e) = peers.tier(&n.addr, vol.id).await {
                tracing::warn!(node = n.id, error = %e, "asking a cache node to tier");
            }
        }
        let left: Vec<_> = c.staged_blocks().await?.into_iter().filter(|b| b.vol == vol.id).collect();
        if !wait || left.is_empty() {
            if wait {
                println!("volume {:?}: every block is tiered", vol.name);
            } else {
                println!("volume {:?}: tiering requested ({} blocks staged)", vol.name, left.len());
            }
            return Ok(());
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            let bytes: u64 = left.iter().map(|b| u64::from(b.len)).sum();
            println!("volume {:?}: {} blocks ({} MiB) still staged", vol.name, left.len(), bytes >> 20);
            last_print = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub(crate) async fn tier(a: TierArgs) -> anyhow::Result<()> {
    let c = client(&a.meta)?;
    let vol = c.volume(&a.volume).await.with_context(|| format!("volume {:?}", a.volume))?;
    tier_volume(&c, &a.meta.tls.block_clients()?, &vol, a.wait).await
}
