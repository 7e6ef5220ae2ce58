//! `elea meta`: one metadata node.

use anyhow::{Context as _, bail};
use elea_metadata::client::parse_addrs;
use elea_metadata::server::{MetaNodeConfig, parse_initial_cluster, serve};

use super::shutdown_signal;
use crate::cli::MetaArgs;

pub(crate) async fn run_meta(a: MetaArgs) -> anyhow::Result<()> {
    let advertise = a.advertise.clone().unwrap_or_else(|| a.listen.clone());
    let mut cfg = MetaNodeConfig::new(a.node_id, advertise, a.data_dir.clone());
    if let Some(ic) = &a.initial_cluster {
        cfg.initial_cluster = parse_initial_cluster(ic)?;
    }
    if let Some(j) = &a.join {
        cfg.join = parse_addrs(j)?;
    }
    if a.snapshot_every == 0 {
        bail!("--snapshot-every must be positive");
    }
    cfg.snapshot_every = a.snapshot_every;
    cfg.compact_margin = a.compact_margin;
    cfg.tls = a.tls.load()?;
    check_site_name("--site", &a.site)?;
    cfg.site = a.site.clone();
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("cannot listen on {}", a.listen))?;
    tracing::info!(
        node = a.node_id,
        site = %a.site,
        listen = %a.listen,
        dir = %a.data_dir.display(),
        tls = cfg.tls.is_some(),
        "metadata server starting"
    );
    serve(cfg, listener, shutdown_signal()).await?;
    Ok(())
}

/// A site name as the site map takes it: 1 to 64 ASCII letters, digits, `.`, `_` or `-`.
pub(crate) fn check_site_name(what: &str, site: &str) -> anyhow::Result<()> {
    let ok = !site.is_empty()
        && site.len() <= elea_fsm::limits::SITE_NAME_MAX
        && site.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !ok {
        bail!(
            "{what} {site:?}: a site name is 1 to {} ASCII letters, digits, '.', '_' or '-'",
            elea_fsm::limits::SITE_NAME_MAX
        );
    }
    Ok(())
}
