//! `elea site`: declare and list sites.

use anyhow::Context as _;
use elea_metadata::MetaApi as _;
use elea_metadata::client::ClientError;
use serde_json::json;

use crate::cli::{SiteCmd, client};

pub(crate) async fn site(cmd: SiteCmd) -> anyhow::Result<()> {
    match cmd {
        SiteCmd::Add { name, meta } => {
            super::meta::check_site_name("site", &name)?;
            match client(&meta)?.add_site(&name).await {
                Ok(()) => println!("added site {name:?}"),
                Err(ClientError::Fs(elea_common::Errno::EEXIST)) => {
                    anyhow::bail!("site {name:?} exists already")
                }
                Err(e) => return Err(e).with_context(|| format!("adding site {name:?}")),
            }
        }
        SiteCmd::List { meta, json: as_json } => {
            let c = client(&meta)?;
            let map = c.sites().await.context("reading the site map")?;
            let cache = c.cache_nodes().await.context("listing the cache nodes")?;
            let vols = c.list_volumes().await.context("listing the volumes")?;
            let rows: Vec<_> = map
                .sites
                .iter()
                .map(|site| {
                    let meta: Vec<u64> =
                        map.meta_nodes.iter().filter(|(_, s, _)| s == site).map(|(id, _, _)| *id).collect();
                    let cache_ids: Vec<u64> =
                        cache.iter().filter(|n| &n.site == site).map(|n| n.id).collect();
                    let alive = cache.iter().filter(|n| &n.site == site && n.alive).count();
                    let homed: Vec<String> = vols
                        .iter()
                        .filter(|v| map.home(v.id) == Some(site))
                        .map(|v| v.name.clone())
                        .collect();
                    (site, meta, cache_ids, alive, homed)
                })
                .collect();
            if as_json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(site, meta, cache, alive, homed)| {
                        json!({"name": site, "meta_nodes": meta, "cache_nodes": cache,
                               "cache_nodes_alive": alive, "volumes": homed})
                    })
                    .collect();
                println!("{}", json!({ "sites": list }));
            } else {
                println!(
                    "{:<16} {:<16} {:<20} volumes homed here",
                    "site", "meta nodes", "cache nodes (alive)"
                );
                for (site, meta, cache, alive, homed) in rows {
                    let ids = |v: &[u64]| {
                        if v.is_empty() {
                            "-".to_string()
                        } else {
                            v.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
                        }
                    };
                    println!(
                        "{:<16} {:<16} {:<20} {}",
                        site,
                        ids(&meta),
                        format!("{} ({alive})", ids(&cache)),
                        if homed.is_empty() { "-".to_string() } else { homed.join(", ") }
                    );
                }
            }
        }
    }
    Ok(())
}
