//! `FALLOC_FL_COLLAPSE_RANGE` and `FALLOC_FL_INSERT_RANGE` (checks, the rebuilt chunk lists,
//! slice references) and the allocated-block count `Attr::blocks`, including a property test
//! against a byte-level model of the file.

mod common;

use std::collections::BTreeSet;

use common::*;
use elea_common::{Errno, Ino};
use elea_fsm::fallocate_flags::*;
use elea_fsm::*;
use proptest::prelude::*;

const CHUNK: u64 = 64 << 20;
const K: u64 = 4096;
const COLLAPSE: u32 = FALLOC_FL_COLLAPSE_RANGE;
const INSERT: u32 = FALLOC_FL_INSERT_RANGE;

fn fa(h: &H, ino: Ino, offset: u64, len: u64, mode: u32) -> Op {
    Op::Fallocate { vol: h.vol, ino, offset, len, mode }
}

/// A piece at byte `offset` of its chunk.
fn sl(id: u64, offset: u64, len: u64, slice_len: u64, slice_offset: u64) -> Slice {
    Slice {
        id,
        offset: offset as u32,
        len: len as u32,
        slice_len: slice_len as u32,
        slice_offset: slice_offset as u32,
    }
}

/// Write `len` bytes of slice `id` (from byte `skip` of it) at file offset `at`, one
/// `WriteSlice` per chunk the range touches, as a gateway does.
fn write(h: &mut H, ino: Ino, id: u64, at: u64, len: u64, slice_len: u64, skip: u64) {
    let mut done = 0;
    while done < len {
        let pos = at + done;
        let n = (CHUNK - pos % CHUNK).min(len - done);
        let slice = sl(id, pos % CHUNK, n, slice_len, skip + done);
        h.ok(Op::WriteSlice { vol: h.vol, ino, chunk: pos / CHUNK, slice, staged: vec![] });
        done += n;
    }
}

fn chunk(h: &H, ino: Ino, c: u64) -> Vec<Slice> {
    match h.q(Query::ReadChunk { vol: h.vol, ino, chunk: c }) {
        Ok(Reply::Slices(s)) => s,
        r => panic!("{r:?}"),
    }
}

fn pending(h: &H) -> Vec<u64> {
    h.sm.pending_deletes().collect()
}

fn truncate(h: &mut H, ino: Ino, size: u64) {
    h.ok(Op::SetAttr { vol: h.vol, ino, set: SetAttr { size: Some(size), ..Default::default() } });
}

// ---------- checks ----------

#[test]
fn shifts_are_checked_before_anything_changes() {
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
    let link = entry_ino(h.ok(Op::Symlink {
        vol,
        parent: ROOT,
        name: "l".into(),
        target: b"f".to_vec(),
        uid: 0,
        gid: 0,
        ino: None,
    }));
    // An empty file: nothing to collapse, no offset inside it to insert at.
    assert_eq!(h.err(fa(&h, f, 0, K, COLLAPSE)), Errno::EINVAL);
    assert_eq!(h.err(fa(&h, f, 0, K, INSERT)), Errno::EINVAL);
    write(&mut h, f, 1, 0, 16 * K, 16 * K, 0);
    for mode in [COLLAPSE, INSERT] {
        // Any other flag with a shifting mode, the other shifting mode included.
        for other in [
            FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_PUNCH_HOLE,
            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            FALLOC_FL_ZERO_RANGE,
            COLLAPSE | INSERT,
            0x04,
            0x40,
            0x100,
        ] {
            assert_eq!(h.err(fa(&h, f, 0, K, mode | other)), Errno::EINVAL, "{mode:#x} | {other:#x}");
        }
        assert_eq!(h.err(fa(&h, f, 0, 0, mode)), Errno::EINVAL);
        // Offset and length in whole 4 KiB blocks.
        for (offset, len) in [(1, K), (K - 1, K), (512, K), (0, 1), (0, K + 1), (K, 2 * K - 512)] {
            assert_eq!(h.err(fa(&h, f, offset, len, mode)), Errno::EINVAL, "{offset} {len}");
        }
        assert_eq!(h.err(fa(&h, d, 0, K, mode)), Errno::EISDIR);
        assert_eq!(h.err(fa(&h, fifo, 0, K, mode)), Errno::ENODEV);
        assert_eq!(h.err(fa(&h, link, 0, K, mode)), Errno::ENODEV);
        assert_eq!(h.err(fa(&h, 999, 0, K, mode)), Errno::ENOENT);
        assert_eq!(h.err(Op::Fallocate { vol: 9, ino: f, offset: 0, len: K, mode }), Errno::ENODEV);
        // The range must end within the largest file size.
        assert_eq!(h.err(fa(&h, f, u64::MAX - K + 1, K, mode)), Errno::EFBIG);
        assert_eq!(h.err(fa(&h, f, limits::FILE_SIZE_MAX, K, mode)), Errno::EFBIG);
        assert_eq!(h.err(fa(&h, f, 0, u64::MAX - K + 1, mode)), Errno::EFBIG);
    }
    // Collapse: the range must end before the end of the file.
    assert_eq!(h.err(fa(&h, f, 0, 16 * K, COLLAPSE)), Errno::EINVAL);
    assert_eq!(h.err(fa(&h, f, 8 * K, 8 * K, COLLAPSE)), Errno::EINVAL);
    assert_eq!(h.err(fa(&h, f, 8 * K, 9 * K, COLLAPSE)), Errno::EINVAL);
    assert_eq!(h.err(fa(&h, f, 16 * K, K, COLLAPSE)), Errno::EINVAL);
    assert_eq!(h.err(fa(&h, f, 32 * K, K, COLLAPSE)), Errno::EINVAL);
    // A size that is not block aligned: the end of the range is compared with it exactly.
    truncate(&mut h, f, 16 * K - 1);
    assert_eq!(h.err(fa(&h, f, 8 * K, 8 * K, COLLAPSE)), Errno::EINVAL);
    h.ok(fa(&h, f, 8 * K, 7 * K, COLLAPSE));
    assert_eq!(h.attr(f).size, 9 * K - 1);
    // Insert: the offset must be inside the file.
    assert_eq!(h.err(fa(&h, f, 9 * K, K, INSERT)), Errno::EINVAL);
    assert_eq!(h.err(fa(&h, f, 12 * K, K, INSERT)), Errno::EINVAL);
    h.ok(fa(&h, f, 8 * K, K, INSERT));
    assert_eq!(h.attr(f).size, 10 * K - 1);
    // Insert: the new size must not pass the largest file size.
    truncate(&mut h, f, limits::FILE_SIZE_MAX - 4 * K);
    assert_eq!(h.err(fa(&h, f, 0, 5 * K, INSERT)), Errno::EFBIG);
    assert_eq!(h.err(fa(&h, f, limits::FILE_SIZE_MAX - 4 * K, 5 * K, INSERT)), Errno::EFBIG);
    assert_eq!(h.err(fa(&h, f, limits::FILE_SIZE_MAX - 4 * K, K, INSERT)), Errno::EINVAL);
    h.ok(fa(&h, f, 0, 4 * K, INSERT));
    assert_eq!(h.attr(f).size, limits::FILE_SIZE_MAX);
    assert_eq!(h.err(fa(&h, f, 0, K, INSERT)), Errno::EFBIG);
    // The other modes still refuse bits they do not know.
    assert_eq!(h.err(fa(&h, f, 0, K, 0x40)), Errno::EOPNOTSUPP);
    assert_eq!(h.err(fa(&h, f, 0, K, FALLOC_FL_PUNCH_HOLE)), Errno::EOPNOTSUPP);
}

// ---------- the rebuilt lists ----------

/// Slice 1 over `[CHUNK - 16K, CHUNK + 16K)` written across the chunk boundary, slice 2 over
/// `[CHUNK - 4K, CHUNK + 4K)` written after it, slice 3 (1000 bytes) at `2 CHUNK + 100`.
fn across_boundary() -> (H, Ino) {
    let mut h = H::new();
    let f = h.file(ROOT, "f");
    write(&mut h, f, 1, CHUNK - 16 * K, 32 * K, 32 * K, 0);
    write(&mut h, f, 2, CHUNK - 4 * K, 8 * K, 8 * K, 0);
    write(&mut h, f, 3, 2 * CHUNK + 100, 1000, 1000, 0);
    assert_eq!(
        chunk(&h, f, 0),
        vec![sl(1, CHUNK - 16 * K, 12 * K, 32 * K, 0), sl(2, CHUNK - 4 * K, 4 * K, 8 * K, 0)]
    );
    assert_eq!(chunk(&h, f, 1), vec![sl(1, 4 * K, 12 * K, 32 * K, 20 * K), sl(2, 0, 4 * K, 8 * K, 4 * K)]);
    assert_eq!(chunk(&h, f, 2), vec![sl(3, 100, 1000, 1000, 0)]);
    assert_eq!(h.attr(f).size, 2 * CHUNK + 1100);
    (h, f)
}

#[test]
fn collapse_moves_pieces_down_across_chunks() {
    let (mut h, f) = across_boundary();
    // Remove [CHUNK - 8K, CHUNK + 4K): the tail of slice 1's first piece and all of slice 2.
    let (r, changes) = h.apply(fa(&h, f, CHUNK - 8 * K, 12 * K, COLLAPSE));
    let Ok(Reply::Attr(a)) = r else { panic!("{r:?}") };
    assert_eq!(a.size, 2 * CHUNK + 1100 - 12 * K);
    assert_eq!((a.mtime, a.ctime), (h.now(), h.now()));
    assert_eq!(changes.len(), 1);
    assert_eq!((changes[0].vol, changes[0].changes.clone()), (h.vol, vec![Change::Inode(f)]));
    // Slice 1's second piece now straddles the boundary and is split there; slice 3 moves
    // into chunk 1 and chunk 2 is gone.
    assert_eq!(
        chunk(&h, f, 0),
        vec![sl(1, CHUNK - 16 * K, 8 * K, 32 * K, 0), sl(1, CHUNK - 8 * K, 8 * K, 32 * K, 20 * K)]
    );
    assert_eq!(
        chunk(&h, f, 1),
        vec![sl(1, 0, 4 * K, 32 * K, 28 * K), sl(3, CHUNK - 12 * K + 100, 1000, 1000, 0)]
    );
    assert_eq!(chunk(&h, f, 2), vec![]);
    assert_eq!(pending(&h), vec![2]);
    // Slice 1 has three pieces: it is freed with the last of them, not before.
    truncate(&mut h, f, CHUNK - 8 * K);
    assert_eq!(chunk(&h, f, 0), vec![sl(1, CHUNK - 16 * K, 8 * K, 32 * K, 0)]);
    assert_eq!(pending(&h), vec![2, 3]);
    truncate(&mut h, f, 0);
    assert_eq!(pending(&h), vec![1, 2, 3]);
}

#[test]
fn collapse_by_whole_chunks_moves_lists() {
    let (mut h, f) = across_boundary();
    h.ok(fa(&h, f, 0, CHUNK, COLLAPSE));
    // Chunk 0 is gone whole (slice 1's and 2's first pieces), chunks 1 and 2 move down intact.
    assert_eq!(chunk(&h, f, 0), vec![sl(1, 4 * K, 12 * K, 32 * K, 20 * K), sl(2, 0, 4 * K, 8 * K, 4 * K)]);
    assert_eq!(chunk(&h, f, 1), vec![sl(3, 100, 1000, 1000, 0)]);
    assert_eq!(chunk(&h, f, 2), vec![]);
    assert_eq!(h.attr(f).size, CHUNK + 1100);
    assert!(pending(&h).is_empty());
    h.ok(fa(&h, f, 0, CHUNK, COLLAPSE));
    assert_eq!(chunk(&h, f, 0), vec![sl(3, 100, 1000, 1000, 0)]);
    assert_eq!(pending(&h), vec![1, 2]);
    assert_eq!(h.attr(f).size, 1100);
}

#[test]
fn insert_moves_pieces_up_across_chunks() {
    let (mut h, f) = across_boundary();
    // Open 8K at CHUNK - 12K, inside slice 1's first piece.
    let (r, changes) = h.apply(fa(&h, f, CHUNK - 12 * K, 8 * K, INSERT));
    let Ok(Reply::Attr(a)) = r else { panic!("{r:?}") };
    assert_eq!(a.size, 2 * CHUNK + 1100 + 8 * K);
    assert_eq!((a.mtime, a.ctime), (h.now(), h.now()));
    assert_eq!((changes[0].vol, changes[0].changes.clone()), (h.vol, vec![Change::Inode(f)]));
    // The piece is split at the insertion point, and its moved part again at the boundary.
    // Pieces keep their order: what came from chunk 0 before what was already in chunk 1.
    assert_eq!(
        chunk(&h, f, 0),
        vec![sl(1, CHUNK - 16 * K, 4 * K, 32 * K, 0), sl(1, CHUNK - 4 * K, 4 * K, 32 * K, 4 * K)]
    );
    assert_eq!(
        chunk(&h, f, 1),
        vec![
            sl(1, 0, 4 * K, 32 * K, 8 * K),
            sl(2, 4 * K, 4 * K, 8 * K, 0),
            sl(1, 12 * K, 12 * K, 32 * K, 20 * K),
            sl(2, 8 * K, 4 * K, 8 * K, 4 * K),
        ]
    );
    assert_eq!(chunk(&h, f, 2), vec![sl(3, 8 * K + 100, 1000, 1000, 0)]);
    assert!(pending(&h).is_empty());
    // Slice 1 has four pieces now, slice 2 two.
    truncate(&mut h, f, CHUNK + 4 * K);
    assert_eq!(pending(&h), vec![2, 3]);
    truncate(&mut h, f, CHUNK - 4 * K);
    assert_eq!(pending(&h), vec![2, 3]);
    truncate(&mut h, f, 0);
    assert_eq!(pending(&h), vec![1, 2, 3]);
}

#[test]
fn insert_by_more_than_a_chunk() {
    let (mut h, f) = across_boundary();
    h.ok(fa(&h, f, 0, 2 * CHUNK + 8 * K, INSERT));
    assert_eq!(h.attr(f).size, 4 * CHUNK + 8 * K + 1100);
    assert_eq!(chunk(&h, f, 0), vec![]);
    assert_eq!(chunk(&h, f, 1), vec![]);
    assert_eq!(chunk(&h, f, 2), vec![sl(1, CHUNK - 8 * K, 8 * K, 32 * K, 0)]);
    assert_eq!(
        chunk(&h, f, 3),
        vec![
            sl(1, 0, 4 * K, 32 * K, 8 * K),
            sl(2, 4 * K, 4 * K, 8 * K, 0),
            sl(1, 12 * K, 12 * K, 32 * K, 20 * K),
            sl(2, 8 * K, 4 * K, 8 * K, 4 * K),
        ]
    );
    assert_eq!(chunk(&h, f, 4), vec![sl(3, 8 * K + 100, 1000, 1000, 0)]);
    // And back: the same bytes at the same places; slice 1's first piece stays in two.
    h.ok(fa(&h, f, 0, 2 * CHUNK + 8 * K, COLLAPSE));
    assert_eq!(h.attr(f).size, 2 * CHUNK + 1100);
    let sorted = |h: &H, c| {
        let mut v = chunk(h, f, c);
        v.sort_by_key(|s| s.offset);
        v
    };
    assert_eq!(
        sorted(&h, 0),
        vec![
            sl(1, CHUNK - 16 * K, 8 * K, 32 * K, 0),
            sl(1, CHUNK - 8 * K, 4 * K, 32 * K, 8 * K),
            sl(2, CHUNK - 4 * K, 4 * K, 8 * K, 0)
        ]
    );
    assert_eq!(sorted(&h, 1), vec![sl(2, 0, 4 * K, 8 * K, 4 * K), sl(1, 4 * K, 12 * K, 32 * K, 20 * K)]);
    assert_eq!(sorted(&h, 2), vec![sl(3, 100, 1000, 1000, 0)]);
    assert!(pending(&h).is_empty());
}

#[test]
fn collapse_frees_only_slices_it_removes_whole() {
    let mut h = H::new();
    let f = h.file(ROOT, "f");
    let g = h.file(ROOT, "g");
    write(&mut h, f, 10, 0, 8 * K, 8 * K, 0);
    write(&mut h, f, 11, 8 * K, 2 * K, 2 * K, 0);
    write(&mut h, f, 14, 10 * K, 2 * K, 2 * K, 0);
    write(&mut h, f, 12, 12 * K, 8 * K, 8 * K, 0);
    write(&mut h, f, 13, 20 * K, 4 * K, 4 * K, 0);
    // Slice 14 is shared with another file.
    write(&mut h, g, 14, 0, 2 * K, 2 * K, 0);
    h.ok(fa(&h, f, 8 * K, 8 * K, COLLAPSE));
    // 11 was inside the range and is garbage; 14 was too but g still has it; 12 was partly
    // inside and keeps its second half.
    assert_eq!(pending(&h), vec![11]);
    assert_eq!(
        chunk(&h, f, 0),
        vec![sl(10, 0, 8 * K, 8 * K, 0), sl(12, 8 * K, 4 * K, 8 * K, 4 * K), sl(13, 12 * K, 4 * K, 4 * K, 0)]
    );
    assert_eq!(h.attr(f).size, 16 * K);
    h.ok(Op::Unlink { vol: h.vol, parent: ROOT, name: "g".into() });
    assert_eq!(pending(&h), vec![11, 14]);
    h.ok(Op::Unlink { vol: h.vol, parent: ROOT, name: "f".into() });
    assert_eq!(pending(&h), vec![10, 11, 12, 13, 14]);
}

#[test]
fn shifts_keep_holes_and_account_the_size() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    write(&mut h, f, 1, 0, 12 * K, 12 * K, 0);
    h.ok(fa(&h, f, 4 * K, 2 * K, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE));
    h.ok(fa(&h, f, 2 * K, 4 * K, COLLAPSE));
    // The hole was inside the collapsed range and went with it.
    assert_eq!(chunk(&h, f, 0), vec![sl(1, 0, 2 * K, 12 * K, 0), sl(1, 2 * K, 6 * K, 12 * K, 6 * K)]);
    h.ok(fa(&h, f, 0, 4 * K, INSERT));
    assert_eq!(chunk(&h, f, 0), vec![sl(1, 4 * K, 2 * K, 12 * K, 0), sl(1, 6 * K, 6 * K, 12 * K, 6 * K)]);
    let Ok(Reply::StatFs(s)) = h.q(Query::StatFs { vol }) else { panic!() };
    assert_eq!((s.used_bytes, h.attr(f).size), (12 * K, 12 * K));
    h.ok(fa(&h, f, 3 * K, 2 * K, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE));
    h.ok(fa(&h, f, 4 * K, 4 * K, INSERT));
    assert_eq!(
        chunk(&h, f, 0),
        vec![
            sl(1, 9 * K, K, 12 * K, K),
            sl(1, 10 * K, 6 * K, 12 * K, 6 * K),
            sl(0, 3 * K, K, 2 * K, 0),
            sl(0, 8 * K, K, 2 * K, K)
        ]
    );
    let Ok(Reply::StatFs(s)) = h.q(Query::StatFs { vol }) else { panic!() };
    assert_eq!(s.used_bytes, 16 * K);
}

// ---------- blocks ----------

#[test]
fn blocks_count_written_bytes_below_the_size() {
    let mut h = H::new();
    let vol = h.vol;
    let f = h.file(ROOT, "f");
    let d = h.mkdir(ROOT, "d");
    let blocks = |h: &H| h.attr(f).blocks;
    assert_eq!(blocks(&h), 0);
    // Reserved space holds no data.
    h.ok(fa(&h, f, 0, 1 << 20, 0));
    assert_eq!(blocks(&h), 0);
    truncate(&mut h, f, 0);
    // 100 bytes take a whole block.
    let Reply::Attr(a) =
        h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: sl(1, 0, 100, 100, 0), staged: vec![] })
    else {
        panic!()
    };
    assert_eq!(a.blocks, 8);
    write(&mut h, f, 2, 4 * K, 2 * K, 2 * K, 0);
    assert_eq!(blocks(&h), 24, "100 + 8192 bytes round up to three blocks");
    // Overlapping writes count once.
    write(&mut h, f, 3, 0, 2 * K, 2 * K, 0);
    write(&mut h, f, 4, K, 4 * K, 4 * K, 0);
    assert_eq!(blocks(&h), 48);
    // A punched hole frees its blocks; holes and zeroed ranges count nothing.
    h.ok(fa(&h, f, K, 2 * K, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE));
    assert_eq!(blocks(&h), 32);
    h.ok(fa(&h, f, 0, K, FALLOC_FL_ZERO_RANGE));
    assert_eq!(blocks(&h), 24);
    h.ok(fa(&h, f, 0, 32 * K, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE));
    assert_eq!((blocks(&h), h.attr(f).size), (0, 6 * K));
    // Truncation: only bytes below the size count.
    write(&mut h, f, 5, 0, 6 * K, 6 * K, 0);
    truncate(&mut h, f, 2 * K + 1);
    assert_eq!(blocks(&h), 24);
    truncate(&mut h, f, 10 * K);
    assert_eq!(blocks(&h), 24);
    // Across a chunk boundary, then collapse and insert.
    write(&mut h, f, 6, CHUNK - 2 * K, 4 * K, 4 * K, 0);
    assert_eq!(blocks(&h), 56, "8193 + 16384 bytes");
    h.ok(fa(&h, f, CHUNK - 4 * K, 3 * K, COLLAPSE));
    assert_eq!(blocks(&h), 48, "a quarter of slice 6 was in the collapsed range");
    h.ok(fa(&h, f, 0, CHUNK, INSERT));
    assert_eq!(blocks(&h), 48);
    h.ok(fa(&h, f, K, 2 * K, INSERT));
    assert_eq!(blocks(&h), 48);
    assert_eq!(h.attr(f).size, 2 * CHUNK - 2 * K + 2 * K + K);
    // Every reply carries the same count; non-regular files have none.
    let Ok(Reply::Entry { attr, .. }) = h.q(Query::Lookup { vol, parent: ROOT, name: "f".into() }) else {
        panic!()
    };
    assert_eq!(attr.blocks, 48);
    let Ok(Reply::Dir { entries, .. }) =
        h.q(Query::ReadDir { vol, ino: ROOT, cookie: 0, limit: 10, plus: true })
    else {
        panic!()
    };
    let e = entries.iter().find(|e| e.ino == f).unwrap();
    assert_eq!(e.attr.as_ref().unwrap().blocks, 48);
    assert_eq!(h.attr(d).blocks, 0);
    assert_eq!(h.attr(ROOT).blocks, 0);
}

// ---------- against a byte-level model ----------

/// Byte `k` of slice `id`'s data: never zero, so a byte that should hold data and reads as
/// a hole shows.
fn data(id: u64, k: u64) -> u8 {
    ((id * 151 + k * 7 + (k >> 9) * 31) % 251 + 1) as u8
}

/// Writes, holes and truncations start within this many bytes above the model's `base`.
const WINDOW: u64 = 64 * 1024;

/// The file as bytes: everything below `base` is zero (nothing was ever written there), and
/// `bytes` holds `[base, size)`. Operations touch the window from `base` up; shifts below it
/// move `base`.
#[derive(Debug)]
struct Model {
    base: u64,
    bytes: Vec<u8>,
}

impl Model {
    fn size(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }

    fn set_size(&mut self, size: u64) {
        self.bytes.resize((size - self.base) as usize, 0);
    }

    fn fill(&mut self, at: u64, len: u64, mut byte: impl FnMut(u64) -> u8) {
        let end = at + len;
        if end > self.size() {
            self.set_size(end);
        }
        for k in 0..len {
            self.bytes[(at + k - self.base) as usize] = byte(k);
        }
    }

    /// Allocated blocks: every data byte is non-zero.
    fn blocks(&self) -> u64 {
        (self.bytes.iter().filter(|b| **b != 0).count() as u64).div_ceil(K) * 8
    }

    /// What `fallocate` with a shifting mode must do.
    fn shift(&mut self, offset: u64, len: u64, collapse: bool) -> Result<(), Errno> {
        let size = self.size();
        if !offset.is_multiple_of(K) || !len.is_multiple_of(K) {
            return Err(Errno::EINVAL);
        }
        if collapse && offset + len >= size || !collapse && offset >= size {
            return Err(Errno::EINVAL);
        }
        if collapse && offset + len <= self.base {
            self.base -= len;
        } else if !collapse && offset <= self.base {
            self.base += len;
        } else if collapse {
            assert!(offset >= self.base, "generated a collapse across the model's base");
            let at = (offset - self.base) as usize;
            self.bytes.drain(at..at + len as usize);
        } else {
            let at = (offset - self.base) as usize;
            self.bytes.splice(at..at, std::iter::repeat_n(0, len as usize));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum MOp {
    /// `len` bytes of a new slice from byte `skip` of it, at `base + at`.
    Write {
        at: u64,
        len: u64,
        skip: u64,
    },
    Punch {
        at: u64,
        len: u64,
    },
    Zero {
        at: u64,
        len: u64,
    },
    Truncate {
        at: u64,
    },
    /// At `base + blocks * 4K + skew` in the window (`skew` is usually 0).
    Shift {
        collapse: bool,
        blocks: u64,
        len_blocks: u64,
        skew: u64,
    },
    /// The range is below the window (ends at `base` or before, for a collapse).
    ShiftBelow {
        collapse: bool,
        gap_blocks: u64,
        len: u64,
    },
}

fn mop() -> impl Strategy<Value = MOp> {
    let big = prop_oneof![
        (1u64..8).prop_map(|b| b * K),
        Just(CHUNK - K),
        Just(CHUNK),
        Just(CHUNK + 3 * K),
        Just(2 * CHUNK - 5 * K)
    ];
    prop_oneof![
        4 => (0..WINDOW, 1u64..20_000, 0u64..3000).prop_map(|(at, len, skip)| MOp::Write { at, len, skip }),
        1 => (0..WINDOW, 1u64..12_000).prop_map(|(at, len)| MOp::Punch { at, len }),
        1 => (0..WINDOW, 1u64..12_000).prop_map(|(at, len)| MOp::Zero { at, len }),
        1 => (0..WINDOW).prop_map(|at| MOp::Truncate { at }),
        3 => (any::<bool>(), 0u64..16, 1u64..8, prop_oneof![8 => Just(0u64), 1 => Just(1), 1 => Just(512)])
            .prop_map(|(collapse, blocks, len_blocks, skew)| MOp::Shift { collapse, blocks, len_blocks, skew }),
        1 => (any::<bool>(), 0u64..4, big)
            .prop_map(|(collapse, gap_blocks, len)| MOp::ShiftBelow { collapse, gap_blocks, len }),
    ]
}

/// Apply `op` to both; compare the outcome. `next_id` names the next new slice.
fn step(h: &mut H, f: Ino, m: &mut Model, op: &MOp, next_id: &mut u64) -> Result<(), TestCaseError> {
    let base = m.base;
    match *op {
        MOp::Write { at, len, skip } => {
            let id = *next_id;
            *next_id += 1;
            write(h, f, id, base + at, len, skip + len + 100, skip);
            m.fill(base + at, len, |k| data(id, skip + k));
        }
        MOp::Punch { at, len } => {
            h.ok(fa(h, f, base + at, len, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE));
            let size = m.size();
            let end = (base + at + len).min(size);
            if base + at < end {
                m.fill(base + at, end - base - at, |_| 0);
            }
        }
        MOp::Zero { at, len } => {
            h.ok(fa(h, f, base + at, len, FALLOC_FL_ZERO_RANGE));
            m.fill(base + at, len, |_| 0);
        }
        MOp::Truncate { at } => {
            truncate(h, f, base + at);
            m.set_size(base + at);
        }
        MOp::Shift { collapse, blocks, len_blocks, skew } => {
            let (offset, len) = (base + blocks * K + skew, len_blocks * K);
            if !collapse && m.size() + len > base + 8 * WINDOW {
                return Ok(());
            }
            shift(h, f, m, offset, len, collapse)?;
        }
        MOp::ShiftBelow { collapse, gap_blocks, len } => {
            let gap = gap_blocks * K;
            let offset = if collapse {
                match base.checked_sub(len + gap) {
                    Some(o) => o,
                    None => return Ok(()),
                }
            } else {
                base.saturating_sub(gap)
            };
            shift(h, f, m, offset, len, collapse)?;
        }
    }
    Ok(())
}

fn shift(
    h: &mut H,
    f: Ino,
    m: &mut Model,
    offset: u64,
    len: u64,
    collapse: bool,
) -> Result<(), TestCaseError> {
    let mode = if collapse { COLLAPSE } else { INSERT };
    let op = fa(h, f, offset, len, mode);
    match m.shift(offset, len, collapse) {
        Ok(()) => {
            h.ok(op);
        }
        Err(e) => prop_assert_eq!(h.err(op), e),
    }
    Ok(())
}

/// Read the file through its chunk lists and compare every byte, the size and the block
/// count with the model; check that exactly the slices no piece references wait for
/// garbage collection.
fn check(h: &H, f: Ino, m: &Model, written: u64) -> Result<(), TestCaseError> {
    let a = h.attr(f);
    prop_assert_eq!(a.size, m.size());
    let mut got = vec![0u8; m.bytes.len()];
    let mut referenced = BTreeSet::new();
    for c in 0..=a.size / CHUNK + 1 {
        for p in chunk(h, f, c) {
            prop_assert!(
                p.len > 0 && u64::from(p.offset) + u64::from(p.len) <= CHUNK,
                "piece {:?} does not fit chunk {}",
                p,
                c
            );
            let start = c * CHUNK + u64::from(p.offset);
            let end = start + u64::from(p.len);
            // Nothing was ever written below the window, and nothing may stay past the end.
            prop_assert!(start >= m.base && end <= a.size, "piece {:?} of chunk {} outside the file", p, c);
            if p.id != 0 {
                referenced.insert(p.id);
            }
            for pos in start..end {
                let k = u64::from(p.slice_offset) + (pos - start);
                got[(pos - m.base) as usize] = if p.id == 0 { 0 } else { data(p.id, k) };
            }
        }
    }
    if got != m.bytes {
        let at = got.iter().zip(&m.bytes).position(|(a, b)| a != b).unwrap_or(0);
        prop_assert!(false, "first differing byte at {} (file offset {})", at, m.base + at as u64);
    }
    prop_assert_eq!(a.blocks, m.blocks());
    let pending: BTreeSet<u64> = h.sm.pending_deletes().collect();
    let unreferenced: BTreeSet<u64> = (100..written).filter(|id| !referenced.contains(id)).collect();
    prop_assert_eq!(pending, unreferenced);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// Random writes, holes, truncations and shifts of a file around a chunk boundary, with
    /// shifts both inside the written window and below it (which move the window across
    /// chunks): every step reads exactly like the byte model, and frees exactly the slices
    /// nothing references any more.
    #[test]
    fn shifts_match_a_byte_model(ops in prop::collection::vec(mop(), 1..60)) {
        let mut h = H::new();
        let f = h.file(ROOT, "f");
        let mut m = Model { base: CHUNK - WINDOW / 2, bytes: Vec::new() };
        truncate(&mut h, f, m.base);
        let mut next_id = 100;
        for op in &ops {
            step(&mut h, f, &mut m, op, &mut next_id)?;
            check(&h, f, &m, next_id).map_err(|e| TestCaseError::fail(format!("after {op:?}: {e}")))?;
        }
        // No reference is left over: with the data gone, every slice is garbage.
        truncate(&mut h, f, 0);
        let pending: Vec<u64> = h.sm.pending_deletes().collect();
        prop_assert_eq!(pending, (100..next_id).collect::<Vec<_>>());
    }
}
