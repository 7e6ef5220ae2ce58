//! Reading snapshot format version 2, which builds before [`Attr::blocks`] wrote.
//!
//! Postcard encodings are positional, and `Attr` gained `blocks` as its last field; nothing
//! else in the state changed. The only attributes in the state are in the replies the
//! de-duplication table keeps ([`Client::results`]): `Reply::Attr`, `Reply::Entry` and the
//! plus entries of `Reply::Dir`. So [`StateV2`] is [`State`] with those replies read as
//! [`ReplyV2`], a mirror of [`Reply`] as version 2 encoded it (the same variants in the same
//! order), and every other field read with the current types, whose encoding is still the one
//! version 2 used. A later change to the encoding of any of those types needs a mirror here
//! too.

use std::collections::BTreeMap;

use elea_common::{Errno, Ino, SessionId, SliceId, Timespec, VolumeId};
use serde::Deserialize;

use crate::chunks::allocated_blocks;
use crate::inline::InlineTable;
use crate::state::{CacheNode, Client, LockOwner, Session, SliceTable, State, Volume, Waiting};
use crate::types::{
    Attr, CacheNodeInfo, DataIdentity, DirEntry, FileType, LockInfo, Reply, Slice, SliceLoc, StagedBlock,
    StatFs, VolumeInfo, mode,
};

/// [`State`] as snapshot format version 2 encoded it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct StateV2 {
    clock: Timespec,
    volumes_allocated: u64,
    volumes: BTreeMap<VolumeId, Volume>,
    volume_names: BTreeMap<String, VolumeId>,
    slices_allocated: u64,
    slices: SliceTable,
    sessions_allocated: u64,
    sessions: BTreeMap<SessionId, Session>,
    waits: BTreeMap<LockOwner, Waiting>,
    clients: BTreeMap<u64, ClientV2>,
    cache_nodes: BTreeMap<u64, CacheNode>,
}

/// [`Client`] with version 2 replies.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct ClientV2 {
    floor: u64,
    results: BTreeMap<u64, Result<ReplyV2, Errno>>,
    last_active: Timespec,
}

/// [`Attr`] without `blocks`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct AttrV2 {
    ino: Ino,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    size: u64,
    atime: Timespec,
    mtime: Timespec,
    ctime: Timespec,
    rdev: u64,
    generation: u64,
    flags: u32,
}

/// [`DirEntry`] with a version 2 `attr`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct DirEntryV2 {
    name: Vec<u8>,
    ino: Ino,
    kind: FileType,
    cookie: u64,
    attr: Option<AttrV2>,
}

/// [`Reply`] as version 2 encoded it: variant for variant, in the same order.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
enum ReplyV2 {
    Ok,
    Volume(VolumeInfo),
    Volumes(Vec<VolumeInfo>),
    Attr(AttrV2),
    Entry { attr: AttrV2, created: bool },
    Removed { ino: Ino, nlink: u32, freed: bool },
    Dir { entries: Vec<DirEntryV2>, eof: bool },
    Data(Vec<u8>),
    Names(Vec<Vec<u8>>),
    StatFs(StatFs),
    Slices(Vec<Slice>),
    Lock(Option<LockInfo>),
    Session { id: SessionId, expires: Timespec },
    Range { start: u64, count: u64 },
    SessionInfo { open: Vec<(VolumeId, Ino, u32)>, expires: Timespec },
    CacheNodes(Vec<CacheNodeInfo>),
    SliceLocs(Vec<(SliceId, Option<SliceLoc>)>),
    Blocks { blocks: Vec<StagedBlock>, more: bool },
    Deletes { slices: Vec<(SliceId, Timespec, Option<SliceLoc>)>, more: bool },
}

impl StateV2 {
    /// The current state: the same, with `blocks` filled in in every kept reply.
    pub(crate) fn upgrade(self) -> State {
        let StateV2 {
            clock,
            volumes_allocated,
            volumes,
            volume_names,
            slices_allocated,
            slices,
            sessions_allocated,
            sessions,
            waits,
            clients,
            cache_nodes,
        } = self;
        let clients = clients
            .into_iter()
            .map(|(id, c)| {
                let results = c.results.into_iter().map(|(seq, r)| (seq, r.map(|r| r.upgrade(&volumes))));
                (id, Client { floor: c.floor, results: results.collect(), last_active: c.last_active })
            })
            .collect();
        State {
            clock,
            volumes_allocated,
            volumes,
            volume_names,
            slices_allocated,
            slices,
            sessions_allocated,
            sessions,
            waits,
            clients,
            cache_nodes,
            identity: None,
            inline: InlineTable::default(),
            sites: Default::default(),
            groups: Default::default(),
            mobility: Default::default(),
        }
    }
}

/// [`State`] as snapshot format version 4 encoded it: without inline slices.
#[derive(Deserialize)]
pub(crate) struct StateV4 {
    clock: Timespec,
    volumes_allocated: u64,
    volumes: BTreeMap<VolumeId, Volume>,
    volume_names: BTreeMap<String, VolumeId>,
    slices_allocated: u64,
    slices: SliceTable,
    sessions_allocated: u64,
    sessions: BTreeMap<SessionId, Session>,
    waits: BTreeMap<LockOwner, Waiting>,
    clients: BTreeMap<u64, Client>,
    cache_nodes: BTreeMap<u64, CacheNode>,
    identity: Option<DataIdentity>,
}

impl StateV4 {
    pub(crate) fn upgrade(self) -> State {
        let StateV4 {
            clock,
            volumes_allocated,
            volumes,
            volume_names,
            slices_allocated,
            slices,
            sessions_allocated,
            sessions,
            waits,
            clients,
            cache_nodes,
            identity,
        } = self;
        State {
            clock,
            volumes_allocated,
            volumes,
            volume_names,
            slices_allocated,
            slices,
            sessions_allocated,
            sessions,
            waits,
            clients,
            cache_nodes,
            identity,
            inline: InlineTable::default(),
            sites: Default::default(),
            groups: Default::default(),
            mobility: Default::default(),
        }
    }
}

/// [`State`] as snapshot format version 3 encoded it: the same fields up to the cache node
/// registry, without the data identity that version 4 appended.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(crate) struct StateV3 {
    clock: Timespec,
    volumes_allocated: u64,
    volumes: BTreeMap<VolumeId, Volume>,
    volume_names: BTreeMap<String, VolumeId>,
    slices_allocated: u64,
    slices: SliceTable,
    sessions_allocated: u64,
    sessions: BTreeMap<SessionId, Session>,
    waits: BTreeMap<LockOwner, Waiting>,
    clients: BTreeMap<u64, Client>,
    cache_nodes: BTreeMap<u64, CacheNode>,
}

impl StateV3 {
    /// A cluster of version 3 has no identity yet: its next volume makes one.
    pub(crate) fn upgrade(self) -> State {
        let StateV3 {
            clock,
            volumes_allocated,
            volumes,
            volume_names,
            slices_allocated,
            slices,
            sessions_allocated,
            sessions,
            waits,
            clients,
            cache_nodes,
        } = self;
        State {
            clock,
            volumes_allocated,
            volumes,
            volume_names,
            slices_allocated,
            slices,
            sessions_allocated,
            sessions,
            waits,
            clients,
            cache_nodes,
            identity: None,
            inline: InlineTable::default(),
            sites: Default::default(),
            groups: Default::default(),
            mobility: Default::default(),
        }
    }
}

impl ReplyV2 {
    fn upgrade(self, volumes: &BTreeMap<VolumeId, Volume>) -> Reply {
        match self {
            Self::Ok => Reply::Ok,
            Self::Volume(v) => Reply::Volume(v),
            Self::Volumes(v) => Reply::Volumes(v),
            Self::Attr(a) => Reply::Attr(a.upgrade(volumes)),
            Self::Entry { attr, created } => Reply::Entry { attr: attr.upgrade(volumes), created },
            Self::Removed { ino, nlink, freed } => Reply::Removed { ino, nlink, freed },
            Self::Dir { entries, eof } => {
                let entries = entries
                    .into_iter()
                    .map(|e| DirEntry {
                        name: e.name,
                        ino: e.ino,
                        kind: e.kind,
                        cookie: e.cookie,
                        attr: e.attr.map(|a| a.upgrade(volumes)),
                    })
                    .collect();
                Reply::Dir { entries, eof }
            }
            Self::Data(d) => Reply::Data(d),
            Self::Names(n) => Reply::Names(n),
            Self::StatFs(s) => Reply::StatFs(s),
            Self::Slices(s) => Reply::Slices(s),
            Self::Lock(l) => Reply::Lock(l),
            Self::Session { id, expires } => Reply::Session { id, expires },
            Self::Range { start, count } => Reply::Range { start, count },
            Self::SessionInfo { open, expires } => Reply::SessionInfo { open, expires },
            Self::CacheNodes(n) => Reply::CacheNodes(n),
            Self::SliceLocs(l) => Reply::SliceLocs(l),
            Self::Blocks { blocks, more } => Reply::Blocks { blocks, more },
            Self::Deletes { slices, more } => Reply::Deletes { slices, more },
        }
    }
}

impl AttrV2 {
    /// The attributes with `blocks`, which the build that applied the command did not count.
    ///
    /// A kept reply is only ever replayed to a retry of its command, so any value is a
    /// reconstruction; this one is counted as getattr counts it, from the restored state's
    /// chunk lists, but below the size the reply reports rather than the file's current size.
    /// It is what this build would have replied whenever the file's data below that size has
    /// not changed since the command, and it never counts more than that size holds.
    ///
    /// A version 2 reply does not say which volume it came from, and inode numbers and
    /// generations repeat across volumes, so the file is the regular inode with this number
    /// and generation in the only volume that has one. `blocks` is 0 for anything but a
    /// regular file, when no volume has such an inode any more (the file was removed), and
    /// when more than one has.
    fn upgrade(self, volumes: &BTreeMap<VolumeId, Volume>) -> Attr {
        let mut holders = volumes.values().filter(|v| {
            v.inodes.get(&self.ino).is_some_and(|i| i.is_reg() && i.generation == self.generation)
        });
        let blocks = match (holders.next(), holders.next()) {
            (Some(v), None) if self.mode & mode::S_IFMT == mode::S_IFREG => {
                allocated_blocks(&v.chunks, self.ino, self.size)
            }
            _ => 0,
        };
        let AttrV2 { ino, mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, generation, flags } = self;
        Attr { ino, mode, uid, gid, nlink, size, atime, mtime, ctime, rdev, generation, flags, blocks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Inode;
    use crate::{SNAPSHOT_MAGIC, StateMachine};

    fn attr_v2(ino: Ino, mode: u32, size: u64, generation: u64) -> AttrV2 {
        let t = Timespec::new(5, 6);
        AttrV2 {
            ino,
            mode,
            uid: 1,
            gid: 2,
            nlink: 1,
            size,
            atime: t,
            mtime: t,
            ctime: t,
            rdev: 3,
            generation,
            flags: 0,
        }
    }

    /// The mirror lists `Attr`'s fields in `Attr`'s order: its encoding is `Attr`'s without
    /// the last field.
    #[test]
    fn attr_v2_encodes_as_attr_without_blocks() {
        let v3 = attr_v2(9, mode::S_IFREG | 0o644, 300, 4).upgrade(&BTreeMap::new());
        let v3 = postcard::to_stdvec(&v3).unwrap();
        let v2 = postcard::to_stdvec(&attr_v2(9, mode::S_IFREG | 0o644, 300, 4)).unwrap();
        // blocks = 0 is one byte.
        assert_eq!(v2[..], v3[..v3.len() - 1]);
    }

    /// Ops never reply `Dir`, so a real version 2 snapshot has none in its table; the mirror
    /// reads one all the same.
    #[test]
    fn dir_plus_entries_of_a_v2_reply_get_blocks() {
        let file =
            Inode { mode: mode::S_IFREG | 0o644, nlink: 1, size: 10_000, generation: 2, ..Inode::default() };
        let mut vol = Volume::default();
        vol.inodes.insert(3, file);
        vol.chunks
            .insert((3, 0), vec![Slice { id: 1, offset: 0, len: 5000, slice_len: 5000, slice_offset: 0 }]);
        let entry = |name: &str, ino, attr| DirEntryV2 {
            name: name.into(),
            ino,
            kind: FileType::Regular,
            cookie: ino + 10,
            attr,
        };
        let reg = mode::S_IFREG | 0o644;
        let entries = vec![
            entry("d", 2, Some(attr_v2(2, mode::S_IFDIR | 0o755, 0, 1))),
            entry("f", 3, Some(attr_v2(3, reg, 10_000, 2))),
            entry("short", 3, Some(attr_v2(3, reg, 100, 2))),
            entry("bare", 3, None),
            entry("old", 3, Some(attr_v2(3, reg, 10_000, 1))),
            entry("gone", 4, Some(attr_v2(4, reg, 10_000, 3))),
        ];
        let client = ClientV2 {
            floor: 1,
            results: BTreeMap::from([(1, Ok(ReplyV2::Dir { entries, eof: true })), (2, Err(Errno::ENOENT))]),
            last_active: Timespec::new(7, 0),
        };
        let v2 = StateV2 {
            clock: Timespec::new(8, 0),
            volumes_allocated: 1,
            volumes: BTreeMap::from([(1, vol)]),
            volume_names: BTreeMap::from([("v".to_string(), 1)]),
            slices_allocated: 0,
            slices: SliceTable::default(),
            sessions_allocated: 0,
            sessions: BTreeMap::new(),
            waits: BTreeMap::new(),
            clients: BTreeMap::from([(5, client)]),
            cache_nodes: BTreeMap::new(),
        };
        let bytes = postcard::to_stdvec(&(SNAPSHOT_MAGIC, 2u32, &v2)).unwrap();
        let sm = StateMachine::restore(&bytes).unwrap();
        let c = &sm.st.clients[&5];
        assert_eq!((c.floor, c.last_active), (1, Timespec::new(7, 0)));
        assert_eq!(c.results[&2], Err(Errno::ENOENT));
        let Ok(Reply::Dir { entries, eof: true }) = &c.results[&1] else { panic!("{:?}", c.results[&1]) };
        let blocks: Vec<_> =
            entries.iter().map(|e| (&e.name[..], e.attr.as_ref().map(|a| a.blocks))).collect();
        // 5000 bytes written below the size: two 4096-byte blocks; below the size 100 in
        // "short", one.
        let want: Vec<(&[u8], _)> = vec![
            (b"d", Some(0)),
            (b"f", Some(16)),
            (b"short", Some(8)),
            (b"bare", None),
            (b"old", Some(0)),
            (b"gone", Some(0)),
        ];
        assert_eq!(blocks, want);
        let f = entries[1].attr.as_ref().unwrap();
        assert_eq!((f.ino, f.mode, f.uid, f.gid, f.size, f.rdev, f.generation), (3, reg, 1, 2, 10_000, 3, 2));
        assert_eq!((entries[1].kind, entries[1].cookie), (FileType::Regular, 13));
        assert_eq!(sm.st.volumes[&1].inodes[&3].size, 10_000);
        assert_eq!(sm.st.volume_names["v"], 1);
        assert_eq!(sm.clock(), Timespec::new(8, 0));
    }
}
