//! Namespace and attribute operations: lookups, creation and removal of names, attribute
//! changes, `access` and `statfs`, with Linux's permission rules. Creating, removing and
//! renaming names is checked by the state machine itself, in the same command as the change
//! (one metadata round trip, no window between check and change); attribute changes are
//! checked here against fresh attributes.

use elea_cache::DataPath;
use elea_common::{Errno, Ino};
use elea_fsm::{Attr, SetAttr, StatFs, TimeSet, mode, rename_flags};
use elea_metadata::{MetaApi, NewNode};

use super::{SetAttrReq, Vfs, is_dir};
use crate::error::VfsResult;
use crate::perm::{self, Creds, MAY_EXEC, MAY_WRITE};

/// Reported capacity when a volume has no quota.
const UNLIMITED_BYTES: u64 = 1 << 50;
const UNLIMITED_INODES: u64 = 1 << 40;

impl<M: MetaApi, D: DataPath> Vfs<M, D> {
    pub async fn lookup(&self, c: &Creds, parent: Ino, name: &[u8]) -> VfsResult<Attr> {
        if c.is_root() {
            return Ok(self.local_attr(self.lookup_raw(parent, name).await?));
        }
        let (p, a) = tokio::join!(self.attr_of(parent), self.lookup_raw(parent, name));
        let p = p?;
        if !is_dir(&p) {
            return Err(Errno::ENOTDIR.into());
        }
        perm::check(c, &p, MAY_EXEC)?;
        Ok(self.local_attr(a?))
    }

    /// Fresh attributes, as this node sees them: buffered writes count in the size, mtime
    /// and ctime (see `local_attr`) without being flushed, so a `stat` or an
    /// `lseek(SEEK_END)` (which a database makes before nearly every page it adds) costs one
    /// metadata read, not a durable commit.
    pub async fn getattr(&self, ino: Ino) -> VfsResult<Attr> {
        if self.release_pending(ino) {
            // This node closed it last: an unlinked file must be gone now, here at least.
            self.release_closed().await;
        }
        if let Some(n) = self.node(ino) {
            let epoch = n.cache().epoch;
            let a = self.attr_of(ino).await?;
            n.observe(epoch, &a);
            return Ok(self.local_attr(a));
        }
        self.attr_of(ino).await
    }

    pub async fn setattr(&self, c: &Creds, ino: Ino, req: SetAttrReq) -> VfsResult<Attr> {
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
                return Err(Errno::EPERM.into());
            }
            let gid = req.gid.unwrap_or(a.gid);
            set.mode = Some(perm::chmod_mode(c, gid, m & mode::PERM_MASK));
        }
        if let Some(size) = req.size {
            if is_dir(&a) {
                return Err(Errno::EISDIR.into());
            }
            let through_writable = match req.fh.map(|fh| self.handle(fh)) {
                Some(Ok(h)) => h.flags & libc::O_ACCMODE != libc::O_RDONLY,
                _ => false,
            };
            if !through_writable {
                perm::check(c, &a, MAY_WRITE)?;
            }
            set.size = Some(size);
            // Like Linux: a truncate by a caller without CAP_FSETID drops set-id bits (the
            // kernel leaves that to this file system, see `EleaFs::init`).
            if !c.is_root() && a.mode & (mode::S_ISUID | mode::S_ISGID) != 0 && set.mode.is_none() {
                set.clear_suid = true;
            }
        }
        for (want, t) in [(&mut set.atime, req.atime), (&mut set.mtime, req.mtime)] {
            let Some(t) = t else { continue };
            match t {
                TimeSet::Now => {
                    if !perm::owner_or_root(c, &a) && !perm::allowed(c, &a, MAY_WRITE) {
                        return Err(Errno::EACCES.into());
                    }
                }
                TimeSet::At(_) => {
                    if !perm::owner_or_root(c, &a) {
                        return Err(Errno::EPERM.into());
                    }
                }
            }
            *want = Some(t);
        }
        let a = self.inner.meta.setattr(self.inner.vol, ino, set).await?;
        if let Some(n) = &node {
            n.invalidate();
        }
        Ok(a)
    }

    /// After a write by a caller without CAP_FSETID: set-id bits go, as Linux drops them. The
    /// kernel drops them itself (before the write) on any file whose mode it knows to carry
    /// them; this covers a mode it has not seen yet, from this node's cached attributes only,
    /// so a write costs no metadata read for it.
    pub async fn drop_setid_after_write(&self, fh: u64) -> VfsResult<()> {
        let h = self.live_handle(fh)?;
        let setid = {
            let c = h.node.cache();
            c.attr.as_ref().is_some_and(|a| !is_dir(a) && a.mode & (mode::S_ISUID | mode::S_ISGID) != 0)
        };
        if !setid {
            return Ok(());
        }
        let set = SetAttr { clear_suid: true, ..SetAttr::default() };
        self.inner.meta.setattr(self.inner.vol, h.ino, set).await?;
        h.node.invalidate();
        Ok(())
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
    ) -> VfsResult<Attr> {
        let t = mode_ & mode::S_IFMT;
        if (t == mode::S_IFCHR || t == mode::S_IFBLK) && !c.is_root() {
            return Err(Errno::EPERM.into());
        }
        if t == mode::S_IFDIR || t == mode::S_IFLNK {
            return Err(Errno::EINVAL.into());
        }
        let n = NewNode {
            parent,
            name,
            mode: t | (mode_ & !umask & mode::PERM_MASK),
            uid: c.uid,
            gid: c.gid,
            rdev,
            exclusive: true,
            open: None,
        };
        Ok(self.inner.meta.mknod_as(self.inner.vol, &c.caller(), n).await?.0)
    }

    pub async fn mkdir(
        &self,
        c: &Creds,
        parent: Ino,
        name: &[u8],
        mode_: u32,
        umask: u32,
    ) -> VfsResult<Attr> {
        let m = mode::S_IFDIR | (mode_ & !umask & 0o1777);
        Ok(self.inner.meta.mkdir_as(self.inner.vol, &c.caller(), parent, name, m).await?)
    }

    pub async fn symlink(&self, c: &Creds, parent: Ino, name: &[u8], target: &[u8]) -> VfsResult<Attr> {
        Ok(self.inner.meta.symlink_as(self.inner.vol, &c.caller(), parent, name, target).await?)
    }

    pub async fn readlink(&self, ino: Ino) -> VfsResult<Vec<u8>> {
        Ok(self.inner.meta.readlink(self.inner.vol, ino).await?)
    }

    pub async fn link(&self, c: &Creds, ino: Ino, new_parent: Ino, new_name: &[u8]) -> VfsResult<Attr> {
        let a = self.inner.meta.link_as(self.inner.vol, &c.caller(), ino, new_parent, new_name).await?;
        Ok(self.local_attr(a))
    }

    pub async fn unlink(&self, c: &Creds, parent: Ino, name: &[u8]) -> VfsResult<()> {
        Ok(self.inner.meta.unlink_as(self.inner.vol, &c.caller(), parent, name).await?)
    }

    pub async fn rmdir(&self, c: &Creds, parent: Ino, name: &[u8]) -> VfsResult<()> {
        Ok(self.inner.meta.rmdir_as(self.inner.vol, &c.caller(), parent, name).await?)
    }

    pub async fn rename(
        &self,
        c: &Creds,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> VfsResult<()> {
        if flags & !(rename_flags::RENAME_NOREPLACE | rename_flags::RENAME_EXCHANGE) != 0 {
            return Err(Errno::EINVAL.into());
        }
        let caller = c.caller();
        Ok(self
            .inner
            .meta
            .rename_as(self.inner.vol, &caller, parent, name, new_parent, new_name, flags)
            .await?)
    }

    pub async fn statfs(&self) -> VfsResult<StatFs> {
        // Counts include what this node's closes freed.
        self.release_closed().await;
        let mut s = self.inner.meta.statfs(self.inner.vol).await?;
        if s.total_bytes == u64::MAX {
            s.total_bytes = UNLIMITED_BYTES.max(s.used_bytes.saturating_mul(2));
        }
        if s.total_inodes == u64::MAX {
            s.total_inodes = UNLIMITED_INODES.max(s.used_inodes.saturating_mul(2));
        }
        Ok(s)
    }

    /// `access(2)`: `mask` is a combination of `MAY_*` (0 = existence).
    pub async fn access(&self, c: &Creds, ino: Ino, mask: u32) -> VfsResult<()> {
        let a = self.attr_of(ino).await?;
        Ok(perm::check(c, &a, mask & 7)?)
    }
}
