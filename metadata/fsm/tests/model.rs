//! Model-based property test: random namespace op sequences applied to the state machine and
//! to a small, independent reference model (an inode tree whose link counts and ancestry are
//! computed from the structure, not tracked incrementally). After every step both must agree
//! on the outcome (reply or errno) and on the whole visible tree. A second property checks
//! that snapshot -> restore -> snapshot is byte-identical and that a restored copy keeps
//! behaving exactly like the original.

use std::collections::{BTreeMap, BTreeSet};

use elea_common::{Errno, Ino, Timespec};
use elea_fsm::*;
use proptest::prelude::*;

const ROOT: Ino = 1;
const MISSING: Ino = 999_999;
const NAMES: [&[u8]; 6] = [b"a", b"b", b"c", b"d", b"", b"."];
const XNAMES: [&[u8]; 3] = [b"user.x", b"user.y", b"user.z"];
const SIZES: [u64; 5] = [0, 1, 4096, 1 << 30, (1 << 60) + 1];

// ---------- the reference model ----------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Link,
}

#[derive(Debug, Clone)]
struct Node {
    kind: Kind,
    perm: u32,
    size: u64,
    children: BTreeMap<Vec<u8>, Ino>,
    xattrs: BTreeSet<Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Model {
    nodes: BTreeMap<Ino, Node>,
    next_ino: Ino,
}

/// What the model expects an op to reply (only the parts the model knows).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Ok,
    Entry { ino: Ino, created: bool },
    Removed { ino: Ino, nlink: u32, freed: bool },
    Size(u64),
    Perm(u32),
}

type MR = Result<Out, Errno>;

fn name_err(n: &[u8]) -> Result<(), Errno> {
    if n.is_empty() {
        Err(Errno::ENOENT)
    } else if n == b"." || n == b".." || n.contains(&b'/') {
        Err(Errno::EINVAL)
    } else {
        Ok(())
    }
}

impl Model {
    fn new() -> Self {
        let root = Node {
            kind: Kind::Dir,
            perm: 0o755,
            size: 0,
            children: BTreeMap::new(),
            xattrs: BTreeSet::new(),
        };
        Model { nodes: BTreeMap::from([(ROOT, root)]), next_ino: 2 }
    }

    fn resolve(&self, path: &[&[u8]]) -> Option<Ino> {
        let mut cur = ROOT;
        for c in path {
            cur = *self.nodes.get(&cur)?.children.get(*c)?;
        }
        Some(cur)
    }

    /// Inodes from the root down to `target` (found by searching the tree).
    fn chain(&self, target: Ino) -> Vec<Ino> {
        fn walk(m: &Model, at: Ino, target: Ino, acc: &mut Vec<Ino>) -> bool {
            acc.push(at);
            if at == target {
                return true;
            }
            if let Some(n) = m.nodes.get(&at) {
                for c in n.children.values() {
                    if m.nodes.get(c).is_some_and(|x| x.kind == Kind::Dir) && walk(m, *c, target, acc) {
                        return true;
                    }
                }
            }
            acc.pop();
            false
        }
        let mut acc = Vec::new();
        walk(self, ROOT, target, &mut acc);
        acc
    }

    fn nlink(&self, ino: Ino) -> u32 {
        let n = &self.nodes[&ino];
        if n.kind == Kind::Dir {
            2 + n.children.values().filter(|c| self.nodes[c].kind == Kind::Dir).count() as u32
        } else {
            self.nodes.values().flat_map(|d| d.children.values()).filter(|c| **c == ino).count() as u32
        }
    }

    fn dir(&self, ino: Ino) -> Result<&Node, Errno> {
        let n = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        if n.kind != Kind::Dir {
            return Err(Errno::ENOTDIR);
        }
        Ok(n)
    }

    fn lookup(&self, p: Ino, n: &[u8]) -> Option<Ino> {
        self.nodes.get(&p).and_then(|d| d.children.get(n)).copied()
    }

    fn create(&mut self, p: Ino, n: &[u8], kind: Kind, mut perm: u32, size: u64) -> MR {
        let parent_perm = self.dir(p)?.perm;
        if kind == Kind::Dir && parent_perm & 0o2000 != 0 {
            perm |= 0o2000;
        }
        name_err(n)?;
        if self.lookup(p, n).is_some() {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let node = Node { kind, perm, size, children: BTreeMap::new(), xattrs: BTreeSet::new() };
        self.nodes.insert(ino, node);
        self.nodes.get_mut(&p).unwrap().children.insert(n.to_vec(), ino);
        Ok(Out::Entry { ino, created: true })
    }

    /// Drop one entry's reference to `ino`; returns the Removed reply.
    fn unref(&mut self, ino: Ino) -> Out {
        let nlink = if self.nodes[&ino].kind == Kind::Dir { 0 } else { self.nlink(ino) };
        if nlink == 0 {
            self.nodes.remove(&ino);
        }
        Out::Removed { ino, nlink, freed: nlink == 0 }
    }

    fn apply(&mut self, op: &MOp) -> MR {
        match op {
            MOp::Mkdir { dir, name, perm } => {
                let p = self.res(*dir);
                self.create(p, NAMES[*name], Kind::Dir, perm & 0o7777, 0)
            }
            MOp::Mknod { dir, name, excl } => {
                let p = self.res(*dir);
                let n = NAMES[*name];
                self.dir(p)?;
                name_err(n)?;
                if let Some(e) = self.lookup(p, n) {
                    if *excl {
                        return Err(Errno::EEXIST);
                    }
                    if self.nodes[&e].kind == Kind::Dir {
                        return Err(Errno::EISDIR);
                    }
                    return Ok(Out::Entry { ino: e, created: false });
                }
                self.create(p, n, Kind::File, 0o644, 0)
            }
            MOp::Symlink { dir, name, tlen } => {
                if *tlen == 0 {
                    return Err(Errno::ENOENT);
                }
                let p = self.res(*dir);
                self.create(p, NAMES[*name], Kind::Link, 0o777, *tlen as u64)
            }
            MOp::Link { src, dir, name } => {
                let s = self.res_any(*src);
                let p = self.res(*dir);
                let n = NAMES[*name];
                let sk = self.nodes.get(&s).ok_or(Errno::ENOENT)?.kind;
                self.dir(p)?;
                name_err(n)?;
                if self.lookup(p, n).is_some() {
                    return Err(Errno::EEXIST);
                }
                if sk == Kind::Dir {
                    return Err(Errno::EPERM);
                }
                self.nodes.get_mut(&p).unwrap().children.insert(n.to_vec(), s);
                Ok(Out::Entry { ino: s, created: true })
            }
            MOp::Unlink { dir, name } => {
                let p = self.res(*dir);
                let n = &self.src_name(p, *name);
                self.dir(p)?;
                name_err(n)?;
                let e = self.lookup(p, n).ok_or(Errno::ENOENT)?;
                if self.nodes[&e].kind == Kind::Dir {
                    return Err(Errno::EISDIR);
                }
                self.nodes.get_mut(&p).unwrap().children.remove(n);
                Ok(self.unref(e))
            }
            MOp::Rmdir { dir, name } => {
                let p = self.res(*dir);
                let n = &self.src_name(p, *name);
                self.dir(p)?;
                name_err(n)?;
                let e = self.lookup(p, n).ok_or(Errno::ENOENT)?;
                let node = &self.nodes[&e];
                if node.kind != Kind::Dir {
                    return Err(Errno::ENOTDIR);
                }
                if !node.children.is_empty() {
                    return Err(Errno::ENOTEMPTY);
                }
                self.nodes.get_mut(&p).unwrap().children.remove(n);
                Ok(self.unref(e))
            }
            MOp::Rename { d1, n1, d2, n2, flags } => self.rename(*d1, *n1, *d2, *n2, *flags),
            MOp::SetSize { path, size } => {
                let i = self.res_any(*path);
                let node = self.nodes.get_mut(&i).ok_or(Errno::ENOENT)?;
                let size = SIZES[*size];
                match node.kind {
                    Kind::Dir => Err(Errno::EISDIR),
                    Kind::Link => Err(Errno::EINVAL),
                    Kind::File if size > 1 << 60 => Err(Errno::EFBIG),
                    Kind::File => {
                        node.size = size;
                        Ok(Out::Size(size))
                    }
                }
            }
            MOp::SetMode { path, perm } => {
                let i = self.res_any(*path);
                let node = self.nodes.get_mut(&i).ok_or(Errno::ENOENT)?;
                node.perm = perm & 0o7777;
                Ok(Out::Perm(node.perm))
            }
            MOp::SetXattr { path, xname, flags } => {
                let i = self.res_any(*path);
                let node = self.nodes.get_mut(&i).ok_or(Errno::ENOENT)?;
                let x = XNAMES[*xname];
                if *flags == 3 {
                    return Err(Errno::EINVAL);
                }
                let exists = node.xattrs.contains(x);
                if exists && *flags == 1 {
                    return Err(Errno::EEXIST);
                }
                if !exists && *flags == 2 {
                    return Err(Errno::ENODATA);
                }
                node.xattrs.insert(x.to_vec());
                Ok(Out::Ok)
            }
        }
    }

    fn rename(&mut self, d1: usize, n1: usize, d2: usize, n2: usize, flags: u32) -> MR {
        let (p1, p2) = (self.res(d1), self.res(d2));
        let (n1, n2) = (&self.src_name(p1, n1), NAMES[n2]);
        if flags > 2 {
            return Err(Errno::EINVAL);
        }
        self.dir(p1)?;
        self.dir(p2)?;
        name_err(n1)?;
        name_err(n2)?;
        let s = self.lookup(p1, n1).ok_or(Errno::ENOENT)?;
        let d = self.lookup(p2, n2);
        if flags == 2 && d.is_none() {
            return Err(Errno::ENOENT);
        }
        if flags == 1 && d.is_some() {
            return Err(Errno::EEXIST);
        }
        let s_dir = self.nodes[&s].kind == Kind::Dir;
        if s_dir && self.chain(p2).contains(&s) {
            return Err(Errno::EINVAL);
        }
        if let Some(d) = d {
            if self.nodes[&d].kind == Kind::Dir && self.chain(p1).contains(&d) {
                return Err(if flags == 2 { Errno::EINVAL } else { Errno::ENOTEMPTY });
            }
            if d == s {
                return Ok(Out::Ok);
            }
        }
        if flags == 2 {
            let d = d.unwrap();
            self.nodes.get_mut(&p1).unwrap().children.insert(n1.to_vec(), d);
            self.nodes.get_mut(&p2).unwrap().children.insert(n2.to_vec(), s);
            return Ok(Out::Ok);
        }
        if let Some(d) = d {
            let dn = &self.nodes[&d];
            let d_dir = dn.kind == Kind::Dir;
            if s_dir && !d_dir {
                return Err(Errno::ENOTDIR);
            }
            if !s_dir && d_dir {
                return Err(Errno::EISDIR);
            }
            if d_dir && !dn.children.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
        }
        self.nodes.get_mut(&p1).unwrap().children.remove(n1);
        self.nodes.get_mut(&p2).unwrap().children.insert(n2.to_vec(), s);
        match d {
            Some(d) => Ok(self.unref(d)),
            None => Ok(Out::Ok),
        }
    }

    /// Resolve a selector: mostly an existing directory (so ops mostly apply), sometimes a
    /// fixed path that may not exist, any node (maybe not a directory) or a missing inode.
    fn res(&self, sel: usize) -> Ino {
        match sel % 16 {
            15 => MISSING,
            14 => self.resolve(&PATHS[(sel / 16) % PATHS.len()]).unwrap_or(MISSING),
            13 => {
                let all: Vec<Ino> = self.nodes.keys().copied().collect();
                all[(sel / 16) % all.len()]
            }
            _ => {
                let dirs: Vec<Ino> =
                    self.nodes.iter().filter(|(_, n)| n.kind == Kind::Dir).map(|(i, _)| *i).collect();
                dirs[(sel / 16) % dirs.len()]
            }
        }
    }

    /// A name for an op's source entry: mostly an existing entry of `dir`.
    fn src_name(&self, dir: Ino, sel: usize) -> Vec<u8> {
        if let Some(d) = self.nodes.get(&dir)
            && sel % 8 != 7
            && !d.children.is_empty()
        {
            return d.children.keys().nth((sel / 8) % d.children.len()).cloned().unwrap_or_default();
        }
        NAMES[sel % NAMES.len()].to_vec()
    }

    /// Resolve a selector for any node (mostly existing ones).
    fn res_any(&self, sel: usize) -> Ino {
        if sel % 16 == 15 {
            return MISSING;
        }
        let all: Vec<Ino> = self.nodes.keys().copied().collect();
        all[(sel / 16) % all.len()]
    }

    /// The visible tree: path -> (ino, kind, nlink, size, perm, xattr names).
    fn tree(&self) -> BTreeMap<Vec<u8>, Seen> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(Vec::new(), ROOT)];
        while let Some((path, ino)) = stack.pop() {
            let n = &self.nodes[&ino];
            out.insert(
                path.clone(),
                Seen {
                    ino,
                    kind: match n.kind {
                        Kind::Dir => FileType::Directory,
                        Kind::File => FileType::Regular,
                        Kind::Link => FileType::Symlink,
                    },
                    nlink: self.nlink(ino),
                    size: n.size,
                    perm: n.perm,
                    xattrs: n.xattrs.iter().cloned().collect(),
                },
            );
            if n.kind == Kind::Dir {
                for (name, c) in &n.children {
                    let mut p = path.clone();
                    p.push(b'/');
                    p.extend_from_slice(name);
                    stack.push((p, *c));
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    ino: Ino,
    kind: FileType,
    nlink: u32,
    size: u64,
    perm: u32,
    xattrs: Vec<Vec<u8>>,
}

static PATHS: std::sync::LazyLock<Vec<Vec<&'static [u8]>>> = std::sync::LazyLock::new(|| {
    let base: [&[u8]; 3] = [b"a", b"b", b"c"];
    let mut v: Vec<Vec<&[u8]>> = vec![vec![]];
    for x in base {
        v.push(vec![x]);
    }
    for x in base {
        for y in base {
            v.push(vec![x, y]);
        }
    }
    v.push(vec![b"a", b"b", b"c"]);
    v
});

// ---------- ops ----------

#[derive(Debug, Clone)]
enum MOp {
    Mkdir { dir: usize, name: usize, perm: u32 },
    Mknod { dir: usize, name: usize, excl: bool },
    Symlink { dir: usize, name: usize, tlen: usize },
    Link { src: usize, dir: usize, name: usize },
    Unlink { dir: usize, name: usize },
    Rmdir { dir: usize, name: usize },
    Rename { d1: usize, n1: usize, d2: usize, n2: usize, flags: u32 },
    SetSize { path: usize, size: usize },
    SetMode { path: usize, perm: u32 },
    SetXattr { path: usize, xname: usize, flags: u32 },
}

fn name_idx() -> impl Strategy<Value = usize> {
    prop_oneof![10 => 0usize..4, 1 => 4usize..6]
}

fn path_idx() -> impl Strategy<Value = usize> {
    0usize..4096
}

fn mop() -> impl Strategy<Value = MOp> {
    prop_oneof![
        4 => (path_idx(), name_idx(), 0u32..0o10000).prop_map(|(dir, name, perm)| MOp::Mkdir { dir, name, perm }),
        4 => (path_idx(), name_idx(), any::<bool>()).prop_map(|(dir, name, excl)| MOp::Mknod { dir, name, excl }),
        1 => (path_idx(), name_idx(), 0usize..3).prop_map(|(dir, name, tlen)| MOp::Symlink { dir, name, tlen }),
        2 => (path_idx(), path_idx(), name_idx()).prop_map(|(src, dir, name)| MOp::Link { src, dir, name }),
        2 => (path_idx(), path_idx()).prop_map(|(dir, name)| MOp::Unlink { dir, name }),
        2 => (path_idx(), path_idx()).prop_map(|(dir, name)| MOp::Rmdir { dir, name }),
        5 => (path_idx(), path_idx(), path_idx(), name_idx(), prop_oneof![4 => Just(0u32), 2 => Just(1u32), 2 => Just(2u32), 1 => Just(3u32), 1 => Just(8u32)])
            .prop_map(|(d1, n1, d2, n2, flags)| MOp::Rename { d1, n1, d2, n2, flags }),
        1 => (path_idx(), 0usize..5).prop_map(|(path, size)| MOp::SetSize { path, size }),
        1 => (path_idx(), 0u32..0o10000).prop_map(|(path, perm)| MOp::SetMode { path, perm }),
        1 => (path_idx(), 0usize..3, 0u32..4).prop_map(|(path, xname, flags)| MOp::SetXattr { path, xname, flags }),
    ]
}

/// The state machine op for a model op (paths resolved in the model).
fn to_op(m: &Model, op: &MOp) -> Op {
    let vol = 1;
    let name = |i: usize| NAMES[i].to_vec();
    match op {
        MOp::Mkdir { dir, name: n, perm } => {
            Op::Mkdir { vol, parent: m.res(*dir), name: name(*n), mode: *perm, uid: 0, gid: 0, ino: None }
        }
        MOp::Mknod { dir, name: n, excl } => Op::Mknod {
            vol,
            parent: m.res(*dir),
            name: name(*n),
            mode: mode::S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: *excl,
            ino: None,
            session: None,
        },
        MOp::Symlink { dir, name: n, tlen } => Op::Symlink {
            vol,
            parent: m.res(*dir),
            name: name(*n),
            target: vec![b't'; *tlen],
            uid: 0,
            gid: 0,
            ino: None,
        },
        MOp::Link { src, dir, name: n } => {
            Op::Link { vol, ino: m.res_any(*src), new_parent: m.res(*dir), new_name: name(*n) }
        }
        MOp::Unlink { dir, name: n } => {
            Op::Unlink { vol, parent: m.res(*dir), name: m.src_name(m.res(*dir), *n) }
        }
        MOp::Rmdir { dir, name: n } => {
            Op::Rmdir { vol, parent: m.res(*dir), name: m.src_name(m.res(*dir), *n) }
        }
        MOp::Rename { d1, n1, d2, n2, flags } => Op::Rename {
            vol,
            parent: m.res(*d1),
            name: m.src_name(m.res(*d1), *n1),
            new_parent: m.res(*d2),
            new_name: name(*n2),
            flags: *flags,
        },
        MOp::SetSize { path, size } => Op::SetAttr {
            vol,
            ino: m.res_any(*path),
            set: SetAttr { size: Some(SIZES[*size]), ..Default::default() },
        },
        MOp::SetMode { path, perm } => Op::SetAttr {
            vol,
            ino: m.res_any(*path),
            set: SetAttr { mode: Some(*perm), ..Default::default() },
        },
        MOp::SetXattr { path, xname, flags } => Op::SetXattr {
            vol,
            ino: m.res_any(*path),
            name: XNAMES[*xname].to_vec(),
            value: b"v".to_vec(),
            flags: *flags,
        },
    }
}

fn cmd(step: usize, op: Op) -> Command {
    Command { client: 0, seq: 0, acked_below: 0, time: Timespec::new(1000 + step as i64, 0), op }
}

/// Compare a state machine reply with the model's expectation.
fn same_outcome(got: &OpResult, want: &MR) -> bool {
    match (got, want) {
        (Err(a), Err(b)) => a == b,
        (Ok(Reply::Ok), Ok(Out::Ok)) => true,
        (Ok(Reply::Entry { attr, created }), Ok(Out::Entry { ino, created: c })) => {
            attr.ino == *ino && created == c
        }
        (Ok(Reply::Removed { ino, nlink, freed }), Ok(Out::Removed { ino: i, nlink: n, freed: f })) => {
            ino == i && nlink == n && freed == f
        }
        (Ok(Reply::Attr(a)), Ok(Out::Size(s))) => a.size == *s,
        (Ok(Reply::Attr(a)), Ok(Out::Perm(p))) => a.mode & 0o7777 == *p,
        _ => false,
    }
}

/// The visible tree of the state machine, walked with paged ReadDir (plus) from the root,
/// cross-checked with Lookup and GetAttr.
fn fsm_tree(sm: &StateMachine) -> Result<BTreeMap<Vec<u8>, Seen>, String> {
    let vol = 1;
    let mut out = BTreeMap::new();
    let root = match sm.query(&Query::GetAttr { vol, ino: ROOT }) {
        Ok(Reply::Attr(a)) => a,
        r => return Err(format!("root: {r:?}")),
    };
    let mut stack = vec![(Vec::new(), root, ROOT)];
    while let Some((path, attr, parent)) = stack.pop() {
        let ino = attr.ino;
        let xattrs = match sm.query(&Query::ListXattr { vol, ino }) {
            Ok(Reply::Names(n)) => n,
            r => return Err(format!("listxattr {ino}: {r:?}")),
        };
        let kind = attr.file_type().ok_or("bad type")?;
        out.insert(
            path.clone(),
            Seen { ino, kind, nlink: attr.nlink, size: attr.size, perm: attr.mode & 0o7777, xattrs },
        );
        if kind != FileType::Directory {
            continue;
        }
        match sm.query(&Query::Lookup { vol, parent: ino, name: b"..".to_vec() }) {
            Ok(Reply::Entry { attr, .. }) if attr.ino == parent => {}
            r => return Err(format!("'..' of {ino} should be {parent}: {r:?}")),
        }
        let mut cookie = 0;
        let mut names = BTreeSet::new();
        loop {
            let r = sm.query(&Query::ReadDir { vol, ino, cookie, limit: 2, plus: true });
            let Ok(Reply::Dir { entries, eof }) = r else { return Err(format!("readdir {ino}: {r:?}")) };
            for e in entries {
                if e.cookie <= cookie {
                    return Err("cookies not increasing".into());
                }
                cookie = e.cookie;
                if e.name == b"." || e.name == b".." {
                    continue;
                }
                if !names.insert(e.name.clone()) {
                    return Err(format!("duplicate entry {:?}", e.name));
                }
                let a = e.attr.clone().ok_or("plus without attr")?;
                let got = sm.query(&Query::GetAttr { vol, ino: e.ino });
                if got != Ok(Reply::Attr(a.clone())) {
                    return Err(format!("getattr {} differs from readdir: {got:?}", e.ino));
                }
                let l = sm.query(&Query::Lookup { vol, parent: ino, name: e.name.clone() });
                if l != Ok(Reply::Entry { attr: a.clone(), created: false }) {
                    return Err(format!("lookup {:?}: {l:?}", e.name));
                }
                if Some(e.kind) != a.file_type() {
                    return Err("readdir kind".into());
                }
                let mut p = path.clone();
                p.push(b'/');
                p.extend_from_slice(&e.name);
                stack.push((p, a, ino));
            }
            if eof {
                break;
            }
        }
    }
    Ok(out)
}

fn check_step(sm: &StateMachine, m: &Model) -> Result<(), TestCaseError> {
    let got = fsm_tree(sm).map_err(TestCaseError::fail)?;
    let want = m.tree();
    prop_assert_eq!(&got, &want);
    let Ok(Reply::StatFs(st)) = sm.query(&Query::StatFs { vol: 1 }) else {
        return Err(TestCaseError::fail("statfs"));
    };
    prop_assert_eq!(st.used_inodes, m.nodes.len() as u64);
    let bytes: u64 = m.nodes.values().filter(|n| n.kind == Kind::File).map(|n| n.size).sum();
    prop_assert_eq!(st.used_bytes, bytes);
    Ok(())
}

fn new_sm() -> StateMachine {
    let mut sm = StateMachine::new();
    let (r, _) = sm.apply(&cmd(0, Op::CreateVolume { name: "v".into(), config: Default::default() }));
    assert!(r.is_ok());
    sm
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn matches_reference_model(ops in prop::collection::vec(mop(), 50..200)) {
        let mut sm = new_sm();
        let mut m = Model::new();
        let mut oks = 0;
        for (i, op) in ops.iter().enumerate() {
            let fsm_op = to_op(&m, op);
            let before = sm.fingerprint();
            let (got, changes) = sm.apply(&cmd(i + 1, fsm_op.clone()));
            let want = m.apply(op);
            prop_assert!(same_outcome(&got, &want), "step {i} {fsm_op:?}: fsm {got:?}, model {want:?}");
            oks += usize::from(got.is_ok() && !matches!(fsm_op, Op::Mknod { .. } | Op::Mkdir { .. } | Op::Symlink { .. }));
            if got.is_err() {
                prop_assert_eq!(before, sm.fingerprint(), "failed op changed the state");
                prop_assert!(changes.is_empty());
            }
            check_step(&sm, &m)?;
        }
        if std::env::var("MODEL_STATS").is_ok() {
            eprintln!("ops {} nodes {} created {} other ok {oks}", ops.len(), m.nodes.len(), m.next_ino - 2);
        }
    }

    #[test]
    fn snapshot_restore_is_faithful(ops in prop::collection::vec(mop(), 20..120), cut in 0usize..120) {
        let mut sm = new_sm();
        let mut m = Model::new();
        let mut copy: Option<StateMachine> = None;
        let cut = cut.min(ops.len());
        for (i, op) in ops.iter().enumerate() {
            if i == cut {
                let bytes = sm.snapshot();
                let restored = StateMachine::restore(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(restored.snapshot(), bytes);
                copy = Some(restored);
            }
            let c = cmd(i + 1, to_op(&m, op));
            let _ = m.apply(op);
            let a = sm.apply(&c);
            if let Some(r) = copy.as_mut() {
                let b = r.apply(&c);
                prop_assert_eq!(&a, &b);
                prop_assert_eq!(r.fingerprint(), sm.fingerprint());
            }
        }
        let bytes = sm.snapshot();
        let r = StateMachine::restore(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(r.snapshot(), bytes);
    }
}
