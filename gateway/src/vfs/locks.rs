//! POSIX record locks and `flock`, held in metadata so they exclude across nodes.
//!
//! A waiting lock request (`F_SETLKW`) asks the front end, every
//! [`crate::VfsConfig::lock_wait_slice`], whether its caller was interrupted (for FUSE: the
//! blocked thread has a signal pending, a kill included, or is gone). If so it answers
//! `EINTR`: the kernel then delivers the signal (the application sees `EINTR`, as with an
//! `alarm()` timeout, or restarts the call if its handler asked for that) or lets the killed
//! process exit, instead of keeping it stuck until the lock would be granted. Nothing waits
//! on after the answer, so no lock is ever taken for an owner that stopped asking.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use elea_cache::DataPath;
use elea_common::Errno;
use elea_fsm::{LockInfo, LockKind};
use elea_metadata::{LockReq, MetaApi};

use elea_metadata::client::ClientError;

use super::inode::InodeState;
use super::{Vfs, lock};
use crate::error::VfsResult;

/// Asked while a lock request waits: whether its caller was interrupted and the request
/// should end with `EINTR`.
pub type Interrupted<'a> = &'a (dyn Fn() -> bool + Send + Sync);

/// Longest wait between retries of a blocked lock when no change of the inode was heard.
const RECHECK: Duration = Duration::from_millis(200);

impl<M: MetaApi, D: DataPath> Vfs<M, D> {
    /// `F_GETLK`: the first lock that conflicts with the described one (`end` inclusive).
    pub async fn getlk(
        &self,
        fh: u64,
        owner: u64,
        kind: LockKind,
        start: u64,
        end: u64,
    ) -> VfsResult<Option<LockInfo>> {
        let h = self.live_handle(fh)?;
        let l = LockReq { session: self.session(), owner, pid: 0, kind, start, end };
        Ok(self.inner.meta.getlk(self.inner.vol, h.ino, l).await?)
    }

    /// `F_SETLK` / `F_SETLKW` (with `wait`): a waiting caller retries whenever the inode's
    /// lock state changes anywhere (and at least every 200 ms) until it gets the lock, or
    /// `interrupted` says its caller gave up (see the module docs).
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
        interrupted: Interrupted<'_>,
    ) -> VfsResult<()> {
        let h = self.live_handle(fh)?;
        if kind != LockKind::Unlock {
            // Held or waited for: either way a close of this owner must clear it.
            lock(&h.node.lock_owners).insert(owner);
        }
        let try_lock = || {
            let l = LockReq { session: self.session(), owner, pid, kind, start, end };
            self.inner.meta.setlk(self.inner.vol, h.ino, l, wait)
        };
        self.until_granted(&h.node, wait, interrupted, try_lock).await?;
        if kind != LockKind::Unlock {
            h.locked_in.store(self.session(), Ordering::Relaxed);
        } else if start == 0 && end == u64::MAX {
            // Everything unlocked: nothing of this handle is lost if the session lapses now.
            h.locked_in.store(0, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Drops every POSIX lock `owner` holds or waits for on the handle's inode (a close:
    /// POSIX releases a process's locks on a file when it closes any descriptor of it).
    pub async fn release_locks(&self, fh: u64, owner: u64) -> VfsResult<()> {
        let h = self.handle(fh)?;
        if !lock(&h.node.lock_owners).remove(&owner) {
            return Ok(());
        }
        let l = LockReq {
            session: self.session(),
            owner,
            pid: 0,
            kind: LockKind::Unlock,
            start: 0,
            end: u64::MAX,
        };
        Ok(self.inner.meta.setlk(self.inner.vol, h.ino, l, false).await?)
    }

    /// `flock(2)` (shared = Read, exclusive = Write, or Unlock), waiting when `wait` until it
    /// gets the lock or `interrupted` says its caller gave up (`EINTR`, as for
    /// [`Self::setlk`]).
    pub async fn flock(
        &self,
        fh: u64,
        owner: u64,
        kind: LockKind,
        wait: bool,
        interrupted: Interrupted<'_>,
    ) -> VfsResult<()> {
        let h = self.live_handle(fh)?;
        let try_lock = || self.inner.meta.flock(self.inner.vol, h.ino, self.session(), owner, kind);
        self.until_granted(&h.node, wait, interrupted, try_lock).await?;
        let taken = if kind == LockKind::Unlock { 0 } else { self.session() };
        h.locked_in.store(taken, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `try_lock` until it stops answering `EAGAIN` (at once when not `wait`): again
    /// whenever the inode's lock state changes anywhere, and at least every 200 ms; every
    /// wait slice, `EINTR` if `interrupted` says the caller gave up (see the module docs).
    async fn until_granted<F, Fut>(
        &self,
        node: &InodeState,
        wait: bool,
        interrupted: Interrupted<'_>,
        try_lock: F,
    ) -> VfsResult<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<(), ClientError>>,
    {
        let slice = self.inner.cfg.lock_wait_slice;
        let mut until = Instant::now() + slice;
        loop {
            let notified = node.changed.notified();
            match try_lock().await {
                Err(e) if wait && e.errno() == Errno::EAGAIN => {
                    let mut left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        if interrupted() {
                            return Err(Errno::EINTR.into());
                        }
                        until = Instant::now() + slice;
                        left = slice;
                    }
                    let _ = tokio::time::timeout(left.min(RECHECK), notified).await;
                }
                r => return Ok(r?),
            }
        }
    }
}
