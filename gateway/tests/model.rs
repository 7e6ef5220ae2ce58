//! Model-based tests of the VFS on a real in-process cluster (one metadata voter, two cache
//! nodes, a `file://` store).
//!
//! `vfs_matches_model_on_two_gateways` drives two gateways (each a [`Vfs`] with its own
//! metadata and data clients, on the same volume) with random operation sequences over a small
//! name space and compares every result with a simple in-memory model: the same success or
//! errno, the same inode numbers, types, link counts, sizes, modes and bytes. At the end of a
//! case every handle is closed and the whole tree is walked with readdir on both gateways.
//!
//! Consistency the model assumes (docs/SEMANTICS.md):
//! - Namespace and attribute operations are linearizable: every gateway sees every completed
//!   change at once.
//! - Writes are buffered per inode on the writing gateway and are committed only by a flush
//!   of that inode there: `flush`, `fsync`, `release` (close), a `read` or `getattr` of the
//!   inode, a `setattr` of the inode while it is open there, `fallocate` and
//!   `copy_file_range`. The gateways run with a `flush_delay` of an hour, so nothing else
//!   flushes, and the other gateway sees exactly the committed bytes. Buffered writes of two
//!   gateways commit in flush order (newest wins).
//! - On the writing gateway itself, operations see its own buffered writes (a truncation or
//!   an `O_TRUNC` open there discards them, as in a local file system; an `O_APPEND` write
//!   goes to the end including them).
//! - Close-to-open: opening a file drops the gateway's cached attributes and slice lists, so a
//!   read through a handle opened after the writer's flush returns the committed bytes. A
//!   handle opened earlier may return older bytes until the metadata watch reaches its
//!   gateway; the model then only asks that the read returns the committed bytes within a few
//!   seconds.
//!
//! Paths are resolved by the test with `lookup` one component at a time (a symlink is not
//! followed: using one as a directory is `ENOTDIR`; create, open and chmod of a symlink are
//! skipped). The `regression_*` tests at the end pin bugs the model found.
//!
//! `permissions_through_the_vfs` checks Linux's permission rules with non-root credentials,
//! and `open_unlinked_file_and_close_to_open` the life of an unlinked open file and
//! close-to-open between two gateways.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use common::{Gw, MemCluster, TestCluster, wait_until};
use elea_cache::DataPath;
use elea_common::ids::{BLOCK_SIZE, ROOT_INO};
use elea_common::{Errno, Ino};
use elea_fsm::{Attr, FileType, fallocate_flags, mode, rename_flags};
use elea_gateway::{Creds, SetAttrReq};
use elea_metadata::MetaApi;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

// ---- generated operations ------------------------------------------------------------

const NAMES: [&[u8]; 3] = [b"a", b"b", b"c"];

/// `/x` or `/x/y`, with names from [`NAMES`].
#[derive(Clone, Copy, PartialEq, Eq)]
struct P {
    a: u8,
    b: Option<u8>,
}

impl P {
    fn last(self) -> &'static [u8] {
        NAMES[usize::from(self.b.unwrap_or(self.a))]
    }
}

impl fmt::Debug for P {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |i: u8| String::from_utf8_lossy(NAMES[usize::from(i)]).into_owned();
        match self.b {
            Some(b) => write!(f, "/{}/{}", n(self.a), n(b)),
            None => write!(f, "/{}", n(self.a)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Acc {
    R,
    W,
    Rw,
}

impl Acc {
    fn flags(self) -> i32 {
        match self {
            Acc::R => libc::O_RDONLY,
            Acc::W => libc::O_WRONLY,
            Acc::Rw => libc::O_RDWR,
        }
    }
}

/// One operation. `gw` picks the gateway; `h` picks one of the open handles of either
/// gateway (the step runs on that handle's gateway); a step on a handle when none is open
/// does nothing.
#[derive(Clone, Debug)]
enum Step {
    Create { gw: usize, path: P, excl: bool, trunc: bool, append: bool, acc: Acc },
    Open { gw: usize, path: P, trunc: bool, append: bool, acc: Acc },
    Mkdir { gw: usize, path: P },
    Unlink { gw: usize, path: P },
    Rmdir { gw: usize, path: P },
    Rename { gw: usize, from: P, to: P, flags: u32 },
    Link { gw: usize, from: P, to: P },
    Symlink { gw: usize, path: P, target: u8 },
    Readlink { gw: usize, path: P },
    Write { h: Index, off: u64, len: usize, seed: u8 },
    Read { h: Index, off: u64, len: u32 },
    Truncate { gw: usize, path: P, size: u64 },
    Ftruncate { h: Index, size: u64 },
    Flush { h: Index },
    Fsync { h: Index },
    Close { h: Index },
    Chmod { gw: usize, path: P, mode: u32 },
    Getattr { gw: usize, path: P },
    Fstat { h: Index },
    Readdir { gw: usize, path: Option<P> },
    Fallocate { h: Index, off: u64, len: u64, mode: u32 },
    CopyRange { h_in: Index, h_out: Index, off_in: u64, off_out: u64, len: u64 },
}

fn path() -> impl Strategy<Value = P> {
    (0..3u8, proptest::option::weighted(0.4, 0..3u8)).prop_map(|(a, b)| P { a, b })
}

fn acc() -> impl Strategy<Value = Acc> {
    prop_oneof![1 => Just(Acc::R), 2 => Just(Acc::W), 3 => Just(Acc::Rw)]
}

fn gw() -> impl Strategy<Value = usize> {
    0..2usize
}

/// Mostly small offsets; sometimes past a page, 1 MiB out (a hole), or across the first
/// block boundary.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        12 => 0..160u64,
        2 => 4090..4100u64,
        1 => (1u64 << 20)..(1 << 20) + 40,
        1 => (BLOCK_SIZE - 8)..BLOCK_SIZE,
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), 0..200u64, 4000..5000u64]
}

fn step() -> impl Strategy<Value = Step> {
    use rename_flags::{RENAME_EXCHANGE, RENAME_NOREPLACE};
    let rename_flag = prop_oneof![3 => Just(0u32), 1 => Just(RENAME_NOREPLACE), 1 => Just(RENAME_EXCHANGE)];
    let falloc_mode = prop_oneof![
        Just(0u32),
        Just(fallocate_flags::FALLOC_FL_KEEP_SIZE),
        Just(fallocate_flags::FALLOC_FL_PUNCH_HOLE | fallocate_flags::FALLOC_FL_KEEP_SIZE),
        Just(fallocate_flags::FALLOC_FL_ZERO_RANGE),
        Just(fallocate_flags::FALLOC_FL_ZERO_RANGE | fallocate_flags::FALLOC_FL_KEEP_SIZE),
    ];
    let chmod_mode = prop_oneof![Just(0o600u32), Just(0o640), Just(0o644), Just(0o755), Just(0o2755)];
    prop_oneof![
        10 => (gw(), path(), any::<bool>(), prop::bool::weighted(0.3), prop::bool::weighted(0.2), acc()).prop_map(
            |(gw, path, excl, trunc, append, acc)| Step::Create { gw, path, excl, trunc, append, acc }
        ),
        6 => (gw(), path(), prop::bool::weighted(0.3), prop::bool::weighted(0.2), acc())
            .prop_map(|(gw, path, trunc, append, acc)| Step::Open { gw, path, trunc, append, acc }),
        3 => (gw(), path()).prop_map(|(gw, path)| Step::Mkdir { gw, path }),
        2 => (gw(), path()).prop_map(|(gw, path)| Step::Unlink { gw, path }),
        1 => (gw(), path()).prop_map(|(gw, path)| Step::Rmdir { gw, path }),
        3 => (gw(), path(), path(), rename_flag)
            .prop_map(|(gw, from, to, flags)| Step::Rename { gw, from, to, flags }),
        1 => (gw(), path(), path()).prop_map(|(gw, from, to)| Step::Link { gw, from, to }),
        2 => (gw(), path(), 0..3u8).prop_map(|(gw, path, target)| Step::Symlink { gw, path, target }),
        2 => (gw(), path()).prop_map(|(gw, path)| Step::Readlink { gw, path }),
        10 => (any::<Index>(), offset(), prop_oneof![4 => 1..48usize, 1 => 48..600usize], any::<u8>())
            .prop_map(|(h, off, len, seed)| Step::Write { h, off, len, seed }),
        6 => (any::<Index>(), prop_oneof![3 => 0..200u64, 1 => offset()], 1..400u32)
            .prop_map(|(h, off, len)| Step::Read { h, off, len }),
        1 => (gw(), path(), size()).prop_map(|(gw, path, size)| Step::Truncate { gw, path, size }),
        1 => (any::<Index>(), size()).prop_map(|(h, size)| Step::Ftruncate { h, size }),
        2 => any::<Index>().prop_map(|h| Step::Flush { h }),
        1 => any::<Index>().prop_map(|h| Step::Fsync { h }),
        2 => any::<Index>().prop_map(|h| Step::Close { h }),
        1 => (gw(), path(), chmod_mode).prop_map(|(gw, path, mode)| Step::Chmod { gw, path, mode }),
        2 => (gw(), path()).prop_map(|(gw, path)| Step::Getattr { gw, path }),
        1 => any::<Index>().prop_map(|h| Step::Fstat { h }),
        2 => (gw(), proptest::option::weighted(0.7, path()))
            .prop_map(|(gw, path)| Step::Readdir { gw, path }),
        2 => (any::<Index>(), 0..300u64, 1..300u64, falloc_mode)
            .prop_map(|(h, off, len, mode)| Step::Fallocate { h, off, len, mode }),
        2 => (any::<Index>(), any::<Index>(), 0..200u64, 0..300u64, 1..300u64).prop_map(
            |(h_in, h_out, off_in, off_out, len)| Step::CopyRange { h_in, h_out, off_in, off_out, len }
        ),
    ]
}

/// Steps that start a case: files (opened) and directories at the top.
fn prelude_step() -> impl Strategy<Value = Step> {
    let top = (0..3u8).prop_map(|a| P { a, b: None });
    prop_oneof![
        3 => (gw(), top.clone(), acc()).prop_map(|(gw, path, acc)| Step::Create {
            gw,
            path,
            excl: false,
            trunc: false,
            append: false,
            acc
        }),
        1 => (gw(), top).prop_map(|(gw, path)| Step::Mkdir { gw, path }),
    ]
}

/// A case: a few creates, then anything.
fn steps() -> impl Strategy<Value = Vec<Step>> {
    (proptest::collection::vec(prelude_step(), 1..5), proptest::collection::vec(step(), 8..60)).prop_map(
        |(mut a, b)| {
            a.extend(b);
            a
        },
    )
}

/// The bytes a write puts down: never zero, so holes stay recognisable.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i as u8).wrapping_mul(31)) | 1).collect()
}

fn symlink_target(t: u8) -> Vec<u8> {
    format!("target-{t}").into_bytes()
}

// ---- the model -----------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    fn of(a: &Attr) -> Option<Kind> {
        match a.file_type() {
            Some(FileType::Regular) => Some(Kind::File),
            Some(FileType::Directory) => Some(Kind::Dir),
            Some(FileType::Symlink) => Some(Kind::Symlink),
            _ => None,
        }
    }

    fn of_type(t: FileType) -> Option<Kind> {
        match t {
            FileType::Regular => Some(Kind::File),
            FileType::Directory => Some(Kind::Dir),
            FileType::Symlink => Some(Kind::Symlink),
            _ => None,
        }
    }
}

/// One inode of the model.
struct Node {
    kind: Kind,
    /// Its real inode number.
    ino: Ino,
    /// Permission bits.
    mode: u32,
    /// Committed bytes of a file; the target of a symlink.
    data: Vec<u8>,
    /// Entries of a directory.
    entries: BTreeMap<Vec<u8>, usize>,
    /// A directory's parent.
    parent: usize,
    /// Names of a non-directory; for a directory, whether it still exists.
    links: u32,
}

/// An open file.
#[derive(Clone, Copy, Debug)]
struct Handle {
    gw: usize,
    fh: u64,
    node: usize,
    acc: Acc,
    append: bool,
}

/// Buffered writes per inode: (offset, bytes), oldest first.
type Buffered = BTreeMap<usize, Vec<(u64, Vec<u8>)>>;

struct Model {
    nodes: Vec<Node>,
    /// Writes each gateway buffered, per inode, in order.
    pending: [Buffered; 2],
    /// Inodes whose committed bytes changed through the other gateway since this gateway
    /// last opened them (an already open handle may read older bytes for a while).
    stale: [BTreeSet<usize>; 2],
    handles: Vec<Handle>,
}

/// The model's verdict on a step the test does not try (outside what the model covers).
const SKIP: Errno = Errno(-1);

fn write_at(v: &mut Vec<u8>, off: u64, d: &[u8]) {
    let (off, end) = (off as usize, off as usize + d.len());
    if v.len() < end {
        v.resize(end, 0);
    }
    v[off..end].copy_from_slice(d);
}

impl Model {
    fn new() -> Self {
        let root = Node {
            kind: Kind::Dir,
            ino: ROOT_INO,
            mode: 0o755,
            data: Vec::new(),
            entries: BTreeMap::new(),
            parent: 0,
            links: 1,
        };
        Model {
            nodes: vec![root],
            pending: Default::default(),
            stale: Default::default(),
            handles: Vec::new(),
        }
    }

    fn is_dir(&self, n: usize) -> bool {
        self.nodes[n].kind == Kind::Dir
    }

    /// The directory a path names its last component in (not checked to be a directory:
    /// the test resolves `/x` of `/x/y` with a lookup, which succeeds for any type).
    fn parent(&self, p: P) -> Result<usize, Errno> {
        match p.b {
            None => Ok(0),
            Some(_) => self.nodes[0].entries.get(NAMES[usize::from(p.a)]).copied().ok_or(Errno::ENOENT),
        }
    }

    fn child(&self, dir: usize, name: &[u8]) -> Option<usize> {
        self.nodes[dir].entries.get(name).copied()
    }

    fn resolve(&self, p: P) -> Result<usize, Errno> {
        let par = self.parent(p)?;
        if !self.is_dir(par) {
            return Err(Errno::ENOTDIR);
        }
        self.child(par, p.last()).ok_or(Errno::ENOENT)
    }

    fn nlink(&self, n: usize) -> u32 {
        let node = &self.nodes[n];
        match node.kind {
            Kind::Dir if node.links == 0 => 0,
            Kind::Dir => 2 + node.entries.values().filter(|&&c| self.is_dir(c)).count() as u32,
            _ => node.links,
        }
    }

    fn is_ancestor_or_self(&self, a: usize, mut b: usize) -> bool {
        loop {
            if a == b {
                return true;
            }
            if b == 0 {
                return false;
            }
            b = self.nodes[b].parent;
        }
    }

    fn has_handle(&self, g: usize, n: usize) -> bool {
        self.handles.iter().any(|h| h.gw == g && h.node == n)
    }

    /// Commits gateway `g`'s buffered writes of `n`.
    fn flush(&mut self, g: usize, n: usize) {
        if let Some(ws) = self.pending[g].remove(&n) {
            for (off, d) in ws {
                write_at(&mut self.nodes[n].data, off, &d);
            }
            self.changed(g, n);
        }
    }

    /// The committed bytes of `n` changed through gateway `g`.
    fn changed(&mut self, g: usize, n: usize) {
        self.stale[1 - g].insert(n);
        self.stale[g].remove(&n);
    }

    /// The size gateway `g` sees, its own buffered writes included.
    fn local_size(&self, g: usize, n: usize) -> u64 {
        let committed = self.nodes[n].data.len() as u64;
        self.pending[g]
            .get(&n)
            .into_iter()
            .flatten()
            .map(|(o, d)| o + d.len() as u64)
            .fold(committed, u64::max)
    }

    fn set_size(&mut self, g: usize, n: usize, size: u64) {
        self.nodes[n].data.resize(size as usize, 0);
        self.changed(g, n);
    }

    fn buffered(&self, g: usize, n: usize) -> bool {
        self.pending[g].get(&n).is_some_and(|p| !p.is_empty())
    }

    /// An `O_TRUNC` open through gateway `g`.
    fn open_trunc(&mut self, g: usize, n: usize) {
        self.pending[g].remove(&n);
        if !self.nodes[n].data.is_empty() {
            self.set_size(g, n, 0);
        }
    }

    fn add(&mut self, parent: usize, name: &[u8], node: Node) -> usize {
        let n = self.nodes.len();
        self.nodes.push(node);
        self.nodes[parent].entries.insert(name.to_vec(), n);
        n
    }

    /// Drops one name of `n` (a directory stops existing).
    fn drop_link(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.links = node.links.saturating_sub(1);
        if node.kind == Kind::Dir {
            node.links = 0;
        }
    }
}

// ---- the harness ---------------------------------------------------------------------

fn class<T, U>(exp: &Result<T, Errno>, got: &Result<U, Errno>) -> Result<(), String> {
    match (exp, got) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(e), Err(g)) if e == g => Ok(()),
        (Ok(_), Err(g)) => Err(format!("expected success, got {g:?}")),
        (Err(e), Ok(_)) => Err(format!("expected {e:?}, got success")),
        (Err(e), Err(g)) => Err(format!("expected {e:?}, got {g:?}")),
    }
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(what()) }
}

fn show(b: &[u8]) -> String {
    if b.len() <= 64 {
        format!("{b:?}")
    } else {
        let first = b.iter().position(|&x| x != 0);
        format!("{} bytes (first non-zero at {first:?})", b.len())
    }
}

/// The first difference between two byte strings, for messages.
fn diff(exp: &[u8], got: &[u8]) -> String {
    let at = exp.iter().zip(got).position(|(a, b)| a != b).unwrap_or(exp.len().min(got.len()));
    let win = |v: &[u8]| v[at.min(v.len())..(at + 16).min(v.len())].to_vec();
    format!(
        "expected {} bytes, got {}; first difference at {at}: expected {:?}.., got {:?}..",
        exp.len(),
        got.len(),
        win(exp),
        win(got)
    )
}

struct Harness<M, D> {
    gw: [Gw<M, D>; 2],
    root: Creds,
    m: Model,
}

/// How long a handle opened before another gateway's flush may return older bytes.
const WATCH_LIMIT: Duration = Duration::from_secs(5);

impl<M: MetaApi, D: DataPath> Harness<M, D> {
    fn handle(&self, h: Index) -> Option<(usize, Handle)> {
        if self.m.handles.is_empty() {
            return None;
        }
        let i = h.index(self.m.handles.len());
        Some((i, self.m.handles[i]))
    }

    async fn r_parent(&self, g: usize, p: P) -> Result<Ino, Errno> {
        match p.b {
            None => Ok(ROOT_INO),
            Some(_) => Ok(self.gw[g].lookup(&self.root, ROOT_INO, NAMES[usize::from(p.a)]).await?.ino),
        }
    }

    async fn r_resolve(&self, g: usize, p: P) -> Result<Attr, Errno> {
        let par = self.r_parent(g, p).await?;
        self.gw[g].lookup(&self.root, par, p.last()).await
    }

    /// Compares attributes gateway `g` returned with the model (the size as `g` sees it: its
    /// own buffered writes included, flushed or not).
    fn check_attr(&self, g: usize, n: usize, a: &Attr) -> Result<(), String> {
        let node = &self.m.nodes[n];
        ensure(a.ino == node.ino, || format!("ino {} != model {}", a.ino, node.ino))?;
        ensure(Kind::of(a) == Some(node.kind), || {
            format!("type {:?} != model {:?}", a.file_type(), node.kind)
        })?;
        let nlink = self.m.nlink(n);
        ensure(a.nlink == nlink, || format!("nlink of ino {} is {} != model {nlink}", a.ino, a.nlink))?;
        if node.kind != Kind::Dir {
            let size = self.m.local_size(g, n);
            ensure(a.size == size, || format!("size of ino {} is {} != model {size}", a.ino, a.size))?;
        }
        if node.kind != Kind::Symlink {
            ensure(a.mode & mode::PERM_MASK == node.mode, || {
                format!("mode of ino {} is {:o} != model {:o}", a.ino, a.mode & mode::PERM_MASK, node.mode)
            })?;
        }
        Ok(())
    }

    /// A read through `h`, compared with the committed bytes (waiting for the watch when the
    /// handle may hold older ones).
    async fn read_check(&mut self, h: Handle, off: u64, len: u32) -> Result<(), String> {
        let exp = if h.acc == Acc::W { Err(Errno::EBADF) } else { Ok(()) };
        if exp.is_ok() {
            self.m.flush(h.gw, h.node);
        }
        let data = &self.m.nodes[h.node].data;
        let (lo, hi) = ((off as usize).min(data.len()), ((off + u64::from(len)) as usize).min(data.len()));
        let want = data[lo..hi].to_vec();
        let stale = self.m.stale[h.gw].contains(&h.node);
        let started = Instant::now();
        loop {
            let got = self.gw[h.gw].read(h.fh, off, len).await;
            class(&exp, &got)?;
            let Ok(got) = got else { return Ok(()) };
            if got[..] == want[..] {
                return Ok(());
            }
            if !stale || started.elapsed() > WATCH_LIMIT {
                return Err(format!(
                    "read of ino {} at {off}+{len}: {}{}",
                    self.m.nodes[h.node].ino,
                    diff(&want, &got),
                    if stale { " (still after the watch limit)" } else { "" }
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lists a directory on gateway `g` and compares it with the model: names, inode
    /// numbers, types, link counts, sizes and "..".
    async fn check_dir(&self, g: usize, d: usize) -> Result<(), String> {
        let v = &self.gw[g];
        let ino = self.m.nodes[d].ino;
        let fh = v.opendir(&self.root, ino).await.map_err(|e| format!("opendir {ino}: {e:?}"))?;
        let mut all = Vec::new();
        let mut cookie = 0;
        loop {
            let (es, eof) = v.readdir(fh, cookie, true).await.map_err(|e| format!("readdir {ino}: {e:?}"))?;
            if let Some(last) = es.last() {
                cookie = last.cookie;
            }
            all.extend(es);
            if eof {
                break;
            }
        }
        v.releasedir(fh).await.map_err(|e| format!("releasedir: {e:?}"))?;
        let mut got: BTreeMap<Vec<u8>, Attr> = BTreeMap::new();
        for e in all {
            if e.name == b"." || e.name == b".." {
                let want = if e.name == b"." { ino } else { self.m.nodes[self.m.nodes[d].parent].ino };
                ensure(e.ino == want, || {
                    format!("{:?} of dir {ino} is {} != {want}", String::from_utf8_lossy(&e.name), e.ino)
                })?;
                continue;
            }
            let a = e.attr.clone().ok_or("readdir plus without attributes")?;
            ensure(e.ino == a.ino && Kind::of_type(e.kind) == Kind::of(&a), || {
                format!("entry {e:?} != attr")
            })?;
            ensure(got.insert(e.name.clone(), a).is_none(), || format!("entry {:?} listed twice", e.name))?;
        }
        let names: Vec<_> = got.keys().cloned().collect();
        let want: Vec<_> = self.m.nodes[d].entries.keys().cloned().collect();
        ensure(names == want, || {
            let s =
                |v: &[Vec<u8>]| v.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>();
            format!("dir {ino} lists {:?}, model {:?}", s(&names), s(&want))
        })?;
        for (name, a) in &got {
            self.check_attr(g, self.m.nodes[d].entries[name], a)
                .map_err(|e| format!("entry {:?} of dir {ino}: {e}", String::from_utf8_lossy(name)))?;
        }
        Ok(())
    }

    async fn step(&mut self, s: &Step) -> Result<(), String> {
        let c = &self.root;
        match *s {
            Step::Create { gw: g, path, excl, trunc, append, acc } => {
                let exp = (|| {
                    let par = self.m.parent(path)?;
                    if !self.m.is_dir(par) {
                        return Err(Errno::ENOTDIR);
                    }
                    match self.m.child(par, path.last()) {
                        None => Ok((par, None)),
                        Some(_) if excl => Err(Errno::EEXIST),
                        Some(n) => match self.m.nodes[n].kind {
                            Kind::Dir => Err(Errno::EISDIR),
                            Kind::Symlink => Err(SKIP),
                            Kind::File => Ok((par, Some(n))),
                        },
                    }
                })();
                if exp == Err(SKIP) {
                    return Ok(());
                }
                let mut flags = acc.flags() | libc::O_CREAT;
                for (on, f) in [(excl, libc::O_EXCL), (trunc, libc::O_TRUNC), (append, libc::O_APPEND)] {
                    if on {
                        flags |= f;
                    }
                }
                let got = match self.r_parent(g, path).await {
                    Ok(p) => self.gw[g].create(c, p, path.last(), 0o644, 0o022, flags).await,
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                let (Ok((par, existing)), Ok((fh, a))) = (exp, got) else { return Ok(()) };
                let n = match existing {
                    None => {
                        let node = Node {
                            kind: Kind::File,
                            ino: a.ino,
                            mode: 0o644,
                            data: Vec::new(),
                            entries: BTreeMap::new(),
                            parent: par,
                            links: 1,
                        };
                        self.m.add(par, path.last(), node)
                    }
                    Some(n) => {
                        if trunc {
                            self.m.open_trunc(g, n);
                        }
                        n
                    }
                };
                self.m.stale[g].remove(&n);
                self.m.handles.push(Handle { gw: g, fh, node: n, acc, append });
                self.check_attr(g, n, &a)
            }
            Step::Open { gw: g, path, trunc, append, acc } => {
                let exp = self.m.resolve(path).and_then(|n| match self.m.nodes[n].kind {
                    Kind::Dir if acc != Acc::R || trunc => Err(Errno::EISDIR),
                    Kind::Symlink => Err(SKIP),
                    _ => Ok(n),
                });
                if exp == Err(SKIP) {
                    return Ok(());
                }
                let mut flags = acc.flags();
                for (on, f) in [(trunc, libc::O_TRUNC), (append, libc::O_APPEND)] {
                    if on {
                        flags |= f;
                    }
                }
                let got = match self.r_resolve(g, path).await {
                    Ok(a) => self.gw[g].open(c, a.ino, flags).await,
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                let (Ok(n), Ok((fh, a))) = (exp, got) else { return Ok(()) };
                if self.m.is_dir(n) {
                    self.gw[g].release(fh).await.map_err(|e| format!("release of a directory: {e:?}"))?;
                    return self.check_attr(g, n, &a);
                }
                if trunc {
                    self.m.open_trunc(g, n);
                }
                self.m.stale[g].remove(&n);
                self.m.handles.push(Handle { gw: g, fh, node: n, acc, append });
                self.check_attr(g, n, &a)
            }
            Step::Mkdir { gw: g, path } => {
                let exp = (|| {
                    let par = self.m.parent(path)?;
                    if !self.m.is_dir(par) {
                        return Err(Errno::ENOTDIR);
                    }
                    match self.m.child(par, path.last()) {
                        Some(_) => Err(Errno::EEXIST),
                        None => Ok(par),
                    }
                })();
                let got = match self.r_parent(g, path).await {
                    Ok(p) => self.gw[g].mkdir(c, p, path.last(), 0o755, 0o022).await,
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                let (Ok(par), Ok(a)) = (exp, got) else { return Ok(()) };
                // A set-group-ID directory passes the bit on to new directories.
                let mode_ = 0o755 | (self.m.nodes[par].mode & mode::S_ISGID);
                let node = Node {
                    kind: Kind::Dir,
                    ino: a.ino,
                    mode: mode_,
                    data: Vec::new(),
                    entries: BTreeMap::new(),
                    parent: par,
                    links: 1,
                };
                let n = self.m.add(par, path.last(), node);
                self.check_attr(g, n, &a)
            }
            Step::Unlink { gw: g, path } => {
                let exp = (|| {
                    let par = self.m.parent(path)?;
                    if !self.m.is_dir(par) {
                        return Err(Errno::ENOTDIR);
                    }
                    let n = self.m.child(par, path.last()).ok_or(Errno::ENOENT)?;
                    if self.m.is_dir(n) {
                        return Err(Errno::EISDIR);
                    }
                    Ok((par, n))
                })();
                let got = match self.r_parent(g, path).await {
                    Ok(p) => self.gw[g].unlink(c, p, path.last()).await,
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                if let Ok((par, n)) = exp {
                    self.m.nodes[par].entries.remove(path.last());
                    self.m.drop_link(n);
                }
                Ok(())
            }
            Step::Rmdir { gw: g, path } => {
                let exp = (|| {
                    let par = self.m.parent(path)?;
                    if !self.m.is_dir(par) {
                        return Err(Errno::ENOTDIR);
                    }
                    let n = self.m.child(par, path.last()).ok_or(Errno::ENOENT)?;
                    if !self.m.is_dir(n) {
                        return Err(Errno::ENOTDIR);
                    }
                    if !self.m.nodes[n].entries.is_empty() {
                        return Err(Errno::ENOTEMPTY);
                    }
                    Ok((par, n))
                })();
                let got = match self.r_parent(g, path).await {
                    Ok(p) => self.gw[g].rmdir(c, p, path.last()).await,
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                if let Ok((par, n)) = exp {
                    self.m.nodes[par].entries.remove(path.last());
                    self.m.drop_link(n);
                }
                Ok(())
            }
            Step::Rename { gw: g, from, to, flags } => self.rename(g, from, to, flags).await,
            Step::Link { gw: g, from, to } => {
                let exp = (|| {
                    let src = self.m.resolve(from)?;
                    let par = self.m.parent(to)?;
                    if !self.m.is_dir(par) {
                        return Err(Errno::ENOTDIR);
                    }
                    if self.m.child(par, to.last()).is_some() {
                        return Err(Errno::EEXIST);
                    }
                    if self.m.is_dir(src) {
                        return Err(Errno::EPERM);
                    }
                    Ok((src, par))
                })();
                let got = async {
                    let src = self.r_resolve(g, from).await?;
                    let par = self.r_parent(g, to).await?;
                    self.gw[g].link(c, src.ino, par, to.last()).await
                }
                .await;
                class(&exp, &got)?;
                let (Ok((src, par)), Ok(a)) = (exp, got) else { return Ok(()) };
                self.m.nodes[src].links += 1;
                self.m.nodes[par].entries.insert(to.last().to_vec(), src);
                self.check_attr(g, src, &a)
            }
            Step::Symlink { gw: g, path, target } => {
                let target = symlink_target(target);
                let exp = (|| {
                    let par = self.m.parent(path)?;
                    if !self.m.is_dir(par) {
                        return Err(Errno::ENOTDIR);
                    }
                    match self.m.child(par, path.last()) {
                        Some(_) => Err(Errno::EEXIST),
                        None => Ok(par),
                    }
                })();
                let got = match self.r_parent(g, path).await {
                    Ok(p) => self.gw[g].symlink(c, p, path.last(), &target).await,
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                let (Ok(par), Ok(a)) = (exp, got) else { return Ok(()) };
                let node = Node {
                    kind: Kind::Symlink,
                    ino: a.ino,
                    mode: 0o777,
                    data: target,
                    entries: BTreeMap::new(),
                    parent: par,
                    links: 1,
                };
                let n = self.m.add(par, path.last(), node);
                self.check_attr(g, n, &a)
            }
            Step::Readlink { gw: g, path } => {
                let exp = self.m.resolve(path).and_then(|n| {
                    if self.m.nodes[n].kind == Kind::Symlink {
                        Ok(self.m.nodes[n].data.clone())
                    } else {
                        Err(Errno::EINVAL)
                    }
                });
                let got = match self.r_resolve(g, path).await {
                    Ok(a) => self.gw[g].readlink(a.ino).await,
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                if let (Ok(e), Ok(t)) = (&exp, &got) {
                    ensure(e == t, || format!("readlink: {} != model {}", show(t), show(e)))?;
                }
                Ok(())
            }
            Step::Write { h, off, len, seed } => {
                let Some((_, h)) = self.handle(h) else { return Ok(()) };
                let data = payload(len, seed);
                let exp = if h.acc == Acc::R { Err(Errno::EBADF) } else { Ok(()) };
                // Where an append lands while another gateway's change is still on its way
                // depends on whether the watch already dropped the cached size: outside the
                // model.
                if h.append && self.m.buffered(h.gw, h.node) && self.m.stale[h.gw].contains(&h.node) {
                    return Ok(());
                }
                let at = if h.append { self.m.local_size(h.gw, h.node) } else { off };
                let got = self.gw[h.gw].write(h.fh, off, &data).await;
                class(&exp, &got)?;
                if let Ok(n) = got {
                    ensure(n as usize == len, || format!("write returned {n}, not {len}"))?;
                    self.m.pending[h.gw].entry(h.node).or_default().push((at, data));
                }
                Ok(())
            }
            Step::Read { h, off, len } => {
                let Some((_, h)) = self.handle(h) else { return Ok(()) };
                self.read_check(h, off, len).await
            }
            Step::Truncate { gw: g, path, size } => {
                let exp = self.m.resolve(path).and_then(|n| match self.m.nodes[n].kind {
                    Kind::Dir => Err(Errno::EISDIR),
                    Kind::Symlink => Err(Errno::EINVAL),
                    Kind::File => Ok(n),
                });
                let got = match self.r_resolve(g, path).await {
                    Ok(a) => {
                        let req = SetAttrReq { size: Some(size), ..SetAttrReq::default() };
                        self.gw[g].setattr(c, a.ino, req).await
                    }
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                let (Ok(n), Ok(a)) = (exp, got) else { return Ok(()) };
                if self.m.has_handle(g, n) {
                    self.m.flush(g, n);
                }
                self.m.set_size(g, n, size);
                self.check_attr(g, n, &a)
            }
            Step::Ftruncate { h, size } => {
                let Some((_, h)) = self.handle(h) else { return Ok(()) };
                if h.acc == Acc::R {
                    // The kernel refuses this before asking the file system.
                    return Ok(());
                }
                let req = SetAttrReq { size: Some(size), fh: Some(h.fh), ..SetAttrReq::default() };
                let a = self.gw[h.gw].setattr(c, self.m.nodes[h.node].ino, req).await;
                let a = a.map_err(|e| format!("ftruncate: {e:?}"))?;
                self.m.flush(h.gw, h.node);
                self.m.set_size(h.gw, h.node, size);
                self.check_attr(h.gw, h.node, &a)
            }
            Step::Flush { h } | Step::Fsync { h } => {
                let Some((_, h)) = self.handle(h) else { return Ok(()) };
                let r = if matches!(s, Step::Flush { .. }) {
                    self.gw[h.gw].flush(h.fh).await
                } else {
                    self.gw[h.gw].fsync(h.fh).await
                };
                r.map_err(|e| format!("flush: {e:?}"))?;
                self.m.flush(h.gw, h.node);
                Ok(())
            }
            Step::Close { h } => {
                let Some((i, h)) = self.handle(h) else { return Ok(()) };
                self.close(i, h).await
            }
            Step::Chmod { gw: g, path, mode: m } => {
                let exp = self.m.resolve(path).and_then(|n| match self.m.nodes[n].kind {
                    Kind::Symlink => Err(SKIP),
                    _ => Ok(n),
                });
                if exp == Err(SKIP) {
                    return Ok(());
                }
                let got = match self.r_resolve(g, path).await {
                    Ok(a) => {
                        let req = SetAttrReq { mode: Some(m), ..SetAttrReq::default() };
                        self.gw[g].setattr(c, a.ino, req).await
                    }
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                let (Ok(n), Ok(a)) = (exp, got) else { return Ok(()) };
                if self.m.has_handle(g, n) {
                    self.m.flush(g, n);
                }
                self.m.nodes[n].mode = m;
                self.check_attr(g, n, &a)
            }
            Step::Getattr { gw: g, path } => {
                let exp = self.m.resolve(path);
                let mut looked = None;
                let got = match self.r_resolve(g, path).await {
                    Ok(a) => {
                        looked = Some(a.clone());
                        self.gw[g].getattr(a.ino).await
                    }
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                let (Ok(n), Ok(a)) = (exp, got) else { return Ok(()) };
                // The lookup (what the kernel asks before an open) already reports the size
                // including this gateway's buffered writes.
                if let Some(l) = &looked {
                    self.check_attr(g, n, l).map_err(|e| format!("lookup: {e}"))?;
                }
                // A stat flushes nothing: it reports the buffered writes as if they were.
                self.check_attr(g, n, &a)
            }
            Step::Fstat { h } => {
                let Some((_, h)) = self.handle(h) else { return Ok(()) };
                let a = self.gw[h.gw].getattr(self.m.nodes[h.node].ino).await;
                let a = a.map_err(|e| format!("getattr of an open file: {e:?}"))?;
                self.check_attr(h.gw, h.node, &a)
            }
            Step::Readdir { gw: g, path } => {
                let exp = match path {
                    None => Ok(0),
                    Some(p) => self
                        .m
                        .resolve(p)
                        .and_then(|n| if self.m.is_dir(n) { Ok(n) } else { Err(Errno::ENOTDIR) }),
                };
                let got = match path {
                    None => Ok(ROOT_INO),
                    Some(p) => self.r_resolve(g, p).await.map(|a| a.ino),
                };
                let got = match got {
                    Ok(ino) => self.gw[g].opendir(c, ino).await,
                    Err(e) => Err(e),
                };
                class(&exp, &got)?;
                let (Ok(d), Ok(fh)) = (exp, got) else { return Ok(()) };
                self.gw[g].releasedir(fh).await.map_err(|e| format!("releasedir: {e:?}"))?;
                self.check_dir(g, d).await
            }
            Step::Fallocate { h, off, len, mode: fmode } => {
                let Some((_, h)) = self.handle(h) else { return Ok(()) };
                let exp = if h.acc == Acc::R { Err(Errno::EBADF) } else { Ok(()) };
                let got = self.gw[h.gw].fallocate(h.fh, off, len, fmode).await;
                class(&exp, &got)?;
                if got.is_err() {
                    return Ok(());
                }
                self.m.flush(h.gw, h.node);
                use fallocate_flags::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
                let (keep, punch, zero) = (
                    fmode & FALLOC_FL_KEEP_SIZE != 0,
                    fmode & FALLOC_FL_PUNCH_HOLE != 0,
                    fmode & FALLOC_FL_ZERO_RANGE != 0,
                );
                let data = &mut self.m.nodes[h.node].data;
                let size = data.len() as u64;
                let end = off + len;
                let new_size = if keep { size } else { size.max(end) };
                data.resize(new_size as usize, 0);
                if punch || zero {
                    for b in &mut data[(off.min(new_size) as usize)..(end.min(new_size) as usize)] {
                        *b = 0;
                    }
                }
                self.m.changed(h.gw, h.node);
                Ok(())
            }
            Step::CopyRange { h_in, h_out, off_in, off_out, len } => {
                // Both handles must be of one gateway: the output is picked among its handles.
                let Some((_, hi)) = self.handle(h_in) else { return Ok(()) };
                let outs: Vec<Handle> = self.m.handles.iter().filter(|h| h.gw == hi.gw).copied().collect();
                let ho = outs[h_out.index(outs.len())];
                let exp = if hi.acc == Acc::W || ho.acc == Acc::R || ho.append {
                    Err(Errno::EBADF)
                } else if hi.node == ho.node && off_in < off_out + len && off_out < off_in + len {
                    Err(Errno::EINVAL)
                } else {
                    Ok(())
                };
                let got = self.gw[hi.gw].copy_file_range(hi.fh, off_in, ho.fh, off_out, len).await;
                class(&exp, &got)?;
                let Ok(n) = got else { return Ok(()) };
                self.m.flush(hi.gw, hi.node);
                self.m.flush(hi.gw, ho.node);
                let src = &self.m.nodes[hi.node].data;
                let size = src.len() as u64;
                let want = if off_in >= size { 0 } else { len.min(size - off_in) };
                ensure(n == want, || format!("copy_file_range copied {n}, model {want}"))?;
                if want > 0 {
                    let bytes = src[off_in as usize..(off_in + want) as usize].to_vec();
                    write_at(&mut self.m.nodes[ho.node].data, off_out, &bytes);
                    self.m.changed(hi.gw, ho.node);
                }
                Ok(())
            }
        }
    }

    async fn close(&mut self, i: usize, h: Handle) -> Result<(), String> {
        self.gw[h.gw].release(h.fh).await.map_err(|e| format!("release: {e:?}"))?;
        self.m.flush(h.gw, h.node);
        self.m.handles.remove(i);
        Ok(())
    }

    async fn rename(&mut self, g: usize, from: P, to: P, flags: u32) -> Result<(), String> {
        use rename_flags::{RENAME_EXCHANGE, RENAME_NOREPLACE};
        let m = &self.m;
        let exp = (|| {
            let p1 = m.parent(from)?;
            let p2 = m.parent(to)?;
            if !m.is_dir(p1) || !m.is_dir(p2) {
                return Err(Errno::ENOTDIR);
            }
            let src = m.child(p1, from.last()).ok_or(Errno::ENOENT)?;
            let dst = m.child(p2, to.last());
            if flags & RENAME_EXCHANGE != 0 && dst.is_none() {
                return Err(Errno::ENOENT);
            }
            if flags & RENAME_NOREPLACE != 0 && dst.is_some() {
                return Err(Errno::EEXIST);
            }
            if m.is_dir(src) && m.is_ancestor_or_self(src, p2) {
                return Err(Errno::EINVAL);
            }
            if let Some(d) = dst {
                if m.is_dir(d) && m.is_ancestor_or_self(d, p1) {
                    return Err(if flags & RENAME_EXCHANGE != 0 { Errno::EINVAL } else { Errno::ENOTEMPTY });
                }
                if d != src && flags & RENAME_EXCHANGE == 0 {
                    match (m.is_dir(src), m.is_dir(d)) {
                        (true, false) => return Err(Errno::ENOTDIR),
                        (false, true) => return Err(Errno::EISDIR),
                        (true, true) if !m.nodes[d].entries.is_empty() => return Err(Errno::ENOTEMPTY),
                        _ => {}
                    }
                }
            }
            Ok((p1, p2, src, dst))
        })();
        let got = async {
            let p1 = self.r_parent(g, from).await?;
            let p2 = self.r_parent(g, to).await?;
            self.gw[g].rename(&self.root, p1, from.last(), p2, to.last(), flags).await
        }
        .await;
        class(&exp, &got)?;
        let Ok((p1, p2, src, dst)) = exp else { return Ok(()) };
        let m = &mut self.m;
        let (n1, n2) = (from.last().to_vec(), to.last().to_vec());
        match dst {
            Some(d) if d == src => {}
            Some(d) if flags & RENAME_EXCHANGE != 0 => {
                m.nodes[p1].entries.insert(n1, d);
                m.nodes[p2].entries.insert(n2, src);
                if m.is_dir(src) {
                    m.nodes[src].parent = p2;
                }
                if m.is_dir(d) {
                    m.nodes[d].parent = p1;
                }
            }
            _ => {
                m.nodes[p1].entries.remove(&n1);
                if let Some(d) = m.nodes[p2].entries.insert(n2, src) {
                    m.drop_link(d);
                }
                if m.is_dir(src) {
                    m.nodes[src].parent = p2;
                }
            }
        }
        Ok(())
    }

    /// Closes every handle, then walks the tree on both gateways and compares everything with
    /// the model, and checks that no unlinked inode is left behind.
    async fn finish(&mut self) -> Result<(), String> {
        while let Some(h) = self.m.handles.last().copied() {
            self.close(self.m.handles.len() - 1, h).await?;
        }
        for g in 0..2 {
            let mut todo = vec![0usize];
            let mut seen = BTreeSet::new();
            while let Some(d) = todo.pop() {
                self.check_dir(g, d).await.map_err(|e| format!("gateway {g}: {e}"))?;
                for (name, &n) in &self.m.nodes[d].entries {
                    if !seen.insert(n) {
                        continue;
                    }
                    let node = &self.m.nodes[n];
                    let what =
                        || format!("gateway {g}: ino {} ({:?})", node.ino, String::from_utf8_lossy(name));
                    match node.kind {
                        Kind::Dir => todo.push(n),
                        Kind::Symlink => {
                            let t = self.gw[g].readlink(node.ino).await;
                            ensure(t.as_ref() == Ok(&node.data), || format!("{}: readlink {t:?}", what()))?;
                        }
                        Kind::File => {
                            let (fh, _) = self.gw[g]
                                .open(&self.root, node.ino, libc::O_RDONLY)
                                .await
                                .map_err(|e| format!("{}: open {e:?}", what()))?;
                            let got = self.gw[g].read(fh, 0, node.data.len() as u32 + 1).await;
                            self.gw[g].release(fh).await.map_err(|e| format!("{}: release {e:?}", what()))?;
                            let got = got.map_err(|e| format!("{}: read {e:?}", what()))?;
                            ensure(got[..] == node.data[..], || {
                                format!("{}: {}", what(), diff(&node.data, &got))
                            })?;
                        }
                    }
                }
            }
            let live = 1 + seen.len() as u64;
            // Closes on the other gateways are told to metadata shortly after (SEMANTICS.md).
            for gw in &self.gw {
                gw.release_closed().await;
            }
            let st = self.gw[g].statfs().await.map_err(|e| format!("statfs: {e:?}"))?;
            ensure(st.used_inodes == live, || {
                format!(
                    "{} inodes in use, {live} reachable (an unlinked inode was not freed)",
                    st.used_inodes
                )
            })?;
        }
        Ok(())
    }
}

/// Runs one case on a new volume of the cluster with two new gateways.
async fn run_case(cluster: &TestCluster, steps: &[Step]) -> Result<(), String> {
    let vol = cluster.volume().await;
    run_steps([cluster.gateway(vol, "model-a").await, cluster.gateway(vol, "model-b").await], steps).await
}

/// Runs one case on two gateways of a new in-memory service.
async fn run_case_mem(steps: &[Step]) -> Result<(), String> {
    let mem = MemCluster::new();
    let vol = mem.volume().await;
    run_steps([mem.gateway(vol, "model-a").await, mem.gateway(vol, "model-b").await], steps).await
}

async fn run_steps<M: MetaApi, D: DataPath>(gw: [Gw<M, D>; 2], steps: &[Step]) -> Result<(), String> {
    let mut h = Harness { gw, root: Creds::root(), m: Model::new() };
    let mut res = Ok(());
    for (i, s) in steps.iter().enumerate() {
        if let Err(e) = h.step(s).await {
            res = Err(format!("step {i} {s:?}: {e}"));
            break;
        }
    }
    if res.is_ok() {
        res = h.finish().await.map_err(|e| format!("final check: {e}"));
    }
    for g in &h.gw {
        let _ = g.shutdown().await;
    }
    res
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime")
}

/// Random operation sequences on two gateways against the model (`PROPTEST_CASES` sets the
/// number of cases, 32 by default). One cluster serves every case (hence a `TestRunner`
/// driven by hand rather than the `proptest!` macro, whose cases could not share it); each
/// case gets a volume of its own. A failure is shrunk and reported with its minimal sequence
/// of steps; nothing is persisted.
#[test]
fn vfs_matches_model_on_two_gateways() {
    let rt = runtime();
    let cluster = rt.block_on(TestCluster::start(2));
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    let config = Config {
        cases,
        max_shrink_iters: 512,
        max_shrink_time: 180_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let strategy = steps();
    let result =
        runner.run(&strategy, |steps| rt.block_on(run_case(&cluster, &steps)).map_err(TestCaseError::fail));
    drop(rt);
    drop(cluster);
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The same model test on the in-memory metadata service and data path (one process, no
/// sockets): many more cases in the same time (`PROPTEST_CASES_MEM` sets the number, 512
/// by default). Each case gets a service of its own.
#[test]
fn vfs_matches_model_on_fakes() {
    let rt = runtime();
    let cases = std::env::var("PROPTEST_CASES_MEM").ok().and_then(|s| s.parse().ok()).unwrap_or(512);
    let config = Config {
        cases,
        max_shrink_iters: 2048,
        max_shrink_time: 180_000,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&steps(), |steps| rt.block_on(run_case_mem(&steps)).map_err(TestCaseError::fail));
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---- deterministic tests -------------------------------------------------------------

fn setattr_ids(uid: Option<u32>, gid: Option<u32>) -> SetAttrReq {
    SetAttrReq { uid, gid, ..SetAttrReq::default() }
}

fn chmod(m: u32) -> SetAttrReq {
    SetAttrReq { mode: Some(m), ..SetAttrReq::default() }
}

/// Linux's permission rules, through the VFS, for callers other than root.
#[test]
fn permissions_through_the_vfs() {
    runtime().block_on(async {
        let cluster = TestCluster::start(1).await;
        let vol = cluster.volume().await;
        let v = cluster.gateway(vol, "perm").await;
        let root = Creds::root();
        let u1000 = Creds::with_groups(1000, 1000, vec![]);
        let u1001 = Creds::with_groups(1001, 1001, vec![]);
        let (eacces, eperm): (Result<(), Errno>, Result<(), Errno>) = (Err(Errno::EACCES), Err(Errno::EPERM));

        // A 0700 directory of uid 1000 can be searched, listed and written by its owner
        // only (and root).
        let private = v.mkdir(&root, ROOT_INO, b"private", 0o700, 0).await.unwrap();
        v.setattr(&root, private.ino, setattr_ids(Some(1000), Some(1000))).await.unwrap();
        let (fh, f) = v.create(&u1000, private.ino, b"f", 0o644, 0o022, libc::O_WRONLY).await.unwrap();
        v.release(fh).await.unwrap();
        assert_eq!((f.uid, f.gid, f.mode & 0o7777), (1000, 1000, 0o644));
        assert_eq!(v.lookup(&u1000, private.ino, b"f").await.map(|a| a.ino), Ok(f.ino));
        assert_eq!(v.lookup(&root, private.ino, b"f").await.map(|a| a.ino), Ok(f.ino));
        assert_eq!(v.lookup(&u1001, private.ino, b"f").await.map(|_| ()), eacces);
        assert_eq!(v.opendir(&u1001, private.ino).await.map(|_| ()), eacces);
        let denied = v.create(&u1001, private.ino, b"g", 0o644, 0o022, libc::O_WRONLY).await;
        assert_eq!(denied.map(|_| ()), eacces);
        assert_eq!(v.mkdir(&u1001, private.ino, b"d", 0o755, 0o022).await.map(|_| ()), eacces);
        assert_eq!(v.unlink(&u1001, private.ino, b"f").await, eacces);

        // A world-writable directory, and the same with the sticky bit.
        let public = v.mkdir(&root, ROOT_INO, b"public", 0o777, 0).await.unwrap();
        let tmp = v.mkdir(&root, ROOT_INO, b"tmp", 0o1777, 0).await.unwrap();
        assert_eq!(tmp.mode & 0o7777, 0o1777);
        for d in [public.ino, tmp.ino] {
            let (fh, _) = v.create(&u1000, d, b"f1", 0o666, 0, libc::O_WRONLY).await.unwrap();
            v.release(fh).await.unwrap();
        }
        // In the sticky directory only the file's owner (or the directory's, or root) may
        // remove or rename it; without the bit anyone who may write the directory may.
        assert_eq!(v.unlink(&u1001, tmp.ino, b"f1").await, eperm);
        assert_eq!(v.rename(&u1001, tmp.ino, b"f1", tmp.ino, b"f2", 0).await, eperm);
        assert_eq!(v.rename(&u1001, tmp.ino, b"f1", public.ino, b"f2", 0).await, eperm);
        assert_eq!(v.lookup(&u1001, tmp.ino, b"f1").await.map(|a| a.uid), Ok(1000));
        assert_eq!(v.unlink(&u1001, public.ino, b"f1").await, Ok(()));
        assert_eq!(v.rename(&u1000, tmp.ino, b"f1", tmp.ino, b"f2", 0).await, Ok(()));
        assert_eq!(v.unlink(&u1000, tmp.ino, b"f2").await, Ok(()));

        // chmod is the owner's; chown to another user is root's; the owner may change the
        // group to one of its own groups only.
        let (fh, g) = v.create(&u1000, public.ino, b"g", 0o666, 0o027, libc::O_WRONLY).await.unwrap();
        v.release(fh).await.unwrap();
        assert_eq!(g.mode & 0o7777, 0o640, "umask applies");
        assert_eq!(v.setattr(&u1001, g.ino, chmod(0o666)).await.map(|_| ()), eperm);
        assert_eq!(v.setattr(&u1000, g.ino, chmod(0o600)).await.map(|a| a.mode & 0o7777), Ok(0o600));
        assert_eq!(v.setattr(&u1000, g.ino, setattr_ids(Some(1001), None)).await.map(|_| ()), eperm);
        assert_eq!(v.setattr(&u1001, g.ino, setattr_ids(Some(1001), None)).await.map(|_| ()), eperm);
        assert_eq!(v.setattr(&u1000, g.ino, setattr_ids(Some(1000), None)).await.map(|a| a.uid), Ok(1000));
        assert_eq!(v.setattr(&u1000, g.ino, setattr_ids(None, Some(2000))).await.map(|_| ()), eperm);
        let u1000_2000 = Creds::with_groups(1000, 1000, vec![2000]);
        assert_eq!(
            v.setattr(&u1000_2000, g.ino, setattr_ids(None, Some(2000))).await.map(|a| a.gid),
            Ok(2000)
        );
        assert_eq!(v.setattr(&root, g.ino, setattr_ids(Some(1001), None)).await.map(|a| a.uid), Ok(1001));
        assert_eq!(v.getattr(g.ino).await.map(|a| (a.uid, a.gid)), Ok((1001, 2000)));

        // A set-group-ID directory gives new entries its group, and new directories the bit.
        let sg = v.mkdir(&root, ROOT_INO, b"sg", 0o777, 0).await.unwrap();
        v.setattr(&root, sg.ino, setattr_ids(None, Some(500))).await.unwrap();
        assert_eq!(v.setattr(&root, sg.ino, chmod(0o2777)).await.map(|a| a.mode & 0o7777), Ok(0o2777));
        let (fh, f) = v.create(&u1000, sg.ino, b"f", 0o644, 0o022, libc::O_WRONLY).await.unwrap();
        v.release(fh).await.unwrap();
        assert_eq!((f.uid, f.gid), (1000, 500));
        let d = v.mkdir(&u1000, sg.ino, b"d", 0o755, 0o022).await.unwrap();
        assert_eq!((d.uid, d.gid, d.mode & 0o7777), (1000, 500, 0o2755));
        let (fh, outside) = v.create(&u1000, public.ino, b"h", 0o644, 0o022, libc::O_WRONLY).await.unwrap();
        v.release(fh).await.unwrap();
        assert_eq!(outside.gid, 1000, "no set-group-ID directory: the caller's group");

        // Supplementary groups count for group permission.
        let grp = v.mkdir(&root, ROOT_INO, b"grp", 0o770, 0).await.unwrap();
        v.setattr(&root, grp.ino, setattr_ids(None, Some(600))).await.unwrap();
        let member = Creds::with_groups(1002, 1002, vec![7, 600]);
        let other_member = Creds::with_groups(1004, 1004, vec![600]);
        let outsider = Creds::with_groups(1003, 1003, vec![7]);
        let (fh, x) = v.create(&member, grp.ino, b"x", 0o640, 0, libc::O_WRONLY).await.unwrap();
        v.write(fh, 0, b"group data").await.unwrap();
        v.release(fh).await.unwrap();
        assert_eq!(v.lookup(&outsider, grp.ino, b"x").await.map(|_| ()), eacces);
        let denied = v.create(&outsider, grp.ino, b"y", 0o644, 0o022, libc::O_WRONLY).await;
        assert_eq!(denied.map(|_| ()), eacces);
        assert_eq!(v.lookup(&other_member, grp.ino, b"x").await.map(|a| a.ino), Ok(x.ino));
        assert_eq!(v.setattr(&root, x.ino, setattr_ids(None, Some(600))).await.map(|a| a.gid), Ok(600));
        let (fh, _) = v.open(&other_member, x.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(v.read(fh, 0, 100).await.as_deref(), Ok(&b"group data"[..]));
        v.release(fh).await.unwrap();
        assert_eq!(v.open(&other_member, x.ino, libc::O_WRONLY).await.map(|_| ()), eacces);
        assert_eq!(v.open(&outsider, x.ino, libc::O_RDONLY).await.map(|_| ()), eacces);
        let trunc = SetAttrReq { size: Some(0), ..SetAttrReq::default() };
        assert_eq!(v.setattr(&other_member, x.ino, trunc).await.map(|_| ()), eacces);

        v.shutdown().await.unwrap();
    });
}

/// Reads everything through `fh` (the file is small).
async fn read_all<M: MetaApi, D: DataPath>(v: &Gw<M, D>, fh: u64) -> Vec<u8> {
    v.read(fh, 0, 1 << 22).await.expect("read").to_vec()
}

/// The ids of the slices of chunk 0 of `ino`, as the metadata service lists them.
async fn chunk0_slices(meta: &impl MetaApi, vol: elea_common::VolumeId, ino: Ino) -> Vec<u64> {
    match meta.query(elea_fsm::Query::ReadChunk { vol, ino, chunk: 0 }).await.expect("read chunk") {
        elea_fsm::Reply::Slices(s) => s.iter().map(|s| s.id).filter(|id| *id != 0).collect(),
        other => panic!("read chunk: {other:?}"),
    }
}

/// Whether garbage collection is done with `ids`: off the deleted list and forgotten.
async fn collected(meta: &impl MetaApi, ids: &[u64]) -> bool {
    let (pending, _) = meta.pending_deletes(0, 10_000).await.expect("pending deletes");
    let locs = meta.slice_locs(ids).await.expect("slice locations");
    !pending.iter().any(|(id, ..)| ids.contains(id)) && locs.iter().all(|(_, l)| l.is_none())
}

/// An unlinked file stays readable and writable where it is open, until its last close (its
/// slices stay referenced while garbage collection removes a closed file's); writes reach
/// another gateway at close, and a handle opened after that reads them at once.
#[test]
fn open_unlinked_file_and_close_to_open() {
    runtime().block_on(async {
        let cluster = TestCluster::start(2).await;
        let meta = cluster.meta();
        let vol = cluster.volume().await;
        let a = cluster.gateway(vol, "a").await;
        let b = cluster.gateway(vol, "b").await;
        let root = Creds::root();

        // Unlinked on B while open on A.
        let data = payload(300_000, 7);
        let (fa, f) = a.create(&root, ROOT_INO, b"orphan", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        a.write(fa, 0, &data).await.unwrap();
        a.flush(fa).await.unwrap();
        // A closed file, unlinked after the orphan: its data must be collected meanwhile,
        // which shows that garbage collection ran.
        let (fg, g) = a.create(&root, ROOT_INO, b"closed", 0o644, 0o022, libc::O_WRONLY).await.unwrap();
        a.write(fg, 0, &payload(200_000, 9)).await.unwrap();
        a.release(fg).await.unwrap();
        let closed_slices = chunk0_slices(meta, vol, g.ino).await;
        assert!(!closed_slices.is_empty(), "the closed file has no data");
        b.unlink(&root, ROOT_INO, b"orphan").await.unwrap();
        assert_eq!(b.lookup(&root, ROOT_INO, b"orphan").await.map(|_| ()), Err(Errno::ENOENT));
        assert_eq!(a.lookup(&root, ROOT_INO, b"orphan").await.map(|_| ()), Err(Errno::ENOENT));
        assert_eq!(a.getattr(f.ino).await.map(|a| (a.nlink, a.size)), Ok((0, 300_000)));
        assert!(read_all(&a, fa).await == data, "orphan data intact");
        a.write(fa, 300_000, b"tail").await.unwrap();
        let mut want = data.clone();
        want.extend_from_slice(b"tail");
        assert!(read_all(&a, fa).await == want, "orphan takes writes");
        let orphan_slices = chunk0_slices(meta, vol, f.ino).await;
        assert!(!orphan_slices.is_empty(), "the orphan has no data");
        b.unlink(&root, ROOT_INO, b"closed").await.unwrap();
        // Garbage collection removes the closed file's data (past the cache nodes' delay of
        // 1 s)...
        wait_until(Duration::from_secs(20), "the closed file's slices collected", || async {
            collected(meta, &closed_slices).await
        })
        .await;
        // ...and leaves the open orphan's alone: every slice referenced, none queued, the bytes
        // there on the cache nodes (read by a client that never cached them) and through A.
        let locs = meta.slice_locs(&orphan_slices).await.unwrap();
        assert!(
            locs.iter().all(|(_, l)| l.as_ref().is_some_and(|l| l.deleted.is_none())),
            "an open orphan's slice is gone or queued for deletion: {locs:?}"
        );
        let (pending, _) = meta.pending_deletes(0, 10_000).await.unwrap();
        assert!(
            !pending.iter().any(|(id, ..)| orphan_slices.contains(id)),
            "orphan slice queued: {pending:?}"
        );
        match cluster.data().read_file(vol, f.ino, 0, want.len()).await {
            Ok(b) => assert!(b == want, "orphan data reads back changed from the cache nodes"),
            Err(e) => panic!("orphan data does not read back from the cache nodes: {e}"),
        }
        assert!(read_all(&a, fa).await == want, "orphan data survives garbage collection");
        a.release(fa).await.unwrap();
        assert_eq!(a.getattr(f.ino).await.map(|_| ()), Err(Errno::ENOENT), "freed at last close");
        assert_eq!(b.statfs().await.map(|s| s.used_inodes), Ok(1));

        // Close-to-open between A (writer) and B (reader).
        let (fa, f) = a.create(&root, ROOT_INO, b"shared", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        a.write(fa, 0, b"old old old").await.unwrap();
        a.release(fa).await.unwrap();
        let (fb, _) = b.open(&root, f.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(read_all(&b, fb).await, b"old old old");
        let (fa, _) = a.open(&root, f.ino, libc::O_RDWR).await.unwrap();
        a.write(fa, 0, b"NEW").await.unwrap();
        a.write(fa, 11, b"!").await.unwrap();
        // Buffered on A: A reads its own writes, B (even through a new handle) does not.
        assert_eq!(read_all(&a, fa).await, b"NEW old old!");
        let (a2, _) = a.open(&root, f.ino, libc::O_RDONLY).await.unwrap();
        a.write(fa, 4, b"OLD").await.unwrap();
        assert_eq!(read_all(&a, a2).await, b"NEW OLD old!", "another handle on the writer's gateway");
        a.release(a2).await.unwrap();
        a.write(fa, 8, b"OLD").await.unwrap();
        let (fb2, _) = b.open(&root, f.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(read_all(&b, fb2).await, b"NEW OLD old!");
        b.release(fb2).await.unwrap();
        // A closes: a handle B opens now reads the new bytes at once.
        a.release(fa).await.unwrap();
        let (fb3, attr) = b.open(&root, f.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(attr.size, 12);
        assert_eq!(read_all(&b, fb3).await, b"NEW OLD OLD!");
        // The handle B opened before gets them within the watch delay.
        let t = Instant::now();
        while read_all(&b, fb).await != b"NEW OLD OLD!" {
            assert!(t.elapsed() < WATCH_LIMIT, "an open reader never saw the new bytes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        b.release(fb).await.unwrap();
        b.release(fb3).await.unwrap();

        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    });
}

// ---- regressions -----------------------------------------------------------------------
//
// Minimal reproductions of VFS bugs the model found (fixed).

async fn one_gateway() -> (TestCluster, Gw) {
    let cluster = TestCluster::start(1).await;
    let vol = cluster.volume().await;
    let v = cluster.gateway(vol, "bug").await;
    (cluster, v)
}

async fn contents<M: MetaApi, D: DataPath>(v: &Gw<M, D>, ino: Ino) -> Vec<u8> {
    let (fh, _) = v.open(&Creds::root(), ino, libc::O_RDONLY).await.unwrap();
    let d = read_all(v, fh).await;
    v.release(fh).await.unwrap();
    d
}

/// `open(O_TRUNC)` (and `create` with `O_TRUNC` of an existing file) truncates in metadata
/// but leaves the gateway's buffered writes of the file alone; they are flushed afterwards
/// and reappear. Linux: the file is empty.
#[test]
fn regression_o_trunc_open_keeps_buffered_writes() {
    runtime().block_on(async {
        let (_cluster, v) = one_gateway().await;
        let root = Creds::root();
        let mut got = Vec::new();
        for via_create in [false, true] {
            let name: &[u8] = if via_create { b"c" } else { b"o" };
            let (fh, f) = v.create(&root, ROOT_INO, name, 0o644, 0o022, libc::O_RDWR).await.unwrap();
            v.write(fh, 0, b"hello").await.unwrap();
            let (fh2, _) = if via_create {
                let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
                v.create(&root, ROOT_INO, name, 0o644, 0o022, flags).await.unwrap()
            } else {
                v.open(&root, f.ino, libc::O_WRONLY | libc::O_TRUNC).await.unwrap()
            };
            v.release(fh2).await.unwrap();
            v.release(fh).await.unwrap();
            got.push((via_create, String::from_utf8_lossy(&contents(&v, f.ino).await).into_owned()));
        }
        assert_eq!(got, [(false, String::new()), (true, String::new())], "(through create, contents)");
    });
}

/// `open(dir, O_RDONLY | O_TRUNC)` succeeds; Linux refuses it with `EISDIR`.
#[test]
fn regression_o_trunc_open_of_a_directory() {
    runtime().block_on(async {
        let (_cluster, v) = one_gateway().await;
        let root = Creds::root();
        let d = v.mkdir(&root, ROOT_INO, b"d", 0o755, 0o022).await.unwrap();
        let r = v.open(&root, d.ino, libc::O_RDONLY | libc::O_TRUNC).await;
        assert_eq!(r.map(|_| ()), Err(Errno::EISDIR));
    });
}

/// An `O_APPEND` write while the gateway holds a buffered write of the file that ends before
/// the end of the file lands at the end of the buffered write (the gateway has no cached size
/// right after a flush or an open) instead of at the end of the file.
#[test]
fn regression_append_after_buffered_write() {
    runtime().block_on(async {
        let (_cluster, v) = one_gateway().await;
        let root = Creds::root();
        let (fh, f) = v.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        v.write(fh, 0, b"0123456789").await.unwrap();
        v.flush(fh).await.unwrap();
        v.write(fh, 0, b"x").await.unwrap();
        let (app, _) = v.open(&root, f.ino, libc::O_WRONLY | libc::O_APPEND).await.unwrap();
        v.write(app, 0, b"END").await.unwrap();
        v.release(app).await.unwrap();
        v.release(fh).await.unwrap();
        assert_eq!(contents(&v, f.ino).await, b"x123456789END");
    });
}

/// The kernel leaves dropping set-id bits to the file system (`FUSE_HANDLE_KILLPRIV_V2`): a
/// truncate, an `O_TRUNC` open or a write by a caller without CAP_FSETID drops S_ISUID (and
/// S_ISGID when group-execute is set), as Linux does; root's keep them.
#[test]
fn set_id_bits_drop_on_truncate_and_write_by_others() {
    runtime().block_on(async {
        let (_cluster, v) = one_gateway().await;
        let root = Creds::root();
        let user = Creds::with_groups(1000, 1000, vec![]);
        let mode_of = |a: Attr| a.mode & 0o7777;
        let (fh, f) = v.create(&root, ROOT_INO, b"f", 0o777, 0, libc::O_RDWR).await.unwrap();
        v.release(fh).await.unwrap();
        assert_eq!(v.setattr(&root, f.ino, chmod(0o6777)).await.map(mode_of), Ok(0o6777));
        let trunc = SetAttrReq { size: Some(3), ..SetAttrReq::default() };
        assert_eq!(v.setattr(&root, f.ino, trunc.clone()).await.map(mode_of), Ok(0o6777), "root keeps them");
        assert_eq!(v.setattr(&user, f.ino, trunc.clone()).await.map(mode_of), Ok(0o0777));
        // S_ISGID without group-execute is mandatory locking, not set-group-ID: it stays.
        assert_eq!(v.setattr(&root, f.ino, chmod(0o6767)).await.map(mode_of), Ok(0o6767));
        assert_eq!(v.setattr(&user, f.ino, trunc).await.map(mode_of), Ok(0o2767));
        assert_eq!(v.setattr(&root, f.ino, chmod(0o6777)).await.map(mode_of), Ok(0o6777));
        let (fh, a) = v.open(&user, f.ino, libc::O_WRONLY | libc::O_TRUNC).await.unwrap();
        assert_eq!((a.mode & 0o7777, a.size), (0o0777, 0));
        v.release(fh).await.unwrap();
        // A write: dropped once this node has the mode cached (the kernel drops them itself
        // before a write to a file whose mode it knows).
        assert_eq!(v.setattr(&root, f.ino, chmod(0o6777)).await.map(mode_of), Ok(0o6777));
        let (fh, _) = v.open(&user, f.ino, libc::O_WRONLY).await.unwrap();
        v.write(fh, 0, b"x").await.unwrap();
        v.getattr(f.ino).await.unwrap();
        v.drop_setid_after_write(fh).await.unwrap();
        assert_eq!(v.getattr(f.ino).await.map(mode_of), Ok(0o0777));
        v.release(fh).await.unwrap();
    });
}
