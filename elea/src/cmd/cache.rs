//! `elea cache`: one cache node of a site.

use anyhow::{Context as _, bail};
use elea_metadata::client::parse_addrs;

use super::shutdown_signal;
use crate::cli::CacheArgs;

/// Smallest staging store: writes in flight hold uncommitted blocks (up to a 64 MiB slice
/// each) that tiering cannot free, so staging must hold several of them.
pub(crate) const MIN_STAGING: u64 = 256 << 20;

pub(crate) fn cache_config(a: &CacheArgs) -> anyhow::Result<elea_cache::CacheNodeConfig> {
    if a.staging_size < MIN_STAGING {
        bail!("--staging-size must be at least 256M (writes in flight hold up to 64 MiB each)");
    }
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.clone());
    let mut cfg = elea_cache::CacheNodeConfig::new(
        a.node_id,
        &a.site,
        &advertise,
        a.data_dir.clone(),
        parse_addrs(&a.meta.meta)?,
    );
    cfg.staging_size = a.staging_size;
    cfg.cache_mem = a.cache_mem;
    cfg.cache_disk = a.cache_disk;
    cfg.gc_delay = a.gc_delay;
    cfg.reconcile_interval = a.reconcile_interval;
    cfg.stale_grace = a.stale_grace;
    cfg.tls = a.meta.tls.load()?;
    Ok(cfg)
}

pub(crate) async fn run_cache(a: CacheArgs) -> anyhow::Result<()> {
    let cfg = cache_config(&a)?;
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    tracing::info!(node = a.node_id, site = %a.site, listen = %a.listen, dir = %a.data_dir.display(), "cache node starting");
    elea_cache::serve(cfg, listener, shutdown_signal()).await?;
    Ok(())
}
