//! The gateway's metadata session (a lease that owns its open references and locks) and the
//! delayed release of closed handles' open references.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use elea_cache::DataPath;
use elea_common::{Errno, Ino, SessionId};
use elea_metadata::MetaApi;
use elea_metadata::client::ClientError;
use tokio::sync::Notify;

use super::{Inner, Vfs, VfsConfig, lock};

/// How long a closed handle's open reference is kept for a reopen before it is released.
const RELEASE_DELAY: Duration = Duration::from_millis(100);

pub(super) async fn open<M: MetaApi>(meta: &M, cfg: &VfsConfig) -> Result<SessionId, ClientError> {
    meta.open_session(&cfg.session_name, cfg.session_ttl.as_millis() as u64).await
}

impl<M: MetaApi, D: DataPath> Vfs<M, D> {
    /// Takes over the open reference of a recently closed handle of `ino`, if one is waiting
    /// to be released (the reference count in metadata stays as it is).
    pub(super) fn reuse_released(&self, ino: Ino) -> bool {
        let mut m = lock(&self.inner.releases);
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

    pub(super) fn release_pending(&self, ino: Ino) -> bool {
        lock(&self.inner.releases).contains_key(&(self.session(), ino))
    }

    /// Releases in metadata, now, every open reference of a handle closed on this node (they
    /// are otherwise released `RELEASE_DELAY` after the close): an unlinked file closed here
    /// is freed when this returns.
    pub async fn release_closed(&self) {
        // Nothing waiting, and no release in flight (the background task may have taken the
        // references already and still be sending them).
        if lock(&self.inner.releases).is_empty() && self.inner.releasing.try_lock().is_ok() {
            return;
        }
        self.send_releases().await;
    }

    /// Releases in metadata every open reference of a closed handle (all at once: they share
    /// commits). One send at a time: a caller waits for the one in flight, so when this
    /// returns, every reference closed before the call is released.
    async fn send_releases(&self) {
        let _sending = self.inner.releasing.lock().await;
        let due: Vec<((SessionId, Ino), u32)> =
            std::mem::take(&mut *lock(&self.inner.releases)).into_iter().collect();
        let sends = due.into_iter().flat_map(|((session, ino), n)| {
            (0..n).map(move |_| async move {
                if let Err(e) = self.inner.meta.release(self.inner.vol, ino, session).await {
                    // A lapsed session has no references left to release.
                    tracing::debug!(ino, error = %e, "release");
                }
            })
        });
        futures::future::join_all(sends).await;
    }
}

/// Renews the session lease; a lapsed session (the gateway was cut off for longer than the
/// lease) is replaced by a new one, and the loss is logged: its locks and open references
/// are gone.
pub(super) async fn session_loop<M: MetaApi, D: DataPath>(weak: Weak<Inner<M, D>>) {
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
        match i.meta.heartbeat(session).await {
            Ok(()) => {}
            Err(ClientError::Fs(Errno::ESTALE)) => {
                tracing::error!(
                    session,
                    "the metadata session lapsed: its locks and open files were released"
                );
                match open(&i.meta, &i.cfg).await {
                    Ok(s) => i.session.store(s, Ordering::Relaxed),
                    Err(e) => tracing::warn!(error = %e, "opening a new session failed"),
                }
            }
            Err(e) => tracing::warn!(session, error = %e, "session heartbeat failed"),
        }
    }
}

/// Sends the open references of closed handles to metadata `RELEASE_DELAY` after a close.
pub(super) async fn release_loop<M: MetaApi, D: DataPath>(weak: Weak<Inner<M, D>>, wake: Arc<Notify>) {
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
