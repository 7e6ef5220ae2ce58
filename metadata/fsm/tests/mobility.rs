//! Moving a volume's objects between stores: store roles, the copy record and its cursor,
//! the reconcile at the end of a pass, and the encoding of a block's store set.

mod common;

use std::collections::BTreeMap;

use common::*;
use elea_common::Errno;
use elea_fsm::*;

const MIB: u32 = 1 << 20;

/// A volume "m" homed in site "a" with one store, and cache nodes 1 and 2 in "a".
fn setup() -> (H, u64) {
    let mut h = H::new();
    h.ok(Op::AddSite { name: "a".into() });
    h.ok(Op::AddSite { name: "b".into() });
    let config = VolumeConfig { stores: vec!["s3://old/".into()], replicas: 1, ..VolumeConfig::default() };
    let Reply::Volume(v) = h.ok(Op::CreateVolumeIn { name: "m".into(), config, home: "a".into() }) else {
        panic!()
    };
    h.vol = v.id;
    for id in 1..=2 {
        h.ok(Op::RegisterCacheNode { id, site: "a".into(), addr: format!("h:{id}"), incarnation: 1 });
    }
    (h, v.id)
}

/// Writes a file named `name` whose one slice `id` has `len` bytes staged on node 1.
fn write(h: &mut H, name: &str, id: u64, len: u32) {
    let vol = h.vol;
    let ino = h.file(ROOT, name);
    let slice = Slice { id, offset: 0, len, slice_len: len, slice_offset: 0 };
    let staged = vec![vec![1]; blocks_of(len)];
    h.ok(Op::WriteSlice { vol, ino, chunk: 0, slice, staged });
}

fn blocks(len: u32) -> u32 {
    blocks_of(len) as u32
}

fn tier(h: &mut H, store: u16, id: u64, len: u32) -> OpResult {
    let blocks = (0..blocks(len)).map(|i| (id, i)).collect();
    h.apply(Op::MarkTiered { store, blocks }).0
}

fn status(h: &H, vol: u64) -> MigrationStatus {
    match h.q(Query::Migration { vol }) {
        Ok(Reply::Migration(m)) => *m,
        r => panic!("{r:?}"),
    }
}

fn to_copy(h: &H, vol: u64, after: (u64, u32), limit: u32) -> (Vec<(u64, u32)>, bool) {
    match h.q(Query::MigrationBlocks { vol, after, limit }) {
        Ok(Reply::Blocks { blocks, more }) => (blocks.iter().map(|b| (b.slice, b.index)).collect(), more),
        r => panic!("{r:?}"),
    }
}

fn stores_of(h: &H, id: u64) -> Vec<StoreSet> {
    match h.q(Query::SliceLocs { ids: vec![id] }) {
        Ok(Reply::SliceLocs(l)) => l[0].1.as_ref().unwrap().blocks.iter().map(|b| b.tiered).collect(),
        r => panic!("{r:?}"),
    }
}

fn site_map(h: &H) -> SiteMap {
    match h.q(Query::Sites) {
        Ok(Reply::Sites(m)) => m,
        r => panic!("{r:?}"),
    }
}

fn start(vol: u64, site: &str, url: &str) -> Op {
    Op::StartMigration {
        vol,
        site: site.into(),
        url: url.into(),
        rate_limit: 0,
        delete_source_after_ms: None,
        to_site: None,
    }
}

#[test]
fn a_migration_fixes_its_set_copies_by_cursor_and_detaches_the_source_once_nothing_is_left() {
    let (mut h, vol) = setup();
    write(&mut h, "f", 10, 9 * MIB);
    tier(&mut h, 0, 10, 9 * MIB).unwrap();
    write(&mut h, "g", 11, MIB);
    tier(&mut h, 0, 11, MIB).unwrap();
    write(&mut h, "staged", 12, 2 * MIB);

    assert_eq!(h.err(start(vol, "nowhere", "s3://new/")), Errno::ENOENT);
    assert_eq!(h.err(start(vol, "a", "s3://old/")), Errno::EEXIST);
    assert_eq!(h.err(start(vol + 50, "a", "s3://new/")), Errno::ENOENT);
    assert_eq!(h.q(Query::Migration { vol }), Err(Errno::ENOENT));
    let Reply::Migration(m) = h.ok(start(vol, "a", "s3://new/")) else { panic!() };
    let j = &m.job;
    assert_eq!((j.from, j.to, j.state, j.pass), (0, 1, MigrationState::Copying, 1));
    assert_eq!((j.total_objects, j.total_bytes), (4, 10 * u64::from(MIB)));
    assert_eq!((j.staged_objects, j.staged_bytes), (1, 2 * u64::from(MIB)));
    assert_eq!((m.from_url.as_str(), m.to_url.as_str()), ("s3://old/", "s3://new/"));
    assert_eq!((m.left_objects, m.left_bytes), (4, 10 * u64::from(MIB)));
    assert_eq!(h.err(start(vol, "a", "s3://other/")), Errno::EBUSY);

    // The new store takes the site's writes; the old one takes none any more.
    let map = site_map(&h);
    assert_eq!(map.store_of(vol, "a"), Some(1));
    assert_eq!(map.tier_store(vol, "b"), 1);
    assert_eq!(
        map.roles(vol),
        StoreRoles { write: 1, read_only: StoreSet::one(0), detached: StoreSet::EMPTY }
    );
    assert_eq!(tier(&mut h, 0, 12, 2 * MIB), Err(Errno::EROFS));
    tier(&mut h, 1, 12, 2 * MIB).unwrap();
    assert_eq!(stores_of(&h, 12), vec![StoreSet::one(1)]);

    // Paged in slice order, only what the source alone holds.
    let (page, more) = to_copy(&h, vol, (0, 0), 2);
    assert_eq!((page.clone(), more), (vec![(10, 0), (10, 1)], true));
    let (rest, more) = to_copy(&h, vol, (10, 1), 10);
    assert_eq!((rest, more), (vec![(10, 2), (11, 0)], false));

    // A batch: two copied, one failed; the cursor covers all three.
    let failed = vec![(10, 2, "GET timed out".to_string())];
    let job = j.id;
    let progress =
        |copied: Vec<(u64, u32)>, cursor, failed| Op::MigrationProgress { vol, job, copied, cursor, failed };
    assert_eq!(
        h.err(Op::MigrationProgress { vol, job: job + 1, copied: vec![], cursor: (0, 0), failed: vec![] }),
        Errno::ESTALE
    );
    h.ok(progress(page.clone(), (10, 2), failed));
    // The same blocks again (a copier that restarted before it saw the reply) count once.
    h.ok(progress(page, (10, 1), vec![]));
    let m = status(&h, vol);
    assert_eq!((m.job.done_objects, m.job.done_bytes, m.job.cursor), (2, 8 * u64::from(MIB), (10, 2)));
    assert_eq!(
        (m.job.failed, m.job.failures.len(), m.job.failures[0].error.as_str()),
        (1, 1, "GET timed out")
    );
    assert_eq!((m.left_objects, m.left_bytes), (2, 2 * u64::from(MIB)));
    assert_eq!(stores_of(&h, 10)[..2], [StoreSet::from_iter([0, 1]), StoreSet::from_iter([0, 1])]);

    // The rest of the first pass, then its end: the failed block is still in the source
    // alone, so a second pass starts from the first block.
    let (rest, _) = to_copy(&h, vol, m.job.cursor, 10);
    assert_eq!(rest, vec![(11, 0)]);
    h.ok(progress(rest, (11, 0), vec![]));
    let Reply::Migration(m) = h.ok(Op::MigrationPass { vol, job }) else { panic!() };
    assert_eq!(
        (m.job.state, m.job.pass, m.job.cursor, m.left_objects),
        (MigrationState::Copying, 2, (0, 0), 1)
    );
    let (again, more) = to_copy(&h, vol, (0, 0), 10);
    assert_eq!((again.clone(), more), (vec![(10, 2)], false));
    h.ok(progress(again, (10, 2), vec![]));
    let Reply::Migration(m) = h.ok(Op::MigrationPass { vol, job }) else { panic!() };
    assert_eq!((m.job.state, m.job.finished, m.left_objects), (MigrationState::Done, Some(h.now()), 0));
    assert_eq!((m.job.done_objects, m.job.done_bytes), (4, 10 * u64::from(MIB)));

    // Detached: no block names the source, which takes nothing, and the job takes no more.
    for id in [10, 11] {
        assert!(stores_of(&h, id).iter().all(|s| *s == StoreSet::one(1)), "{id}");
    }
    let roles = site_map(&h).roles(vol);
    assert_eq!(roles, StoreRoles { write: 1, read_only: StoreSet::EMPTY, detached: StoreSet::one(0) });
    assert_eq!(h.err(Op::MigrationPass { vol, job }), Errno::ESTALE);
    assert_eq!(h.q(Query::MigrationBlocks { vol, after: (0, 0), limit: 9 }), Err(Errno::ENOENT));
    // Its source was to be kept.
    assert_eq!(h.err(Op::MigrationSourceDeleted { vol, job }), Errno::EBUSY);

    // Moving back attaches the former store again, and everything is copied to it afresh.
    let Reply::Migration(m) = h.ok(start(vol, "a", "s3://old/")) else { panic!() };
    assert_eq!((m.job.from, m.job.to, m.job.total_objects), (1, 0, 5));
    assert_eq!(
        site_map(&h).roles(vol),
        StoreRoles { write: 0, read_only: StoreSet::one(1), detached: StoreSet::EMPTY }
    );
}

#[test]
fn a_site_store_moves_without_changing_the_write_store_and_the_source_is_deleted_when_due() {
    let (mut h, vol) = setup();
    h.ok(Op::AddStore { vol, site: "b".into(), url: "s3://b/".into() });
    h.ok(Op::RegisterCacheNode { id: 3, site: "b".into(), addr: "h:3".into(), incarnation: 1 });
    let ino = h.file(ROOT, "b-file");
    let slice = Slice { id: 20, offset: 0, len: MIB, slice_len: MIB, slice_offset: 0 };
    h.ok(Op::WriteSlice { vol, ino, chunk: 0, slice, staged: vec![vec![3]] });
    tier(&mut h, 1, 20, MIB).unwrap();
    let op = Op::StartMigration {
        vol,
        site: "b".into(),
        url: "s3://b2/".into(),
        rate_limit: 1 << 20,
        delete_source_after_ms: Some(5_000),
        to_site: None,
    };
    let Reply::Migration(m) = h.ok(op) else { panic!() };
    assert_eq!((m.job.from, m.job.to, m.job.rate_limit, m.job.total_objects), (1, 2, 1 << 20, 1));
    let map = site_map(&h);
    assert_eq!((map.store_of(vol, "b"), map.store_of(vol, "a"), map.roles(vol).write), (Some(2), Some(0), 0));
    // Site b may not take a third store while it has one in use; a detached one does not count.
    assert_eq!(h.err(Op::AddStore { vol, site: "b".into(), url: "s3://b3/".into() }), Errno::EEXIST);
    let job = m.job.id;
    h.ok(Op::MigrationProgress { vol, job, copied: vec![(20, 0)], cursor: (20, 0), failed: vec![] });
    h.ok(Op::MigrationPass { vol, job });
    assert_eq!(h.err(Op::MigrationSourceDeleted { vol, job }), Errno::EBUSY);
    h.t += 5;
    h.ok(Op::MigrationSourceDeleted { vol, job });
    assert!(status(&h, vol).job.source_deleted.is_some());
    // Migrations survive a snapshot.
    let restored = StateMachine::restore(&h.sm.snapshot()).unwrap();
    assert_eq!(restored.query(&Query::Migration { vol }), h.q(Query::Migration { vol }));
    assert_eq!(restored.query(&Query::Sites), h.q(Query::Sites));
    assert_eq!(restored.snapshot(), h.sm.snapshot());
}

/// `elea volume move`'s steps in the state: the home changes (control group record and site
/// map), and the new home's store in use becomes the write store, the old home's a source.
#[test]
fn a_volume_moving_home_takes_its_new_homes_store_as_its_write_store() {
    let (mut h, vol) = setup();
    h.ok(Op::AddStore { vol, site: "b".into(), url: "s3://b/".into() });
    write(&mut h, "f", 10, MIB);
    tier(&mut h, 0, 10, MIB).unwrap();
    assert_eq!(h.err(Op::SetVolumeHome { vol, site: "nowhere".into() }), Errno::ENOENT);
    assert_eq!(h.err(Op::SetVolumeHome { vol: vol + 9, site: "b".into() }), Errno::ENOENT);
    h.ok(Op::SetVolumeHome { vol, site: "b".into() });
    assert_eq!(site_map(&h).home(vol), Some("b"));
    // The old home's store moves into the new home's, which keeps its site.
    let to_b = |url: &str| Op::StartMigration {
        vol,
        site: "a".into(),
        url: url.into(),
        rate_limit: 0,
        delete_source_after_ms: None,
        to_site: Some("b".into()),
    };
    assert_eq!(h.err(to_b("s3://old/")), Errno::EEXIST, "the store that moves");
    let Reply::Migration(m) = h.ok(to_b("s3://b/")) else { panic!() };
    assert_eq!((m.job.from, m.job.to, m.job.total_objects), (0, 1, 1));
    let map = site_map(&h);
    assert_eq!((map.store_of(vol, "a"), map.store_of(vol, "b"), map.roles(vol).write), (None, Some(1), 1));
    assert_eq!(map.site_of_store(vol, 1), Some("b"));
    assert_eq!(map.tier_store(vol, "a"), 1, "the old home tiers to the new one's store");
}

#[test]
fn store_sets_read_the_single_store_index_older_builds_wrote() {
    for i in [0u16, 1, 7, 31] {
        let old = postcard::to_stdvec(&Some(i)).unwrap();
        assert_eq!(postcard::from_bytes::<StoreSet>(&old).unwrap(), StoreSet::one(i));
        assert_eq!(postcard::to_stdvec(&StoreSet::one(i)).unwrap(), old);
    }
    let none = postcard::to_stdvec(&None::<u16>).unwrap();
    assert_eq!(postcard::from_bytes::<StoreSet>(&none).unwrap(), StoreSet::EMPTY);
    assert_eq!(postcard::to_stdvec(&StoreSet::EMPTY).unwrap(), none);
    for set in [StoreSet::from_iter([0, 1]), StoreSet::from_iter([3, 9, 31]), StoreSet::from_iter([0, 47])] {
        let bytes = postcard::to_stdvec(&set).unwrap();
        assert_eq!(postcard::from_bytes::<StoreSet>(&bytes).unwrap(), set);
    }
    // Out of range or malformed: an error, not a set.
    for bad in [Some(48u64), Some(1 << 16), Some((1 << 16) | 1), Some(3 << 16 | 5), Some(u64::MAX)] {
        let bytes = postcard::to_stdvec(&bad).unwrap();
        assert!(postcard::from_bytes::<StoreSet>(&bytes).is_err(), "{bad:?}");
    }
}

/// What a test copier can do between two steps of the cluster.
#[derive(Debug, Clone)]
enum Step {
    /// Write a new file of `blocks` blocks (staged).
    Write(u8),
    /// Tier the staged blocks to the store the site's nodes tier to now (or, `stale`, to the
    /// source, as a node that read the roles before the migration began would).
    Tier { stale: bool },
    /// Delete the `n`th live file.
    Delete(u8),
    /// The copier takes up to `n` blocks after its cursor, copies those whose bit in `ok` is
    /// set, and records them with the cursor.
    Copy { n: u8, ok: u8 },
    /// The copier restarts: its next page starts from the recorded cursor.
    Restart,
    /// The copier reached the end of a page list and asks to finish the pass.
    Pass,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        (1u8..4).prop_map(Step::Write),
        any::<bool>().prop_map(|stale| Step::Tier { stale }),
        any::<u8>().prop_map(Step::Delete),
        (1u8..6, any::<u8>()).prop_map(|(n, ok)| Step::Copy { n, ok }),
        Just(Step::Restart),
        Just(Step::Pass),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// Against a reference of which blocks live: whatever interleaving of writes, tiering,
    /// deletes, partial copies, copier restarts and pass ends, a job that reports done has
    /// every live tiered block in the target and none in the source, and a job driven to the
    /// end by a copier that eventually succeeds always finishes.
    #[test]
    fn migrations_never_leave_a_live_block_behind(
        before in proptest::collection::vec(1u8..4, 1..5),
        steps in proptest::collection::vec(step(), 0..40),
    ) {
        let (mut h, vol) = setup();
        // Reference: live files by name → (slice id, blocks).
        let mut live: BTreeMap<String, (u64, u32)> = BTreeMap::new();
        let mut next = 100u64;
        let mut add = |h: &mut H, live: &mut BTreeMap<String, (u64, u32)>, n: u8| {
            next += 1;
            let len = u32::from(n) * 4 * MIB - 7;
            write(h, &format!("f{next}"), next, len);
            live.insert(format!("f{next}"), (next, blocks(len)));
        };
        for n in &before {
            add(&mut h, &mut live, *n);
        }
        for (_, (id, b)) in live.clone() {
            tier(&mut h, 0, id, b * 4 * MIB - 7).unwrap();
        }
        let Reply::Migration(m) = h.ok(start(vol, "a", "s3://new/")) else { panic!() };
        let job = m.job.id;
        let mut cursor = (0, 0);
        let staged = |h: &H| match h.q(Query::StagedBlocks { after: (0, 0), limit: 4096 }) {
            Ok(Reply::Blocks { blocks, .. }) => blocks,
            r => panic!("{r:?}"),
        };
        let mut step_on = |h: &mut H, s: &Step, cursor: &mut (u64, u32), live: &mut BTreeMap<String, (u64, u32)>| {
            match s {
                Step::Write(n) => add(h, live, *n),
                Step::Tier { stale } => {
                    let store = if *stale { 0 } else { site_map(h).tier_store(vol, "a") };
                    let blocks: Vec<_> = staged(h).iter().map(|b| (b.slice, b.index)).collect();
                    if !blocks.is_empty() {
                        let r = h.apply(Op::MarkTiered { store, blocks }).0;
                        // The source takes nothing from the start on, detached or not.
                        proptest::prop_assert_eq!(r.is_err(), *stale);
                    }
                }
                Step::Delete(i) => {
                    if !live.is_empty() {
                        let name = live.keys().nth(usize::from(*i) % live.len()).unwrap().clone();
                        live.remove(&name);
                        h.ok(Op::Unlink { vol, parent: ROOT, name: name.into_bytes() });
                    }
                }
                Step::Copy { n, ok } => {
                    let page = h.q(Query::MigrationBlocks { vol, after: *cursor, limit: u32::from(*n) });
                    if let Ok(Reply::Blocks { blocks, .. }) = page
                        && let Some(last) = blocks.last()
                    {
                        let (copied, failed): (Vec<_>, Vec<_>) =
                            blocks.iter().enumerate().partition(|(i, _)| ok & (1 << i) != 0);
                        let copied = copied.iter().map(|(_, b)| (b.slice, b.index)).collect();
                        let failed = failed.iter().map(|(_, b)| (b.slice, b.index, "no".to_string())).collect();
                        let end = (last.slice, last.index);
                        h.ok(Op::MigrationProgress { vol, job, copied, cursor: end, failed });
                        *cursor = end;
                    }
                }
                Step::Restart => {
                    *cursor = status(h, vol).job.cursor;
                }
                Step::Pass => {
                    if let Ok(Reply::Migration(m)) = h.apply(Op::MigrationPass { vol, job }).0 {
                        *cursor = m.job.cursor;
                    }
                }
            }
            Ok(())
        };
        for s in &steps {
            step_on(&mut h, s, &mut cursor, &mut live)?;
        }
        // Then a copier that succeeds drives the job to its end.
        for _ in 0..100 {
            if status(&h, vol).job.state == MigrationState::Done {
                break;
            }
            step_on(&mut h, &Step::Copy { n: 5, ok: 0xff }, &mut cursor, &mut live)?;
            if to_copy(&h, vol, cursor, 1).0.is_empty() {
                step_on(&mut h, &Step::Pass, &mut cursor, &mut live)?;
            }
        }
        let m = status(&h, vol);
        proptest::prop_assert_eq!(m.job.state, MigrationState::Done);
        for (id, _) in live.values() {
            for set in stores_of(&h, *id) {
                proptest::prop_assert!(!set.contains(0), "slice {} still names the detached source", id);
                proptest::prop_assert!(set.is_empty() || set.contains(1), "slice {} is tiered but not in the target", id);
            }
        }
        proptest::prop_assert!(m.job.done_objects <= m.job.total_objects);
    }
}

/// A format 7 snapshot (before migrations: the same bytes without the empty migration table
/// at the end) restores, with default store roles, and is written in the current format.
#[test]
fn format_7_snapshots_restore_with_no_migrations() {
    let (mut h, vol) = setup();
    write(&mut h, "f", 10, MIB);
    tier(&mut h, 0, 10, MIB).unwrap();
    let v8 = h.sm.snapshot();
    let empty = postcard::to_stdvec(&(0u8, 0u8, 0u64)).unwrap();
    assert!(v8.ends_with(&empty));
    let mut v7 = v8[..v8.len() - empty.len()].to_vec();
    assert_eq!(v7[SNAPSHOT_MAGIC.len()], 8);
    v7[SNAPSHOT_MAGIC.len()] = 7;
    let back = StateMachine::restore(&v7).unwrap();
    assert_eq!(back.snapshot(), v8);
    let Ok(Reply::Sites(m)) = back.query(&Query::Sites) else { panic!() };
    assert_eq!((m.roles(vol), m.tier_store(vol, "a")), (StoreRoles::default(), 0));
    assert_eq!(back.query(&Query::Migration { vol }), Err(Errno::ENOENT));
}
