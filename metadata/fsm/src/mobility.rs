//! Moving a volume's objects from one store to another while it is in use.
//!
//! One command ([`State::start_migration`]) attaches the target as the store that takes the
//! moved store's writes and makes the source read-only, so the set of objects to copy is fixed
//! at that moment: blocks tiered later go to the target. Cache nodes copy the blocks the source
//! holds alone, in slice order, and record each batch's blocks in the target together with the
//! cursor they reached ([`State::migration_progress`]), so a copier that stops for any reason
//! is followed by one that starts where the record says, never past a block it did not record.
//! A pass that reaches the end asks for the job to finish ([`State::migration_pass`]), which
//! checks every block of the volume: nothing may be left in the source alone. Only then is the
//! source detached; otherwise another pass starts from the first block.
//!
//! Kept apart from the rest of the state and written after the group table in a snapshot
//! (format 8 on), so older snapshots read as they are, with no migrations.

use std::collections::BTreeMap;

use elea_common::{Errno, SliceId, Timespec, VolumeId};
use serde::{Deserialize, Serialize};

use crate::data::block_len;
use crate::state::State;
use crate::types::{
    MigrationFailure, MigrationJob, MigrationState, MigrationStatus, OpResult, Reply, StagedBlock,
    StoreRoles, limits,
};

type R<T> = Result<T, Errno>;

/// Failures a job keeps the details of (the latest ones).
pub const FAILURES_KEPT: usize = 16;
/// Longest failure reason kept.
const FAILURE_TEXT_MAX: usize = 512;

/// The replicated migration table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct MobilityTable {
    /// Store roles of the volumes whose roles are not the default ones.
    pub roles: BTreeMap<VolumeId, StoreRoles>,
    /// The latest migration of each volume that had one.
    pub jobs: BTreeMap<VolumeId, MigrationJob>,
    pub jobs_allocated: u64,
}

impl MobilityTable {
    pub fn roles(&self, vol: VolumeId) -> StoreRoles {
        self.roles.get(&vol).copied().unwrap_or_default()
    }
}

impl State {
    /// Whether blocks of `vol` may be tiered to store `store` (not a migration's source, not
    /// detached).
    pub(crate) fn store_writable(&self, vol: VolumeId, store: u16) -> bool {
        self.mobility.roles(vol).writable(store)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start_migration(
        &mut self,
        vol: VolumeId,
        site: &str,
        url: &str,
        rate_limit: u64,
        delete_source_after_ms: Option<u64>,
        to_site: Option<&str>,
        now: Timespec,
    ) -> OpResult {
        let to_site = to_site.unwrap_or(site);
        for s in [site, to_site] {
            crate::sites::check_site(s)?;
            if !self.sites.sites.contains(s) {
                return Err(Errno::ENOENT);
            }
        }
        if url.is_empty() || url.len() > limits::STORE_URL_MAX {
            return Err(Errno::EINVAL);
        }
        let v = self.volumes.get(&vol).ok_or(Errno::ENOENT)?;
        let busy = self.mobility.jobs.get(&vol).is_some_and(|j| {
            // A job still copies, or its source is still to be deleted and would be the
            // target now (its deletion must not meet new objects).
            j.state != MigrationState::Done
                || (j.delete_source_after_ms.is_some()
                    && j.source_deleted.is_none()
                    && v.config.stores.get(usize::from(j.from)).is_some_and(|s| s == url))
        });
        if busy {
            return Err(Errno::EBUSY);
        }
        let mut roles = self.mobility.roles(vol);
        let stores = &v.config.stores;
        // The store that moves: the site's own (writable) one, else the write store.
        let own = self
            .sites
            .stores
            .iter()
            .find(|((v, i), s)| *v == vol && s.as_str() == site && roles.writable(*i))
            .map(|((_, i), _)| *i);
        let from = own.unwrap_or(roles.write);
        if usize::from(from) >= stores.len() {
            return Err(Errno::ENODEV);
        }
        // The target: a new store, a former one attached again (its objects left every
        // block's set when it was detached, so everything is copied to it afresh), or
        // another site's store in use (which keeps its site).
        let (to, in_use) = match stores.iter().position(|s| s == url) {
            Some(i) if i as u16 == from => return Err(Errno::EEXIST),
            Some(i) if roles.detached.contains(i as u16) => (i as u16, false),
            Some(i) if roles.writable(i as u16) && to_site != site => (i as u16, true),
            Some(_) => return Err(Errno::EEXIST),
            None if stores.len() >= limits::STORES_MAX => return Err(Errno::ENOSPC),
            None => (stores.len() as u16, false),
        };
        let (mut total_objects, mut total_bytes, mut staged_objects, mut staged_bytes) = (0, 0, 0, 0);
        for l in self.slices.locs.values().filter(|l| l.vol == vol && l.deleted.is_none()) {
            for (i, b) in l.blocks.iter().enumerate() {
                let len = u64::from(block_len(l.len, i as u32));
                if b.tiered.is_empty() {
                    staged_objects += 1;
                    staged_bytes += len;
                } else if b.tiered.contains(from) && !b.tiered.contains(to) {
                    total_objects += 1;
                    total_bytes += len;
                }
            }
        }
        // Nothing can fail from here on.
        if usize::from(to) == stores.len()
            && let Some(v) = self.volumes.get_mut(&vol)
        {
            v.config.stores.push(url.to_string());
        }
        roles.detached.remove(to);
        roles.read_only.insert(from);
        if roles.write == from || own.is_none() {
            roles.write = to;
        }
        self.mobility.roles.insert(vol, roles);
        if !in_use {
            self.sites.stores.insert((vol, to), to_site.to_string());
        }
        self.mobility.jobs_allocated += 1;
        let job = MigrationJob {
            id: self.mobility.jobs_allocated,
            vol,
            site: site.to_string(),
            from,
            to,
            state: MigrationState::Copying,
            pass: 1,
            cursor: (0, 0),
            total_objects,
            total_bytes,
            done_objects: 0,
            done_bytes: 0,
            staged_objects,
            staged_bytes,
            failed: 0,
            failures: Vec::new(),
            rate_limit,
            started: now,
            finished: None,
            delete_source_after_ms,
            source_deleted: None,
        };
        self.mobility.jobs.insert(vol, job);
        Ok(Reply::Migration(Box::new(self.migration_status(vol)?)))
    }

    /// The volume's job while it copies; `ESTALE` when `job` is not it.
    fn running_job(&self, vol: VolumeId, job: u64) -> R<&MigrationJob> {
        match self.mobility.jobs.get(&vol) {
            Some(j) if j.id == job && j.state == MigrationState::Copying => Ok(j),
            _ => Err(Errno::ESTALE),
        }
    }

    pub(crate) fn migration_progress(
        &mut self,
        vol: VolumeId,
        job: u64,
        copied: &[(SliceId, u32)],
        cursor: (SliceId, u32),
        failed: &[(SliceId, u32, String)],
        now: Timespec,
    ) -> OpResult {
        if copied.len() + failed.len() > limits::BATCH_MAX {
            return Err(Errno::EINVAL);
        }
        let j = self.running_job(vol, job)?;
        let (from, to) = (j.from, j.to);
        for (id, index) in copied {
            if let Some(l) = self.slices.locs.get(id)
                && (l.vol != vol || *index as usize >= l.blocks.len())
            {
                return Err(Errno::EINVAL);
            }
        }
        let (mut objects, mut bytes) = (0, 0);
        for (id, index) in copied {
            // A slice deleted (or forgotten) meanwhile gains nothing: its objects are garbage.
            let Some(l) = self.slices.locs.get_mut(id).filter(|l| l.deleted.is_none()) else { continue };
            let len = block_len(l.len, *index);
            if let Some(b) = l.blocks.get_mut(*index as usize)
                && b.tiered.contains(from)
                && !b.tiered.contains(to)
            {
                b.tiered.insert(to);
                objects += 1;
                bytes += u64::from(len);
            }
        }
        let Some(j) = self.mobility.jobs.get_mut(&vol) else { return Err(Errno::ESTALE) };
        j.done_objects += objects;
        j.done_bytes += bytes;
        j.cursor = j.cursor.max(cursor);
        j.failed += failed.len() as u64;
        for (slice, index, error) in failed {
            let mut error = error.clone();
            if error.len() > FAILURE_TEXT_MAX {
                let mut cut = FAILURE_TEXT_MAX;
                while !error.is_char_boundary(cut) {
                    cut -= 1;
                }
                error.truncate(cut);
            }
            j.failures.push(MigrationFailure { slice: *slice, index: *index, error, at: now });
        }
        let extra = j.failures.len().saturating_sub(FAILURES_KEPT);
        j.failures.drain(..extra);
        Ok(Reply::Ok)
    }

    pub(crate) fn migration_pass(&mut self, vol: VolumeId, job: u64, now: Timespec) -> OpResult {
        let j = self.running_job(vol, job)?;
        let (from, to) = (j.from, j.to);
        let (left, _) = self.left_in_source(vol, from, to);
        if left > 0 {
            if let Some(j) = self.mobility.jobs.get_mut(&vol) {
                j.pass += 1;
                j.cursor = (0, 0);
            }
            return Ok(Reply::Migration(Box::new(self.migration_status(vol)?)));
        }
        // Detach the source: no block names it any more, and reads stop using it.
        for l in self.slices.locs.values_mut().filter(|l| l.vol == vol) {
            for b in &mut l.blocks {
                b.tiered.remove(from);
            }
        }
        let mut roles = self.mobility.roles(vol);
        roles.read_only.remove(from);
        roles.detached.insert(from);
        self.mobility.roles.insert(vol, roles);
        if let Some(j) = self.mobility.jobs.get_mut(&vol) {
            j.state = MigrationState::Done;
            j.finished = Some(now);
        }
        Ok(Reply::Migration(Box::new(self.migration_status(vol)?)))
    }

    pub(crate) fn set_volume_home(&mut self, vol: VolumeId, site: &str) -> OpResult {
        crate::sites::check_site(site)?;
        if !self.sites.sites.contains(site) {
            return Err(Errno::ENOENT);
        }
        if !self.volumes.contains_key(&vol) && !self.groups.volumes.contains_key(&vol) {
            return Err(Errno::ENOENT);
        }
        if let Some(rec) = self.groups.volumes.get_mut(&vol) {
            rec.home = site.to_string();
        }
        if let Some(rec) = self.groups.own.as_mut().filter(|r| r.vol == vol) {
            rec.home = site.to_string();
        }
        self.sites.homes.insert(vol, site.to_string());
        Ok(Reply::Ok)
    }

    pub(crate) fn migration_source_deleted(&mut self, vol: VolumeId, job: u64, now: Timespec) -> OpResult {
        let mut status = self.migration_status(vol).map_err(|_| Errno::ESTALE)?;
        if status.job.id != job {
            return Err(Errno::ESTALE);
        }
        status.now = now;
        if !status.source_deletion_due() {
            return Err(Errno::EBUSY);
        }
        if let Some(j) = self.mobility.jobs.get_mut(&vol) {
            j.source_deleted = Some(now);
        }
        Ok(Reply::Ok)
    }

    /// Live blocks of `vol` in store `from` and not in `to`: (count, bytes).
    fn left_in_source(&self, vol: VolumeId, from: u16, to: u16) -> (u64, u64) {
        let (mut n, mut bytes) = (0, 0);
        for l in self.slices.locs.values().filter(|l| l.vol == vol && l.deleted.is_none()) {
            for (i, b) in l.blocks.iter().enumerate() {
                if b.tiered.contains(from) && !b.tiered.contains(to) {
                    n += 1;
                    bytes += u64::from(block_len(l.len, i as u32));
                }
            }
        }
        (n, bytes)
    }

    fn status_of(&self, j: &MigrationJob) -> MigrationStatus {
        let url = |i: u16| {
            self.volumes
                .get(&j.vol)
                .and_then(|v| v.config.stores.get(usize::from(i)).cloned())
                .unwrap_or_default()
        };
        let (left_objects, left_bytes) =
            if j.state == MigrationState::Done { (0, 0) } else { self.left_in_source(j.vol, j.from, j.to) };
        MigrationStatus {
            job: j.clone(),
            from_url: url(j.from),
            to_url: url(j.to),
            left_objects,
            left_bytes,
            now: self.clock,
        }
    }

    pub(crate) fn migration_status(&self, vol: VolumeId) -> R<MigrationStatus> {
        self.mobility.jobs.get(&vol).map(|j| self.status_of(j)).ok_or(Errno::ENOENT)
    }

    pub(crate) fn migrations(&self) -> OpResult {
        Ok(Reply::Migrations(self.mobility.jobs.values().map(|j| self.status_of(j)).collect()))
    }

    pub(crate) fn migration_blocks(&self, vol: VolumeId, after: (SliceId, u32), limit: u32) -> OpResult {
        let Some(j) = self.mobility.jobs.get(&vol).filter(|j| j.state == MigrationState::Copying) else {
            return Err(Errno::ENOENT);
        };
        let limit = (limit as usize).clamp(1, limits::BATCH_MAX);
        let mut out = Vec::new();
        for (id, l) in self.slices.locs.range(after.0..) {
            if l.vol != vol || l.deleted.is_some() {
                continue;
            }
            for (i, b) in l.blocks.iter().enumerate() {
                let index = i as u32;
                if (*id, index) <= after || !b.tiered.contains(j.from) || b.tiered.contains(j.to) {
                    continue;
                }
                if out.len() == limit {
                    return Ok(Reply::Blocks { blocks: out, more: true });
                }
                out.push(StagedBlock {
                    vol,
                    slice: *id,
                    index,
                    len: block_len(l.len, index),
                    created: l.created,
                    nodes: Vec::new(),
                });
            }
        }
        Ok(Reply::Blocks { blocks: out, more: false })
    }
}
