//! `elea volume move`: a volume's home moves to another site while it is mounted.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use elea_common::Errno;
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientError, MetaClient};
use elea_metadata::proto::change_membership_request::Kind;

use crate::cli::{MoveArgs, client};
use crate::cmd::migrate::follow;
use crate::cmd::volume::{check_owners, check_stores, claim_stores, group_of, probe_stores};

/// The group's members as its leader reports them: (id, learner), and the leader's id.
async fn members(g: &MetaClient, rec: &elea_fsm::GroupRecord) -> anyhow::Result<(Vec<(u64, bool)>, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for (_, addr, _) in rec.members() {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), g.status_of(&addr)).await
                && s.role == "leader"
            {
                return Ok((s.members.iter().map(|m| (m.node_id, m.learner)).collect(), s.node_id));
            }
        }
        if Instant::now() > deadline {
            bail!("raft group {} has no leader", rec.group);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn move_volume(a: MoveArgs) -> anyhow::Result<()> {
    let say = |s: String| {
        if !a.watch.json {
            println!("{s}");
        }
    };
    let c = client(&a.meta)?;
    let rec = group_of(&c, &a.volume).await?;
    let g = c.for_group(rec.group);
    let map = c.sites().await.context("reading the site map")?;
    let site = a.to_site.as_str();
    if !map.sites.iter().any(|s| s == site) {
        bail!("there is no site {site:?} (elea site list)");
    }
    let there: Vec<(u64, String)> = {
        let mut v: Vec<(u64, String)> =
            map.meta_nodes.iter().filter(|(_, s, _)| s == site).map(|(id, _, a)| (*id, a.clone())).collect();
        v.sort();
        v
    };
    if there.is_empty() {
        bail!("site {site:?} has no metadata node to hold the volume's voters");
    }
    // The store the old home's moves into.
    let vol_map = g.sites().await.context("reading the volume's site map")?;
    let old_home = rec.home.clone();
    let url = match (&a.store, vol_map.store_of(rec.vol, site)) {
        (Some(u), _) => Some(u.clone()),
        (None, Some(i)) => {
            let info = g.volume_by_id(rec.vol).await?;
            info.config.stores.get(usize::from(i)).cloned()
        }
        (None, None) => None,
    };
    let write_site = vol_map.site_of_store(rec.vol, vol_map.roles(rec.vol).write).map(str::to_string);
    if write_site.as_deref() == Some(site) && a.store.is_none() {
        // The new home's store takes the volume's writes already: only the group moves.
        move_group(&a, &c, &g, &rec, &there, &say).await?;
        say(format!("volume {:?}: its objects are in {site}'s store already", a.volume));
        return Ok(());
    }
    let Some(url) = url else {
        bail!(
            "site {site:?} has no store for volume {:?}: give the store to move its objects to (--store URL)",
            a.volume
        );
    };
    if a.store.is_some() {
        check_stores(std::slice::from_ref(&url), 1, false)?;
        if !a.no_probe {
            probe_stores(std::slice::from_ref(&url)).await?;
            check_owners(&c, std::slice::from_ref(&url)).await?;
        }
    }
    move_group(&a, &c, &g, &rec, &there, &say).await?;
    // Then the objects: the old home's store of the volume (its write store) into the new home's.
    let delete_after = a.delete_source.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let m = match g
        .start_migration(rec.vol, &old_home, &url, a.rate_limit.unwrap_or(0), delete_after, Some(site))
        .await
    {
        Ok(m) => m,
        Err(ClientError::Fs(Errno::EBUSY)) => {
            bail!("volume {:?} is being migrated already (elea migrate status {})", a.volume, a.volume)
        }
        Err(e) => return Err(anyhow::Error::new(e).context("starting to move the volume's objects")),
    };
    if a.store.is_some() && !a.no_probe {
        claim_stores(&c, std::slice::from_ref(&url)).await;
    }
    say(format!(
        "volume {:?}: its objects move from store #{} ({}) to #{} ({}): {} objects to copy",
        a.volume, m.job.from, m.from_url, m.job.to, m.to_url, m.job.total_objects
    ));
    let info = g.volume_by_id(rec.vol).await?;
    follow(&g, &info, m, a.watch).await
}

/// Moves the volume's group: voters in the new home, the home recorded, the leadership
/// there, the old voters made learners.
async fn move_group(
    a: &MoveArgs,
    c: &MetaClient,
    g: &MetaClient,
    rec: &elea_fsm::GroupRecord,
    there: &[(u64, String)],
    say: &impl Fn(String),
) -> anyhow::Result<()> {
    let site = a.to_site.as_str();
    let (before, _) = members(g, rec).await?;
    let voters_now = before.iter().filter(|(_, l)| !l).count();
    let want = a.voters.map_or(voters_now, usize::from).clamp(1, there.len());
    let new: Vec<&(u64, String)> = there.iter().take(want).collect();
    for (id, addr) in &new {
        if !rec.has_member(*id) {
            c.add_group_member(rec.vol, *id, false)
                .await
                .with_context(|| format!("adding node {id} to the group's record"))?;
        }
        g.change_membership(Kind::AddVoter, *id, addr)
            .await
            .with_context(|| format!("making node {id} a voter of raft group {}", rec.group))?;
        say(format!("volume {:?}: node {id} ({site}) votes in raft group {}", a.volume, rec.group));
    }
    // The home: leaders hand the group to a voter of the home site.
    c.set_volume_home(rec.vol, site).await.context("recording the new home in the control group")?;
    g.set_volume_home(rec.vol, site).await.context("recording the new home in the volume's group")?;
    let ids: Vec<u64> = new.iter().map(|(id, _)| *id).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, leader) = members(g, rec).await?;
        if ids.contains(&leader) {
            say(format!(
                "volume {:?}: raft group {} is led from {site} (node {leader})",
                a.volume, rec.group
            ));
            break;
        }
        if Instant::now() > deadline {
            bail!("raft group {} is still led by node {leader}, outside {site}, after 60 s", rec.group);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The old voters keep a copy as learners.
    let map = c.sites().await?;
    for (id, _) in before.iter().filter(|(id, l)| !l && !ids.contains(id)) {
        let addr = map
            .meta_nodes
            .iter()
            .find(|(n, _, _)| n == id)
            .map(|(_, _, a)| a.clone())
            .with_context(|| format!("node {id} is not in the site map"))?;
        g.change_membership(Kind::AddLearner, *id, &addr)
            .await
            .with_context(|| format!("making node {id} a learner of raft group {}", rec.group))?;
        say(format!("volume {:?}: node {id} is a learner of raft group {} now", a.volume, rec.group));
    }
    Ok(())
}
