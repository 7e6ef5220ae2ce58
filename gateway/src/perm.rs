//! Who makes a request ([`Creds`]) and the permission checks the gateway makes itself. The
//! rules are the state machine's ([`elea_fsm::perm`]): Linux's `generic_permission` (owner,
//! then group, primary or supplementary, then other bits; root may read and write anything and
//! execute anything with an execute bit, and search any directory), the sticky-directory rule
//! and the set-id rules. This module binds them to a request's credentials, whose
//! supplementary groups are read from `/proc` only when a group check needs them (and then at
//! most once per [`GROUPS_TTL`] per process), so every front end (FUSE, NFS) and the state
//! machine enforce the same rules.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use elea_common::Errno;
use elea_fsm::perm::{self as rules, Identity};
use elea_fsm::{Attr, Caller, open_flags};

pub use elea_fsm::perm::{MAY_EXEC, MAY_READ, MAY_WRITE};

/// Who makes a request: its file system user and group, and where to find its supplementary
/// groups (read only when a check needs them).
#[derive(Debug)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    /// The calling process (0 when unknown): its supplementary groups are read from
    /// `/proc/PID/status` the first time a group check needs them.
    pub pid: u32,
    groups: OnceLock<Arc<[u32]>>,
}

impl Creds {
    /// A caller whose supplementary groups are read from `/proc` on demand.
    pub fn new(uid: u32, gid: u32, pid: u32) -> Self {
        Self { uid, gid, pid, groups: OnceLock::new() }
    }

    /// A caller with a known list of supplementary groups.
    pub fn with_groups(uid: u32, gid: u32, groups: Vec<u32>) -> Self {
        let g = OnceLock::new();
        let _ = g.set(groups.into());
        Self { uid, gid, pid: 0, groups: g }
    }

    /// The superuser (for internal work and tests).
    pub fn root() -> Self {
        Self::with_groups(0, 0, Vec::new())
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether the caller is a member of `gid` (primary or supplementary).
    pub fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || self.groups().contains(&gid)
    }

    /// The caller as the state machine checks it (an `As` command): reads the
    /// supplementary groups now if no check has yet (the state machine cannot read `/proc`).
    /// Root's are left out: root passes every check without them.
    pub fn caller(&self) -> Caller {
        let groups = if self.is_root() { Vec::new() } else { self.groups().to_vec() };
        Caller { uid: self.uid, gid: self.gid, groups }
    }

    fn groups(&self) -> &[u32] {
        self.groups.get_or_init(|| GROUPS.get(self.pid, self.uid, self.gid, proc_groups))
    }
}

/// How long a process's supplementary groups, once read, are used for its later requests with
/// the same uid and gid. A process that changes its uid or gid is read again at once; one that
/// calls `setgroups` alone sees the change within this time (as an NFS server's group cache,
/// only much shorter).
pub const GROUPS_TTL: Duration = Duration::from_secs(1);

/// Callers whose groups the cache keeps at most (expired ones are dropped first).
const GROUPS_MAX: usize = 4096;

/// The groups of recent callers, by process: a non-root create or unlink sends its groups to
/// the state machine, and reading `/proc/PID/status` for every request was the larger part of
/// a create's cost on a local stack.
static GROUPS: LazyLock<GroupCache> = LazyLock::new(GroupCache::default);

#[derive(Default)]
struct GroupCache {
    map: Mutex<HashMap<u32, Cached>>,
}

struct Cached {
    uid: u32,
    gid: u32,
    read: Instant,
    groups: Arc<[u32]>,
}

impl GroupCache {
    /// The groups of `pid` acting as `uid`/`gid`: the cached list while it is fresh and the
    /// process still has those ids, otherwise `read(pid)`.
    fn get(&self, pid: u32, uid: u32, gid: u32, read: impl FnOnce(u32) -> Vec<u32>) -> Arc<[u32]> {
        if pid == 0 {
            return Arc::from([]);
        }
        let now = Instant::now();
        if let Some(c) = self.map.lock().unwrap().get(&pid)
            && c.uid == uid
            && c.gid == gid
            && now.duration_since(c.read) < GROUPS_TTL
        {
            return c.groups.clone();
        }
        let groups: Arc<[u32]> = read(pid).into();
        let mut map = self.map.lock().unwrap();
        if map.len() >= GROUPS_MAX {
            map.retain(|_, c| now.duration_since(c.read) < GROUPS_TTL);
            if map.len() >= GROUPS_MAX {
                map.clear();
            }
        }
        map.insert(pid, Cached { uid, gid, read: now, groups: groups.clone() });
        groups
    }
}

impl Identity for Creds {
    fn uid(&self) -> u32 {
        self.uid
    }

    fn in_group(&self, gid: u32) -> bool {
        Creds::in_group(self, gid)
    }
}

/// Supplementary groups of a process, from the `Groups:` line of `/proc/PID/status` (empty
/// when the process is gone or unknown: the check then uses the primary group only).
fn proc_groups(pid: u32) -> Vec<u32> {
    if pid == 0 {
        return Vec::new();
    }
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    s.lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether `c` may access `a` with `want` (a mask of `MAY_*`).
pub fn allowed(c: &Creds, a: &Attr, want: u32) -> bool {
    rules::allowed(c, a, want)
}

/// `EACCES` unless `c` may access `a` with `want`.
pub fn check(c: &Creds, a: &Attr, want: u32) -> Result<(), Errno> {
    rules::check(c, a, want)
}

/// Whether `c` owns `a` or is root (who may chmod, set times explicitly, and so on).
pub fn owner_or_root(c: &Creds, a: &Attr) -> bool {
    rules::owner_or_root(c, a)
}

/// Removing or renaming `victim` out of directory `dir`: in a sticky directory only the
/// victim's owner, the directory's owner or root may (`EPERM` otherwise).
pub fn check_sticky(c: &Creds, dir: &Attr, victim: &Attr) -> Result<(), Errno> {
    rules::check_sticky(c, dir, victim)
}

/// The mode a `chmod` by `c` really sets: an unprivileged caller outside the file's group
/// cannot set S_ISGID (Linux drops the bit silently).
pub fn chmod_mode(c: &Creds, gid: u32, new_mode: u32) -> u32 {
    rules::chmod_mode(c, gid, new_mode)
}

/// May `c` change ownership of `a` to `uid`/`gid` (`None`: unchanged)? Root may do anything;
/// the owner may change the group to one of its groups and "change" the user to itself.
pub fn check_chown(c: &Creds, a: &Attr, uid: Option<u32>, gid: Option<u32>) -> Result<(), Errno> {
    rules::check_chown(c, a, uid, gid)
}

/// The access mask an `open(2)` with `flags` (this host's values) needs.
pub fn open_mask(flags: i32) -> u32 {
    // The rules take Linux's generic flag values; the access modes are the same everywhere,
    // but `O_TRUNC` is not (sparc, alpha), so it is carried over by name.
    let mut f = flags & libc::O_ACCMODE;
    if flags & libc::O_TRUNC != 0 {
        f |= open_flags::O_TRUNC;
    }
    rules::open_mask(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use elea_common::Timespec;
    use elea_fsm::mode;

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

    #[test]
    fn owner_group_other_in_order() {
        // Owner bits apply to the owner even when group or other would allow more.
        let a = attr(mode::S_IFREG | 0o077, 10, 20);
        assert!(!allowed(&Creds::with_groups(10, 20, vec![]), &a, MAY_READ));
        assert!(allowed(&Creds::with_groups(11, 20, vec![]), &a, MAY_READ | MAY_WRITE));
        // Supplementary group membership counts.
        let b = attr(mode::S_IFREG | 0o040, 10, 30);
        assert!(allowed(&Creds::with_groups(11, 20, vec![30]), &b, MAY_READ));
        assert!(!allowed(&Creds::with_groups(11, 20, vec![31]), &b, MAY_READ));
        // Group bits apply to members even when other would allow.
        let c = attr(mode::S_IFREG | 0o604, 10, 30);
        assert!(!allowed(&Creds::with_groups(11, 30, vec![]), &c, MAY_READ));
        assert!(allowed(&Creds::with_groups(11, 31, vec![]), &c, MAY_READ));
    }

    #[test]
    fn root_needs_an_exec_bit_on_files_only() {
        let r = Creds::root();
        assert!(allowed(&r, &attr(mode::S_IFREG, 10, 10), MAY_READ | MAY_WRITE));
        assert!(!allowed(&r, &attr(mode::S_IFREG | 0o644, 10, 10), MAY_EXEC));
        assert!(allowed(&r, &attr(mode::S_IFREG | 0o010, 10, 10), MAY_EXEC));
        assert!(allowed(&r, &attr(mode::S_IFDIR, 10, 10), MAY_EXEC));
    }

    #[test]
    fn sticky_and_chown_rules() {
        let dir = attr(mode::S_IFDIR | 0o1777, 5, 5);
        let file = attr(mode::S_IFREG | 0o644, 6, 6);
        assert_eq!(check_sticky(&Creds::with_groups(7, 7, vec![]), &dir, &file), Err(Errno::EPERM));
        assert!(check_sticky(&Creds::with_groups(6, 7, vec![]), &dir, &file).is_ok());
        assert!(check_sticky(&Creds::with_groups(5, 7, vec![]), &dir, &file).is_ok());
        let owner = Creds::with_groups(6, 6, vec![8]);
        assert!(check_chown(&owner, &file, Some(6), Some(8)).is_ok());
        assert_eq!(check_chown(&owner, &file, None, Some(9)), Err(Errno::EPERM));
        assert_eq!(check_chown(&owner, &file, Some(7), None), Err(Errno::EPERM));
        assert_eq!(check_chown(&Creds::with_groups(7, 6, vec![]), &file, Some(6), None), Err(Errno::EPERM));
        assert_eq!(chmod_mode(&owner, 9, 0o2755), 0o755);
        assert_eq!(chmod_mode(&owner, 8, 0o2755), 0o2755);
    }

    #[test]
    fn groups_are_read_once_per_process_and_ids_while_fresh() {
        let cache = GroupCache::default();
        let reads = std::cell::Cell::new(0);
        let read = |groups: Vec<u32>| {
            let reads = &reads;
            move |_pid| {
                reads.set(reads.get() + 1);
                groups
            }
        };
        assert_eq!(&*cache.get(10, 6, 7, read(vec![8])), &[8]);
        assert_eq!(&*cache.get(10, 6, 7, read(vec![9])), &[8], "fresh: not read again");
        assert_eq!(reads.get(), 1);
        // Another uid or gid for the same process (setuid, newgrp) is read at once.
        assert_eq!(&*cache.get(10, 5, 7, read(vec![9])), &[9]);
        assert_eq!(&*cache.get(10, 5, 6, read(vec![1])), &[1]);
        assert_eq!(reads.get(), 3);
        // Another process is read; an unknown one has none.
        assert_eq!(&*cache.get(11, 5, 6, read(vec![2])), &[2]);
        assert!(cache.get(0, 5, 6, read(vec![3])).is_empty());
        assert_eq!(reads.get(), 4);
        // An old entry is read again.
        cache.map.lock().unwrap().get_mut(&11).unwrap().read -= GROUPS_TTL;
        assert_eq!(&*cache.get(11, 5, 6, read(vec![4])), &[4]);
        // The cache stays bounded.
        for pid in 100..100 + GROUPS_MAX as u32 + 10 {
            cache.get(pid, 1, 1, |_| vec![]);
        }
        assert!(cache.map.lock().unwrap().len() <= GROUPS_MAX);
    }

    #[test]
    fn caller_carries_the_groups_and_open_mask_reads_host_flags() {
        let c = Creds::with_groups(6, 7, vec![8, 9]);
        assert_eq!(c.caller(), Caller { uid: 6, gid: 7, groups: vec![8, 9] });
        assert_eq!(Creds::root().caller(), Caller { uid: 0, gid: 0, groups: vec![] });
        // A process that is not there has no supplementary groups.
        assert_eq!(Creds::new(6, 7, 0).caller().groups, Vec::<u32>::new());
        // The rules agree whichever way the caller is given.
        let a = attr(mode::S_IFDIR | 0o070, 1, 9);
        assert!(allowed(&c, &a, MAY_WRITE | MAY_EXEC));
        assert!(elea_fsm::perm::allowed(&c.caller(), &a, MAY_WRITE | MAY_EXEC));
        assert_eq!(open_mask(libc::O_RDONLY), MAY_READ);
        assert_eq!(open_mask(libc::O_WRONLY), MAY_WRITE);
        assert_eq!(open_mask(libc::O_RDWR | libc::O_CREAT), MAY_READ | MAY_WRITE);
        assert_eq!(open_mask(libc::O_RDONLY | libc::O_TRUNC), MAY_READ | MAY_WRITE);
    }
}
