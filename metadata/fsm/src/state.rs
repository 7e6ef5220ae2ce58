//! The replicated state's data structures: volumes, inodes, directory entries, chunk slice
//! lists, sessions, locks, the slice reference table and the de-duplication table.
//!
//! Everything lives in `BTreeMap`/`BTreeSet` so iteration order (and therefore the snapshot
//! bytes) is the same on every replica. The small helpers here only read or do bookkeeping
//! that cannot fail; the operations themselves live in the other modules.

use std::collections::{BTreeMap, BTreeSet};

use elea_common::{Errno, Ino, SessionId, SliceId, Timespec, VolumeId};
use serde::{Deserialize, Serialize};

use crate::chunks::allocated_blocks;
use crate::groups::GroupTable;
use crate::inline::InlineTable;
use crate::mobility::MobilityTable;
use crate::sites::SiteTable;
use crate::types::{
    Attr, CacheStats, DataIdentity, FileType, LockKind, OpResult, Slice, SliceLoc, VolumeConfig, mode,
};

/// A lock owner: the session and the owner id the gateway gave (a process or open file).
pub(crate) type LockOwner = (SessionId, u64);

/// The whole replicated state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct State {
    /// The latest "now" any successful command used; time never goes backwards.
    pub clock: Timespec,
    /// Volume ids handed out so far (the next is this plus one).
    pub volumes_allocated: u64,
    pub volumes: BTreeMap<VolumeId, Volume>,
    pub volume_names: BTreeMap<String, VolumeId>,
    /// Slice ids handed out so far (the next is this plus one).
    pub slices_allocated: u64,
    pub slices: SliceTable,
    /// Session ids handed out so far.
    pub sessions_allocated: u64,
    pub sessions: BTreeMap<SessionId, Session>,
    /// Lock owners blocked in `F_SETLKW` and what they wait for (the wait-for graph's edges
    /// are derived from it against the current lock holders).
    pub waits: BTreeMap<LockOwner, Waiting>,
    /// De-duplication table per client id.
    pub clients: BTreeMap<u64, Client>,
    /// The cache node registry.
    pub cache_nodes: BTreeMap<u64, CacheNode>,
    /// Set with the first volume (snapshot format 4 on).
    pub identity: Option<DataIdentity>,
    /// Bytes of inline slices (snapshot format 5 on).
    pub inline: InlineTable,
    /// Sites (snapshot format 6 on). Written after the rest of the state, not with it, so
    /// a format 5 snapshot is a [`State`] as it is.
    #[serde(skip)]
    pub sites: SiteTable,
    /// Volumes in groups of their own (snapshot format 7 on), written after the sites.
    #[serde(skip)]
    pub groups: GroupTable,
    /// Store roles and migrations (snapshot format 8 on), written after the groups.
    #[serde(skip)]
    pub mobility: MobilityTable,
}

/// A registered cache node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct CacheNode {
    pub site: String,
    pub addr: String,
    pub incarnation: u64,
    pub registered: Timespec,
    pub last_seen: Timespec,
    pub stats: CacheStats,
}

/// Reference counts of slice ids, where their blocks live, and the ids no piece references
/// any more.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct SliceTable {
    /// Number of chunk pieces referencing each slice id (ids with no piece are absent).
    pub refs: BTreeMap<SliceId, u64>,
    /// Slice ids whose last piece went away, with the time: their data may be deleted.
    pub to_delete: BTreeMap<SliceId, Timespec>,
    /// Block locations of committed slices, until garbage collection forgets them.
    pub locs: BTreeMap<SliceId, SliceLoc>,
    /// The time of the command being applied (set before every apply; not replicated state).
    #[serde(skip)]
    pub now: Timespec,
    /// Slice ids whose last piece went away during the command being applied (drained after
    /// it; not replicated state).
    #[serde(skip)]
    pub zeroed: Vec<SliceId>,
}

impl SliceTable {
    /// One more piece references `id` (holes, id 0, are not counted).
    pub fn add_ref(&mut self, id: SliceId) {
        if id == 0 {
            return;
        }
        let n = self.refs.entry(id).or_insert(0);
        *n = n.saturating_add(1);
        self.to_delete.remove(&id);
        if let Some(l) = self.locs.get_mut(&id) {
            l.deleted = None;
        }
    }

    /// One piece referencing `id` went away; the last one queues the slice for deletion.
    pub fn drop_ref(&mut self, id: SliceId) {
        if id == 0 {
            return;
        }
        match self.refs.get_mut(&id) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                self.refs.remove(&id);
                self.zeroed.push(id);
                self.to_delete.insert(id, self.now);
                if let Some(l) = self.locs.get_mut(&id) {
                    l.deleted = Some(self.now);
                }
            }
        }
    }
}

/// One volume: a namespace rooted at `ROOT_INO`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Volume {
    pub name: String,
    pub config: VolumeConfig,
    pub created: Timespec,
    /// The next inode number `AllocInodes` or an implicit create hands out.
    pub next_ino: Ino,
    /// Creations so far: the generation of the next inode is this plus one.
    pub generation: u64,
    pub change_seq: u64,
    /// Sum of the sizes of the volume's regular files.
    pub used_bytes: u64,
    pub inodes: BTreeMap<Ino, Inode>,
    /// Directory entries by (directory, name).
    pub entries: BTreeMap<(Ino, Vec<u8>), DirSlot>,
    /// The same entries by (directory, cookie), for readdir.
    pub cookies: BTreeMap<(Ino, u64), Vec<u8>>,
    /// Slice lists by (inode, chunk index). Pieces in one list never overlap.
    pub chunks: Chunks,
    /// Record locks per inode, by (session, owner, start).
    pub plocks: BTreeMap<Ino, BTreeMap<(SessionId, u64, u64), PLock>>,
    /// flock holders per inode.
    pub flocks: BTreeMap<Ino, BTreeMap<LockOwner, LockKind>>,
}

/// A volume's slice lists by (inode, chunk index).
pub(crate) type Chunks = BTreeMap<(Ino, u64), Vec<Slice>>;

/// A directory entry's target and readdir cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DirSlot {
    pub ino: Ino,
    pub cookie: u64,
}

/// One inode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Inode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub rdev: u64,
    pub generation: u64,
    pub flags: u32,
    /// Directories: the directory holding this one (the root's is itself).
    pub parent: Ino,
    /// Directories: the cookie the next entry gets.
    pub next_cookie: u64,
    /// Directories: number of entries.
    pub entries: u64,
    /// Symlinks: the target.
    pub target: Vec<u8>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of xattr names plus values.
    pub xattr_bytes: u64,
    /// Open references, all sessions together.
    pub opens: u64,
}

/// First readdir cookie of a real entry (1 is ".", 2 is "..").
pub(crate) const FIRST_COOKIE: u64 = 3;

impl Inode {
    pub fn kind(&self) -> Option<FileType> {
        FileType::from_mode(self.mode)
    }

    pub fn is_dir(&self) -> bool {
        self.mode & mode::S_IFMT == mode::S_IFDIR
    }

    pub fn is_reg(&self) -> bool {
        self.mode & mode::S_IFMT == mode::S_IFREG
    }

    /// The inode's attributes; `chunks` are its volume's chunk lists, which `blocks` is
    /// counted from.
    pub fn attr(&self, ino: Ino, chunks: &Chunks) -> Attr {
        Attr {
            ino,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            nlink: self.nlink,
            size: self.size,
            atime: self.atime,
            mtime: self.mtime,
            ctime: self.ctime,
            rdev: self.rdev,
            generation: self.generation,
            flags: self.flags,
            blocks: if self.is_reg() { allocated_blocks(chunks, ino, self.size) } else { 0 },
        }
    }
}

impl Volume {
    /// The inode, or `ENOENT`.
    pub fn inode(&self, ino: Ino) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    /// The inode's attributes, or `ENOENT`.
    pub fn attr(&self, ino: Ino) -> Result<Attr, Errno> {
        Ok(self.inode(ino)?.attr(ino, &self.chunks))
    }

    /// A live directory one can look up or create in: `ENOENT` when missing or unlinked,
    /// `ENOTDIR` when not a directory.
    pub fn live_dir(&self, ino: Ino) -> Result<&Inode, Errno> {
        let i = self.inode(ino)?;
        if !i.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if i.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        Ok(i)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<DirSlot> {
        self.entries.get(&(parent, name.to_vec())).copied()
    }

    /// Add `parent/name -> ino` with a fresh cookie. The caller checked the name is free.
    pub fn add_entry(&mut self, parent: Ino, name: &[u8], ino: Ino) {
        let cookie = match self.inodes.get_mut(&parent) {
            Some(p) => {
                let c = p.next_cookie.max(FIRST_COOKIE);
                p.next_cookie = c.saturating_add(1);
                p.entries = p.entries.saturating_add(1);
                c
            }
            None => FIRST_COOKIE,
        };
        self.entries.insert((parent, name.to_vec()), DirSlot { ino, cookie });
        self.cookies.insert((parent, cookie), name.to_vec());
    }

    /// Remove `parent/name`, returning what it pointed to.
    pub fn remove_entry(&mut self, parent: Ino, name: &[u8]) -> Option<DirSlot> {
        let slot = self.entries.remove(&(parent, name.to_vec()))?;
        self.cookies.remove(&(parent, slot.cookie));
        if let Some(p) = self.inodes.get_mut(&parent) {
            p.entries = p.entries.saturating_sub(1);
        }
        Some(slot)
    }

    /// Point the existing entry `parent/name` at another inode, keeping its cookie.
    pub fn retarget_entry(&mut self, parent: Ino, name: &[u8], ino: Ino) {
        if let Some(slot) = self.entries.get_mut(&(parent, name.to_vec())) {
            slot.ino = ino;
        }
    }

    /// Whether directory `anc` is `d` or one of its ancestors (walking parent pointers).
    pub fn is_ancestor_or_self(&self, anc: Ino, mut d: Ino) -> bool {
        // Bounded so a corrupt (cyclic) parent chain cannot loop forever.
        for _ in 0..=self.inodes.len() {
            if d == anc {
                return true;
            }
            match self.inodes.get(&d) {
                Some(i) if i.parent != d => d = i.parent,
                _ => return false,
            }
        }
        false
    }

    /// Record a regular file's size change in the volume's byte count.
    pub fn account_size(&mut self, old: u64, new: u64) {
        self.used_bytes = self.used_bytes.saturating_sub(old).saturating_add(new);
    }
}

/// A record lock held by one owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PLock {
    /// Inclusive end (`u64::MAX` = to EOF).
    pub end: u64,
    pub kind: LockKind,
    pub pid: u32,
}

/// What a blocked `F_SETLKW` caller waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Waiting {
    pub vol: VolumeId,
    pub ino: Ino,
    pub kind: LockKind,
    pub start: u64,
    pub end: u64,
}

/// A client session (a gateway's lease).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Session {
    pub name: String,
    pub ttl_ms: u64,
    pub expires: Timespec,
    /// Open references by (volume, inode).
    pub opens: BTreeMap<(VolumeId, Ino), u32>,
    /// Inodes on which this session holds record locks or flocks.
    pub locked: BTreeSet<(VolumeId, Ino)>,
}

impl Session {
    /// Whether the lease still runs at `now`.
    pub fn live(&self, now: Timespec) -> bool {
        now <= self.expires
    }
}

/// Stored results of one client's applied commands.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Client {
    /// Seqs below this were acknowledged (their results dropped); they are refused.
    pub floor: u64,
    pub results: BTreeMap<u64, OpResult>,
    pub last_active: Timespec,
}
