//! The state machine's commands, queries, replies and change events.
//!
//! These types are the contract between the pure state machine ([`crate::StateMachine`]), the
//! Raft layer that orders commands, the gRPC service that carries them (postcard-encoded inside
//! protobuf `bytes`) and the client library. Adding a variant at the end of an enum is a
//! compatible change; reordering or removing one is not (postcard encodes the variant index).

use elea_common::{Errno, GroupId, Ino, SessionId, SliceId, Timespec, VolumeId};
use serde::{Deserialize, Serialize};

/// File type bits of `mode` (`S_IFMT` and friends, Linux values).
pub mod mode {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFSOCK: u32 = 0o140000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFIFO: u32 = 0o010000;
    pub const S_ISUID: u32 = 0o4000;
    pub const S_ISGID: u32 = 0o2000;
    pub const S_ISVTX: u32 = 0o1000;
    /// Permission and set-id bits: everything but the type.
    pub const PERM_MASK: u32 = 0o7777;
}

/// `renameat2` flags.
pub mod rename_flags {
    pub const RENAME_NOREPLACE: u32 = 1;
    pub const RENAME_EXCHANGE: u32 = 2;
}

/// `open(2)` flags the permission rules read (Linux's generic values; see [`crate::perm::open_mask`]).
pub mod open_flags {
    pub const O_ACCMODE: i32 = 0o3;
    pub const O_RDONLY: i32 = 0o0;
    pub const O_WRONLY: i32 = 0o1;
    pub const O_RDWR: i32 = 0o2;
    pub const O_TRUNC: i32 = 0o1000;
}

/// `setxattr` flags.
pub mod xattr_flags {
    pub const XATTR_CREATE: u32 = 1;
    pub const XATTR_REPLACE: u32 = 2;
}

/// `fallocate` mode bits (Linux values).
pub mod fallocate_flags {
    pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
    pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
    pub const FALLOC_FL_COLLAPSE_RANGE: u32 = 0x08;
    pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;
    pub const FALLOC_FL_INSERT_RANGE: u32 = 0x20;
}

/// Limits enforced on every request (errors: `ENAMETOOLONG`, `E2BIG`, `ERANGE`, `EFBIG`).
pub mod limits {
    /// Longest file name in bytes.
    pub const NAME_MAX: usize = 255;
    /// Longest symlink target in bytes.
    pub const SYMLINK_MAX: usize = 4096;
    /// Longest xattr name in bytes.
    pub const XATTR_NAME_MAX: usize = 255;
    /// Largest xattr value in bytes.
    pub const XATTR_VALUE_MAX: usize = 65536;
    /// Most bytes of xattr names and values one inode may hold.
    pub const XATTR_TOTAL_MAX: usize = 1 << 20;
    /// Largest file size.
    pub const FILE_SIZE_MAX: u64 = 1 << 60;
    /// The file system block size (`st_blksize`): `FALLOC_FL_COLLAPSE_RANGE` and
    /// `FALLOC_FL_INSERT_RANGE` take multiples of it, and [`super::Attr::blocks`] counts
    /// allocation in whole blocks of it.
    pub const FS_BLOCK_SIZE: u64 = 4096;
    /// Most hard links to one inode.
    pub const LINK_MAX: u32 = 65000;
    /// Most entries one readdir call returns.
    pub const READDIR_MAX: u32 = 4096;
    /// Longest volume name.
    pub const VOLUME_NAME_MAX: usize = 128;
    /// Most object stores one volume may list (a moved volume keeps its former stores, detached).
    pub const STORES_MAX: usize = 32;
    /// Longest object store URL.
    pub const STORE_URL_MAX: usize = 1024;
    /// Highest replication factor.
    pub const REPLICAS_MAX: u8 = 5;
    /// Longest site name and cache node address.
    pub const SITE_NAME_MAX: usize = 64;
    /// Sites a cluster may have.
    pub const SITES_MAX: usize = 64;
    /// Metadata nodes the site map records.
    pub const META_NODES_MAX: usize = 256;
    /// Most voters of a volume's own group.
    pub const GROUP_VOTERS_MAX: u8 = 7;
    /// Most volumes in Raft groups of their own.
    pub const VOLUME_GROUPS_MAX: usize = 4096;
    pub const NODE_ADDR_MAX: usize = 256;
    /// Most blocks or slices one data-path op or query may name.
    pub const BATCH_MAX: usize = 4096;
    /// Most pieces one [`super::Op::WriteSlicePieces`] may carry (a 64 MiB chunk in 4 KiB
    /// pieces).
    pub const PIECES_MAX: usize = 16384;
    /// A cache node that has not sent a heartbeat for this long is dead: its staged blocks
    /// are re-replicated elsewhere.
    pub const CACHE_DEAD_AFTER_MS: u64 = 10_000;
    /// Largest slice a [`super::Op::WriteInline`] may carry: small writes travel inside the
    /// metadata commit instead of being staged on cache nodes first.
    pub const INLINE_MAX: u32 = 64 << 10;
    /// Most bytes of inline slices the state holds at once. Past it `WriteInline` answers
    /// `EAGAIN` and the writer stages its slice on cache nodes as any other; the spill worker
    /// moves inline slices out to cache nodes within moments of their commit.
    pub const INLINE_TOTAL_MAX: u64 = 64 << 20;
    /// Most supplementary groups one [`super::Caller`] may list (Linux's `NGROUPS_MAX`).
    pub const GROUPS_MAX: usize = 65536;
}

/// The type of an inode, derived from the `S_IFMT` bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FileType {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileType {
    /// The type encoded in `mode`, or `None` when the type bits are not a valid type.
    pub fn from_mode(m: u32) -> Option<Self> {
        Some(match m & mode::S_IFMT {
            mode::S_IFREG => Self::Regular,
            mode::S_IFDIR => Self::Directory,
            mode::S_IFLNK => Self::Symlink,
            mode::S_IFIFO => Self::Fifo,
            mode::S_IFSOCK => Self::Socket,
            mode::S_IFCHR => Self::CharDevice,
            mode::S_IFBLK => Self::BlockDevice,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of this type.
    pub fn mode_bits(self) -> u32 {
        match self {
            Self::Regular => mode::S_IFREG,
            Self::Directory => mode::S_IFDIR,
            Self::Symlink => mode::S_IFLNK,
            Self::Fifo => mode::S_IFIFO,
            Self::Socket => mode::S_IFSOCK,
            Self::CharDevice => mode::S_IFCHR,
            Self::BlockDevice => mode::S_IFBLK,
        }
    }
}

/// All POSIX attributes of an inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    /// Type and permission bits (`S_IFMT | 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    /// Device number for character and block devices, else 0.
    pub rdev: u64,
    /// Bumped when an inode number is reused; (ino, generation) names one file forever.
    pub generation: u64,
    /// Inode flags (reserved, 0 today).
    pub flags: u32,
    /// `st_blocks`: 512-byte units allocated. The bytes below `size` that some written slice
    /// covers (holes and never-written ranges count nothing), rounded up to a multiple of
    /// [`limits::FS_BLOCK_SIZE`]. 0 for everything but regular files.
    pub blocks: u64,
}

impl Attr {
    pub fn file_type(&self) -> Option<FileType> {
        FileType::from_mode(self.mode)
    }
}

/// Who performs an [`Op::As`]: the file system user and group of the calling process and its
/// supplementary groups, as the gateway learned them from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (at most [`limits::GROUPS_MAX`]).
    pub groups: Vec<u32>,
}

impl Caller {
    /// The superuser, who passes every check but the execute bit on files.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the caller is a member of `gid` (primary or supplementary).
    pub fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || self.groups.contains(&gid)
    }
}

/// How to set a time stamp in `setattr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    /// The command's time stamp (`UTIME_NOW`).
    Now,
    At(Timespec),
}

/// Any subset of attributes to change. `None` leaves an attribute alone (`UTIME_OMIT`).
/// Changing anything sets ctime to the command's time. Setting `size` truncates or extends.
/// The state machine does not check permissions (the gateway does); it does clear the set-id
/// bits as the kernel would when `clear_suid` is set (chown by an unprivileged caller).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAttr {
    /// Permission bits only; the type bits are ignored.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    /// Clear S_ISUID, and S_ISGID when group-execute is set, as part of this change.
    pub clear_suid: bool,
}

/// One write within a chunk: bytes `[offset, offset+len)` of the chunk come from slice `id`
/// (starting at byte `slice_offset` of the slice's data). `id == 0` is a hole (zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub id: SliceId,
    /// Offset of this piece within the chunk.
    pub offset: u32,
    /// Length of this piece.
    pub len: u32,
    /// Total length of the slice's data as written (its blocks cover this many bytes).
    pub slice_len: u32,
    /// Where this piece starts within the slice's data.
    pub slice_offset: u32,
}

/// Kind of a POSIX record lock or flock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LockKind {
    Read,
    Write,
    Unlock,
}

/// A byte-range lock as `F_GETLK` reports it. `end` is inclusive; `u64::MAX` means to EOF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub kind: LockKind,
    pub start: u64,
    pub end: u64,
    /// The owner's process id as the gateway reported it (for `l_pid`).
    pub pid: u32,
    pub session: SessionId,
    pub owner: u64,
}

/// A directory entry as readdir returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileType,
    /// Resume cursor: passing it to the next `ReadDir` continues right after this entry.
    pub cookie: u64,
    /// Present when the query asked for attributes (`plus`).
    pub attr: Option<Attr>,
}

/// Per-volume counters for `statfs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatFs {
    pub used_bytes: u64,
    pub used_inodes: u64,
    /// Quota; `u64::MAX` when unlimited.
    pub total_bytes: u64,
    pub total_inodes: u64,
}

/// A volume as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub created: Timespec,
    pub inodes: u64,
    pub used_bytes: u64,
    /// The volume's change sequence: bumped by every applied change to it.
    pub change_seq: u64,
    pub config: VolumeConfig,
}

/// How a volume's blocks are compressed when they are written to an object store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockCodec {
    None,
    /// zstd at this level (1..=22).
    Zstd(i32),
}

/// A volume's data placement and tiering policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    /// Object store URLs. Tiering writes to the first; [`BlockLoc::tiered`] indexes this list,
    /// so it only ever grows. Empty: blocks stay staged on flash and are never tiered.
    pub stores: Vec<String>,
    /// Copies of every staged block, each on a different cache node of the writer's site.
    pub replicas: u8,
    /// Staged blocks older than this are tiered.
    pub tier_after_ms: u64,
    pub compression: BlockCodec,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        Self { stores: Vec::new(), replicas: 2, tier_after_ms: 300_000, compression: BlockCodec::Zstd(3) }
    }
}

/// Counters a cache node reports with each heartbeat (for `elea status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    pub staged_bytes: u64,
    pub staged_blocks: u64,
    pub staging_capacity: u64,
    /// Age of the oldest staged block, in milliseconds.
    pub oldest_staged_ms: u64,
    pub read_hits: u64,
    pub read_misses: u64,
    /// Staged blocks this node is primary for that still wait to be tiered.
    pub tier_backlog_blocks: u64,
    pub tier_backlog_bytes: u64,
}

/// A cache node as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheNodeInfo {
    pub id: u64,
    pub site: String,
    /// Block service address (`host:port`).
    pub addr: String,
    /// Random per data directory: a node that comes back with another one lost its blocks.
    pub incarnation: u64,
    pub registered: Timespec,
    pub last_seen: Timespec,
    /// Whether it sent a heartbeat within [`limits::CACHE_DEAD_AFTER_MS`] of the state's clock.
    pub alive: bool,
    pub stats: CacheStats,
}

/// Where one block of a slice lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLoc {
    /// Cache nodes holding a staged copy (placement order; empty once tiered).
    pub nodes: Vec<u64>,
    /// The volume's stores (indexes into its `stores`) that hold the block's object; empty
    /// while it is only staged.
    pub tiered: StoreSet,
}

/// A set of a volume's store indexes (below [`StoreSet::BITS`], which is above
/// [`limits::STORES_MAX`]).
///
/// Encoded as an `Option<u64>` so that the states and logs written when a block named at most
/// one store (`Option<u16>`, whose postcard bytes are the same for every value below 2^16)
/// read as they are: `None` is the empty set, a value below 2^16 the set of that one index,
/// and a larger value `mask << 16` a set of two or more.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct StoreSet(u64);

impl StoreSet {
    pub const EMPTY: StoreSet = StoreSet(0);
    /// Store indexes a set can hold (what its encoding leaves room for).
    pub const BITS: u16 = 48;

    /// The set of store `i` alone.
    pub fn one(i: u16) -> Self {
        let mut s = Self::EMPTY;
        s.insert(i);
        s
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    pub fn contains(self, i: u16) -> bool {
        i < Self::BITS && self.0 & (1 << i) != 0
    }

    /// Adds store `i` (indexes from [`StoreSet::BITS`] on are past every volume's limit, so
    /// never given, and ignored).
    pub fn insert(&mut self, i: u16) {
        if i < Self::BITS {
            self.0 |= 1 << i;
        }
    }

    pub fn remove(&mut self, i: u16) {
        if i < Self::BITS {
            self.0 &= !(1 << i);
        }
    }

    /// The lowest index in the set.
    pub fn first(self) -> Option<u16> {
        (!self.is_empty()).then(|| self.0.trailing_zeros() as u16)
    }

    /// The indexes, lowest first.
    pub fn iter(self) -> impl Iterator<Item = u16> {
        (0..Self::BITS).filter(move |i| self.contains(*i))
    }
}

impl FromIterator<u16> for StoreSet {
    fn from_iter<T: IntoIterator<Item = u16>>(iter: T) -> Self {
        let mut s = Self::EMPTY;
        for i in iter {
            s.insert(i);
        }
        s
    }
}

impl Serialize for StoreSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = match self.len() {
            0 => None,
            1 => self.first().map(u64::from),
            _ => Some(self.0 << 16),
        };
        v.serialize(s)
    }
}

impl<'de> Deserialize<'de> for StoreSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Option::<u64>::deserialize(d)? {
            None => Ok(Self::EMPTY),
            Some(v) if v < 1 << 16 => {
                if v >= u64::from(Self::BITS) {
                    return Err(serde::de::Error::custom(format!("store index {v} out of range")));
                }
                Ok(Self::one(v as u16))
            }
            Some(v) => {
                let mask = v >> 16;
                if mask.count_ones() < 2 || mask >> Self::BITS != 0 || v & 0xffff != 0 {
                    return Err(serde::de::Error::custom(format!("bad store set {v:#x}")));
                }
                Ok(Self(mask))
            }
        }
    }
}

/// Where a slice's blocks live. Block `i` covers bytes `[i*BLOCK_SIZE, ..)` of the slice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceLoc {
    pub vol: VolumeId,
    /// Length of the slice's data.
    pub len: u32,
    /// When the slice was committed.
    pub created: Timespec,
    /// When its last reference went away (it waits for garbage collection).
    pub deleted: Option<Timespec>,
    pub blocks: Vec<BlockLoc>,
}

/// One staged (not yet tiered) block, as the tiering and re-replication workers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedBlock {
    pub vol: VolumeId,
    pub slice: SliceId,
    pub index: u32,
    /// Length of this block.
    pub len: u32,
    pub created: Timespec,
    pub nodes: Vec<u64>,
}

/// Where a slice's blocks live and, while its bytes are still kept in metadata (it was
/// written inline and not spilled yet), those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceData {
    pub id: SliceId,
    /// `None` for a slice with no recorded location.
    pub loc: Option<SliceLoc>,
    #[serde(with = "serde_bytes")]
    pub inline: Option<Vec<u8>>,
}

/// A live slice whose bytes are kept in metadata, as the spill worker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineSlice {
    pub vol: VolumeId,
    pub slice: SliceId,
    pub created: Timespec,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A state-changing operation. Applied in Raft log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Create a volume with an empty root directory (0o755, uid/gid 0). `EEXIST` if the name is taken.
    CreateVolume {
        name: String,
        config: VolumeConfig,
    },
    /// Create a non-directory node (regular, fifo, socket, char, block) named `name` in `parent`.
    /// `mode` carries the type bits. With `exclusive == false` an existing entry is returned
    /// with `created: false` instead of `EEXIST` (open with O_CREAT but not O_EXCL).
    /// `ino` is a number from the caller's allocated range, or `None` to let the state machine
    /// pick one. With `session` set, the new (or existing) file is also opened for it.
    Mknod {
        vol: VolumeId,
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        exclusive: bool,
        ino: Option<Ino>,
        session: Option<SessionId>,
    },
    Mkdir {
        vol: VolumeId,
        parent: Ino,
        name: Vec<u8>,
        mode: u32,
        uid: u32,
        gid: u32,
        ino: Option<Ino>,
    },
    Symlink {
        vol: VolumeId,
        parent: Ino,
        name: Vec<u8>,
        target: Vec<u8>,
        uid: u32,
        gid: u32,
        ino: Option<Ino>,
    },
    /// Add a hard link `new_parent/new_name` to `ino` (`EPERM` for directories).
    Link {
        vol: VolumeId,
        ino: Ino,
        new_parent: Ino,
        new_name: Vec<u8>,
    },
    Unlink {
        vol: VolumeId,
        parent: Ino,
        name: Vec<u8>,
    },
    Rmdir {
        vol: VolumeId,
        parent: Ino,
        name: Vec<u8>,
    },
    /// `renameat2` with [`rename_flags`].
    Rename {
        vol: VolumeId,
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: u32,
    },
    SetAttr {
        vol: VolumeId,
        ino: Ino,
        set: SetAttr,
    },
    /// [`xattr_flags`]: `XATTR_CREATE` fails with `EEXIST`, `XATTR_REPLACE` with `ENODATA`.
    SetXattr {
        vol: VolumeId,
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    },
    RemoveXattr {
        vol: VolumeId,
        ino: Ino,
        name: Vec<u8>,
    },
    /// Record a write: `slice` covers bytes of chunk `chunk` (newest wins). The file size grows
    /// to cover the write; mtime and ctime become the command's time. `staged` names the cache
    /// nodes holding each block of a newly written slice (one list per block of `slice_len`);
    /// it is recorded the first time the slice id is seen, and may be empty (no location).
    WriteSlice {
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        slice: Slice,
        staged: Vec<Vec<u64>>,
    },
    /// [`fallocate_flags`]. Plain mode extends the size (unless KEEP_SIZE); PUNCH_HOLE (with
    /// KEEP_SIZE) and ZERO_RANGE record holes over the range. COLLAPSE_RANGE removes the range
    /// and moves the data after it down; INSERT_RANGE moves the data at and after `offset` up
    /// by `len`, leaving a hole. Both take no other flag and multiples of
    /// [`limits::FS_BLOCK_SIZE`], and must stay inside the file (`EINVAL`).
    Fallocate {
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        len: u64,
        mode: u32,
    },
    /// Start a session with a lease of `ttl_ms`; replies [`Reply::Session`].
    OpenSession {
        name: String,
        ttl_ms: u64,
    },
    /// Renew a session's lease (`ESTALE` when it has expired or is unknown).
    Heartbeat {
        session: SessionId,
    },
    /// End a session, releasing its open files and locks.
    CloseSession {
        session: SessionId,
    },
    /// Expire every session whose lease ended before the command's time (issued by the leader).
    ExpireSessions,
    /// Take an open reference on `ino` for `session`.
    Open {
        vol: VolumeId,
        ino: Ino,
        session: SessionId,
    },
    /// Drop one open reference; an unlinked inode is freed on its last close anywhere.
    Release {
        vol: VolumeId,
        ino: Ino,
        session: SessionId,
    },
    /// `F_SETLK`: set or clear a record lock. A conflict replies `EAGAIN`; a caller that wants
    /// `F_SETLKW` retries when the inode's lock state changes (a watch event) and gets
    /// `EDEADLK` when waiting would deadlock.
    SetLk {
        vol: VolumeId,
        ino: Ino,
        session: SessionId,
        owner: u64,
        pid: u32,
        kind: LockKind,
        start: u64,
        end: u64,
        wait: bool,
    },
    /// `flock`: shared (Read), exclusive (Write) or unlock; conflicts reply `EAGAIN`.
    Flock {
        vol: VolumeId,
        ino: Ino,
        session: SessionId,
        owner: u64,
        kind: LockKind,
    },
    /// Reserve `count` inode numbers of a volume for the caller; replies [`Reply::Range`].
    AllocInodes {
        vol: VolumeId,
        count: u64,
    },
    /// Reserve `count` slice ids (cluster-wide); replies [`Reply::Range`].
    AllocSlices {
        count: u64,
    },
    /// A cache node joins (or rejoins) the registry. A known node with a new `incarnation`
    /// lost its disk: it is dropped from every staged block, which re-replication then repairs.
    RegisterCacheNode {
        id: u64,
        site: String,
        addr: String,
        incarnation: u64,
    },
    /// A cache node is alive; `ESTALE` when it is unknown or has another incarnation (it must
    /// register again).
    CacheHeartbeat {
        id: u64,
        incarnation: u64,
        stats: CacheStats,
    },
    /// Blocks now live in store `store` of their volume: their staged copies may be freed.
    /// Blocks of forgotten slices are skipped; every named block must be committed.
    MarkTiered {
        store: u16,
        blocks: Vec<(SliceId, u32)>,
    },
    /// Re-replication: `new` now holds a staged copy of the block, replacing `old` (when it
    /// is listed) or adding a copy. A tiered or forgotten block is left alone.
    ReplaceReplica {
        slice: SliceId,
        index: u32,
        old: Option<u64>,
        new: u64,
    },
    /// Garbage collection removed these deleted slices' blocks everywhere: forget them.
    /// Slices that are live again are left alone.
    ForgetSlices {
        ids: Vec<SliceId>,
    },
    /// A cache node found that it does not hold its staged copy of a block any more (the file
    /// was torn, corrupt or missing): `node` leaves the block's holder list, so re-replication
    /// sees the real number of copies. A deleted, forgotten or tiered block, an unknown block
    /// index and a node that is not listed are left alone (Ok). The last holder may be
    /// dropped: the list then shows that no staged copy is left.
    DropReplica {
        slice: SliceId,
        index: u32,
        node: u64,
    },
    /// Record many writes into one chunk from one new slice at once (a flush of many small
    /// writes packed into one slice): the same as one [`Op::WriteSlice`] per piece, applied
    /// all or nothing. The pieces share one slice id, are sorted by `offset` and do not
    /// overlap; at most [`limits::PIECES_MAX`].
    WriteSlicePieces {
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        pieces: Vec<Slice>,
        staged: Vec<Vec<u64>>,
    },
    /// `op` on behalf of `caller`: in the same apply, the state machine checks that `caller`
    /// may perform it (Linux's rules: search and write permission on the parent directories,
    /// the sticky bit, devices only for root, moving a directory needs write permission on
    /// it) and then applies it exactly as if it had been sent alone. `op` is one of `Mknod`,
    /// `Mkdir`, `Symlink`, `Link`, `Unlink`, `Rmdir` or `Rename`; anything else is `EINVAL`
    /// (an `As` inside an `As` does not even decode).
    As {
        caller: Caller,
        #[serde(deserialize_with = "inner_op")]
        op: Box<Op>,
    },
    /// A new leader's grace period (as NFSv4's after a server restart): every session's lease
    /// runs at least its own length from the command's time, so mounts that could not reach
    /// the cluster during an election or an outage renew before anything of theirs expires.
    /// Issued by a leader as its first command of a term.
    ExtendSessions,
    /// [`Op::WriteSlicePieces`] for a new slice whose bytes travel in the command itself
    /// (`data`, the whole slice, at most [`limits::INLINE_MAX`]): durable in the Raft log
    /// when it commits, with no copy on cache nodes yet. The state keeps the bytes until
    /// [`Op::SpillInline`] records copies on cache nodes, or the slice is forgotten.
    /// `EAGAIN` when the state already holds [`limits::INLINE_TOTAL_MAX`] inline bytes.
    WriteInline {
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        pieces: Vec<Slice>,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Inline slices now staged on these cache nodes: each one's bytes leave the state and
    /// its only block lists the nodes. A slice that is no longer inline is skipped.
    SpillInline {
        slices: Vec<(SliceId, Vec<u64>)>,
    },
    /// Declare a site (an environment: a data centre, a cloud region). `EEXIST` when it is
    /// known already. A site is also made by the first node that registers in it.
    AddSite {
        name: String,
    },
    /// A metadata node says which site it runs in and where it serves (each node sends it
    /// when it starts; idempotent). Makes the site when it is new.
    RegisterMetaNode {
        id: u64,
        site: String,
        addr: String,
    },
    /// [`Op::CreateVolume`] with a home site, which must be known (`ENOENT`). The volume's
    /// initial stores belong to its home site.
    CreateVolumeIn {
        name: String,
        config: VolumeConfig,
        home: String,
    },
    /// Attach object store `url` to volume `vol` as site `site`'s store: that site's cache
    /// nodes tier the volume's blocks to it. `ENOENT` for an unknown volume or site, `EEXIST`
    /// when the volume has the store already or the site has a store for it, `ENOSPC` past
    /// [`limits::STORES_MAX`]. Replies [`Reply::Volume`].
    AddStore {
        vol: VolumeId,
        site: String,
        url: String,
    },
    /// [`Op::CreateVolumeIn`] in a Raft group of the volume's own (control group only):
    /// `voters` metadata nodes (0 = 3; fewer when fewer are known) of the home site vote in
    /// it, or with `spread` nodes taken from each site in turn (home first), so the group
    /// outlives the loss of a site. Every other known metadata node is a learner. Replies
    /// [`Reply::Group`]; each member starts the group from that record. `ENOENT` for an
    /// unknown home, `ENODEV` when no metadata node runs in it (or none at all with
    /// `spread`), `EINVAL` for more than [`limits::GROUP_VOTERS_MAX`] voters, `EPERM` in a
    /// volume's own group (volumes are made in the control group).
    CreateVolumeGroup {
        name: String,
        config: VolumeConfig,
        home: String,
        voters: u8,
        spread: bool,
    },
    /// Metadata node `id` joins volume `vol`'s group (control group only; the node then starts
    /// the group empty and catches up from its leader, once a membership change adds it there).
    /// `ENOENT` for a volume not in a group of its own or an unknown node, `EEXIST` for a
    /// member. Replies [`Reply::Group`].
    AddGroupMember {
        vol: VolumeId,
        id: u64,
        learner: bool,
    },
    /// Metadata node `id` leaves volume `vol`'s group (after a membership change removed it
    /// there): it stops running the group. `ENOENT` when it is not a member, `EBUSY` for the
    /// last one. Replies [`Reply::Group`].
    RemoveGroupMember {
        vol: VolumeId,
        id: u64,
    },
    /// Starts moving volume `vol`'s objects from `site`'s store of it (the volume's write
    /// store when the site has none) to the store at `url`, in one step: `url` is appended to
    /// the volume's stores (or a detached former store of it is attached again) as `site`'s
    /// store and the write store in its place, and the old one becomes a read-only source, so
    /// no object is written there any more and the set to copy is fixed. The cache nodes then
    /// copy ([`Op::MigrationProgress`]) until a pass finds nothing left
    /// ([`Op::MigrationPass`]), which detaches the source. `rate_limit` in bytes/s (0: none);
    /// `delete_source_after_ms`: delete the source's objects of the volume that long after the
    /// job is done (`None`: keep them). `ENOENT` for an unknown volume or site, `EBUSY` while
    /// the volume has a job that is not done, `EEXIST` when `url` is one of its stores in use,
    /// `ENOSPC` past [`limits::STORES_MAX`], `ENODEV` when the volume has no store to move
    /// from. Replies [`Reply::Migration`].
    StartMigration {
        vol: VolumeId,
        site: String,
        url: String,
        rate_limit: u64,
        delete_source_after_ms: Option<u64>,
        /// The site a new target store belongs to (`None`: `site`); a target that is another
        /// site's store of the volume in use keeps its site (a volume moving home takes its
        /// new home's store as its write store).
        to_site: Option<String>,
    },
    /// A copier's progress on job `job` of volume `vol`: `copied` blocks now also live in the
    /// job's target store, every block of this pass up to `cursor` was tried, and `failed`
    /// ones were not copied (with why; the next pass tries them again). The cursor never goes
    /// back within a pass. `ESTALE` when `job` is not the volume's running job.
    MigrationProgress {
        vol: VolumeId,
        job: u64,
        copied: Vec<(SliceId, u32)>,
        cursor: (SliceId, u32),
        failed: Vec<(SliceId, u32, String)>,
    },
    /// A copier reached the end of a pass of job `job`: when no live block of the volume is
    /// still in the source alone (checked here, over every block), the source is detached
    /// (its index leaves every block's store set; reads stop using it) and the job is done;
    /// otherwise the next pass starts from the first block. `ESTALE` when `job` is not the
    /// volume's running job. Replies [`Reply::Migration`].
    MigrationPass {
        vol: VolumeId,
        job: u64,
    },
    /// The source's objects of job `job`'s volume were deleted (after the job was done and
    /// its delay passed). `ESTALE` for another job, `EBUSY` when it was not to be deleted yet.
    MigrationSourceDeleted {
        vol: VolumeId,
        job: u64,
    },
    /// Volume `vol`'s home site is now `site` (`elea volume move`): in the control group its
    /// group record's (whose leaders then hand the leadership to a voter of `site`), in the
    /// volume's group the site map's. `ENOENT` for an unknown volume or site.
    SetVolumeHome {
        vol: VolumeId,
        site: String,
    },
}

/// Decodes the op inside an [`Op::As`], refusing another `As` in it: `Op` is recursive only
/// through `As`, so this bounds the decoder's recursion (and the drop's) at one level however
/// deeply nested the bytes a client sends are.
fn inner_op<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<Op>, D::Error> {
    use std::cell::Cell;

    thread_local! {
        static INSIDE_AS: Cell<bool> = const { Cell::new(false) };
    }
    /// Leaves the flag as it found it even when decoding fails or unwinds.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            INSIDE_AS.with(|f| f.set(false));
        }
    }
    if INSIDE_AS.with(|f| f.replace(true)) {
        return Err(serde::de::Error::custom("an Op::As inside an Op::As"));
    }
    let _reset = Reset;
    Op::deserialize(d).map(Box::new)
}

/// A read-only question, answered from applied state after a linearizable read barrier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    ListVolumes,
    VolumeByName {
        name: String,
    },
    Lookup {
        vol: VolumeId,
        parent: Ino,
        name: Vec<u8>,
    },
    GetAttr {
        vol: VolumeId,
        ino: Ino,
    },
    /// Entries after `cookie` (0 = from the start, "." and ".." included first), at most
    /// `limit` of them. The cursor stays correct while the directory changes: an entry present
    /// for the whole listing is returned exactly once; no entry is returned twice.
    ReadDir {
        vol: VolumeId,
        ino: Ino,
        cookie: u64,
        limit: u32,
        plus: bool,
    },
    ReadLink {
        vol: VolumeId,
        ino: Ino,
    },
    GetXattr {
        vol: VolumeId,
        ino: Ino,
        name: Vec<u8>,
    },
    ListXattr {
        vol: VolumeId,
        ino: Ino,
    },
    StatFs {
        vol: VolumeId,
    },
    /// The slice list of one chunk, oldest first (later slices shadow earlier ones).
    ReadChunk {
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
    },
    /// `F_GETLK`: the first lock that conflicts with the described one, if any.
    GetLk {
        vol: VolumeId,
        ino: Ino,
        session: SessionId,
        owner: u64,
        kind: LockKind,
        start: u64,
        end: u64,
    },
    /// Open references of a session (for tests and diagnostics).
    SessionInfo {
        session: SessionId,
    },
    /// Every registered cache node, with liveness at the state's clock.
    CacheNodes,
    /// Locations of these slices (`None` for a slice with no recorded location).
    SliceLocs {
        ids: Vec<SliceId>,
    },
    /// Staged blocks of live slices after `(slice, index)` in id order, at most `limit`.
    StagedBlocks {
        after: (SliceId, u32),
        limit: u32,
    },
    /// Deleted slices waiting for garbage collection, after slice id `after`, at most `limit`.
    PendingDeletes {
        after: SliceId,
        limit: u32,
    },
    /// The cluster's identity in stored data; replies [`Reply::Identity`].
    DataIdentity,
    /// [`Query::SliceLocs`] with the bytes of inline slices; replies [`Reply::SliceData`].
    SliceData {
        ids: Vec<SliceId>,
    },
    /// Live inline slices after slice id `after`, at most `limit` of them and about
    /// [`limits::INLINE_TOTAL_MAX`] / 16 bytes; replies [`Reply::Inline`].
    InlineSlices {
        after: SliceId,
        limit: u32,
    },
    /// The site map; replies [`Reply::Sites`].
    Sites,
    /// The volumes that live in groups of their own (control group), or this group's own
    /// record (a volume's group); replies [`Reply::Groups`].
    Groups,
    /// Volume `vol`'s latest migration with what is left of it; replies [`Reply::Migration`]
    /// (`ENOENT` when it never had one).
    Migration {
        vol: VolumeId,
    },
    /// Every migration this group records, with what is left of each; replies
    /// [`Reply::Migrations`].
    Migrations,
    /// Blocks of volume `vol`'s running migration still to copy: live blocks in the source and
    /// not in the target, after `(slice, index)` in id order, at most `limit`. Replies
    /// [`Reply::Blocks`] (the blocks' `nodes` empty).
    MigrationBlocks {
        vol: VolumeId,
        after: (SliceId, u32),
        limit: u32,
    },
}

/// What an [`Op`] or [`Query`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    Attr(Attr),
    /// A created or found entry; `created` is false when `Mknod` found an existing file.
    Entry {
        attr: Attr,
        created: bool,
    },
    /// Unlink/rmdir/rename-over result: the inode that lost a link, its remaining links, and
    /// whether it was freed now (false while a session still has it open).
    Removed {
        ino: Ino,
        nlink: u32,
        freed: bool,
    },
    Dir {
        entries: Vec<DirEntry>,
        eof: bool,
    },
    Data(Vec<u8>),
    Names(Vec<Vec<u8>>),
    StatFs(StatFs),
    Slices(Vec<Slice>),
    Lock(Option<LockInfo>),
    Session {
        id: SessionId,
        expires: Timespec,
    },
    /// `[start, start+count)`.
    Range {
        start: u64,
        count: u64,
    },
    SessionInfo {
        open: Vec<(VolumeId, Ino, u32)>,
        expires: Timespec,
    },
    CacheNodes(Vec<CacheNodeInfo>),
    SliceLocs(Vec<(SliceId, Option<SliceLoc>)>),
    /// A page of blocks; `more` is false at the end.
    Blocks {
        blocks: Vec<StagedBlock>,
        more: bool,
    },
    /// A page of deleted slices with the time they were deleted and their location (when one
    /// was recorded); `more` is false at the end.
    Deletes {
        slices: Vec<(SliceId, Timespec, Option<SliceLoc>)>,
        more: bool,
    },
    /// `None` until the cluster's first volume was created.
    Identity(Option<DataIdentity>),
    SliceData(Vec<SliceData>),
    /// A page of inline slices; `more` is false at the end.
    Inline {
        slices: Vec<InlineSlice>,
        more: bool,
    },
    Sites(SiteMap),
    Group(Box<GroupRecord>),
    Groups(Vec<GroupRecord>),
    Migration(Box<MigrationStatus>),
    Migrations(Vec<MigrationStatus>),
}

/// Whether a migration still copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationState {
    Copying,
    /// Every block is in the target; the source is detached.
    Done,
}

/// A block a migration could not copy, and why (it is tried again in the next pass).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationFailure {
    pub slice: SliceId,
    pub index: u32,
    pub error: String,
    pub at: Timespec,
}

/// One move of a volume's objects from one store to another ([`Op::StartMigration`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationJob {
    pub id: u64,
    pub vol: VolumeId,
    /// The site whose store moves (the target belongs to it).
    pub site: String,
    /// Store indexes in the volume's `stores`.
    pub from: u16,
    pub to: u16,
    pub state: MigrationState,
    /// Passes over the volume's blocks so far (the first is 1; each later one retries what
    /// failed or was left).
    pub pass: u32,
    /// Every block of this pass up to here was tried.
    pub cursor: (SliceId, u32),
    /// Blocks (and their bytes, decoded) in the source alone when the job started.
    pub total_objects: u64,
    pub total_bytes: u64,
    /// Blocks copied so far (each counted once).
    pub done_objects: u64,
    pub done_bytes: u64,
    /// Blocks staged and not yet tiered when the job started: they are tiered to the target.
    pub staged_objects: u64,
    pub staged_bytes: u64,
    /// Copies that failed (each try counted), and the latest few with why.
    pub failed: u64,
    pub failures: Vec<MigrationFailure>,
    /// Bytes per second the copiers may move together (0: no limit).
    pub rate_limit: u64,
    pub started: Timespec,
    pub finished: Option<Timespec>,
    /// Delete the source's objects of the volume this long after the job is done.
    pub delete_source_after_ms: Option<u64>,
    pub source_deleted: Option<Timespec>,
}

/// A migration with what is left of it at the time it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub job: MigrationJob,
    pub from_url: String,
    pub to_url: String,
    /// Live blocks still in the source alone (0 once done).
    pub left_objects: u64,
    pub left_bytes: u64,
    /// The state's clock when this was read (a deletion of the source is due by it).
    pub now: Timespec,
}

impl MigrationStatus {
    /// Whether the source's objects are to be deleted now.
    pub fn source_deletion_due(&self) -> bool {
        let j = &self.job;
        match (j.state, j.finished, j.delete_source_after_ms, j.source_deleted) {
            (MigrationState::Done, Some(at), Some(after), None) => {
                crate::data::millis_between(at, self.now) >= after
            }
            _ => false,
        }
    }
}

/// What each of a volume's stores is for, when it is not the first store written and every
/// store active.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRoles {
    /// The store a block is tiered to by a cache node whose site has no store of the volume.
    pub write: u16,
    /// Sources of a running migration: read, never written.
    pub read_only: StoreSet,
    /// Former stores: neither read nor written.
    pub detached: StoreSet,
}

impl StoreRoles {
    /// Whether blocks may be tiered to store `i`.
    pub fn writable(&self, i: u16) -> bool {
        !self.read_only.contains(i) && !self.detached.contains(i)
    }
}

/// A volume that lives in a Raft group of its own, as the control group made it: everything
/// each member needs to start the group with the same first state ([`crate::StateMachine::for_group`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub group: GroupId,
    pub vol: VolumeId,
    pub name: String,
    pub config: VolumeConfig,
    pub home: String,
    /// (node id, address) of the first voters and learners.
    pub voters: Vec<(u64, String)>,
    pub learners: Vec<(u64, String)>,
    pub spread: bool,
    pub created: Timespec,
    pub identity: Option<DataIdentity>,
    /// The sites known when the group was made.
    pub sites: Vec<String>,
    /// (node id, address, learner) of the members added after the first ones: they start
    /// the group empty and catch up from its leader.
    pub added: Vec<(u64, String, bool)>,
}

impl GroupRecord {
    /// Whether metadata node `id` runs the group (a first member or an added one).
    pub fn has_member(&self, id: u64) -> bool {
        self.is_first_member(id) || self.added.iter().any(|(n, _, _)| *n == id)
    }

    /// Whether metadata node `id` is one of the first members (they start the group from this
    /// record's first state).
    pub fn is_first_member(&self, id: u64) -> bool {
        self.voters.iter().chain(&self.learners).any(|(n, _)| *n == id)
    }

    /// Every member: (id, address, learner).
    pub fn members(&self) -> Vec<(u64, String, bool)> {
        let first = self.voters.iter().map(|(id, a)| (*id, a.clone(), false));
        let learners = self.learners.iter().map(|(id, a)| (*id, a.clone(), true));
        first.chain(learners).chain(self.added.iter().cloned()).collect()
    }
}

/// Slice ids of a volume's own group `g` are `g << SLICE_GROUP_SHIFT` and up; the control
/// group's are below `2 << SLICE_GROUP_SHIFT`. A block's slice id names the group that records it.
pub const SLICE_GROUP_SHIFT: u32 = 40;

/// The Raft group that records slice `id`.
pub fn group_of_slice(id: SliceId) -> GroupId {
    (id >> SLICE_GROUP_SHIFT).max(elea_common::ids::DEFAULT_GROUP)
}

/// Sites, where the metadata nodes run, and which site each volume and store belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteMap {
    /// Site names, sorted.
    pub sites: Vec<String>,
    /// Metadata nodes by id: (id, site, address).
    pub meta_nodes: Vec<(u64, String, String)>,
    /// Home site of each volume that has one.
    pub homes: Vec<(VolumeId, String)>,
    /// The site of each store a site owns: (volume, index in its `stores`, site).
    pub stores: Vec<(VolumeId, u16, String)>,
    /// The store roles of each volume whose roles are not the default ones.
    pub roles: Vec<(VolumeId, StoreRoles)>,
}

impl SiteMap {
    /// The home site of volume `vol`.
    pub fn home(&self, vol: VolumeId) -> Option<&str> {
        self.homes.iter().find(|(v, _)| *v == vol).map(|(_, s)| s.as_str())
    }

    /// The site of metadata node `id`.
    pub fn meta_site(&self, id: u64) -> Option<&str> {
        self.meta_nodes.iter().find(|(n, _, _)| *n == id).map(|(_, s, _)| s.as_str())
    }

    /// Index of the store of volume `vol` that belongs to `site` and takes writes.
    pub fn store_of(&self, vol: VolumeId, site: &str) -> Option<u16> {
        let roles = self.roles(vol);
        self.stores.iter().find(|(v, i, s)| *v == vol && s == site && roles.writable(*i)).map(|(_, i, _)| *i)
    }

    /// The store roles of volume `vol`.
    pub fn roles(&self, vol: VolumeId) -> StoreRoles {
        self.roles.iter().find(|(v, _)| *v == vol).map(|(_, r)| *r).unwrap_or_default()
    }

    /// The store a cache node of `site` tiers volume `vol`'s blocks to: its site's store of
    /// the volume, else the volume's write store.
    pub fn tier_store(&self, vol: VolumeId, site: &str) -> u16 {
        self.store_of(vol, site).unwrap_or_else(|| self.roles(vol).write)
    }

    /// The stores of `set` in the order a reader in `site` tries them: its site's, then the
    /// write store, then the others.
    pub fn read_order(&self, vol: VolumeId, site: &str, set: StoreSet) -> Vec<u16> {
        let here = |i: u16| self.site_of_store(vol, i) == Some(site);
        let write = self.roles(vol).write;
        let mut order: Vec<u16> = set.iter().collect();
        order.sort_by_key(|i| (!here(*i), *i != write, *i));
        order
    }

    /// The site a store of volume `vol` belongs to.
    pub fn site_of_store(&self, vol: VolumeId, index: u16) -> Option<&str> {
        self.stores.iter().find(|(v, i, _)| *v == vol && *i == index).map(|(_, _, s)| s.as_str())
    }
}

/// The cluster's identity in the data it stores: object keys of its volumes and the marker of
/// its stores and cache node data directories carry `cluster`, so clusters that share a
/// bucket, a prefix or a disk never read, overwrite or collect each other's data. Made when
/// the cluster's first volume is created (from the creating command's random client id, its
/// time and the volume's name), never changed after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub cluster: u128,
    /// Volumes from this id on carry `cluster` in their object keys; older ones (created
    /// before clusters had an identity) keep the keys they were written with.
    pub since_volume: VolumeId,
}

impl DataIdentity {
    /// The cluster tag of volume `vol`'s object keys: 0 for a volume older than the identity.
    pub fn key_tag(identity: Option<&DataIdentity>, vol: VolumeId) -> u128 {
        identity.filter(|i| vol >= i.since_volume).map_or(0, |i| i.cluster)
    }

    /// The cluster id as text (32 hex digits), as markers and logs show it.
    pub fn cluster_hex(&self) -> String {
        format!("{:032x}", self.cluster)
    }
}

/// The result of applying an op or answering a query.
pub type OpResult = Result<Reply, Errno>;

/// A command as it sits in the Raft log: the op plus what makes it deterministic and safe
/// to retry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Random id of the client process; 0 = no de-duplication.
    pub client: u64,
    /// Per-client request number, starting at 1. A (client, seq) pair that was already applied
    /// is not applied again: the stored result is returned.
    pub seq: u64,
    /// Every seq below this one has been answered to the client; their results may be dropped.
    pub acked_below: u64,
    /// Stamped by the leader when proposing: the time every "now" in this op means.
    pub time: Timespec,
    pub op: Op,
}

/// What changed, for the watch stream: gateways drop the cached inode or entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Attributes, data (slices), xattrs or locks of this inode changed.
    Inode(Ino),
    /// The entry `name` in directory `parent` was added, removed or replaced.
    Entry { parent: Ino, name: Vec<u8> },
}

/// Changes to one volume made by one command, stamped with the volume's new change sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeSet {
    pub vol: VolumeId,
    pub seq: u64,
    pub changes: Vec<Change>,
    /// The client whose command made them (0: the service itself, or unknown): a gateway
    /// knows its own changes from others'.
    pub client: u64,
}
