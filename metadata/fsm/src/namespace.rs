//! The namespace: volumes, inode number allocation, creating, linking, unlinking and renaming
//! entries, attributes, xattrs, and the read-only lookups (lookup, getattr, readdir, readlink,
//! xattrs, statfs, volume listing).
//!
//! Every mutating function validates everything first and only then changes the state, so a
//! failed op leaves the state untouched.

use elea_common::ids::ROOT_INO;
use elea_common::{Errno, Ino, Timespec, VolumeId};

use crate::changes::Changes;
use crate::state::{FIRST_COOKIE, Inode, State, Volume};
use crate::types::{
    Attr, DirEntry, FileType, OpResult, Reply, SetAttr, StatFs, TimeSet, VolumeConfig, VolumeInfo, limits,
    mode, rename_flags, xattr_flags,
};

type R<T> = Result<T, Errno>;

/// Most inode numbers or slice ids one `Alloc*` call may reserve.
pub const ALLOC_MAX: u64 = 1_000_000;

/// A directory entry name: not empty (`ENOENT`), at most `NAME_MAX` bytes (`ENAMETOOLONG`),
/// without '/' or NUL and not "." or ".." (`EINVAL`).
pub fn check_name(name: &[u8]) -> R<()> {
    if name.is_empty() {
        return Err(Errno::ENOENT);
    }
    if name.len() > limits::NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    if name.iter().any(|&b| b == b'/' || b == 0) || name == b"." || name == b".." {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

pub(crate) fn check_volume_name(name: &str) -> R<()> {
    let ok = !name.is_empty()
        && name.len() <= limits::VOLUME_NAME_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(Errno::EINVAL) }
}

fn check_time(t: &Option<TimeSet>) -> R<()> {
    match t {
        Some(TimeSet::At(ts)) if !ts.is_valid() => Err(Errno::EINVAL),
        _ => Ok(()),
    }
}

fn resolve_time(t: TimeSet, now: Timespec) -> Timespec {
    match t {
        TimeSet::Now => now,
        TimeSet::At(ts) => ts,
    }
}

/// What a new inode starts with (besides times, links and generation).
struct NewInode {
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    target: Vec<u8>,
}

/// `renameat2` flags other than `RENAME_NOREPLACE` and `RENAME_EXCHANGE`, or both of them,
/// are `EINVAL`.
pub(crate) fn check_rename_flags(flags: u32) -> R<()> {
    use rename_flags::{RENAME_EXCHANGE, RENAME_NOREPLACE};
    if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
        || flags & (RENAME_NOREPLACE | RENAME_EXCHANGE) == RENAME_NOREPLACE | RENAME_EXCHANGE
    {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// What a rename moves, once its arguments were found valid.
pub(crate) struct RenameEnds {
    /// The inode `parent/name` names.
    pub src: Ino,
    /// Whether the source is a directory.
    pub src_dir: bool,
    /// The entry at `new_parent/new_name` when there is one: its inode, whether it is a
    /// directory, and how many entries it holds.
    pub dst: Option<(Ino, bool, u64)>,
}

impl Volume {
    /// Check an inode number for a create: a reserved, unused one, or the next free one.
    fn pick_ino(&self, req: Option<Ino>) -> R<Ino> {
        match req {
            Some(x) => {
                if x < 2 || x >= self.next_ino || self.inodes.contains_key(&x) {
                    Err(Errno::EINVAL)
                } else {
                    Ok(x)
                }
            }
            None => {
                if self.next_ino == u64::MAX {
                    Err(Errno::ENOSPC)
                } else {
                    Ok(self.next_ino)
                }
            }
        }
    }

    /// Validates a rename as far as Linux does before it checks permissions: the flags, both
    /// parents, both names, that the source exists, `RENAME_EXCHANGE` and `RENAME_NOREPLACE`
    /// against the destination, and that no directory would move into itself or replace one
    /// of its ancestors.
    pub(crate) fn rename_ends(&self, p1: Ino, n1: &[u8], p2: Ino, n2: &[u8], flags: u32) -> R<RenameEnds> {
        check_rename_flags(flags)?;
        let exchange = flags & rename_flags::RENAME_EXCHANGE != 0;
        let noreplace = flags & rename_flags::RENAME_NOREPLACE != 0;
        self.live_dir(p1)?;
        self.live_dir(p2)?;
        check_name(n1)?;
        check_name(n2)?;
        let src = self.lookup(p1, n1).ok_or(Errno::ENOENT)?;
        let dst = self.lookup(p2, n2);
        if exchange && dst.is_none() {
            return Err(Errno::ENOENT);
        }
        if noreplace && dst.is_some() {
            return Err(Errno::EEXIST);
        }
        let src_dir = self.inode(src.ino)?.is_dir();
        if src_dir && self.is_ancestor_or_self(src.ino, p2) {
            return Err(Errno::EINVAL);
        }
        let dst = match dst {
            Some(d) => {
                let di = self.inode(d.ino)?;
                let d_dir = di.is_dir();
                if d_dir && self.is_ancestor_or_self(d.ino, p1) {
                    return Err(if exchange { Errno::EINVAL } else { Errno::ENOTEMPTY });
                }
                Some((d.ino, d_dir, di.entries))
            }
            None => None,
        };
        Ok(RenameEnds { src: src.ino, src_dir, dst })
    }

    /// Insert a validated new inode under `parent/name` and touch the parent.
    #[allow(clippy::too_many_arguments)]
    fn insert_new(
        &mut self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        ino: Ino,
        req: Option<Ino>,
        mut new: NewInode,
        now: Timespec,
        ch: &mut Changes,
    ) -> Attr {
        if req.is_none() {
            self.next_ino = self.next_ino.saturating_add(1);
        }
        self.generation = self.generation.saturating_add(1);
        let is_dir = new.mode & mode::S_IFMT == mode::S_IFDIR;
        if let Some(p) = self.inodes.get_mut(&parent) {
            if p.mode & mode::S_ISGID != 0 {
                new.gid = p.gid;
                if is_dir {
                    new.mode |= mode::S_ISGID;
                }
            }
            if is_dir {
                p.nlink = p.nlink.saturating_add(1);
            }
            p.mtime = now;
            p.ctime = now;
        }
        let inode = Inode {
            mode: new.mode,
            uid: new.uid,
            gid: new.gid,
            nlink: if is_dir { 2 } else { 1 },
            size: new.target.len() as u64,
            atime: now,
            mtime: now,
            ctime: now,
            rdev: new.rdev,
            generation: self.generation,
            flags: 0,
            parent: if is_dir { parent } else { 0 },
            next_cookie: FIRST_COOKIE,
            entries: 0,
            target: new.target,
            ..Inode::default()
        };
        let attr = inode.attr(ino, &self.chunks);
        self.inodes.insert(ino, inode);
        self.add_entry(parent, name, ino);
        ch.entry(vol, parent, name);
        ch.inode(vol, parent);
        attr
    }

    fn touch_dir(&mut self, dir: Ino, now: Timespec) {
        if let Some(p) = self.inodes.get_mut(&dir) {
            p.mtime = now;
            p.ctime = now;
        }
    }

    fn add_nlink(&mut self, ino: Ino, delta: i32) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.nlink = i.nlink.saturating_add_signed(delta);
        }
    }

    fn set_ctime(&mut self, ino: Ino, now: Timespec) {
        if let Some(i) = self.inodes.get_mut(&ino) {
            i.ctime = now;
        }
    }

    pub fn info(&self, id: VolumeId) -> VolumeInfo {
        VolumeInfo {
            id,
            name: self.name.clone(),
            created: self.created,
            inodes: self.inodes.len() as u64,
            used_bytes: self.used_bytes,
            change_seq: self.change_seq,
            config: self.config.clone(),
        }
    }
}

impl State {
    pub(crate) fn vol(&self, vol: VolumeId) -> R<&Volume> {
        self.volumes.get(&vol).ok_or(Errno::ENODEV)
    }

    pub(crate) fn vol_mut(&mut self, vol: VolumeId) -> R<&mut Volume> {
        self.volumes.get_mut(&vol).ok_or(Errno::ENODEV)
    }

    pub(crate) fn create_volume(
        &mut self,
        name: &str,
        config: &VolumeConfig,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        check_volume_name(name)?;
        crate::data::check_config(config)?;
        if self.volume_names.contains_key(name) || self.groups.volumes.values().any(|r| r.name == name) {
            return Err(Errno::EEXIST);
        }
        let id = self.volumes_allocated.checked_add(1).ok_or(Errno::ENOSPC)?;
        self.volumes_allocated = id;
        let root = Inode {
            mode: mode::S_IFDIR | 0o755,
            nlink: 2,
            atime: now,
            mtime: now,
            ctime: now,
            generation: 1,
            parent: ROOT_INO,
            next_cookie: FIRST_COOKIE,
            ..Inode::default()
        };
        let mut v = Volume {
            name: name.to_string(),
            config: config.clone(),
            created: now,
            next_ino: 2,
            generation: 1,
            ..Volume::default()
        };
        v.inodes.insert(ROOT_INO, root);
        let info = v.info(id);
        self.volumes.insert(id, v);
        self.volume_names.insert(name.to_string(), id);
        ch.inode(id, ROOT_INO);
        Ok(Reply::Volume(VolumeInfo { change_seq: 1, ..info }))
    }

    pub(crate) fn alloc_inodes(&mut self, vol: VolumeId, count: u64) -> OpResult {
        let v = self.vol_mut(vol)?;
        if count == 0 || count > ALLOC_MAX {
            return Err(Errno::EINVAL);
        }
        let start = v.next_ino;
        let end = start.checked_add(count).ok_or(Errno::ENOSPC)?;
        v.next_ino = end;
        Ok(Reply::Range { start, count })
    }

    pub(crate) fn alloc_slices(&mut self, count: u64) -> OpResult {
        if count == 0 || count > ALLOC_MAX {
            return Err(Errno::EINVAL);
        }
        let start = self.slices_allocated.checked_add(1).ok_or(Errno::ENOSPC)?;
        let last = self.slices_allocated.checked_add(count).ok_or(Errno::ENOSPC)?;
        // Past the group's range the ids would name another group.
        if last >= self.groups.slice_limit() {
            return Err(Errno::ENOSPC);
        }
        self.slices_allocated = last;
        Ok(Reply::Range { start, count })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mknod(
        &mut self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        mode_: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        exclusive: bool,
        ino: Option<Ino>,
        session: Option<u64>,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol(vol)?;
        v.live_dir(parent)?;
        check_name(name)?;
        if let Some(slot) = v.lookup(parent, name) {
            if exclusive {
                return Err(Errno::EEXIST);
            }
            let existing = v.inode(slot.ino)?;
            if existing.is_dir() {
                return Err(Errno::EISDIR);
            }
            let attr = existing.attr(slot.ino, &v.chunks);
            if let Some(s) = session {
                self.check_session(s, now)?;
                self.take_open(vol, slot.ino, s);
            }
            return Ok(Reply::Entry { attr, created: false });
        }
        // Type 0 means a regular file, as for mknod(2).
        let type_bits = match mode_ & mode::S_IFMT {
            0 => mode::S_IFREG,
            t => t,
        };
        match FileType::from_mode(type_bits) {
            Some(
                FileType::Regular
                | FileType::Fifo
                | FileType::Socket
                | FileType::CharDevice
                | FileType::BlockDevice,
            ) => {}
            _ => return Err(Errno::EINVAL),
        }
        let new_ino = v.pick_ino(ino)?;
        if let Some(s) = session {
            self.check_session(s, now)?;
        }
        let is_dev = type_bits == mode::S_IFCHR || type_bits == mode::S_IFBLK;
        let new = NewInode {
            mode: type_bits | (mode_ & mode::PERM_MASK),
            uid,
            gid,
            rdev: if is_dev { rdev } else { 0 },
            target: Vec::new(),
        };
        let v = self.vol_mut(vol)?;
        let attr = v.insert_new(vol, parent, name, new_ino, ino, new, now, ch);
        if let Some(s) = session {
            self.take_open(vol, new_ino, s);
        }
        Ok(Reply::Entry { attr, created: true })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn mkdir(
        &mut self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        mode_: u32,
        uid: u32,
        gid: u32,
        ino: Option<Ino>,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol(vol)?;
        let p = v.live_dir(parent)?;
        check_name(name)?;
        if v.lookup(parent, name).is_some() {
            return Err(Errno::EEXIST);
        }
        if p.nlink >= limits::LINK_MAX {
            return Err(Errno::EMLINK);
        }
        let new_ino = v.pick_ino(ino)?;
        let new = NewInode {
            mode: mode::S_IFDIR | (mode_ & mode::PERM_MASK),
            uid,
            gid,
            rdev: 0,
            target: Vec::new(),
        };
        let v = self.vol_mut(vol)?;
        let attr = v.insert_new(vol, parent, name, new_ino, ino, new, now, ch);
        Ok(Reply::Entry { attr, created: true })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn symlink(
        &mut self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
        ino: Option<Ino>,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol(vol)?;
        if target.is_empty() {
            return Err(Errno::ENOENT);
        }
        if target.len() > limits::SYMLINK_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        v.live_dir(parent)?;
        check_name(name)?;
        if v.lookup(parent, name).is_some() {
            return Err(Errno::EEXIST);
        }
        let new_ino = v.pick_ino(ino)?;
        let new = NewInode { mode: mode::S_IFLNK | 0o777, uid, gid, rdev: 0, target: target.to_vec() };
        let v = self.vol_mut(vol)?;
        let attr = v.insert_new(vol, parent, name, new_ino, ino, new, now, ch);
        Ok(Reply::Entry { attr, created: true })
    }

    pub(crate) fn link(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        new_parent: Ino,
        new_name: &[u8],
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol_mut(vol)?;
        let src = v.inode(ino)?;
        v.live_dir(new_parent)?;
        check_name(new_name)?;
        if v.lookup(new_parent, new_name).is_some() {
            return Err(Errno::EEXIST);
        }
        if src.is_dir() {
            return Err(Errno::EPERM);
        }
        if src.nlink == 0 {
            return Err(Errno::ENOENT);
        }
        if src.nlink >= limits::LINK_MAX {
            return Err(Errno::EMLINK);
        }
        v.add_nlink(ino, 1);
        v.set_ctime(ino, now);
        v.add_entry(new_parent, new_name, ino);
        v.touch_dir(new_parent, now);
        ch.entry(vol, new_parent, new_name);
        ch.inode(vol, new_parent);
        ch.inode(vol, ino);
        let attr = v.attr(ino)?;
        Ok(Reply::Entry { attr, created: true })
    }

    pub(crate) fn unlink(
        &mut self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol_mut(vol)?;
        v.live_dir(parent)?;
        check_name(name)?;
        let slot = v.lookup(parent, name).ok_or(Errno::ENOENT)?;
        if v.inode(slot.ino)?.is_dir() {
            return Err(Errno::EISDIR);
        }
        v.remove_entry(parent, name);
        v.add_nlink(slot.ino, -1);
        v.set_ctime(slot.ino, now);
        v.touch_dir(parent, now);
        ch.entry(vol, parent, name);
        ch.inode(vol, parent);
        ch.inode(vol, slot.ino);
        let nlink = v.inode(slot.ino).map(|i| i.nlink).unwrap_or(0);
        let freed = self.free_if_unused(vol, slot.ino, ch);
        Ok(Reply::Removed { ino: slot.ino, nlink, freed })
    }

    pub(crate) fn rmdir(
        &mut self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol_mut(vol)?;
        v.live_dir(parent)?;
        check_name(name)?;
        let slot = v.lookup(parent, name).ok_or(Errno::ENOENT)?;
        let d = v.inode(slot.ino)?;
        if !d.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if d.entries > 0 {
            return Err(Errno::ENOTEMPTY);
        }
        v.remove_entry(parent, name);
        if let Some(d) = v.inodes.get_mut(&slot.ino) {
            d.nlink = 0;
            d.ctime = now;
        }
        v.add_nlink(parent, -1);
        v.touch_dir(parent, now);
        ch.entry(vol, parent, name);
        ch.inode(vol, parent);
        ch.inode(vol, slot.ino);
        let freed = self.free_if_unused(vol, slot.ino, ch);
        Ok(Reply::Removed { ino: slot.ino, nlink: 0, freed })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rename(
        &mut self,
        vol: VolumeId,
        p1: Ino,
        n1: &[u8],
        p2: Ino,
        n2: &[u8],
        flags: u32,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol_mut(vol)?;
        let RenameEnds { src, src_dir: s_dir, dst } = v.rename_ends(p1, n1, p2, n2, flags)?;
        let exchange = flags & rename_flags::RENAME_EXCHANGE != 0;
        if let Some((d_ino, _, _)) = dst
            && d_ino == src
        {
            return Ok(Reply::Ok);
        }
        let p1_nlink = v.inode(p1)?.nlink;
        let p2_nlink = v.inode(p2)?.nlink;

        if exchange {
            let Some((d_ino, d_dir, _)) = dst else {
                return Err(Errno::ENOENT);
            };
            if p1 != p2 {
                if s_dir && !d_dir && p2_nlink >= limits::LINK_MAX {
                    return Err(Errno::EMLINK);
                }
                if !s_dir && d_dir && p1_nlink >= limits::LINK_MAX {
                    return Err(Errno::EMLINK);
                }
            }
            v.retarget_entry(p1, n1, d_ino);
            v.retarget_entry(p2, n2, src);
            if p1 != p2 {
                if s_dir && let Some(i) = v.inodes.get_mut(&src) {
                    i.parent = p2;
                }
                if d_dir && let Some(i) = v.inodes.get_mut(&d_ino) {
                    i.parent = p1;
                }
                if s_dir && !d_dir {
                    v.add_nlink(p1, -1);
                    v.add_nlink(p2, 1);
                }
                if d_dir && !s_dir {
                    v.add_nlink(p2, -1);
                    v.add_nlink(p1, 1);
                }
            }
            v.set_ctime(src, now);
            v.set_ctime(d_ino, now);
            v.touch_dir(p1, now);
            v.touch_dir(p2, now);
            ch.entry(vol, p1, n1);
            ch.entry(vol, p2, n2);
            for ino in [p1, p2, src, d_ino] {
                ch.inode(vol, ino);
            }
            return Ok(Reply::Ok);
        }

        if let Some((_, d_dir, d_entries)) = dst {
            if s_dir && !d_dir {
                return Err(Errno::ENOTDIR);
            }
            if !s_dir && d_dir {
                return Err(Errno::EISDIR);
            }
            if d_dir && d_entries > 0 {
                return Err(Errno::ENOTEMPTY);
            }
        }
        let d_is_dir = matches!(dst, Some((_, true, _)));
        if s_dir && p1 != p2 && !d_is_dir && p2_nlink >= limits::LINK_MAX {
            return Err(Errno::EMLINK);
        }

        v.remove_entry(p1, n1);
        let mut replaced = None;
        if let Some((d_ino, d_dir, _)) = dst {
            v.remove_entry(p2, n2);
            if d_dir {
                if let Some(d) = v.inodes.get_mut(&d_ino) {
                    d.nlink = 0;
                }
                v.add_nlink(p2, -1);
            } else {
                v.add_nlink(d_ino, -1);
            }
            v.set_ctime(d_ino, now);
            ch.inode(vol, d_ino);
            replaced = Some(d_ino);
        }
        v.add_entry(p2, n2, src);
        if s_dir && p1 != p2 {
            v.add_nlink(p1, -1);
            v.add_nlink(p2, 1);
            if let Some(i) = v.inodes.get_mut(&src) {
                i.parent = p2;
            }
        }
        v.set_ctime(src, now);
        v.touch_dir(p1, now);
        v.touch_dir(p2, now);
        ch.entry(vol, p1, n1);
        ch.entry(vol, p2, n2);
        for ino in [p1, p2, src] {
            ch.inode(vol, ino);
        }
        match replaced {
            Some(d_ino) => {
                let nlink = v.inode(d_ino).map(|i| i.nlink).unwrap_or(0);
                let freed = self.free_if_unused(vol, d_ino, ch);
                Ok(Reply::Removed { ino: d_ino, nlink, freed })
            }
            None => Ok(Reply::Ok),
        }
    }

    pub(crate) fn set_attr(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        set: &SetAttr,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol(vol)?;
        let i = v.inode(ino)?;
        if let Some(size) = set.size {
            if i.is_dir() {
                return Err(Errno::EISDIR);
            }
            if !i.is_reg() {
                return Err(Errno::EINVAL);
            }
            if size > limits::FILE_SIZE_MAX {
                return Err(Errno::EFBIG);
            }
        }
        check_time(&set.atime)?;
        check_time(&set.mtime)?;
        let nothing = set.mode.is_none()
            && set.uid.is_none()
            && set.gid.is_none()
            && set.size.is_none()
            && set.atime.is_none()
            && set.mtime.is_none()
            && !set.clear_suid;
        if nothing {
            return Ok(Reply::Attr(i.attr(ino, &v.chunks)));
        }
        let old_size = i.size;
        if let Some(size) = set.size
            && size < old_size
        {
            self.truncate_chunks(vol, ino, size);
        }
        let v = self.vol_mut(vol)?;
        if let Some(size) = set.size {
            v.account_size(old_size, size);
        }
        let Some(i) = v.inodes.get_mut(&ino) else {
            return Err(Errno::ENOENT);
        };
        if let Some(m) = set.mode {
            i.mode = (i.mode & mode::S_IFMT) | (m & mode::PERM_MASK);
        }
        if let Some(uid) = set.uid {
            i.uid = uid;
        }
        if let Some(gid) = set.gid {
            i.gid = gid;
        }
        if let Some(size) = set.size {
            if size != i.size {
                i.mtime = now;
            }
            i.size = size;
        }
        if let Some(t) = set.atime {
            i.atime = resolve_time(t, now);
        }
        if let Some(t) = set.mtime {
            i.mtime = resolve_time(t, now);
        }
        if set.clear_suid {
            i.mode &= !mode::S_ISUID;
            if i.mode & 0o010 != 0 {
                i.mode &= !mode::S_ISGID;
            }
        }
        i.ctime = now;
        ch.inode(vol, ino);
        Ok(Reply::Attr(v.attr(ino)?))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn set_xattr(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: u32,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        use xattr_flags::{XATTR_CREATE, XATTR_REPLACE};
        let v = self.vol_mut(vol)?;
        let i = v.inode(ino)?;
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 || flags == XATTR_CREATE | XATTR_REPLACE {
            return Err(Errno::EINVAL);
        }
        if name.is_empty() || name.len() > limits::XATTR_NAME_MAX {
            return Err(Errno::ERANGE);
        }
        if value.len() > limits::XATTR_VALUE_MAX {
            return Err(Errno::E2BIG);
        }
        let old = i.xattrs.get(name);
        if old.is_some() && flags & XATTR_CREATE != 0 {
            return Err(Errno::EEXIST);
        }
        if old.is_none() && flags & XATTR_REPLACE != 0 {
            return Err(Errno::ENODATA);
        }
        let old_bytes = old.map_or(0, |o| (name.len() + o.len()) as u64);
        let total = i.xattr_bytes.saturating_sub(old_bytes).saturating_add((name.len() + value.len()) as u64);
        if total > limits::XATTR_TOTAL_MAX as u64 {
            return Err(Errno::ENOSPC);
        }
        let Some(i) = v.inodes.get_mut(&ino) else {
            return Err(Errno::ENOENT);
        };
        i.xattrs.insert(name.to_vec(), value.to_vec());
        i.xattr_bytes = total;
        i.ctime = now;
        ch.inode(vol, ino);
        Ok(Reply::Ok)
    }

    pub(crate) fn remove_xattr(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        name: &[u8],
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol_mut(vol)?;
        let Some(i) = v.inodes.get_mut(&ino) else {
            return Err(Errno::ENOENT);
        };
        if name.is_empty() || name.len() > limits::XATTR_NAME_MAX {
            return Err(Errno::ERANGE);
        }
        let Some(old) = i.xattrs.remove(name) else {
            return Err(Errno::ENODATA);
        };
        i.xattr_bytes = i.xattr_bytes.saturating_sub((name.len() + old.len()) as u64);
        i.ctime = now;
        ch.inode(vol, ino);
        Ok(Reply::Ok)
    }

    // ----- queries -----

    pub(crate) fn list_volumes(&self) -> OpResult {
        Ok(Reply::Volumes(self.volumes.iter().map(|(id, v)| v.info(*id)).collect()))
    }

    pub(crate) fn volume_by_name(&self, name: &str) -> OpResult {
        let id = self.volume_names.get(name).ok_or(Errno::ENOENT)?;
        Ok(Reply::Volume(self.vol(*id)?.info(*id)))
    }

    pub(crate) fn lookup(&self, vol: VolumeId, parent: Ino, name: &[u8]) -> OpResult {
        let v = self.vol(vol)?;
        let p = v.live_dir(parent)?;
        let ino = match name {
            b"." => parent,
            b".." => p.parent,
            _ => {
                check_name(name)?;
                v.lookup(parent, name).ok_or(Errno::ENOENT)?.ino
            }
        };
        let attr = v.attr(ino)?;
        Ok(Reply::Entry { attr, created: false })
    }

    pub(crate) fn get_attr(&self, vol: VolumeId, ino: Ino) -> OpResult {
        Ok(Reply::Attr(self.vol(vol)?.attr(ino)?))
    }

    pub(crate) fn read_dir(&self, vol: VolumeId, ino: Ino, cookie: u64, limit: u32, plus: bool) -> OpResult {
        let v = self.vol(vol)?;
        let d = v.live_dir(ino)?;
        if limit == 0 {
            return Err(Errno::EINVAL);
        }
        let limit = limit.min(limits::READDIR_MAX) as usize;
        let mut entries = Vec::new();
        let mut more = false;
        let dot = |name: &[u8], target: Ino, c: u64| -> R<DirEntry> {
            let i = v.inode(target)?;
            Ok(DirEntry {
                name: name.to_vec(),
                ino: target,
                kind: FileType::Directory,
                cookie: c,
                attr: plus.then(|| i.attr(target, &v.chunks)),
            })
        };
        if cookie < 1 {
            entries.push(dot(b".", ino, 1)?);
        }
        if cookie < 2 {
            if entries.len() >= limit {
                more = true;
            } else {
                entries.push(dot(b"..", d.parent, 2)?);
            }
        }
        let from = cookie.saturating_add(1).max(FIRST_COOKIE);
        if !more {
            for ((_, c), name) in v.cookies.range((ino, from)..=(ino, u64::MAX)) {
                if entries.len() >= limit {
                    more = true;
                    break;
                }
                let Some(slot) = v.lookup(ino, name) else {
                    continue;
                };
                let Ok(i) = v.inode(slot.ino) else { continue };
                entries.push(DirEntry {
                    name: name.clone(),
                    ino: slot.ino,
                    kind: i.kind().unwrap_or(FileType::Regular),
                    cookie: *c,
                    attr: plus.then(|| i.attr(slot.ino, &v.chunks)),
                });
            }
        }
        Ok(Reply::Dir { entries, eof: !more })
    }

    pub(crate) fn read_link(&self, vol: VolumeId, ino: Ino) -> OpResult {
        let i = self.vol(vol)?.inode(ino)?;
        if i.mode & mode::S_IFMT != mode::S_IFLNK {
            return Err(Errno::EINVAL);
        }
        Ok(Reply::Data(i.target.clone()))
    }

    pub(crate) fn get_xattr(&self, vol: VolumeId, ino: Ino, name: &[u8]) -> OpResult {
        let i = self.vol(vol)?.inode(ino)?;
        if name.is_empty() || name.len() > limits::XATTR_NAME_MAX {
            return Err(Errno::ERANGE);
        }
        i.xattrs.get(name).map(|v| Reply::Data(v.clone())).ok_or(Errno::ENODATA)
    }

    pub(crate) fn list_xattr(&self, vol: VolumeId, ino: Ino) -> OpResult {
        let i = self.vol(vol)?.inode(ino)?;
        Ok(Reply::Names(i.xattrs.keys().cloned().collect()))
    }

    pub(crate) fn stat_fs(&self, vol: VolumeId) -> OpResult {
        let v = self.vol(vol)?;
        Ok(Reply::StatFs(StatFs {
            used_bytes: v.used_bytes,
            used_inodes: v.inodes.len() as u64,
            total_bytes: u64::MAX,
            total_inodes: u64::MAX,
        }))
    }
}
