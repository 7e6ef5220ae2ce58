//! `elea volume`: create and list volumes.

use anyhow::{Context as _, bail};
use elea_common::Errno;
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientError, MetaClient};
use elea_metadata::proto::change_membership_request::Kind;
use serde_json::json;

use crate::cli::{VolumeCmd, client};

pub(crate) async fn volume(v: VolumeCmd) -> anyhow::Result<()> {
    match v {
        VolumeCmd::Create {
            name,
            meta,
            store,
            replicas,
            tier_after,
            compression,
            shared_file_store,
            no_probe,
            home_site,
            voters,
            spread_voters,
        } => {
            let compression = match compression.parse::<elea_store::Compression>() {
                Ok(elea_store::Compression::None) => elea_fsm::BlockCodec::None,
                Ok(elea_store::Compression::Zstd(l)) => elea_fsm::BlockCodec::Zstd(l),
                Err(e) => bail!("--compression: {e}"),
            };
            if voters == 0 || voters > elea_fsm::limits::GROUP_VOTERS_MAX {
                bail!("--voters must be between 1 and {}", elea_fsm::limits::GROUP_VOTERS_MAX);
            }
            if replicas == 0 || replicas > elea_fsm::limits::REPLICAS_MAX {
                bail!("--replicas must be between 1 and {}", elea_fsm::limits::REPLICAS_MAX);
            }
            let c = client(&meta)?;
            let nodes = c.cache_nodes().await.context("listing the cache nodes")?.len();
            check_stores(&store, nodes, shared_file_store)?;
            if !no_probe {
                probe_stores(&store).await?;
                check_owners(&c, &store).await?;
            }
            let config = elea_fsm::VolumeConfig {
                stores: store,
                replicas,
                tier_after_ms: u64::try_from(tier_after.as_millis()).unwrap_or(u64::MAX),
                compression,
            };
            let stores = config.stores.clone();
            let own_group = home_site.is_some() || spread_voters;
            let home = home_of(&c, home_site).await?;
            let map = c.sites().await.context("reading the site map")?;
            let local_meta = map.meta_nodes.iter().any(|(_, s, _)| *s == home);
            if own_group && (local_meta || spread_voters) {
                let g = c.create_volume_group(&name, config, &home, voters, spread_voters).await.map_err(
                    |e| match e {
                        ClientError::Fs(Errno::ENODEV) => {
                            anyhow::anyhow!("no metadata node has registered yet")
                        }
                        ClientError::Fs(Errno::EEXIST) => anyhow::anyhow!("a volume named {name:?} exists"),
                        e => anyhow::Error::new(e)
                            .context(format!("creating volume {name:?} in site {home:?}")),
                    },
                )?;
                let ids = |v: &[(u64, String)]| {
                    v.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>().join(",")
                };
                println!(
                    "created volume {:?} (id {}) in site {home:?}: raft group {} with voters {} and learners {}",
                    g.name,
                    g.vol,
                    g.group,
                    ids(&g.voters),
                    if g.learners.is_empty() { "none".to_string() } else { ids(&g.learners) }
                );
                // Its members start the group as they learn of it; the volume answers once one
                // of them leads it.
                wait_for_group(&c, &name).await?;
            } else {
                if own_group {
                    println!(
                        "site {home:?} has no metadata node: volume {name:?} lives in the control group \
                         (its metadata calls cross to wherever that group leads)"
                    );
                }
                let vol = c
                    .create_volume_in(&name, config, &home)
                    .await
                    .with_context(|| format!("creating volume {name:?} in site {home:?}"))?;
                println!("created volume {:?} (id {}) in site {home:?}", vol.name, vol.id);
            }
            if !no_probe {
                claim_stores(&c, &stores).await;
            }
        }
        VolumeCmd::AddStore { volume, url, site, meta, no_probe } => {
            // A volume in a Raft group of its own takes the store there.
            let (c, vol) =
                client(&meta)?.volume_client(&volume).await.with_context(|| format!("volume {volume:?}"))?;
            check_stores(std::slice::from_ref(&url), 1, false)?;
            if !no_probe {
                probe_stores(std::slice::from_ref(&url)).await?;
                check_owners(&c, std::slice::from_ref(&url)).await?;
            }
            let after = c.add_store(vol.id, &site, &url).await.map_err(|e| match e {
                ClientError::Fs(Errno::ENOENT) => {
                    anyhow::anyhow!("there is no site {site:?} (elea site add)")
                }
                ClientError::Fs(Errno::EEXIST) => anyhow::anyhow!(
                    "volume {volume:?} has that store already, or site {site:?} has a store for it"
                ),
                ClientError::Fs(Errno::ENOSPC) => {
                    anyhow::anyhow!(
                        "volume {volume:?} has {} stores, the most it may have",
                        elea_fsm::limits::STORES_MAX
                    )
                }
                _ => anyhow::Error::new(e).context(format!("attaching {url} to volume {volume:?}")),
            })?;
            if !no_probe {
                claim_stores(&c, std::slice::from_ref(&url)).await;
            }
            println!(
                "volume {volume:?}: store {} is site {site:?}'s ({} stores)",
                after.config.stores.len() - 1,
                after.config.stores.len()
            );
        }
        VolumeCmd::AddMember { volume, node_id, learner, meta } => {
            let c = client(&meta)?;
            let rec = group_of(&c, &volume).await?;
            if !rec.has_member(node_id) {
                c.add_group_member(rec.vol, node_id, learner).await.map_err(|e| match e {
                    ClientError::Fs(Errno::ENOENT) => {
                        anyhow::anyhow!("metadata node {node_id} has not registered (start it first)")
                    }
                    e => {
                        anyhow::Error::new(e).context(format!("adding node {node_id} to {volume:?}'s group"))
                    }
                })?;
            }
            let map = c.sites().await.context("reading the site map")?;
            let addr = map
                .meta_nodes
                .iter()
                .find(|(id, _, _)| *id == node_id)
                .map(|(_, _, a)| a.clone())
                .context("the node is not in the site map")?;
            let kind = if learner { Kind::AddLearner } else { Kind::AddVoter };
            let members = c
                .for_group(rec.group)
                .change_membership(kind, node_id, &addr)
                .await
                .with_context(|| format!("adding node {node_id} to raft group {}", rec.group))?;
            println!(
                "volume {volume:?}: node {node_id} joined raft group {} as a {} ({} members)",
                rec.group,
                if learner { "learner" } else { "voter" },
                members.len()
            );
        }
        VolumeCmd::RemoveMember { volume, node_id, meta } => {
            let c = client(&meta)?;
            let rec = group_of(&c, &volume).await?;
            let g = c.for_group(rec.group);
            hand_over_if_leader(&g, &rec, node_id).await?;
            let members = g
                .change_membership(Kind::Remove, node_id, "")
                .await
                .with_context(|| format!("removing node {node_id} from raft group {}", rec.group))?;
            if rec.has_member(node_id) {
                c.remove_group_member(rec.vol, node_id).await.map_err(|e| match e {
                    ClientError::Fs(Errno::EBUSY) => {
                        anyhow::anyhow!("node {node_id} is the group's last member")
                    }
                    e => anyhow::Error::new(e).context(format!("recording that node {node_id} left")),
                })?;
            }
            println!(
                "volume {volume:?}: node {node_id} left raft group {} ({} members)",
                rec.group,
                members.len()
            );
        }
        VolumeCmd::Move(a) => crate::cmd::volume_move::move_volume(a).await?,
        VolumeCmd::List { meta, json: as_json } => {
            let c = client(&meta)?;
            let vols = c.list_volumes().await?;
            let groups = c.volume_group_list(false).await.map(|l| (*l).clone()).unwrap_or_default();
            let group = |id: u64| elea_fsm::group_of_volume(&groups, id);
            if as_json {
                let list: Vec<_> = vols
                    .iter()
                    .map(|v| {
                        json!({"id": v.id, "name": v.name, "inodes": v.inodes, "used_bytes": v.used_bytes,
                                    "change_seq": v.change_seq, "created": v.created.sec,
                                    "stores": v.config.stores, "replicas": v.config.replicas,
                                    "tier_after_ms": v.config.tier_after_ms, "group": group(v.id),
                                    "compression": codec_name(v.config.compression)})
                    })
                    .collect();
                println!("{}", json!({ "volumes": list }));
            } else {
                println!(
                    "{:>4}  {:<24} {:>10} {:>14} {:>3} {:>10} {:<8} stores",
                    "id", "name", "inodes", "used bytes", "R", "tier after", "codec"
                );
                for v in vols {
                    println!(
                        "{:>4}  {:<24} {:>10} {:>14} {:>3} {:>9}s {:<8} {}",
                        v.id,
                        v.name,
                        v.inodes,
                        v.used_bytes,
                        v.config.replicas,
                        v.config.tier_after_ms / 1000,
                        codec_name(v.config.compression),
                        v.config.stores.join(",")
                    );
                }
            }
        }
    }
    Ok(())
}

/// The sites that have metadata nodes.
fn meta_sites(map: &elea_fsm::SiteMap) -> Vec<String> {
    let mut v: Vec<String> = map.meta_nodes.iter().map(|(_, s, _)| s.clone()).collect();
    v.sort();
    v.dedup();
    v
}

/// The home site of a new volume: the one named, which must exist; else the cluster's only
/// site, or the only site with metadata nodes.
/// The record of volume `name`'s own group (an error for a volume of the control group).
pub(crate) async fn group_of(c: &MetaClient, name: &str) -> anyhow::Result<elea_fsm::GroupRecord> {
    let list = c.volume_group_list(true).await.context("reading the volume groups")?;
    match list.iter().find(|r| r.name == name) {
        Some(r) => Ok(r.clone()),
        None => bail!(
            "volume {name:?} has no raft group of its own (it lives in the control group: \
             `elea cluster add/remove` change that one)"
        ),
    }
}

/// When node `id` leads `rec`'s group, hands the leadership to another voter first (and waits
/// for it, up to 10 s): a leader that removes itself would go on leading a group it is not in.
async fn hand_over_if_leader(g: &MetaClient, rec: &elea_fsm::GroupRecord, id: u64) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut known = None;
        for (_, addr, _) in rec.members() {
            if let Ok(Ok(s)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), g.status_of(&addr)).await
                && s.leader_id != 0
            {
                known = Some(s);
                break;
            }
        }
        let Some(s) = known else {
            if std::time::Instant::now() > deadline {
                bail!("raft group {} has no leader to change its members", rec.group);
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        };
        if s.leader_id != id {
            return Ok(());
        }
        let Some(to) = s.members.iter().find(|m| !m.learner && m.node_id != id).map(|m| m.node_id) else {
            bail!("node {id} is raft group {}'s only voter: add another voter first", rec.group);
        };
        g.transfer_leader(to)
            .await
            .with_context(|| format!("handing raft group {} to node {to}", rec.group))?;
        if std::time::Instant::now() > deadline {
            bail!("node {id} still leads raft group {} after 10 s", rec.group);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Waits (up to 30 s) until volume `name`'s new group answers.
async fn wait_for_group(c: &MetaClient, name: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match c.volume_client(name).await {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(
                    anyhow::Error::new(e).context(format!("volume {name:?}'s raft group did not start"))
                );
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

pub(crate) async fn home_of(c: &MetaClient, named: Option<String>) -> anyhow::Result<String> {
    let mut map = c.sites().await.context("reading the site map")?;
    // Metadata nodes record their sites as they start: a cluster started a moment ago may
    // not have done so yet (wait up to 5 s for the first).
    for _ in 0..50 {
        if !map.meta_nodes.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        map = c.sites().await.context("reading the site map")?;
    }
    match named {
        Some(s) if map.sites.contains(&s) => Ok(s),
        Some(s) => bail!(
            "--home-site {s:?}: there is no such site (sites: {}; `elea site add` declares one)",
            if map.sites.is_empty() { "none yet".to_string() } else { map.sites.join(", ") }
        ),
        None if map.sites.len() == 1 => Ok(map.sites[0].clone()),
        // Where its metadata lives, when that is one site.
        None if meta_sites(&map).len() == 1 => Ok(meta_sites(&map).swap_remove(0)),
        None if map.sites.is_empty() => {
            bail!("the cluster knows no site yet (its metadata nodes record theirs as they start)")
        }
        None => {
            bail!("this cluster spans sites {}: name the volume's with --home-site", map.sites.join(", "))
        }
    }
}

/// Refuses stores that would lose tiered blocks: `memory://` (one process's memory, for
/// tests), and a node-local `file://` directory while several cache nodes could tier to it
/// (each would write its own directory, and the others would not find those blocks), unless
/// the directory is said to be shared.
pub(crate) fn check_stores(
    urls: &[String],
    cache_nodes: usize,
    shared_file_store: bool,
) -> anyhow::Result<()> {
    for url in urls {
        elea_store::Store::open(url, &elea_store::StoreConfig::default())
            .with_context(|| format!("--store {url}"))?;
        if url.starts_with("memory://") {
            bail!(
                "--store {url}: a memory:// store keeps objects in one process's memory, so tiered \
                 blocks would be lost when it stops (it is for tests)"
            );
        }
        if url.starts_with("file://") && cache_nodes > 1 && !shared_file_store {
            bail!(
                "--store {url}: a file:// store is a directory on each cache node's own host, and \
                 {cache_nodes} cache nodes are registered: blocks one of them tiers would be missing \
                 on the others. Use an object store every node reaches, or --shared-file-store if \
                 this directory is one file system that every cache node sees"
            );
        }
    }
    Ok(())
}

/// Refuses stores another cluster claimed (`Store::check_owner`): two clusters on one bucket
/// and prefix would otherwise mix their objects.
pub(crate) async fn check_owners(c: &MetaClient, urls: &[String]) -> anyhow::Result<()> {
    let ours = c.data_identity().await.context("reading the cluster's identity")?.map(|i| i.cluster_hex());
    for url in urls {
        let store = elea_store::Store::open(url, &elea_store::StoreConfig::default())?;
        store.check_owner(ours.as_deref()).await.with_context(|| format!("--store {url}"))?;
    }
    Ok(())
}

/// Claims each store for this cluster (after a volume on them was created, so the cluster has
/// its identity). A store that cannot be claimed from here is claimed by the cache nodes'
/// store checks.
pub(crate) async fn claim_stores(c: &MetaClient, urls: &[String]) {
    let Ok(Some(id)) = c.data_identity().await else { return };
    for url in urls {
        let claimed = match elea_store::Store::open(url, &elea_store::StoreConfig::default()) {
            Ok(s) => s.claim(&id.cluster_hex()).await.map_err(anyhow::Error::from),
            Err(e) => Err(e.into()),
        };
        if let Err(e) = claimed {
            tracing::warn!(store = %url, error = %e, "could not mark the store as this cluster's");
        }
    }
}

/// Writes, reads back and deletes a probe object in each store, from this host.
pub(crate) async fn probe_stores(urls: &[String]) -> anyhow::Result<()> {
    for url in urls {
        let store = elea_store::Store::open(url, &elea_store::StoreConfig::default())?;
        let probe = tokio::time::timeout(std::time::Duration::from_secs(60), store.probe("volume-create"));
        match probe.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!(
                "probing store {url} from this host failed: {e} (the cache nodes need the same access; \
                 --no-probe skips this check when only they can reach it)"
            ),
            Err(_) => {
                bail!("probing store {url} from this host took over 60 s (--no-probe skips this check)")
            }
        }
    }
    Ok(())
}

pub(crate) fn codec_name(c: elea_fsm::BlockCodec) -> String {
    match c {
        elea_fsm::BlockCodec::None => "none".into(),
        elea_fsm::BlockCodec::Zstd(l) => format!("zstd:{l}"),
    }
}
