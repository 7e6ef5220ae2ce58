//! The migration worker: copies a volume's objects from a migration's source store to its
//! target, records them there batch by batch together with the cursor it reached, ends each
//! pass by asking metadata to finish the job (which it does only when nothing is left in the
//! source alone), and deletes the source's objects when the job asked for that and its delay
//! is over.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use elea_common::Errno;
use elea_fsm::{MigrationState, MigrationStatus};
use elea_metadata::MetaApi as _;
use elea_metadata::client::{ClientError, MetaClient};
use elea_store::{BlockKey, Store, StoreError, encode_block};
use futures::StreamExt as _;

use super::Worker;
use crate::error::CacheError;
use crate::node::Node;
use crate::placement::rank;

/// Time between rounds (a round copies a job's whole pass; this is the pause between passes
/// and before a new job is picked up).
const PERIOD: Duration = Duration::from_millis(500);
/// Blocks asked for per page.
const PAGE: u32 = 256;
/// Most blocks recorded per progress proposal.
const BATCH: usize = 32;
/// Longest time between two progress proposals while blocks are copied.
const RECORD_EVERY: Duration = Duration::from_secs(1);
/// Copies in flight.
const CONCURRENCY: usize = 8;

/// Copies the jobs this node is first for in placement order (by job id) among the live
/// cache nodes of the job's site (the site whose store moves; any live node when it has
/// none): one copier per job at a time, so the job's rate limit holds across the cluster.
pub(crate) struct Migrate {
    node: Arc<Node>,
}

impl Migrate {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        Self { node }
    }
}

impl Worker for Migrate {
    const NAME: &'static str = "migrate";

    fn period(&self) -> Duration {
        PERIOD
    }

    async fn round(&mut self) -> Result<usize, CacheError> {
        let node = &self.node;
        let me = node.cfg.node_id;
        if !node.registry().iter().any(|n| n.id == me && n.alive) {
            return Ok(0);
        }
        let (mut done, mut failed) = (0, None);
        for meta in node.group_clients().await {
            let jobs = match meta.migrations().await {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(group = meta.group(), error = %e, "listing a group's migrations");
                    failed.get_or_insert(e.into());
                    continue;
                }
            };
            for m in jobs {
                let copying = m.job.state == MigrationState::Copying;
                if !(copying || m.source_deletion_due()) || copier(node, &m) != Some(me) {
                    continue;
                }
                let r = if copying {
                    copy_pass(node, &meta, &m).await
                } else {
                    delete_source(node, &meta, &m).await
                };
                match r {
                    Ok(n) => done += n,
                    Err(e) => {
                        tracing::warn!(vol = m.job.vol, job = m.job.id, error = %e, "migration round failed");
                        failed.get_or_insert(e);
                    }
                }
            }
        }
        match failed {
            Some(e) if done == 0 => Err(e),
            _ => Ok(done),
        }
    }
}

/// The node that copies job `m`: first in placement order among the live nodes of its site,
/// else among every live node.
fn copier(node: &Node, m: &MigrationStatus) -> Option<u64> {
    let reg = node.registry();
    let site: Vec<u64> = reg.iter().filter(|n| n.alive && n.site == m.job.site).map(|n| n.id).collect();
    let all: Vec<u64> = reg.iter().filter(|n| n.alive).map(|n| n.id).collect();
    let from = if site.is_empty() { &all } else { &site };
    rank(m.job.id, 0, from).first().copied()
}

/// Paces copies to `rate` bytes per second in all (0: no limit): each copy waits until the
/// bytes sent before it, its own included, are due at that rate.
struct Pace {
    rate: u64,
    start: Instant,
    sent: std::sync::Mutex<u64>,
}

impl Pace {
    fn new(rate: u64) -> Self {
        Self { rate, start: Instant::now(), sent: std::sync::Mutex::new(0) }
    }

    async fn take(&self, bytes: usize) {
        if self.rate == 0 {
            return;
        }
        let total = {
            let mut s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            *s += bytes as u64;
            *s
        };
        let due = self.start + Duration::from_secs_f64(total as f64 / self.rate as f64);
        tokio::time::sleep_until(due.into()).await;
    }
}

/// One pass of job `m` from its recorded cursor: copies page by page, records every batch
/// with the cursor, and at the end asks metadata to finish the job. Returns the blocks
/// copied; an error when any copy failed (the next pass tries it again, after the worker's
/// back-off).
async fn copy_pass(node: &Arc<Node>, meta: &MetaClient, m: &MigrationStatus) -> Result<usize, CacheError> {
    let j = &m.job;
    let vol = node.vols.get(j.vol).await?;
    let (key_tag, compression) = (vol.key_tag, vol.compression());
    let src = node.vols.store(j.vol, j.from).await?;
    let dst = node.vols.store(j.vol, j.to).await?;
    let pace = Arc::new(Pace::new(j.rate_limit));
    let mut cursor = j.cursor;
    let (mut copied_total, mut failed_total) = (0, 0);
    let mut last_error = None;
    tracing::info!(vol = j.vol, job = j.id, pass = j.pass, from = %m.from_url, to = %m.to_url, "migrating");
    loop {
        let (page, more) = meta.migration_blocks(j.vol, cursor, PAGE).await?;
        let page_len = page.len();
        let order: Vec<(u64, u32)> = page.iter().map(|b| (b.slice, b.index)).collect();
        let mut results = futures::stream::iter(page.into_iter().enumerate())
            .map(|(i, b)| {
                let key =
                    BlockKey { cluster: key_tag, vol: b.vol, slice: b.slice, index: b.index, len: b.len };
                let (node, src, dst, pace) = (node.clone(), src.clone(), dst.clone(), pace.clone());
                async move {
                    let r = copy_block(&node, &key, &src, &dst, &pace, compression).await;
                    (i, r)
                }
            })
            .buffer_unordered(CONCURRENCY);
        // Copies end in any order; the cursor is the last block before the first one still
        // in flight, so that everything up to it was tried.
        let mut tried = vec![false; page_len];
        let mut low = 0;
        let (mut copied, mut failed) = (Vec::new(), Vec::new());
        let mut recorded = Instant::now();
        loop {
            let next = results.next().await;
            if let Some((i, r)) = &next {
                let (slice, index) = order[*i];
                tried[*i] = true;
                while low < page_len && tried[low] {
                    low += 1;
                }
                match r {
                    Ok(()) => copied.push((slice, index)),
                    Err(e) => {
                        tracing::warn!(slice, index, error = %e, "copying a block failed");
                        failed.push((slice, index, e.to_string()));
                    }
                }
            }
            // Recorded every batch or every second, and at the end of the page.
            let due =
                copied.len() + failed.len() >= BATCH || recorded.elapsed() >= RECORD_EVERY || next.is_none();
            if due && !(copied.is_empty() && failed.is_empty()) {
                let at = if low > 0 { order[low - 1] } else { cursor };
                copied_total += copied.len();
                failed_total += failed.len();
                if let Some((_, _, e)) = failed.last() {
                    last_error = Some(e.clone());
                }
                let (c, f) = (std::mem::take(&mut copied), std::mem::take(&mut failed));
                match meta.migration_progress(j.vol, j.id, c, at, f).await {
                    Ok(()) => cursor = at,
                    Err(ClientError::Fs(Errno::ESTALE)) => {
                        tracing::info!(vol = j.vol, job = j.id, "the migration ended elsewhere");
                        return Ok(copied_total);
                    }
                    Err(e) => return Err(e.into()),
                }
                recorded = Instant::now();
            }
            if next.is_none() {
                break;
            }
        }
        if !more || page_len == 0 {
            break;
        }
    }
    let after = match meta.migration_pass(j.vol, j.id).await {
        Ok(s) => s,
        Err(ClientError::Fs(Errno::ESTALE)) => return Ok(copied_total),
        Err(e) => return Err(e.into()),
    };
    if after.job.state == MigrationState::Done {
        tracing::info!(
            vol = j.vol,
            job = j.id,
            objects = after.job.done_objects,
            bytes = after.job.done_bytes,
            "migration done: the source is detached"
        );
    } else {
        tracing::info!(
            vol = j.vol,
            job = j.id,
            left = after.left_objects,
            failed = failed_total,
            "migration pass ended with blocks left; another pass follows"
        );
    }
    match last_error {
        Some(e) if copied_total == 0 => {
            Err(CacheError::Internal(format!("{failed_total} blocks could not be copied; the last: {e}")))
        }
        _ => Ok(copied_total),
    }
}

/// Copies one block's object from `src` to `dst` as it is stored (verified on the way):
/// from the source, or, when the source misses it, re-encoded from this node's read cache.
async fn copy_block(
    node: &Node,
    key: &BlockKey,
    src: &Store,
    dst: &Store,
    pace: &Pace,
    compression: elea_store::Compression,
) -> Result<(), CacheError> {
    let bytes = match src.get_encoded(key).await {
        Ok(b) => b,
        Err(e @ (StoreError::NotFound(_) | StoreError::Corrupt { .. })) => {
            let Some((len, data)) = node.cache.get_range((key.slice, key.index), None).await else {
                return Err(e.into());
            };
            if len != key.len {
                return Err(e.into());
            }
            tracing::warn!(slice = key.slice, index = key.index, error = %e, "the source lacks a block; copying it from the read cache");
            let encoded = tokio::task::spawn_blocking(move || encode_block(&data, compression))
                .await
                .map_err(|e| CacheError::Internal(format!("encoder: {e}")))?;
            Bytes::from(encoded)
        }
        Err(e) => return Err(e.into()),
    };
    pace.take(bytes.len()).await;
    dst.put(key, bytes).await?;
    Ok(())
}

/// Deletes every object of job `m`'s volume in its detached source, then records that.
async fn delete_source(
    node: &Arc<Node>,
    meta: &MetaClient,
    m: &MigrationStatus,
) -> Result<usize, CacheError> {
    let j = &m.job;
    let vol = node.vols.get(j.vol).await?;
    let src = node.vols.store(j.vol, j.from).await?;
    let keys = src.list_volume(vol.key_tag, j.vol).await?;
    let n = keys.len();
    let results: Vec<Result<(), StoreError>> = futures::stream::iter(keys)
        .map(|k| {
            let src = src.clone();
            async move { src.delete(&k).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        return Err(e.into());
    }
    meta.migration_source_deleted(j.vol, j.id).await?;
    tracing::info!(vol = j.vol, job = j.id, objects = n, store = %m.from_url, "deleted the migration's source objects");
    Ok(n)
}
