//! Volumes in Raft groups of their own: the control group's record, the group's first state,
//! its slice id range, and both across snapshots.

mod common;

use common::*;
use elea_common::Errno;
use elea_common::ids::ROOT_INO;
use elea_fsm::*;

fn config(stores: &[&str]) -> VolumeConfig {
    VolumeConfig { stores: stores.iter().map(|s| s.to_string()).collect(), ..VolumeConfig::default() }
}

/// A control group with metadata nodes 11, 12, 13 in a, 21, 22 in b and 31 in c.
fn control() -> H {
    let mut h = H::new();
    for (id, site) in [(11, "a"), (12, "a"), (13, "a"), (21, "b"), (22, "b"), (31, "c")] {
        h.ok(Op::RegisterMetaNode { id, site: site.into(), addr: format!("10.0.0.{id}:7000") });
    }
    h
}

fn create(h: &mut H, name: &str, home: &str, voters: u8, spread: bool) -> GroupRecord {
    let op = Op::CreateVolumeGroup {
        name: name.into(),
        config: config(&["file:///s"]),
        home: home.into(),
        voters,
        spread,
    };
    match h.ok(op) {
        Reply::Group(r) => *r,
        r => panic!("{r:?}"),
    }
}

fn ids(v: &[(u64, String)]) -> Vec<u64> {
    v.iter().map(|(id, _)| *id).collect()
}

#[test]
fn the_control_group_places_a_volume_in_its_home_site() {
    let mut h = control();
    let r = create(&mut h, "orders", "b", 0, false);
    assert_eq!((r.group, r.vol), (2, h.vol + 1));
    assert_eq!(ids(&r.voters), [21, 22]);
    assert_eq!(ids(&r.learners), [11, 12, 13, 31]);
    assert_eq!(r.voters[0].1, "10.0.0.21:7000");
    assert!(r.has_member(31) && !r.has_member(99));
    let r2 = create(&mut h, "ledger", "a", 0, false);
    assert_eq!((r2.group, r2.vol), (3, h.vol + 2));
    assert_eq!(ids(&r2.voters), [11, 12, 13]);
    let r3 = create(&mut h, "small", "a", 1, false);
    assert_eq!(ids(&r3.voters), [11]);
    // Spread: one per site in turn, the home first.
    let s = create(&mut h, "spread", "b", 5, true);
    assert_eq!(ids(&s.voters), [21, 11, 31, 22, 12]);
    assert_eq!(ids(&s.learners), [13]);
    match h.q(Query::Groups) {
        Ok(Reply::Groups(g)) => assert_eq!(
            g.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["orders", "ledger", "small", "spread"]
        ),
        r => panic!("{r:?}"),
    }
    let Ok(Reply::Sites(m)) = h.q(Query::Sites) else { panic!() };
    assert_eq!(m.home(r.vol), Some("b"));
    assert_eq!(group_of_volume(&[r.clone(), r2.clone()], r2.vol), 3);
    assert_eq!(group_of_volume(&[r, r2], h.vol), 1);
}

#[test]
fn bad_volume_groups_are_refused() {
    let mut h = control();
    let op = |name: &str, home: &str, voters: u8, spread: bool| Op::CreateVolumeGroup {
        name: name.into(),
        config: config(&["file:///s"]),
        home: home.into(),
        voters,
        spread,
    };
    assert_eq!(h.err(op("x", "nowhere", 3, false)), Errno::ENOENT);
    h.ok(Op::AddSite { name: "empty".into() });
    assert_eq!(h.err(op("x", "empty", 3, false)), Errno::ENODEV);
    assert_eq!(h.err(op("x", "a", 8, false)), Errno::EINVAL);
    assert_eq!(h.err(op("vol", "a", 3, false)), Errno::EEXIST, "a control group volume's name");
    create(&mut h, "x", "a", 3, false);
    assert_eq!(h.err(op("x", "b", 3, false)), Errno::EEXIST);
    let plain = Op::CreateVolume { name: "x".into(), config: Default::default() };
    assert_eq!(h.err(plain), Errno::EEXIST, "a group volume's name");
}

#[test]
fn a_group_starts_with_its_volume_and_a_slice_range_of_its_own() {
    let mut h = control();
    let rec = create(&mut h, "orders", "b", 0, false);
    let sm = StateMachine::for_group(&rec).unwrap();
    // Every member starts from the same bytes.
    assert_eq!(sm.fingerprint(), StateMachine::for_group(&rec).unwrap().fingerprint());
    let mut g = H { sm, t: h.t + 1, vol: rec.vol };
    match g.q(Query::VolumeByName { name: "orders".into() }) {
        Ok(Reply::Volume(v)) => {
            assert_eq!(v.id, rec.vol);
            assert_eq!(v.config.stores, ["file:///s"]);
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(g.q(Query::Groups), Ok(Reply::Groups(vec![rec.clone()])));
    let Ok(Reply::Sites(m)) = g.q(Query::Sites) else { panic!() };
    assert_eq!((m.home(rec.vol), m.store_of(rec.vol, "b")), (Some("b"), Some(0)));
    let Reply::Range { start, .. } = g.ok(Op::AllocSlices { count: 10 }) else { panic!() };
    assert_eq!(start, (2 << SLICE_GROUP_SHIFT) + 1);
    assert_eq!(group_of_slice(start), 2);
    assert_eq!(group_of_slice(1), 1);
    assert_eq!(group_of_slice((2 << SLICE_GROUP_SHIFT) - 1), 1);
    let f = g.file(ROOT_INO, "f");
    assert!(f > ROOT_INO);
    // Slices of its own range only: a writer that asked another group for its id is refused.
    let piece = |id| Slice { id, offset: 0, len: 10, slice_offset: 0, slice_len: 10 };
    let write = |id| Op::WriteSlice { vol: rec.vol, ino: f, chunk: 0, slice: piece(id), staged: vec![] };
    assert_eq!(g.err(write(5)), Errno::EINVAL);
    g.ok(write(start));
    // A group holds its own volume only.
    assert_eq!(g.err(Op::CreateVolume { name: "other".into(), config: Default::default() }), Errno::EPERM);
    assert_eq!(
        g.err(Op::CreateVolumeGroup {
            name: "other".into(),
            config: Default::default(),
            home: "b".into(),
            voters: 3,
            spread: false
        }),
        Errno::EPERM
    );
    // And its snapshot keeps all that.
    let back = StateMachine::restore(&g.sm.snapshot()).unwrap();
    assert_eq!(back.fingerprint(), g.sm.fingerprint());
    assert_eq!(back.query(&Query::Groups), Ok(Reply::Groups(vec![rec])));
}

#[test]
fn format_6_snapshots_restore_with_no_volume_groups() {
    let mut h = control();
    h.ok(Op::AddSite { name: "z".into() });
    let v8 = h.sm.snapshot();
    // A format 6 snapshot is the same bytes without the (empty) group and migration tables at
    // the end.
    let mut v6 = v8.clone();
    let empty = postcard::to_stdvec(&(0u64, Vec::<u8>::new(), Option::<u8>::None, 0u8, 0u8, 0u64)).unwrap();
    assert!(v6.ends_with(&empty));
    v6.truncate(v8.len() - empty.len());
    let version_at = SNAPSHOT_MAGIC.len();
    assert_eq!(v6[version_at], 8);
    v6[version_at] = 6;
    let back = StateMachine::restore(&v6).unwrap();
    assert_eq!(back.fingerprint(), h.sm.fingerprint());
    assert_eq!(back.query(&Query::Groups), Ok(Reply::Groups(vec![])));
}

#[test]
fn members_join_and_leave_a_volume_group() {
    let mut h = control();
    let rec = create(&mut h, "orders", "b", 0, false);
    assert_eq!(h.err(Op::AddGroupMember { vol: rec.vol, id: 21, learner: false }), Errno::EEXIST);
    assert_eq!(h.err(Op::AddGroupMember { vol: rec.vol, id: 99, learner: false }), Errno::ENOENT);
    assert_eq!(
        h.err(Op::AddGroupMember { vol: h.vol, id: 21, learner: false }),
        Errno::ENOENT,
        "not a group's"
    );
    h.ok(Op::RegisterMetaNode { id: 23, site: "b".into(), addr: "10.0.0.23:7000".into() });
    let Reply::Group(r) = h.ok(Op::AddGroupMember { vol: rec.vol, id: 23, learner: false }) else { panic!() };
    assert!(r.has_member(23) && !r.is_first_member(23));
    assert_eq!(r.added, [(23, "10.0.0.23:7000".to_string(), false)]);
    assert_eq!(r.members().len(), 7);
    let Reply::Group(r) = h.ok(Op::RemoveGroupMember { vol: rec.vol, id: 21 }) else { panic!() };
    assert!(!r.has_member(21));
    assert_eq!(ids(&r.voters), [22]);
    assert_eq!(h.err(Op::RemoveGroupMember { vol: rec.vol, id: 21 }), Errno::ENOENT);
    for id in [22, 11, 12, 13, 31] {
        h.ok(Op::RemoveGroupMember { vol: rec.vol, id });
    }
    assert_eq!(h.err(Op::RemoveGroupMember { vol: rec.vol, id: 23 }), Errno::EBUSY, "the last member");
    // Only the control group keeps members.
    let mut g = H { sm: StateMachine::for_group(&rec).unwrap(), t: h.t + 1, vol: rec.vol };
    assert_eq!(g.err(Op::AddGroupMember { vol: rec.vol, id: 21, learner: true }), Errno::EPERM);
}
