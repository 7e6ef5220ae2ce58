//! The metadata state machine: one volume namespace per volume, sessions, locks and id
//! allocation, as a pure and deterministic function of the Raft log.
//!
//! `apply(command) -> (result, changes)` does no I/O and reads no clock: every "now" comes from
//! the command's leader-stamped time, so every replica that applies the same log reaches the
//! same state, byte for byte ([`StateMachine::snapshot`] is deterministic).

mod access;
mod changes;
mod chunks;
mod data;
mod dedup;
mod groups;
mod inline;
mod legacy;
mod locks;
mod mobility;
mod namespace;
pub mod perm;
mod sessions;
mod sites;
mod state;
// The contract is formatted by hand (one-line variants); keep rustfmt off it.
pub mod types;

pub use types::*;

pub use data::{block_len, blocks_of, millis_between};
pub use groups::{DEFAULT_GROUP_VOTERS, group_of_volume};
pub use namespace::{ALLOC_MAX, check_name};
pub use sessions::{CLIENT_IDLE_MS, SESSION_NAME_MAX, SESSION_TTL_MAX_MS};

use elea_common::SliceId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use changes::Changes;
use dedup::Dedup;
use state::State;

/// First bytes of every snapshot.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"ELEAFSM\0";
/// Snapshot format this build writes. [`StateMachine::restore`] reads it, version 7 (before
/// migrations), version 6 (before volumes in groups of their own), version 5 (before sites), version 4 (before inline slices), version 3 (before [`DataIdentity`]) and version
/// 2 (before [`Attr::blocks`]).
pub const SNAPSHOT_VERSION: u32 = 8;

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error("snapshot is corrupt: {0}")]
    Corrupt(String),
    #[error("snapshot format version {0} is not supported")]
    Version(u32),
}

#[derive(Serialize)]
struct SnapshotOut<'a> {
    magic: [u8; 8],
    version: u32,
    state: &'a State,
    sites: &'a sites::SiteTable,
    groups: &'a groups::GroupTable,
    mobility: &'a mobility::MobilityTable,
}

#[derive(Deserialize)]
struct SnapshotHeader {
    magic: [u8; 8],
    version: u32,
}

/// The replicated namespace. See the crate docs.
#[derive(Debug, Default, Clone)]
pub struct StateMachine {
    st: State,
}

impl StateMachine {
    pub fn new() -> Self {
        Self::default()
    }

    /// The first state of a volume's own group, as the control group recorded it: every
    /// member starts from this same state. `EINVAL` for a record no control group makes.
    pub fn for_group(rec: &GroupRecord) -> Result<Self, elea_common::Errno> {
        Ok(Self { st: State::for_group(rec)? })
    }

    /// Apply one command. Never panics on any input; invalid ops return an errno and leave
    /// the state unchanged.
    pub fn apply(&mut self, cmd: &Command) -> (OpResult, Vec<ChangeSet>) {
        let now = self.st.clock.max(cmd.time);
        if cmd.client != 0 {
            match self.st.dedup_check(cmd.client, cmd.seq, cmd.acked_below, now) {
                Err(e) => return (Err(e), Vec::new()),
                Ok(Dedup::Hit(r)) => return (r, Vec::new()),
                Ok(Dedup::Apply) => {}
            }
        }
        let mut ch = Changes::default();
        self.st.slices.now = now;
        let creates = matches!(
            cmd.op,
            Op::CreateVolume { .. } | Op::CreateVolumeIn { .. } | Op::CreateVolumeGroup { .. }
        );
        if creates && self.st.groups.own.is_some() {
            // A volume's own group holds that volume only (its ids come from the control group).
            return (Err(elea_common::Errno::EPERM), Vec::new());
        }
        if creates && self.st.identity.is_none() {
            // Made before the volume, which is the first to carry it; kept even if the
            // creation fails (the identity only has to be unique, not tied to this volume).
            let seed = [
                &cmd.client.to_le_bytes()[..],
                &cmd.seq.to_le_bytes(),
                &now.sec.to_le_bytes(),
                &now.nsec.to_le_bytes(),
            ]
            .concat();
            let cluster = u128::from(fnv1a(&seed)) << 64 | u128::from(fnv1a(&[&seed[..], b"elea"].concat()));
            self.st.identity =
                Some(DataIdentity { cluster: cluster.max(1), since_volume: self.st.volumes_allocated + 1 });
        }
        let res = self.exec(&cmd.op, now, &mut ch);
        if res.is_ok() {
            self.st.settle_inline(now);
        } else {
            self.st.slices.zeroed.clear();
        }
        if cmd.client != 0 {
            self.st.dedup_record(cmd.client, cmd.seq, &res);
        }
        if res.is_ok() || cmd.client != 0 {
            self.st.clock = now;
        }
        let sets = if res.is_ok() { ch.commit(&mut self.st, cmd.client) } else { Vec::new() };
        (res, sets)
    }

    fn exec(&mut self, op: &Op, now: elea_common::Timespec, ch: &mut Changes) -> OpResult {
        let st = &mut self.st;
        match op {
            Op::CreateVolume { name, config } => st.create_volume(name, config, now, ch),
            Op::Mknod { vol, parent, name, mode, uid, gid, rdev, exclusive, ino, session } => {
                st.mknod(*vol, *parent, name, *mode, *uid, *gid, *rdev, *exclusive, *ino, *session, now, ch)
            }
            Op::Mkdir { vol, parent, name, mode, uid, gid, ino } => {
                st.mkdir(*vol, *parent, name, *mode, *uid, *gid, *ino, now, ch)
            }
            Op::Symlink { vol, parent, name, target, uid, gid, ino } => {
                st.symlink(*vol, *parent, name, target, *uid, *gid, *ino, now, ch)
            }
            Op::Link { vol, ino, new_parent, new_name } => {
                st.link(*vol, *ino, *new_parent, new_name, now, ch)
            }
            Op::Unlink { vol, parent, name } => st.unlink(*vol, *parent, name, now, ch),
            Op::Rmdir { vol, parent, name } => st.rmdir(*vol, *parent, name, now, ch),
            Op::Rename { vol, parent, name, new_parent, new_name, flags } => {
                st.rename(*vol, *parent, name, *new_parent, new_name, *flags, now, ch)
            }
            Op::SetAttr { vol, ino, set } => st.set_attr(*vol, *ino, set, now, ch),
            Op::SetXattr { vol, ino, name, value, flags } => {
                st.set_xattr(*vol, *ino, name, value, *flags, now, ch)
            }
            Op::RemoveXattr { vol, ino, name } => st.remove_xattr(*vol, *ino, name, now, ch),
            Op::WriteSlice { vol, ino, chunk, slice, staged } => {
                st.write_slice(*vol, *ino, *chunk, slice, staged, now, ch)
            }
            Op::Fallocate { vol, ino, offset, len, mode } => {
                st.fallocate(*vol, *ino, *offset, *len, *mode, now, ch)
            }
            Op::OpenSession { name, ttl_ms } => st.open_session(name, *ttl_ms, now),
            Op::Heartbeat { session } => st.heartbeat(*session, now),
            Op::CloseSession { session } => st.close_session(*session, now, ch),
            Op::ExpireSessions => st.expire_sessions(now, ch),
            Op::ExtendSessions => st.extend_sessions(now),
            Op::Open { vol, ino, session } => st.open(*vol, *ino, *session, now),
            Op::Release { vol, ino, session } => st.release(*vol, *ino, *session, now, ch),
            Op::SetLk { vol, ino, session, owner, pid, kind, start, end, wait } => {
                st.set_lk(*vol, *ino, *session, *owner, *pid, *kind, *start, *end, *wait, now, ch)
            }
            Op::Flock { vol, ino, session, owner, kind } => {
                st.flock(*vol, *ino, *session, *owner, *kind, now, ch)
            }
            Op::AllocInodes { vol, count } => st.alloc_inodes(*vol, *count),
            Op::AllocSlices { count } => st.alloc_slices(*count),
            Op::RegisterCacheNode { id, site, addr, incarnation } => {
                st.register_cache_node(*id, site, addr, *incarnation, now)
            }
            Op::CacheHeartbeat { id, incarnation, stats } => {
                st.cache_heartbeat(*id, *incarnation, stats, now)
            }
            Op::MarkTiered { store, blocks } => st.mark_tiered(*store, blocks),
            Op::ReplaceReplica { slice, index, old, new } => st.replace_replica(*slice, *index, *old, *new),
            Op::ForgetSlices { ids } => st.forget_slices(ids),
            Op::DropReplica { slice, index, node } => st.drop_replica(*slice, *index, *node),
            Op::WriteSlicePieces { vol, ino, chunk, pieces, staged } => {
                st.write_slice_pieces(*vol, *ino, *chunk, pieces, staged, now, ch)
            }
            Op::WriteInline { vol, ino, chunk, pieces, data } => {
                st.write_inline(*vol, *ino, *chunk, pieces, data, now, ch)
            }
            Op::SpillInline { slices } => st.spill_inline(slices),
            Op::AddSite { name } => st.add_site(name),
            Op::RegisterMetaNode { id, site, addr } => st.register_meta_node(*id, site, addr),
            Op::CreateVolumeIn { name, config, home } => st.create_volume_in(name, config, home, now, ch),
            Op::AddStore { vol, site, url } => st.add_store(*vol, site, url),
            Op::CreateVolumeGroup { name, config, home, voters, spread } => {
                st.create_volume_group(name, config, home, *voters, *spread, now)
            }
            Op::AddGroupMember { vol, id, learner } => st.add_group_member(*vol, *id, *learner),
            Op::RemoveGroupMember { vol, id } => st.remove_group_member(*vol, *id),
            Op::StartMigration { vol, site, url, rate_limit, delete_source_after_ms, to_site } => st
                .start_migration(
                    *vol,
                    site,
                    url,
                    *rate_limit,
                    *delete_source_after_ms,
                    to_site.as_deref(),
                    now,
                ),
            Op::SetVolumeHome { vol, site } => st.set_volume_home(*vol, site),
            Op::MigrationProgress { vol, job, copied, cursor, failed } => {
                st.migration_progress(*vol, *job, copied, *cursor, failed, now)
            }
            Op::MigrationPass { vol, job } => st.migration_pass(*vol, *job, now),
            Op::MigrationSourceDeleted { vol, job } => st.migration_source_deleted(*vol, *job, now),
            // The check refuses every op `As` does not carry, a nested `As` included, so this
            // recursion is one level deep.
            Op::As { caller, op } => {
                st.check_as(caller, op)?;
                self.exec(op, now, ch)
            }
        }
    }

    /// Answer a query from the current state.
    pub fn query(&self, q: &Query) -> OpResult {
        let st = &self.st;
        match q {
            Query::ListVolumes => st.list_volumes(),
            Query::VolumeByName { name } => st.volume_by_name(name),
            Query::Lookup { vol, parent, name } => st.lookup(*vol, *parent, name),
            Query::GetAttr { vol, ino } => st.get_attr(*vol, *ino),
            Query::ReadDir { vol, ino, cookie, limit, plus } => {
                st.read_dir(*vol, *ino, *cookie, *limit, *plus)
            }
            Query::ReadLink { vol, ino } => st.read_link(*vol, *ino),
            Query::GetXattr { vol, ino, name } => st.get_xattr(*vol, *ino, name),
            Query::ListXattr { vol, ino } => st.list_xattr(*vol, *ino),
            Query::StatFs { vol } => st.stat_fs(*vol),
            Query::ReadChunk { vol, ino, chunk } => st.read_chunk(*vol, *ino, *chunk),
            Query::GetLk { vol, ino, session, owner, kind, start, end } => {
                st.get_lk(*vol, *ino, *session, *owner, *kind, *start, *end)
            }
            Query::SessionInfo { session } => st.session_info(*session),
            Query::CacheNodes => st.cache_nodes(),
            Query::SliceLocs { ids } => st.slice_locs(ids),
            Query::StagedBlocks { after, limit } => st.staged_blocks(*after, *limit),
            Query::PendingDeletes { after, limit } => st.pending_deletes(*after, *limit),
            Query::DataIdentity => Ok(Reply::Identity(st.identity)),
            Query::SliceData { ids } => st.slice_data(ids),
            Query::InlineSlices { after, limit } => st.inline_slices(*after, *limit),
            Query::Sites => Ok(Reply::Sites(st.site_map())),
            Query::Groups => Ok(Reply::Groups(st.groups.records())),
            Query::Migration { vol } => st.migration_status(*vol).map(|m| Reply::Migration(Box::new(m))),
            Query::Migrations => st.migrations(),
            Query::MigrationBlocks { vol, after, limit } => st.migration_blocks(*vol, *after, *limit),
        }
    }

    /// Slice ids no chunk references any more: their data may be deleted by a collector.
    pub fn pending_deletes(&self) -> impl Iterator<Item = SliceId> + '_ {
        self.st.slices.to_delete.keys().copied()
    }

    /// The latest command time the state has seen (the clock every query uses).
    pub fn clock(&self) -> elea_common::Timespec {
        self.st.clock
    }

    /// Serialize the whole state (deterministic bytes).
    pub fn snapshot(&self) -> Vec<u8> {
        let out = SnapshotOut {
            magic: SNAPSHOT_MAGIC,
            version: SNAPSHOT_VERSION,
            state: &self.st,
            sites: &self.st.sites,
            groups: &self.st.groups,
            mobility: &self.st.mobility,
        };
        // Serializing plain data into a growable buffer cannot fail.
        postcard::to_stdvec(&out).unwrap_or_default()
    }

    /// Rebuild a state machine from [`StateMachine::snapshot`] bytes, of this build's format or
    /// of version 2. A version 2 snapshot is converted: attributes in the replies its
    /// de-duplication table keeps get `blocks`, counted from the restored chunk lists below the
    /// size the reply reports (0 when the file is gone or its volume cannot be told).
    pub fn restore(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let (h, rest) = postcard::take_from_bytes::<SnapshotHeader>(bytes)
            .map_err(|e| SnapshotError::Corrupt(format!("header: {e}")))?;
        if h.magic != SNAPSHOT_MAGIC {
            return Err(SnapshotError::Corrupt("bad magic".into()));
        }
        let mut st = match h.version {
            SNAPSHOT_VERSION => {
                let (mut st, sites, groups, mobility) =
                    decode_state::<(State, sites::SiteTable, groups::GroupTable, mobility::MobilityTable)>(
                        rest,
                    )?;
                st.sites = sites;
                st.groups = groups;
                st.mobility = mobility;
                st
            }
            7 => {
                let (mut st, sites, groups) =
                    decode_state::<(State, sites::SiteTable, groups::GroupTable)>(rest)?;
                st.sites = sites;
                st.groups = groups;
                st
            }
            6 => {
                let (mut st, sites) = decode_state::<(State, sites::SiteTable)>(rest)?;
                st.sites = sites;
                st
            }
            5 => decode_state::<State>(rest)?,
            4 => decode_state::<legacy::StateV4>(rest)?.upgrade(),
            3 => decode_state::<legacy::StateV3>(rest)?.upgrade(),
            2 => decode_state::<legacy::StateV2>(rest)?.upgrade(),
            v => return Err(SnapshotError::Version(v)),
        };
        if h.version < 6 {
            st.sites = sites::SiteTable::derive(&st);
        }
        Ok(Self { st })
    }

    /// A deterministic 64-bit hash (FNV-1a) of the snapshot bytes, to compare replicas.
    pub fn fingerprint(&self) -> u64 {
        fnv1a(&self.snapshot())
    }
}

/// The state part of a snapshot: all of `bytes`.
fn decode_state<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    let (st, rest) =
        postcard::take_from_bytes::<T>(bytes).map_err(|e| SnapshotError::Corrupt(format!("state: {e}")))?;
    if !rest.is_empty() {
        return Err(SnapshotError::Corrupt(format!("{} trailing bytes", rest.len())));
    }
    Ok(st)
}

/// 64-bit FNV-1a.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
