//! Inline slices: writes whose bytes travel in the command, kept in the state until the
//! spill worker stages them on cache nodes.

mod common;

use std::collections::HashMap;

use common::*;
use elea_common::Errno;
use elea_fsm::*;

/// A harness with a volume of two replicas and cache nodes 1..=3 registered.
fn setup() -> (H, u64) {
    let mut h = H::new();
    let cfg = VolumeConfig { stores: vec!["memory://".into()], replicas: 2, ..VolumeConfig::default() };
    let Reply::Volume(v) = h.ok(Op::CreateVolume { name: "t".into(), config: cfg }) else { panic!() };
    h.vol = v.id;
    for id in 1..=3 {
        h.ok(Op::RegisterCacheNode { id, site: "a".into(), addr: format!("127.0.0.1:{id}"), incarnation: 7 });
    }
    (h, v.id)
}

fn inline(vol: u64, ino: u64, id: u64, offset: u32, data: &[u8]) -> Op {
    let len = data.len() as u32;
    let pieces = vec![Slice { id, offset, len, slice_len: len, slice_offset: 0 }];
    Op::WriteInline { vol, ino, chunk: 0, pieces, data: data.to_vec() }
}

fn slice_data(h: &H, ids: &[u64]) -> Vec<SliceData> {
    match h.q(Query::SliceData { ids: ids.to_vec() }) {
        Ok(Reply::SliceData(v)) => v,
        r => panic!("{r:?}"),
    }
}

fn inline_ids(h: &H) -> Vec<u64> {
    match h.q(Query::InlineSlices { after: 0, limit: 4096 }) {
        Ok(Reply::Inline { slices, more: false }) => slices.iter().map(|s| s.slice).collect(),
        r => panic!("{r:?}"),
    }
}

#[test]
fn an_inline_write_is_read_back_from_metadata_until_it_is_spilled() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    let Reply::Attr(a) = h.ok(inline(vol, f, 10, 100, b"hello")) else { panic!() };
    assert_eq!((a.size, a.blocks), (105, 8));
    let Ok(Reply::Slices(list)) = h.q(Query::ReadChunk { vol, ino: f, chunk: 0 }) else { panic!() };
    assert_eq!(list, vec![Slice { id: 10, offset: 100, len: 5, slice_len: 5, slice_offset: 0 }]);
    let d = slice_data(&h, &[10, 11]);
    assert_eq!(d[0].inline.as_deref(), Some(&b"hello"[..]));
    let loc = d[0].loc.clone().unwrap();
    assert_eq!((loc.vol, loc.len, loc.blocks.len()), (vol, 5, 1));
    assert_eq!(
        loc.blocks[0],
        BlockLoc { nodes: vec![], tiered: StoreSet::EMPTY },
        "no copy anywhere else yet"
    );
    assert_eq!((d[1].loc.is_none(), d[1].inline.is_none()), (true, true));
    // The spill worker sees it; tiering and repair leave it alone (no holder).
    let Ok(Reply::Inline { slices, more: false }) = h.q(Query::InlineSlices { after: 0, limit: 10 }) else {
        panic!()
    };
    assert_eq!((slices.len(), slices[0].vol, slices[0].data.as_slice()), (1, vol, &b"hello"[..]));
    h.ok(Op::MarkTiered { store: 0, blocks: vec![(10, 0)] });
    h.ok(Op::ReplaceReplica { slice: 10, index: 0, old: None, new: 1 });
    assert_eq!(slice_data(&h, &[10])[0].loc.as_ref().unwrap().blocks[0].nodes, Vec::<u64>::new());
    // Spilled: an ordinary staged slice from then on.
    assert_eq!(h.err(Op::SpillInline { slices: vec![(10, vec![1, 9])] }), Errno::EINVAL, "node 9 is unknown");
    assert_eq!(h.err(Op::SpillInline { slices: vec![(10, vec![])] }), Errno::EINVAL);
    assert_eq!(h.err(Op::SpillInline { slices: vec![(10, vec![2, 2])] }), Errno::EINVAL);
    h.ok(Op::SpillInline { slices: vec![(10, vec![2, 3])] });
    let d = slice_data(&h, &[10]);
    assert_eq!(
        (d[0].inline.is_none(), d[0].loc.as_ref().unwrap().blocks[0].nodes.clone()),
        (true, vec![2, 3])
    );
    assert!(inline_ids(&h).is_empty());
    // A second spill (another node's, racing) changes nothing.
    h.ok(Op::SpillInline { slices: vec![(10, vec![1])] });
    assert_eq!(slice_data(&h, &[10])[0].loc.as_ref().unwrap().blocks[0].nodes, vec![2, 3]);
}

#[test]
fn inline_writes_are_validated() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    let d = h.mkdir(ROOT, "d");
    // The bytes are the whole slice.
    let mut op = inline(vol, f, 10, 0, b"abc");
    if let Op::WriteInline { data, .. } = &mut op {
        data.push(b'd');
    }
    assert_eq!(h.err(op), Errno::EINVAL);
    let big = vec![1u8; limits::INLINE_MAX as usize + 1];
    assert_eq!(h.err(inline(vol, f, 10, 0, &big)), Errno::EINVAL, "larger than an inline slice may be");
    assert_eq!(h.err(inline(vol, f, 0, 0, b"x")), Errno::EINVAL, "slice id 0 is a hole");
    assert_eq!(h.err(inline(vol, d, 10, 0, b"x")), Errno::EISDIR);
    assert_eq!(h.err(inline(vol, f, 10, u32::MAX - 1, b"xyz")), Errno::EINVAL, "past the chunk");
    // A slice id seen before (staged, or inline) is refused: the bytes would not be its own.
    h.ok(Op::WriteSlice {
        vol,
        ino: f,
        chunk: 1,
        slice: Slice { id: 11, offset: 0, len: 4, slice_len: 4, slice_offset: 0 },
        staged: vec![vec![1]],
    });
    assert_eq!(h.err(inline(vol, f, 11, 0, b"abcd")), Errno::EINVAL);
    h.ok(inline(vol, f, 12, 0, b"abcd"));
    assert_eq!(h.err(inline(vol, f, 12, 0, b"abcd")), Errno::EINVAL);
    // Several pieces of one slice, back to back in it.
    let pieces = vec![
        Slice { id: 13, offset: 0, len: 2, slice_len: 4, slice_offset: 0 },
        Slice { id: 13, offset: 10, len: 2, slice_len: 4, slice_offset: 2 },
    ];
    h.ok(Op::WriteInline { vol, ino: f, chunk: 0, pieces, data: b"wxyz".to_vec() });
    assert_eq!(slice_data(&h, &[13])[0].inline.as_deref(), Some(&b"wxyz"[..]));
}

#[test]
fn live_inline_bytes_are_bounded() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    let max = limits::INLINE_MAX;
    let fits = limits::INLINE_TOTAL_MAX / u64::from(max);
    for i in 0..fits {
        h.ok(inline(vol, f, 100 + i, i as u32 * max, &vec![i as u8; max as usize]));
    }
    assert_eq!(h.err(inline(vol, f, 100 + fits, 0, b"x")), Errno::EAGAIN);
    // The state restored from a snapshot counts the same.
    let mut again = StateMachine::restore(&h.sm.snapshot()).unwrap();
    let (r, _) = again.apply(&h.command(inline(vol, f, 100 + fits, 0, b"x")));
    assert_eq!(r, Err(Errno::EAGAIN));
    // An inline slice whose last piece goes (here overwritten by a staged write) no longer
    // counts: there is room for one more.
    let slice = Slice { id: 50, offset: 0, len: max, slice_len: max, slice_offset: 0 };
    h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice, staged: vec![vec![1, 2]] });
    h.ok(inline(vol, f, 100 + fits, 0, &vec![1u8; max as usize]));
    assert_eq!(h.err(inline(vol, f, 101 + fits, 0, b"x")), Errno::EAGAIN);
    // A spilled slice's bytes leave at once.
    h.ok(Op::SpillInline { slices: vec![(101, vec![1, 2])] });
    assert_eq!(slice_data(&h, &[101])[0].inline, None);
    h.ok(inline(vol, f, 101 + fits, 0, b"x"));
}

/// The bytes of an inline slice that lost its last piece stay readable a few seconds (a
/// reader may have resolved the chunk list just before), at most 16 MiB of them, and are
/// never offered for spilling; a dead inline slice takes no new pieces.
#[test]
fn dead_inline_bytes_stay_readable_a_short_while() {
    let (mut h, vol) = setup();
    let f = h.file(ROOT, "f");
    h.ok(inline(vol, f, 10, 0, b"first"));
    h.ok(inline(vol, f, 11, 0, b"again"));
    assert_eq!(inline_ids(&h), vec![11]);
    assert_eq!(slice_data(&h, &[10])[0].inline.as_deref(), Some(&b"first"[..]));
    let staged = |id| Op::WriteSlice {
        vol,
        ino: f,
        chunk: 1,
        slice: Slice { id, offset: 0, len: 5, slice_len: 5, slice_offset: 0 },
        staged: vec![vec![1]],
    };
    assert_eq!(h.err(staged(10)), Errno::EINVAL, "a dead inline slice takes no pieces");
    // A live one does (a copied range shares its slices), and stays inline.
    h.ok(staged(11));
    assert_eq!(inline_ids(&h), vec![11]);
    // Each command is a second later (see `H::apply`): five more and slice 10 is gone.
    for i in 0..5 {
        h.ok(Op::SetXattr { vol, ino: f, name: b"user.t".to_vec(), value: vec![i], flags: 0 });
    }
    assert_eq!(slice_data(&h, &[10])[0].inline, None);
    assert_eq!(slice_data(&h, &[11])[0].inline.as_deref(), Some(&b"again"[..]));
    // Many dead at once: only the newest 16 MiB stay.
    let max = limits::INLINE_MAX as usize;
    for i in 0..400u64 {
        h.t -= 1; // all in the same second
        h.ok(inline(vol, f, 1000 + i, 0, &vec![1u8; max]));
    }
    let kept = (0..400u64).filter(|i| slice_data(&h, &[1000 + i])[0].inline.is_some()).count();
    assert_eq!(kept, 1 + (16 << 20) / max, "the live one and 16 MiB of dead ones");
    assert!(slice_data(&h, &[1399])[0].inline.is_some() && slice_data(&h, &[1000])[0].inline.is_none());
}

/// What one step of [`inline_and_staged_writes_read_as_a_byte_model`] does.
#[derive(Debug, Clone)]
enum Step {
    /// A write of `len` bytes of `byte` at `offset`, inline or staged.
    Write { offset: u32, len: u32, byte: u8, inline: bool },
    /// Spill every live inline slice.
    Spill,
    /// Forget every deleted slice (garbage collection).
    Collect,
    /// Truncate to `size`.
    Truncate { size: u32 },
    /// Replace the state with one restored from its snapshot.
    Restore,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0u32..60_000, 1u32..9000, any::<u8>(), any::<bool>())
            .prop_map(|(offset, len, byte, inline)| Step::Write { offset, len, byte, inline }),
        1 => Just(Step::Spill),
        1 => Just(Step::Collect),
        1 => (0u32..70_000).prop_map(|size| Step::Truncate { size }),
        1 => Just(Step::Restore),
    ]
}

/// The file's bytes as the state describes them: its chunk list, each piece read from the
/// slice's inline bytes or, once spilled or staged, from `stored` (what the cache nodes
/// would hold).
fn read_file(h: &H, ino: u64, stored: &HashMap<u64, Vec<u8>>) -> Vec<u8> {
    let size = h.attr(ino).size as usize;
    let mut out = vec![0u8; size];
    let Ok(Reply::Slices(list)) = h.q(Query::ReadChunk { vol: h.vol, ino, chunk: 0 }) else { panic!() };
    let ids: Vec<u64> = list.iter().map(|p| p.id).filter(|id| *id != 0).collect();
    let data: HashMap<u64, SliceData> = if ids.is_empty() {
        HashMap::new()
    } else {
        slice_data(h, &ids).into_iter().map(|d| (d.id, d)).collect()
    };
    for p in list.iter().filter(|p| p.id != 0) {
        let d = &data[&p.id];
        let bytes = match &d.inline {
            Some(b) => {
                assert_eq!(d.loc.as_ref().unwrap().blocks[0].nodes, Vec::<u64>::new());
                b
            }
            None => {
                assert!(!d.loc.as_ref().unwrap().blocks[0].nodes.is_empty(), "slice {} has no copy", p.id);
                &stored[&p.id]
            }
        };
        let (s, e) = (p.offset as usize, (p.offset + p.len) as usize);
        let from = p.slice_offset as usize;
        if s < size {
            let e = e.min(size);
            out[s..e].copy_from_slice(&bytes[from..from + (e - s)]);
        }
    }
    out
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 96, ..Default::default() })]

    /// Any mix of inline and staged writes, spills, collections, truncations and restores
    /// reads back exactly as a plain byte array written the same way, every inline byte
    /// is either in the state or (spilled) in the stored copies, never lost in between.
    #[test]
    fn inline_and_staged_writes_read_as_a_byte_model(steps in proptest::collection::vec(step(), 1..40)) {
        let (mut h, vol) = setup();
        let f = h.file(ROOT, "f");
        let mut model: Vec<u8> = Vec::new();
        let mut stored: HashMap<u64, Vec<u8>> = HashMap::new();
        let mut next_id = 1000u64;
        for s in steps {
            match s {
                Step::Write { offset, len, byte, inline: as_inline } => {
                    next_id += 1;
                    let data = vec![byte; len as usize];
                    if as_inline {
                        h.ok(inline(vol, f, next_id, offset, &data));
                    } else {
                        let slice = Slice { id: next_id, offset, len, slice_len: len, slice_offset: 0 };
                        h.ok(Op::WriteSlice { vol, ino: f, chunk: 0, slice, staged: vec![vec![1, 2]] });
                        stored.insert(next_id, data.clone());
                    }
                    let end = (offset + len) as usize;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[offset as usize..end].copy_from_slice(&data);
                }
                Step::Spill => {
                    let Ok(Reply::Inline { slices, more: false }) = h.q(Query::InlineSlices { after: 0, limit: 4096 })
                    else { panic!() };
                    if !slices.is_empty() {
                        let ids = slices.iter().map(|s| (s.slice, vec![3])).collect();
                        for s in slices {
                            stored.insert(s.slice, s.data);
                        }
                        h.ok(Op::SpillInline { slices: ids });
                    }
                }
                Step::Collect => {
                    let Ok(Reply::Deletes { slices, .. }) = h.q(Query::PendingDeletes { after: 0, limit: 4096 })
                    else { panic!() };
                    if !slices.is_empty() {
                        h.ok(Op::ForgetSlices { ids: slices.iter().map(|s| s.0).collect() });
                    }
                }
                Step::Truncate { size } => {
                    let set = SetAttr { size: Some(u64::from(size)), ..SetAttr::default() };
                    h.ok(Op::SetAttr { vol, ino: f, set });
                    model.resize(size as usize, 0);
                }
                Step::Restore => {
                    let snap = h.sm.snapshot();
                    h.sm = StateMachine::restore(&snap).unwrap();
                    proptest::prop_assert_eq!(h.sm.snapshot(), snap);
                }
            }
            proptest::prop_assert_eq!(read_file(&h, f, &stored), model.clone());
        }
    }
}
