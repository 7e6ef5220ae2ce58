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
    if as_json {
        let nodes: Vec<_> = rows
            .iter()
            .map(|(addr, r)| match r {
                Ok(s) => json!({
                    "node_id": s.node_id, "addr": addr, "reachable": true, "role": s.role,
                    "term": s.term, "commit_index": s.commit_index, "applied_index": s.applied_index,
                    "leader_id": s.leader_id, "first_index": s.first_index, "last_index": s.last_index,
                    "snapshot_index": s.snapshot_index,
                    "learner": s.members.iter().any(|m| m.node_id == s.node_id && m.learner),
                }),
                Err(e) => json!({
                    "node_id": id_of(addr), "addr": addr, "reachable": false, "error": e.to_string(),
                }),
            })
            .collect();
        let members: Vec<_> = dedup_book(&book)
            .into_iter()
            .map(|(id, a, l)| json!({"node_id": id, "addr": a, "learner": l}))
            .collect();
        let cache =
            if any_up { print_cache_nodes(c, peers, true).await.unwrap_or(json!([])) } else { json!([]) };
        println!(
            "{}",
            json!({ "leader_id": leader, "nodes": nodes, "members": members, "cache_nodes": cache })
        );
    } else {
        println!(
            "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  reachable",
            "node", "address", "role", "term", "commit", "applied", "leader"
        );
        for (addr, r) in &rows {
            match r {
                Ok(s) => println!(
                    "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  yes",
                    s.node_id, addr, s.role, s.term, s.commit_index, s.applied_index, s.leader_id
                ),
                Err(_) => println!(
                    "{:>4}  {:<22} {:<10} {:>6} {:>10} {:>10} {:>6}  no",
                    id_of(addr).map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
                    addr,
                    "-",
                    "-",
                    "-",
                    "-",
                    "-"
                ),
            }
        }
        if any_up && let Err(e) = print_cache_nodes(c, peers, false).await {
            println!("cache nodes: unknown ({e})");
        }
    }
    Ok(any_up)
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

/// Prints the cache node registry; returns it as JSON.
pub(crate) async fn print_cache_nodes(
    c: &MetaClient,
    peers: &elea_cache::client::BlockClients,
    as_json: bool,
) -> anyhow::Result<serde_json::Value> {
    let nodes = c.cache_nodes().await?;
    // Each live node's workers, asked of the node itself (a node that does not answer shows
    // none).
    let mut workers = Vec::with_capacity(nodes.len());
    for n in &nodes {
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
    Ok(json!(list))
}
