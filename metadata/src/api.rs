//! The typed metadata API: every question and change a gateway, a data client, a cache node
//! or the CLI puts to the metadata service, as a method with typed arguments and results.
//!
//! [`MetaApi`] has three required methods (apply an [`Op`], answer a [`Query`], follow a
//! volume's changes); everything else is a provided method that builds the command and
//! decodes its reply here, once, so no caller outside this crate speaks the Raft command
//! vocabulary. [`crate::client::MetaClient`] implements it over gRPC (or a node in this
//! process); [`crate::mem::MemMeta`] implements it over the state machine in memory, for
//! tests that need no sockets.
//!
//! An unexpected reply variant is a [`ClientError::Protocol`] error, never a panic.

use elea_common::{Ino, SessionId, SliceId, Timespec, VolumeId};
use elea_fsm::{
    Attr, CacheNodeInfo, CacheStats, Caller, DataIdentity, DirEntry, GroupRecord, InlineSlice, LockInfo,
    LockKind, MigrationStatus, Op, Query, Reply, SetAttr, SiteMap, Slice, SliceData, SliceLoc, StagedBlock,
    StatFs, VolumeConfig, VolumeInfo,
};

use crate::client::{ClientError, WatchStream};

/// Slices one `SliceData` query asks for: at most 16 MiB of inline bytes in its reply
/// (256 times [`elea_fsm::limits::INLINE_MAX`]).
pub const SLICE_DATA_PAGE: usize = 256;

/// A new non-directory node ([`MetaApi::mknod`]).
#[derive(Debug, Clone)]
pub struct NewNode<'a> {
    pub parent: Ino,
    pub name: &'a [u8],
    /// Type and permission bits (type 0 is a regular file).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Device number of a character or block device.
    pub rdev: u64,
    /// `EEXIST` when the name exists; otherwise the existing file is returned (`O_CREAT`
    /// without `O_EXCL`).
    pub exclusive: bool,
    /// Also take an open reference on the file for this session (a create that opens).
    pub open: Option<SessionId>,
}

/// Who asks for a lock, and which one ([`MetaApi::setlk`], [`MetaApi::getlk`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockReq {
    pub session: SessionId,
    pub owner: u64,
    /// The owner's process id, reported by `F_GETLK` to others.
    pub pid: u32,
    pub kind: LockKind,
    pub start: u64,
    /// Inclusive; `u64::MAX` means to the end of the file.
    pub end: u64,
}

/// `op` as `caller` sends it: checked against the caller's permissions in the same command
/// ([`Op::As`]), except for root, who passes every check.
fn as_caller(caller: &Caller, op: Op) -> Op {
    if caller.is_root() { op } else { Op::As { caller: caller.clone(), op: Box::new(op) } }
}

/// The `Mknod` op for `n`, owned by `uid`/`gid`.
fn mknod_op(vol: VolumeId, n: &NewNode<'_>, uid: u32, gid: u32) -> Op {
    Op::Mknod {
        vol,
        parent: n.parent,
        name: n.name.to_vec(),
        mode: n.mode,
        uid,
        gid,
        rdev: n.rdev,
        exclusive: n.exclusive,
        ino: None,
        session: n.open,
    }
}

fn entry_of(r: Reply) -> Result<(Attr, bool), ClientError> {
    match r {
        Reply::Entry { attr, created } => Ok((attr, created)),
        other => Err(unexpected(&other)),
    }
}

pub(crate) fn unexpected(r: &Reply) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {r:?}"))
}

fn attr_of(r: Reply) -> Result<Attr, ClientError> {
    match r {
        Reply::Attr(a) | Reply::Entry { attr: a, .. } => Ok(a),
        other => Err(unexpected(&other)),
    }
}

/// For ops whose reply carries nothing the caller needs.
fn ok(_: Reply) -> Result<(), ClientError> {
    Ok(())
}

fn data(r: Reply) -> Result<Vec<u8>, ClientError> {
    match r {
        Reply::Data(d) => Ok(d),
        other => Err(unexpected(&other)),
    }
}

/// See the module docs. Implementations are cheap to clone and shared between tasks.
pub trait MetaApi: Clone + Send + Sync + 'static {
    /// Applies a state-changing op: linearizable and exactly once (a retried op is not
    /// applied twice).
    fn op(&self, op: Op) -> impl Future<Output = Result<Reply, ClientError>> + Send;

    /// Answers a query from the latest committed state (linearizable).
    fn query(&self, q: Query) -> impl Future<Output = Result<Reply, ClientError>> + Send;

    /// The change stream of `vol` after sequence `from_seq` (0: from now on): every change,
    /// in order, or [`crate::client::WatchItem::Reset`] where changes were missed.
    fn watch(
        &self,
        vol: VolumeId,
        from_seq: u64,
    ) -> impl Future<Output = Result<WatchStream, ClientError>> + Send;

    /// The id this client's commands carry (what [`crate::client::WatchItem::Changes`]
    /// names as their maker); 0 when its commands carry none.
    fn client_id(&self) -> u64 {
        0
    }

    // ---- volumes ----------------------------------------------------------------------

    fn create_volume(
        &self,
        name: &str,
        config: VolumeConfig,
    ) -> impl Future<Output = Result<VolumeInfo, ClientError>> + Send {
        async move {
            match self.op(Op::CreateVolume { name: name.to_string(), config }).await? {
                Reply::Volume(v) => Ok(v),
                other => Err(unexpected(&other)),
            }
        }
    }

    fn list_volumes(&self) -> impl Future<Output = Result<Vec<VolumeInfo>, ClientError>> + Send {
        async move {
            match self.query(Query::ListVolumes).await? {
                Reply::Volumes(v) => Ok(v),
                other => Err(unexpected(&other)),
            }
        }
    }

    fn volume(&self, name: &str) -> impl Future<Output = Result<VolumeInfo, ClientError>> + Send {
        async move {
            match self.query(Query::VolumeByName { name: name.to_string() }).await? {
                Reply::Volume(v) => Ok(v),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// The cluster's identity in stored data (`None` before its first volume).
    fn data_identity(&self) -> impl Future<Output = Result<Option<DataIdentity>, ClientError>> + Send {
        async move {
            match self.query(Query::DataIdentity).await? {
                Reply::Identity(i) => Ok(i),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// A volume by id (`ENODEV` when there is none).
    fn volume_by_id(&self, vol: VolumeId) -> impl Future<Output = Result<VolumeInfo, ClientError>> + Send {
        async move {
            self.list_volumes()
                .await?
                .into_iter()
                .find(|v| v.id == vol)
                .ok_or(ClientError::Fs(elea_common::Errno::ENODEV))
        }
    }

    // ---- namespace --------------------------------------------------------------------

    fn lookup(
        &self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        async move { attr_of(self.query(Query::Lookup { vol, parent, name: name.to_vec() }).await?) }
    }

    fn getattr(&self, vol: VolumeId, ino: Ino) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        async move { attr_of(self.query(Query::GetAttr { vol, ino }).await?) }
    }

    fn setattr(
        &self,
        vol: VolumeId,
        ino: Ino,
        set: SetAttr,
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        async move { attr_of(self.op(Op::SetAttr { vol, ino, set }).await?) }
    }

    /// Creates a non-directory node; returns its attributes and whether it was created
    /// (false: an existing file, see [`NewNode::exclusive`]).
    fn mknod(
        &self,
        vol: VolumeId,
        n: NewNode<'_>,
    ) -> impl Future<Output = Result<(Attr, bool), ClientError>> + Send {
        let op = mknod_op(vol, &n, n.uid, n.gid);
        async move { entry_of(self.op(op).await?) }
    }

    /// Creates a regular file as root (`O_CREAT|O_EXCL`, no open reference): for tools and
    /// benchmarks.
    fn create(
        &self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        mode: u32,
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        let n = NewNode {
            parent,
            name,
            mode: elea_fsm::mode::S_IFREG | (mode & elea_fsm::mode::PERM_MASK),
            uid: 0,
            gid: 0,
            rdev: 0,
            exclusive: true,
            open: None,
        };
        let f = self.mknod(vol, n);
        async move { f.await.map(|(a, _)| a) }
    }

    #[allow(clippy::too_many_arguments)]
    fn mkdir(
        &self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        let op = Op::Mkdir { vol, parent, name: name.to_vec(), mode, uid, gid, ino: None };
        async move { attr_of(self.op(op).await?) }
    }

    #[allow(clippy::too_many_arguments)]
    fn symlink(
        &self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        uid: u32,
        gid: u32,
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        let op =
            Op::Symlink { vol, parent, name: name.to_vec(), target: target.to_vec(), uid, gid, ino: None };
        async move { attr_of(self.op(op).await?) }
    }

    fn readlink(&self, vol: VolumeId, ino: Ino) -> impl Future<Output = Result<Vec<u8>, ClientError>> + Send {
        async move { data(self.query(Query::ReadLink { vol, ino }).await?) }
    }

    fn link(
        &self,
        vol: VolumeId,
        ino: Ino,
        new_parent: Ino,
        new_name: &[u8],
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        let op = Op::Link { vol, ino, new_parent, new_name: new_name.to_vec() };
        async move { attr_of(self.op(op).await?) }
    }

    fn unlink(
        &self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::Unlink { vol, parent, name: name.to_vec() };
        async move { ok(self.op(op).await?) }
    }

    fn rmdir(
        &self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::Rmdir { vol, parent, name: name.to_vec() };
        async move { ok(self.op(op).await?) }
    }

    /// `renameat2` with [`elea_fsm::rename_flags`].
    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        vol: VolumeId,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op =
            Op::Rename { vol, parent, name: name.to_vec(), new_parent, new_name: new_name.to_vec(), flags };
        async move { ok(self.op(op).await?) }
    }

    /// Entries of directory `ino` after `cookie` (at most `limit`), and whether the listing
    /// ended.
    fn readdir(
        &self,
        vol: VolumeId,
        ino: Ino,
        cookie: u64,
        limit: u32,
        plus: bool,
    ) -> impl Future<Output = Result<(Vec<DirEntry>, bool), ClientError>> + Send {
        async move {
            match self.query(Query::ReadDir { vol, ino, cookie, limit, plus }).await? {
                Reply::Dir { entries, eof } => Ok((entries, eof)),
                other => Err(unexpected(&other)),
            }
        }
    }

    fn statfs(&self, vol: VolumeId) -> impl Future<Output = Result<StatFs, ClientError>> + Send {
        async move {
            match self.query(Query::StatFs { vol }).await? {
                Reply::StatFs(s) => Ok(s),
                other => Err(unexpected(&other)),
            }
        }
    }

    // ---- namespace changes on behalf of a caller ----------------------------------------
    //
    // The state machine checks the caller's permissions (search and write on the parents,
    // sticky directories, device nodes) and applies the change in one command: one round
    // trip, and no window between the check and the change. New inodes belong to the
    // caller (its uid and primary gid).

    /// [`MetaApi::mknod`] on behalf of `caller` (`n.uid`/`n.gid` are ignored).
    fn mknod_as(
        &self,
        vol: VolumeId,
        caller: &Caller,
        n: NewNode<'_>,
    ) -> impl Future<Output = Result<(Attr, bool), ClientError>> + Send {
        let op = as_caller(caller, mknod_op(vol, &n, caller.uid, caller.gid));
        async move { entry_of(self.op(op).await?) }
    }

    fn mkdir_as(
        &self,
        vol: VolumeId,
        caller: &Caller,
        parent: Ino,
        name: &[u8],
        mode: u32,
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        let op =
            Op::Mkdir { vol, parent, name: name.to_vec(), mode, uid: caller.uid, gid: caller.gid, ino: None };
        let op = as_caller(caller, op);
        async move { attr_of(self.op(op).await?) }
    }

    fn symlink_as(
        &self,
        vol: VolumeId,
        caller: &Caller,
        parent: Ino,
        name: &[u8],
        target: &[u8],
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        let op = Op::Symlink {
            vol,
            parent,
            name: name.to_vec(),
            target: target.to_vec(),
            uid: caller.uid,
            gid: caller.gid,
            ino: None,
        };
        let op = as_caller(caller, op);
        async move { attr_of(self.op(op).await?) }
    }

    fn link_as(
        &self,
        vol: VolumeId,
        caller: &Caller,
        ino: Ino,
        new_parent: Ino,
        new_name: &[u8],
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        let op = as_caller(caller, Op::Link { vol, ino, new_parent, new_name: new_name.to_vec() });
        async move { attr_of(self.op(op).await?) }
    }

    fn unlink_as(
        &self,
        vol: VolumeId,
        caller: &Caller,
        parent: Ino,
        name: &[u8],
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = as_caller(caller, Op::Unlink { vol, parent, name: name.to_vec() });
        async move { ok(self.op(op).await?) }
    }

    fn rmdir_as(
        &self,
        vol: VolumeId,
        caller: &Caller,
        parent: Ino,
        name: &[u8],
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = as_caller(caller, Op::Rmdir { vol, parent, name: name.to_vec() });
        async move { ok(self.op(op).await?) }
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_as(
        &self,
        vol: VolumeId,
        caller: &Caller,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op =
            Op::Rename { vol, parent, name: name.to_vec(), new_parent, new_name: new_name.to_vec(), flags };
        let op = as_caller(caller, op);
        async move { ok(self.op(op).await?) }
    }

    // ---- extended attributes ----------------------------------------------------------

    fn setxattr(
        &self,
        vol: VolumeId,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: u32,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::SetXattr { vol, ino, name: name.to_vec(), value: value.to_vec(), flags };
        async move { ok(self.op(op).await?) }
    }

    fn getxattr(
        &self,
        vol: VolumeId,
        ino: Ino,
        name: &[u8],
    ) -> impl Future<Output = Result<Vec<u8>, ClientError>> + Send {
        async move { data(self.query(Query::GetXattr { vol, ino, name: name.to_vec() }).await?) }
    }

    fn listxattr(
        &self,
        vol: VolumeId,
        ino: Ino,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, ClientError>> + Send {
        async move {
            match self.query(Query::ListXattr { vol, ino }).await? {
                Reply::Names(n) => Ok(n),
                other => Err(unexpected(&other)),
            }
        }
    }

    fn removexattr(
        &self,
        vol: VolumeId,
        ino: Ino,
        name: &[u8],
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::RemoveXattr { vol, ino, name: name.to_vec() };
        async move { ok(self.op(op).await?) }
    }

    // ---- file data --------------------------------------------------------------------

    /// The slice list of one chunk of a file, oldest first.
    fn read_chunk(
        &self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
    ) -> impl Future<Output = Result<Vec<Slice>, ClientError>> + Send {
        async move {
            match self.query(Query::ReadChunk { vol, ino, chunk }).await? {
                Reply::Slices(s) => Ok(s),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Records a write of one slice piece into a chunk ([`Op::WriteSlice`]); `staged` lists
    /// the holders of each block of a new slice (empty when the slice is already known).
    fn write_slice(
        &self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        slice: Slice,
        staged: Vec<Vec<u64>>,
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        async move { attr_of(self.op(Op::WriteSlice { vol, ino, chunk, slice, staged }).await?) }
    }

    /// Records many pieces of one new slice into one chunk, all or nothing
    /// ([`Op::WriteSlicePieces`]).
    fn write_slice_pieces(
        &self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        pieces: Vec<Slice>,
        staged: Vec<Vec<u64>>,
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        async move { attr_of(self.op(Op::WriteSlicePieces { vol, ino, chunk, pieces, staged }).await?) }
    }

    /// Records pieces of one new slice whose bytes (`data`, the whole slice) travel in the
    /// command ([`Op::WriteInline`]); `EAGAIN` when metadata holds all the inline bytes it
    /// may.
    fn write_inline(
        &self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        pieces: Vec<Slice>,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<Attr, ClientError>> + Send {
        async move { attr_of(self.op(Op::WriteInline { vol, ino, chunk, pieces, data }).await?) }
    }

    /// `fallocate(2)` with [`elea_fsm::fallocate_flags`].
    fn fallocate(
        &self,
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        len: u64,
        mode: u32,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::Fallocate { vol, ino, offset, len, mode }).await?) }
    }

    /// Reserves `count` slice ids; returns the first.
    fn alloc_slices(&self, count: u64) -> impl Future<Output = Result<u64, ClientError>> + Send {
        async move {
            match self.op(Op::AllocSlices { count }).await? {
                Reply::Range { start, .. } => Ok(start),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Locations of slices (any number: asked in pages).
    fn slice_locs(
        &self,
        ids: &[SliceId],
    ) -> impl Future<Output = Result<Vec<(SliceId, Option<SliceLoc>)>, ClientError>> + Send {
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for part in ids.chunks(elea_fsm::limits::BATCH_MAX) {
                match self.query(Query::SliceLocs { ids: part.to_vec() }).await? {
                    Reply::SliceLocs(l) => out.extend(l),
                    other => return Err(unexpected(&other)),
                }
            }
            Ok(out)
        }
    }

    /// Locations of slices with the bytes of those that are inline (any number: asked in
    /// pages of [`SLICE_DATA_PAGE`], so that a page's reply stays far below the largest
    /// reply a client takes).
    fn slice_data(
        &self,
        ids: &[SliceId],
    ) -> impl Future<Output = Result<Vec<SliceData>, ClientError>> + Send {
        async move {
            let mut out = Vec::with_capacity(ids.len());
            for part in ids.chunks(SLICE_DATA_PAGE) {
                match self.query(Query::SliceData { ids: part.to_vec() }).await? {
                    Reply::SliceData(l) => out.extend(l),
                    other => return Err(unexpected(&other)),
                }
            }
            Ok(out)
        }
    }

    // ---- sessions, open files and locks ------------------------------------------------

    /// Starts a session with a lease of `ttl_ms`; returns its id.
    fn open_session(
        &self,
        name: &str,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<SessionId, ClientError>> + Send {
        async move {
            match self.op(Op::OpenSession { name: name.to_string(), ttl_ms }).await? {
                Reply::Session { id, .. } => Ok(id),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Renews a session's lease (`ESTALE`: it lapsed).
    fn heartbeat(&self, session: SessionId) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::Heartbeat { session }).await?) }
    }

    /// Ends a session, releasing its open files and locks.
    fn close_session(&self, session: SessionId) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::CloseSession { session }).await?) }
    }

    /// Takes an open reference on `ino` for `session`.
    fn open(
        &self,
        vol: VolumeId,
        ino: Ino,
        session: SessionId,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::Open { vol, ino, session }).await?) }
    }

    /// Drops one open reference (the last one anywhere frees an unlinked file).
    fn release(
        &self,
        vol: VolumeId,
        ino: Ino,
        session: SessionId,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::Release { vol, ino, session }).await?) }
    }

    /// `F_GETLK`: the first lock that conflicts with `l`.
    fn getlk(
        &self,
        vol: VolumeId,
        ino: Ino,
        l: LockReq,
    ) -> impl Future<Output = Result<Option<LockInfo>, ClientError>> + Send {
        let q = Query::GetLk {
            vol,
            ino,
            session: l.session,
            owner: l.owner,
            kind: l.kind,
            start: l.start,
            end: l.end,
        };
        async move {
            match self.query(q).await? {
                Reply::Lock(l) => Ok(l),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// `F_SETLK`: sets or clears a record lock (`EAGAIN` on a conflict; with `wait`, a
    /// conflict that would deadlock is `EDEADLK` and the caller is recorded as waiting).
    fn setlk(
        &self,
        vol: VolumeId,
        ino: Ino,
        l: LockReq,
        wait: bool,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::SetLk {
            vol,
            ino,
            session: l.session,
            owner: l.owner,
            pid: l.pid,
            kind: l.kind,
            start: l.start,
            end: l.end,
            wait,
        };
        async move { ok(self.op(op).await?) }
    }

    /// `flock(2)`: shared (Read), exclusive (Write) or unlock (`EAGAIN` on a conflict).
    fn flock(
        &self,
        vol: VolumeId,
        ino: Ino,
        session: SessionId,
        owner: u64,
        kind: LockKind,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::Flock { vol, ino, session, owner, kind }).await?) }
    }

    // ---- cache nodes ------------------------------------------------------------------

    /// Every registered cache node, with its liveness.
    fn cache_nodes(&self) -> impl Future<Output = Result<Vec<CacheNodeInfo>, ClientError>> + Send {
        async move {
            match self.query(Query::CacheNodes).await? {
                Reply::CacheNodes(n) => Ok(n),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// The site map: sites, where metadata nodes run, volumes' homes and per-site stores.
    fn sites(&self) -> impl Future<Output = Result<SiteMap, ClientError>> + Send {
        async move {
            match self.query(Query::Sites).await? {
                Reply::Sites(m) => Ok(m),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Declares a site (`EEXIST` when known).
    fn add_site(&self, name: &str) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::AddSite { name: name.to_string() };
        async move { ok(self.op(op).await?) }
    }

    /// A metadata node records its site and address.
    fn register_meta_node(
        &self,
        id: u64,
        site: &str,
        addr: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::RegisterMetaNode { id, site: site.to_string(), addr: addr.to_string() };
        async move { ok(self.op(op).await?) }
    }

    /// Creates a volume homed in site `home`.
    fn create_volume_in(
        &self,
        name: &str,
        config: VolumeConfig,
        home: &str,
    ) -> impl Future<Output = Result<VolumeInfo, ClientError>> + Send {
        let op = Op::CreateVolumeIn { name: name.to_string(), config, home: home.to_string() };
        async move {
            match self.op(op).await? {
                Reply::Volume(v) => Ok(v),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Creates a volume in a Raft group of its own homed in `home` (`voters`: 0 = the
    /// default; `spread`: voters across sites). Control group only.
    fn create_volume_group(
        &self,
        name: &str,
        config: VolumeConfig,
        home: &str,
        voters: u8,
        spread: bool,
    ) -> impl Future<Output = Result<GroupRecord, ClientError>> + Send {
        let op =
            Op::CreateVolumeGroup { name: name.to_string(), config, home: home.to_string(), voters, spread };
        async move {
            match self.op(op).await? {
                Reply::Group(g) => Ok(*g),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Records that metadata node `id` runs volume `vol`'s group (control group only).
    fn add_group_member(
        &self,
        vol: VolumeId,
        id: u64,
        learner: bool,
    ) -> impl Future<Output = Result<GroupRecord, ClientError>> + Send {
        async move {
            match self.op(Op::AddGroupMember { vol, id, learner }).await? {
                Reply::Group(g) => Ok(*g),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Records that metadata node `id` left volume `vol`'s group (control group only).
    fn remove_group_member(
        &self,
        vol: VolumeId,
        id: u64,
    ) -> impl Future<Output = Result<GroupRecord, ClientError>> + Send {
        async move {
            match self.op(Op::RemoveGroupMember { vol, id }).await? {
                Reply::Group(g) => Ok(*g),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// The volumes in groups of their own (asked of the control group), or this group's own
    /// record (asked of a volume's group).
    fn volume_groups(&self) -> impl Future<Output = Result<Vec<GroupRecord>, ClientError>> + Send {
        async move {
            match self.query(Query::Groups).await? {
                Reply::Groups(g) => Ok(g),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Attaches store `url` to volume `vol` as site `site`'s store.
    fn add_store(
        &self,
        vol: VolumeId,
        site: &str,
        url: &str,
    ) -> impl Future<Output = Result<VolumeInfo, ClientError>> + Send {
        let op = Op::AddStore { vol, site: site.to_string(), url: url.to_string() };
        async move {
            match self.op(op).await? {
                Reply::Volume(v) => Ok(v),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// A cache node joins (or rejoins) the registry.
    fn register_cache_node(
        &self,
        id: u64,
        site: &str,
        addr: &str,
        incarnation: u64,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::RegisterCacheNode { id, site: site.to_string(), addr: addr.to_string(), incarnation };
        async move { ok(self.op(op).await?) }
    }

    /// A cache node is alive (`ESTALE`: it must register again).
    fn cache_heartbeat(
        &self,
        id: u64,
        incarnation: u64,
        stats: CacheStats,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::CacheHeartbeat { id, incarnation, stats }).await?) }
    }

    /// Every staged block of a live slice (all pages).
    fn staged_blocks(&self) -> impl Future<Output = Result<Vec<StagedBlock>, ClientError>> + Send {
        async move {
            let mut out: Vec<StagedBlock> = Vec::new();
            let mut after = (0, 0);
            loop {
                let q = Query::StagedBlocks { after, limit: elea_fsm::limits::BATCH_MAX as u32 };
                match self.query(q).await? {
                    Reply::Blocks { blocks, more } => {
                        if let Some(b) = blocks.last() {
                            after = (b.slice, b.index);
                        }
                        out.extend(blocks);
                        if !more {
                            return Ok(out);
                        }
                    }
                    other => return Err(unexpected(&other)),
                }
            }
        }
    }

    /// One page of live inline slices after `after`, and whether more follow.
    fn inline_slices(
        &self,
        after: SliceId,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<InlineSlice>, bool), ClientError>> + Send {
        async move {
            match self.query(Query::InlineSlices { after, limit }).await? {
                Reply::Inline { slices, more } => Ok((slices, more)),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Inline slices now staged on these nodes ([`Op::SpillInline`]).
    fn spill_inline(
        &self,
        slices: Vec<(SliceId, Vec<u64>)>,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::SpillInline { slices }).await?) }
    }

    /// Starts moving volume `vol`'s objects from `site`'s store to `url` (a store of `to_site`,
    /// by default `site`'s) ([`Op::StartMigration`]).
    fn start_migration(
        &self,
        vol: VolumeId,
        site: &str,
        url: &str,
        rate_limit: u64,
        delete_source_after_ms: Option<u64>,
        to_site: Option<&str>,
    ) -> impl Future<Output = Result<MigrationStatus, ClientError>> + Send {
        let op = Op::StartMigration {
            vol,
            site: site.to_string(),
            url: url.to_string(),
            rate_limit,
            delete_source_after_ms,
            to_site: to_site.map(str::to_string),
        };
        async move {
            match self.op(op).await? {
                Reply::Migration(m) => Ok(*m),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Records volume `vol`'s home site as `site` in this client's group ([`Op::SetVolumeHome`];
    /// a control group client does not route it to the volume's group).
    fn set_volume_home(
        &self,
        vol: VolumeId,
        site: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        let op = Op::SetVolumeHome { vol, site: site.to_string() };
        async move { ok(self.op(op).await?) }
    }

    /// Volume `vol`'s latest migration (`Fs(ENOENT)` when it never had one).
    fn migration(&self, vol: VolumeId) -> impl Future<Output = Result<MigrationStatus, ClientError>> + Send {
        async move {
            match self.query(Query::Migration { vol }).await? {
                Reply::Migration(m) => Ok(*m),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Every migration (of every group, asked of the control group; of its own, of a volume's
    /// group).
    fn migrations(&self) -> impl Future<Output = Result<Vec<MigrationStatus>, ClientError>> + Send {
        async move {
            match self.query(Query::Migrations).await? {
                Reply::Migrations(m) => Ok(m),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// A page of the blocks volume `vol`'s running migration still has to copy
    /// ([`Query::MigrationBlocks`]).
    fn migration_blocks(
        &self,
        vol: VolumeId,
        after: (SliceId, u32),
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<StagedBlock>, bool), ClientError>> + Send {
        async move {
            match self.query(Query::MigrationBlocks { vol, after, limit }).await? {
                Reply::Blocks { blocks, more } => Ok((blocks, more)),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// Records a copier's progress ([`Op::MigrationProgress`]).
    fn migration_progress(
        &self,
        vol: VolumeId,
        job: u64,
        copied: Vec<(SliceId, u32)>,
        cursor: (SliceId, u32),
        failed: Vec<(SliceId, u32, String)>,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::MigrationProgress { vol, job, copied, cursor, failed }).await?) }
    }

    /// The end of a pass ([`Op::MigrationPass`]): the job as it is after it.
    fn migration_pass(
        &self,
        vol: VolumeId,
        job: u64,
    ) -> impl Future<Output = Result<MigrationStatus, ClientError>> + Send {
        async move {
            match self.op(Op::MigrationPass { vol, job }).await? {
                Reply::Migration(m) => Ok(*m),
                other => Err(unexpected(&other)),
            }
        }
    }

    /// The source's objects of job `job` are deleted ([`Op::MigrationSourceDeleted`]).
    fn migration_source_deleted(
        &self,
        vol: VolumeId,
        job: u64,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::MigrationSourceDeleted { vol, job }).await?) }
    }

    /// Blocks now live in store `store` of their volume ([`Op::MarkTiered`]).
    fn mark_tiered(
        &self,
        store: u16,
        blocks: Vec<(SliceId, u32)>,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::MarkTiered { store, blocks }).await?) }
    }

    /// Re-replication: `new` holds a copy of the block, replacing `old` ([`Op::ReplaceReplica`]).
    fn replace_replica(
        &self,
        slice: SliceId,
        index: u32,
        old: Option<u64>,
        new: u64,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::ReplaceReplica { slice, index, old, new }).await?) }
    }

    /// Garbage collection removed these deleted slices everywhere ([`Op::ForgetSlices`]).
    fn forget_slices(&self, ids: Vec<SliceId>) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::ForgetSlices { ids }).await?) }
    }

    /// Cache node `node` no longer holds its staged copy of block `index` of `slice`
    /// ([`Op::DropReplica`]).
    fn drop_replica(
        &self,
        slice: SliceId,
        index: u32,
        node: u64,
    ) -> impl Future<Output = Result<(), ClientError>> + Send {
        async move { ok(self.op(Op::DropReplica { slice, index, node }).await?) }
    }

    /// One page of deleted slices after `after`, and whether more follow.
    #[allow(clippy::type_complexity)]
    fn pending_deletes(
        &self,
        after: SliceId,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<(SliceId, Timespec, Option<SliceLoc>)>, bool), ClientError>> + Send
    {
        async move {
            match self.query(Query::PendingDeletes { after, limit }).await? {
                Reply::Deletes { slices, more } => Ok((slices, more)),
                other => Err(unexpected(&other)),
            }
        }
    }
}
