//! What this node keeps per inode it has open: its buffered writes, their flush order, its
//! cached attributes and slice lists, and the lock owners that used it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use elea_cache::BoxFut;
use elea_cache::{CacheError, ChunkLists, ChunkSource};
use elea_common::layout::chunks_touched;
use elea_common::{Ino, VolumeId};
use elea_fsm::{Attr, Slice};
use elea_metadata::MetaApi;
use tokio::sync::Notify;

use super::buffer::{Dirty, Unflushed};

/// What this node caches about an inode it has open.
#[derive(Default)]
pub(super) struct Cached {
    /// Bumped by every invalidation: a fill that started before one is not stored.
    pub epoch: u64,
    pub attr: Option<Attr>,
    pub chunks: HashMap<u64, Arc<Vec<Slice>>>,
}

/// Per-inode state while this node has it open (or holds writes of it not committed yet).
pub(super) struct InodeState {
    pub ino: Ino,
    pub opens: AtomicUsize,
    pub dirty: tokio::sync::Mutex<Dirty>,
    /// Held by a flush from the moment it takes its extents out of `dirty` (while it still
    /// holds that lock) until its commits are done, so the inode's flushes commit in the
    /// order they took their bytes. Always locked after `dirty`, never before.
    pub commit: Arc<tokio::sync::Mutex<Unflushed>>,
    /// Set by a write; cleared only by a flush that found nothing buffered, in flight or
    /// failed.
    pub has_dirty: AtomicBool,
    /// While `has_dirty`: the end of the furthest byte written here and not known to be
    /// committed (the file is at least this long as this node sees it).
    pub written_end: AtomicU64,
    /// While `has_dirty`: when the last write here was buffered (nanoseconds since the
    /// epoch): the file's mtime and ctime as this node reports them until the flush commits
    /// (the commit then stamps its own, later time).
    pub written_at: AtomicU64,
    pub cache: Mutex<Cached>,
    /// Signalled when the inode changes anywhere (lock waiters retry).
    pub changed: Notify,
    /// Lock owners that took, or waited for, POSIX locks on it through this node (a close
    /// releases theirs).
    pub lock_owners: Mutex<HashSet<u64>>,
}

impl InodeState {
    pub fn new(ino: Ino) -> Self {
        Self {
            ino,
            opens: AtomicUsize::new(0),
            dirty: tokio::sync::Mutex::default(),
            commit: Arc::default(),
            has_dirty: AtomicBool::new(false),
            written_end: AtomicU64::new(0),
            written_at: AtomicU64::new(0),
            cache: Mutex::default(),
            changed: Notify::new(),
            lock_owners: Mutex::default(),
        }
    }

    pub fn cache(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn invalidate(&self) {
        let mut c = self.cache();
        c.epoch += 1;
        c.attr = None;
        c.chunks.clear();
    }

    /// The end of what this node wrote and has not committed (0 when nothing).
    pub fn buffered_end(&self) -> u64 {
        if self.has_dirty.load(Ordering::Acquire) { self.written_end.load(Ordering::Acquire) } else { 0 }
    }

    /// When this node last buffered a write it has not committed (`None` when nothing).
    pub fn buffered_at(&self) -> Option<elea_common::Timespec> {
        if !self.has_dirty.load(Ordering::Acquire) {
            return None;
        }
        let ns = self.written_at.load(Ordering::Acquire);
        Some(elea_common::Timespec::new((ns / 1_000_000_000) as i64, (ns % 1_000_000_000) as u32))
    }

    /// Records fresh attributes: a changed size or mtime means the data changed, so cached
    /// slice lists go. Kept only if nothing invalidated the inode since `epoch`.
    pub fn observe(&self, epoch: u64, a: &Attr) {
        let mut c = self.cache();
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
}

/// A file's slice lists for the data path: cached ones, the others from metadata (kept
/// unless the inode was invalidated after `epoch`).
pub(super) struct CachedChunks<M> {
    pub meta: M,
    pub vol: VolumeId,
    pub node: Arc<InodeState>,
    pub epoch: u64,
}

impl<M: MetaApi> ChunkSource for CachedChunks<M> {
    fn chunks(&self, from: u64, to: u64) -> BoxFut<'_, Result<ChunkLists, CacheError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for chunk in chunks_touched(from, to) {
                let cached = self.node.cache().chunks.get(&chunk).cloned();
                let list = match cached {
                    Some(l) => l,
                    None => {
                        let l = Arc::new(self.meta.read_chunk(self.vol, self.node.ino, chunk).await?);
                        let mut c = self.node.cache();
                        if c.epoch == self.epoch {
                            c.chunks.insert(chunk, l.clone());
                        }
                        l
                    }
                };
                out.push((chunk, list));
            }
            Ok(out)
        })
    }
}
