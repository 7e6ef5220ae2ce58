//! The POSIX VFS: every file system operation, with Linux's permission rules, over a metadata
//! service ([`MetaApi`]: namespace, attributes, locks, sessions) and a data path
//! ([`DataPath`]: blocks). Both are traits, so the same VFS runs on the real clients and, in
//! tests, on in-memory ones.
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
//! - On this node, every descriptor sees its buffered writes: attributes it returns carry the
//!   size including them, and reads flush them first.
//! - Reads of an open file use a per-inode cache of its size and slice lists. `open` drops it
//!   (close-to-open), and the metadata watch stream drops it whenever the inode changes
//!   anywhere (an already-open reader sees new data within the push delay). Front ends get
//!   the same events through [`Vfs::set_invalidator`] to drop kernel caches.
//!
//! The parts: [`namespace`] and [`files`] (the operations), [`writeback`] (buffered writes and
//! flushes, [`buffer`] their data), [`inode`] (what this node caches per open inode),
//! [`session`] (the metadata session and open references), [`watch`] (changes made
//! elsewhere), [`locks`] and [`xattr`].

mod buffer;
mod files;
mod inode;
mod locks;
mod namespace;
mod session;
mod watch;
mod writeback;
mod xattr;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elea_cache::{DataClient, DataPath};
use elea_common::{Ino, SessionId, VolumeId};
use elea_fsm::{Attr, FileType, TimeSet};
use elea_metadata::MetaApi;
use elea_metadata::client::MetaClient;
use tokio::sync::Notify;

pub use locks::Interrupted;
pub use watch::Inval;

use crate::error::{VfsError, VfsResult};
use inode::InodeState;

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
    /// How often a waiting `F_SETLKW` request asks whether its caller was interrupted (a
    /// signal, a kill): this bounds how long a killed or signalled waiter stays stuck.
    pub lock_wait_slice: Duration,
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
            lock_wait_slice: Duration::from_millis(200),
        }
    }
}

type Sink = Arc<dyn Fn(Inval) + Send + Sync>;

fn is_dir(a: &Attr) -> bool {
    a.file_type() == Some(FileType::Directory)
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
    /// The session in which a lock was last taken through this handle (0: none). When that
    /// session lapsed, the lock is gone: the handle is fenced ([`Vfs::live_handle`]).
    locked_in: AtomicU64,
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

struct Inner<M, D> {
    meta: M,
    data: D,
    vol: VolumeId,
    cfg: VfsConfig,
    session: AtomicU64,
    next_fh: AtomicU64,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    inodes: Mutex<HashMap<Ino, Arc<InodeState>>>,
    /// Bytes buffered on this node and not committed yet (in buffers, in flight, or left
    /// by failed flushes), exactly.
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
    /// Held while references taken from `releases` are being sent.
    releasing: tokio::sync::Mutex<()>,
}

/// See the module docs. Cheap to clone.
pub struct Vfs<M = MetaClient, D = DataClient> {
    inner: Arc<Inner<M, D>>,
}

impl<M, D> Clone for Vfs<M, D> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<M: MetaApi, D: DataPath> Vfs<M, D> {
    /// Opens a session for volume `vol` and starts the background tasks (session lease,
    /// metadata watch, delayed flushes). Must be called inside a tokio runtime.
    pub async fn new(meta: M, data: D, vol: VolumeId, cfg: VfsConfig) -> VfsResult<Self> {
        let from_seq = meta.volume_by_id(vol).await?.change_seq;
        let session = session::open(&meta, &cfg).await?;
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
                releasing: tokio::sync::Mutex::new(()),
            }),
        };
        let weak = Arc::downgrade(&vfs.inner);
        tokio::spawn(session::release_loop(weak.clone(), vfs.inner.release_wake.clone()));
        tokio::spawn(session::session_loop(weak.clone()));
        watch::spawn(weak.clone(), from_seq);
        tokio::spawn(writeback::flush_loop(weak));
        Ok(vfs)
    }

    pub fn config(&self) -> &VfsConfig {
        &self.inner.cfg
    }

    pub fn volume(&self) -> VolumeId {
        self.inner.vol
    }

    /// Bytes written on this node and not committed yet (buffered, in flight, or kept by a
    /// failed flush for its retry).
    pub fn dirty_bytes(&self) -> usize {
        self.inner.dirty_total.load(Ordering::Relaxed)
    }

    /// Where invalidations go (the FUSE adapter drops the kernel's caches).
    pub fn set_invalidator(&self, f: impl Fn(Inval) + Send + Sync + 'static) {
        *lock(&self.inner.sink) = Some(Arc::new(f));
    }

    fn session(&self) -> SessionId {
        self.inner.session.load(Ordering::Relaxed)
    }

    /// Fresh attributes from metadata (not what this node buffers: see [`Self::local_attr`]).
    async fn attr_of(&self, ino: Ino) -> VfsResult<Attr> {
        Ok(self.inner.meta.getattr(self.inner.vol, ino).await?)
    }

    async fn lookup_raw(&self, parent: Ino, name: &[u8]) -> VfsResult<Attr> {
        Ok(self.inner.meta.lookup(self.inner.vol, parent, name).await?)
    }

    fn node(&self, ino: Ino) -> Option<Arc<InodeState>> {
        lock(&self.inner.inodes).get(&ino).cloned()
    }

    /// `a` as this node sees it: a file with writes buffered here is as long as they make
    /// it, whether they are flushed yet or not (another descriptor, `lseek(SEEK_END)` and
    /// `O_APPEND` through the kernel all go by the size reported here), and was modified
    /// when the last of them was taken.
    fn local_attr(&self, mut a: Attr) -> Attr {
        if let Some(n) = self.node(a.ino) {
            a.size = a.size.max(n.buffered_end());
            if let Some(t) = n.buffered_at() {
                a.mtime = a.mtime.max(t);
                a.ctime = a.ctime.max(t);
            }
        }
        a
    }

    fn handle(&self, fh: u64) -> VfsResult<Arc<Handle>> {
        lock(&self.inner.handles).get(&fh).cloned().ok_or_else(|| VfsError::from(elea_common::Errno::EBADF))
    }

    /// The handle, unless a lock taken through it was lost with a lapsed session: then the
    /// application, which believes it still holds the lock, gets `EIO` for every later
    /// read, write, flush, sync or lock call on it, rather than carrying on unlocked while
    /// another mount may hold the lock (closing it works).
    fn live_handle(&self, fh: u64) -> VfsResult<Arc<Handle>> {
        let h = self.handle(fh)?;
        let locked_in = h.locked_in.load(Ordering::Relaxed);
        if locked_in != 0 && locked_in != self.session() {
            tracing::warn!(fh, ino = h.ino, session = locked_in, "a lock of a lapsed session was lost");
            return Err(VfsError::from(elea_common::Errno::EIO));
        }
        Ok(h)
    }

    fn new_handle(&self, ino: Ino, flags: i32, kind: HandleKind, meta_ref: bool) -> u64 {
        let node = {
            let mut m = lock(&self.inner.inodes);
            m.entry(ino).or_insert_with(|| Arc::new(InodeState::new(ino))).clone()
        };
        node.opens.fetch_add(1, Ordering::Relaxed);
        let fh = self.inner.next_fh.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(Handle { ino, flags, kind, node, meta_ref, locked_in: AtomicU64::new(0) });
        lock(&self.inner.handles).insert(fh, h);
        fh
    }

    /// Flushes every inode's buffered writes and releases closed handles' references.
    pub async fn flush_all(&self) -> VfsResult<()> {
        self.release_closed().await;
        let nodes: Vec<Arc<InodeState>> = lock(&self.inner.inodes).values().cloned().collect();
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
    pub async fn shutdown(&self) -> VfsResult<()> {
        let res = self.flush_all().await;
        self.inner.stopped.store(true, Ordering::Release);
        self.inner.stop.notify_waiters();
        let _ = self.inner.meta.close_session(self.session()).await;
        res
    }
}
