//! Durable Raft storage for one group: the log, the hard state, the configuration and the
//! latest snapshot, mirrored in memory.
//!
//! On disk a node has one raft-engine log ([`LogStore`]) shared by all its groups (the group id
//! is raft-engine's region id, so every record carries it) and one file per group holding the
//! latest snapshot's data. The whole un-compacted log is also held in memory (compaction keeps
//! it short), so `raft::Storage` reads never touch the disk; the disk is written once per Ready,
//! in one log batch with one fdatasync, whatever number of entries and proposals it carries
//! (group commit).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use elea_common::GroupId;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use raft_engine::{Command as LogCommand, Engine, LogBatch, MessageExt, ReadableSize};
use serde::{Deserialize, Serialize};

const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
/// The latest snapshot's metadata (protobuf `Snapshot` without data) and its data file's
/// length and checksum.
const KEY_SNAPSHOT: &[u8] = b"snapshot";
const KEY_SNAPSHOT_FILE: &[u8] = b"snapshot_file";
const KEY_MEMBERS: &[u8] = b"members";

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

impl From<raft_engine::Error> for StoreError {
    fn from(e: raft_engine::Error) -> Self {
        match e {
            raft_engine::Error::Corruption(_) | raft_engine::Error::Protobuf(_) => {
                StoreError::Corrupt(e.to_string())
            }
            e => StoreError::Db(e.to_string()),
        }
    }
}

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

fn io_err(what: &Path, e: std::io::Error) -> StoreError {
    StoreError::Db(format!("{}: {e}", what.display()))
}

/// How raft-engine finds an entry's index.
struct EntryExt;

impl MessageExt for EntryExt {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// Settings of a node's Raft log store.
#[derive(Debug, Clone)]
pub struct LogStoreConfig {
    /// Flush every write to the device (fdatasync) before it counts as done. Default on; off
    /// only where durability is simulated (tests).
    pub sync: bool,
    /// The log rotates to a new file at this size (bytes); a file is deleted (or kept for
    /// reuse) once every group has compacted past it. Default 32 MiB.
    pub file_size: u64,
}

impl Default for LogStoreConfig {
    fn default() -> Self {
        Self { sync: true, file_size: 32 << 20 }
    }
}

/// A node's Raft log store: a raft-engine log under `DIR/log` for entries and small state
/// records of every group, and snapshot data files under `DIR/snapshots`.
pub struct LogStore {
    engine: Engine<super::logfile::ZeroFillFs>,
    snap_dir: PathBuf,
    sync: bool,
}

/// Length and checksum of a snapshot data file, stored with the snapshot's metadata.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    index: u64,
    len: u64,
    crc32c: u32,
}

impl LogStore {
    /// Opens (or creates) the store in `dir`, replaying the log.
    pub fn open(dir: &Path, cfg: &LogStoreConfig) -> Result<Arc<Self>, StoreError> {
        let log_dir = dir.join("log");
        let snap_dir = dir.join("snapshots");
        for d in [&log_dir, &snap_dir] {
            std::fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
        }
        let dir_str = log_dir
            .to_str()
            .ok_or_else(|| StoreError::Invalid(format!("{}: not a UTF-8 path", log_dir.display())))?;
        let file_size = cfg.file_size.max(1 << 20);
        let engine_cfg = raft_engine::Config {
            dir: dir_str.to_owned(),
            target_file_size: ReadableSize(file_size),
            // Every group rewrites all its state records with each snapshot, so old files empty
            // out by compaction alone; rewriting live records is only a backstop.
            purge_threshold: ReadableSize(file_size.saturating_mul(8)),
            ..Default::default()
        };
        let engine = Engine::open_with_file_system(engine_cfg, Arc::new(super::logfile::ZeroFillFs::new()))?;
        Ok(Arc::new(Self { engine, snap_dir, sync: cfg.sync }))
    }

    fn snap_path(&self, group: GroupId, index: u64) -> PathBuf {
        self.snap_dir.join(format!("{group:016x}-{index:016x}.snap"))
    }

    /// Writes a snapshot's data to its file (durably when syncing) and returns its record.
    fn write_snapshot_file(
        &self,
        group: GroupId,
        index: u64,
        data: &[u8],
    ) -> Result<SnapshotFile, StoreError> {
        let path = self.snap_path(group, index);
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(data).map_err(|e| io_err(&tmp, e))?;
        if self.sync {
            f.sync_data().map_err(|e| io_err(&tmp, e))?;
        }
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        if self.sync {
            let d = std::fs::File::open(&self.snap_dir).map_err(|e| io_err(&self.snap_dir, e))?;
            d.sync_all().map_err(|e| io_err(&self.snap_dir, e))?;
        }
        Ok(SnapshotFile { index, len: data.len() as u64, crc32c: crc32c::crc32c(data) })
    }

    fn read_snapshot_file(&self, group: GroupId, rec: &SnapshotFile) -> Result<Vec<u8>, StoreError> {
        let path = self.snap_path(group, rec.index);
        let data = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        if data.len() as u64 != rec.len || crc32c::crc32c(&data) != rec.crc32c {
            return Err(StoreError::Corrupt(format!(
                "{}: length or checksum differs from the log's record",
                path.display()
            )));
        }
        Ok(data)
    }

    /// Deletes this group's snapshot files other than `keep` (left by a crash between writing
    /// a file and the log batch that refers to it, or superseded).
    fn remove_snapshot_files_except(&self, group: GroupId, keep: u64) -> Result<(), StoreError> {
        let prefix = format!("{group:016x}-");
        let keep_name = self.snap_path(group, keep);
        let rd = std::fs::read_dir(&self.snap_dir).map_err(|e| io_err(&self.snap_dir, e))?;
        for item in rd {
            let item = item.map_err(|e| io_err(&self.snap_dir, e))?;
            let name = item.file_name();
            let is_ours = name.to_str().is_some_and(|n| n.starts_with(&prefix));
            if is_ours && item.path() != keep_name {
                std::fs::remove_file(item.path()).map_err(|e| io_err(&item.path(), e))?;
            }
        }
        Ok(())
    }

    fn get_message<M: protobuf::Message>(&self, group: GroupId, key: &[u8]) -> Result<Option<M>, StoreError> {
        self.engine
            .get_message::<M>(group, key)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", String::from_utf8_lossy(key))))
    }
}

/// One group's Raft storage. Implements [`raft::Storage`] from memory; the mutating methods
/// write through to the log store durably before returning.
///
/// Cloning gives another handle to the same storage. The in-memory mirror is behind a lock
/// that is held only to read or update memory, never across a disk write, so a thread that
/// persists (the group's writer) does not stall the Raft thread reading entries. Mutations
/// must come from one thread at a time (the Raft thread, or the writer when one is used).
#[derive(Clone)]
pub struct GroupStorage {
    group: GroupId,
    store: Arc<LogStore>,
    mem: Arc<RwLock<Mem>>,
    disk: Arc<std::sync::Mutex<DiskState>>,
}

/// What the disk holds, as the writer of the disk halves tracks it.
struct DiskState {
    /// Index of the snapshot whose data file the log refers to (0: none).
    snapshot_file: u64,
}

/// The disk half of a storage mutation; see [`GroupStorage::write`].
#[derive(Debug)]
pub enum DiskJob {
    Append { entries: Vec<Entry>, hs: Option<HardState> },
    ConfState { cs: ConfState, members: Vec<u8> },
    InstallSnapshot { snap: Snapshot, hs: HardState, cs: ConfState, members: Vec<u8> },
    SaveSnapshot { snap: Snapshot, hs: HardState, cs: ConfState, members: Vec<u8>, compact_below: u64 },
}

struct Mem {
    /// Term and vote of the newest hard state handed to the disk (written or scheduled).
    scheduled_term_vote: (u64, u64),
    hard_state: HardState,
    conf_state: ConfState,
    /// The member address book last staged.
    members: Vec<u8>,
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

/// Adds the records of a snapshot (its data file already durable) to `batch`.
fn put_snapshot(
    batch: &mut LogBatch,
    group: GroupId,
    snap: &Snapshot,
    file: &SnapshotFile,
) -> Result<(), StoreError> {
    let mut meta_only = Snapshot::default();
    meta_only.set_metadata(snap.get_metadata().clone());
    batch.put_message(group, KEY_SNAPSHOT.to_vec(), &meta_only)?;
    let rec = postcard::to_allocvec(file).map_err(|e| StoreError::Invalid(format!("encode: {e}")))?;
    batch.put(group, KEY_SNAPSHOT_FILE.to_vec(), rec)?;
    Ok(())
}

impl GroupStorage {
    /// Loads a group's state from `store` (empty when the group was never written).
    pub fn open(store: Arc<LogStore>, group: GroupId) -> Result<Self, StoreError> {
        let hard_state: HardState = store.get_message(group, KEY_HARD_STATE)?.unwrap_or_default();
        let conf_state: ConfState = store.get_message(group, KEY_CONF_STATE)?.unwrap_or_default();
        let members = store.engine.get(group, KEY_MEMBERS).unwrap_or_default();
        let mut snapshot: Snapshot = store.get_message(group, KEY_SNAPSHOT)?.unwrap_or_default();
        let snap_index = snapshot.get_metadata().index;
        if snap_index > 0 {
            let rec = store
                .engine
                .get(group, KEY_SNAPSHOT_FILE)
                .ok_or_else(|| StoreError::Corrupt("snapshot without a data file record".into()))?;
            let rec: SnapshotFile = postcard::from_bytes(&rec)
                .map_err(|e| StoreError::Corrupt(format!("snapshot file record: {e}")))?;
            if rec.index != snap_index {
                return Err(StoreError::Corrupt(format!(
                    "snapshot at {snap_index} refers to a data file of index {}",
                    rec.index
                )));
            }
            snapshot.set_data(store.read_snapshot_file(group, &rec)?.into());
        }
        store.remove_snapshot_files_except(group, snap_index)?;
        let mut entries = Vec::new();
        if let (Some(first), Some(last)) = (store.engine.first_index(group), store.engine.last_index(group)) {
            // raft-engine caches the last block it read in a thread-local keyed by file number
            // and offset, not by engine: on a thread that has read from another engine (two
            // nodes in one process, as in tests) it would return that engine's block. A thread
            // of its own starts with an empty cache.
            let engine = &store.engine;
            entries = std::thread::scope(|s| {
                s.spawn(|| {
                    let mut v = Vec::new();
                    engine.fetch_entries_to::<EntryExt>(group, first, last + 1, None, &mut v).map(|_| v)
                })
                .join()
            })
            .map_err(|_| StoreError::Db("reading the raft log panicked".into()))??;
        }
        for (i, e) in entries.iter().enumerate() {
            let expected = entries[0].index + i as u64;
            if e.index != expected {
                return Err(StoreError::Corrupt(format!("log entry {expected} has index {}", e.index)));
            }
        }
        if let (Some(f), Some(l)) = (entries.first(), entries.last())
            && (f.index > snap_index + 1 || l.index < snap_index)
        {
            return Err(StoreError::Corrupt(format!(
                "log {}..={} does not reach the snapshot at {snap_index}",
                f.index, l.index
            )));
        }
        let mem = Mem {
            scheduled_term_vote: (hard_state.term, hard_state.vote),
            hard_state,
            conf_state,
            members,
            snapshot,
            entries,
        };
        Ok(Self {
            group,
            store,
            mem: Arc::new(RwLock::new(mem)),
            disk: Arc::new(std::sync::Mutex::new(DiskState { snapshot_file: snap_index })),
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
    pub fn bootstrap(
        &self,
        voters: Vec<u64>,
        learners: Vec<u64>,
        members: &[u8],
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        if !self.is_fresh() {
            return Err(StoreError::Invalid("bootstrap of a group that has state".into()));
        }
        let cs = ConfState::from((voters, learners));
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().set_conf_state(cs.clone());
        let hs = HardState { term: 1, commit: 1, ..Default::default() };
        self.write(vec![DiskJob::InstallSnapshot {
            snap: snap.clone(),
            hs: hs.clone(),
            cs: cs.clone(),
            members: members.to_vec(),
        }])?;
        let mut m = self.wr();
        m.scheduled_term_vote = (hs.term, hs.vote);
        m.conf_state = cs;
        m.hard_state = hs;
        m.members = members.to_vec();
        m.snapshot = snap;
        Ok(())
    }

    /// The member address book last stored with [`GroupStorage::set_conf_state`] or
    /// [`GroupStorage::bootstrap`].
    pub fn members_blob(&self) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.store.engine.get(self.group, KEY_MEMBERS))
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

    /// Durably appends `entries` (replacing any conflicting suffix) and records `hs`, in one
    /// log batch with one fdatasync.
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
        let mut m = self.wr();
        m.conf_state = cs.clone();
        m.members = members.to_vec();
        DiskJob::ConfState { cs, members: members.to_vec() }
    }

    /// Installs a snapshot received from the leader: the log is replaced by it (durably).
    pub fn apply_snapshot(&self, snap: Snapshot, members: &[u8]) -> Result<(), StoreError> {
        let job = self.stage_install_snapshot(snap, members)?;
        self.write(vec![job])
    }

    /// Memory half of [`GroupStorage::apply_snapshot`]. The member book is written in the same
    /// log batch, so a crash cannot leave one older than the snapshot.
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
        m.members = members.to_vec();
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
        // The configuration and the member book are written again with the snapshot, so that
        // every record of the group is newer than the compacted entries and the log files
        // behind them can be deleted.
        let (cs, members) = (m.conf_state.clone(), m.members.clone());
        Ok(DiskJob::SaveSnapshot { snap, hs, cs, members, compact_below })
    }

    /// Disk half: makes `jobs` durable, in order, in one log batch with one fdatasync
    /// (snapshot data files are written, and flushed, before it). Jobs must be written in the
    /// order they were staged, by one thread at a time. On error nothing after the failing
    /// job is durable; the caller must stop.
    pub fn write(&self, jobs: Vec<DiskJob>) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let group = self.group;
        let mut disk = self.disk.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut batch = LogBatch::default();
        let mut snapshot_file = None;
        let mut compacted = false;
        for job in jobs {
            match job {
                DiskJob::Append { entries, hs } => {
                    // raft-engine replaces a conflicting suffix itself.
                    batch.add_entries::<EntryExt>(group, &entries)?;
                    if let Some(hs) = hs {
                        batch.put_message(group, KEY_HARD_STATE.to_vec(), &hs)?;
                    }
                }
                DiskJob::ConfState { cs, members } => {
                    batch.put_message(group, KEY_CONF_STATE.to_vec(), &cs)?;
                    batch.put(group, KEY_MEMBERS.to_vec(), members)?;
                }
                DiskJob::InstallSnapshot { snap, hs, cs, members } => {
                    let index = snap.get_metadata().index;
                    let file = self.store.write_snapshot_file(group, index, &snap.data)?;
                    snapshot_file = Some(index);
                    // Drops the group's whole log and records; they are written anew below.
                    batch.add_command(group, LogCommand::Clean);
                    put_snapshot(&mut batch, group, &snap, &file)?;
                    batch.put_message(group, KEY_HARD_STATE.to_vec(), &hs)?;
                    batch.put_message(group, KEY_CONF_STATE.to_vec(), &cs)?;
                    batch.put(group, KEY_MEMBERS.to_vec(), members)?;
                }
                DiskJob::SaveSnapshot { snap, hs, cs, members, compact_below } => {
                    let index = snap.get_metadata().index;
                    let file = self.store.write_snapshot_file(group, index, &snap.data)?;
                    snapshot_file = Some(index);
                    put_snapshot(&mut batch, group, &snap, &file)?;
                    batch.put_message(group, KEY_HARD_STATE.to_vec(), &hs)?;
                    batch.put_message(group, KEY_CONF_STATE.to_vec(), &cs)?;
                    batch.put(group, KEY_MEMBERS.to_vec(), members)?;
                    batch.add_command(group, LogCommand::Compact { index: compact_below });
                    compacted = true;
                }
            }
        }
        self.store.engine.write(&mut batch, self.store.sync)?;
        if let Some(index) = snapshot_file {
            disk.snapshot_file = index;
            self.store.remove_snapshot_files_except(group, index)?;
        }
        if compacted {
            // Deletes (or keeps for reuse) log files that hold nothing live any more. It may
            // read entries to rewrite them: on a thread of its own, for the reason given in
            // `open`.
            let engine = &self.store.engine;
            let lagging = std::thread::scope(|s| s.spawn(|| engine.purge_expired_files()).join())
                .map_err(|_| StoreError::Db("purging the raft log panicked".into()))??;
            if !lagging.is_empty() {
                tracing::warn!(?lagging, "raft log: groups hold entries in old log files");
            }
        }
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

    fn open(dir: &Path) -> Arc<LogStore> {
        LogStore::open(dir, &LogStoreConfig::default()).unwrap()
    }

    #[test]
    fn append_truncate_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let s = GroupStorage::open(store.clone(), 7).unwrap();
        assert!(s.is_fresh());
        s.bootstrap(vec![1, 2, 3], vec![], b"m", vec![]).unwrap();
        assert_eq!(s.first_index().unwrap(), 2);
        let hs = HardState { term: 2, vote: 1, ..Default::default() };
        s.persist(&(2..=5).map(|i| entry(i, 1)).collect::<Vec<_>>(), Some(&hs)).unwrap();
        // A conflicting suffix replaces entries 4 and 5.
        s.persist(&[entry(4, 2)], None).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
        assert!(s.persist(&[entry(9, 2)], None).is_err(), "a gap is refused");
        drop(s);
        let s = GroupStorage::open(store.clone(), 7).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
        // Another group in the same store is independent.
        assert!(GroupStorage::open(store.clone(), 8).unwrap().is_fresh());
        drop((s, store));
        // The same after the store itself is reopened (the log is replayed from its files).
        let store = open(dir.path());
        let s = GroupStorage::open(store.clone(), 7).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
        assert_eq!(s.hard_state().vote, 1);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!(s.members_blob().unwrap().as_deref(), Some(&b"m"[..]));
        assert!(GroupStorage::open(store, 8).unwrap().is_fresh());
    }

    #[test]
    fn snapshot_makes_the_commit_index_durable() {
        // A commit-only hard state change stays in memory; a snapshot that compacts past the
        // durable commit index must record it, else raft-rs refuses to restart
        // ("hs.commit is out of range").
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let s = GroupStorage::open(store.clone(), 1).unwrap();
        s.bootstrap(vec![1], vec![], b"", vec![]).unwrap();
        let hs = HardState { term: 3, vote: 1, commit: 1, ..Default::default() };
        s.persist(&(2..=10).map(|i| entry(i, 3)).collect::<Vec<_>>(), Some(&hs)).unwrap();
        s.persist(&[], Some(&HardState { commit: 10, ..hs.clone() })).unwrap();
        assert_eq!(GroupStorage::open(store.clone(), 1).unwrap().hard_state().commit, 1);
        s.save_snapshot(10, s.conf_state().clone(), vec![], 11).unwrap();
        let s2 = GroupStorage::open(store, 1).unwrap();
        assert_eq!(s2.first_index().unwrap(), 11);
        assert_eq!((s2.hard_state().term, s2.hard_state().vote, s2.hard_state().commit), (3, 1, 10));
    }

    #[test]
    fn snapshot_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let s = GroupStorage::open(store.clone(), 1).unwrap();
        s.bootstrap(vec![1], vec![], b"", vec![]).unwrap();
        s.persist(&(2..=10).map(|i| entry(i, 3)).collect::<Vec<_>>(), None).unwrap();
        s.save_snapshot(8, s.conf_state().clone(), b"state".to_vec(), 6).unwrap();
        assert_eq!(s.first_index().unwrap(), 6);
        assert!(matches!(
            s.entries(5, 7, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.entries(6, 11, None, GetEntriesContext::empty(false)).unwrap().len(), 5);
        assert_eq!(s.snapshot(0, 2).unwrap().get_metadata().index, 8);
        let s2 = GroupStorage::open(store.clone(), 1).unwrap();
        assert_eq!(s2.first_index().unwrap(), 6);
        assert_eq!(s2.last_index().unwrap(), 10);
        assert_eq!(&s2.latest_snapshot().data[..], b"state");

        // Installing a newer snapshot replaces the log.
        let s3 = s2;
        let mut snap = Snapshot::default();
        snap.set_data(b"newer".to_vec().into());
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().set_conf_state(ConfState::from((vec![1, 2], vec![])));
        s3.apply_snapshot(snap, b"book").unwrap();
        assert_eq!(s3.first_index().unwrap(), 21);
        assert_eq!(s3.last_index().unwrap(), 20);
        assert_eq!(s3.term(20).unwrap(), 4);
        assert_eq!(s3.hard_state().commit, 20);
        s3.persist(&(21..=23).map(|i| entry(i, 4)).collect::<Vec<_>>(), None).unwrap();
        drop((s, s3, store));

        // After a restart of the store: the installed snapshot, the log after it, and only
        // the newest snapshot file is left.
        let store = open(dir.path());
        let s = GroupStorage::open(store, 1).unwrap();
        assert_eq!(s.first_index().unwrap(), 21);
        assert_eq!(s.last_index().unwrap(), 23);
        assert_eq!(s.term(20).unwrap(), 4);
        assert_eq!(&s.latest_snapshot().data[..], b"newer");
        assert_eq!(s.conf_state().voters, vec![1, 2]);
        assert_eq!(s.members_blob().unwrap().as_deref(), Some(&b"book"[..]));
        let files = std::fs::read_dir(dir.path().join("snapshots")).unwrap().count();
        assert_eq!(files, 1);
    }

    #[test]
    fn a_damaged_snapshot_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let s = GroupStorage::open(store.clone(), 1).unwrap();
        s.bootstrap(vec![1], vec![], b"", b"state".to_vec()).unwrap();
        drop((s, store));
        let file = std::fs::read_dir(dir.path().join("snapshots")).unwrap().next().unwrap().unwrap();
        std::fs::write(file.path(), b"stale").unwrap();
        let store = open(dir.path());
        assert!(matches!(GroupStorage::open(store, 1), Err(StoreError::Corrupt(_))));
    }
}
