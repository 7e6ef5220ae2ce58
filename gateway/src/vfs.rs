//! The POSIX VFS: every file system operation, with Linux's permission rules, over the
//! metadata client (namespace, attributes, locks, sessions) and the data client (blocks).
//!
//! Consistency (docs/SEMANTICS.md has the contract):
//! - Namespace and attribute operations go to the metadata service every time (linearizable).
//! - Writes are buffered per inode on this node and become visible to every node when they
//!   are flushed: on `flush` (close), `fsync`, a `getattr` or read of the same inode here,
//!   when the buffer passes its limit, or after `flush_delay`. A flush stores the data on the
//!   volume's `R` cache nodes and commits it to metadata before it returns. The flush a
//!   buffer passing its limit starts runs in the background (write-behind) while the writer
//!   fills the next buffer; an inode's flushes commit one at a time, in the order their bytes
//!   were taken, and every other flush waits for the ones before it.
//! - Reads of an open file use a per-inode cache of its size and slice lists. `open` drops it
//!   (close-to-open), and the metadata watch stream drops it whenever the inode changes
//!   anywhere (an already-open reader sees new data within the push delay). Front ends get
//!   the same events through [`Vfs::set_invalidator`] to drop kernel caches.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use elea_cache::{CacheError, DataClient};
use elea_common::ids::CHUNK_SIZE;
use elea_common::{Errno, Ino, SessionId, VolumeId};
use elea_fsm::{
    Attr, DirEntry, FileType, LockInfo, LockKind, Op, Query, Reply, SetAttr, Slice, StatFs, TimeSet,
    fallocate_flags, mode, rename_flags,
};
use elea_metadata::client::{ClientError, MetaClient, WatchItem};
use futures::StreamExt as _;
use tokio::sync::Notify;

use crate::perm::{self, Creds, MAY_EXEC, MAY_READ, MAY_WRITE};

/// Tuning of a [`Vfs`].
#[derive(Debug, Clone)]
pub struct VfsConfig {
    /// How long a front end may cache attributes (the kernel's attribute timeout). Zero, the
    /// default, keeps every `stat` linearizable.
    pub attr_ttl: Duration,
    /// How long a front end may cache name lookups (zero by default, for the same reason).
    pub entry_ttl: Duration,
    /// Buffered writes older than this are flushed in the background.
    pub flush_delay: Duration,
    /// A write that takes an inode's buffered bytes past this flushes them.
    pub dirty_limit: usize,
    /// A write that takes the node's buffered bytes past this flushes its inode.
    pub dirty_total_limit: usize,
    /// Lease of the gateway's metadata session (its open files and locks are released when
    /// it lapses).
    pub session_ttl: Duration,
    /// Name of the session (shown in diagnostics).
    pub session_name: String,
}

impl Default for VfsConfig {
    fn default() -> Self {
        Self {
            attr_ttl: Duration::ZERO,
            entry_ttl: Duration::ZERO,
            flush_delay: Duration::from_secs(1),
            dirty_limit: 64 << 20,
            dirty_total_limit: 512 << 20,
            session_ttl: Duration::from_secs(30),
            session_name: "gateway".into(),
        }
    }
}

/// A cache a front end must drop because the namespace changed (anywhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inval {
    /// Attributes or data of this inode.
    Inode(Ino),
    /// The name `name` in directory `parent`.
    Entry(Ino, Vec<u8>),
    /// Everything (changes were missed).
    All,
}

type Sink = Arc<dyn Fn(Inval) + Send + Sync>;

/// Turns a client error into the errno a front end reports.
fn meta_err(e: ClientError) -> Errno {
    e.errno()
}

fn data_err(e: CacheError) -> Errno {
    tracing::warn!(error = %e, "data path error");
    e.errno()
}

fn is_dir(a: &Attr) -> bool {
    a.file_type() == Some(FileType::Directory)
}

/// Buffered writes of one inode: disjoint extents by offset.
#[derive(Default, Clone)]
struct Dirty {
    extents: BTreeMap<u64, Vec<u8>>,
    bytes: usize,
    since: Option<Instant>,
}

impl Dirty {
    fn of(extents: BTreeMap<u64, Vec<u8>>) -> Self {
        let bytes = extents.values().map(Vec::len).sum();
        Self { extents, bytes, since: None }
    }

    /// Takes every buffered extent out, with the bytes they count for.
    fn take(&mut self) -> (BTreeMap<u64, Vec<u8>>, usize) {
        self.since = None;
        (std::mem::take(&mut self.extents), std::mem::take(&mut self.bytes))
    }

    fn end(&self) -> u64 {
        self.extents.iter().next_back().map_or(0, |(s, v)| s + v.len() as u64)
    }

    /// Adds a write; overlapping or adjacent extents merge (newest bytes win).
    fn add(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        self.since.get_or_insert_with(Instant::now);
        // The common sequential case: extend the extent that ends where this write starts.
        if let Some((&s, v)) = self.extents.range_mut(..=off).next_back()
            && s + v.len() as u64 == off
            && self.extents.range(off + 1..end).next().is_none()
        {
            if let Some(v) = self.extents.get_mut(&s) {
                v.extend_from_slice(data);
                self.bytes += data.len();
            }
            return;
        }
        let mut touched: Vec<u64> = Vec::new();
        if let Some((&s, v)) = self.extents.range(..=off).next_back()
            && s + v.len() as u64 >= off
        {
            touched.push(s);
        }
        touched.extend(self.extents.range(off + 1..=end).map(|(s, _)| *s));
        touched.dedup();
        if touched.is_empty() {
            self.extents.insert(off, data.to_vec());
            self.bytes += data.len();
            return;
        }
        let start = touched[0].min(off);
        let mut stop = end;
        let mut olds = Vec::new();
        for s in &touched {
            if let Some(v) = self.extents.remove(s) {
                stop = stop.max(s + v.len() as u64);
                self.bytes -= v.len();
                olds.push((*s, v));
            }
        }
        let mut buf = vec![0u8; (stop - start) as usize];
        for (s, v) in olds {
            let at = (s - start) as usize;
            buf[at..at + v.len()].copy_from_slice(&v);
        }
        let at = (off - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.bytes += buf.len();
        self.extents.insert(start, buf);
    }
}

/// Buffered writes of an inode taken out of [`Dirty`] by a flush that failed: they are
/// older than anything still buffered, so the next flush commits them first (newer bytes
/// over them).
#[derive(Default)]
struct Unflushed {
    buf: Dirty,
    /// What they count for in the node's buffered total.
    counted: usize,
}

/// What this node caches about an inode it has open.
#[derive(Default)]
struct Cached {
    /// Bumped by every invalidation: a fill that started before one is not stored.
    epoch: u64,
    attr: Option<Attr>,
    chunks: HashMap<u64, Arc<Vec<Slice>>>,
}

/// Per-inode state while this node has it open.
struct InodeState {
    ino: Ino,
    opens: AtomicUsize,
    dirty: tokio::sync::Mutex<Dirty>,
    /// Held by a flush from the moment it takes its extents out of `dirty` (while it still
    /// holds that lock) until its commits are done, so the inode's flushes commit in the
    /// order they took their bytes. Always locked after `dirty`, never before.
    commit: Arc<tokio::sync::Mutex<Unflushed>>,
    /// Set by a write; cleared only by a flush that found nothing buffered, in flight or
    /// failed.
    has_dirty: AtomicBool,
    cache: Mutex<Cached>,
    /// Signalled when the inode changes anywhere (lock waiters retry).
    changed: Notify,
    /// Lock owners that took POSIX locks on it through this node (released at close).
    lock_owners: Mutex<std::collections::HashSet<u64>>,
}

impl InodeState {
    fn new(ino: Ino) -> Self {
        Self {
            ino,
            opens: AtomicUsize::new(0),
            dirty: tokio::sync::Mutex::default(),
            commit: Arc::default(),
            has_dirty: AtomicBool::new(false),
            cache: Mutex::default(),
            changed: Notify::new(),
            lock_owners: Mutex::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn invalidate(&self) {
        let mut c = self.cache();
        c.epoch += 1;
        c.attr = None;
        c.chunks.clear();
    }
}

enum HandleKind {
    File,
    Dir,
}

struct Handle {
    ino: Ino,
    flags: i32,
    kind: HandleKind,
    node: Arc<InodeState>,
    /// The handle holds an open reference in metadata (dropped by `release`).
    meta_ref: bool,
}

/// Attribute changes a caller asks for (`setattr`).
#[derive(Debug, Clone, Default)]
pub struct SetAttrReq {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    /// The open file the change is made through (`ftruncate`, `fchmod`): a truncate through
    /// a handle opened for writing needs no further permission.
    pub fh: Option<u64>,
}

struct Inner {
    meta: MetaClient,
    data: DataClient,
    vol: VolumeId,
    cfg: VfsConfig,
    session: AtomicU64,
    next_fh: AtomicU64,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    inodes: Mutex<HashMap<Ino, Arc<InodeState>>>,
    dirty_total: AtomicUsize,
    sink: Mutex<Option<Sink>>,
    stop: Notify,
    stopped: AtomicBool,
    /// Open references of closed handles not yet released in metadata, by (session, inode),
    /// with how many. They are sent in the background after `RELEASE_DELAY` (a close does
    /// not wait for them), and an open of the same inode in that time takes one over instead
    /// of taking a new reference: a create plus close costs one metadata commit, not two,
    /// and a file opened and closed over and over costs none.
    releases: Mutex<HashMap<(SessionId, Ino), u32>>,
    /// Outside `Inner`, so the task waiting on it does not keep the gateway alive.
    release_wake: Arc<Notify>,
}

/// How long a closed handle's open reference is kept for a reopen before it is released.
const RELEASE_DELAY: Duration = Duration::from_millis(100);

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct Vfs {
    inner: Arc<Inner>,
}

/// Most entries one readdir call asks metadata for.
const READDIR_BATCH: u32 = 512;
/// Reported capacity when a volume has no quota.
const UNLIMITED_BYTES: u64 = 1 << 50;
const UNLIMITED_INODES: u64 = 1 << 40;

impl Vfs {
    /// Opens a session for volume `vol` and starts the background tasks (session lease,
    /// metadata watch, delayed flushes). Must be called inside a tokio runtime.
    pub async fn new(
        meta: MetaClient,
        data: DataClient,
        vol: VolumeId,
        cfg: VfsConfig,
    ) -> Result<Self, Errno> {
        let from_seq = meta.volume_by_id(vol).await.map_err(meta_err)?.change_seq;
        let session = open_session(&meta, &cfg).await?;
        let vfs = Self {
            inner: Arc::new(Inner {
                meta,
                data,
                vol,
                cfg,
                session: AtomicU64::new(session),
                next_fh: AtomicU64::new(1),
                handles: Mutex::default(),
                inodes: Mutex::default(),
                dirty_total: AtomicUsize::new(0),
                sink: Mutex::default(),
                stop: Notify::new(),
                stopped: AtomicBool::new(false),
                releases: Mutex::default(),
                release_wake: Arc::new(Notify::new()),
            }),
        };
        let weak = Arc::downgrade(&vfs.inner);
        tokio::spawn(release_loop(weak.clone(), vfs.inner.release_wake.clone()));
        tokio::spawn(session_loop(weak.clone()));
        spawn_watch(weak.clone(), from_seq);
        tokio::spawn(flush_loop(weak));
        Ok(vfs)
    }

    pub fn config(&self) -> &VfsConfig {
        &self.inner.cfg
    }

    pub fn volume(&self) -> VolumeId {
        self.inner.vol
    }

    /// Where invalidations go (the FUSE adapter drops the kernel's caches).
    pub fn set_invalidator(&self, f: impl Fn(Inval) + Send + Sync + 'static) {
        *self.inner.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(f));
    }

    fn session(&self) -> SessionId {
        self.inner.session.load(Ordering::Relaxed)
    }

    async fn op(&self, op: Op) -> Result<Reply, Errno> {
        self.inner.meta.op(op).await.map_err(meta_err)
    }

    async fn query(&self, q: Query) -> Result<Reply, Errno> {
        self.inner.meta.query(q).await.map_err(meta_err)
    }

    async fn attr_of(&self, ino: Ino) -> Result<Attr, Errno> {
        self.inner.meta.getattr(self.inner.vol, ino).await.map_err(meta_err)
    }

    async fn lookup_raw(&self, parent: Ino, name: &[u8]) -> Result<Attr, Errno> {
        self.inner.meta.lookup(self.inner.vol, parent, name).await.map_err(meta_err)
    }

    /// A directory's attributes, checked for `want` access by `c` (`ENOTDIR` if it is not a
    /// directory). Root skips the query: it may search and write any directory.
    async fn dir_access(&self, c: &Creds, dir: Ino, want: u32) -> Result<Option<Attr>, Errno> {
        if c.is_root() {
            return Ok(None);
        }
        let a = self.attr_of(dir).await?;
        if !is_dir(&a) {
            return Err(Errno::ENOTDIR);
        }
        perm::check(c, &a, want)?;
        Ok(Some(a))
    }

    fn node(&self, ino: Ino) -> Option<Arc<InodeState>> {
        self.inner.inodes.lock().unwrap_or_else(|p| p.into_inner()).get(&ino).cloned()
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        self.inner.handles.lock().unwrap_or_else(|p| p.into_inner()).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    fn new_handle(&self, ino: Ino, flags: i32, kind: HandleKind, meta_ref: bool) -> u64 {
        let node = {
            let mut m = self.inner.inodes.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(ino).or_insert_with(|| Arc::new(InodeState::new(ino))).clone()
        };
        node.opens.fetch_add(1, Ordering::Relaxed);
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(Handle { ino, flags, kind, node, meta_ref });
        self.inner.handles.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, h);
        fh
    }

    // ---- namespace -------------------------------------------------------------------

    pub async fn lookup(&self, c: &Creds, parent: Ino, name: &[u8]) -> Result<Attr, Errno> {
        if c.is_root() {
            return self.lookup_raw(parent, name).await;
        }
        let (p, a) = tokio::join!(self.attr_of(parent), self.lookup_raw(parent, name));
        let p = p?;
        if !is_dir(&p) {
            return Err(Errno::ENOTDIR);
        }
        perm::check(c, &p, MAY_EXEC)?;
        a
    }

    /// Fresh attributes (buffered writes of this node are flushed first, so size and mtime
    /// are exact).
    pub async fn getattr(&self, ino: Ino) -> Result<Attr, Errno> {
        if self.release_pending(ino) {
            // This node closed it last: an unlinked file must be gone now, here at least.
            self.release_closed().await;
        }
        if let Some(n) = self.node(ino) {
            self.flush_node(&n).await?;
            let epoch = n.cache().epoch;
            let a = self.attr_of(ino).await?;
            self.observe(&n, epoch, &a);
            return Ok(a);
        }
        self.attr_of(ino).await
    }

    /// Records fresh attributes of an open inode: a changed size or mtime means its data
    /// changed, so cached slice lists go.
    fn observe(&self, n: &InodeState, epoch: u64, a: &Attr) {
        let mut c = n.cache();
        if let Some(old) = &c.attr
            && (old.size != a.size || old.mtime != a.mtime || old.ctime != a.ctime)
        {
            c.chunks.clear();
            c.epoch += 1;
            c.attr = None;
            return;
        }
        if c.epoch == epoch {
            c.attr = Some(a.clone());
        }
    }

    pub async fn setattr(&self, c: &Creds, ino: Ino, req: SetAttrReq) -> Result<Attr, Errno> {
        let node = self.node(ino);
        if let Some(n) = &node {
            self.flush_node(n).await?;
        }
        let a = self.attr_of(ino).await?;
        let mut set = SetAttr::default();
        if req.uid.is_some() || req.gid.is_some() {
            perm::check_chown(c, &a, req.uid, req.gid)?;
            set.uid = req.uid;
            set.gid = req.gid;
            let changes = req.uid.is_some_and(|u| u != a.uid) || req.gid.is_some_and(|g| g != a.gid);
            // Like Linux: a chown of a non-directory drops set-id bits (the kernel sends the
            // new mode itself; other front ends rely on this).
            if !is_dir(&a) && req.mode.is_none() && (changes || !c.is_root()) {
                set.clear_suid = true;
            }
        }
        if let Some(m) = req.mode {
            // Anyone may drop set-id bits (the kernel asks for that after a write by someone
            // other than the owner); any other change is the owner's.
            let drops_setid_only = (a.mode & mode::PERM_MASK) & !(mode::S_ISUID | mode::S_ISGID)
                == m & mode::PERM_MASK
                && m & !(a.mode & mode::PERM_MASK) & mode::PERM_MASK == 0;
            if !perm::owner_or_root(c, &a) && !drops_setid_only {
                return Err(Errno::EPERM);
            }
            let gid = req.gid.unwrap_or(a.gid);
            set.mode = Some(perm::chmod_mode(c, gid, m & mode::PERM_MASK));
        }
        if let Some(size) = req.size {
            if is_dir(&a) {
                return Err(Errno::EISDIR);
            }
            let through_writable = match req.fh.map(|fh| self.handle(fh)) {
                Some(Ok(h)) => h.flags & libc::O_ACCMODE != libc::O_RDONLY,
                _ => false,
            };
            if !through_writable {
                perm::check(c, &a, MAY_WRITE)?;
            }
            set.size = Some(size);
        }
        for (want, t) in [(&mut set.atime, req.atime), (&mut set.mtime, req.mtime)] {
            let Some(t) = t else { continue };
            match t {
                TimeSet::Now => {
                    if !perm::owner_or_root(c, &a) && !perm::allowed(c, &a, MAY_WRITE) {
                        return Err(Errno::EACCES);
                    }
                }
                TimeSet::At(_) => {
                    if !perm::owner_or_root(c, &a) {
                        return Err(Errno::EPERM);
                    }
                }
            }
            *want = Some(t);
        }
        let r = self.op(Op::SetAttr { vol: self.inner.vol, ino, set }).await?;
        let a = attr_reply(r)?;
        if let Some(n) = &node {
            n.invalidate();
        }
        Ok(a)
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn mknod(
        &self,
        c: &Creds,
        parent: Ino,
        name: &[u8],
        mode_: u32,
        umask: u32,
        rdev: u64,
    ) -> Result<Attr, Errno> {
        let t = mode_ & mode::S_IFMT;
        if (t == mode::S_IFCHR || t == mode::S_IFBLK) && !c.is_root() {
            return Err(Errno::EPERM);
        }
        if t == mode::S_IFDIR || t == mode::S_IFLNK {
            return Err(Errno::EINVAL);
        }
        self.dir_access(c, parent, MAY_WRITE | MAY_EXEC).await?;
        let op = Op::Mknod {
            vol: self.inner.vol,
            parent,
            name: name.to_vec(),
            mode: t | (mode_ & !umask & mode::PERM_MASK),
            uid: c.uid,
            gid: c.gid,
            rdev,
            exclusive: true,
            ino: None,
            session: None,
        };
        attr_reply(self.op(op).await?)
    }

    pub async fn mkdir(
        &self,
        c: &Creds,
        parent: Ino,
        name: &[u8],
        mode_: u32,
        umask: u32,
    ) -> Result<Attr, Errno> {
        self.dir_access(c, parent, MAY_WRITE | MAY_EXEC).await?;
        let op = Op::Mkdir {
            vol: self.inner.vol,
            parent,
            name: name.to_vec(),
            mode: mode::S_IFDIR | (mode_ & !umask & 0o1777),
            uid: c.uid,
            gid: c.gid,
            ino: None,
        };
        attr_reply(self.op(op).await?)
    }

    pub async fn symlink(&self, c: &Creds, parent: Ino, name: &[u8], target: &[u8]) -> Result<Attr, Errno> {
        self.dir_access(c, parent, MAY_WRITE | MAY_EXEC).await?;
        let op = Op::Symlink {
            vol: self.inner.vol,
            parent,
            name: name.to_vec(),
            target: target.to_vec(),
            uid: c.uid,
            gid: c.gid,
            ino: None,
        };
        attr_reply(self.op(op).await?)
    }

    pub async fn readlink(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        match self.query(Query::ReadLink { vol: self.inner.vol, ino }).await? {
            Reply::Data(d) => Ok(d),
            _ => Err(Errno::EIO),
        }
    }

    pub async fn link(&self, c: &Creds, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr, Errno> {
        self.dir_access(c, new_parent, MAY_WRITE | MAY_EXEC).await?;
        let op = Op::Link { vol: self.inner.vol, ino, new_parent, new_name: new_name.to_vec() };
        attr_reply(self.op(op).await?)
    }

    /// Checks that `c` may remove `name` from `parent` (write and search permission, and the
    /// sticky bit).
    async fn may_delete(&self, c: &Creds, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        let Some(p) = self.dir_access(c, parent, MAY_WRITE | MAY_EXEC).await? else {
            return Ok(());
        };
        if p.mode & mode::S_ISVTX != 0 {
            let victim = self.lookup_raw(parent, name).await?;
            perm::check_sticky(c, &p, &victim)?;
        }
        Ok(())
    }

    pub async fn unlink(&self, c: &Creds, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        self.may_delete(c, parent, name).await?;
        self.op(Op::Unlink { vol: self.inner.vol, parent, name: name.to_vec() }).await?;
        Ok(())
    }

    pub async fn rmdir(&self, c: &Creds, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        self.may_delete(c, parent, name).await?;
        self.op(Op::Rmdir { vol: self.inner.vol, parent, name: name.to_vec() }).await?;
        Ok(())
    }

    pub async fn rename(
        &self,
        c: &Creds,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<(), Errno> {
        if flags & !(rename_flags::RENAME_NOREPLACE | rename_flags::RENAME_EXCHANGE) != 0 {
            return Err(Errno::EINVAL);
        }
        if !c.is_root() {
            let (p, np, src, dst) = tokio::join!(
                self.attr_of(parent),
                self.attr_of(new_parent),
                self.lookup_raw(parent, name),
                self.lookup_raw(new_parent, new_name)
            );
            let (p, np, src) = (p?, np?, src?);
            for d in [&p, &np] {
                if !is_dir(d) {
                    return Err(Errno::ENOTDIR);
                }
                perm::check(c, d, MAY_WRITE | MAY_EXEC)?;
            }
            perm::check_sticky(c, &p, &src)?;
            if let Ok(dst) = &dst {
                perm::check_sticky(c, &np, dst)?;
            }
            // Moving a directory to another parent rewrites its "..": it must be writable.
            if parent != new_parent {
                if is_dir(&src) {
                    perm::check(c, &src, MAY_WRITE)?;
                }
                if flags & rename_flags::RENAME_EXCHANGE != 0
                    && let Ok(dst) = &dst
                    && is_dir(dst)
                {
                    perm::check(c, dst, MAY_WRITE)?;
                }
            }
        }
        let op = Op::Rename {
            vol: self.inner.vol,
            parent,
            name: name.to_vec(),
            new_parent,
            new_name: new_name.to_vec(),
            flags,
        };
        self.op(op).await?;
        Ok(())
    }

    // ---- files -----------------------------------------------------------------------

    /// Opens an existing inode; returns a handle. `O_TRUNC` truncates a regular file.
    pub async fn open(&self, c: &Creds, ino: Ino, flags: i32) -> Result<(u64, Attr), Errno> {
        let a = self.attr_of(ino).await?;
        if is_dir(&a) && (flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0) {
            return Err(Errno::EISDIR);
        }
        perm::check(c, &a, perm::open_mask(flags))?;
        let regular = a.file_type() == Some(FileType::Regular);
        if regular && !self.reuse_released(ino) {
            self.op(Op::Open { vol: self.inner.vol, ino, session: self.session() }).await?;
        }
        let fh = self.new_handle(ino, flags, HandleKind::File, regular);
        let h = self.handle(fh)?;
        // Close-to-open: whatever this node cached about the file is re-read.
        h.node.invalidate();
        let mut a = a;
        if regular && flags & libc::O_TRUNC != 0 {
            // This node's buffered writes came first: flush them, then cut them away.
            if let Err(e) = self.flush_node(&h.node).await {
                let _ = self.release(fh).await;
                return Err(e);
            }
            let set = SetAttr { size: Some(0), ..SetAttr::default() };
            match self.op(Op::SetAttr { vol: self.inner.vol, ino, set }).await {
                Ok(r) => a = attr_reply(r)?,
                Err(e) => {
                    let _ = self.release(fh).await;
                    return Err(e);
                }
            }
        }
        Ok((fh, a))
    }

    /// Creates and opens a regular file (`open` with `O_CREAT`): an existing one is opened
    /// unless `O_EXCL` is set.
    pub async fn create(
        &self,
        c: &Creds,
        parent: Ino,
        name: &[u8],
        mode_: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(u64, Attr), Errno> {
        let exclusive = flags & libc::O_EXCL != 0;
        self.dir_access(c, parent, MAY_WRITE | MAY_EXEC).await?;
        let op = Op::Mknod {
            vol: self.inner.vol,
            parent,
            name: name.to_vec(),
            mode: mode::S_IFREG | (mode_ & !umask & mode::PERM_MASK),
            uid: c.uid,
            gid: c.gid,
            rdev: 0,
            exclusive,
            ino: None,
            session: Some(self.session()),
        };
        let (mut a, created) = match self.op(op).await? {
            Reply::Entry { attr, created } => (attr, created),
            _ => return Err(Errno::EIO),
        };
        let fh = self.new_handle(a.ino, flags, HandleKind::File, true);
        if !created {
            let h = self.handle(fh)?;
            h.node.invalidate();
            let ok = perm::check(c, &a, perm::open_mask(flags));
            let ok = match ok {
                Ok(()) if flags & libc::O_TRUNC != 0 => {
                    self.flush_node(&h.node).await?;
                    let set = SetAttr { size: Some(0), ..SetAttr::default() };
                    self.op(Op::SetAttr { vol: self.inner.vol, ino: a.ino, set }).await.and_then(attr_reply)
                }
                Ok(()) => Ok(a.clone()),
                Err(e) => Err(e),
            };
            match ok {
                Ok(n) => a = n,
                Err(e) => {
                    let _ = self.release(fh).await;
                    return Err(e);
                }
            }
        }
        Ok((fh, a))
    }

    /// Reads up to `len` bytes at `offset` (short at end of file).
    pub async fn read(&self, fh: u64, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let h = self.handle(fh)?;
        if matches!(h.kind, HandleKind::Dir) {
            return Err(Errno::EISDIR);
        }
        if h.flags & libc::O_ACCMODE == libc::O_WRONLY {
            return Err(Errno::EBADF);
        }
        let n = &h.node;
        // Read-your-writes: this node's buffered writes are flushed first.
        self.flush_node(n).await?;
        match self.read_cached(n, offset, len).await {
            Err(Errno::EIO) | Err(Errno::ENOENT) => {
                // A cached slice list may be older than a deletion the watch has not
                // delivered yet: read once more from fresh metadata.
                n.invalidate();
                self.read_cached(n, offset, len).await
            }
            r => r,
        }
    }

    async fn read_cached(&self, n: &Arc<InodeState>, offset: u64, len: u32) -> Result<Bytes, Errno> {
        let (epoch, attr) = {
            let c = n.cache();
            (c.epoch, c.attr.clone())
        };
        let attr = match attr {
            Some(a) => a,
            None => {
                let a = self.attr_of(n.ino).await?;
                let mut c = n.cache();
                if c.epoch == epoch {
                    c.attr = Some(a.clone());
                }
                a
            }
        };
        if offset >= attr.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = attr.size.min(offset + u64::from(len));
        let chunks = self.chunk_lists(n, epoch, offset, end).await?;
        let out = self
            .inner
            .data
            .read_slices(self.inner.vol, n.ino, offset, end, &chunks)
            .await
            .map_err(data_err)?;
        if let Some((from, to)) = self.inner.data.readahead_due(self.inner.vol, n.ino, attr.size) {
            // A sequential reader: the next stretch of the file is fetched in the background,
            // past the end of this slice and chunk too.
            let (this, n) = (self.clone(), n.clone());
            tokio::spawn(async move {
                let r = match this.chunk_lists(&n, epoch, from, to).await {
                    Ok(chunks) => {
                        this.inner.data.prefetch(this.inner.vol, from, to, &chunks).await.map_err(data_err)
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    tracing::debug!(ino = n.ino, from, to, error = %e, "read-ahead failed");
                }
            });
        }
        Ok(Bytes::from(out))
    }

    /// The slice lists of the chunks `[offset, end)` touches: cached ones, the others from
    /// metadata (kept unless the inode was invalidated after `epoch`).
    async fn chunk_lists(
        &self,
        n: &InodeState,
        epoch: u64,
        offset: u64,
        end: u64,
    ) -> Result<Vec<(u64, Arc<Vec<Slice>>)>, Errno> {
        let mut chunks = Vec::new();
        for chunk in offset / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE) {
            let cached = n.cache().chunks.get(&chunk).cloned();
            let list = match cached {
                Some(l) => l,
                None => {
                    let q = Query::ReadChunk { vol: self.inner.vol, ino: n.ino, chunk };
                    let l = match self.query(q).await? {
                        Reply::Slices(s) => Arc::new(s),
                        _ => return Err(Errno::EIO),
                    };
                    let mut c = n.cache();
                    if c.epoch == epoch {
                        c.chunks.insert(chunk, l.clone());
                    }
                    l
                }
            };
            chunks.push((chunk, list));
        }
        Ok(chunks)
    }

    /// Buffers a write; returns the bytes taken. `O_APPEND` handles write at the end.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let h = self.handle(fh)?;
        if h.flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Errno::EBADF);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let n = &h.node;
        let cfg = &self.inner.cfg;
        let mut d = n.dirty.lock().await;
        let append = h.flags & libc::O_APPEND != 0;
        let over = d.bytes + data.len() >= cfg.dirty_limit
            || self.inner.dirty_total.load(Ordering::Relaxed) + data.len() >= cfg.dirty_total_limit;
        // The commit lock waits for the inode's flushes in flight: an append needs the end
        // of their bytes, and a write that fills the buffer starts no flush before the one
        // in flight is done (which bounds what is buffered).
        let mut unflushed = if append || over { Some(n.commit.clone().lock_owned().await) } else { None };
        if over
            && let Some(u) = unflushed.as_mut()
            && !u.buf.extents.is_empty()
        {
            // The flush before failed: retry it before taking more bytes; this write fails
            // with it, and buffers nothing.
            self.commit(n, u, BTreeMap::new(), 0).await?;
        }
        let offset = match &unflushed {
            Some(u) if append => {
                // The end of this node's buffered writes (in flight or failed too), or the
                // committed size when larger.
                let cached = n.cache().attr.as_ref().map(|a| a.size);
                let committed = match cached {
                    Some(size) if !d.extents.is_empty() => size,
                    _ => self.attr_of(h.ino).await?.size,
                };
                d.end().max(u.buf.end()).max(committed)
            }
            _ => offset,
        };
        if offset.checked_add(data.len() as u64).is_none_or(|e| e > elea_fsm::limits::FILE_SIZE_MAX) {
            return Err(Errno::EFBIG);
        }
        let before = d.bytes;
        d.add(offset, data);
        n.has_dirty.store(true, Ordering::Release);
        let grown = d.bytes.saturating_sub(before);
        let total = self.inner.dirty_total.fetch_add(grown, Ordering::Relaxed) + grown;
        if d.bytes >= cfg.dirty_limit || total >= cfg.dirty_total_limit {
            // Write-behind: the buffer is flushed in the background while writers fill the
            // next one. It commits after (and over) anything an earlier flush left behind.
            let mut u = match unflushed {
                Some(u) => u,
                None => n.commit.clone().lock_owned().await,
            };
            let (extents, counted) = d.take();
            drop(d);
            let (vfs, node) = (self.clone(), n.clone());
            tokio::spawn(async move {
                if let Err(e) = vfs.commit(&node, &mut u, extents, counted).await {
                    tracing::warn!(ino = node.ino, error = ?e, "background flush failed; its bytes stay buffered");
                }
            });
        }
        Ok(data.len() as u32)
    }

    /// Makes this node's buffered writes of the handle's inode durable and visible.
    pub async fn flush(&self, fh: u64) -> Result<(), Errno> {
        let h = self.handle(fh)?;
        self.flush_node(&h.node).await
    }

    /// `fsync`: the same as [`Vfs::flush`] (a flush is durable on `R` cache nodes and in
    /// metadata when it returns).
    pub async fn fsync(&self, fh: u64) -> Result<(), Errno> {
        self.flush(fh).await
    }

    async fn flush_node(&self, n: &InodeState) -> Result<(), Errno> {
        if !n.has_dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut d = n.dirty.lock().await;
        self.flush_locked(n, &mut d).await
    }

    /// Flushes `d` (the inode's buffer, locked by the caller) after the flushes in flight.
    async fn flush_locked(&self, n: &InodeState, d: &mut Dirty) -> Result<(), Errno> {
        let (extents, counted) = d.take();
        let mut unflushed = n.commit.lock().await;
        self.commit(n, &mut unflushed, extents, counted).await?;
        // Nothing is buffered (`d` is locked), in flight (the commit lock is held) or
        // failed.
        n.has_dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// Commits `extents` (just taken from the inode's buffer; `counted` bytes of the node's
    /// buffered total), after and over the extents of a flush that failed before. The
    /// caller holds the inode's commit lock (`unflushed`), taken while it still held the
    /// buffer. On failure nothing is dropped: everything stays in `unflushed` for the next
    /// flush (rewriting pieces that did commit is harmless) and the caller sees the error.
    async fn commit(
        &self,
        n: &InodeState,
        unflushed: &mut Unflushed,
        extents: BTreeMap<u64, Vec<u8>>,
        counted: usize,
    ) -> Result<(), Errno> {
        let counted = counted + unflushed.counted;
        let all = if unflushed.buf.extents.is_empty() {
            extents
        } else {
            // The failed bytes stay where they are until a commit of them succeeds.
            let mut merged = unflushed.buf.clone();
            for (off, v) in &extents {
                merged.add(*off, v);
            }
            merged.extents
        };
        if all.is_empty() {
            return Ok(());
        }
        let list: Vec<(u64, Bytes)> = all.into_iter().map(|(o, v)| (o, Bytes::from(v))).collect();
        // The extents of each chunk go out packed in one slice with one commit.
        let result = self.inner.data.write_extents(self.inner.vol, n.ino, &list).await;
        // Committed slices changed the file: drop what this node cached about it.
        n.invalidate();
        match result {
            Ok(_) => {
                *unflushed = Unflushed::default();
                let _ = self
                    .inner
                    .dirty_total
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_sub(counted)));
                Ok(())
            }
            Err(e) => {
                unflushed.buf = Dirty::of(list.into_iter().map(|(o, b)| (o, b.to_vec())).collect());
                unflushed.counted = counted;
                Err(data_err(e))
            }
        }
    }

    /// Closes a handle (after a final flush); the last close anywhere of an unlinked file
    /// frees it.
    pub async fn release(&self, fh: u64) -> Result<(), Errno> {
        let h =
            self.inner.handles.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh).ok_or(Errno::EBADF)?;
        let mut res = Ok(());
        if matches!(h.kind, HandleKind::File) {
            res = self.flush_node(&h.node).await;
        }
        if h.node.opens.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut m = self.inner.inodes.lock().unwrap_or_else(|p| p.into_inner());
            if h.node.opens.load(Ordering::Acquire) == 0 && !h.node.has_dirty.load(Ordering::Acquire) {
                m.remove(&h.ino);
            }
        }
        if h.meta_ref {
            *self
                .inner
                .releases
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry((self.session(), h.ino))
                .or_default() += 1;
            self.inner.release_wake.notify_one();
        }
        res
    }

    /// Takes over the open reference of a recently closed handle of `ino`, if one is waiting
    /// to be released (the reference count in metadata stays as it is).
    fn reuse_released(&self, ino: Ino) -> bool {
        let mut m = self.inner.releases.lock().unwrap_or_else(|p| p.into_inner());
        let key = (self.session(), ino);
        match m.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                m.remove(&key);
                true
            }
            None => false,
        }
    }

    fn release_pending(&self, ino: Ino) -> bool {
        self.inner.releases.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&(self.session(), ino))
    }

    /// Releases in metadata, now, every open reference of a handle closed on this node (they
    /// are otherwise released `RELEASE_DELAY` after the close): an unlinked file closed here
    /// is freed when this returns.
    pub async fn release_closed(&self) {
        if self.inner.releases.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
            return;
        }
        self.send_releases().await;
    }

    /// Releases in metadata every open reference of a closed handle (all at once: they share
    /// commits).
    async fn send_releases(&self) {
        let due: Vec<((SessionId, Ino), u32)> =
            std::mem::take(&mut *self.inner.releases.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        let sends = due.into_iter().flat_map(|((session, ino), n)| {
            (0..n).map(move |_| async move {
                let op = Op::Release { vol: self.inner.vol, ino, session };
                if let Err(e) = self.op(op).await {
                    // A lapsed session has no references left to release.
                    tracing::debug!(ino, error = %e, "release");
                }
            })
        });
        futures::future::join_all(sends).await;
    }

    /// `fallocate(2)` with the modes Linux file systems commonly support: allocate (extend
    /// the size unless `FALLOC_FL_KEEP_SIZE`), punch a hole, zero a range.
    pub async fn fallocate(&self, fh: u64, offset: u64, len: u64, mode_: u32) -> Result<(), Errno> {
        let h = self.handle(fh)?;
        if h.flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Errno::EBADF);
        }
        self.flush_node(&h.node).await?;
        let op = Op::Fallocate { vol: self.inner.vol, ino: h.ino, offset, len, mode: mode_ };
        let r = self.op(op).await;
        h.node.invalidate();
        r.map(|_| ())
    }

    /// Copies `len` bytes by sharing the source's slices (no data is copied): the
    /// destination's chunk lists get pieces that point at the same slices. Returns the bytes
    /// copied (short at the source's end of file).
    pub async fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u64, Errno> {
        let (hi, ho) = (self.handle(fh_in)?, self.handle(fh_out)?);
        if hi.flags & libc::O_ACCMODE == libc::O_WRONLY || ho.flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Errno::EBADF);
        }
        if ho.flags & libc::O_APPEND != 0 {
            return Err(Errno::EBADF);
        }
        if hi.ino == ho.ino && off_in < off_out.saturating_add(len) && off_out < off_in.saturating_add(len) {
            return Err(Errno::EINVAL);
        }
        self.flush_node(&hi.node).await?;
        self.flush_node(&ho.node).await?;
        let vol = self.inner.vol;
        let size = self.attr_of(hi.ino).await?.size;
        if off_in >= size || len == 0 {
            return Ok(0);
        }
        let end = size.min(off_in.saturating_add(len));
        if off_out.checked_add(end - off_in).is_none_or(|e| e > elea_fsm::limits::FILE_SIZE_MAX) {
            return Err(Errno::EFBIG);
        }
        // Pieces of the source range: (source offset, length, slice or None for zeros).
        let mut pieces: Vec<(u64, u64, Option<Slice>)> = Vec::new();
        for chunk in off_in / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE) {
            let base = chunk * CHUNK_SIZE;
            let list = match self.query(Query::ReadChunk { vol, ino: hi.ino, chunk }).await? {
                Reply::Slices(s) => s,
                _ => return Err(Errno::EIO),
            };
            let (lo, hi_end) = (off_in.max(base), end.min(base + CHUNK_SIZE));
            let mut at = lo;
            let mut sorted: Vec<Slice> = list;
            sorted.sort_by_key(|s| s.offset);
            for s in sorted {
                let ps = base + u64::from(s.offset);
                let pe = ps + u64::from(s.len);
                let (a, b) = (ps.max(lo), pe.min(hi_end));
                if a >= b {
                    continue;
                }
                if a > at {
                    pieces.push((at, a - at, None));
                }
                let piece = (s.id != 0).then(|| Slice {
                    slice_offset: s.slice_offset + (a - ps) as u32,
                    len: (b - a) as u32,
                    ..s
                });
                pieces.push((a, b - a, piece));
                at = b;
            }
            if at < hi_end {
                pieces.push((at, hi_end - at, None));
            }
        }
        for (src, plen, piece) in pieces {
            let dst = off_out + (src - off_in);
            match piece {
                None => {
                    let op = Op::Fallocate {
                        vol,
                        ino: ho.ino,
                        offset: dst,
                        len: plen,
                        mode: fallocate_flags::FALLOC_FL_ZERO_RANGE,
                    };
                    self.op(op).await?;
                }
                Some(s) => {
                    // Split where the destination crosses a chunk boundary.
                    let mut done = 0u64;
                    while done < plen {
                        let at = dst + done;
                        let chunk = at / CHUNK_SIZE;
                        let in_chunk = at % CHUNK_SIZE;
                        let n = (CHUNK_SIZE - in_chunk).min(plen - done);
                        let slice = Slice {
                            offset: in_chunk as u32,
                            len: n as u32,
                            slice_offset: s.slice_offset + done as u32,
                            ..s
                        };
                        let op = Op::WriteSlice { vol, ino: ho.ino, chunk, slice, staged: Vec::new() };
                        self.op(op).await?;
                        done += n;
                    }
                }
            }
        }
        ho.node.invalidate();
        Ok(end - off_in)
    }

    // ---- directories -----------------------------------------------------------------

    pub async fn opendir(&self, c: &Creds, ino: Ino) -> Result<u64, Errno> {
        let a = self.attr_of(ino).await?;
        if !is_dir(&a) {
            return Err(Errno::ENOTDIR);
        }
        perm::check(c, &a, MAY_READ)?;
        Ok(self.new_handle(ino, libc::O_RDONLY, HandleKind::Dir, false))
    }

    /// Entries after `cookie` (0: from the start, with "." and ".."); each entry's cookie
    /// resumes right after it. With `plus`, entries carry attributes.
    pub async fn readdir(&self, fh: u64, cookie: u64, plus: bool) -> Result<(Vec<DirEntry>, bool), Errno> {
        let h = self.handle(fh)?;
        if !matches!(h.kind, HandleKind::Dir) {
            return Err(Errno::ENOTDIR);
        }
        let q = Query::ReadDir { vol: self.inner.vol, ino: h.ino, cookie, limit: READDIR_BATCH, plus };
        match self.query(q).await? {
            Reply::Dir { entries, eof } => Ok((entries, eof)),
            _ => Err(Errno::EIO),
        }
    }

    pub async fn releasedir(&self, fh: u64) -> Result<(), Errno> {
        self.release(fh).await
    }

    pub async fn statfs(&self) -> Result<StatFs, Errno> {
        // Counts include what this node's closes freed.
        self.release_closed().await;
        match self.query(Query::StatFs { vol: self.inner.vol }).await? {
            Reply::StatFs(mut s) => {
                if s.total_bytes == u64::MAX {
                    s.total_bytes = UNLIMITED_BYTES.max(s.used_bytes.saturating_mul(2));
                }
                if s.total_inodes == u64::MAX {
                    s.total_inodes = UNLIMITED_INODES.max(s.used_inodes.saturating_mul(2));
                }
                Ok(s)
            }
            _ => Err(Errno::EIO),
        }
    }

    /// `access(2)`: `mask` is a combination of `MAY_*` (0 = existence).
    pub async fn access(&self, c: &Creds, ino: Ino, mask: u32) -> Result<(), Errno> {
        let a = self.attr_of(ino).await?;
        perm::check(c, &a, mask & 7)
    }

    // ---- extended attributes ----------------------------------------------------------

    /// Checks an xattr access by namespace, as Linux does: `user.` follows the file's
    /// permissions (regular files and directories only; in a sticky directory only its
    /// owner may write), `trusted.` is root's, `security.` is open, and `system.` (ACLs)
    /// is not supported.
    async fn xattr_access(&self, c: &Creds, ino: Ino, name: &[u8], write: bool) -> Result<(), Errno> {
        if name.starts_with(b"user.") {
            let a = self.attr_of(ino).await?;
            let t = a.file_type();
            if !matches!(t, Some(FileType::Regular | FileType::Directory)) {
                return Err(if write { Errno::EPERM } else { Errno::ENODATA });
            }
            if write && is_dir(&a) && a.mode & mode::S_ISVTX != 0 && !perm::owner_or_root(c, &a) {
                return Err(Errno::EPERM);
            }
            perm::check(c, &a, if write { MAY_WRITE } else { MAY_READ })
        } else if name.starts_with(b"trusted.") {
            if c.is_root() { Ok(()) } else { Err(Errno::EPERM) }
        } else if name.starts_with(b"security.") {
            if write {
                let a = self.attr_of(ino).await?;
                if !perm::owner_or_root(c, &a) {
                    return Err(Errno::EPERM);
                }
            }
            Ok(())
        } else {
            Err(Errno::EOPNOTSUPP)
        }
    }

    pub async fn setxattr(
        &self,
        c: &Creds,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> Result<(), Errno> {
        self.xattr_access(c, ino, name, true).await?;
        let op = Op::SetXattr { vol: self.inner.vol, ino, name: name.to_vec(), value: value.to_vec(), flags };
        self.op(op).await.map(|_| ())
    }

    pub async fn getxattr(&self, c: &Creds, ino: Ino, name: &[u8]) -> Result<Vec<u8>, Errno> {
        self.xattr_access(c, ino, name, false).await?;
        match self.query(Query::GetXattr { vol: self.inner.vol, ino, name: name.to_vec() }).await? {
            Reply::Data(d) => Ok(d),
            _ => Err(Errno::EIO),
        }
    }

    /// Names of the inode's xattrs that `c` may see (`trusted.` ones only for root).
    pub async fn listxattr(&self, c: &Creds, ino: Ino) -> Result<Vec<Vec<u8>>, Errno> {
        match self.query(Query::ListXattr { vol: self.inner.vol, ino }).await? {
            Reply::Names(n) => {
                Ok(n.into_iter().filter(|n| c.is_root() || !n.starts_with(b"trusted.")).collect())
            }
            _ => Err(Errno::EIO),
        }
    }

    pub async fn removexattr(&self, c: &Creds, ino: Ino, name: &[u8]) -> Result<(), Errno> {
        self.xattr_access(c, ino, name, true).await?;
        self.op(Op::RemoveXattr { vol: self.inner.vol, ino, name: name.to_vec() }).await.map(|_| ())
    }

    // ---- locks -----------------------------------------------------------------------

    /// `F_GETLK`: the first lock that conflicts with the described one (`end` inclusive).
    pub async fn getlk(
        &self,
        fh: u64,
        owner: u64,
        kind: LockKind,
        start: u64,
        end: u64,
    ) -> Result<Option<LockInfo>, Errno> {
        let h = self.handle(fh)?;
        let q = Query::GetLk {
            vol: self.inner.vol,
            ino: h.ino,
            session: self.session(),
            owner,
            kind,
            start,
            end,
        };
        match self.query(q).await? {
            Reply::Lock(l) => Ok(l),
            _ => Err(Errno::EIO),
        }
    }

    /// `F_SETLK` / `F_SETLKW` (with `wait`): a waiting caller retries whenever the inode's
    /// lock state changes anywhere (and at least every 200 ms).
    #[allow(clippy::too_many_arguments)]
    pub async fn setlk(
        &self,
        fh: u64,
        owner: u64,
        pid: u32,
        kind: LockKind,
        start: u64,
        end: u64,
        wait: bool,
    ) -> Result<(), Errno> {
        let h = self.handle(fh)?;
        loop {
            let notified = h.node.changed.notified();
            let op = Op::SetLk {
                vol: self.inner.vol,
                ino: h.ino,
                session: self.session(),
                owner,
                pid,
                kind,
                start,
                end,
                wait,
            };
            match self.op(op).await {
                Err(Errno::EAGAIN) if wait => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
                }
                Ok(_) => {
                    let mut owners = h.node.lock_owners.lock().unwrap_or_else(|p| p.into_inner());
                    if kind != LockKind::Unlock {
                        owners.insert(owner);
                    }
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops every POSIX lock `owner` holds on the handle's inode (a close: POSIX releases a
    /// process's locks on a file when it closes any descriptor of it).
    pub async fn release_locks(&self, fh: u64, owner: u64) -> Result<(), Errno> {
        let h = self.handle(fh)?;
        let held = h.node.lock_owners.lock().unwrap_or_else(|p| p.into_inner()).remove(&owner);
        if !held {
            return Ok(());
        }
        let op = Op::SetLk {
            vol: self.inner.vol,
            ino: h.ino,
            session: self.session(),
            owner,
            pid: 0,
            kind: LockKind::Unlock,
            start: 0,
            end: u64::MAX,
            wait: false,
        };
        self.op(op).await.map(|_| ())
    }

    /// `flock(2)` (shared = Read, exclusive = Write, or Unlock), optionally waiting.
    pub async fn flock(&self, fh: u64, owner: u64, kind: LockKind, wait: bool) -> Result<(), Errno> {
        let h = self.handle(fh)?;
        loop {
            let notified = h.node.changed.notified();
            let op = Op::Flock { vol: self.inner.vol, ino: h.ino, session: self.session(), owner, kind };
            match self.op(op).await {
                Err(Errno::EAGAIN) if wait => {
                    let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
                }
                r => return r.map(|_| ()),
            }
        }
    }

    /// Flushes every inode's buffered writes and releases closed handles' references.
    pub async fn flush_all(&self) -> Result<(), Errno> {
        self.release_closed().await;
        let nodes: Vec<Arc<InodeState>> =
            self.inner.inodes.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut res = Ok(());
        for n in nodes {
            if let Err(e) = self.flush_node(&n).await {
                tracing::error!(ino = n.ino, error = %e, "flush failed");
                res = Err(e);
            }
        }
        res
    }

    /// Flushes everything and ends the session (unmount): open files and locks of this
    /// gateway are released in metadata.
    pub async fn shutdown(&self) -> Result<(), Errno> {
        let res = self.flush_all().await;
        self.inner.stopped.store(true, Ordering::Release);
        self.inner.stop.notify_waiters();
        let _ = self.op(Op::CloseSession { session: self.session() }).await;
        res
    }
}

fn attr_reply(r: Reply) -> Result<Attr, Errno> {
    match r {
        Reply::Attr(a) | Reply::Entry { attr: a, .. } => Ok(a),
        _ => Err(Errno::EIO),
    }
}

async fn open_session(meta: &MetaClient, cfg: &VfsConfig) -> Result<SessionId, Errno> {
    let op = Op::OpenSession { name: cfg.session_name.clone(), ttl_ms: cfg.session_ttl.as_millis() as u64 };
    match meta.op(op).await.map_err(meta_err)? {
        Reply::Session { id, .. } => Ok(id),
        _ => Err(Errno::EIO),
    }
}

/// Renews the session lease; a lapsed session (the gateway was cut off for longer than the
/// lease) is replaced by a new one, and the loss is logged: its locks and open references
/// are gone.
async fn session_loop(weak: Weak<Inner>) {
    loop {
        let period = match weak.upgrade() {
            Some(i) if !i.stopped.load(Ordering::Acquire) => i.cfg.session_ttl / 4,
            _ => return,
        };
        tokio::time::sleep(period.max(Duration::from_millis(100))).await;
        let Some(i) = weak.upgrade() else { return };
        if i.stopped.load(Ordering::Acquire) {
            return;
        }
        let session = i.session.load(Ordering::Relaxed);
        match i.meta.op(Op::Heartbeat { session }).await {
            Ok(_) => {}
            Err(ClientError::Fs(Errno::ESTALE)) => {
                tracing::error!(
                    session,
                    "the metadata session lapsed: its locks and open files were released"
                );
                match open_session(&i.meta, &i.cfg).await {
                    Ok(s) => i.session.store(s, Ordering::Relaxed),
                    Err(e) => tracing::warn!(error = %e, "opening a new session failed"),
                }
            }
            Err(e) => tracing::warn!(session, error = %e, "session heartbeat failed"),
        }
    }
}

/// Runs [`watch_loop`] on a thread of its own with a single-threaded runtime. A change set
/// then wakes that one thread (the node's thread wakes it directly when the metadata node is
/// in this process) instead of a worker of the shared runtime, which in turn wakes a second
/// worker to look for more work: measured through an `elea up` mount, one context switch
/// and up to 40 microseconds of CPU per create fewer (docs/BENCHMARKS.md). Falls back to a
/// task of the shared runtime if the thread cannot be started.
fn spawn_watch(weak: Weak<Inner>, from_seq: u64) {
    let fallback = weak.clone();
    let started = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            std::thread::Builder::new()
                .name("elea-watch".into())
                .spawn(move || rt.block_on(watch_loop(weak, from_seq)))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the watch thread; following changes on the runtime");
        tokio::spawn(watch_loop(fallback, from_seq));
    }
}

/// Follows the volume's change stream: drops cached inodes, wakes lock waiters and passes
/// every change on to the front end. Reconnects (resuming at the last sequence) when the
/// stream breaks.
async fn watch_loop(weak: Weak<Inner>, mut seq: u64) {
    loop {
        let (meta, vol) = match weak.upgrade() {
            Some(i) if !i.stopped.load(Ordering::Acquire) => (i.meta.clone(), i.vol),
            _ => return,
        };
        let stream = match meta.watch(vol, seq).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "watch: cannot subscribe; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        futures::pin_mut!(stream);
        loop {
            let item = {
                let Some(i) = weak.upgrade() else { return };
                tokio::select! {
                    it = stream.next() => it,
                    () = i.stop.notified() => return,
                }
            };
            let Some(i) = weak.upgrade() else { return };
            match item {
                Some(Ok(WatchItem::Changes { seq: s, changes })) => {
                    seq = s;
                    let sink = i.sink.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    for ch in changes {
                        match ch {
                            elea_fsm::Change::Inode(ino) => {
                                let node =
                                    i.inodes.lock().unwrap_or_else(|p| p.into_inner()).get(&ino).cloned();
                                if let Some(n) = node {
                                    n.invalidate();
                                    n.changed.notify_waiters();
                                }
                                if let Some(f) = &sink {
                                    f(Inval::Inode(ino));
                                }
                            }
                            elea_fsm::Change::Entry { parent, name } => {
                                if let Some(f) = &sink {
                                    f(Inval::Entry(parent, name));
                                }
                            }
                        }
                    }
                }
                Some(Ok(WatchItem::Reset)) => {
                    let nodes: Vec<_> =
                        i.inodes.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
                    for n in nodes {
                        n.invalidate();
                        n.changed.notify_waiters();
                    }
                    if let Some(f) = i.sink.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                        f(Inval::All);
                    }
                    if let Ok(v) = i.meta.volume_by_id(vol).await {
                        seq = v.change_seq;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "watch stream broke; resubscribing");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends the open references of closed handles to metadata `RELEASE_DELAY` after a close.
async fn release_loop(weak: Weak<Inner>, wake: Arc<Notify>) {
    loop {
        // Wakes now and then to notice a gateway dropped without a shutdown.
        let woken = tokio::time::timeout(Duration::from_secs(1), wake.notified()).await.is_ok();
        match weak.upgrade() {
            Some(i) if !i.stopped.load(Ordering::Acquire) => {}
            _ => return,
        }
        if !woken {
            continue;
        }
        tokio::time::sleep(RELEASE_DELAY).await;
        let Some(inner) = weak.upgrade() else { return };
        Vfs { inner }.send_releases().await;
    }
}

/// Flushes buffered writes older than `flush_delay`.
async fn flush_loop(weak: Weak<Inner>) {
    loop {
        let delay = match weak.upgrade() {
            Some(i) if !i.stopped.load(Ordering::Acquire) => i.cfg.flush_delay,
            _ => return,
        };
        tokio::time::sleep((delay / 4).max(Duration::from_millis(20))).await;
        let Some(inner) = weak.upgrade() else { return };
        let vfs = Vfs { inner };
        let nodes: Vec<Arc<InodeState>> = vfs
            .inner
            .inodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|n| n.has_dirty.load(Ordering::Acquire))
            .cloned()
            .collect();
        for n in nodes {
            let Ok(mut d) = n.dirty.try_lock() else { continue };
            // Bytes of a background flush that failed are retried here too.
            let failed = n.commit.try_lock().is_ok_and(|u| !u.buf.extents.is_empty());
            if (failed || d.since.is_some_and(|t| t.elapsed() >= delay))
                && let Err(e) = vfs.flush_locked(&n, &mut d).await
            {
                tracing::warn!(ino = n.ino, error = %e, "background flush failed; will retry");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Dirty;

    fn flat(d: &Dirty) -> Vec<(u64, Vec<u8>)> {
        d.extents.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    #[test]
    fn dirty_extents_merge_and_newest_wins() {
        let mut d = Dirty::default();
        d.add(0, b"aaaa");
        d.add(4, b"bb");
        assert_eq!(flat(&d), vec![(0, b"aaaabb".to_vec())]);
        d.add(10, b"cc");
        assert_eq!(d.extents.len(), 2);
        d.add(2, b"XXXXXXXXX");
        assert_eq!(flat(&d), vec![(0, b"aaXXXXXXXXXc".to_vec())]);
        assert_eq!(d.bytes, 12);
        d.add(20, b"z");
        d.add(19, b"yy");
        assert_eq!(flat(&d)[1], (19, b"yy".to_vec()));
        assert_eq!(d.bytes, 14);
        assert_eq!(d.end(), 21);
    }
}
