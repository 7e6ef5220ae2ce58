//! The data path's metadata: volume policies, the cache node registry, slice locations,
//! tiering, re-replication and the garbage collection list.

mod common;

use common::*;
use elea_common::Errno;
use elea_fsm::*;

const MIB: u32 = 1 << 20;

fn piece(id: u64, len: u32) -> Slice {
    Slice { id, offset: 0, len, slice_len: len, slice_offset: 0 }
}

/// A harness with a tiered volume ("t", one store) and cache nodes 1..=3 registered.
fn setup() -> (H, u64) {
    let mut h = H::new();
    let cfg = VolumeConfig { stores: vec!["memory://".into()], replicas: 2, ..VolumeConfig::default() };
    let Reply::Volume(v) = h.ok(Op::CreateVolume { name: "t".into(), config: cfg.clone() }) else { panic!() };
    assert_eq!(v.config, cfg);
    h.vol = v.id;
    for id in 1..=3 {
        h.ok(Op::RegisterCacheNode { id, site: "a".into(), addr: format!("127.0.0.1:{id}"), incarnation: 7 });
    }
    (h, v.id)
}

fn locs(h: &H, ids: &[u64]) -> Vec<Option<SliceLoc>> {
    match h.q(Query::SliceLocs { ids: ids.to_vec() }) {
        Ok(Reply::SliceLocs(v)) => v.into_iter().map(|(_, l)| l).collect(),
        r => panic!("{r:?}"),
    }
}

fn staged(h: &H) -> Vec<StagedBlock> {
    match h.q(Query::StagedBlocks { after: (0, 0), limit: 100 }) {
        Ok(Reply::Blocks { blocks, more: false }) => blocks,
        r => panic!("{r:?}"),
    }
}

#[test]
fn volume_config_is_validated() {
    let mut h = H::new();
    let bad = [
        VolumeConfig { replicas: 0, ..VolumeConfig::default() },
        VolumeConfig { replicas: 6, ..VolumeConfig::default() },
        VolumeConfig { stores: vec![String::new()], ..VolumeConfig::default() },
        VolumeConfig { stores: vec!["memory://".into(), "memory://".into()], ..VolumeConfig::default() },
        VolumeConfig { stores: vec!["x".repeat(2000)], ..VolumeConfig::default() },
        VolumeConfig { compression: BlockCodec::Zstd(0), ..VolumeConfig::default() },
        VolumeConfig { compression: BlockCodec::Zstd(23), ..VolumeConfig::default() },
    ];
    for config in bad {
        assert_eq!(h.err(Op::CreateVolume { name: "x".into(), config }), Errno::EINVAL);
    }
    let config = VolumeConfig { compression: BlockCodec::None, replicas: 1, ..VolumeConfig::default() };
    h.ok(Op::CreateVolume { name: "x".into(), config: config.clone() });
    let Ok(Reply::Volume(v)) = h.q(Query::VolumeByName { name: "x".into() }) else { panic!() };
    assert_eq!(v.config, config);
}

#[test]
fn registry_liveness_and_incarnations() {
    let (mut h, _) = setup();
    assert_eq!(
        h.err(Op::RegisterCacheNode { id: 0, site: "a".into(), addr: "x:1".into(), incarnation: 1 }),
        Errno::EINVAL
    );
    assert_eq!(
        h.err(Op::RegisterCacheNode { id: 9, site: "a/b".into(), addr: "x:1".into(), incarnation: 1 }),
        Errno::EINVAL
    );
    assert_eq!(
        h.err(Op::RegisterCacheNode { id: 9, site: "a".into(), addr: String::new(), incarnation: 1 }),
        Errno::EINVAL
    );
    let stats = CacheStats { staged_bytes: 5, ..CacheStats::default() };
    assert_eq!(h.err(Op::CacheHeartbeat { id: 9, incarnation: 7, stats: stats.clone() }), Errno::ESTALE);
    assert_eq!(h.err(Op::CacheHeartbeat { id: 1, incarnation: 8, stats: stats.clone() }), Errno::ESTALE);
    h.ok(Op::CacheHeartbeat { id: 1, incarnation: 7, stats: stats.clone() });
    let Ok(Reply::CacheNodes(n)) = h.q(Query::CacheNodes) else { panic!() };
    assert_eq!(n.len(), 3);
    assert!(n.iter().all(|n| n.alive));
    assert_eq!(n[0].stats, stats);
    // Time passes with only node 1 heartbeating: 2 and 3 are declared dead.
    h.t += 11;
    h.ok(Op::CacheHeartbeat { id: 1, incarnation: 7, stats });
    let Ok(Reply::CacheNodes(n)) = h.q(Query::CacheNodes) else { panic!() };
    assert_eq!(n.iter().map(|n| n.alive).collect::<Vec<_>>(), vec![true, false, false]);
}

#[test]
fn write_records_locations_once() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    let w = |s: Slice, staged: Vec<Vec<u64>>| Op::WriteSlice { vol, ino: f, chunk: 0, slice: s, staged };
    let f0 = h.file(ROOT, "g");
    // Wrong block count, unknown node, duplicate node, empty list, too many replicas.
    assert_eq!(h.err(w(piece(5, 9 * MIB), vec![vec![1]; 2])), Errno::EINVAL);
    assert_eq!(h.err(w(piece(5, 9 * MIB), vec![vec![1], vec![2], vec![4]])), Errno::EINVAL);
    assert_eq!(h.err(w(piece(5, 9 * MIB), vec![vec![1], vec![2], vec![3, 3]])), Errno::EINVAL);
    assert_eq!(h.err(w(piece(5, 9 * MIB), vec![vec![1], vec![], vec![3]])), Errno::EINVAL);
    assert_eq!(h.err(w(piece(5, MIB), vec![vec![1, 2, 3, 1, 2, 3]])), Errno::EINVAL);
    h.ok(w(piece(5, 9 * MIB), vec![vec![1, 2], vec![2, 3], vec![3, 1]]));
    let t0 = h.now();
    let l = locs(&h, &[5, 6]);
    assert_eq!(l[1], None);
    let l = l[0].clone().unwrap();
    assert_eq!((l.vol, l.len, l.created, l.deleted), (vol, 9 * MIB, t0, None));
    assert_eq!(l.blocks[2], BlockLoc { nodes: vec![3, 1], tiered: StoreSet::EMPTY });
    let b = staged(&h);
    assert_eq!(
        b.iter().map(|b| (b.slice, b.index, b.len)).collect::<Vec<_>>(),
        vec![(5, 0, 4 * MIB), (5, 1, 4 * MIB), (5, 2, MIB)]
    );
    // The same slice referenced again (a copy) keeps its first location.
    let copy = Op::WriteSlice { vol, ino: f0, chunk: 0, slice: piece(5, 9 * MIB), staged: vec![] };
    h.ok(copy);
    assert_eq!(locs(&h, &[5])[0].as_ref().unwrap().created, t0);
    // Another volume cannot claim it.
    h.vol = 1;
    let f2 = h.file(ROOT, "other");
    h.vol = vol;
    assert_eq!(
        h.err(Op::WriteSlice { vol: 1, ino: f2, chunk: 0, slice: piece(5, MIB), staged: vec![vec![1]] }),
        Errno::EINVAL
    );
    // Paging through staged blocks.
    let Ok(Reply::Blocks { blocks, more: true }) = h.q(Query::StagedBlocks { after: (0, 0), limit: 2 })
    else {
        panic!()
    };
    assert_eq!(blocks.len(), 2);
    let Ok(Reply::Blocks { blocks, more: false }) = h.q(Query::StagedBlocks { after: (5, 1), limit: 2 })
    else {
        panic!()
    };
    assert_eq!(blocks.iter().map(|b| b.index).collect::<Vec<_>>(), vec![2]);
}

#[test]
fn tiering_and_replica_replacement() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    h.ok(Op::WriteSlice {
        vol,
        ino: f,
        chunk: 0,
        slice: piece(5, 5 * MIB),
        staged: vec![vec![1, 2], vec![2, 3]],
    });
    assert_eq!(h.err(Op::MarkTiered { store: 1, blocks: vec![(5, 0)] }), Errno::EINVAL);
    assert_eq!(h.err(Op::MarkTiered { store: 0, blocks: vec![(5, 2)] }), Errno::EINVAL);
    assert_eq!(h.err(Op::MarkTiered { store: 0, blocks: vec![] }), Errno::EINVAL);
    // Unknown slices are skipped.
    h.ok(Op::MarkTiered { store: 0, blocks: vec![(5, 0), (99, 0)] });
    let l = locs(&h, &[5])[0].clone().unwrap();
    assert_eq!(l.blocks[0], BlockLoc { nodes: vec![], tiered: StoreSet::one(0) });
    assert_eq!(staged(&h).iter().map(|b| b.index).collect::<Vec<_>>(), vec![1]);
    // Replace a dead replica, add one, and a no-op on a tiered block.
    assert_eq!(h.err(Op::ReplaceReplica { slice: 5, index: 1, old: Some(2), new: 9 }), Errno::EINVAL);
    assert_eq!(h.err(Op::ReplaceReplica { slice: 5, index: 7, old: Some(2), new: 1 }), Errno::EINVAL);
    h.ok(Op::ReplaceReplica { slice: 5, index: 1, old: Some(2), new: 1 });
    assert_eq!(locs(&h, &[5])[0].as_ref().unwrap().blocks[1].nodes, vec![1, 3]);
    h.ok(Op::ReplaceReplica { slice: 5, index: 1, old: None, new: 2 });
    h.ok(Op::ReplaceReplica { slice: 5, index: 1, old: Some(1), new: 2 });
    assert_eq!(locs(&h, &[5])[0].as_ref().unwrap().blocks[1].nodes, vec![3, 2]);
    h.ok(Op::ReplaceReplica { slice: 5, index: 0, old: None, new: 2 });
    assert_eq!(locs(&h, &[5])[0].as_ref().unwrap().blocks[0].nodes, Vec::<u64>::new());
    h.ok(Op::ReplaceReplica { slice: 77, index: 0, old: None, new: 2 });
    // Replacing a holder with itself changes nothing.
    h.ok(Op::ReplaceReplica { slice: 5, index: 1, old: Some(3), new: 3 });
    assert_eq!(locs(&h, &[5])[0].as_ref().unwrap().blocks[1].nodes, vec![3, 2]);
}

#[test]
fn new_incarnation_drops_the_nodes_copies() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    h.ok(Op::WriteSlice {
        vol,
        ino: f,
        chunk: 0,
        slice: piece(5, 5 * MIB),
        staged: vec![vec![1, 2], vec![2, 3]],
    });
    // Same incarnation: nothing lost.
    h.ok(Op::RegisterCacheNode { id: 2, site: "a".into(), addr: "127.0.0.1:2".into(), incarnation: 7 });
    assert_eq!(staged(&h)[0].nodes, vec![1, 2]);
    // Another incarnation while the registered one is alive: two processes share the id.
    let other = Op::RegisterCacheNode { id: 2, site: "a".into(), addr: "127.0.0.1:2".into(), incarnation: 8 };
    assert_eq!(h.err(other.clone()), Errno::EBUSY);
    h.t += 11;
    h.ok(other);
    let b = staged(&h);
    assert_eq!((b[0].nodes.clone(), b[1].nodes.clone()), (vec![1], vec![3]));
}

#[test]
fn deletes_wait_for_gc_then_are_forgotten() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: piece(5, MIB), staged: vec![vec![1, 2]] });
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 1, slice: piece(6, MIB), staged: vec![vec![1, 2]] });
    // Overwrite slice 5 entirely: it becomes garbage, 6 stays.
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: piece(7, MIB), staged: vec![vec![2, 3]] });
    let t_del = h.now();
    let Ok(Reply::Deletes { slices, more: false }) = h.q(Query::PendingDeletes { after: 0, limit: 10 })
    else {
        panic!()
    };
    assert_eq!(slices.len(), 1);
    assert_eq!((slices[0].0, slices[0].1), (5, t_del));
    assert_eq!(slices[0].2.as_ref().unwrap().deleted, Some(t_del));
    // Deleted slices are neither tiered nor re-replicated.
    assert!(staged(&h).iter().all(|b| b.slice != 5));
    // Forget only what is really deleted.
    h.ok(Op::ForgetSlices { ids: vec![5, 6] });
    assert_eq!(locs(&h, &[5, 6]).iter().map(Option::is_some).collect::<Vec<_>>(), vec![false, true]);
    let Ok(Reply::Deletes { slices, .. }) = h.q(Query::PendingDeletes { after: 0, limit: 10 }) else {
        panic!()
    };
    assert!(slices.is_empty());
    // Unlinking the file queues the rest.
    h.ok(Op::Unlink { vol, parent: ROOT, name: b"f".to_vec() });
    let Ok(Reply::Deletes { slices, more }) = h.q(Query::PendingDeletes { after: 0, limit: 1 }) else {
        panic!()
    };
    assert_eq!((slices.iter().map(|s| s.0).collect::<Vec<_>>(), more), (vec![6], true));
    let Ok(Reply::Deletes { slices, more }) = h.q(Query::PendingDeletes { after: 6, limit: 1 }) else {
        panic!()
    };
    assert_eq!((slices.iter().map(|s| s.0).collect::<Vec<_>>(), more), (vec![7], false));
}

#[test]
fn a_lost_copy_leaves_the_holder_list() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    h.ok(Op::WriteSlice {
        vol,
        ino: f,
        chunk: 0,
        slice: piece(5, 9 * MIB),
        staged: vec![vec![1, 2], vec![2, 3], vec![3, 1]],
    });
    let nodes =
        |h: &H| locs(h, &[5])[0].as_ref().unwrap().blocks.iter().map(|b| b.nodes.clone()).collect::<Vec<_>>();
    h.ok(Op::DropReplica { slice: 5, index: 1, node: 2 });
    assert_eq!(nodes(&h), vec![vec![1, 2], vec![3], vec![3, 1]]);
    // Again, a node that is not listed, an unknown index or slice: nothing changes.
    let before = locs(&h, &[5, 77]);
    h.ok(Op::DropReplica { slice: 5, index: 1, node: 2 });
    h.ok(Op::DropReplica { slice: 5, index: 0, node: 3 });
    h.ok(Op::DropReplica { slice: 5, index: 9, node: 1 });
    h.ok(Op::DropReplica { slice: 77, index: 0, node: 1 });
    assert_eq!(locs(&h, &[5, 77]), before);
    // The last holder can go: the block then has no staged copy, and is listed as such.
    h.ok(Op::DropReplica { slice: 5, index: 1, node: 3 });
    assert_eq!(staged(&h).iter().find(|b| b.index == 1).unwrap().nodes, Vec::<u64>::new());
    // Re-replication adds a copy back.
    h.ok(Op::ReplaceReplica { slice: 5, index: 1, old: None, new: 2 });
    assert_eq!(nodes(&h)[1], vec![2]);
    // A tiered block keeps its (empty) list and its store.
    h.ok(Op::MarkTiered { store: 0, blocks: vec![(5, 0)] });
    h.ok(Op::DropReplica { slice: 5, index: 0, node: 1 });
    assert_eq!(
        locs(&h, &[5])[0].as_ref().unwrap().blocks[0],
        BlockLoc { nodes: vec![], tiered: StoreSet::one(0) }
    );
    // A deleted slice waiting for GC keeps its holders: GC deletes the copies there.
    h.ok(Op::Unlink { vol, parent: ROOT, name: b"f".to_vec() });
    h.ok(Op::DropReplica { slice: 5, index: 2, node: 3 });
    assert_eq!(nodes(&h)[2], vec![3, 1]);
}

/// The list of a chunk and the pending deletes: what two ways of writing must agree on.
fn chunk_state(h: &H, ino: u64) -> (Vec<Slice>, Vec<u64>, u64) {
    let Ok(Reply::Slices(list)) = h.q(Query::ReadChunk { vol: h.vol, ino, chunk: 0 }) else { panic!() };
    let Ok(Reply::Deletes { slices, .. }) = h.q(Query::PendingDeletes { after: 0, limit: 4096 }) else {
        panic!()
    };
    (list, slices.into_iter().map(|s| s.0).collect(), h.attr(ino).size)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Many pieces of one slice in one op leave the same chunk list, slice references (what
    /// becomes garbage, after overwriting everything) and size as one `WriteSlice` per piece.
    #[test]
    fn pieces_in_one_op_equal_one_op_per_piece(
        old in proptest::collection::vec((0u32..64, 1u32..16), 0..12),
        new in proptest::collection::vec((0u32..8, 1u32..8), 1..10),
    ) {
        let run = |packed: bool| {
            let (mut h, vol) = setup();
            let f = h.file(ROOT, "f");
            for (i, (off, len)) in old.iter().enumerate() {
                let s = Slice { id: 100 + i as u64, offset: off * 1024, len: len * 1024, slice_len: 64 * 1024, slice_offset: 0 };
                h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: s, staged: vec![vec![1]] });
            }
            // Disjoint sorted pieces of slice 7, packed one after another in the slice.
            let mut pieces = Vec::new();
            let (mut at, mut packed_at) = (0u32, 0u32);
            for (gap, len) in &new {
                at += gap * 1024;
                pieces.push(Slice { id: 7, offset: at, len: len * 1024, slice_len: 0, slice_offset: packed_at });
                at += len * 1024;
                packed_at += len * 1024;
            }
            for p in &mut pieces {
                p.slice_len = packed_at;
            }
            if packed {
                h.ok(Op::WriteSlicePieces { vol, ino: f, chunk: 0, pieces: pieces.clone(), staged: vec![vec![2]] });
            } else {
                for p in &pieces {
                    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: *p, staged: vec![vec![2]] });
                }
            }
            let mut states = vec![chunk_state(&h, f)];
            // Overwrite everything in a few steps, each showing what became garbage.
            for (i, at) in [0u32, 20, 40, 60].into_iter().enumerate() {
                let s = Slice { id: 20 + i as u64, offset: at * 1024, len: 20 * 1024, slice_len: 20 * 1024, slice_offset: 0 };
                h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice: s, staged: vec![vec![3]] });
                states.push(chunk_state(&h, f));
            }
            states
        };
        proptest::prop_assert_eq!(run(true), run(false));
    }
}

#[test]
fn pieces_are_validated() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    let p = |id: u64, offset: u32, len: u32, slice_offset: u32| Slice {
        id,
        offset,
        len,
        slice_len: 8192,
        slice_offset,
    };
    let op =
        |pieces: Vec<Slice>| Op::WriteSlicePieces { vol, ino: f, chunk: 0, pieces, staged: vec![vec![1]] };
    let bad = [
        vec![],
        vec![p(0, 0, 10, 0)],
        vec![p(5, 0, 10, 0), p(6, 100, 10, 10)],
        vec![p(5, 100, 10, 0), p(5, 0, 10, 10)],
        vec![p(5, 0, 10, 0), p(5, 5, 10, 10)],
        vec![p(5, 0, 0, 0)],
        vec![p(5, 0, 10, 8190)],
        vec![Slice { slice_len: 100, ..p(5, 0, 10, 0) }, p(5, 20, 10, 10)],
        vec![p(5, (64 << 20) - 5, 10, 0)],
        vec![p(5, 0, 1, 0); 16385],
    ];
    for pieces in bad {
        assert_eq!(h.err(op(pieces)), Errno::EINVAL);
    }
    // Nothing of a rejected op was applied.
    assert_eq!(h.attr(f).size, 0);
    let Ok(Reply::Slices(list)) = h.q(Query::ReadChunk { vol, ino: f, chunk: 0 }) else { panic!() };
    assert!(list.is_empty());
    h.ok(op(vec![p(5, 0, 10, 0), p(5, 10, 10, 10), p(5, 4096, 100, 20)]));
    assert_eq!(h.attr(f).size, 4196);
}

/// A chunk-list op for [`no_write_leaves_pieces_overlapping`].
#[derive(Debug, Clone)]
enum ListOp {
    Write { at: u32, len: u32 },
    Pieces(Vec<(u32, u32)>),
    Truncate(u32),
    Punch { at: u32, len: u32 },
    Collapse { at: u32, len: u32 },
    Insert { at: u32, len: u32 },
}

fn list_op() -> impl proptest::strategy::Strategy<Value = ListOp> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0u32..96, 1u32..24).prop_map(|(at, len)| ListOp::Write { at, len }),
        2 => proptest::collection::vec((0u32..6, 1u32..6), 1..6).prop_map(ListOp::Pieces),
        1 => (0u32..110).prop_map(ListOp::Truncate),
        1 => (0u32..100, 1u32..20).prop_map(|(at, len)| ListOp::Punch { at, len }),
        1 => (0u32..24, 1u32..8).prop_map(|(at, len)| ListOp::Collapse { at, len }),
        1 => (0u32..24, 1u32..8).prop_map(|(at, len)| ListOp::Insert { at, len }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]
    /// Writes, truncations and fallocate never leave two pieces of a chunk list overlapping,
    /// so a file's allocated blocks (`st_blocks`) are the sum of its pieces, which is how
    /// they are counted: checked here against the union of the pieces.
    #[test]
    fn no_write_leaves_pieces_overlapping(ops in proptest::collection::vec(list_op(), 1..40)) {
        use fallocate_flags::*;
        const K: u64 = 4096;
        let (mut h, vol) = setup();
        let f = h.file(ROOT, "f");
        for (id, op) in (101u64..).zip(ops) {
            // Some are refused (a collapse past the end, say): the lists must hold either way.
            let _ = match op {
                ListOp::Write { at, len } => {
                    let s = Slice { id, offset: at * 4096, len: len * 4096, slice_len: len * 4096, slice_offset: 0 };
                    h.apply(Op::WriteSlice { vol, ino: f, chunk: 0, slice: s, staged: vec![vec![1]; len.div_ceil(1024) as usize] })
                }
                ListOp::Pieces(gaps) => {
                    let (mut at, mut packed) = (0u32, 0u32);
                    let mut pieces = Vec::new();
                    for (gap, len) in gaps {
                        at += gap * 4096;
                        pieces.push(Slice { id, offset: at, len: len * 4096, slice_len: 0, slice_offset: packed });
                        at += len * 4096;
                        packed += len * 4096;
                    }
                    for p in &mut pieces {
                        p.slice_len = packed;
                    }
                    h.apply(Op::WriteSlicePieces { vol, ino: f, chunk: 0, pieces, staged: vec![vec![1]] })
                }
                ListOp::Truncate(n) => h.apply(Op::SetAttr { vol, ino: f, set: SetAttr { size: Some(u64::from(n) * K), ..Default::default() } }),
                ListOp::Punch { at, len } => h.apply(Op::Fallocate { vol, ino: f, offset: u64::from(at) * K, len: u64::from(len) * K, mode: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE }),
                ListOp::Collapse { at, len } => h.apply(Op::Fallocate { vol, ino: f, offset: u64::from(at) * K, len: u64::from(len) * K, mode: FALLOC_FL_COLLAPSE_RANGE }),
                ListOp::Insert { at, len } => h.apply(Op::Fallocate { vol, ino: f, offset: u64::from(at) * K, len: u64::from(len) * K, mode: FALLOC_FL_INSERT_RANGE }),
            };
            let (list, _, size) = chunk_state(&h, f);
            let mut spans: Vec<(u64, u64)> = list
                .iter()
                .filter(|p| p.id != 0)
                .map(|p| (u64::from(p.offset), u64::from(p.offset) + u64::from(p.len)))
                .collect();
            spans.sort_unstable();
            for w in spans.windows(2) {
                proptest::prop_assert!(w[0].1 <= w[1].0, "pieces overlap: {:?} and {:?}", w[0], w[1]);
            }
            let union: u64 = spans.iter().map(|(s, e)| (*e).min(size).saturating_sub(*s)).sum();
            proptest::prop_assert_eq!(h.attr(f).blocks, union.div_ceil(4096) * 8);
        }
    }
}
