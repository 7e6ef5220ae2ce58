//! Buffered writes and their flushes: `write` buffers, a flush stores the bytes on the cache
//! nodes ([`DataPath::stage`]) and commits them ([`DataPath::commit`]), in the order the
//! bytes were taken, one flush of an inode at a time.
//!
//! A flush that fails keeps what it could not finish for the next one (see
//! [`Unflushed`]): staged bytes whose commit failed are committed again as they are, never
//! uploaded again. A commit that can never succeed (the file is gone, or the write is
//! refused as invalid or too large) drops its bytes with an error logged, so nothing retries
//! for ever; any other failure is retried in the background with a capped backoff.

use std::collections::BTreeMap;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use elea_cache::{CacheError, DataPath};
use elea_common::Errno;
use elea_metadata::MetaApi;
use elea_metadata::client::ClientError;

use super::buffer::{Dirty, Unflushed};
use super::inode::InodeState;
use super::{Inner, Vfs, lock};
use crate::error::{VfsError, VfsResult};

/// Whether a failed flush can never succeed: the commit was refused for good.
fn permanent(e: &CacheError) -> bool {
    matches!(
        e,
        CacheError::Meta(ClientError::Fs(x))
            if [Errno::ENOENT, Errno::ESTALE, Errno::EINVAL, Errno::EFBIG].contains(x)
    )
}

impl<M: MetaApi, D: DataPath> Vfs<M, D> {
    /// Buffers a write; returns the bytes taken. `O_APPEND` handles write at the end.
    pub async fn write(&self, fh: u64, offset: u64, data: &[u8]) -> VfsResult<u32> {
        let h = self.live_handle(fh)?;
        if h.flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Errno::EBADF.into());
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
            && u.pending()
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
                d.end().max(u.end()).max(committed)
            }
            _ => offset,
        };
        let end = offset.checked_add(data.len() as u64).filter(|e| *e <= elea_fsm::limits::FILE_SIZE_MAX);
        let Some(end) = end else { return Err(Errno::EFBIG.into()) };
        let before = d.bytes;
        d.add(offset, data);
        let now = elea_common::Timespec::now();
        n.written_at.store(now.sec.max(0) as u64 * 1_000_000_000 + u64::from(now.nsec), Ordering::Release);
        if n.has_dirty.swap(true, Ordering::AcqRel) {
            n.written_end.fetch_max(end, Ordering::AcqRel);
        } else {
            n.written_end.store(end, Ordering::Release);
        }
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
                    tracing::warn!(ino = node.ino, error = %e, "background flush failed");
                }
            });
        }
        Ok(data.len() as u32)
    }

    /// Makes this node's buffered writes of the handle's inode durable and visible.
    pub async fn flush(&self, fh: u64) -> VfsResult<()> {
        let h = self.live_handle(fh)?;
        self.flush_node(&h.node).await
    }

    /// `fsync`: the same as [`Vfs::flush`] (a flush is durable on `R` cache nodes and in
    /// metadata when it returns).
    pub async fn fsync(&self, fh: u64) -> VfsResult<()> {
        self.flush(fh).await
    }

    pub(super) async fn flush_node(&self, n: &InodeState) -> VfsResult<()> {
        if !n.has_dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut d = n.dirty.lock().await;
        self.flush_locked(n, &mut d).await
    }

    /// Flushes `d` (the inode's buffer, locked by the caller) after the flushes in flight.
    async fn flush_locked(&self, n: &InodeState, d: &mut Dirty) -> VfsResult<()> {
        let (extents, counted) = d.take();
        let mut unflushed = n.commit.lock().await;
        self.commit(n, &mut unflushed, extents, counted).await?;
        // Nothing is buffered (`d` is locked), in flight (the commit lock is held) or
        // failed.
        n.has_dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// Moves the node's count of bytes held by `u` to what it holds now.
    fn recount(&self, u: &mut Unflushed) {
        let held = u.held();
        if held >= u.counted {
            self.inner.dirty_total.fetch_add(held - u.counted, Ordering::Relaxed);
        } else {
            let gone = u.counted - held;
            let _ = self
                .inner
                .dirty_total
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| Some(t.saturating_sub(gone)));
        }
        u.counted = held;
    }

    /// Commits `extents` (just taken from the inode's buffer; `counted` bytes of the node's
    /// buffered total), after and over what earlier flushes left in `u`. The caller holds
    /// the inode's commit lock (`u`), taken while it still held the buffer. On a failure
    /// that a retry may cure, everything not committed stays in `u` for the next flush and
    /// the caller sees the error; on one that no retry can cure, it is dropped.
    pub(super) async fn commit(
        &self,
        n: &InodeState,
        u: &mut Unflushed,
        extents: BTreeMap<u64, Vec<u8>>,
        counted: usize,
    ) -> VfsResult<()> {
        u.counted += counted;
        if u.buf.extents.is_empty() {
            u.buf = Dirty::of(extents);
        } else {
            // Older failed bytes stay underneath until a commit of them succeeds.
            for (off, v) in &extents {
                u.buf.add(*off, v);
            }
        }
        self.recount(u);
        let (vol, ino) = (self.inner.vol, n.ino);
        // First what a failed flush stored already: committed as it is.
        if let Some((staged, _)) = u.staged.as_mut() {
            let r = self.inner.data.commit(vol, ino, staged).await;
            n.invalidate();
            if let Err(e) = r {
                return Err(self.flush_failed(n, u, e));
            }
            u.staged = None;
            self.recount(u);
        }
        if !u.buf.extents.is_empty() {
            // The buffers move into the list as they are (no copy); a failed staging puts
            // them back.
            let (extents, bytes) = u.buf.take();
            let list: Vec<(u64, Bytes)> = extents.into_iter().map(|(o, v)| (o, Bytes::from(v))).collect();
            let mut staged = match self.inner.data.stage(vol, &list).await {
                Ok(s) => s,
                Err(e) => {
                    u.buf = Dirty::of(list.into_iter().map(|(o, b)| (o, Vec::from(b))).collect());
                    return Err(self.flush_failed(n, u, e));
                }
            };
            let r = self.inner.data.commit(vol, ino, &mut staged).await;
            // Committed slices changed the file: drop what this node cached about it.
            n.invalidate();
            if let Err(e) = r {
                u.staged = Some((staged, bytes));
                return Err(self.flush_failed(n, u, e));
            }
        }
        u.failures = 0;
        u.retry_at = None;
        self.recount(u);
        Ok(())
    }

    /// Handles a failed flush: keeps what `u` holds for a later retry (with a backoff), or
    /// drops it when no retry can succeed. Returns the caller's error.
    fn flush_failed(&self, n: &InodeState, u: &mut Unflushed, e: CacheError) -> VfsError {
        if permanent(&e) {
            tracing::error!(
                ino = n.ino,
                bytes = u.held(),
                error = %e,
                "buffered writes can never be committed (the file is gone or the write is refused); they are dropped"
            );
            *u = Unflushed { counted: u.counted, ..Unflushed::default() };
            self.recount(u);
        } else {
            u.failed();
            tracing::warn!(ino = n.ino, bytes = u.held(), failures = u.failures, error = %e, "flush failed; it will be retried");
        }
        e.into()
    }
}

/// Flushes buffered writes older than `flush_delay`, and retries failed flushes when their
/// backoff has passed.
pub(super) async fn flush_loop<M: MetaApi, D: DataPath>(weak: Weak<Inner<M, D>>) {
    loop {
        let delay = match weak.upgrade() {
            Some(i) if !i.stopped.load(Ordering::Acquire) => i.cfg.flush_delay,
            _ => return,
        };
        tokio::time::sleep((delay / 4).max(Duration::from_millis(20))).await;
        let Some(inner) = weak.upgrade() else { return };
        let vfs = Vfs { inner };
        let nodes: Vec<_> = lock(&vfs.inner.inodes)
            .values()
            .filter(|n| n.has_dirty.load(Ordering::Acquire))
            .cloned()
            .collect();
        for n in nodes {
            let Ok(mut d) = n.dirty.try_lock() else { continue };
            // (due, pending) of what failed flushes left; busy: a flush is in flight.
            let Ok((retry, waiting)) = n.commit.try_lock().map(|u| (u.due(), u.pending())) else { continue };
            let old = d.since.is_some_and(|t| t.elapsed() >= delay);
            // Bytes behind a failed flush wait for its retry.
            if (retry || (old && !waiting))
                && let Err(e) = vfs.flush_locked(&n, &mut d).await
            {
                tracing::debug!(ino = n.ino, error = %e, "background flush failed");
            }
        }
    }
}
