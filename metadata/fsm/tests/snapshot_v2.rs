//! Restoring a snapshot of format version 2, as the last build before `Attr::blocks` wrote it:
//! fixtures/v2.snap, written by that build after applying the commands in
//! fixtures/v2_commands.rs. The current build replays the same commands for comparison.

#[path = "fixtures/v2_commands.rs"]
mod v2_commands;

use elea_common::{Errno, Timespec};
use elea_fsm::*;
use v2_commands::{CLIENT, OTHER_CLIENT, START, commands};

const V2: &[u8] = include_bytes!("fixtures/v2.snap");

/// Inode numbers in volume 1 (see [`commands`]).
const DIR: u64 = 2;
const A: u64 = 3;
const SPARSE: u64 = 4;
const LINK: u64 = 5;
/// vol 2's /z: the same inode number and generation as vol 1's /dir/sparse.
const Z: u64 = 4;

fn restored() -> StateMachine {
    StateMachine::restore(V2).unwrap()
}

fn replayed() -> StateMachine {
    let mut sm = StateMachine::new();
    for c in commands() {
        let _ = sm.apply(&c);
    }
    sm
}

/// A time after every command of the fixture.
fn later() -> Timespec {
    Timespec::new(START + 100, 0)
}

/// The kept command `(client, seq)`, sent again.
fn retry(client: u64, seq: u64) -> Command {
    let c = commands().into_iter().find(|c| c.client == client && c.seq == seq).unwrap();
    Command { time: later(), ..c }
}

fn lookup(sm: &StateMachine, vol: u64, parent: u64, name: &str) -> Result<Attr, Errno> {
    match sm.query(&Query::Lookup { vol, parent, name: name.into() })? {
        Reply::Entry { attr, .. } => Ok(attr),
        r => panic!("lookup {name}: {r:?}"),
    }
}

fn with_blocks(mut r: OpResult, blocks: u64) -> OpResult {
    if let Ok(Reply::Attr(a) | Reply::Entry { attr: a, .. }) = &mut r {
        a.blocks = blocks;
    }
    r
}

#[test]
fn the_fixture_is_a_version_2_snapshot() {
    assert_eq!(V2[..8], SNAPSHOT_MAGIC);
    // postcard: the version is a varint, 2 in one byte.
    assert_eq!(V2[8], 2);
    assert_eq!(SNAPSHOT_VERSION, 8);
}

#[test]
fn a_version_2_snapshot_restores_the_namespace() {
    let sm = restored();
    let vols = |name: &str| match sm.query(&Query::VolumeByName { name: name.into() }) {
        Ok(Reply::Volume(v)) => (v.id, v.inodes, v.used_bytes),
        r => panic!("{r:?}"),
    };
    assert_eq!(vols("vol"), (1, 5, 10_000 + (1 << 20) + 4096));
    assert_eq!(vols("other"), (2, 4, 8192));

    let dir = lookup(&sm, 1, 1, "dir").unwrap();
    assert_eq!((dir.ino, dir.mode, dir.nlink, dir.blocks), (DIR, mode::S_IFDIR | 0o755, 2, 0));
    // 10,000 bytes with the first 4096 punched: 5904 bytes, two blocks.
    let a = lookup(&sm, 1, DIR, "a").unwrap();
    assert_eq!((a.ino, a.mode, a.size, a.blocks), (A, mode::S_IFREG | 0o600, 10_000, 16));
    // One block written at 1 MiB.
    let s = lookup(&sm, 1, DIR, "sparse").unwrap();
    assert_eq!((s.ino, s.uid, s.size, s.blocks), (SPARSE, 2, (1 << 20) + 4096, 8));
    assert_eq!(lookup(&sm, 1, DIR, "gone"), Err(Errno::ENOENT));
    let l = lookup(&sm, 1, 1, "link").unwrap();
    assert_eq!((l.ino, l.size, l.blocks), (LINK, 5, 0));
    assert_eq!(sm.query(&Query::ReadLink { vol: 1, ino: LINK }), Ok(Reply::Data(b"dir/a".to_vec())));
    let z = lookup(&sm, 2, 1, "z").unwrap();
    assert_eq!((z.ino, z.generation, z.size, z.blocks), (Z, s.generation, 8192, 16));
    assert_eq!(lookup(&sm, 2, 1, "x").unwrap().ino, 2);

    let plus = sm.query(&Query::ReadDir { vol: 1, ino: DIR, cookie: 0, limit: 100, plus: true });
    let Ok(Reply::Dir { entries, eof: true }) = plus else { panic!("{plus:?}") };
    let names: Vec<_> = entries.iter().map(|e| (e.name.clone(), e.attr.as_ref().unwrap().blocks)).collect();
    let want: Vec<(Vec<u8>, u64)> =
        vec![(".".into(), 0), ("..".into(), 0), ("a".into(), 16), ("sparse".into(), 8)];
    assert_eq!(names, want);

    assert_eq!(
        sm.query(&Query::GetXattr { vol: 1, ino: A, name: "user.k".into() }),
        Ok(Reply::Data(b"v".to_vec()))
    );
    let hole = Slice { id: 0, offset: 0, len: 4096, slice_len: 4096, slice_offset: 0 };
    let data = Slice { id: 1, offset: 4096, len: 5904, slice_len: 10_000, slice_offset: 4096 };
    assert_eq!(sm.query(&Query::ReadChunk { vol: 1, ino: A, chunk: 0 }), Ok(Reply::Slices(vec![data, hole])));
    // The unlinked file's slice waits for garbage collection; slice 1's blocks are on node 1.
    let Ok(Reply::Deletes { slices, more: false }) = sm.query(&Query::PendingDeletes { after: 0, limit: 10 })
    else {
        panic!()
    };
    assert_eq!(slices.iter().map(|d| d.0).collect::<Vec<_>>(), vec![3]);
    let Ok(Reply::SliceLocs(locs)) = sm.query(&Query::SliceLocs { ids: vec![1] }) else { panic!() };
    assert_eq!(locs[0].1.as_ref().unwrap().blocks[0].nodes, vec![1]);
    let Ok(Reply::CacheNodes(nodes)) = sm.query(&Query::CacheNodes) else { panic!() };
    assert_eq!((nodes[0].id, nodes[0].incarnation, &nodes[0].addr[..]), (1, 5, "127.0.0.1:7070"));
    // Session 1 has a and sparse open, a record lock on a and a flock on sparse.
    let Ok(Reply::SessionInfo { open, .. }) = sm.query(&Query::SessionInfo { session: 1 }) else { panic!() };
    assert_eq!(open, vec![(1, A, 1), (1, SPARSE, 1)]);
    let lk = Query::GetLk { vol: 1, ino: A, session: 1, owner: 99, kind: LockKind::Read, start: 50, end: 60 };
    let Ok(Reply::Lock(Some(held))) = sm.query(&lk) else { panic!() };
    assert_eq!((held.kind, held.start, held.end, held.pid, held.owner), (LockKind::Write, 0, 99, 100, 11));
    let mut copy = sm.clone();
    let flock = Op::Flock { vol: 1, ino: SPARSE, session: 1, owner: 99, kind: LockKind::Write };
    let cmd = Command { client: 0, seq: 0, acked_below: 0, time: later(), op: flock };
    assert_eq!(copy.apply(&cmd).0, Err(Errno::EAGAIN));
}

/// What the table of a restored version 2 snapshot replays: the replies the old build gave,
/// with `blocks` counted from the restored chunk lists below the reply's size, or 0 when the
/// file is gone or more than one volume has a regular file with its number and generation.
#[test]
fn retries_replay_the_kept_replies_with_blocks() {
    let mut old = restored();
    let mut new = replayed();
    // seq -> blocks in the restored reply. The current build replied 24 to seq 6 (10,000
    // bytes written), but the first block was punched since; sparse (4) and vol 2's z (4)
    // share number and generation; gone (6) was removed.
    let blocks: std::collections::BTreeMap<u64, u64> = [
        (3, 0),
        (4, 0),
        (6, 16),
        (7, 0),
        (8, 0),
        (9, 16),
        (10, 16),
        (11, 0),
        (13, 0),
        (14, 0),
        (19, 0),
        (20, 0),
        (21, 0),
    ]
    .into();
    let mut attrs = 0;
    for seq in 1..=22 {
        let c = retry(CLIENT, seq);
        let (r_old, changes) = old.apply(&c);
        let (r_new, _) = new.apply(&c);
        assert!(changes.is_empty(), "seq {seq} was applied again");
        if let Some(b) = blocks.get(&seq) {
            attrs += 1;
            assert!(matches!(r_old, Ok(Reply::Attr(_) | Reply::Entry { .. })), "seq {seq}: {r_old:?}");
            assert_eq!(r_old, with_blocks(r_new, *b), "seq {seq}");
        } else {
            assert_eq!(r_old, r_new, "seq {seq}");
        }
    }
    assert_eq!(attrs, blocks.len());
    // A few replies in full.
    assert_eq!(old.apply(&retry(CLIENT, 18)).0, Err(Errno::EEXIST));
    assert_eq!(old.apply(&retry(CLIENT, 15)).0, Ok(Reply::Removed { ino: 6, nlink: 0, freed: true }));
    let Ok(Reply::Attr(a)) = old.apply(&retry(CLIENT, 6)).0 else { panic!() };
    assert_eq!((a.ino, a.size, a.mtime, a.blocks), (A, 10_000, Timespec::new(START + 6, 0), 16));
    // The other client acknowledged seqs 1 and 2.
    for seq in 1..=2 {
        assert_eq!(old.apply(&retry(OTHER_CLIENT, seq)).0, Err(Errno::ESTALE));
    }
    let (r, _) = old.apply(&retry(OTHER_CLIENT, 3));
    assert!(matches!(r, Ok(Reply::Session { id: 1, .. })), "{r:?}");

    // Once the clients acknowledge everything, nothing of the old replies is left, and the
    // restored state is byte for byte the state the current build reaches from the same log,
    // but for the data identity: the current build made one with the log's first volume, the
    // old cluster has none (its next volume makes one).
    assert_ne!(old.snapshot(), new.snapshot());
    for (client, seq) in [(CLIENT, 23), (OTHER_CLIENT, 4)] {
        let op = Op::Heartbeat { session: 1 };
        let c = Command { client, seq, acked_below: seq, time: later(), op };
        assert_eq!(old.apply(&c), new.apply(&c));
    }
    assert_eq!(old.query(&Query::DataIdentity), Ok(Reply::Identity(None)));
    let Ok(Reply::Identity(Some(id))) = new.query(&Query::DataIdentity) else { panic!() };
    assert_eq!(id.since_volume, 1);
    let (o, n) = (old.snapshot(), new.snapshot());
    // `None` is one zero byte; `Some` is a one and the identity. Both end with an empty
    // table of inline slices (two empty maps: two zero bytes) and the site table.
    let sites = site_table(&old);
    assert_eq!(sites, site_table(&new));
    let (o, n) = (&o[..o.len() - sites.len()], &n[..n.len() - sites.len()]);
    let at = o.len() - 3;
    assert_eq!((o[at], n[at], &o[at + 1..], &n[n.len() - 2..]), (0, 1, &[0u8, 0][..], &[0u8, 0][..]));
    assert_eq!(o[..at], n[..at]);
}

#[test]
fn a_restored_version_2_snapshot_is_written_in_the_current_version() {
    let sm = restored();
    let bytes = sm.snapshot();
    assert_eq!(bytes[..8], SNAPSHOT_MAGIC);
    assert_eq!(bytes[8], 8);
    let again = StateMachine::restore(&bytes).unwrap();
    assert_eq!(again.snapshot(), bytes);
    // And it goes on applying commands.
    let mut sm = sm;
    let op = Op::Mknod {
        vol: 1,
        parent: DIR,
        name: "new".into(),
        mode: mode::S_IFREG | 0o644,
        uid: 0,
        gid: 0,
        rdev: 0,
        exclusive: true,
        ino: None,
        session: None,
    };
    let c = Command { client: CLIENT, seq: 23, acked_below: 0, time: later(), op };
    let (r, changes) = sm.apply(&c);
    assert!(matches!(r, Ok(Reply::Entry { created: true, .. })), "{r:?}");
    assert!(!changes.is_empty());
}

#[test]
fn other_versions_and_damaged_version_2_snapshots_are_refused() {
    for v in [0u8, 1, 9, 10] {
        let mut b = V2.to_vec();
        b[8] = v;
        assert!(matches!(StateMachine::restore(&b), Err(SnapshotError::Version(x)) if x == u32::from(v)));
    }
    assert!(matches!(StateMachine::restore(&V2[..V2.len() - 1]), Err(SnapshotError::Corrupt(_))));
    let mut long = V2.to_vec();
    long.push(0);
    assert!(matches!(StateMachine::restore(&long), Err(SnapshotError::Corrupt(_))));
    // A current snapshot labelled 2 does not pass for one (its kept replies carry blocks).
    let mut relabelled = restored().snapshot();
    relabelled[8] = 2;
    assert!(matches!(StateMachine::restore(&relabelled), Err(SnapshotError::Corrupt(_))));
    // Damage is reported, never a panic.
    for i in 9..V2.len() {
        let mut b = V2.to_vec();
        b[i] = b[i].wrapping_add(0x55);
        let _ = StateMachine::restore(&b);
        b.truncate(i);
        let _ = StateMachine::restore(&b);
    }
}

/// A version 3 snapshot (the format before the data identity: the same bytes without the
/// trailing field) restores without an identity; the cluster's next volume makes one, which
/// that volume and later ones carry in their keys and the older ones do not.
#[test]
fn a_version_3_snapshot_gets_its_identity_with_its_next_volume() {
    let current = restored().snapshot();
    // Without the identity (`None`: one byte), the table of inline slices (two empty maps:
    // two bytes) and the site table.
    let mut v3 = current[..current.len() - 3 - site_table(&restored()).len()].to_vec();
    v3[8] = 3;
    let mut sm = StateMachine::restore(&v3).unwrap();
    assert_eq!(sm.snapshot(), current);
    assert_eq!(sm.query(&Query::DataIdentity), Ok(Reply::Identity(None)));
    let create = |seq, name: &str| Command {
        client: CLIENT,
        seq,
        acked_below: 0,
        time: later(),
        op: Op::CreateVolume { name: name.into(), config: VolumeConfig::default() },
    };
    let Ok(Reply::Volume(v)) = sm.apply(&create(23, "third")).0 else { panic!() };
    let Ok(Reply::Identity(Some(id))) = sm.query(&Query::DataIdentity) else { panic!() };
    assert_eq!(id.since_volume, v.id);
    assert_ne!(id.cluster, 0);
    assert_eq!(DataIdentity::key_tag(Some(&id), v.id), id.cluster);
    assert_eq!(DataIdentity::key_tag(Some(&id), 1), 0, "older volumes keep their keys");
    // Made once: later volumes share it.
    sm.apply(&create(24, "fourth")).0.unwrap();
    assert_eq!(sm.query(&Query::DataIdentity), Ok(Reply::Identity(Some(id))));
    // Another cluster's identity differs (another random client id).
    let mut other = StateMachine::new();
    other.apply(&Command { client: CLIENT + 1, ..create(1, "third") }).0.unwrap();
    let Ok(Reply::Identity(Some(o))) = other.query(&Query::DataIdentity) else { panic!() };
    assert_ne!(o.cluster, id.cluster);
}

/// A version 4 snapshot (the format before inline slices: the same bytes without the
/// trailing table, and without the site table of version 6) restores with no inline slice
/// and is written in the current format.
#[test]
fn a_version_4_snapshot_restores_without_inline_slices() {
    let current = restored().snapshot();
    let mut v4 = current[..current.len() - 2 - site_table(&restored()).len()].to_vec();
    v4[8] = 4;
    let sm = StateMachine::restore(&v4).unwrap();
    assert_eq!(sm.snapshot(), current);
    assert_eq!(
        sm.query(&Query::InlineSlices { after: 0, limit: 10 }),
        Ok(Reply::Inline { slices: vec![], more: false })
    );
}

/// A version 5 snapshot (the format before sites: the same bytes without the trailing site
/// table) restores and is written in the current format.
#[test]
fn a_version_5_snapshot_restores_without_sites() {
    let current = restored().snapshot();
    let mut v5 = current[..current.len() - site_table(&restored()).len()].to_vec();
    v5[8] = 5;
    let sm = StateMachine::restore(&v5).unwrap();
    assert_eq!(sm.snapshot(), current);
    // The sites its cache nodes registered in.
    let Ok(Reply::Sites(m)) = sm.query(&Query::Sites) else { panic!() };
    assert!(!m.sites.is_empty() && m.meta_nodes.is_empty() && m.homes.is_empty());
}

/// The encoding of the site, group and migration tables at the end of a snapshot of `sm`,
/// which has only sites (the sites as a sequence of names, then three empty collections), no
/// volume groups (a zero count, an empty map, no own record) and no migrations (two empty
/// maps and a zero count).
fn site_table(sm: &StateMachine) -> Vec<u8> {
    let Ok(Reply::Sites(m)) = sm.query(&Query::Sites) else { panic!() };
    assert!(m.meta_nodes.is_empty() && m.homes.is_empty() && m.stores.is_empty());
    let mut b = postcard::to_stdvec(&m.sites).unwrap();
    b.extend([0; 9]);
    assert!(sm.snapshot().ends_with(&b));
    b
}
