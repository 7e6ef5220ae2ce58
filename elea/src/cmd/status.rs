//! `elea status`: every metadata node's Raft state and the cache node registry.

use anyhow::bail;
use elea_metadata::MetaApi as _;
use elea_metadata::client::{MetaClient, parse_addrs};
use serde_json::json;

use crate::cli::{StatusArgs, client};

pub(crate) async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let c = client(&a.meta)?;
    let addrs = parse_addrs(&a.meta.meta)?;
    let any_up = print_status(&c, &a.meta.tls.block_clients()?, &addrs, a.json).await?;
    if !any_up {
        bail!("no metadata node answered at {}", a.meta.meta);
    }
    Ok(())
}

/// Prints every node's status (the given addresses plus every member any node knows).
/// Returns whether any node answered.
pub(crate) async fn print_status(
    c: &MetaClient,
    peers: &elea_cache::client::BlockClients,
    addrs: &[String],
    as_json: bool,
) -> anyhow::Result<bool> {
    let mut seen: Vec<String> = addrs.to_vec();
    let mut rows = Vec::new();
    let mut i = 0;
    while i < seen.len() {
        let addr = seen[i].clone();
        i += 1;
        match c.status_of(&addr).await {
            Ok(s) => {
                for m in &s.members {
                    if !seen.contains(&m.addr) {
                        seen.push(m.addr.clone());
                    }
                }
                rows.push((addr, Ok(s)));
            }
            Err(e) => rows.push((addr, Err(e))),
        }
    }
    // Members that did not answer are listed by id from whoever knows them.
    let book: Vec<(u64, String, bool)> = rows
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flat_map(|s| s.members.iter().map(|m| (m.node_id, m.addr.clone(), m.learner)))
        .collect();
    let id_of = |addr: &str| book.iter().find(|(_, a, _)| a == addr).map(|(id, _, _)| *id);
    let leader = rows
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
        .map(|s| s.node_id);
    let any_up = rows.iter().any(|(_, r)| r.is_ok());
    // Sites and volumes, when the cluster can answer (it has a leader).
    let map = if any_up { c.sites().await.ok() } else { None };
    let vols = if map.is_some() { c.list_volumes().await.unwrap_or_default() } else { Vec::new() };
    let control = rows.iter().find_map(|(_, r)| r.as_ref().ok()).map_or(0, |s| s.group_id);
    // Each volume's group and its leader: the control group's for a volume that lives there.
    let groups = if map.is_some() {
        c.volume_group_list(true).await.map(|l| (*l).clone()).unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut placed: std::collections::HashMap<u64, (u64, Option<u64>)> = std::collections::HashMap::new();
    for v in &vols {
        let g = elea_fsm::group_of_volume(&groups, v.id);
        let l = match groups.iter().find(|r| r.group == g) {
            Some(rec) => group_leader(c, rec).await,
            None => leader,
        };
        placed.insert(v.id, (if g == 1 { control } else { g }, l));
    }
    let placed_of = |vol: u64| placed.get(&vol).copied().unwrap_or((control, leader));
    // The cache node registry, read once for every table below.
    let registry = if any_up { c.cache_nodes().await.map_err(|e| e.to_string()) } else { Ok(Vec::new()) };
    let site_of = |id: Option<u64>| -> Option<String> { Some(map.as_ref()?.meta_site(id?)?.to_string()) };
    if as_json {
        let nodes: Vec<_> = rows
            .iter()
            .map(|(addr, r)| match r {
                Ok(s) => json!({
                    "node_id": s.node_id, "site": site_of(Some(s.node_id)), "addr": addr, "reachable": true, "role": s.role,
                    "term": s.term, "commit_index": s.commit_index, "applied_index": s.applied_index,
                    "leader_id": s.leader_id, "first_index": s.first_index, "last_index": s.last_index,
                    "snapshot_index": s.snapshot_index,
                    "learner": s.members.iter().any(|m| m.node_id == s.node_id && m.learner),
                }),
                Err(e) => json!({
                    "node_id": id_of(addr), "site": site_of(id_of(addr)), "addr": addr, "reachable": false, "error": e.to_string(),
                }),
            })
            .collect();
        let members: Vec<_> = dedup_book(&book)
            .into_iter()
            .map(|(id, a, l)| json!({"node_id": id, "addr": a, "learner": l}))
            .collect();
        let cache = match &registry {
            Ok(nodes) => print_cache_nodes(nodes, peers, true).await,
            Err(_) => json!([]),
        };
        let volumes: Vec<_> = vols
            .iter()
            .map(|v| {
                let (group, leader) = placed_of(v.id);
                json!({"id": v.id, "name": v.name, "home_site": map.as_ref().and_then(|m| m.home(v.id)),
                       "group": group, "leader_node": leader, "leader_site": site_of(leader)})
            })
            .collect();
        let sites = sites_json(map.as_ref(), &book, &cache, &vols);
        let transfers: Vec<_> = transfers(registry.as_deref().unwrap_or_default(), peers)
            .await
            .into_iter()
            .map(
                |(from, to, bytes, blocks)| json!({"from": from, "to": to, "bytes": bytes, "blocks": blocks}),
            )
            .collect();
        println!(
            "{}",
            json!({ "leader_id": leader, "leader_site": site_of(leader), "nodes": nodes, "members": members,
                    "cache_nodes": cache, "sites": sites, "volumes": volumes, "transfers": transfers })
        );
    } else {
        println!(
            "{:>4}  {:<12} {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  reachable",
            "node", "site", "address", "role", "term", "commit", "applied", "leader"
        );
        // Grouped by site: the rows of each site together, in the order sites first appear.
        let mut order: Vec<(String, usize)> = rows
            .iter()
            .enumerate()
            .map(|(i, (addr, r))| {
                let id = r.as_ref().ok().map(|s| s.node_id).or_else(|| id_of(addr));
                (site_of(id).unwrap_or_else(|| "-".into()), i)
            })
            .collect();
        order.sort();
        for (site, i) in order {
            let (addr, r) = &rows[i];
            match r {
                Ok(s) => println!(
                    "{:>4}  {:<12} {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  yes",
                    s.node_id, site, addr, s.role, s.term, s.commit_index, s.applied_index, s.leader_id
                ),
                Err(_) => println!(
                    "{:>4}  {:<12} {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  no",
                    id_of(addr).map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
                    site,
                    addr,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-"
                ),
            }
        }
        match &registry {
            Ok(nodes) => {
                print_cache_nodes(nodes, peers, false).await;
            }
            Err(e) => println!("cache nodes: unknown ({e})"),
        }
        if let Some(m) = &map {
            println!();
            println!("{:<12} {:>10} {:>12}  volumes homed here", "site", "meta nodes", "cache nodes");
            let cache = registry.as_deref().unwrap_or_default();
            for site in &m.sites {
                let metas = m.meta_nodes.iter().filter(|(_, s, _)| s == site).count();
                let caches = cache.iter().filter(|n| &n.site == site).count();
                let homed: Vec<&str> =
                    vols.iter().filter(|v| m.home(v.id) == Some(site)).map(|v| v.name.as_str()).collect();
                println!(
                    "{:<12} {:>10} {:>12}  {}",
                    site,
                    metas,
                    caches,
                    if homed.is_empty() { "-".to_string() } else { homed.join(", ") }
                );
            }
            let moved = transfers(cache, peers).await;
            if !moved.is_empty() {
                println!();
                println!(
                    "{:<12} {:<12} {:>14} {:>10}  (fetched across sites by cache nodes)",
                    "from", "to", "MiB", "blocks"
                );
                for (from, to, bytes, blocks) in moved {
                    println!(
                        "{:<12} {:<12} {:>14.1} {:>10}",
                        from,
                        to,
                        bytes as f64 / (1 << 20) as f64,
                        blocks
                    );
                }
            }
            if !vols.is_empty() {
                println!();
                println!("{:<24} {:<12} {:>6}  leader", "volume", "home site", "group");
                for v in &vols {
                    let (group, leader) = placed_of(v.id);
                    println!(
                        "{:<24} {:<12} {:>6}  {}",
                        v.name,
                        m.home(v.id).unwrap_or("-"),
                        group,
                        match leader {
                            Some(l) =>
                                format!("node {l} in site {}", site_of(Some(l)).unwrap_or_else(|| "?".into())),
                            None => "none".into(),
                        }
                    );
                }
            }
        }
    }
    Ok(any_up)
}

/// The leader of a volume's own group, as the first of its members that answers knows it.
async fn group_leader(c: &MetaClient, rec: &elea_fsm::GroupRecord) -> Option<u64> {
    let gc = c.for_group(rec.group);
    for (_, addr, _) in rec.members() {
        let asked = tokio::time::timeout(std::time::Duration::from_secs(2), gc.status_of(&addr)).await;
        if let Ok(Ok(s)) = asked
            && s.leader_id != 0
        {
            return Some(s.leader_id);
        }
    }
    None
}

pub(crate) fn dedup_book(book: &[(u64, String, bool)]) -> Vec<(u64, String, bool)> {
    let mut out: Vec<(u64, String, bool)> = Vec::new();
    for b in book {
        if !out.iter().any(|o| o.0 == b.0) {
            out.push(b.clone());
        }
    }
    out.sort();
    out
}

/// Prints the cache node registry `nodes` with each live node's workers; returns it as JSON.
async fn print_cache_nodes(
    nodes: &[elea_fsm::CacheNodeInfo],
    peers: &elea_cache::client::BlockClients,
    as_json: bool,
) -> serde_json::Value {
    // Each live node's workers, asked of the node itself (a node that does not answer shows
    // none).
    let mut workers = Vec::with_capacity(nodes.len());
    for n in nodes {
        let w = if n.alive {
            match tokio::time::timeout(std::time::Duration::from_secs(2), peers.workers(&n.addr)).await {
                Ok(Ok(w)) => w,
                _ => Vec::new(),
            }
        } else {
            Vec::new()
        };
        workers.push(w);
    }
    let list: Vec<_> = nodes
        .iter()
        .zip(&workers)
        .map(|(n, ws)| {
            let s = &n.stats;
            let reads = s.read_hits + s.read_misses;
            let ws: Vec<_> = ws
                .iter()
                .map(|w| {
                    json!({
                        "name": w.name, "state": w.state, "rounds": w.rounds, "last_items": w.last_items,
                        "consecutive_errors": w.consecutive_errors,
                        "last_error": if w.last_error.is_empty() { serde_json::Value::Null } else { json!(w.last_error) },
                        "last_error_age_ms": w.last_error_age_ms,
                    })
                })
                .collect();
            json!({
                "node_id": n.id, "site": n.site, "addr": n.addr, "alive": n.alive,
                "staged_bytes": s.staged_bytes, "staged_blocks": s.staged_blocks,
                "staging_capacity": s.staging_capacity, "oldest_staged_ms": s.oldest_staged_ms,
                "read_hits": s.read_hits, "read_misses": s.read_misses,
                "read_hit_ratio": if reads == 0 { serde_json::Value::Null } else { json!(s.read_hits as f64 / reads as f64) },
                "tier_backlog_blocks": s.tier_backlog_blocks, "tier_backlog_bytes": s.tier_backlog_bytes,
                "workers": ws,
            })
        })
        .collect();
    if !as_json && !nodes.is_empty() {
        println!();
        println!(
            "{:>5}  {:<10} {:<22} {:<5} {:>12} {:>10} {:>9} {:>14}  workers",
            "cache", "site", "address", "alive", "staged MiB", "oldest s", "hit %", "backlog blocks"
        );
        for (n, ws) in nodes.iter().zip(&workers) {
            let s = &n.stats;
            let reads = s.read_hits + s.read_misses;
            let ws: Vec<String> = ws
                .iter()
                .map(|w| match w.consecutive_errors {
                    0 => format!("{} {}", w.name, w.state),
                    e => format!("{} {} ({e} failed: {})", w.name, w.state, w.last_error),
                })
                .collect();
            println!(
                "{:>5}  {:<10} {:<22} {:<5} {:>12} {:>10} {:>9} {:>14}  {}",
                n.id,
                n.site,
                n.addr,
                if n.alive { "yes" } else { "no" },
                s.staged_bytes >> 20,
                s.oldest_staged_ms / 1000,
                if reads == 0 {
                    "-".to_string()
                } else {
                    format!("{:.1}", 100.0 * s.read_hits as f64 / reads as f64)
                },
                s.tier_backlog_blocks,
                if ws.is_empty() { "-".to_string() } else { ws.join(", ") }
            );
        }
    }
    json!(list)
}

/// Each site with its metadata nodes (Raft members whose recorded site it is), its cache
/// nodes and the volumes homed in it.
fn sites_json(
    map: Option<&elea_fsm::SiteMap>,
    book: &[(u64, String, bool)],
    cache: &serde_json::Value,
    vols: &[elea_fsm::VolumeInfo],
) -> serde_json::Value {
    let Some(m) = map else { return json!([]) };
    let members = dedup_book(book);
    let list: Vec<_> = m
        .sites
        .iter()
        .map(|site| {
            let meta: Vec<u64> =
                members.iter().map(|b| b.0).filter(|id| m.meta_site(*id) == Some(site)).collect();
            let caches: Vec<&serde_json::Value> = cache
                .as_array()
                .map(|a| {
                    a.iter().filter(|n| n["site"].as_str() == Some(site)).map(|n| &n["node_id"]).collect()
                })
                .unwrap_or_default();
            let homed: Vec<&str> =
                vols.iter().filter(|v| m.home(v.id) == Some(site)).map(|v| v.name.as_str()).collect();
            json!({"name": site, "meta_nodes": meta, "cache_nodes": caches, "volumes": homed})
        })
        .collect();
    json!(list)
}

/// Bytes and blocks the live cache nodes fetched across sites since they started, per
/// (from, to) site pair.
async fn transfers(
    nodes: &[elea_fsm::CacheNodeInfo],
    peers: &elea_cache::client::BlockClients,
) -> Vec<(String, String, u64, u64)> {
    let mut pairs: std::collections::BTreeMap<(String, String), (u64, u64)> = Default::default();
    for n in nodes.iter().filter(|n| n.alive) {
        let Ok(Ok(from)) =
            tokio::time::timeout(std::time::Duration::from_secs(2), peers.from_sites(&n.addr)).await
        else {
            continue;
        };
        for (site, bytes, blocks) in from {
            let e = pairs.entry((site, n.site.clone())).or_default();
            e.0 += bytes;
            e.1 += blocks;
        }
    }
    pairs.into_iter().map(|((f, t), (b, n))| (f, t, b, n)).collect()
}
