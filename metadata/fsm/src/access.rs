//! [`Op::As`]: whether a caller may perform a namespace op, decided against the current state
//! in the same apply that performs it, so no other command can change the answer in between.
//!
//! The checks run in the order Linux's `fs/namei.c` makes them, because that order decides
//! which errno a caller sees when several apply: the path walk's search permission on each
//! parent (`EACCES` before anything about the name), then the name, then the entry itself
//! (`EEXIST` or `ENOENT` before a missing write permission), then `may_create` or
//! `may_delete` (write and search on the directory, then the sticky bit). The structural
//! errors met on the way (a missing parent, a bad name) are the ones the op gives on its own.
//! Nothing here changes the state: a refused op leaves it as it was.

use elea_common::{Errno, Ino};

use crate::namespace::{RenameEnds, check_name, check_rename_flags};
use crate::perm::{self, MAY_EXEC, MAY_WRITE};
use crate::state::{State, Volume};
use crate::types::{Attr, Caller, Op, limits, mode, rename_flags};

type R<T> = Result<T, Errno>;

impl State {
    /// Whether `caller` may perform `op` now. `Ok` means the op's own answer stands (it may
    /// still refuse for a reason of its own); an op `As` does not carry is `EINVAL`.
    pub(crate) fn check_as(&self, caller: &Caller, op: &Op) -> R<()> {
        if caller.groups.len() > limits::GROUPS_MAX {
            return Err(Errno::EINVAL);
        }
        match op {
            Op::Mknod { vol, parent, name, mode: m, exclusive, .. } => {
                let v = self.vol(*vol)?;
                let dir = search(v, caller, *parent)?;
                check_name(name)?;
                if v.lookup(*parent, name).is_some() {
                    // O_CREAT without O_EXCL opens an existing file: the open's own permission
                    // is checked on the attributes the op returns.
                    return if *exclusive { Err(Errno::EEXIST) } else { Ok(()) };
                }
                perm::check(caller, &dir, MAY_WRITE | MAY_EXEC)?;
                let t = m & mode::S_IFMT;
                if (t == mode::S_IFCHR || t == mode::S_IFBLK) && !caller.is_root() {
                    return Err(Errno::EPERM);
                }
                Ok(())
            }
            Op::Mkdir { vol, parent, name, .. } => may_create(self.vol(*vol)?, caller, *parent, name),
            Op::Symlink { vol, parent, name, target, .. } => {
                let v = self.vol(*vol)?;
                // The target is read before the path is walked.
                if target.is_empty() {
                    return Err(Errno::ENOENT);
                }
                if target.len() > limits::SYMLINK_MAX {
                    return Err(Errno::ENAMETOOLONG);
                }
                may_create(v, caller, *parent, name)
            }
            Op::Link { vol, ino, new_parent, new_name } => {
                let v = self.vol(*vol)?;
                // A directory source is the op's EPERM, after the checks on the new name.
                v.inode(*ino)?;
                may_create(v, caller, *new_parent, new_name)
            }
            Op::Unlink { vol, parent, name } | Op::Rmdir { vol, parent, name } => {
                let v = self.vol(*vol)?;
                let dir = search(v, caller, *parent)?;
                check_name(name)?;
                let victim = v.lookup(*parent, name).ok_or(Errno::ENOENT)?;
                may_delete(v, caller, &dir, victim.ino)
            }
            Op::Rename { vol, parent, name, new_parent, new_name, flags } => {
                may_rename(self.vol(*vol)?, caller, *parent, name, *new_parent, new_name, *flags)
            }
            _ => Err(Errno::EINVAL),
        }
    }
}

fn attr_of(v: &Volume, ino: Ino) -> R<Attr> {
    v.attr(ino)
}

/// The path walk reaching into `dir`: it must be a live directory the caller may search.
fn search(v: &Volume, c: &Caller, dir: Ino) -> R<Attr> {
    let a = v.live_dir(dir)?.attr(dir, &v.chunks);
    perm::check(c, &a, MAY_EXEC)?;
    Ok(a)
}

/// Creating `parent/name`: the name must be free (`EEXIST` wins over a missing permission),
/// then the caller needs write and search permission on the parent.
fn may_create(v: &Volume, c: &Caller, parent: Ino, name: &[u8]) -> R<()> {
    let dir = search(v, c, parent)?;
    check_name(name)?;
    if v.lookup(parent, name).is_some() {
        return Err(Errno::EEXIST);
    }
    perm::check(c, &dir, MAY_WRITE | MAY_EXEC)
}

/// Removing `victim` from directory `dir` (or replacing it): write and search permission on
/// the directory, then the sticky-bit rule.
fn may_delete(v: &Volume, c: &Caller, dir: &Attr, victim: Ino) -> R<()> {
    perm::check(c, dir, MAY_WRITE | MAY_EXEC)?;
    perm::check_sticky(c, dir, &attr_of(v, victim)?)
}

/// `renameat2` as `vfs_rename` checks it: both parents walked, the rename itself validated,
/// then the source removed from its parent and the destination created in (or removed from)
/// the new parent; a directory that changes parents needs write permission on itself, as
/// its ".." is rewritten (with `RENAME_EXCHANGE`, so does a destination directory).
fn may_rename(v: &Volume, c: &Caller, p1: Ino, n1: &[u8], p2: Ino, n2: &[u8], flags: u32) -> R<()> {
    check_rename_flags(flags)?;
    let d1 = search(v, c, p1)?;
    let d2 = search(v, c, p2)?;
    let RenameEnds { src, src_dir, dst } = v.rename_ends(p1, n1, p2, n2, flags)?;
    let exchange = flags & rename_flags::RENAME_EXCHANGE != 0;
    if let Some((d, _, _)) = dst
        && d == src
    {
        // Two links to one inode: Linux renames nothing and checks nothing more.
        return Ok(());
    }
    may_delete(v, c, &d1, src)?;
    match dst {
        None => perm::check(c, &d2, MAY_WRITE | MAY_EXEC)?,
        Some((d, d_dir, _)) => {
            may_delete(v, c, &d2, d)?;
            // Replacing needs matching types; `may_delete` says so before the ".." check.
            if !exchange && d_dir != src_dir {
                return Err(if src_dir { Errno::ENOTDIR } else { Errno::EISDIR });
            }
        }
    }
    if p1 != p2 {
        if src_dir {
            perm::check(c, &attr_of(v, src)?, MAY_WRITE)?;
        }
        if exchange && let Some((d, true, _)) = dst {
            perm::check(c, &attr_of(v, d)?, MAY_WRITE)?;
        }
    }
    Ok(())
}
