//! Linux's file permission rules, written once for every place that enforces them: the state
//! machine when it applies an [`Op::As`](crate::Op::As), and the gateway for the checks it
//! makes on its own (opening files, changing attributes, `access(2)`, xattrs).
//!
//! The rules are `generic_permission`'s: owner bits for the owner, else group bits for a
//! member of the file's group (primary or supplementary), else other bits; root may read and
//! write anything and execute anything with some execute bit (and search any directory). Here
//! too: the sticky-directory rule for removing and renaming, who may chmod and chown, and the
//! access an `open(2)` needs. Everything is a pure function of the caller and the attributes;
//! who is calling is anything that implements [`Identity`], so a caller whose supplementary
//! groups are expensive to learn needs them only when a group check is reached.

use elea_common::Errno;

use crate::types::{Attr, Caller, FileType, mode, open_flags};

/// Read, write and execute (search) permission bits, as in `access(2)`'s mask.
pub const MAY_READ: u32 = 4;
pub const MAY_WRITE: u32 = 2;
pub const MAY_EXEC: u32 = 1;

/// Who is calling, as the permission rules see it.
pub trait Identity {
    /// File system user id.
    fn uid(&self) -> u32;
    /// Whether the caller is a member of `gid` (primary or supplementary group).
    fn in_group(&self, gid: u32) -> bool;
    /// The superuser.
    fn is_root(&self) -> bool {
        self.uid() == 0
    }
}

impl Identity for Caller {
    fn uid(&self) -> u32 {
        self.uid
    }

    fn in_group(&self, gid: u32) -> bool {
        Caller::in_group(self, gid)
    }
}

fn is_dir(a: &Attr) -> bool {
    a.file_type() == Some(FileType::Directory)
}

/// Whether `c` may access `a` with `want` (a mask of `MAY_*`).
pub fn allowed<C: Identity + ?Sized>(c: &C, a: &Attr, want: u32) -> bool {
    if want == 0 {
        return true;
    }
    if c.is_root() {
        // Root bypasses read and write checks; execute needs some execute bit, except on
        // directories (search).
        return want & MAY_EXEC == 0 || is_dir(a) || a.mode & 0o111 != 0;
    }
    // The first class that matches decides, even when a later one would grant more.
    let bits = if c.uid() == a.uid {
        a.mode >> 6
    } else if c.in_group(a.gid) {
        a.mode >> 3
    } else {
        a.mode
    } & 7;
    bits & want == want
}

/// `EACCES` unless `c` may access `a` with `want`.
pub fn check<C: Identity + ?Sized>(c: &C, a: &Attr, want: u32) -> Result<(), Errno> {
    if allowed(c, a, want) { Ok(()) } else { Err(Errno::EACCES) }
}

/// Whether `c` owns `a` or is root (who may chmod, set times explicitly, and so on).
pub fn owner_or_root<C: Identity + ?Sized>(c: &C, a: &Attr) -> bool {
    c.is_root() || c.uid() == a.uid
}

/// Removing or renaming `victim` out of directory `dir`: in a sticky directory only the
/// victim's owner, the directory's owner or root may (`EPERM` otherwise).
pub fn check_sticky<C: Identity + ?Sized>(c: &C, dir: &Attr, victim: &Attr) -> Result<(), Errno> {
    if dir.mode & mode::S_ISVTX == 0 || c.is_root() || c.uid() == victim.uid || c.uid() == dir.uid {
        Ok(())
    } else {
        Err(Errno::EPERM)
    }
}

/// The mode a `chmod` by `c` really sets: an unprivileged caller outside the file's group
/// cannot set S_ISGID (Linux drops the bit silently).
pub fn chmod_mode<C: Identity + ?Sized>(c: &C, gid: u32, new_mode: u32) -> u32 {
    if !c.is_root() && !c.in_group(gid) { new_mode & !mode::S_ISGID } else { new_mode }
}

/// May `c` change ownership of `a` to `uid`/`gid` (`None`: unchanged)? Root may do anything;
/// the owner may change the group to one of its groups and "change" the user to itself.
pub fn check_chown<C: Identity + ?Sized>(
    c: &C,
    a: &Attr,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), Errno> {
    if c.is_root() {
        return Ok(());
    }
    if let Some(u) = uid
        && (u != a.uid || c.uid() != a.uid)
    {
        return Err(Errno::EPERM);
    }
    if let Some(g) = gid
        && (c.uid() != a.uid || (g != a.gid && !c.in_group(g)))
    {
        return Err(Errno::EPERM);
    }
    Ok(())
}

/// The access mask an `open(2)` with `flags` ([`open_flags`] values) needs: the access mode's,
/// plus write for `O_TRUNC`.
pub fn open_mask(flags: i32) -> u32 {
    let acc = match flags & open_flags::O_ACCMODE {
        open_flags::O_RDONLY => MAY_READ,
        open_flags::O_WRONLY => MAY_WRITE,
        _ => MAY_READ | MAY_WRITE,
    };
    if flags & open_flags::O_TRUNC != 0 { acc | MAY_WRITE } else { acc }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elea_common::Timespec;

    fn attr(mode_: u32, uid: u32, gid: u32) -> Attr {
        Attr {
            ino: 2,
            mode: mode_,
            uid,
            gid,
            nlink: 1,
            size: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            rdev: 0,
            generation: 1,
            flags: 0,
            blocks: 0,
        }
    }

    fn who(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        Caller { uid, gid, groups: groups.to_vec() }
    }

    #[test]
    fn owner_group_other_in_order() {
        // Owner bits apply to the owner even when group or other would allow more.
        let a = attr(mode::S_IFREG | 0o077, 10, 20);
        assert!(!allowed(&who(10, 20, &[]), &a, MAY_READ));
        assert!(allowed(&who(11, 20, &[]), &a, MAY_READ | MAY_WRITE));
        // Supplementary group membership counts.
        let b = attr(mode::S_IFREG | 0o040, 10, 30);
        assert!(allowed(&who(11, 20, &[30]), &b, MAY_READ));
        assert!(!allowed(&who(11, 20, &[31]), &b, MAY_READ));
        // Group bits apply to members even when other would allow.
        let c = attr(mode::S_IFREG | 0o604, 10, 30);
        assert!(!allowed(&who(11, 30, &[]), &c, MAY_READ));
        assert!(!allowed(&who(11, 1, &[30]), &c, MAY_READ));
        assert!(allowed(&who(11, 31, &[]), &c, MAY_READ));
    }

    #[test]
    fn every_bit_of_a_mask_is_needed() {
        let d = attr(mode::S_IFDIR | 0o751, 10, 20);
        assert!(allowed(&who(10, 1, &[]), &d, MAY_READ | MAY_WRITE | MAY_EXEC));
        assert!(allowed(&who(11, 20, &[]), &d, MAY_READ | MAY_EXEC));
        assert!(!allowed(&who(11, 20, &[]), &d, MAY_WRITE | MAY_EXEC));
        assert!(allowed(&who(11, 21, &[]), &d, MAY_EXEC));
        assert!(!allowed(&who(11, 21, &[]), &d, MAY_READ));
        assert_eq!(check(&who(11, 21, &[]), &d, MAY_WRITE), Err(Errno::EACCES));
        assert_eq!(check(&who(10, 21, &[]), &d, MAY_WRITE), Ok(()));
        // An empty mask is always allowed, even with no bits at all.
        assert!(allowed(&who(11, 21, &[]), &attr(mode::S_IFREG, 10, 20), 0));
    }

    #[test]
    fn root_needs_an_exec_bit_on_files_only() {
        let r = Caller::default();
        assert!(r.is_root());
        assert!(allowed(&r, &attr(mode::S_IFREG, 10, 10), MAY_READ | MAY_WRITE));
        assert!(!allowed(&r, &attr(mode::S_IFREG | 0o644, 10, 10), MAY_EXEC));
        assert!(allowed(&r, &attr(mode::S_IFREG | 0o010, 10, 10), MAY_EXEC));
        assert!(allowed(&r, &attr(mode::S_IFDIR, 10, 10), MAY_EXEC | MAY_WRITE | MAY_READ));
    }

    #[test]
    fn sticky_rule() {
        let dir = attr(mode::S_IFDIR | 0o1777, 5, 5);
        let file = attr(mode::S_IFREG | 0o644, 6, 6);
        assert_eq!(check_sticky(&who(7, 7, &[]), &dir, &file), Err(Errno::EPERM));
        // Group membership of the file or the directory does not help.
        assert_eq!(check_sticky(&who(7, 6, &[5]), &dir, &file), Err(Errno::EPERM));
        assert!(check_sticky(&who(6, 7, &[]), &dir, &file).is_ok());
        assert!(check_sticky(&who(5, 7, &[]), &dir, &file).is_ok());
        assert!(check_sticky(&who(0, 7, &[]), &dir, &file).is_ok());
        // Without the sticky bit anyone passes (write permission is checked separately).
        let plain = attr(mode::S_IFDIR | 0o777, 5, 5);
        assert!(check_sticky(&who(7, 7, &[]), &plain, &file).is_ok());
    }

    #[test]
    fn chown_and_chmod_rules() {
        let file = attr(mode::S_IFREG | 0o644, 6, 6);
        let owner = who(6, 6, &[8]);
        assert!(check_chown(&owner, &file, Some(6), Some(8)).is_ok());
        assert!(check_chown(&owner, &file, None, Some(6)).is_ok());
        assert_eq!(check_chown(&owner, &file, None, Some(9)), Err(Errno::EPERM));
        assert_eq!(check_chown(&owner, &file, Some(7), None), Err(Errno::EPERM));
        assert_eq!(check_chown(&who(7, 6, &[]), &file, Some(6), None), Err(Errno::EPERM));
        assert_eq!(check_chown(&who(7, 6, &[]), &file, None, Some(6)), Err(Errno::EPERM));
        assert!(check_chown(&who(0, 0, &[]), &file, Some(7), Some(9)).is_ok());
        assert!(owner_or_root(&owner, &file));
        assert!(owner_or_root(&who(0, 1, &[]), &file));
        assert!(!owner_or_root(&who(7, 6, &[]), &file));
        assert_eq!(chmod_mode(&owner, 9, 0o2755), 0o755);
        assert_eq!(chmod_mode(&owner, 8, 0o2755), 0o2755);
        assert_eq!(chmod_mode(&owner, 6, 0o2755), 0o2755);
        assert_eq!(chmod_mode(&who(0, 0, &[]), 9, 0o2755), 0o2755);
    }

    #[test]
    fn open_masks() {
        use open_flags::*;
        assert_eq!(open_mask(O_RDONLY), MAY_READ);
        assert_eq!(open_mask(O_WRONLY), MAY_WRITE);
        assert_eq!(open_mask(O_RDWR), MAY_READ | MAY_WRITE);
        assert_eq!(open_mask(O_RDONLY | O_TRUNC), MAY_READ | MAY_WRITE);
        assert_eq!(open_mask(O_WRONLY | O_TRUNC), MAY_WRITE);
        // O_ACCMODE itself (3) is not a valid mode; Linux treats it as read and write.
        assert_eq!(open_mask(O_ACCMODE), MAY_READ | MAY_WRITE);
    }

    #[test]
    fn a_lazy_identity_is_asked_for_groups_only_when_needed() {
        use std::cell::Cell;

        struct Lazy {
            uid: u32,
            asked: Cell<u32>,
        }
        impl Identity for Lazy {
            fn uid(&self) -> u32 {
                self.uid
            }
            fn in_group(&self, gid: u32) -> bool {
                self.asked.set(self.asked.get() + 1);
                gid == 20
            }
        }
        let a = attr(mode::S_IFREG | 0o640, 10, 20);
        let owner = Lazy { uid: 10, asked: Cell::new(0) };
        assert!(allowed(&owner, &a, MAY_READ | MAY_WRITE));
        let root = Lazy { uid: 0, asked: Cell::new(0) };
        assert!(allowed(&root, &a, MAY_WRITE));
        assert_eq!(owner.asked.get() + root.asked.get(), 0);
        let member = Lazy { uid: 11, asked: Cell::new(0) };
        assert!(allowed(&member, &a, MAY_READ));
        assert!(!allowed(&member, &a, MAY_WRITE));
        assert_eq!(member.asked.get(), 2);
    }
}
