//! Robustness property: random ops of every kind (also on behalf of random callers, with
//! `Op::As`), with arbitrary small and extreme values, never panic; every failed op leaves the state byte-identical (except a blocked `SetLk` with
//! `wait`, which records its wait-for edge by design); and a restored snapshot continues
//! identically.

use elea_common::Timespec;
use elea_fsm::*;
use proptest::prelude::*;

fn num() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..12, 1 => Just(u64::MAX), 1 => Just(1 << 60), 1 => Just(64 << 20), 1 => any::<u64>()]
}

/// Offsets and lengths in whole 4 KiB blocks, as collapsing and inserting ranges take, up to
/// a little past one chunk.
fn block() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..8, 16380u64..16390].prop_map(|b| b * 4096)
}

fn num32() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..200, 1 => Just(u32::MAX), 1 => Just(64 << 20), 1 => any::<u32>()]
}

fn kind() -> impl Strategy<Value = LockKind> {
    prop_oneof![Just(LockKind::Read), Just(LockKind::Write), Just(LockKind::Unlock)]
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"b".to_vec()),
        Just(b"c".to_vec()),
        Just(vec![]),
        Just(b"..".to_vec())
    ]
}

fn caller() -> impl Strategy<Value = Caller> {
    (0u32..3, 0u32..3, prop::collection::vec(0u32..3, 0..3)).prop_map(|(uid, gid, groups)| Caller {
        uid,
        gid,
        groups,
    })
}

/// Mostly plain ops; some on behalf of a caller (supported or not), a few nested.
fn op() -> BoxedStrategy<Op> {
    prop_oneof![
        6 => plain_op(),
        3 => (caller(), ns_op()).prop_map(|(caller, op)| Op::As { caller, op: Box::new(op) }),
        1 => (caller(), plain_op()).prop_map(|(caller, op)| Op::As { caller, op: Box::new(op) }),
        1 => (caller(), caller(), plain_op()).prop_map(|(outer, inner, op)| Op::As {
            caller: outer,
            op: Box::new(Op::As { caller: inner, op: Box::new(op) })
        }),
    ]
    .boxed()
}

/// The namespace ops `Op::As` carries.
fn ns_op() -> BoxedStrategy<Op> {
    let ino = || prop_oneof![3 => 1u64..8, 1 => num()];
    prop_oneof![
        (ino(), name(), any::<bool>(), proptest::option::of(1u64..4)).prop_map(
            |(parent, name, exclusive, session)| Op::Mknod {
                vol: 1,
                parent,
                name,
                mode: mode::S_IFREG | 0o644,
                uid: 0,
                gid: 0,
                rdev: 0,
                exclusive,
                ino: None,
                session,
            }
        ),
        (ino(), name(), proptest::option::of(num())).prop_map(|(parent, name, ino)| Op::Mkdir {
            vol: 1,
            parent,
            name,
            mode: 0o2755,
            uid: 0,
            gid: 0,
            ino
        }),
        (ino(), name()).prop_map(|(parent, name)| Op::Unlink { vol: 1, parent, name }),
        (ino(), name()).prop_map(|(parent, name)| Op::Rmdir { vol: 1, parent, name }),
        (ino(), name(), ino(), name(), 0u32..4).prop_map(|(parent, name, new_parent, new_name, flags)| {
            Op::Rename { vol: 1, parent, name, new_parent, new_name, flags }
        }),
        (ino(), ino(), name()).prop_map(|(ino, new_parent, new_name)| Op::Link {
            vol: 1,
            ino,
            new_parent,
            new_name
        }),
        (ino(), name(), prop_oneof![Just(mode::S_IFCHR), Just(mode::S_IFIFO), Just(mode::S_IFDIR)]).prop_map(
            |(parent, name, t)| Op::Mknod {
                vol: 1,
                parent,
                name,
                mode: t | 0o600,
                uid: 1,
                gid: 1,
                rdev: 1,
                exclusive: true,
                ino: None,
                session: None,
            }
        ),
        (ino(), name()).prop_map(|(parent, name)| Op::Symlink {
            vol: 1,
            parent,
            name,
            target: b"t".to_vec(),
            uid: 2,
            gid: 2,
            ino: None
        }),
    ]
    .boxed()
}

/// Any op: every kind about as likely (the weights are the two lists' lengths).
fn plain_op() -> BoxedStrategy<Op> {
    prop_oneof![8 => ns_op(), 23 => other_op()].boxed()
}

/// The ops `Op::As` does not carry.
fn other_op() -> BoxedStrategy<Op> {
    let ino = || prop_oneof![3 => 1u64..8, 1 => num()];
    prop_oneof![
        (ino(), prop_oneof![Just(0o777), Just(0o1777), Just(0o755), Just(0o733), Just(0)], 0u32..3, 0u32..3)
            .prop_map(|(ino, m, uid, gid)| Op::SetAttr {
                vol: 1,
                ino,
                set: SetAttr { mode: Some(m), uid: Some(uid), gid: Some(gid), ..Default::default() }
            }),
        (ino(), proptest::option::of(num())).prop_map(|(ino, size)| Op::SetAttr {
            vol: 1,
            ino,
            set: SetAttr { size, clear_suid: true, ..Default::default() }
        }),
        (ino(), num(), num32(), num32(), num32(), num32()).prop_map(
            |(ino, chunk, offset, len, slice_len, slice_offset)| Op::WriteSlice {
                vol: 1,
                ino,
                chunk: chunk % 4,
                slice: Slice {
                    id: chunk % 5,
                    offset,
                    len,
                    slice_len: slice_len.max(len),
                    slice_offset: slice_offset % 3
                },
                staged: match chunk % 3 {
                    0 => vec![],
                    1 => vec![vec![1]],
                    _ => vec![vec![1, 2]; (slice_len.max(len) as usize).div_ceil(4 << 20)],
                },
            }
        ),
        (
            ino(),
            prop_oneof![num(), block()],
            prop_oneof![num(), block()],
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(3),
                Just(0x10),
                Just(0x11),
                Just(0x12),
                Just(0x40),
                Just(0x08),
                Just(0x20),
                Just(0x09),
                Just(0x28)
            ]
        )
            .prop_map(|(ino, offset, len, mode)| Op::Fallocate { vol: 1, ino, offset, len, mode }),
        (0u64..3).prop_map(|t| Op::OpenSession { name: "s".into(), ttl_ms: t * 20_000 }),
        (1u64..5).prop_map(|session| Op::Heartbeat { session }),
        (1u64..5).prop_map(|session| Op::CloseSession { session }),
        Just(Op::ExpireSessions),
        (ino(), 1u64..5).prop_map(|(ino, session)| Op::Open { vol: 1, ino, session }),
        (ino(), 1u64..5).prop_map(|(ino, session)| Op::Release { vol: 1, ino, session }),
        (ino(), 1u64..5, 0u64..3, kind(), num(), num(), any::<bool>()).prop_map(
            |(ino, session, owner, kind, start, end, wait)| Op::SetLk {
                vol: 1,
                ino,
                session,
                owner,
                pid: 1,
                kind,
                start,
                end,
                wait
            }
        ),
        (ino(), 1u64..5, 0u64..3, kind()).prop_map(|(ino, session, owner, kind)| Op::Flock {
            vol: 1,
            ino,
            session,
            owner,
            kind
        }),
        (ino(), name(), 0u32..4).prop_map(|(ino, name, flags)| Op::SetXattr {
            vol: 1,
            ino,
            name,
            value: vec![1; 3],
            flags
        }),
        (ino(), name()).prop_map(|(ino, name)| Op::RemoveXattr { vol: 1, ino, name }),
        num().prop_map(|count| Op::AllocInodes { vol: 1, count }),
        num().prop_map(|count| Op::AllocSlices { count }),
        (0u64..4, 0u64..3).prop_map(|(id, inc)| Op::RegisterCacheNode {
            id,
            site: "s1".into(),
            addr: "127.0.0.1:1".into(),
            incarnation: inc
        }),
        (0u64..4, 0u64..3).prop_map(|(id, incarnation)| Op::CacheHeartbeat {
            id,
            incarnation,
            stats: CacheStats::default()
        }),
        (0u16..2, prop::collection::vec((0u64..6, 0u32..3), 0..4))
            .prop_map(|(store, blocks)| Op::MarkTiered { store, blocks }),
        (0u64..6, 0u32..3, prop::option::of(0u64..4), 0u64..4)
            .prop_map(|(slice, index, old, new)| Op::ReplaceReplica { slice, index, old, new }),
        prop::collection::vec(0u64..6, 0..3).prop_map(|ids| Op::ForgetSlices { ids }),
        (0u64..6, 0u32..3, 0u64..4).prop_map(|(slice, index, node)| Op::DropReplica { slice, index, node }),
        (
            ino(),
            0u64..3,
            prop::collection::vec((0u64..6, 0u32..9000, 0u32..9000, 0u32..9000, 0u32..9000), 0..5)
        )
            .prop_map(|(ino, chunk, ps)| Op::WriteSlicePieces {
                vol: 1,
                ino,
                chunk,
                pieces: ps
                    .into_iter()
                    .map(|(id, offset, len, slice_len, slice_offset)| Slice {
                        id,
                        offset,
                        len,
                        slice_len,
                        slice_offset
                    })
                    .collect(),
                staged: vec![]
            }),
    ]
    .boxed()
}

fn queries(sm: &StateMachine) {
    for ino in 0..8 {
        let _ = sm.query(&Query::GetAttr { vol: 1, ino });
        let _ = sm.query(&Query::ReadDir { vol: 1, ino, cookie: 0, limit: 3, plus: true });
        let _ = sm.query(&Query::ReadChunk { vol: 1, ino, chunk: 0 });
        let _ = sm.query(&Query::GetLk {
            vol: 1,
            ino,
            session: 1,
            owner: 0,
            kind: LockKind::Write,
            start: 0,
            end: u64::MAX,
        });
        let _ = sm.query(&Query::ListXattr { vol: 1, ino });
    }
    let _ = sm.query(&Query::SessionInfo { session: 1 });
    let _ = sm.query(&Query::StatFs { vol: 1 });
    let _ = sm.query(&Query::CacheNodes);
    let _ = sm.query(&Query::SliceLocs { ids: (0..6).collect() });
    let _ = sm.query(&Query::StagedBlocks { after: (0, 0), limit: 2 });
    let _ = sm.query(&Query::PendingDeletes { after: 0, limit: 2 });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_are_safe(ops in prop::collection::vec((op(), 0i64..20, 0u64..3), 30..150)) {
        let mut sm = StateMachine::new();
        let (r, _) = sm.apply(&Command { client: 0, seq: 0, acked_below: 0, time: Timespec::new(100, 0), op: Op::CreateVolume { name: "v".into(), config: VolumeConfig { stores: vec!["memory://".into()], ..Default::default() } } });
        prop_assert!(r.is_ok());
        let mut t = 100;
        let mut copy: Option<StateMachine> = None;
        for (i, (op, dt, client)) in ops.into_iter().enumerate() {
            t += dt;
            let seq = i as u64 / 2 + 1;
            let c = Command { client, seq, acked_below: seq.saturating_sub(3), time: Timespec::new(t, 0), op };
            let before = sm.snapshot();
            let (r, changes) = sm.apply(&c);
            let waits = matches!(c.op, Op::SetLk { wait: true, .. });
            if r.is_err() && client == 0 && !waits {
                prop_assert_eq!(&before, &sm.snapshot(), "failed {:?} changed the state", c.op);
            }
            if r.is_err() {
                prop_assert!(changes.is_empty());
            }
            if let Some(cp) = copy.as_mut() {
                prop_assert_eq!(cp.apply(&c), (r, changes));
            }
            if i == 20 {
                let snap = sm.snapshot();
                copy = Some(StateMachine::restore(&snap).map_err(|e| TestCaseError::fail(e.to_string()))?);
            }
            queries(&sm);
        }
        if let Some(cp) = copy {
            prop_assert_eq!(cp.fingerprint(), sm.fingerprint());
        }
    }
}
