//! POSIX record locks (`F_SETLK`/`F_GETLK` semantics: per-owner ranges that split, replace and
//! coalesce), `flock` locks, and the wait-for graph used to report `EDEADLK`.
//!
//! A lock owner is (session, owner). Locks of a session whose lease ended no longer conflict,
//! even before `ExpireSessions` removes them. The wait-for graph is derived: a blocked owner
//! records what it waits for, and its edges are the owners that currently hold conflicting
//! locks, so edges to released locks disappear by themselves.

use std::collections::BTreeSet;

use elea_common::{Errno, Ino, SessionId, Timespec, VolumeId};

use crate::changes::Changes;
use crate::state::{LockOwner, PLock, State, Volume, Waiting};
use crate::types::{LockInfo, LockKind, OpResult, Reply};

fn conflicts(a: LockKind, b: LockKind) -> bool {
    a == LockKind::Write || b == LockKind::Write
}

fn session_holds(v: &Volume, ino: Ino, s: SessionId) -> bool {
    let p = v.plocks.get(&ino).is_some_and(|m| m.range((s, 0, 0)..=(s, u64::MAX, u64::MAX)).next().is_some());
    let f = v.flocks.get(&ino).is_some_and(|m| m.range((s, 0)..=(s, u64::MAX)).next().is_some());
    p || f
}

impl State {
    /// Record locks of other live owners that conflict with `kind` over `[start, end]`.
    fn plock_conflicts(&self, w: &Waiting, me: LockOwner, now: Timespec) -> Vec<LockInfo> {
        let Some(locks) = self.volumes.get(&w.vol).and_then(|v| v.plocks.get(&w.ino)) else {
            return Vec::new();
        };
        locks
            .iter()
            .filter(|((s, o, ls), l)| {
                (*s, *o) != me
                    && *ls <= w.end
                    && l.end >= w.start
                    && conflicts(w.kind, l.kind)
                    && self.session_live(*s, now)
            })
            .map(|((s, o, ls), l)| LockInfo {
                kind: l.kind,
                start: *ls,
                end: l.end,
                pid: l.pid,
                session: *s,
                owner: *o,
            })
            .collect()
    }

    /// Whether `me` waiting for `blockers` closes a cycle in the wait-for graph.
    fn would_deadlock(&self, me: LockOwner, blockers: &[LockInfo], now: Timespec) -> bool {
        let mut stack: Vec<LockOwner> = blockers.iter().map(|b| (b.session, b.owner)).collect();
        let mut seen: BTreeSet<LockOwner> = BTreeSet::new();
        while let Some(o) = stack.pop() {
            if o == me {
                return true;
            }
            if !seen.insert(o) {
                continue;
            }
            let Some(w) = self.waits.get(&o) else {
                continue;
            };
            if !self.session_live(o.0, now) {
                continue;
            }
            stack.extend(self.plock_conflicts(w, o, now).iter().map(|b| (b.session, b.owner)));
        }
        false
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn set_lk(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        s: SessionId,
        owner: u64,
        pid: u32,
        kind: LockKind,
        start: u64,
        end: u64,
        wait: bool,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        self.vol(vol)?.inode(ino)?;
        self.check_session(s, now)?;
        if start > end {
            return Err(Errno::EINVAL);
        }
        let me = (s, owner);
        let req = Waiting { vol, ino, kind, start, end };
        if kind != LockKind::Unlock {
            let blockers = self.plock_conflicts(&req, me, now);
            if !blockers.is_empty() {
                if wait {
                    if self.would_deadlock(me, &blockers, now) {
                        return Err(Errno::EDEADLK);
                    }
                    self.waits.insert(me, req);
                }
                return Err(Errno::EAGAIN);
            }
        }
        self.waits.remove(&me);
        let State { volumes, sessions, .. } = self;
        let v = volumes.get_mut(&vol).ok_or(Errno::ENODEV)?;
        let locks = v.plocks.entry(ino).or_default();
        let lo = (s, owner, 0);
        let hi = (s, owner, u64::MAX);
        let mine: Vec<(u64, PLock)> = locks.range(lo..=hi).map(|(k, l)| (k.2, *l)).collect();
        let mut next: Vec<(u64, PLock)> = Vec::with_capacity(mine.len() + 2);
        for (ls, l) in &mine {
            if l.end < start || *ls > end {
                next.push((*ls, *l));
                continue;
            }
            if *ls < start {
                next.push((*ls, PLock { end: start - 1, ..*l }));
            }
            if l.end > end {
                next.push((end + 1, *l));
            }
        }
        if kind != LockKind::Unlock {
            let (mut ms, mut me_end) = (start, end);
            next.retain(|(ls, l)| {
                let left = l.end.checked_add(1) == Some(ms);
                let right = me_end.checked_add(1) == Some(*ls);
                if l.kind == kind && (left || right) {
                    ms = ms.min(*ls);
                    me_end = me_end.max(l.end);
                    false
                } else {
                    true
                }
            });
            next.push((ms, PLock { end: me_end, kind, pid }));
        }
        next.sort_by_key(|(ls, _)| *ls);
        if next == mine {
            if locks.is_empty() {
                v.plocks.remove(&ino);
            }
            return Ok(Reply::Ok);
        }
        for (ls, _) in &mine {
            locks.remove(&(s, owner, *ls));
        }
        for (ls, l) in next {
            locks.insert((s, owner, ls), l);
        }
        if locks.is_empty() {
            v.plocks.remove(&ino);
        }
        if let Some(sess) = sessions.get_mut(&s) {
            if session_holds(v, ino, s) {
                sess.locked.insert((vol, ino));
            } else {
                sess.locked.remove(&(vol, ino));
            }
        }
        ch.inode(vol, ino);
        Ok(Reply::Ok)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn get_lk(
        &self,
        vol: VolumeId,
        ino: Ino,
        s: SessionId,
        owner: u64,
        kind: LockKind,
        start: u64,
        end: u64,
    ) -> OpResult {
        self.vol(vol)?.inode(ino)?;
        if start > end || kind == LockKind::Unlock {
            return Err(Errno::EINVAL);
        }
        let req = Waiting { vol, ino, kind, start, end };
        let first = self.plock_conflicts(&req, (s, owner), self.clock).into_iter().next();
        Ok(Reply::Lock(first))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn flock(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        s: SessionId,
        owner: u64,
        kind: LockKind,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        self.vol(vol)?.inode(ino)?;
        self.check_session(s, now)?;
        let me = (s, owner);
        if kind != LockKind::Unlock {
            let v = self.vol(vol)?;
            let conflict = v.flocks.get(&ino).is_some_and(|m| {
                m.iter().any(|(o, k)| *o != me && conflicts(kind, *k) && self.session_live(o.0, now))
            });
            if conflict {
                return Err(Errno::EAGAIN);
            }
        }
        let State { volumes, sessions, .. } = self;
        let v = volumes.get_mut(&vol).ok_or(Errno::ENODEV)?;
        let holders = v.flocks.entry(ino).or_default();
        let changed = if kind == LockKind::Unlock {
            holders.remove(&me).is_some()
        } else {
            holders.insert(me, kind) != Some(kind)
        };
        if holders.is_empty() {
            v.flocks.remove(&ino);
        }
        if let Some(sess) = sessions.get_mut(&s) {
            if session_holds(v, ino, s) {
                sess.locked.insert((vol, ino));
            } else {
                sess.locked.remove(&(vol, ino));
            }
        }
        if changed {
            ch.inode(vol, ino);
        }
        Ok(Reply::Ok)
    }

    /// Remove every record lock and flock of session `s` on `ino`; true if any was held.
    pub(crate) fn drop_session_locks(&mut self, vol: VolumeId, ino: Ino, s: SessionId) -> bool {
        let Some(v) = self.volumes.get_mut(&vol) else {
            return false;
        };
        let mut any = false;
        if let Some(m) = v.plocks.get_mut(&ino) {
            let keys: Vec<_> = m.range((s, 0, 0)..=(s, u64::MAX, u64::MAX)).map(|(k, _)| *k).collect();
            any |= !keys.is_empty();
            for k in keys {
                m.remove(&k);
            }
            if m.is_empty() {
                v.plocks.remove(&ino);
            }
        }
        if let Some(m) = v.flocks.get_mut(&ino) {
            let keys: Vec<_> = m.range((s, 0)..=(s, u64::MAX)).map(|(k, _)| *k).collect();
            any |= !keys.is_empty();
            for k in keys {
                m.remove(&k);
            }
            if m.is_empty() {
                v.flocks.remove(&ino);
            }
        }
        any
    }

    /// Forget the lock waits of every owner of session `s`.
    pub(crate) fn drop_session_waits(&mut self, s: SessionId) {
        let keys: Vec<LockOwner> = self.waits.range((s, 0)..=(s, u64::MAX)).map(|(k, _)| *k).collect();
        for k in keys {
            self.waits.remove(&k);
        }
    }
}
