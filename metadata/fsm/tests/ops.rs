//! Unit tests of each op and its error numbers, through the public API.

mod common;

use common::*;
use elea_common::{Errno, Timespec};
use elea_fsm::*;

const CHUNK: u64 = 64 << 20;

// ---------- volumes, allocation ----------

#[test]
fn create_volume_and_list() {
    let mut h = H::new();
    assert_eq!(h.vol, 1);
    assert_eq!(h.err(Op::CreateVolume { name: "vol".into(), config: Default::default() }), Errno::EEXIST);
    for bad in ["", "a b", "a/b", "é", &"x".repeat(129)] {
        assert_eq!(
            h.err(Op::CreateVolume { name: bad.into(), config: Default::default() }),
            Errno::EINVAL,
            "{bad:?}"
        );
    }
    let r = h.ok(Op::CreateVolume { name: "Other-1.x_y".into(), config: Default::default() });
    let Reply::Volume(v2) = r else { panic!() };
    assert_eq!(v2.id, 2);
    let Ok(Reply::Volumes(list)) = h.q(Query::ListVolumes) else { panic!() };
    assert_eq!(list.iter().map(|v| v.id).collect::<Vec<_>>(), vec![1, 2]);
    let Ok(Reply::Volume(v)) = h.q(Query::VolumeByName { name: "vol".into() }) else { panic!() };
    assert_eq!(v.id, 1);
    assert_eq!(v.inodes, 1);
    assert_eq!(h.q(Query::VolumeByName { name: "nope".into() }), Err(Errno::ENOENT));
    let root = h.attr(ROOT);
    assert_eq!(root.mode, mode::S_IFDIR | 0o755);
    assert_eq!((root.uid, root.gid, root.nlink), (0, 0, 2));
    assert_eq!(root.mtime, Timespec::new(1001, 0));
    assert_eq!(h.q(Query::GetAttr { vol: 9, ino: ROOT }), Err(Errno::ENODEV));
    assert_eq!(
        h.err(Op::Mkdir { vol: 9, parent: ROOT, name: "a".into(), mode: 0, uid: 0, gid: 0, ino: None }),
        Errno::ENODEV
    );
}

#[test]
fn alloc_inodes_and_explicit_ino() {
    let mut h = H::new();
    let vol = h.vol;
    assert_eq!(h.ok(Op::AllocInodes { vol, count: 10 }), Reply::Range { start: 2, count: 10 });
    assert_eq!(h.err(Op::AllocInodes { vol, count: 0 }), Errno::EINVAL);
    assert_eq!(h.err(Op::AllocInodes { vol, count: 1_000_001 }), Errno::EINVAL);
    assert_eq!(h.err(Op::AllocInodes { vol: 5, count: 1 }), Errno::ENODEV);
    // Reserved numbers can be used in any order; unreserved or used ones cannot.
    let mk = |name: &str, ino| Op::Mkdir {
        vol,
        parent: ROOT,
        name: name.into(),
        mode: 0o700,
        uid: 0,
        gid: 0,
        ino,
    };
    assert_eq!(entry_ino(h.ok(mk("a", Some(7)))), 7);
    assert_eq!(h.err(mk("b", Some(7))), Errno::EINVAL);
    assert_eq!(h.err(mk("b", Some(12))), Errno::EINVAL);
    assert_eq!(h.err(mk("b", Some(1))), Errno::EINVAL);
    assert_eq!(h.err(mk("b", Some(0))), Errno::EINVAL);
    // Implicit numbers continue after the reserved range.
    assert_eq!(entry_ino(h.ok(mk("b", None))), 12);
    assert_eq!(h.ok(Op::AllocInodes { vol, count: 1 }), Reply::Range { start: 13, count: 1 });
    // Generations increase per creation.
    assert!(h.attr(12).generation > h.attr(7).generation);
    // A freed number may be reused, with a new generation.
    let g = h.attr(7).generation;
    h.ok(Op::Rmdir { vol, parent: ROOT, name: "a".into() });
    assert_eq!(entry_ino(h.ok(mk("c", Some(7)))), 7);
    assert!(h.attr(7).generation > g);
    assert_eq!(h.ok(Op::AllocSlices { count: 5 }), Reply::Range { start: 1, count: 5 });
    assert_eq!(h.ok(Op::AllocSlices { count: 1 }), Reply::Range { start: 6, count: 1 });
    assert_eq!(h.err(Op::AllocSlices { count: 0 }), Errno::EINVAL);
}

// ---------- creates ----------

#[test]
fn name_validation() {
    let mut h = H::new();
    let vol = h.vol;
    let mk = |name: &[u8]| Op::Mkdir {
        vol,
        parent: ROOT,
        name: name.to_vec(),
        mode: 0o755,
        uid: 0,
        gid: 0,
        ino: None,
    };
    assert_eq!(h.err(mk(b"")), Errno::ENOENT);
    assert_eq!(h.err(mk(b".")), Errno::EINVAL);
    assert_eq!(h.err(mk(b"..")), Errno::EINVAL);
    assert_eq!(h.err(mk(b"a/b")), Errno::EINVAL);
    assert_eq!(h.err(mk(b"a\0b")), Errno::EINVAL);
    assert_eq!(h.err(mk(&[b'x'; 256])), Errno::ENAMETOOLONG);
    h.ok(mk(&[b'x'; 255]));
    assert_eq!(h.q(Query::Lookup { vol, parent: ROOT, name: vec![] }), Err(Errno::ENOENT));
    assert_eq!(h.q(Query::Lookup { vol, parent: ROOT, name: b"a/b".to_vec() }), Err(Errno::EINVAL));
}

#[test]
fn mknod_types_and_existing() {
    let mut h = H::new();
    let vol = h.vol;
    let node = |name: &str, m: u32, excl: bool| Op::Mknod {
        vol,
        parent: ROOT,
        name: name.into(),
        mode: m,
        uid: 5,
        gid: 6,
        rdev: 77,
        exclusive: excl,
        ino: None,
        session: None,
    };
    let Reply::Entry { attr, created } = h.ok(node("f", mode::S_IFREG | 0o4755, true)) else { panic!() };
    assert!(created);
    assert_eq!(attr.mode, mode::S_IFREG | 0o4755);
    assert_eq!((attr.uid, attr.gid, attr.nlink, attr.size, attr.rdev), (5, 6, 1, 0, 0));
    let Reply::Entry { attr: c, .. } = h.ok(node("c", mode::S_IFCHR | 0o600, true)) else { panic!() };
    assert_eq!(c.rdev, 77);
    h.ok(node("p", mode::S_IFIFO | 0o600, true));
    h.ok(node("s", mode::S_IFSOCK | 0o600, true));
    h.ok(node("b", mode::S_IFBLK | 0o600, true));
    assert_eq!(h.err(node("d", mode::S_IFDIR | 0o755, true)), Errno::EINVAL);
    assert_eq!(h.err(node("l", mode::S_IFLNK | 0o777, true)), Errno::EINVAL);
    assert_eq!(h.err(node("x", 0o030000 | 0o777, true)), Errno::EINVAL);
    // No type bits means a regular file, as for mknod(2).
    let Reply::Entry { attr: r, .. } = h.ok(node("r", 0o640, true)) else { panic!() };
    assert_eq!(r.mode, mode::S_IFREG | 0o640);
    // Existing: exclusive fails, non-exclusive returns it.
    assert_eq!(h.err(node("f", mode::S_IFREG | 0o644, true)), Errno::EEXIST);
    let r = h.ok(node("f", mode::S_IFREG | 0o644, false));
    assert_eq!(r, Reply::Entry { attr: attr.clone(), created: false });
    h.mkdir(ROOT, "dir");
    assert_eq!(h.err(node("dir", mode::S_IFREG | 0o644, false)), Errno::EISDIR);
    assert_eq!(h.err(node("dir", mode::S_IFREG | 0o644, true)), Errno::EEXIST);
    // Parent checks.
    let mut bad = node("z", mode::S_IFREG, true);
    if let Op::Mknod { parent, .. } = &mut bad {
        *parent = attr.ino;
    }
    assert_eq!(h.err(bad.clone()), Errno::ENOTDIR);
    if let Op::Mknod { parent, .. } = &mut bad {
        *parent = 999;
    }
    assert_eq!(h.err(bad), Errno::ENOENT);
}

#[test]
fn mknod_with_session_opens() {
    let mut h = H::new();
    let vol = h.vol;
    let s = h.session(10_000);
    let mut op = h.mknod_op(ROOT, "f");
    if let Op::Mknod { session, exclusive, .. } = &mut op {
        *session = Some(s);
        *exclusive = false;
    }
    let ino = entry_ino(h.ok(op.clone()));
    let r = h.ok(op.clone());
    assert!(matches!(r, Reply::Entry { created: false, .. }));
    assert_eq!(
        h.q(Query::SessionInfo { session: s }).unwrap(),
        Reply::SessionInfo { open: vec![(vol, ino, 2)], expires: Timespec::new(1002, 0).plus_millis(10_000) }
    );
    if let Op::Mknod { session, name, .. } = &mut op {
        *session = Some(99);
        *name = b"g".to_vec();
    }
    assert_eq!(h.err(op), Errno::ESTALE);
}

#[test]
fn mkdir_nlink_times_and_setgid() {
    let mut h = H::new();
    let vol = h.vol;
    let a = h.mkdir(ROOT, "a");
    let t = h.now();
    let aa = h.attr(a);
    assert_eq!(aa.mode, mode::S_IFDIR | 0o755);
    assert_eq!(aa.nlink, 2);
    assert_eq!((aa.atime, aa.mtime, aa.ctime), (t, t, t));
    let root = h.attr(ROOT);
    assert_eq!(root.nlink, 3);
    assert_eq!((root.mtime, root.ctime), (t, t));
    assert_eq!(
        h.err(Op::Mkdir { vol, parent: ROOT, name: "a".into(), mode: 0, uid: 0, gid: 0, ino: None }),
        Errno::EEXIST
    );
    // Type bits in mode are ignored.
    let r = h.ok(Op::Mkdir {
        vol,
        parent: ROOT,
        name: "t".into(),
        mode: mode::S_IFREG | 0o700,
        uid: 0,
        gid: 0,
        ino: None,
    });
    let Reply::Entry { attr, .. } = r else { panic!() };
    assert_eq!(attr.mode, mode::S_IFDIR | 0o700);
    // setgid directory: gid inherited, and new subdirectories inherit S_ISGID.
    h.ok(Op::SetAttr {
        vol,
        ino: a,
        set: SetAttr { mode: Some(0o2775), gid: Some(42), ..Default::default() },
    });
    let sub = h.mkdir(a, "sub");
    assert_eq!(h.attr(sub).gid, 42);
    assert_eq!(h.attr(sub).mode, mode::S_IFDIR | 0o2755);
    let f = h.file(a, "f");
    assert_eq!(h.attr(f).gid, 42);
    assert_eq!(h.attr(f).mode & mode::S_ISGID, 0);
}

#[test]
fn symlink_and_readlink() {
    let mut h = H::new();
    let vol = h.vol;
    let sl = |name: &str, target: Vec<u8>| Op::Symlink {
        vol,
        parent: ROOT,
        name: name.into(),
        target,
        uid: 3,
        gid: 4,
        ino: None,
    };
    let ino = entry_ino(h.ok(sl("l", b"/some/where".to_vec())));
    let a = h.attr(ino);
    assert_eq!(a.mode, mode::S_IFLNK | 0o777);
    assert_eq!(a.size, 11);
    assert_eq!(h.q(Query::ReadLink { vol, ino }), Ok(Reply::Data(b"/some/where".to_vec())));
    assert_eq!(h.q(Query::ReadLink { vol, ino: ROOT }), Err(Errno::EINVAL));
    assert_eq!(h.err(sl("e", vec![])), Errno::ENOENT);
    assert_eq!(h.err(sl("e", vec![b'a'; 4097])), Errno::ENAMETOOLONG);
    h.ok(sl("m", vec![b'a'; 4096]));
    assert_eq!(h.err(sl("l", b"x".to_vec())), Errno::EEXIST);
}

#[test]
fn lookup_dot_and_dotdot() {
    let mut h = H::new();
    let a = h.mkdir(ROOT, "a");
    let b = h.mkdir(a, "b");
    assert_eq!(h.lookup(b, "."), Ok(b));
    assert_eq!(h.lookup(b, ".."), Ok(a));
    assert_eq!(h.lookup(ROOT, ".."), Ok(ROOT));
    assert_eq!(h.lookup(a, "b"), Ok(b));
    assert_eq!(h.lookup(a, "nope"), Err(Errno::ENOENT));
    let f = h.file(a, "f");
    assert_eq!(h.lookup(f, "x"), Err(Errno::ENOTDIR));
    assert_eq!(h.lookup(999, "x"), Err(Errno::ENOENT));
}

// ---------- link / unlink / rmdir ----------

#[test]
fn link_rules() {
    let mut h = H::new();
    let vol = h.vol;
    let a = h.mkdir(ROOT, "a");
    let f = h.file(ROOT, "f");
    let link = |ino, parent, name: &str| Op::Link { vol, ino, new_parent: parent, new_name: name.into() };
    let t = h.now();
    h.ok(link(f, a, "g"));
    let fa = h.attr(f);
    assert_eq!(fa.nlink, 2);
    assert!(fa.ctime > t);
    assert_eq!(h.attr(a).mtime, h.now());
    assert_eq!(h.lookup(a, "g"), Ok(f));
    assert_eq!(h.err(link(a, ROOT, "x")), Errno::EPERM);
    assert_eq!(h.err(link(f, ROOT, "a")), Errno::EEXIST);
    assert_eq!(h.err(link(f, f, "x")), Errno::ENOTDIR);
    assert_eq!(h.err(link(999, ROOT, "x")), Errno::ENOENT);
    // Orphan source.
    let s = h.session(60_000);
    h.ok(Op::Open { vol, ino: f, session: s });
    h.ok(Op::Unlink { vol, parent: ROOT, name: "f".into() });
    h.ok(Op::Unlink { vol, parent: a, name: "g".into() });
    assert_eq!(h.attr(f).nlink, 0);
    assert_eq!(h.err(link(f, ROOT, "back")), Errno::ENOENT);
}

#[test]
fn unlink_and_rmdir() {
    let mut h = H::new();
    let vol = h.vol;
    let a = h.mkdir(ROOT, "a");
    let f = h.file(a, "f");
    h.ok(Op::Link { vol, ino: f, new_parent: ROOT, new_name: "f2".into() });
    assert_eq!(h.err(Op::Unlink { vol, parent: ROOT, name: "a".into() }), Errno::EISDIR);
    assert_eq!(h.err(Op::Unlink { vol, parent: ROOT, name: "zz".into() }), Errno::ENOENT);
    assert_eq!(h.err(Op::Rmdir { vol, parent: ROOT, name: "f2".into() }), Errno::ENOTDIR);
    assert_eq!(h.err(Op::Rmdir { vol, parent: ROOT, name: "a".into() }), Errno::ENOTEMPTY);
    assert_eq!(h.err(Op::Rmdir { vol, parent: ROOT, name: ".".into() }), Errno::EINVAL);
    let r = h.ok(Op::Unlink { vol, parent: ROOT, name: "f2".into() });
    assert_eq!(r, Reply::Removed { ino: f, nlink: 1, freed: false });
    assert_eq!(h.attr(f).ctime, h.now());
    assert_eq!(h.attr(ROOT).mtime, h.now());
    let r = h.ok(Op::Unlink { vol, parent: a, name: "f".into() });
    assert_eq!(r, Reply::Removed { ino: f, nlink: 0, freed: true });
    assert_eq!(h.q(Query::GetAttr { vol, ino: f }), Err(Errno::ENOENT));
    assert_eq!(h.attr(ROOT).nlink, 3);
    let (r, ch) = h.apply(Op::Rmdir { vol, parent: ROOT, name: "a".into() });
    assert_eq!(r, Ok(Reply::Removed { ino: a, nlink: 0, freed: true }));
    assert_eq!(h.attr(ROOT).nlink, 2);
    assert_eq!(ch.len(), 1);
    assert!(ch[0].changes.contains(&Change::Entry { parent: ROOT, name: b"a".to_vec() }));
    assert!(ch[0].changes.contains(&Change::Inode(ROOT)));
    let Ok(Reply::StatFs(s)) = h.q(Query::StatFs { vol }) else { panic!() };
    assert_eq!(s.used_inodes, 1);
}

#[test]
fn open_directory_survives_rmdir_as_orphan() {
    let mut h = H::new();
    let vol = h.vol;
    let a = h.mkdir(ROOT, "a");
    let s = h.session(60_000);
    h.ok(Op::Open { vol, ino: a, session: s });
    let r = h.ok(Op::Rmdir { vol, parent: ROOT, name: "a".into() });
    assert_eq!(r, Reply::Removed { ino: a, nlink: 0, freed: false });
    let mut op = h.mknod_op(a, "x");
    assert_eq!(h.err(op.clone()), Errno::ENOENT);
    if let Op::Mknod { parent, .. } = &mut op {
        *parent = ROOT;
    }
    assert_eq!(h.lookup(a, "."), Err(Errno::ENOENT));
    h.ok(Op::Release { vol, ino: a, session: s });
    assert_eq!(h.q(Query::GetAttr { vol, ino: a }), Err(Errno::ENOENT));
}

// ---------- rename ----------

fn ren(h: &H, p1: u64, n1: &str, p2: u64, n2: &str, flags: u32) -> Op {
    Op::Rename { vol: h.vol, parent: p1, name: n1.into(), new_parent: p2, new_name: n2.into(), flags }
}

#[test]
fn rename_simple_and_across_dirs() {
    let mut h = H::new();
    let a = h.mkdir(ROOT, "a");
    let b = h.mkdir(ROOT, "b");
    let d = h.mkdir(a, "d");
    let f = h.file(a, "f");
    let op = ren(&h, a, "f", b, "g", 0);
    let (r, ch) = h.apply(op);
    assert_eq!(r, Ok(Reply::Ok));
    let now = h.now();
    assert_eq!(h.lookup(b, "g"), Ok(f));
    assert_eq!(h.lookup(a, "f"), Err(Errno::ENOENT));
    assert_eq!(h.attr(f).ctime, now);
    assert_eq!((h.attr(a).mtime, h.attr(b).mtime, h.attr(b).ctime), (now, now, now));
    let changes = &ch[0].changes;
    assert!(changes.contains(&Change::Entry { parent: a, name: b"f".to_vec() }));
    assert!(changes.contains(&Change::Entry { parent: b, name: b"g".to_vec() }));
    // A directory moving changes both parents' nlink and its "..".
    assert_eq!((h.attr(a).nlink, h.attr(b).nlink), (3, 2));
    h.ok(ren(&h, a, "d", b, "d", 0));
    assert_eq!((h.attr(a).nlink, h.attr(b).nlink), (2, 3));
    assert_eq!(h.lookup(d, ".."), Ok(b));
    // Same directory rename.
    h.ok(ren(&h, b, "d", b, "e", 0));
    assert_eq!(h.names(b), vec![".", "..", "g", "e"]);
    assert_eq!(h.attr(b).nlink, 3);
}

#[test]
fn rename_errors() {
    let mut h = H::new();
    let a = h.mkdir(ROOT, "a");
    let sub = h.mkdir(a, "sub");
    let _deep = h.mkdir(sub, "deep");
    let f = h.file(ROOT, "f");
    let _g = h.file(ROOT, "g");
    let e = h.mkdir(ROOT, "e");
    let _ = e;
    assert_eq!(h.err(ren(&h, ROOT, "f", ROOT, "x", 4)), Errno::EINVAL);
    assert_eq!(h.err(ren(&h, ROOT, "f", ROOT, "x", 3)), Errno::EINVAL);
    assert_eq!(h.err(ren(&h, ROOT, "nope", ROOT, "x", 0)), Errno::ENOENT);
    assert_eq!(h.err(ren(&h, ROOT, "f", f, "x", 0)), Errno::ENOTDIR);
    assert_eq!(h.err(ren(&h, ROOT, "f", ROOT, ".", 0)), Errno::EINVAL);
    // Into itself or its subtree.
    assert_eq!(h.err(ren(&h, ROOT, "a", a, "x", 0)), Errno::EINVAL);
    assert_eq!(h.err(ren(&h, ROOT, "a", sub, "x", 0)), Errno::EINVAL);
    // Over an ancestor of the source.
    assert_eq!(h.err(ren(&h, a, "sub", ROOT, "a", 0)), Errno::ENOTEMPTY);
    assert_eq!(h.err(ren(&h, a, "sub", ROOT, "a", 2)), Errno::EINVAL);
    // Type mismatches.
    assert_eq!(h.err(ren(&h, ROOT, "e", ROOT, "f", 0)), Errno::ENOTDIR);
    assert_eq!(h.err(ren(&h, ROOT, "f", ROOT, "e", 0)), Errno::EISDIR);
    assert_eq!(h.err(ren(&h, ROOT, "e", ROOT, "a", 0)), Errno::ENOTEMPTY);
    // NOREPLACE / EXCHANGE.
    assert_eq!(h.err(ren(&h, ROOT, "f", ROOT, "g", 1)), Errno::EEXIST);
    assert_eq!(h.err(ren(&h, ROOT, "f", ROOT, "zz", 2)), Errno::ENOENT);
    h.ok(ren(&h, ROOT, "f", ROOT, "zz", 1));
    assert_eq!(h.lookup(ROOT, "zz"), Ok(f));
}

#[test]
fn rename_replace_file_and_dir() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let g = h.file(ROOT, "g");
    h.ok(Op::Link { vol, ino: g, new_parent: ROOT, new_name: "g2".into() });
    let r = h.ok(ren(&h, ROOT, "f", ROOT, "g", 0));
    assert_eq!(r, Reply::Removed { ino: g, nlink: 1, freed: false });
    assert_eq!(h.lookup(ROOT, "g"), Ok(f));
    let r = h.ok(ren(&h, ROOT, "g", ROOT, "g2", 0));
    assert_eq!(r, Reply::Removed { ino: g, nlink: 0, freed: true });
    // Directory over empty directory in another parent.
    let a = h.mkdir(ROOT, "a");
    let b = h.mkdir(ROOT, "b");
    let d = h.mkdir(a, "d");
    let e = h.mkdir(b, "e");
    assert_eq!((h.attr(a).nlink, h.attr(b).nlink, h.attr(ROOT).nlink), (3, 3, 4));
    let r = h.ok(ren(&h, a, "d", b, "e", 0));
    assert_eq!(r, Reply::Removed { ino: e, nlink: 0, freed: true });
    assert_eq!((h.attr(a).nlink, h.attr(b).nlink), (2, 3));
    assert_eq!(h.lookup(b, "e"), Ok(d));
    assert_eq!(h.lookup(d, ".."), Ok(b));
    // Directory over empty directory in the same parent.
    let x = h.mkdir(b, "x");
    let r = h.ok(ren(&h, b, "x", b, "e", 0));
    assert_eq!(r, Reply::Removed { ino: d, nlink: 0, freed: true });
    assert_eq!(h.attr(b).nlink, 3);
    assert_eq!(h.lookup(b, "e"), Ok(x));
}

#[test]
fn rename_hard_links_and_self_is_noop() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    h.ok(Op::Link { vol, ino: f, new_parent: ROOT, new_name: "g".into() });
    let before = h.sm.snapshot();
    let (r, ch) = h.apply(ren(&h, ROOT, "f", ROOT, "g", 0));
    assert_eq!(r, Ok(Reply::Ok));
    assert!(ch.is_empty());
    let (r, _) = h.apply(ren(&h, ROOT, "f", ROOT, "f", 0));
    assert_eq!(r, Ok(Reply::Ok));
    let (r, _) = h.apply(ren(&h, ROOT, "f", ROOT, "g", 2));
    assert_eq!(r, Ok(Reply::Ok));
    assert_eq!(h.lookup(ROOT, "f"), Ok(f));
    assert_eq!(h.lookup(ROOT, "g"), Ok(f));
    assert_eq!(h.attr(f).nlink, 2);
    let _ = before;
    assert_eq!(h.err(ren(&h, ROOT, "f", ROOT, "g", 1)), Errno::EEXIST);
}

#[test]
fn rename_exchange() {
    let mut h = H::new();
    let a = h.mkdir(ROOT, "a");
    let b = h.mkdir(ROOT, "b");
    let d = h.mkdir(a, "d");
    let _dd = h.file(d, "inside");
    let f = h.file(b, "f");
    let (r, ch) = h.apply(ren(&h, a, "d", b, "f", 2));
    assert_eq!(r, Ok(Reply::Ok));
    assert_eq!(h.lookup(a, "d"), Ok(f));
    assert_eq!(h.lookup(b, "f"), Ok(d));
    assert_eq!(h.lookup(d, ".."), Ok(b));
    assert_eq!((h.attr(a).nlink, h.attr(b).nlink), (2, 3));
    assert_eq!(h.attr(f).ctime, h.now());
    assert_eq!(h.attr(d).ctime, h.now());
    assert!(ch[0].changes.contains(&Change::Inode(d)));
    assert!(ch[0].changes.contains(&Change::Inode(f)));
    // Two directories across parents: nlinks unchanged, parents swapped.
    let x = h.mkdir(a, "x");
    h.ok(ren(&h, a, "x", b, "f", 2));
    assert_eq!(h.lookup(x, ".."), Ok(b));
    assert_eq!(h.lookup(d, ".."), Ok(a));
    assert_eq!((h.attr(a).nlink, h.attr(b).nlink), (3, 3));
    // Exchange of an ancestor into its subtree.
    assert_eq!(h.err(ren(&h, ROOT, "a", a, "d", 2)), Errno::EINVAL);
    // Non-empty directories may be exchanged.
    h.ok(ren(&h, b, "f", a, "x", 2));
    assert_eq!(h.lookup(b, "f"), Ok(d));
}

// ---------- setattr ----------

#[test]
fn setattr_fields() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let d = h.mkdir(ROOT, "d");
    let set = |ino, s: SetAttr| Op::SetAttr { vol, ino, set: s };
    let Reply::Attr(a) = h.ok(set(
        f,
        SetAttr { mode: Some(mode::S_IFDIR | 0o6711), uid: Some(9), gid: Some(8), ..Default::default() },
    )) else {
        panic!()
    };
    assert_eq!(a.mode, mode::S_IFREG | 0o6711);
    assert_eq!((a.uid, a.gid), (9, 8));
    assert_eq!(a.ctime, h.now());
    let Reply::Attr(a) = h.ok(set(f, SetAttr { clear_suid: true, ..Default::default() })) else { panic!() };
    assert_eq!(a.mode, mode::S_IFREG | 0o711);
    h.ok(set(f, SetAttr { mode: Some(0o2741), ..Default::default() }));
    let Reply::Attr(a) = h.ok(set(f, SetAttr { clear_suid: true, ..Default::default() })) else { panic!() };
    assert_eq!(a.mode, mode::S_IFREG | 0o2741, "no group exec: S_ISGID stays");
    let t = Timespec::new(5, 6);
    let Reply::Attr(a) = h
        .ok(set(f, SetAttr { atime: Some(TimeSet::At(t)), mtime: Some(TimeSet::Now), ..Default::default() }))
    else {
        panic!()
    };
    assert_eq!((a.atime, a.mtime), (t, h.now()));
    let bad = Timespec::new(5, 1_000_000_000);
    assert_eq!(h.err(set(f, SetAttr { mtime: Some(TimeSet::At(bad)), ..Default::default() })), Errno::EINVAL);
    assert_eq!(h.err(set(d, SetAttr { size: Some(1), ..Default::default() })), Errno::EISDIR);
    let l = entry_ino(h.ok(Op::Symlink {
        vol,
        parent: ROOT,
        name: "l".into(),
        target: b"t".to_vec(),
        uid: 0,
        gid: 0,
        ino: None,
    }));
    assert_eq!(h.err(set(l, SetAttr { size: Some(1), ..Default::default() })), Errno::EINVAL);
    assert_eq!(h.err(set(f, SetAttr { size: Some((1 << 60) + 1), ..Default::default() })), Errno::EFBIG);
    let Reply::Attr(a) = h.ok(set(f, SetAttr { size: Some(1000), ..Default::default() })) else { panic!() };
    assert_eq!(a.size, 1000);
    assert_eq!(a.mtime, h.now());
    let Ok(Reply::StatFs(s)) = h.q(Query::StatFs { vol }) else { panic!() };
    assert_eq!(s.used_bytes, 1000);
    assert_eq!(h.err(set(999, SetAttr::default())), Errno::ENOENT);
}

// ---------- xattrs ----------

#[test]
fn xattrs() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let set =
        |name: &[u8], value: Vec<u8>, flags| Op::SetXattr { vol, ino: f, name: name.to_vec(), value, flags };
    h.ok(set(b"user.b", b"2".to_vec(), 0));
    h.ok(set(b"user.a", b"1".to_vec(), xattr_flags::XATTR_CREATE));
    assert_eq!(h.attr(f).ctime, h.now());
    assert_eq!(h.err(set(b"user.a", vec![], xattr_flags::XATTR_CREATE)), Errno::EEXIST);
    assert_eq!(h.err(set(b"user.c", vec![], xattr_flags::XATTR_REPLACE)), Errno::ENODATA);
    assert_eq!(h.err(set(b"user.c", vec![], 3)), Errno::EINVAL);
    assert_eq!(h.err(set(b"user.c", vec![], 4)), Errno::EINVAL);
    assert_eq!(h.err(set(b"", vec![], 0)), Errno::ERANGE);
    assert_eq!(h.err(set(&[b'n'; 256], vec![], 0)), Errno::ERANGE);
    assert_eq!(h.err(set(b"user.c", vec![0; 65537], 0)), Errno::E2BIG);
    h.ok(set(b"user.a", b"new".to_vec(), xattr_flags::XATTR_REPLACE));
    assert_eq!(
        h.q(Query::GetXattr { vol, ino: f, name: b"user.a".to_vec() }),
        Ok(Reply::Data(b"new".to_vec()))
    );
    assert_eq!(h.q(Query::GetXattr { vol, ino: f, name: b"user.z".to_vec() }), Err(Errno::ENODATA));
    assert_eq!(
        h.q(Query::ListXattr { vol, ino: f }),
        Ok(Reply::Names(vec![b"user.a".to_vec(), b"user.b".to_vec()]))
    );
    assert_eq!(h.err(Op::RemoveXattr { vol, ino: f, name: b"user.z".to_vec() }), Errno::ENODATA);
    h.ok(Op::RemoveXattr { vol, ino: f, name: b"user.a".to_vec() });
    assert_eq!(h.q(Query::ListXattr { vol, ino: f }), Ok(Reply::Names(vec![b"user.b".to_vec()])));
    // Total size limit: 16 values of 64 KiB exceed 1 MiB with their names.
    for i in 0..15 {
        h.ok(set(format!("user.big{i:02}").as_bytes(), vec![1; 65536], 0));
    }
    assert_eq!(h.err(set(b"user.big15", vec![1; 65536], 0)), Errno::ENOSPC);
    // Replacing an existing value with one of the same size still fits.
    h.ok(set(b"user.big00", vec![2; 65536], 0));
}

// ---------- chunks ----------

fn slice(id: u64, offset: u32, len: u32) -> Slice {
    Slice { id, offset, len, slice_len: len, slice_offset: 0 }
}

fn chunk(h: &H, ino: u64, c: u64) -> Vec<Slice> {
    match h.q(Query::ReadChunk { vol: h.vol, ino, chunk: c }) {
        Ok(Reply::Slices(s)) => s,
        r => panic!("{r:?}"),
    }
}

#[test]
fn write_slice_validation_and_size() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let d = h.mkdir(ROOT, "d");
    let w = |ino, c, s| Op::WriteSlice { vol, ino, chunk: c, slice: s, staged: vec![] };
    assert_eq!(h.err(w(d, 0, slice(1, 0, 10))), Errno::EISDIR);
    assert_eq!(h.err(w(f, 0, slice(0, 0, 10))), Errno::EINVAL);
    assert_eq!(h.err(w(f, 0, slice(1, 0, 0))), Errno::EINVAL);
    assert_eq!(h.err(w(f, 0, slice(1, (CHUNK - 5) as u32, 10))), Errno::EINVAL);
    assert_eq!(
        h.err(w(f, 0, Slice { id: 1, offset: 0, len: 10, slice_len: 15, slice_offset: 6 })),
        Errno::EINVAL
    );
    assert_eq!(h.err(w(f, 1 << 34, slice(1, 0, 10))), Errno::EFBIG);
    assert_eq!(h.err(w(f, u64::MAX, slice(1, 0, 10))), Errno::EFBIG);
    let Reply::Attr(a) = h.ok(w(f, 1, slice(1, 100, 10))) else { panic!() };
    assert_eq!(a.size, CHUNK + 110);
    assert_eq!(a.mtime, h.now());
    h.ok(w(f, 0, slice(2, 0, 10)));
    assert_eq!(h.attr(f).size, CHUNK + 110);
    assert_eq!(chunk(&h, f, 1), vec![slice(1, 100, 10)]);
    assert_eq!(chunk(&h, f, 5), vec![]);
    assert_eq!(h.q(Query::ReadChunk { vol, ino: d, chunk: 0 }), Err(Errno::EINVAL));
}

#[test]
fn overwrite_trims_and_counts_refs() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let w = |s| Op::WriteSlice { vol, ino: f, chunk: 0, slice: s, staged: vec![] };
    h.ok(w(slice(1, 0, 100)));
    h.ok(w(slice(2, 40, 20)));
    assert_eq!(
        chunk(&h, f, 0),
        vec![
            Slice { id: 1, offset: 0, len: 40, slice_len: 100, slice_offset: 0 },
            Slice { id: 1, offset: 60, len: 40, slice_len: 100, slice_offset: 60 },
            slice(2, 40, 20),
        ]
    );
    assert_eq!(h.sm.pending_deletes().count(), 0);
    // Covering both remaining pieces of slice 1 frees it.
    h.ok(w(slice(3, 0, 40)));
    assert_eq!(h.sm.pending_deletes().count(), 0);
    h.ok(w(slice(4, 50, 50)));
    assert_eq!(h.sm.pending_deletes().collect::<Vec<_>>(), vec![1]);
    assert_eq!(
        chunk(&h, f, 0),
        vec![
            Slice { id: 2, offset: 40, len: 10, slice_len: 20, slice_offset: 0 },
            slice(3, 0, 40),
            slice(4, 50, 50),
        ]
    );
}

#[test]
fn truncate_drops_and_trims() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let w = |c, s| Op::WriteSlice { vol, ino: f, chunk: c, slice: s, staged: vec![] };
    h.ok(w(0, slice(1, 0, 1000)));
    h.ok(w(1, slice(2, 0, 1000)));
    h.ok(w(2, slice(3, 0, 1000)));
    let set = |size| Op::SetAttr { vol, ino: f, set: SetAttr { size: Some(size), ..Default::default() } };
    h.ok(set(CHUNK + 500));
    assert_eq!(chunk(&h, f, 2), vec![]);
    assert_eq!(chunk(&h, f, 1), vec![Slice { id: 2, offset: 0, len: 500, slice_len: 1000, slice_offset: 0 }]);
    assert_eq!(chunk(&h, f, 0), vec![slice(1, 0, 1000)]);
    assert_eq!(h.sm.pending_deletes().collect::<Vec<_>>(), vec![3]);
    // Growing again leaves the truncated range empty (reads zeros).
    h.ok(set(3 * CHUNK));
    assert_eq!(chunk(&h, f, 1).len(), 1);
    h.ok(set(CHUNK));
    assert_eq!(h.sm.pending_deletes().collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(chunk(&h, f, 1), vec![]);
    // Freeing the file drops the rest.
    h.ok(Op::Unlink { vol, parent: ROOT, name: "f".into() });
    assert_eq!(h.sm.pending_deletes().collect::<Vec<_>>(), vec![1, 2, 3]);
    let Ok(Reply::StatFs(s)) = h.q(Query::StatFs { vol }) else { panic!() };
    assert_eq!(s.used_bytes, 0);
}

#[test]
fn shared_slice_freed_only_with_last_piece() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let g = h.file(ROOT, "g");
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: slice(7, 0, 100), staged: vec![] });
    h.ok(Op::WriteSlice { vol, ino: g, chunk: 0, slice: slice(7, 0, 100), staged: vec![] });
    h.ok(Op::Unlink { vol, parent: ROOT, name: "f".into() });
    assert_eq!(h.sm.pending_deletes().count(), 0);
    h.ok(Op::Unlink { vol, parent: ROOT, name: "g".into() });
    assert_eq!(h.sm.pending_deletes().collect::<Vec<_>>(), vec![7]);
}

#[test]
fn fallocate_modes() {
    use fallocate_flags::*;
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let d = h.mkdir(ROOT, "d");
    let fifo = entry_ino(h.ok(Op::Mknod {
        vol,
        parent: ROOT,
        name: "p".into(),
        mode: mode::S_IFIFO | 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        exclusive: true,
        ino: None,
        session: None,
    }));
    let fa = |ino, offset, len, mode| Op::Fallocate { vol, ino, offset, len, mode };
    assert_eq!(h.err(fa(f, 0, 0, 0)), Errno::EINVAL);
    assert_eq!(h.err(fa(f, u64::MAX, 2, 0)), Errno::EFBIG);
    assert_eq!(h.err(fa(f, 1 << 60, 1, 0)), Errno::EFBIG);
    assert_eq!(h.err(fa(d, 0, 1, 0)), Errno::EISDIR);
    assert_eq!(h.err(fa(fifo, 0, 1, 0)), Errno::ENODEV);
    assert_eq!(h.err(fa(f, 0, 1, 0x100)), Errno::EOPNOTSUPP);
    assert_eq!(h.err(fa(f, 0, 1, FALLOC_FL_PUNCH_HOLE)), Errno::EOPNOTSUPP);
    h.ok(fa(f, 0, 100, FALLOC_FL_KEEP_SIZE));
    assert_eq!(h.attr(f).size, 0);
    h.ok(fa(f, 0, 100, 0));
    assert_eq!(h.attr(f).size, 100);
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: slice(1, 0, 100), staged: vec![] });
    h.ok(fa(f, 10, 1000, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE));
    assert_eq!(h.attr(f).size, 100);
    assert_eq!(
        chunk(&h, f, 0),
        vec![Slice { id: 1, offset: 0, len: 10, slice_len: 100, slice_offset: 0 }, slice(0, 10, 90)]
    );
    assert_eq!(h.attr(f).mtime, h.now());
    h.ok(fa(f, 0, 5, FALLOC_FL_ZERO_RANGE));
    assert_eq!(
        chunk(&h, f, 0),
        vec![
            Slice { id: 1, offset: 5, len: 5, slice_len: 100, slice_offset: 5 },
            slice(0, 10, 90),
            slice(0, 0, 5)
        ]
    );
    h.ok(fa(f, 50, 200, FALLOC_FL_ZERO_RANGE));
    assert_eq!(h.attr(f).size, 250);
    h.ok(fa(f, 0, 10, FALLOC_FL_ZERO_RANGE));
    assert_eq!(h.sm.pending_deletes().collect::<Vec<_>>(), vec![1]);
}

// ---------- readdir ----------

#[test]
fn readdir_pages_and_plus() {
    let mut h = H::new();
    let vol = h.vol;
    let a = h.mkdir(ROOT, "a");
    let f = h.file(a, "f");
    let rd = |cookie, limit, plus| Query::ReadDir { vol, ino: a, cookie, limit, plus };
    let Ok(Reply::Dir { entries, eof }) = h.q(rd(0, 10, true)) else { panic!() };
    assert!(eof);
    assert_eq!(entries.len(), 3);
    assert_eq!((entries[0].name.as_slice(), entries[0].cookie, entries[0].ino), (&b"."[..], 1, a));
    assert_eq!((entries[1].name.as_slice(), entries[1].cookie, entries[1].ino), (&b".."[..], 2, ROOT));
    assert_eq!(entries[1].attr.as_ref().unwrap().ino, ROOT);
    assert_eq!((entries[2].cookie, entries[2].ino, entries[2].kind), (3, f, FileType::Regular));
    assert_eq!(entries[2].attr.as_ref().unwrap().nlink, 1);
    let Ok(Reply::Dir { entries, eof }) = h.q(rd(0, 1, false)) else { panic!() };
    assert!(!eof);
    assert_eq!(entries.len(), 1);
    assert!(entries[0].attr.is_none());
    let Ok(Reply::Dir { entries, eof }) = h.q(rd(2, 1, false)) else { panic!() };
    assert!(eof);
    assert_eq!(entries[0].name, b"f");
    let Ok(Reply::Dir { entries, eof }) = h.q(rd(3, 1, false)) else { panic!() };
    assert!(eof && entries.is_empty());
    assert_eq!(h.q(rd(0, 0, false)), Err(Errno::EINVAL));
    assert_eq!(h.q(Query::ReadDir { vol, ino: f, cookie: 0, limit: 1, plus: false }), Err(Errno::ENOTDIR));
}

#[test]
fn readdir_cursor_stable_under_changes() {
    let mut h = H::new();
    let vol = h.vol;
    let d = h.mkdir(ROOT, "d");
    for i in 0..20 {
        h.file(d, &format!("f{i:02}"));
    }
    let mut seen: Vec<String> = Vec::new();
    let mut cookie = 0;
    let mut round = 0;
    loop {
        let Ok(Reply::Dir { entries, eof }) =
            h.q(Query::ReadDir { vol, ino: d, cookie, limit: 3, plus: false })
        else {
            panic!()
        };
        for e in entries {
            cookie = e.cookie;
            seen.push(String::from_utf8(e.name).unwrap());
        }
        if eof {
            break;
        }
        // Between pages: remove an entry not yet listed, remove one already listed, add one,
        // and rename one.
        round += 1;
        h.ok(Op::Unlink { vol, parent: d, name: format!("f{:02}", 20 - round).into() });
        if round == 2 {
            h.ok(Op::Unlink { vol, parent: d, name: "f00".into() });
        }
        h.file(d, &format!("new{round}"));
        if round == 1 {
            h.ok(ren(&h, d, "f01", d, "moved", 0));
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "no duplicates: {seen:?}");
    // Every entry present for the whole listing was returned.
    for i in 2..20 - round {
        assert!(seen.contains(&format!("f{i:02}")), "missing f{i:02} in {seen:?}");
    }
    assert!(seen.contains(&"f00".to_string()));
    assert!(seen.contains(&"new1".to_string()), "entries added later appear after the cursor");
}

// ---------- sessions / opens ----------

#[test]
fn sessions_lifecycle() {
    let mut h = H::new();
    assert_eq!(h.err(Op::OpenSession { name: "x".into(), ttl_ms: 0 }), Errno::EINVAL);
    assert_eq!(h.err(Op::OpenSession { name: "x".into(), ttl_ms: 3_600_001 }), Errno::EINVAL);
    assert_eq!(h.err(Op::OpenSession { name: "x".repeat(257), ttl_ms: 1 }), Errno::EINVAL);
    let r = h.ok(Op::OpenSession { name: "g".into(), ttl_ms: 5_000 });
    assert_eq!(r, Reply::Session { id: 1, expires: Timespec::new(h.t + 5, 0) });
    let r = h.ok(Op::Heartbeat { session: 1 });
    assert_eq!(r, Reply::Session { id: 1, expires: Timespec::new(h.t + 5, 0) });
    assert_eq!(h.err(Op::Heartbeat { session: 2 }), Errno::ESTALE);
    h.t += 10;
    assert_eq!(h.err(Op::Heartbeat { session: 1 }), Errno::ESTALE);
    assert_eq!(h.session(1000), 2);
    h.ok(Op::CloseSession { session: 2 });
    assert_eq!(h.err(Op::CloseSession { session: 2 }), Errno::ESTALE);
    h.ok(Op::ExpireSessions);
    assert_eq!(h.q(Query::SessionInfo { session: 1 }), Err(Errno::ESTALE));
}

/// A new leader's grace period: every session, lapsed or not (but not yet expired), runs at
/// least its own lease from the command's time; none is shortened, and its locks count again.
#[test]
fn extend_sessions_gives_every_session_its_lease_again() {
    let mut h = H::new();
    let short = h.session(5_000);
    let long = h.session(100_000);
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let lock = |session, owner| Op::SetLk {
        vol,
        ino: f,
        session,
        owner,
        pid: 1,
        kind: LockKind::Write,
        start: 0,
        end: 9,
        wait: false,
    };
    h.ok(lock(short, 1));
    // An election took 30 s: the short session's lease ran out (not yet expired).
    h.t += 30;
    assert_eq!(h.err(Op::Heartbeat { session: short }), Errno::ESTALE);
    h.ok(Op::ExtendSessions);
    assert_eq!(
        h.ok(Op::Heartbeat { session: short }),
        Reply::Session { id: short, expires: Timespec::new(h.t + 5, 0) }
    );
    let r = h.ok(Op::Heartbeat { session: long });
    assert_eq!(r, Reply::Session { id: long, expires: Timespec::new(h.t + 100, 0) });
    // Its lock still holds against another session.
    let other = h.session(5_000);
    assert_eq!(h.err(lock(other, 2)), Errno::EAGAIN);
    h.ok(Op::ExpireSessions);
    assert!(h.q(Query::SessionInfo { session: short }).is_ok());
}

#[test]
fn orphan_lifetime_across_sessions() {
    let mut h = H::new();
    let vol = h.vol;
    let s1 = h.session(100_000);
    let s2 = h.session(5_000);
    let f = h.file(ROOT, "f");
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: slice(9, 0, 10), staged: vec![] });
    h.ok(Op::Open { vol, ino: f, session: s1 });
    h.ok(Op::Open { vol, ino: f, session: s1 });
    h.ok(Op::Open { vol, ino: f, session: s2 });
    assert_eq!(h.err(Op::Open { vol, ino: 999, session: s1 }), Errno::ENOENT);
    assert_eq!(h.err(Op::Open { vol, ino: f, session: 77 }), Errno::ESTALE);
    let r = h.ok(Op::Unlink { vol, parent: ROOT, name: "f".into() });
    assert_eq!(r, Reply::Removed { ino: f, nlink: 0, freed: false });
    assert_eq!(h.attr(f).nlink, 0);
    // Writes to an open orphan still work.
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: slice(10, 0, 20), staged: vec![] });
    h.ok(Op::Release { vol, ino: f, session: s1 });
    h.ok(Op::Release { vol, ino: f, session: s1 });
    assert_eq!(h.err(Op::Release { vol, ino: f, session: s1 }), Errno::EBADF);
    assert!(h.q(Query::GetAttr { vol, ino: f }).is_ok());
    // s2's lease ends: it is gone for ops at once, and expiry frees the orphan.
    h.t += 10;
    assert_eq!(h.err(Op::Release { vol, ino: f, session: s2 }), Errno::ESTALE);
    assert!(h.q(Query::GetAttr { vol, ino: f }).is_ok());
    let (_, ch) = h.apply(Op::ExpireSessions);
    assert_eq!(h.q(Query::GetAttr { vol, ino: f }), Err(Errno::ENOENT));
    assert!(ch[0].changes.contains(&Change::Inode(f)));
    assert_eq!(h.sm.pending_deletes().collect::<Vec<_>>(), vec![9, 10]);
    assert!(h.q(Query::SessionInfo { session: s1 }).is_ok());
    assert_eq!(h.q(Query::SessionInfo { session: s2 }), Err(Errno::ESTALE));
}

#[test]
fn close_session_frees_orphans() {
    let mut h = H::new();
    let vol = h.vol;
    let s = h.session(100_000);
    let mut op = h.mknod_op(ROOT, "f");
    if let Op::Mknod { session, .. } = &mut op {
        *session = Some(s);
    }
    let f = entry_ino(h.ok(op));
    h.ok(Op::Unlink { vol, parent: ROOT, name: "f".into() });
    assert!(h.q(Query::GetAttr { vol, ino: f }).is_ok());
    h.ok(Op::CloseSession { session: s });
    assert_eq!(h.q(Query::GetAttr { vol, ino: f }), Err(Errno::ENOENT));
    let Ok(Reply::StatFs(st)) = h.q(Query::StatFs { vol }) else { panic!() };
    assert_eq!(st.used_inodes, 1);
}

// ---------- locks ----------

fn setlk(h: &H, s: u64, owner: u64, kind: LockKind, start: u64, end: u64, wait: bool) -> Op {
    Op::SetLk { vol: h.vol, ino: 2, session: s, owner, pid: owner as u32, kind, start, end, wait }
}

fn getlk(h: &H, s: u64, owner: u64, kind: LockKind, start: u64, end: u64) -> Option<LockInfo> {
    match h.q(Query::GetLk { vol: h.vol, ino: 2, session: s, owner, kind, start, end }) {
        Ok(Reply::Lock(l)) => l,
        r => panic!("{r:?}"),
    }
}

/// The ranges an owner holds, probed with GetLk from another owner.
fn held(h: &H, s: u64, owner: u64) -> Vec<(LockKind, u64, u64)> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    loop {
        match getlk(h, 999_999, 0, LockKind::Write, pos, u64::MAX) {
            Some(l) if l.session == s && l.owner == owner => {
                out.push((l.kind, l.start, l.end));
                if l.end == u64::MAX {
                    return out;
                }
                pos = l.end + 1;
            }
            _ => return out,
        }
    }
}

#[test]
fn record_locks_split_merge() {
    use LockKind::*;
    let mut h = H::new();
    let f = h.file(ROOT, "f");
    assert_eq!(f, 2);
    let s = h.session(100_000);
    h.ok(setlk(&h, s, 1, Write, 0, 99, false));
    assert_eq!(held(&h, s, 1), vec![(Write, 0, 99)]);
    // A read lock in the middle splits the write lock.
    h.ok(setlk(&h, s, 1, Read, 40, 59, false));
    assert_eq!(held(&h, s, 1), vec![(Write, 0, 39), (Read, 40, 59), (Write, 60, 99)]);
    // Writing over the middle again coalesces everything.
    h.ok(setlk(&h, s, 1, Write, 40, 59, false));
    assert_eq!(held(&h, s, 1), vec![(Write, 0, 99)]);
    // Adjacent ranges of the same kind coalesce.
    h.ok(setlk(&h, s, 1, Write, 100, 199, false));
    assert_eq!(held(&h, s, 1), vec![(Write, 0, 199)]);
    // Unlock splits.
    h.ok(setlk(&h, s, 1, Unlock, 50, 149, false));
    assert_eq!(held(&h, s, 1), vec![(Write, 0, 49), (Write, 150, 199)]);
    h.ok(setlk(&h, s, 1, Write, 300, u64::MAX, false));
    assert_eq!(held(&h, s, 1), vec![(Write, 0, 49), (Write, 150, 199), (Write, 300, u64::MAX)]);
    let (r, ch) = h.apply(setlk(&h, s, 1, Unlock, 0, u64::MAX, false));
    assert_eq!(r, Ok(Reply::Ok));
    assert_eq!(ch[0].changes, vec![Change::Inode(f)]);
    assert_eq!(held(&h, s, 1), vec![]);
    // Unlocking nothing changes nothing.
    let (r, ch) = h.apply(setlk(&h, s, 1, Unlock, 0, u64::MAX, false));
    assert_eq!((r, ch.len()), (Ok(Reply::Ok), 0));
    assert_eq!(h.err(setlk(&h, s, 1, Read, 5, 4, false)), Errno::EINVAL);
    assert_eq!(h.err(setlk(&h, 42, 1, Read, 0, 4, false)), Errno::ESTALE);
}

#[test]
fn record_lock_conflicts() {
    use LockKind::*;
    let mut h = H::new();
    h.file(ROOT, "f");
    let s1 = h.session(100_000);
    let s2 = h.session(30_000);
    h.ok(setlk(&h, s1, 1, Read, 0, 99, false));
    // Readers share; same session, different owners are different owners.
    h.ok(setlk(&h, s1, 2, Read, 50, 149, false));
    h.ok(setlk(&h, s2, 1, Read, 0, 9, false));
    assert_eq!(h.err(setlk(&h, s1, 3, Write, 95, 95, false)), Errno::EAGAIN);
    assert_eq!(h.err(setlk(&h, s2, 1, Write, 0, 9, false)), Errno::EAGAIN);
    h.ok(setlk(&h, s1, 3, Write, 150, 200, false));
    let l = getlk(&h, s2, 7, Write, 0, 0).unwrap();
    assert_eq!((l.session, l.owner, l.kind, l.start, l.end, l.pid), (s1, 1, Read, 0, 99, 1));
    assert_eq!(getlk(&h, s2, 7, Read, 0, 149), None);
    assert_eq!(
        getlk(&h, s1, 1, Write, 0, 49),
        Some(LockInfo { kind: Read, start: 0, end: 9, pid: 1, session: s2, owner: 1 })
    );
    assert_eq!(
        h.q(Query::GetLk { vol: h.vol, ino: 2, session: s1, owner: 1, kind: Unlock, start: 0, end: 1 }),
        Err(Errno::EINVAL)
    );
    // When s2's lease ends its locks stop conflicting at once and expiry removes them.
    h.t += 40;
    h.ok(setlk(&h, s1, 1, Write, 0, 9, false));
    let (_, ch) = h.apply(Op::ExpireSessions);
    assert_eq!(ch[0].changes, vec![Change::Inode(2)]);
}

#[test]
fn record_lock_deadlock_detection() {
    use LockKind::*;
    let mut h = H::new();
    h.file(ROOT, "f");
    let s1 = h.session(100_000);
    let s2 = h.session(100_000);
    let s3 = h.session(100_000);
    h.ok(setlk(&h, s1, 1, Write, 0, 9, false));
    h.ok(setlk(&h, s2, 1, Write, 10, 19, false));
    h.ok(setlk(&h, s3, 1, Write, 20, 29, false));
    // s1 waits for s2, s2 waits for s3: no cycle yet.
    assert_eq!(h.apply(setlk(&h, s1, 1, Write, 10, 10, true)).0, Err(Errno::EAGAIN));
    assert_eq!(h.apply(setlk(&h, s2, 1, Write, 20, 20, true)).0, Err(Errno::EAGAIN));
    // s3 waiting for s1 would close the cycle.
    assert_eq!(h.err(setlk(&h, s3, 1, Write, 0, 0, true)), Errno::EDEADLK);
    // Without wait it is a plain conflict.
    assert_eq!(h.err(setlk(&h, s3, 1, Write, 0, 0, false)), Errno::EAGAIN);
    // s1 gives up waiting (unlock clears its edge): no more deadlock.
    h.ok(setlk(&h, s1, 1, Unlock, 100, 100, false));
    assert_eq!(h.apply(setlk(&h, s3, 1, Write, 0, 0, true)).0, Err(Errno::EAGAIN));
    // s2 closing its session releases its lock and its waits.
    h.ok(Op::CloseSession { session: s2 });
    h.ok(setlk(&h, s1, 1, Write, 10, 10, false));
}

#[test]
fn flocks() {
    use LockKind::*;
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let s1 = h.session(100_000);
    let s2 = h.session(100_000);
    let fl = |s, owner, kind| Op::Flock { vol, ino: f, session: s, owner, kind };
    h.ok(fl(s1, 1, Read));
    h.ok(fl(s2, 1, Read));
    assert_eq!(h.err(fl(s1, 1, Write)), Errno::EAGAIN);
    h.ok(fl(s2, 1, Unlock));
    let (r, ch) = h.apply(fl(s1, 1, Write));
    assert_eq!(r, Ok(Reply::Ok));
    assert_eq!(ch[0].changes, vec![Change::Inode(f)]);
    assert_eq!(h.err(fl(s2, 1, Read)), Errno::EAGAIN);
    assert_eq!(h.err(fl(s1, 2, Read)), Errno::EAGAIN);
    h.ok(fl(s1, 1, Read));
    h.ok(fl(s2, 9, Unlock));
    h.ok(fl(s2, 1, Read));
    h.ok(Op::CloseSession { session: s1 });
    h.ok(fl(s2, 1, Write));
    assert_eq!(h.err(fl(77, 1, Write)), Errno::ESTALE);
    // Freeing the inode drops its locks.
    h.ok(Op::Unlink { vol, parent: ROOT, name: "f".into() });
    assert!(h.sm.snapshot().len() < 400);
}

// ---------- dedup ----------

#[test]
fn dedup_retry_returns_same_result() {
    let mut h = H::new();
    let op = h.mknod_op(ROOT, "f");
    let c = Command { client: 42, seq: 1, acked_below: 1, time: h.now(), op: op.clone() };
    let (r1, ch1) = h.sm.apply(&c);
    assert!(matches!(r1, Ok(Reply::Entry { created: true, .. })));
    assert_eq!(ch1.len(), 1);
    let fp = h.sm.fingerprint();
    let (r2, ch2) = h.sm.apply(&c);
    assert_eq!(r1, r2, "retry gets the stored result, not EEXIST");
    assert!(ch2.is_empty());
    assert_eq!(fp, h.sm.fingerprint());
    // A different seq is a new command.
    let c2 = Command { seq: 2, ..c.clone() };
    assert_eq!(h.sm.apply(&c2).0, Err(Errno::EEXIST));
    assert_eq!(h.sm.apply(&c2).0, Err(Errno::EEXIST));
    // Acknowledged seqs are dropped and refused.
    let c3 = Command { seq: 3, acked_below: 3, op: Op::AllocSlices { count: 1 }, ..c.clone() };
    assert_eq!(h.sm.apply(&c3).0, Ok(Reply::Range { start: 1, count: 1 }));
    assert_eq!(h.sm.apply(&c).0, Err(Errno::ESTALE));
    assert_eq!(h.sm.apply(&c3).0, Ok(Reply::Range { start: 1, count: 1 }));
    let c4 = Command { seq: 4, acked_below: 5, ..c3.clone() };
    assert_eq!(h.sm.apply(&c4).0, Err(Errno::ESTALE));
    // Client 0 is never de-duplicated.
    let z = Command { client: 0, ..c3.clone() };
    assert_eq!(h.sm.apply(&z).0, Ok(Reply::Range { start: 2, count: 1 }));
    assert_eq!(h.sm.apply(&z).0, Ok(Reply::Range { start: 3, count: 1 }));
}

#[test]
fn dedup_forgets_idle_clients() {
    let mut h = H::new();
    let c = Command { client: 7, seq: 1, acked_below: 0, time: h.now(), op: Op::AllocSlices { count: 1 } };
    let _ = h.sm.apply(&c);
    let mut later = h.command(Op::ExpireSessions);
    later.time = Timespec::new(h.t + 3601, 0);
    let _ = h.sm.apply(&later);
    // Forgotten: the same seq is applied again.
    let c = Command { time: later.time, ..c };
    assert_eq!(h.sm.apply(&c).0, Ok(Reply::Range { start: 2, count: 1 }));
}

#[test]
fn clock_never_goes_backwards() {
    let mut h = H::new();
    let mut c = h.command(h.mknod_op(ROOT, "f"));
    c.time = Timespec::new(5, 0);
    let (r, _) = h.sm.apply(&c);
    let Ok(Reply::Entry { attr, .. }) = r else { panic!() };
    assert_eq!(attr.ctime, Timespec::new(1001, 0));
}

// ---------- change events ----------

#[test]
fn change_sequences() {
    let mut h = H::new();
    let (_, ch) = h.apply(Op::Mkdir {
        vol: h.vol,
        parent: ROOT,
        name: "a".into(),
        mode: 0o755,
        uid: 0,
        gid: 0,
        ino: None,
    });
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].seq, 2);
    assert_eq!(ch[0].changes, vec![Change::Entry { parent: ROOT, name: b"a".to_vec() }, Change::Inode(ROOT)]);
    let (_, ch) = h.apply(Op::AllocSlices { count: 1 });
    assert!(ch.is_empty());
    let (_, ch) = h.apply(h.mknod_op(ROOT, "f"));
    assert_eq!(ch[0].seq, 3);
    let Ok(Reply::Volume(v)) = h.q(Query::VolumeByName { name: "vol".into() }) else { panic!() };
    assert_eq!(v.change_seq, 3);
}

// ---------- snapshots ----------

#[test]
fn snapshot_round_trip_and_corruption() {
    let mut h = H::new();
    let vol = h.vol;
    let a = h.mkdir(ROOT, "a");
    let f = h.file(a, "f");
    let s = h.session(100_000);
    h.ok(Op::Open { vol, ino: f, session: s });
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: slice(3, 0, 10), staged: vec![] });
    h.ok(Op::SetXattr { vol, ino: f, name: b"user.x".to_vec(), value: b"y".to_vec(), flags: 0 });
    h.ok(setlk(&h, s, 1, LockKind::Write, 0, 10, false));
    let c = Command { client: 5, seq: 1, acked_below: 0, time: h.now(), op: Op::AllocSlices { count: 2 } };
    let _ = h.sm.apply(&c);
    let bytes = h.sm.snapshot();
    let r = StateMachine::restore(&bytes).unwrap();
    assert_eq!(r.snapshot(), bytes);
    assert_eq!(r.fingerprint(), h.sm.fingerprint());
    assert_eq!(
        r.query(&Query::Lookup { vol, parent: a, name: b"f".to_vec() }),
        h.q(Query::Lookup { vol, parent: a, name: b"f".to_vec() })
    );
    // Dedup table survives.
    let mut r = r;
    assert_eq!(r.apply(&c), h.sm.apply(&c));
    // Corruption is reported, never a panic.
    assert!(matches!(StateMachine::restore(&[]), Err(SnapshotError::Corrupt(_))));
    let mut bad = bytes.clone();
    bad[0] ^= 0xff;
    assert!(matches!(StateMachine::restore(&bad), Err(SnapshotError::Corrupt(_))));
    let mut unknown = bytes.clone();
    unknown[8] = 9;
    assert!(matches!(StateMachine::restore(&unknown), Err(SnapshotError::Version(9))));
    assert!(matches!(StateMachine::restore(&bytes[..bytes.len() - 1]), Err(SnapshotError::Corrupt(_))));
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(StateMachine::restore(&long), Err(SnapshotError::Corrupt(_))));
    for i in 9..bytes.len() {
        let mut b = bytes.clone();
        b[i] = b[i].wrapping_add(0x55);
        let _ = StateMachine::restore(&b);
        b.truncate(i);
        let _ = StateMachine::restore(&b);
    }
}

#[test]
fn expiry_releases_flocks_record_locks_and_waits() {
    use LockKind::*;
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let s1 = h.session(20_000);
    let s2 = h.session(100_000);
    h.ok(setlk(&h, s1, 1, Write, 0, 9, false));
    h.ok(Op::Flock { vol, ino: f, session: s1, owner: 1, kind: Write });
    h.ok(setlk(&h, s2, 1, Write, 10, 19, false));
    assert_eq!(h.apply(setlk(&h, s1, 1, Write, 10, 10, true)).0, Err(Errno::EAGAIN));
    assert_eq!(h.err(Op::Flock { vol, ino: f, session: s2, owner: 1, kind: Read }), Errno::EAGAIN);
    h.t += 30;
    let before = h.sm.snapshot().len();
    let (r, ch) = h.apply(Op::ExpireSessions);
    assert_eq!(r, Ok(Reply::Ok));
    assert_eq!(ch[0].changes, vec![Change::Inode(f)]);
    assert!(h.sm.snapshot().len() < before);
    h.ok(Op::Flock { vol, ino: f, session: s2, owner: 1, kind: Write });
    h.ok(setlk(&h, s2, 1, Write, 0, 9, false));
    assert_eq!(held(&h, s2, 1), vec![(Write, 0, 19)]);
}
