//! `elea migrate`: move a volume's objects to another store while it is in use, and follow
//! the move.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use elea_common::Errno;
use elea_fsm::{MigrationState, MigrationStatus, VolumeInfo};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientError, MetaClient};
use serde_json::json;

use crate::cli::{MetaAddr, MigrateArgs, MigrateCmd, WatchArgs, client};
use crate::cmd::volume::{check_owners, check_stores, claim_stores, probe_stores};
use crate::progress::{Progress, bytes, duration};

pub(crate) async fn migrate(a: MigrateArgs) -> anyhow::Result<()> {
    if let Some(MigrateCmd::Status { volume, watch, meta }) = a.cmd {
        let (c, vol) =
            client(&meta)?.volume_client(&volume).await.with_context(|| format!("volume {volume:?}"))?;
        let m = c.migration(vol.id).await.map_err(|e| match e {
            ClientError::Fs(Errno::ENOENT) => anyhow::anyhow!("volume {volume:?} has had no migration"),
            e => anyhow::Error::new(e).context("reading the migration"),
        })?;
        return follow(&c, &vol, m, watch).await;
    }
    let (Some(volume), Some(url), Some(meta)) = (a.volume, a.to, a.meta) else {
        bail!("usage: elea migrate VOLUME --to URL (or elea migrate status VOLUME)");
    };
    let meta = MetaAddr { meta, tls: a.tls };
    let (c, vol) =
        client(&meta)?.volume_client(&volume).await.with_context(|| format!("volume {volume:?}"))?;
    let map = c.sites().await.context("reading the site map")?;
    let site = match (a.site, map.home(vol.id)) {
        (Some(s), _) => s,
        (None, Some(h)) => h.to_string(),
        (None, None) if map.sites.len() == 1 => map.sites[0].clone(),
        (None, None) => bail!("volume {volume:?} has no home site: name the site whose store moves (--site)"),
    };
    check_stores(std::slice::from_ref(&url), 1, false)?;
    if !a.no_probe {
        probe_stores(std::slice::from_ref(&url)).await?;
        check_owners(&c, std::slice::from_ref(&url)).await?;
    }
    let delete_after = a.delete_source.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let m = c
        .start_migration(vol.id, &site, &url, a.rate_limit.unwrap_or(0), delete_after, None)
        .await
        .map_err(|e| match e {
            ClientError::Fs(Errno::ENOENT) => anyhow::anyhow!("there is no site {site:?} (elea site list)"),
            ClientError::Fs(Errno::EBUSY) => anyhow::anyhow!(
                "volume {volume:?} is being moved already, or the store it left is still to be deleted \
                 (elea migrate status {volume})"
            ),
            ClientError::Fs(Errno::EEXIST) => anyhow::anyhow!("volume {volume:?} uses {url} already"),
            ClientError::Fs(Errno::ENOSPC) => anyhow::anyhow!(
                "volume {volume:?} has {} stores (former ones included), the most it may have",
                elea_fsm::limits::STORES_MAX
            ),
            ClientError::Fs(Errno::ENODEV) => anyhow::anyhow!("volume {volume:?} has no store to move from"),
            e => anyhow::Error::new(e).context(format!("starting to move volume {volume:?} to {url}")),
        })?;
    if !a.no_probe {
        claim_stores(&c, std::slice::from_ref(&url)).await;
    }
    if !a.watch.json {
        let j = &m.job;
        println!(
            "volume {volume:?}: migration {} started: site {:?}'s store #{} ({}) -> #{} ({}); {} objects \
             ({}) to copy; {} staged blocks ({}) are tiered to the new store",
            j.id,
            j.site,
            j.from,
            m.from_url,
            j.to,
            m.to_url,
            j.total_objects,
            bytes(j.total_bytes),
            j.staged_objects,
            bytes(j.staged_bytes)
        );
    }
    follow(&c, &vol, m, a.watch).await
}

/// Prints the migration, or with `--wait` follows it to its end.
pub(crate) async fn follow(
    c: &MetaClient,
    vol: &VolumeInfo,
    mut m: MigrationStatus,
    w: WatchArgs,
) -> anyhow::Result<()> {
    if !w.wait {
        print_status(vol, &m, w.json);
        return Ok(());
    }
    let mut progress = Progress::new(&format!("migrate {}", vol.name), w.json);
    let mut last_change = Instant::now();
    let mut seen = (m.job.done_objects, m.left_objects, m.job.pass);
    loop {
        let j = &m.job;
        progress.update(
            j.done_bytes,
            j.done_bytes + m.left_bytes,
            &format!(
                "{}/{} objects{}",
                j.done_objects,
                j.done_objects + m.left_objects,
                if j.failed > 0 { format!(", {} failed copies", j.failed) } else { String::new() }
            ),
        );
        if j.state == MigrationState::Done {
            break;
        }
        let now = (j.done_objects, m.left_objects, j.pass);
        if now != seen {
            seen = now;
            last_change = Instant::now();
        }
        if last_change.elapsed() >= w.stall_timeout {
            let alive = c.cache_nodes().await.map(|n| n.iter().filter(|n| n.alive).count()).unwrap_or(0);
            if j.failed > 0 || alive == 0 {
                progress.finish();
                print_status(vol, &m, w.json);
                bail!(
                    "migration {} of volume {:?} made no progress for {} ({} live cache nodes, {} failed copies)",
                    j.id,
                    vol.name,
                    duration(w.stall_timeout),
                    alive,
                    j.failed
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        m = match c.migration(vol.id).await {
            Ok(next) if next.job.id == m.job.id => next,
            Ok(next) => {
                progress.finish();
                bail!(
                    "migration {} of volume {:?} was replaced by migration {}",
                    m.job.id,
                    vol.name,
                    next.job.id
                )
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the migration; trying again");
                continue;
            }
        };
    }
    progress.finish();
    print_status(vol, &m, w.json);
    Ok(())
}

fn state_name(s: MigrationState) -> &'static str {
    match s {
        MigrationState::Copying => "copying",
        MigrationState::Done => "done",
    }
}

fn secs(t: elea_common::Timespec) -> f64 {
    t.sec as f64 + f64::from(t.nsec) / 1e9
}

/// The migration as `--json` prints it.
pub(crate) fn status_json(vol: &VolumeInfo, m: &MigrationStatus) -> serde_json::Value {
    let j = &m.job;
    let elapsed = secs(j.finished.unwrap_or(m.now)) - secs(j.started);
    json!({
        "volume": vol.name,
        "volume_id": vol.id,
        "id": j.id,
        "state": state_name(j.state),
        "site": j.site,
        "from": { "index": j.from, "url": m.from_url },
        "to": { "index": j.to, "url": m.to_url },
        "pass": j.pass,
        "objects_done": j.done_objects,
        "objects_total": j.done_objects + m.left_objects,
        "objects_left": m.left_objects,
        "bytes_done": j.done_bytes,
        "bytes_total": j.done_bytes + m.left_bytes,
        "bytes_left": m.left_bytes,
        "objects_at_start": j.total_objects,
        "bytes_at_start": j.total_bytes,
        "staged_objects_at_start": j.staged_objects,
        "staged_bytes_at_start": j.staged_bytes,
        "rate_bytes_per_sec": if elapsed > 0.0 { (j.done_bytes as f64 / elapsed).round() } else { 0.0 },
        "rate_limit": j.rate_limit,
        "failed": j.failed,
        "failures": j.failures.iter().map(|f| json!({
            "slice": f.slice, "index": f.index, "error": f.error, "at": secs(f.at),
        })).collect::<Vec<_>>(),
        "started": secs(j.started),
        "finished": j.finished.map(secs),
        "elapsed_secs": elapsed,
        "delete_source_after_secs": j.delete_source_after_ms.map(|ms| ms as f64 / 1000.0),
        "source_deleted": j.source_deleted.map(secs),
    })
}

fn print_status(vol: &VolumeInfo, m: &MigrationStatus, json: bool) {
    if json {
        println!("{}", status_json(vol, m));
        return;
    }
    let j = &m.job;
    let elapsed = Duration::from_secs_f64((secs(j.finished.unwrap_or(m.now)) - secs(j.started)).max(0.0));
    let total = j.done_bytes + m.left_bytes;
    let pct = if total == 0 { 100.0 } else { j.done_bytes as f64 * 100.0 / total as f64 };
    println!("volume {:?}: migration {} {} (pass {})", vol.name, j.id, state_name(j.state), j.pass);
    println!("  site {:?}: store #{} {} -> #{} {}", j.site, j.from, m.from_url, j.to, m.to_url);
    println!(
        "  copied {} objects, {} of {} ({pct:.0}%); left {} objects, {}",
        j.done_objects,
        bytes(j.done_bytes),
        bytes(total),
        m.left_objects,
        bytes(m.left_bytes)
    );
    let rate = j.done_bytes as f64 / elapsed.as_secs_f64().max(0.001);
    println!(
        "  {} elapsed, {}/s on average{}",
        duration(elapsed),
        bytes(rate as u64),
        match j.rate_limit {
            0 => String::new(),
            r => format!(" (limit {}/s)", bytes(r)),
        }
    );
    if j.staged_objects > 0 {
        println!(
            "  {} blocks ({}) were staged at the start: they are tiered to the new store",
            j.staged_objects,
            bytes(j.staged_bytes)
        );
    }
    if j.failed > 0 {
        println!("  {} copies failed (each is tried again in the next pass); the latest:", j.failed);
        for f in &j.failures {
            println!("    block {}/{}: {}", f.slice, f.index, f.error);
        }
    }
    match (j.state, j.delete_source_after_ms, j.source_deleted) {
        (MigrationState::Done, _, Some(_)) => println!("  the old store's objects of the volume are deleted"),
        (_, Some(ms), None) => println!(
            "  the old store's objects of the volume are deleted {} after the move is done",
            duration(Duration::from_millis(ms))
        ),
        (MigrationState::Done, None, _) => {
            println!(
                "  the old store is detached; its objects are kept (delete them when you no longer need them)"
            )
        }
        _ => {}
    }
}
