//! Sessions (leases), open references, and inode lifetime: an unlinked inode lives on while
//! any session has it open and is freed (its chunks and locks dropped) when the last
//! reference goes, by `Release`, `CloseSession` or `ExpireSessions`.

use elea_common::{Errno, Ino, SessionId, Timespec, VolumeId};

use crate::changes::Changes;
use crate::state::{Session, State};
use crate::types::{OpResult, Reply};

type R<T> = Result<T, Errno>;

/// Longest session lease.
pub const SESSION_TTL_MAX_MS: u64 = 3_600_000;
/// Longest session name in bytes.
pub const SESSION_NAME_MAX: usize = 256;
/// A client (de-duplication table entry) idle for longer than this is forgotten.
pub const CLIENT_IDLE_MS: u64 = 3_600_000;

impl State {
    /// `ESTALE` unless `s` is known and its lease still runs.
    pub(crate) fn check_session(&self, s: SessionId, now: Timespec) -> R<()> {
        match self.sessions.get(&s) {
            Some(sess) if sess.live(now) => Ok(()),
            _ => Err(Errno::ESTALE),
        }
    }

    /// Whether the locks of session `s` still count at `now`.
    pub(crate) fn session_live(&self, s: SessionId, now: Timespec) -> bool {
        self.sessions.get(&s).is_some_and(|x| x.live(now))
    }

    /// Add one open reference (the caller checked the session and inode).
    pub(crate) fn take_open(&mut self, vol: VolumeId, ino: Ino, s: SessionId) {
        let Some(sess) = self.sessions.get_mut(&s) else {
            return;
        };
        let Some(i) = self.volumes.get_mut(&vol).and_then(|v| v.inodes.get_mut(&ino)) else {
            return;
        };
        i.opens = i.opens.saturating_add(1);
        let n = sess.opens.entry((vol, ino)).or_insert(0);
        *n = n.saturating_add(1);
    }

    /// Free `ino` when it has no links and no open references. Returns whether it was freed.
    pub(crate) fn free_if_unused(&mut self, vol: VolumeId, ino: Ino, ch: &mut Changes) -> bool {
        let unused = self
            .volumes
            .get(&vol)
            .and_then(|v| v.inodes.get(&ino))
            .is_some_and(|i| i.nlink == 0 && i.opens == 0);
        if unused {
            self.free_inode(vol, ino, ch);
        }
        unused
    }

    /// Remove an inode with its data, xattrs and locks.
    fn free_inode(&mut self, vol: VolumeId, ino: Ino, ch: &mut Changes) {
        self.drop_all_chunks(vol, ino);
        let State { volumes, sessions, .. } = self;
        let Some(v) = volumes.get_mut(&vol) else {
            return;
        };
        let Some(inode) = v.inodes.remove(&ino) else {
            return;
        };
        if inode.is_reg() {
            v.account_size(inode.size, 0);
        }
        let mut holders: Vec<SessionId> = Vec::new();
        if let Some(pl) = v.plocks.remove(&ino) {
            holders.extend(pl.keys().map(|k| k.0));
        }
        if let Some(fl) = v.flocks.remove(&ino) {
            holders.extend(fl.keys().map(|k| k.0));
        }
        for s in holders {
            if let Some(sess) = sessions.get_mut(&s) {
                sess.locked.remove(&(vol, ino));
            }
        }
        ch.inode(vol, ino);
    }

    pub(crate) fn open_session(&mut self, name: &str, ttl_ms: u64, now: Timespec) -> OpResult {
        if ttl_ms == 0 || ttl_ms > SESSION_TTL_MAX_MS || name.len() > SESSION_NAME_MAX {
            return Err(Errno::EINVAL);
        }
        let id = self.sessions_allocated.checked_add(1).ok_or(Errno::ENOSPC)?;
        self.sessions_allocated = id;
        let expires = now.plus_millis(ttl_ms);
        self.sessions.insert(id, Session { name: name.to_string(), ttl_ms, expires, ..Session::default() });
        Ok(Reply::Session { id, expires })
    }

    pub(crate) fn heartbeat(&mut self, s: SessionId, now: Timespec) -> OpResult {
        self.check_session(s, now)?;
        let sess = self.sessions.get_mut(&s).ok_or(Errno::ESTALE)?;
        sess.expires = now.plus_millis(sess.ttl_ms);
        Ok(Reply::Session { id: s, expires: sess.expires })
    }

    pub(crate) fn close_session(&mut self, s: SessionId, now: Timespec, ch: &mut Changes) -> OpResult {
        self.check_session(s, now)?;
        self.end_session(s, ch);
        Ok(Reply::Ok)
    }

    pub(crate) fn extend_sessions(&mut self, now: Timespec) -> OpResult {
        for s in self.sessions.values_mut() {
            s.expires = s.expires.max(now.plus_millis(s.ttl_ms));
        }
        Ok(Reply::Ok)
    }

    pub(crate) fn expire_sessions(&mut self, now: Timespec, ch: &mut Changes) -> OpResult {
        let dead: Vec<SessionId> =
            self.sessions.iter().filter(|(_, s)| s.expires < now).map(|(id, _)| *id).collect();
        for s in dead {
            self.end_session(s, ch);
        }
        self.clients.retain(|_, c| now <= c.last_active.plus_millis(CLIENT_IDLE_MS));
        Ok(Reply::Ok)
    }

    /// Remove a session, releasing its opens, locks and lock waits.
    fn end_session(&mut self, s: SessionId, ch: &mut Changes) {
        let Some(sess) = self.sessions.remove(&s) else {
            return;
        };
        for ((vol, ino), count) in sess.opens {
            if let Some(i) = self.volumes.get_mut(&vol).and_then(|v| v.inodes.get_mut(&ino)) {
                i.opens = i.opens.saturating_sub(u64::from(count));
            }
            self.free_if_unused(vol, ino, ch);
        }
        for (vol, ino) in sess.locked {
            if self.drop_session_locks(vol, ino, s) {
                ch.inode(vol, ino);
            }
        }
        self.drop_session_waits(s);
    }

    pub(crate) fn open(&mut self, vol: VolumeId, ino: Ino, s: SessionId, now: Timespec) -> OpResult {
        let attr = self.vol(vol)?.attr(ino)?;
        self.check_session(s, now)?;
        self.take_open(vol, ino, s);
        Ok(Reply::Attr(attr))
    }

    pub(crate) fn release(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        s: SessionId,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        self.vol(vol)?;
        self.check_session(s, now)?;
        let sess = self.sessions.get_mut(&s).ok_or(Errno::ESTALE)?;
        let Some(n) = sess.opens.get_mut(&(vol, ino)) else {
            return Err(Errno::EBADF);
        };
        if *n <= 1 {
            sess.opens.remove(&(vol, ino));
        } else {
            *n -= 1;
        }
        if let Some(i) = self.volumes.get_mut(&vol).and_then(|v| v.inodes.get_mut(&ino)) {
            i.opens = i.opens.saturating_sub(1);
        }
        self.free_if_unused(vol, ino, ch);
        Ok(Reply::Ok)
    }

    pub(crate) fn session_info(&self, s: SessionId) -> OpResult {
        let sess = self.sessions.get(&s).ok_or(Errno::ESTALE)?;
        Ok(Reply::SessionInfo {
            open: sess.opens.iter().map(|((v, i), n)| (*v, *i, *n)).collect(),
            expires: sess.expires,
        })
    }
}
