//! Durable Raft storage for one group: the log, the hard state, the configuration and the
//! latest snapshot, kept in redb and mirrored in memory.
//!
//! Every key starts with the group id, so many groups can share one database file. The whole
//! un-compacted log is also held in memory (compaction keeps it short), so `raft::Storage`
//! reads never touch the disk; the disk is written once per Ready, in one transaction with
//! one fsync, whatever number of entries and proposals it carries (group commit).

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use elea_common::GroupId;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use redb::{Database, Durability, ReadableDatabase, TableDefinition};

/// (group, index) -> protobuf-encoded `Entry`.
const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("raft_log");
/// (group, key) -> protobuf-encoded value; keys below.
const STATE: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("raft_state");

const KEY_HARD_STATE: &str = "hard_state";
const KEY_CONF_STATE: &str = "conf_state";
const KEY_SNAPSHOT: &str = "snapshot";
const KEY_MEMBERS: &str = "members";

/// A storage failure. Any of these stops the group: the node refuses to go on rather than
/// risk acknowledging what is not durable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("raft storage: {0}")]
    Db(String),
    #[error("raft storage is corrupt: {0}")]
    Corrupt(String),
    #[error("raft storage: {0}")]
    Invalid(String),
}

macro_rules! db_err {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.to_string())
            }
        }
    )*};
}
db_err!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

fn decode<M: protobuf::Message>(what: &str, bytes: &[u8]) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn encode<M: protobuf::Message>(m: &M) -> Result<Vec<u8>, StoreError> {
    m.write_to_bytes().map_err(|e| StoreError::Invalid(format!("encode: {e}")))
}

/// Opens (or creates) the database file that holds every group's Raft state on this node.
pub fn open_db(path: &std::path::Path) -> Result<Arc<Database>, StoreError> {
    let db = Database::create(path)?;
    let tx = db.begin_write()?;
    tx.open_table(LOG)?;
    tx.open_table(STATE)?;
    tx.commit()?;
    Ok(Arc::new(db))
}

/// An in-memory database, for deterministic simulation tests.
pub fn memory_db() -> Result<Arc<Database>, StoreError> {
    let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
    let tx = db.begin_write()?;
    tx.open_table(LOG)?;
    tx.open_table(STATE)?;
    tx.commit()?;
    Ok(Arc::new(db))
}

/// One group's Raft storage. Implements [`raft::Storage`] from memory; the mutating methods
/// write through to redb durably before returning.
///
/// Cloning gives another handle to the same storage. The in-memory mirror is behind a lock
/// that is held only to read or update memory, never across a disk write, so a thread that
/// persists (the group's writer) does not stall the Raft thread reading entries. Mutations
/// must come from one thread at a time (the Raft thread, or the writer when one is used).
#[derive(Clone)]
pub struct GroupStorage {
    group: GroupId,
    db: Arc<Database>,
    mem: Arc<RwLock<Mem>>,
    disk: Arc<std::sync::Mutex<DiskState>>,
}

/// What the disk holds, as the writer of the disk halves tracks it.
struct DiskState {
    /// Last log index on disk (or the snapshot index).
    last: u64,
}

/// The disk half of a storage mutation; see [`GroupStorage::write`].
#[derive(Debug)]
pub enum DiskJob {
    Append { entries: Vec<Entry>, hs: Option<HardState> },
    ConfState { cs: ConfState, members: Vec<u8> },
    InstallSnapshot { snap: Snapshot, hs: HardState, cs: ConfState, members: Vec<u8> },
    SaveSnapshot { snap: Snapshot, hs: HardState, compact_below: u64 },
}

struct Mem {
    /// Term and vote of the newest hard state handed to the disk (written or scheduled).
    scheduled_term_vote: (u64, u64),
    hard_state: HardState,
    conf_state: ConfState,
    /// Latest snapshot (metadata and data); index 0 when there is none.
    snapshot: Snapshot,
    /// Contiguous entries after the compaction point.
    entries: Vec<Entry>,
}

impl Mem {
    fn first(&self) -> u64 {
        match self.entries.first() {
            Some(e) => e.index,
            None => self.snapshot.get_metadata().index + 1,
        }
    }

    fn last(&self) -> u64 {
        match self.entries.last() {
            Some(e) => e.index,
            None => self.snapshot.get_metadata().index,
        }
    }

    fn term_of(&self, idx: u64) -> Result<u64, StorageError> {
        if idx == self.snapshot.get_metadata().index {
            return Ok(self.snapshot.get_metadata().term);
        }
        let first = self.first();
        if idx < first {
            return Err(StorageError::Compacted);
        }
        if idx > self.last() {
            return Err(StorageError::Unavailable);
        }
        usize::try_from(idx - first)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map(|e| e.term)
            .ok_or(StorageError::Unavailable)
    }
}

impl GroupStorage {
    /// Loads a group's state from `db` (empty when the group was never written).
    pub fn open(db: Arc<Database>, group: GroupId) -> Result<Self, StoreError> {
        let tx = db.begin_read()?;
        let state = tx.open_table(STATE)?;
        let get = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
            Ok(state.get((group, key))?.map(|v| v.value().to_vec()))
        };
        let hard_state = match get(KEY_HARD_STATE)? {
            Some(b) => decode("hard state", &b)?,
            None => HardState::default(),
        };
        let conf_state = match get(KEY_CONF_STATE)? {
            Some(b) => decode("conf state", &b)?,
            None => ConfState::default(),
        };
        let snapshot: Snapshot = match get(KEY_SNAPSHOT)? {
            Some(b) => decode("snapshot", &b)?,
            None => Snapshot::default(),
        };
        let log = tx.open_table(LOG)?;
        let mut entries = Vec::new();
        for item in log.range((group, 0)..=(group, u64::MAX))? {
            let (k, v) = item?;
            let e: Entry = decode("log entry", v.value())?;
            let (_, index) = k.value();
            if e.index != index {
                return Err(StoreError::Corrupt(format!("entry at key {index} has index {}", e.index)));
            }
            if let Some(last) = entries.last().map(|l: &Entry| l.index)
                && index != last + 1
            {
                return Err(StoreError::Corrupt(format!("log gap between {last} and {index}")));
            }
            entries.push(e);
        }
        let mem = Mem {
            scheduled_term_vote: (hard_state.term, hard_state.vote),
            hard_state,
            conf_state,
            snapshot,
            entries,
        };
        let last = mem.last();
        Ok(Self {
            group,
            db,
            mem: Arc::new(RwLock::new(mem)),
            disk: Arc::new(std::sync::Mutex::new(DiskState { last })),
        })
    }

    fn rd(&self) -> RwLockReadGuard<'_, Mem> {
        self.mem.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn wr(&self) -> RwLockWriteGuard<'_, Mem> {
        self.mem.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True when nothing was ever stored for this group.
    pub fn is_fresh(&self) -> bool {
        let m = self.rd();
        m.hard_state == HardState::default()
            && m.conf_state == ConfState::default()
            && m.entries.is_empty()
            && m.snapshot.get_metadata().index == 0
    }

    /// Starts a new cluster (durably): every initial voter writes the same snapshot at index
    /// 1 (term 1) holding the voters, the member address book and the initial state. The log
    /// therefore starts at 2, so a node that joins later always catches up from a snapshot and
    /// learns the initial configuration from it. Only valid on a fresh group.
    pub fn bootstrap(&self, voters: Vec<u64>, members: &[u8], data: Vec<u8>) -> Result<(), StoreError> {
        if !self.is_fresh() {
            return Err(StoreError::Invalid("bootstrap of a group that has state".into()));
        }
        let cs = ConfState::from((voters, vec![]));
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().set_conf_state(cs.clone());
        let hs = HardState { term: 1, commit: 1, ..Default::default() };
        let group = self.group;
        self.write_txn(|_, state| {
            state.insert((group, KEY_CONF_STATE), encode(&cs)?.as_slice())?;
            state.insert((group, KEY_MEMBERS), members)?;
            state.insert((group, KEY_SNAPSHOT), encode(&snap)?.as_slice())?;
            state.insert((group, KEY_HARD_STATE), encode(&hs)?.as_slice())?;
            Ok(())
        })?;
        let mut m = self.wr();
        m.scheduled_term_vote = (hs.term, hs.vote);
        m.conf_state = cs;
        m.hard_state = hs;
        m.snapshot = snap;
        self.disk.lock().unwrap_or_else(std::sync::PoisonError::into_inner).last = 1;
        Ok(())
    }

    /// The member address book last stored with [`GroupStorage::set_conf_state`] or
    /// [`GroupStorage::bootstrap`].
    pub fn members_blob(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let state = tx.open_table(STATE)?;
        Ok(state.get((self.group, KEY_MEMBERS))?.map(|v| v.value().to_vec()))
    }

    pub fn hard_state(&self) -> HardState {
        self.rd().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.rd().conf_state.clone()
    }

    /// The latest snapshot, data included (index 0 when none).
    pub fn latest_snapshot(&self) -> Snapshot {
        self.rd().snapshot.clone()
    }

    /// Index of the latest snapshot (0 when none).
    pub fn snapshot_index(&self) -> u64 {
        self.rd().snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.rd().first()
    }

    fn last(&self) -> u64 {
        self.rd().last()
    }

    fn write_txn(
        &self,
        f: impl FnOnce(
            &mut redb::Table<'_, (u64, u64), &'static [u8]>,
            &mut redb::Table<'_, (u64, &'static str), &'static [u8]>,
        ) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate).map_err(|e| StoreError::Db(e.to_string()))?;
        {
            let mut log = tx.open_table(LOG)?;
            let mut state = tx.open_table(STATE)?;
            f(&mut log, &mut state)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Durably appends `entries` (replacing any conflicting suffix) and records `hs`, in one
    /// transaction with one fsync.
    pub fn persist(&self, entries: &[Entry], hs: Option<&HardState>) -> Result<(), StoreError> {
        match self.stage_append(entries, hs)? {
            Some(job) => self.write(vec![job]),
            None => Ok(()),
        }
    }

    /// Memory half of an append: `entries` (replacing any conflicting suffix) and `hs` become
    /// visible to readers now; the returned job makes them durable. `None` when nothing needs
    /// writing: only term and vote must be durable before anyone is answered, so a hard state
    /// that moved only its commit index stays in memory until the next write.
    pub fn stage_append(
        &self,
        entries: &[Entry],
        hs: Option<&HardState>,
    ) -> Result<Option<DiskJob>, StoreError> {
        let mut m = self.wr();
        if let Some(first) = entries.first() {
            if first.index < m.first() {
                return Err(StoreError::Invalid(format!(
                    "append at {} below the first index {}",
                    first.index,
                    m.first()
                )));
            }
            if first.index > m.last() + 1 {
                return Err(StoreError::Invalid(format!(
                    "append at {} leaves a gap after {}",
                    first.index,
                    m.last()
                )));
            }
        }
        let needs_hs = hs.filter(|h| {
            !entries.is_empty() || h.term != m.scheduled_term_vote.0 || h.vote != m.scheduled_term_vote.1
        });
        if let Some(first) = entries.first() {
            let keep = usize::try_from(first.index - m.first()).unwrap_or(usize::MAX);
            m.entries.truncate(keep);
            m.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hs {
            m.hard_state = hs.clone();
        }
        if entries.is_empty() && needs_hs.is_none() {
            return Ok(None);
        }
        if let Some(h) = needs_hs {
            m.scheduled_term_vote = (h.term, h.vote);
        }
        Ok(Some(DiskJob::Append { entries: entries.to_vec(), hs: needs_hs.cloned() }))
    }

    /// Records a new commit index in memory; it reaches the disk with the next write. (A
    /// restarted node re-learns the commit index from the leader; the only thing that depends
    /// on it being durable is a snapshot, and [`GroupStorage::save_snapshot`] writes it.)
    pub fn set_commit(&self, commit: u64) {
        let mut m = self.wr();
        if commit > m.hard_state.commit {
            m.hard_state.commit = commit;
        }
    }

    /// Durably records the configuration after a conf change was applied, with the member
    /// address book (opaque bytes owned by the caller).
    pub fn set_conf_state(&self, cs: ConfState, members: &[u8]) -> Result<(), StoreError> {
        let job = self.stage_conf_state(cs, members);
        self.write(vec![job])
    }

    /// Memory half of [`GroupStorage::set_conf_state`].
    pub fn stage_conf_state(&self, cs: ConfState, members: &[u8]) -> DiskJob {
        self.wr().conf_state = cs.clone();
        DiskJob::ConfState { cs, members: members.to_vec() }
    }

    /// Installs a snapshot received from the leader: the log is replaced by it (durably).
    pub fn apply_snapshot(&self, snap: Snapshot, members: &[u8]) -> Result<(), StoreError> {
        let job = self.stage_install_snapshot(snap, members)?;
        self.write(vec![job])
    }

    /// Memory half of [`GroupStorage::apply_snapshot`]. The member book is written in the same
    /// transaction, so a crash cannot leave one older than the snapshot.
    pub fn stage_install_snapshot(&self, snap: Snapshot, members: &[u8]) -> Result<DiskJob, StoreError> {
        let mut m = self.wr();
        let meta = snap.get_metadata();
        let ours = m.snapshot.get_metadata().index;
        if meta.index < ours {
            return Err(StoreError::Invalid(format!(
                "snapshot at {} is older than ours at {ours}",
                meta.index
            )));
        }
        let mut hs = m.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        let cs = meta.get_conf_state().clone();
        m.entries.clear();
        m.hard_state = hs.clone();
        m.scheduled_term_vote = (hs.term, hs.vote);
        m.conf_state = cs.clone();
        m.snapshot = snap.clone();
        Ok(DiskJob::InstallSnapshot { snap, hs, cs, members: members.to_vec() })
    }

    /// Durably stores a snapshot of applied state at `index` (which must be in the log) and
    /// drops log entries before `compact_below` (at most `index + 1`).
    pub fn save_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
        compact_below: u64,
    ) -> Result<(), StoreError> {
        let job = self.stage_save_snapshot(index, conf_state, data, compact_below)?;
        self.write(vec![job])
    }

    /// Memory half of [`GroupStorage::save_snapshot`].
    pub fn stage_save_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
        compact_below: u64,
    ) -> Result<DiskJob, StoreError> {
        let mut m = self.wr();
        let term =
            m.term_of(index).map_err(|e| StoreError::Invalid(format!("snapshot at {index}: {e:?}")))?;
        let compact_below = compact_below.min(index + 1).max(m.first());
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        // The durable commit index may lag (commit-only changes are not written, see
        // `stage_append`), but never below the snapshot: raft-rs refuses to start when the
        // stored commit index is below the first index or the applied index (the snapshot's).
        m.hard_state.commit = m.hard_state.commit.max(index);
        let hs = m.hard_state.clone();
        m.scheduled_term_vote = (hs.term, hs.vote);
        let first = m.first();
        let drop = usize::try_from(compact_below.saturating_sub(first)).unwrap_or(0).min(m.entries.len());
        m.entries.drain(..drop);
        m.snapshot = snap.clone();
        Ok(DiskJob::SaveSnapshot { snap, hs, compact_below })
    }

    /// Disk half: makes `jobs` durable, in order, in one transaction with one fsync. Jobs must
    /// be written in the order they were staged, by one thread at a time.
    pub fn write(&self, jobs: Vec<DiskJob>) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let group = self.group;
        let mut disk = self.disk.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut last = disk.last;
        self.write_txn(|log, state| {
            for job in jobs {
                match job {
                    DiskJob::Append { entries, hs } => {
                        if let Some(first) = entries.first() {
                            for i in first.index..=last {
                                log.remove((group, i))?;
                            }
                            for e in &entries {
                                log.insert((group, e.index), encode(e)?.as_slice())?;
                            }
                            last = entries.last().map_or(last, |e| e.index);
                        }
                        if let Some(hs) = hs {
                            state.insert((group, KEY_HARD_STATE), encode(&hs)?.as_slice())?;
                        }
                    }
                    DiskJob::ConfState { cs, members } => {
                        state.insert((group, KEY_CONF_STATE), encode(&cs)?.as_slice())?;
                        state.insert((group, KEY_MEMBERS), members.as_slice())?;
                    }
                    DiskJob::InstallSnapshot { snap, hs, cs, members } => {
                        log.retain_in((group, 0)..=(group, u64::MAX), |_, _| false)?;
                        state.insert((group, KEY_SNAPSHOT), encode(&snap)?.as_slice())?;
                        state.insert((group, KEY_HARD_STATE), encode(&hs)?.as_slice())?;
                        state.insert((group, KEY_CONF_STATE), encode(&cs)?.as_slice())?;
                        state.insert((group, KEY_MEMBERS), members.as_slice())?;
                        last = snap.get_metadata().index;
                    }
                    DiskJob::SaveSnapshot { snap, hs, compact_below } => {
                        state.insert((group, KEY_SNAPSHOT), encode(&snap)?.as_slice())?;
                        state.insert((group, KEY_HARD_STATE), encode(&hs)?.as_slice())?;
                        log.retain_in((group, 0)..(group, compact_below), |_, _| false)?;
                    }
                }
            }
            Ok(())
        })?;
        disk.last = last;
        Ok(())
    }

    /// The entry at `idx`, if it is in the (un-compacted) log.
    pub fn entry(&self, idx: u64) -> Option<Entry> {
        let m = self.rd();
        let first = m.first();
        if idx < first {
            return None;
        }
        m.entries.get(usize::try_from(idx - first).ok()?).cloned()
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let m = self.rd();
        Ok(RaftState::new(m.hard_state.clone(), m.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let m = self.rd();
        let first = m.first();
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > m.last() + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let lo = usize::try_from(low - first).unwrap_or(usize::MAX);
        let hi = usize::try_from(high - first).unwrap_or(usize::MAX);
        let mut ents = m.entries.get(lo..hi).map(<[Entry]>::to_vec).unwrap_or_default();
        drop(m);
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.rd().term_of(idx).map_err(raft::Error::Store)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let m = self.rd();
        if m.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(m.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage as _;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 8].into(), ..Default::default() }
    }

    #[test]
    fn append_truncate_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("raft.redb")).unwrap();
        let s = GroupStorage::open(db.clone(), 7).unwrap();
        assert!(s.is_fresh());
        s.bootstrap(vec![1, 2, 3], b"m", vec![]).unwrap();
        assert_eq!(s.first_index().unwrap(), 2);
        let hs = HardState { term: 2, vote: 1, ..Default::default() };
        s.persist(&(2..=5).map(|i| entry(i, 1)).collect::<Vec<_>>(), Some(&hs)).unwrap();
        // A conflicting suffix replaces entries 4 and 5.
        s.persist(&[entry(4, 2)], None).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
        assert!(s.persist(&[entry(9, 2)], None).is_err(), "a gap is refused");
        drop(s);
        let s = GroupStorage::open(db.clone(), 7).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
        assert_eq!(s.hard_state().vote, 1);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(s.members_blob().unwrap().as_deref(), Some(&b"m"[..]));
        // Another group in the same file is independent.
        assert!(GroupStorage::open(db, 8).unwrap().is_fresh());
    }

    #[test]
    fn snapshot_makes_the_commit_index_durable() {
        // A commit-only hard state change stays in memory; a snapshot that compacts past the
        // durable commit index must record it, else raft-rs refuses to restart
        // ("hs.commit is out of range").
        let db = memory_db().unwrap();
        let s = GroupStorage::open(db.clone(), 1).unwrap();
        s.bootstrap(vec![1], b"", vec![]).unwrap();
        let hs = HardState { term: 3, vote: 1, commit: 1, ..Default::default() };
        s.persist(&(2..=10).map(|i| entry(i, 3)).collect::<Vec<_>>(), Some(&hs)).unwrap();
        s.persist(&[], Some(&HardState { commit: 10, ..hs.clone() })).unwrap();
        assert_eq!(GroupStorage::open(db.clone(), 1).unwrap().hard_state().commit, 1);
        s.save_snapshot(10, s.conf_state().clone(), vec![], 11).unwrap();
        let s2 = GroupStorage::open(db, 1).unwrap();
        assert_eq!(s2.first_index().unwrap(), 11);
        assert_eq!((s2.hard_state().term, s2.hard_state().vote, s2.hard_state().commit), (3, 1, 10));
    }

    #[test]
    fn snapshot_and_compaction() {
        let db = memory_db().unwrap();
        let s = GroupStorage::open(db.clone(), 1).unwrap();
        s.bootstrap(vec![1], b"", vec![]).unwrap();
        s.persist(&(2..=10).map(|i| entry(i, 3)).collect::<Vec<_>>(), None).unwrap();
        s.save_snapshot(8, s.conf_state().clone(), b"state".to_vec(), 6).unwrap();
        assert_eq!(s.first_index().unwrap(), 6);
        assert!(matches!(
            s.entries(5, 7, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.entries(6, 11, None, GetEntriesContext::empty(false)).unwrap().len(), 5);
        assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().index, 8);
        let s2 = GroupStorage::open(db, 1).unwrap();
        assert_eq!(s2.first_index().unwrap(), 6);
        assert_eq!(s2.last_index().unwrap(), 10);
        assert_eq!(&s2.latest_snapshot().data[..], b"state");

        // Installing a newer snapshot replaces the log.
        let s3 = s2;
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().set_conf_state(ConfState::from((vec![1, 2], vec![])));
        s3.apply_snapshot(snap, b"").unwrap();
        assert_eq!(s3.first_index().unwrap(), 21);
        assert_eq!(s3.last_index().unwrap(), 20);
        assert_eq!(s3.term(20).unwrap(), 4);
        assert_eq!(s3.hard_state().commit, 20);
    }
}
