//! `Op::As`: the state machine checks that a caller may perform a namespace op, with Linux's
//! rules and errno precedence, in the same apply that performs it. An allowed op gives the same
//! reply, changes and state as the op alone; a refused one changes nothing.

mod common;

use common::*;
use elea_common::{Errno, Ino, Timespec, VolumeId};
use elea_fsm::rename_flags::{RENAME_EXCHANGE, RENAME_NOREPLACE};
use elea_fsm::*;

/// The volume `H::new` creates.
const VOL: VolumeId = 1;

/// The group the test directories belong to.
const GROUP: u32 = 300;

/// Owns the test directories.
fn owner() -> Caller {
    Caller { uid: 100, gid: 100, groups: vec![] }
}

/// In `GROUP` as its primary group.
fn member() -> Caller {
    Caller { uid: 200, gid: GROUP, groups: vec![] }
}

/// In `GROUP` through its supplementary groups.
fn supplementary() -> Caller {
    Caller { uid: 201, gid: 201, groups: vec![7, GROUP] }
}

/// Neither owner nor in the group.
fn other() -> Caller {
    Caller { uid: 400, gid: 400, groups: vec![401] }
}

fn root() -> Caller {
    Caller { uid: 0, gid: 0, groups: vec![7] }
}

fn as_(c: &Caller, op: Op) -> Op {
    Op::As { caller: c.clone(), op: Box::new(op) }
}

/// Directory `parent/name` with exactly these owner, group and permission bits.
fn dir(h: &mut H, parent: Ino, name: &str, uid: u32, gid: u32, perm: u32) -> Ino {
    let vol = h.vol;
    entry_ino(h.ok(Op::Mkdir { vol, parent, name: name.into(), mode: perm, uid, gid, ino: None }))
}

/// Regular file `parent/name` with these owner, group and permission bits.
fn file(h: &mut H, parent: Ino, name: &str, uid: u32, gid: u32, perm: u32) -> Ino {
    let vol = h.vol;
    entry_ino(h.ok(Op::Mknod {
        vol,
        parent,
        name: name.into(),
        mode: mode::S_IFREG | perm,
        uid,
        gid,
        rdev: 0,
        exclusive: true,
        ino: None,
        session: None,
    }))
}

fn chmod(h: &mut H, ino: Ino, perm: u32) {
    let vol = h.vol;
    h.ok(Op::SetAttr { vol, ino, set: SetAttr { mode: Some(perm), ..SetAttr::default() } });
}

fn mknod(parent: Ino, name: &str, m: u32, exclusive: bool) -> Op {
    Op::Mknod {
        vol: VOL,
        parent,
        name: name.into(),
        mode: m,
        uid: 9,
        gid: 9,
        rdev: 0x0801,
        exclusive,
        ino: None,
        session: None,
    }
}

fn mkdir(parent: Ino, name: &str) -> Op {
    Op::Mkdir { vol: VOL, parent, name: name.into(), mode: 0o755, uid: 9, gid: 9, ino: None }
}

fn symlink(parent: Ino, name: &str) -> Op {
    Op::Symlink { vol: VOL, parent, name: name.into(), target: b"t".to_vec(), uid: 9, gid: 9, ino: None }
}

fn link(ino: Ino, new_parent: Ino, new_name: &str) -> Op {
    Op::Link { vol: VOL, ino, new_parent, new_name: new_name.into() }
}

fn unlink(parent: Ino, name: &str) -> Op {
    Op::Unlink { vol: VOL, parent, name: name.into() }
}

fn rmdir(parent: Ino, name: &str) -> Op {
    Op::Rmdir { vol: VOL, parent, name: name.into() }
}

fn rename(parent: Ino, name: &str, new_parent: Ino, new_name: &str, flags: u32) -> Op {
    Op::Rename { vol: VOL, parent, name: name.into(), new_parent, new_name: new_name.into(), flags }
}

/// Applies `op` as `c`, which must succeed: the reply, the change sets and the resulting state
/// are exactly those of `op` applied alone.
fn allow(h: &mut H, c: &Caller, op: Op) -> Reply {
    let mut alone = h.sm.clone();
    h.t += 1;
    let plain = h.command(op.clone());
    let wrapped = h.command(as_(c, op));
    let want = alone.apply(&plain);
    let got = h.sm.apply(&wrapped);
    assert_eq!(got, want, "as {c:?}: {:?}", plain.op);
    assert_eq!(h.sm.snapshot(), alone.snapshot(), "as {c:?}: {:?}", plain.op);
    match got.0 {
        Ok(r) => r,
        Err(e) => panic!("as {c:?}: {:?} failed: {e:?}", plain.op),
    }
}

/// Applies `op` as `c`, which must be refused; the state must be byte-identical afterwards.
fn deny(h: &mut H, c: &Caller, op: Op) -> Errno {
    h.err(as_(c, op))
}

/// `op` as `c` must fail exactly as `op` alone fails (the op's own answer, not a permission's).
fn same_error(h: &mut H, c: &Caller, op: Op) -> Errno {
    let mut alone = h.sm.clone();
    let plain = Command { time: Timespec::new(h.t + 1, 0), ..h.command(op.clone()) };
    let want = alone.apply(&plain).0.expect_err("the op alone must fail");
    assert_eq!(deny(h, c, op), want, "as {c:?}");
    want
}

// ---------- creating ----------

/// Who may create in a directory of the test group with `perm`.
fn creators(perm: u32) -> Vec<(Caller, bool)> {
    let (u, g, o) = (perm >> 6 & 3 == 3, perm >> 3 & 3 == 3, perm & 3 == 3);
    vec![(owner(), u), (member(), g), (supplementary(), g), (other(), o), (root(), true)]
}

#[test]
fn create_follows_owner_then_group_then_other() {
    let mut h = H::new();
    // Each class's bits decide for it alone: 0o753 lets others create but not group members.
    for (i, perm) in [0o700, 0o070, 0o007, 0o730, 0o753, 0o357, 0o000, 0o777].into_iter().enumerate() {
        let d = dir(&mut h, ROOT, &format!("d{i}"), 100, GROUP, perm);
        let src = file(&mut h, ROOT, &format!("src{i}"), 9, 9, 0o644);
        for (j, (c, ok)) in creators(perm).into_iter().enumerate() {
            let ops = [
                mknod(d, &format!("f{j}"), mode::S_IFREG | 0o644, true),
                mknod(d, &format!("p{j}"), mode::S_IFIFO | 0o644, false),
                mkdir(d, &format!("m{j}")),
                symlink(d, &format!("s{j}")),
                link(src, d, &format!("l{j}")),
            ];
            for op in ops {
                if ok {
                    assert!(matches!(allow(&mut h, &c, op), Reply::Entry { created: true, .. }));
                } else {
                    assert_eq!(deny(&mut h, &c, op.clone()), Errno::EACCES, "{perm:o} {c:?} {op:?}");
                }
            }
        }
    }
}

#[test]
fn search_permission_comes_first() {
    let mut h = H::new();
    // Write but no search permission for the owner: the walk into the directory stops first.
    let d = dir(&mut h, ROOT, "d", 100, GROUP, 0o600);
    file(&mut h, d, "there", 100, 100, 0o644);
    dir(&mut h, d, "sub", 100, 100, 0o777);
    let f = file(&mut h, ROOT, "f", 100, 100, 0o644);
    let c = owner();
    // EACCES, not EEXIST (the name exists) ...
    assert_eq!(deny(&mut h, &c, mknod(d, "there", mode::S_IFREG, true)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, mknod(d, "there", mode::S_IFREG, false)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, mkdir(d, "there")), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, symlink(d, "there")), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, link(f, d, "there")), Errno::EACCES);
    // ... not ENOENT (the name is missing) ...
    assert_eq!(deny(&mut h, &c, unlink(d, "missing")), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rmdir(d, "missing")), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(d, "missing", ROOT, "x", 0)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(ROOT, "f", d, "x", 0)), Errno::EACCES);
    // ... and not a bad name.
    assert_eq!(deny(&mut h, &c, mkdir(d, "")), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, unlink(d, "a/b")), Errno::EACCES);
    // Root searches any directory: the op's own answers come through.
    assert_eq!(same_error(&mut h, &root(), mkdir(d, "there")), Errno::EEXIST);
    assert_eq!(same_error(&mut h, &root(), unlink(d, "missing")), Errno::ENOENT);
    assert_eq!(same_error(&mut h, &root(), unlink(d, "sub")), Errno::EISDIR);
    // The old parent is walked before the new one.
    let e = dir(&mut h, ROOT, "e", 100, GROUP, 0o777);
    file(&mut h, e, "g", 100, 100, 0o644);
    assert_eq!(deny(&mut h, &c, rename(d, "missing", e, "x", 0)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(e, "g", 999, "x", 0)), Errno::ENOENT);
    assert_eq!(deny(&mut h, &c, rename(999, "g", d, "x", 0)), Errno::ENOENT);
}

#[test]
fn missing_parents_and_volumes_give_the_ops_own_errors() {
    let mut h = H::new();
    let f = file(&mut h, ROOT, "f", 100, 100, 0o644);
    let d = dir(&mut h, ROOT, "d", 100, 100, 0o777);
    let c = other();
    for op in [
        mknod(999, "x", mode::S_IFREG, true),
        mkdir(999, "x"),
        symlink(999, "x"),
        link(f, 999, "x"),
        link(999, d, "x"),
        unlink(999, "x"),
        rmdir(999, "x"),
        rename(999, "x", ROOT, "y", 0),
    ] {
        assert_eq!(same_error(&mut h, &c, op), Errno::ENOENT);
    }
    for op in [mkdir(f, "x"), unlink(f, "x"), rename(ROOT, "f", f, "y", 0)] {
        assert_eq!(same_error(&mut h, &c, op), Errno::ENOTDIR);
    }
    let mut op = mkdir(d, "x");
    if let Op::Mkdir { vol, .. } = &mut op {
        *vol = 77;
    }
    assert_eq!(same_error(&mut h, &c, op), Errno::ENODEV);
    // A removed directory is gone for creates in it too.
    h.ok(rmdir(ROOT, "d"));
    assert_eq!(same_error(&mut h, &root(), mkdir(d, "x")), Errno::ENOENT);
    // Symlink targets are read before the walk.
    let Op::Symlink { vol, .. } = symlink(ROOT, "s") else { unreachable!() };
    let bad = |target: Vec<u8>| Op::Symlink {
        vol,
        parent: ROOT,
        name: b"s".to_vec(),
        target,
        uid: 9,
        gid: 9,
        ino: None,
    };
    assert_eq!(same_error(&mut h, &c, bad(vec![])), Errno::ENOENT);
    assert_eq!(same_error(&mut h, &c, bad(vec![b'x'; limits::SYMLINK_MAX + 1])), Errno::ENAMETOOLONG);
}

#[test]
fn an_existing_name_wins_over_write_permission() {
    let mut h = H::new();
    // Searchable but not writable by anyone but root.
    let d = dir(&mut h, ROOT, "d", 100, GROUP, 0o555);
    let there = file(&mut h, d, "there", 100, 100, 0o644);
    dir(&mut h, d, "sub", 100, 100, 0o755);
    let f = file(&mut h, ROOT, "f", 100, 100, 0o644);
    for c in [owner(), member(), supplementary(), other()] {
        assert_eq!(deny(&mut h, &c, mknod(d, "there", mode::S_IFREG, true)), Errno::EEXIST);
        assert_eq!(deny(&mut h, &c, mknod(d, "there", mode::S_IFCHR, true)), Errno::EEXIST);
        assert_eq!(deny(&mut h, &c, mkdir(d, "there")), Errno::EEXIST);
        assert_eq!(deny(&mut h, &c, symlink(d, "sub")), Errno::EEXIST);
        assert_eq!(deny(&mut h, &c, link(f, d, "there")), Errno::EEXIST);
        // O_CREAT without O_EXCL opens the existing file: its open permission is the gateway's.
        let Reply::Entry { attr, created } = allow(&mut h, &c, mknod(d, "there", mode::S_IFREG, false))
        else {
            panic!()
        };
        assert_eq!((attr.ino, created), (there, false));
        assert_eq!(same_error(&mut h, &c, mknod(d, "sub", mode::S_IFREG, false)), Errno::EISDIR);
        // A new name needs write permission.
        assert_eq!(deny(&mut h, &c, mknod(d, "new", mode::S_IFREG, false)), Errno::EACCES);
        assert_eq!(deny(&mut h, &c, mkdir(d, "new")), Errno::EACCES);
        assert_eq!(deny(&mut h, &c, symlink(d, "new")), Errno::EACCES);
        assert_eq!(deny(&mut h, &c, link(f, d, "new")), Errno::EACCES);
        // A missing victim is ENOENT before the write check.
        assert_eq!(deny(&mut h, &c, unlink(d, "new")), Errno::ENOENT);
        assert_eq!(deny(&mut h, &c, rmdir(d, "new")), Errno::ENOENT);
        assert_eq!(deny(&mut h, &c, rename(d, "new", d, "x", 0)), Errno::ENOENT);
        assert_eq!(deny(&mut h, &c, unlink(d, "there")), Errno::EACCES);
    }
    // A non-exclusive Mknod with a session opens the existing file for it.
    let s = h.session(60_000);
    let Op::Mknod { vol, .. } = mknod(d, "there", 0, false) else { unreachable!() };
    let op = Op::Mknod {
        vol,
        parent: d,
        name: b"there".to_vec(),
        mode: mode::S_IFREG | 0o600,
        uid: 400,
        gid: 400,
        rdev: 0,
        exclusive: false,
        ino: None,
        session: Some(s),
    };
    allow(&mut h, &other(), op);
    let Ok(Reply::SessionInfo { open, .. }) = h.q(Query::SessionInfo { session: s }) else { panic!() };
    assert_eq!(open, vec![(h.vol, there, 1)]);
}

#[test]
fn link_rules() {
    let mut h = H::new();
    let d = dir(&mut h, ROOT, "d", 100, GROUP, 0o775);
    let sub = dir(&mut h, ROOT, "sub", 400, 400, 0o777);
    let f = file(&mut h, ROOT, "f", 9, 9, 0o600);
    // The source's own permissions do not matter (no protected hard links here), only the
    // new parent's.
    allow(&mut h, &member(), link(f, d, "a"));
    assert_eq!(deny(&mut h, &other(), link(f, d, "b")), Errno::EACCES);
    // A directory source is the op's EPERM, but only once the caller may write the parent.
    assert_eq!(deny(&mut h, &other(), link(sub, d, "b")), Errno::EACCES);
    assert_eq!(same_error(&mut h, &member(), link(sub, d, "b")), Errno::EPERM);
    assert_eq!(same_error(&mut h, &root(), link(sub, d, "b")), Errno::EPERM);
    assert_eq!(same_error(&mut h, &member(), link(999, d, "b")), Errno::ENOENT);
    // An unlinked source (kept by an open) cannot get a name back.
    let s = h.session(60_000);
    let vol = h.vol;
    h.ok(Op::Open { vol, ino: f, session: s });
    h.ok(unlink(ROOT, "f"));
    h.ok(unlink(d, "a"));
    assert_eq!(same_error(&mut h, &member(), link(f, d, "b")), Errno::ENOENT);
}

#[test]
fn devices_need_root() {
    let mut h = H::new();
    let d = dir(&mut h, ROOT, "d", 100, GROUP, 0o777);
    let ro = dir(&mut h, ROOT, "ro", 100, GROUP, 0o755);
    for c in [owner(), member(), supplementary(), other()] {
        assert_eq!(deny(&mut h, &c, mknod(d, "c", mode::S_IFCHR | 0o600, true)), Errno::EPERM);
        assert_eq!(deny(&mut h, &c, mknod(d, "b", mode::S_IFBLK | 0o600, false)), Errno::EPERM);
    }
    // Write permission on the parent is checked first.
    assert_eq!(deny(&mut h, &other(), mknod(ro, "c", mode::S_IFCHR, true)), Errno::EACCES);
    // Other node types are fine for anyone allowed to write.
    for (i, t) in [mode::S_IFREG, mode::S_IFIFO, mode::S_IFSOCK, 0].into_iter().enumerate() {
        allow(&mut h, &other(), mknod(d, &format!("n{i}"), t | 0o644, true));
    }
    let Reply::Entry { attr, .. } = allow(&mut h, &root(), mknod(ro, "c", mode::S_IFCHR | 0o600, true))
    else {
        panic!()
    };
    assert_eq!((attr.mode, attr.rdev), (mode::S_IFCHR | 0o600, 0x0801));
    allow(&mut h, &root(), mknod(ro, "b", mode::S_IFBLK | 0o600, true));
    // A type the op refuses is its own EINVAL.
    assert_eq!(same_error(&mut h, &other(), mknod(d, "x", mode::S_IFDIR, true)), Errno::EINVAL);
}

// ---------- removing ----------

#[test]
fn unlink_and_rmdir_need_write_and_search_on_the_parent() {
    let mut h = H::new();
    for (i, perm) in [0o700, 0o070, 0o007, 0o730, 0o753, 0o357, 0o000, 0o777].into_iter().enumerate() {
        let d = dir(&mut h, ROOT, &format!("d{i}"), 100, GROUP, perm);
        for (j, (c, ok)) in creators(perm).into_iter().enumerate() {
            file(&mut h, d, &format!("f{j}"), 9, 9, 0o000);
            dir(&mut h, d, &format!("s{j}"), 9, 9, 0o000);
            for op in [unlink(d, &format!("f{j}")), rmdir(d, &format!("s{j}"))] {
                if ok {
                    assert!(matches!(allow(&mut h, &c, op), Reply::Removed { .. }));
                } else {
                    assert_eq!(deny(&mut h, &c, op.clone()), Errno::EACCES, "{perm:o} {c:?} {op:?}");
                }
            }
        }
    }
}

#[test]
fn removal_errors_after_the_permission_checks() {
    let mut h = H::new();
    let d = dir(&mut h, ROOT, "d", 100, GROUP, 0o755);
    file(&mut h, d, "f", 100, 100, 0o644);
    let s = dir(&mut h, d, "s", 100, 100, 0o755);
    let inside = file(&mut h, s, "inside", 100, 100, 0o644);
    // Without write permission, EACCES hides the wrong type and the non-empty directory.
    assert_eq!(deny(&mut h, &other(), unlink(d, "s")), Errno::EACCES);
    assert_eq!(deny(&mut h, &other(), rmdir(d, "f")), Errno::EACCES);
    assert_eq!(deny(&mut h, &other(), rmdir(d, "s")), Errno::EACCES);
    // With it, the op's own answers come through.
    assert_eq!(same_error(&mut h, &owner(), unlink(d, "s")), Errno::EISDIR);
    assert_eq!(same_error(&mut h, &owner(), rmdir(d, "f")), Errno::ENOTDIR);
    assert_eq!(same_error(&mut h, &owner(), rmdir(d, "s")), Errno::ENOTEMPTY);
    assert_eq!(same_error(&mut h, &owner(), unlink(d, "..")), Errno::EINVAL);
    // The victim's own permissions do not matter.
    chmod(&mut h, inside, 0);
    allow(&mut h, &owner(), unlink(s, "inside"));
    chmod(&mut h, s, 0);
    allow(&mut h, &owner(), rmdir(d, "s"));
}

#[test]
fn sticky_directories() {
    let mut h = H::new();
    let t = dir(&mut h, ROOT, "tmp", 100, GROUP, 0o1777);
    let other_dir = dir(&mut h, ROOT, "o", 0, 0, 0o777);
    let mk = |h: &mut H| {
        file(h, t, "f", 400, GROUP, 0o666);
        dir(h, t, "s", 400, GROUP, 0o777);
    };
    mk(&mut h);
    // Neither group membership nor write permission on the victim helps.
    for c in [member(), supplementary(), Caller { uid: 401, gid: 400, groups: vec![] }] {
        assert_eq!(deny(&mut h, &c, unlink(t, "f")), Errno::EPERM);
        assert_eq!(deny(&mut h, &c, rmdir(t, "s")), Errno::EPERM);
        assert_eq!(deny(&mut h, &c, rename(t, "f", other_dir, "f", 0)), Errno::EPERM);
        assert_eq!(deny(&mut h, &c, rename(t, "f", t, "g", 0)), Errno::EPERM);
    }
    // The victim's owner, the directory's owner and root may.
    for c in [other(), owner(), root()] {
        allow(&mut h, &c, unlink(t, "f"));
        allow(&mut h, &c, rmdir(t, "s"));
        mk(&mut h);
    }
    // Replacing someone else's file in a sticky directory is removing it.
    file(&mut h, other_dir, "mine", 201, 201, 0o644);
    let c = supplementary();
    assert_eq!(deny(&mut h, &c, rename(other_dir, "mine", t, "f", 0)), Errno::EPERM);
    assert_eq!(deny(&mut h, &c, rename(other_dir, "mine", t, "f", RENAME_EXCHANGE)), Errno::EPERM);
    allow(&mut h, &c, rename(other_dir, "mine", t, "new", 0));
    assert_eq!(deny(&mut h, &other(), rename(t, "new", t, "f", 0)), Errno::EPERM);
    allow(&mut h, &owner(), rename(t, "new", t, "f", 0));
    // A missing victim is still ENOENT; the sticky bit does not hide it.
    assert_eq!(deny(&mut h, &member(), unlink(t, "nope")), Errno::ENOENT);
    // Without write permission on the sticky directory, EACCES comes first.
    chmod(&mut h, t, 0o1755);
    assert_eq!(deny(&mut h, &other(), unlink(t, "s")), Errno::EACCES);
    assert_eq!(deny(&mut h, &member(), unlink(t, "s")), Errno::EACCES);
}

// ---------- renaming ----------

#[test]
fn rename_needs_write_and_search_on_both_parents() {
    let mut h = H::new();
    let a = dir(&mut h, ROOT, "a", 100, GROUP, 0o755);
    let b = dir(&mut h, ROOT, "b", 100, GROUP, 0o777);
    let x = dir(&mut h, ROOT, "x", 100, GROUP, 0o776);
    file(&mut h, a, "fa", 400, 400, 0o644);
    file(&mut h, b, "fb", 400, 400, 0o644);
    file(&mut h, x, "fx", 400, 400, 0o644);
    let c = other();
    assert_eq!(deny(&mut h, &c, rename(b, "fb", a, "n", 0)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(a, "fa", b, "n", 0)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(a, "fa", a, "n", 0)), Errno::EACCES);
    // Writable but not searchable.
    assert_eq!(deny(&mut h, &c, rename(b, "fb", x, "n", 0)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(x, "fx", b, "n", 0)), Errno::EACCES);
    // Replacing in a directory one may not write.
    file(&mut h, b, "fb2", 400, 400, 0o644);
    assert_eq!(deny(&mut h, &c, rename(b, "fb2", a, "fa", 0)), Errno::EACCES);
    allow(&mut h, &c, rename(b, "fb", b, "n", 0));
    assert!(matches!(allow(&mut h, &c, rename(b, "n", b, "fb2", 0)), Reply::Removed { .. }));
    allow(&mut h, &owner(), rename(a, "fa", b, "fa", 0));
    allow(&mut h, &member(), rename(b, "fa", b, "fa2", 0));
    assert_eq!(deny(&mut h, &member(), rename(b, "fa2", a, "fa", 0)), Errno::EACCES);
    allow(&mut h, &root(), rename(b, "fa2", a, "fa", 0));
}

#[test]
fn moving_a_directory_to_another_parent_needs_write_on_it() {
    let mut h = H::new();
    let b = dir(&mut h, ROOT, "b", 0, 0, 0o777);
    let c2 = dir(&mut h, ROOT, "c", 0, 0, 0o777);
    // The caller's own directory, but read-only: its ".." cannot be rewritten.
    let x = dir(&mut h, b, "x", 400, 400, 0o555);
    file(&mut h, b, "f", 400, 400, 0o444);
    let c = other();
    assert_eq!(deny(&mut h, &c, rename(b, "x", c2, "x", 0)), Errno::EACCES);
    // Within one parent ".." stays: no write permission needed; nor for a file.
    allow(&mut h, &c, rename(b, "x", b, "y", 0));
    allow(&mut h, &c, rename(b, "f", c2, "f", 0));
    // Group write is enough; root needs nothing.
    let mut h2 = H { sm: h.sm.clone(), t: h.t, vol: h.vol };
    chmod(&mut h, x, 0o755);
    allow(&mut h, &c, rename(b, "y", c2, "x", 0));
    allow(&mut h2, &root(), rename(b, "y", c2, "x", 0));
    let vol = h2.vol;
    h2.ok(Op::SetAttr {
        vol,
        ino: x,
        set: SetAttr { gid: Some(GROUP), mode: Some(0o575), ..SetAttr::default() },
    });
    allow(&mut h2, &member(), rename(c2, "x", b, "x", 0));
    assert_eq!(deny(&mut h2, &c, rename(b, "x", c2, "x", 0)), Errno::EACCES);
}

#[test]
fn rename_exchange() {
    let mut h = H::new();
    let b = dir(&mut h, ROOT, "b", 0, 0, 0o777);
    let c2 = dir(&mut h, ROOT, "c", 0, 0, 0o777);
    let ro = dir(&mut h, c2, "ro", 400, 400, 0o555);
    let rw = dir(&mut h, b, "rw", 400, 400, 0o755);
    file(&mut h, b, "f", 400, 400, 0o444);
    file(&mut h, c2, "g", 400, 400, 0o444);
    let c = other();
    // Across parents a destination directory's ".." changes too: it must be writable.
    assert_eq!(deny(&mut h, &c, rename(b, "f", c2, "ro", RENAME_EXCHANGE)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(c2, "ro", b, "f", RENAME_EXCHANGE)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(b, "rw", c2, "ro", RENAME_EXCHANGE)), Errno::EACCES);
    // Within one parent it does not.
    dir(&mut h, c2, "ro2", 400, 400, 0o555);
    allow(&mut h, &c, rename(c2, "ro", c2, "ro2", RENAME_EXCHANGE));
    allow(&mut h, &c, rename(c2, "g", c2, "ro", RENAME_EXCHANGE));
    allow(&mut h, &c, rename(c2, "g", c2, "ro", RENAME_EXCHANGE));
    // Files need nothing of themselves; a writable directory may be swapped across parents.
    allow(&mut h, &c, rename(b, "f", c2, "g", RENAME_EXCHANGE));
    allow(&mut h, &c, rename(b, "rw", c2, "g", RENAME_EXCHANGE));
    assert_eq!(h.lookup(c2, "g"), Ok(rw));
    // Both parents must be writable.
    chmod(&mut h, b, 0o755);
    assert_eq!(deny(&mut h, &c, rename(c2, "g", b, "rw", RENAME_EXCHANGE)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(b, "rw", c2, "g", RENAME_EXCHANGE)), Errno::EACCES);
    allow(&mut h, &root(), rename(b, "rw", c2, "ro", RENAME_EXCHANGE));
    let _ = ro;
    // A missing destination is ENOENT before any write check.
    assert_eq!(deny(&mut h, &c, rename(b, "rw", c2, "nope", RENAME_EXCHANGE)), Errno::ENOENT);
}

#[test]
fn rename_errno_precedence() {
    let mut h = H::new();
    let b = dir(&mut h, ROOT, "b", 0, 0, 0o755);
    let w = dir(&mut h, ROOT, "w", 0, 0, 0o777);
    let sub = dir(&mut h, b, "sub", 400, 400, 0o755);
    let deep = dir(&mut h, sub, "deep", 400, 400, 0o777);
    file(&mut h, b, "f", 400, 400, 0o644);
    let c = other();
    // Bad flags come before the walk.
    let bad = RENAME_EXCHANGE | RENAME_NOREPLACE;
    assert_eq!(same_error(&mut h, &c, rename(999, "f", b, "g", bad)), Errno::EINVAL);
    assert_eq!(same_error(&mut h, &c, rename(b, "f", b, "g", 8)), Errno::EINVAL);
    // NOREPLACE's EEXIST and the loop checks come before write permission.
    assert_eq!(same_error(&mut h, &c, rename(b, "f", b, "sub", RENAME_NOREPLACE)), Errno::EEXIST);
    assert_eq!(same_error(&mut h, &c, rename(b, "sub", deep, "x", 0)), Errno::EINVAL);
    assert_eq!(same_error(&mut h, &c, rename(deep, "x", b, "sub", 0)), Errno::ENOENT);
    file(&mut h, deep, "x", 400, 400, 0o644);
    assert_eq!(same_error(&mut h, &c, rename(deep, "x", b, "sub", 0)), Errno::ENOTEMPTY);
    // Without write permission on the parent, EACCES hides the wrong type ...
    assert_eq!(deny(&mut h, &c, rename(b, "f", b, "sub", 0)), Errno::EACCES);
    assert_eq!(deny(&mut h, &c, rename(w, "nope", b, "sub", 0)), Errno::ENOENT);
    file(&mut h, w, "wf", 400, 400, 0o644);
    assert_eq!(deny(&mut h, &c, rename(w, "wf", b, "sub", 0)), Errno::EACCES);
    // ... and the wrong type of a replaced entry comes before the directory's own write check.
    let ro = dir(&mut h, w, "ro", 400, 400, 0o555);
    dir(&mut h, w, "wd", 400, 400, 0o777);
    let w2 = dir(&mut h, ROOT, "w2", 0, 0, 0o777);
    file(&mut h, w2, "file", 400, 400, 0o644);
    assert_eq!(same_error(&mut h, &c, rename(w, "ro", w2, "file", 0)), Errno::ENOTDIR);
    assert_eq!(same_error(&mut h, &c, rename(w2, "file", w, "wd", 0)), Errno::EISDIR);
    // Replacing a non-empty directory: permissions first, then ENOTEMPTY.
    let full = dir(&mut h, w2, "full", 400, 400, 0o777);
    file(&mut h, full, "x", 400, 400, 0o644);
    assert_eq!(deny(&mut h, &c, rename(w, "ro", w2, "full", 0)), Errno::EACCES);
    assert_eq!(same_error(&mut h, &c, rename(w, "wd", w2, "full", 0)), Errno::ENOTEMPTY);
    // Two links to one inode: nothing is renamed and nothing more is checked.
    let f = h.lookup(b, "f").unwrap();
    h.ok(link(f, b, "f2"));
    assert_eq!(allow(&mut h, &c, rename(b, "f", b, "f2", 0)), Reply::Ok);
    let _ = ro;
}

// ---------- root, unsupported ops, de-duplication, decoding ----------

#[test]
fn root_passes_every_permission_check() {
    let mut h = H::new();
    let d = dir(&mut h, ROOT, "d", 100, GROUP, 0o1000);
    let e = dir(&mut h, ROOT, "e", 100, GROUP, 0o000);
    let sub = dir(&mut h, d, "sub", 400, 400, 0o000);
    file(&mut h, d, "f", 400, 400, 0o000);
    let r = root();
    allow(&mut h, &r, mkdir(d, "m"));
    allow(&mut h, &r, symlink(d, "s"));
    allow(&mut h, &r, mknod(d, "c", mode::S_IFCHR, true));
    let f = h.lookup(d, "f").unwrap();
    allow(&mut h, &r, link(f, e, "f"));
    allow(&mut h, &r, unlink(d, "f"));
    allow(&mut h, &r, rename(d, "sub", e, "sub", 0));
    allow(&mut h, &r, rename(e, "sub", d, "c", RENAME_EXCHANGE));
    allow(&mut h, &r, rmdir(d, "c"));
    allow(&mut h, &r, unlink(e, "sub"));
    let _ = sub;
    // Root's supplementary groups change nothing, nor does an unknown gid.
    allow(&mut h, &Caller { uid: 0, gid: 12345, groups: vec![] }, mkdir(e, "m"));
}

#[test]
fn unsupported_and_nested_ops_are_einval() {
    let mut h = H::new();
    let d = dir(&mut h, ROOT, "d", 400, 400, 0o777);
    let vol = h.vol;
    for c in [root(), other()] {
        for op in [
            Op::SetAttr { vol, ino: d, set: SetAttr { mode: Some(0o700), ..SetAttr::default() } },
            Op::SetXattr { vol, ino: d, name: b"user.a".to_vec(), value: vec![], flags: 0 },
            Op::CreateVolume { name: "v2".into(), config: VolumeConfig::default() },
            Op::AllocInodes { vol, count: 1 },
            Op::OpenSession { name: "s".into(), ttl_ms: 1000 },
            Op::ExpireSessions,
            as_(&c, mkdir(d, "x")),
            as_(&root(), as_(&root(), mkdir(d, "x"))),
        ] {
            assert_eq!(deny(&mut h, &c, op.clone()), Errno::EINVAL, "{op:?}");
        }
    }
    // A caller with more supplementary groups than Linux allows is refused whatever the op.
    let many = Caller { uid: 400, gid: 400, groups: vec![1; limits::GROUPS_MAX + 1] };
    assert_eq!(deny(&mut h, &many, mkdir(d, "x")), Errno::EINVAL);
    let most = Caller { uid: 400, gid: 400, groups: vec![1; limits::GROUPS_MAX] };
    allow(&mut h, &most, mkdir(d, "x"));
}

#[test]
fn dedup_replays_as_commands() {
    let mut h = H::new();
    let d = dir(&mut h, ROOT, "d", 100, GROUP, 0o755);
    let c = other();
    let cmd = |h: &H, seq: u64, op: Op| Command { client: 42, seq, acked_below: 1, time: h.now(), op };
    // A refused command is remembered as refused ...
    let refused = cmd(&h, 1, as_(&c, mkdir(d, "x")));
    assert_eq!(h.sm.apply(&refused), (Err(Errno::EACCES), vec![]));
    chmod(&mut h, d, 0o757);
    assert_eq!(h.sm.apply(&refused), (Err(Errno::EACCES), vec![]));
    // ... and an applied one is not applied again (no EEXIST on the retry).
    let done = cmd(&h, 2, as_(&c, mkdir(d, "x")));
    let (r1, ch1) = h.sm.apply(&done);
    assert!(matches!(r1, Ok(Reply::Entry { created: true, .. })));
    assert_eq!(ch1.len(), 1);
    let fp = h.sm.fingerprint();
    assert_eq!(h.sm.apply(&done), (r1, vec![]));
    assert_eq!(fp, h.sm.fingerprint());
    assert_eq!(h.sm.apply(&cmd(&h, 3, as_(&c, mkdir(d, "x")))).0, Err(Errno::EEXIST));
}

#[test]
fn a_refused_as_leaves_the_state_byte_identical() {
    let mut h = H::new();
    let d = dir(&mut h, ROOT, "d", 100, GROUP, 0o1755);
    let f = file(&mut h, d, "f", 100, 100, 0o644);
    file(&mut h, d, "g", 100, 100, 0o644);
    let s = h.session(60_000);
    let vol = h.vol;
    let refused = [
        Op::Mknod {
            vol,
            parent: d,
            name: b"n".to_vec(),
            mode: mode::S_IFREG,
            uid: 1,
            gid: 1,
            rdev: 0,
            exclusive: false,
            ino: None,
            session: Some(s),
        },
        mkdir(d, "n"),
        symlink(d, "n"),
        link(f, d, "n"),
        unlink(d, "f"),
        rmdir(d, "f"),
        rename(d, "f", ROOT, "n", 0),
        rename(d, "f", d, "g", RENAME_EXCHANGE),
    ];
    for op in refused {
        let before = h.sm.snapshot();
        let (r, ch) = h.apply(as_(&other(), op));
        assert_eq!(r, Err(Errno::EACCES));
        assert!(ch.is_empty());
        assert_eq!(before, h.sm.snapshot());
    }
    let Ok(Reply::SessionInfo { open, .. }) = h.q(Query::SessionInfo { session: s }) else { panic!() };
    assert!(open.is_empty());
}

#[test]
fn as_round_trips_and_a_nested_as_does_not_decode() {
    let one = as_(&supplementary(), Op::Unlink { vol: 1, parent: 2, name: b"x".to_vec() });
    let bytes = postcard::to_stdvec(&one).unwrap();
    assert_eq!(postcard::from_bytes::<Op>(&bytes).unwrap(), one);
    let cmd = Command { client: 1, seq: 2, acked_below: 1, time: Timespec::new(5, 0), op: one.clone() };
    let cmd_bytes = postcard::to_stdvec(&cmd).unwrap();
    assert_eq!(postcard::from_bytes::<Command>(&cmd_bytes).unwrap(), cmd);
    let nested = as_(&root(), as_(&root(), Op::ExpireSessions));
    assert!(postcard::from_bytes::<Op>(&postcard::to_stdvec(&nested).unwrap()).is_err());
    // However deep the nesting, decoding stops at the second level (no stack overflow).
    let leaf = as_(&Caller::default(), Op::ExpireSessions);
    let leaf_bytes = postcard::to_stdvec(&leaf).unwrap();
    let tail = postcard::to_stdvec(&Op::ExpireSessions).unwrap();
    let prefix = &leaf_bytes[..leaf_bytes.len() - tail.len()];
    let mut deep = prefix.repeat(1_000_000);
    deep.extend_from_slice(&tail);
    assert!(postcard::from_bytes::<Op>(&deep).is_err());
    // A failed decode leaves nothing behind for the next one.
    assert_eq!(postcard::from_bytes::<Op>(&bytes).unwrap(), one);
    assert_eq!(postcard::from_bytes::<Op>(&leaf_bytes).unwrap(), leaf);
}
