//! The FUSE adapter: a thin translation of kernel requests into [`Vfs`] calls (fuser, with
//! its pure-Rust mount: no libfuse). Namespace requests (lookup, getattr, create, mkdir,
//! unlink, rename and the like: a metadata round each) run on the FUSE thread that read
//! them, which saves two thread hand-offs per request. Reads, writes, flushes, fsyncs and
//! closes are polled once there and go on as tokio tasks only if they have to wait (a read
//! of cached blocks or a buffered write then costs no hand-off at all); every other request
//! (opens, readdir, locks: anything that can wait on another process) becomes a task at
//! once, so slow ones never hold up others. Changes made elsewhere reach the kernel as inode
//! and entry invalidations (`notify_inval_inode`/`notify_inval_entry`), sent from a thread of
//! their own so a notification never blocks a request.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use elea_common::{Errno, Timespec};
use elea_fsm::{Attr, FileType, LockKind, TimeSet};
use fuser::{
    AccessFlags, CopyFileRangeFlags, FileAttr, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};

use crate::error::{VfsError, VfsResult};
use crate::perm::Creds;
use crate::vfs::{SetAttrReq, Vfs};

/// The block size `stat` reports.
const BLKSIZE: u32 = 4096;
/// `F_SETLK` ranges reaching this end mean "to end of file".
const OFFSET_MAX: u64 = i64::MAX as u64;

/// The one place a failed operation is logged and counted, and its errno given to the
/// kernel.
fn errno(op: &'static str, e: VfsError) -> fuser::Errno {
    fuser::Errno::from_i32(e.report(op).0)
}

/// For requests that name an inode the kernel looked up earlier: if it is gone (unlinked
/// and freed in between, say by a rename over its name from another mount), `ESTALE`, on
/// which the kernel looks the path up again and retries (an `open` racing an atomic replace
/// then opens the new file instead of failing with `ENOENT`).
fn stale<T>(r: VfsResult<T>) -> VfsResult<T> {
    r.map_err(|e| if e.errno() == Errno::ENOENT { Errno::ESTALE.into() } else { e })
}

fn to_system(t: Timespec) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(u64::from(t.nsec))
    }
}

fn from_system(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec::new(d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec::new(sec, nsec)
        }
    }
}

fn kind(t: Option<FileType>) -> fuser::FileType {
    match t {
        Some(FileType::Directory) => fuser::FileType::Directory,
        Some(FileType::Symlink) => fuser::FileType::Symlink,
        Some(FileType::Fifo) => fuser::FileType::NamedPipe,
        Some(FileType::Socket) => fuser::FileType::Socket,
        Some(FileType::CharDevice) => fuser::FileType::CharDevice,
        Some(FileType::BlockDevice) => fuser::FileType::BlockDevice,
        Some(FileType::Regular) | None => fuser::FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: to_system(a.atime),
        mtime: to_system(a.mtime),
        ctime: to_system(a.ctime),
        crtime: to_system(a.ctime),
        kind: kind(a.file_type()),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: BLKSIZE,
        flags: 0,
    }
}

fn creds(req: &Request) -> Creds {
    Creds::new(req.uid(), req.gid(), req.pid())
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(from_system(s)),
    }
}

fn lock_kind(typ: i32) -> VfsResult<LockKind> {
    match typ {
        libc::F_RDLCK => Ok(LockKind::Read),
        libc::F_WRLCK => Ok(LockKind::Write),
        libc::F_UNLCK => Ok(LockKind::Unlock),
        _ => Err(Errno::EINVAL.into()),
    }
}

/// Whether thread `tid` has a signal pending that it does not block, or is gone (from
/// `/proc/TID/status`): a lock request waiting on its behalf then ends with `EINTR`, so the
/// kernel can deliver the signal (a kill included) instead of keeping the thread stuck.
fn signal_pending(tid: u32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{tid}/status")) else { return true };
    signals_pending(&s)
}

fn signals_pending(status: &str) -> bool {
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigPnd:") | mask("ShdPnd:")) & !mask("SigBlk:") != 0
}

fn lock_end(end: u64) -> u64 {
    if end >= OFFSET_MAX { u64::MAX } else { end }
}

/// The FUSE file system: see the module docs.
pub struct EleaFs {
    vfs: Vfs,
    rt: tokio::runtime::Handle,
}

impl EleaFs {
    pub fn new(vfs: Vfs, rt: tokio::runtime::Handle) -> Self {
        Self { vfs, rt }
    }

    fn spawn<F>(&self, f: impl FnOnce(Vfs) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f(self.vfs.clone()));
    }

    /// Polls a data request once on the FUSE thread: one that finishes without waiting (a
    /// read of cached blocks, a write into the buffer, a close with nothing to flush) costs
    /// no thread hand-off; one that has to wait (a fetch, a flush, a metadata round) goes on
    /// as a runtime task from where it stopped, as if it had been spawned at once.
    fn fast_or_spawn<F>(&self, f: impl FnOnce(Vfs) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let _in_runtime = self.rt.enter();
        let mut fut = Box::pin(f(self.vfs.clone()));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if fut.as_mut().poll(&mut cx).is_pending() {
            self.rt.spawn(fut);
        }
    }

    /// Runs a short request on the FUSE thread itself instead of handing it to a runtime
    /// worker: one thread wake-up fewer each way, which is most of what a metadata read
    /// answered in this process costs.
    fn inline<F>(&self, f: impl FnOnce(Vfs) -> F)
    where
        F: Future<Output = ()>,
    {
        self.rt.block_on(f(self.vfs.clone()));
    }

    fn ttls(&self) -> (Duration, Duration) {
        (self.vfs.config().attr_ttl, self.vfs.config().entry_ttl)
    }
}

fn entry(op: &'static str, reply: ReplyEntry, r: VfsResult<Attr>, attr_ttl: Duration, entry_ttl: Duration) {
    match r {
        Ok(a) => reply.entry_with_ttls(&attr_ttl, &entry_ttl, &file_attr(&a), Generation(a.generation)),
        Err(e) => reply.error(errno(op, e)),
    }
}

fn empty(op: &'static str, reply: ReplyEmpty, r: VfsResult<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, e)),
    }
}

fn xattr_reply(op: &'static str, reply: ReplyXattr, data: VfsResult<Vec<u8>>, size: u32) {
    match data {
        Ok(d) if size == 0 => reply.size(d.len() as u32),
        Ok(d) if d.len() > size as usize => reply.error(fuser::Errno::ERANGE),
        Ok(d) => reply.data(&d),
        Err(e) => reply.error(errno(op, e)),
    }
}

impl Filesystem for EleaFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // POSIX record locks go to the metadata service, so they exclude across nodes.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS) {
            tracing::warn!(?missing, "the kernel does not offer remote POSIX locks; locks stay node-local");
        }
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // Set-id bits and file capabilities are this file system's to drop on a write,
        // truncate or chown by a caller without CAP_FSETID (see `Vfs::setattr` and
        // `Vfs::drop_setid_after_write`). In exchange the kernel stops asking for the
        // `security.capability` xattr before every write to a file it knows carries neither
        // (it asks again after any attribute refresh): a metadata read per write less.
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (c, name, (at, et)) = (creds(req), name.as_bytes().to_vec(), self.ttls());
        self.inline(|v| async move { entry("lookup", reply, v.lookup(&c, parent.0, &name).await, at, et) });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let at = self.ttls().0;
        self.inline(|v| async move {
            match stale(v.getattr(ino.0).await) {
                Ok(a) => reply.attr(&at, &file_attr(&a)),
                Err(e) => reply.error(errno("getattr", e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let c = creds(req);
        let at = self.ttls().0;
        let r = SetAttrReq {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            fh: fh.map(|f| f.0),
        };
        self.spawn(|v| async move {
            match stale(v.setattr(&c, ino.0, r).await) {
                Ok(a) => reply.attr(&at, &file_attr(&a)),
                Err(e) => reply.error(errno("setattr", e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(|v| async move {
            match stale(v.readlink(ino.0).await) {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno("readlink", e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (c, name, (at, et)) = (creds(req), name.as_bytes().to_vec(), self.ttls());
        self.inline(|v| async move {
            entry("mknod", reply, v.mknod(&c, parent.0, &name, mode, umask, u64::from(rdev)).await, at, et)
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (c, name, (at, et)) = (creds(req), name.as_bytes().to_vec(), self.ttls());
        self.inline(|v| async move {
            entry("mkdir", reply, v.mkdir(&c, parent.0, &name, mode, umask).await, at, et)
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (c, name) = (creds(req), name.as_bytes().to_vec());
        self.inline(|v| async move { empty("unlink", reply, v.unlink(&c, parent.0, &name).await) });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (c, name) = (creds(req), name.as_bytes().to_vec());
        self.inline(|v| async move { empty("rmdir", reply, v.rmdir(&c, parent.0, &name).await) });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (c, name, (at, et)) = (creds(req), link_name.as_bytes().to_vec(), self.ttls());
        let target = target.as_os_str().as_bytes().to_vec();
        self.inline(|v| async move {
            entry("symlink", reply, v.symlink(&c, parent.0, &name, &target).await, at, et)
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (c, name, newname) = (creds(req), name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        self.inline(|v| async move {
            empty("rename", reply, v.rename(&c, parent.0, &name, newparent.0, &newname, flags.bits()).await)
        });
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let (c, name, (at, et)) = (creds(req), newname.as_bytes().to_vec(), self.ttls());
        self.inline(
            |v| async move { entry("link", reply, v.link(&c, ino.0, newparent.0, &name).await, at, et) },
        );
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let c = creds(req);
        self.spawn(|v| async move {
            match stale(v.open(&c, ino.0, flags.0).await) {
                Ok((fh, _)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno("open", e)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.fast_or_spawn(|v| async move {
            match v.read(fh.0, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno("read", e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = data.to_vec();
        let drop_setid = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        self.fast_or_spawn(|v| async move {
            let r = v.write(fh.0, offset, &data).await;
            if drop_setid
                && r.is_ok()
                && let Err(e) = v.drop_setid_after_write(fh.0).await
            {
                tracing::warn!(fh = fh.0, error = %e, "dropping set-id bits after a write failed");
            }
            match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno("write", e)),
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        self.fast_or_spawn(|v| async move {
            // The kernel keeps no record of remote POSIX locks: a close drops the closing
            // owner's locks here.
            let unlocked = v.release_locks(fh.0, lock_owner.0).await;
            let flushed = v.flush(fh.0).await;
            empty("flush", reply, flushed.and(unlocked));
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fast_or_spawn(|v| async move { empty("release", reply, v.release(fh.0).await) });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.fast_or_spawn(|v| async move { empty("fsync", reply, v.fsync(fh.0).await) });
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let c = creds(req);
        self.spawn(|v| async move {
            match stale(v.opendir(&c, ino.0).await) {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(errno("opendir", e)),
            }
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.spawn(|v| async move {
            let mut cookie = offset;
            loop {
                match v.readdir(fh.0, cookie, false).await {
                    Ok((entries, eof)) => {
                        for e in &entries {
                            if reply.add(
                                INodeNo(e.ino),
                                e.cookie,
                                kind(Some(e.kind)),
                                OsStr::from_bytes(&e.name),
                            ) {
                                reply.ok();
                                return;
                            }
                            cookie = e.cookie;
                        }
                        if eof || entries.is_empty() {
                            reply.ok();
                            return;
                        }
                    }
                    Err(e) => {
                        reply.error(errno("readdir", e));
                        return;
                    }
                }
            }
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.spawn(|v| async move { empty("releasedir", reply, v.releasedir(fh.0).await) });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // Namespace changes are durable in metadata when they return.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn(|v| async move {
            match v.statfs().await {
                Ok(s) => {
                    let bs = u64::from(BLKSIZE);
                    let blocks = s.total_bytes / bs;
                    let free = s.total_bytes.saturating_sub(s.used_bytes) / bs;
                    let ffree = s.total_inodes.saturating_sub(s.used_inodes);
                    reply.statfs(blocks, free, free, s.total_inodes, ffree, BLKSIZE, 255, BLKSIZE);
                }
                Err(e) => reply.error(errno("statfs", e)),
            }
        });
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (c, name, value) = (creds(req), name.as_bytes().to_vec(), value.to_vec());
        self.spawn(|v| async move {
            empty("setxattr", reply, stale(v.setxattr(&c, ino.0, &name, &value, flags as u32).await))
        });
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let (c, name) = (creds(req), name.as_bytes().to_vec());
        self.spawn(|v| async move {
            xattr_reply("getxattr", reply, stale(v.getxattr(&c, ino.0, &name).await), size)
        });
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let c = creds(req);
        self.spawn(|v| async move {
            let names = stale(v.listxattr(&c, ino.0).await).map(|names| {
                let mut out = Vec::new();
                for n in names {
                    out.extend_from_slice(&n);
                    out.push(0);
                }
                out
            });
            xattr_reply("listxattr", reply, names, size)
        });
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (c, name) = (creds(req), name.as_bytes().to_vec());
        self.spawn(
            |v| async move { empty("removexattr", reply, stale(v.removexattr(&c, ino.0, &name).await)) },
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let c = creds(req);
        self.spawn(|v| async move {
            empty("access", reply, stale(v.access(&c, ino.0, mask.bits() as u32).await))
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (c, name, at) = (creds(req), name.as_bytes().to_vec(), self.ttls().0);
        self.inline(|v| async move {
            match v.create(&c, parent.0, &name, mode, umask, flags).await {
                Ok((fh, a)) => reply.created(
                    &at,
                    &file_attr(&a),
                    Generation(a.generation),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno("create", e)),
            }
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        self.spawn(|v| async move {
            let k = match lock_kind(typ) {
                Ok(k) => k,
                Err(e) => return reply.error(errno("getlk", e)),
            };
            match v.getlk(fh.0, lock_owner.0, k, start, lock_end(end)).await {
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, pid),
                Ok(Some(l)) => {
                    let typ = if l.kind == LockKind::Write { libc::F_WRLCK } else { libc::F_RDLCK };
                    reply.locked(l.start, l.end.min(OFFSET_MAX), typ, l.pid)
                }
                Err(e) => reply.error(errno("getlk", e)),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let tid = req.pid();
        self.spawn(|v| async move {
            let interrupted = move || signal_pending(tid);
            let r = match lock_kind(typ) {
                Ok(k) => v.setlk(fh.0, lock_owner.0, pid, k, start, lock_end(end), sleep, &interrupted).await,
                Err(e) => Err(e),
            };
            empty("setlk", reply, r)
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.spawn(|v| async move {
            empty("fallocate", reply, v.fallocate(fh.0, offset, length, mode as u32).await)
        });
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // One reply carries at most u32::MAX bytes; callers loop over short copies.
        let len = len.min(1 << 30);
        self.spawn(|v| async move {
            match v.copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len).await {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno("copy_file_range", e)),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_signals_from_proc_status() {
        let quiet = "Name:\tx\nSigQ:\t0/1\nSigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\n";
        assert!(!signals_pending(quiet));
        // SIGKILL (9) pending on the process.
        assert!(signals_pending(&quiet.replace("ShdPnd:\t0000000000000000", "ShdPnd:\t0000000000000100")));
        // SIGALRM (14) pending on the thread, but blocked.
        let blocked = quiet
            .replace("SigPnd:\t0000000000000000", "SigPnd:\t0000000000002000")
            .replace("SigBlk:\t0000000000000000", "SigBlk:\t0000000000002000");
        assert!(!signals_pending(&blocked));
        assert!(signal_pending(u32::MAX), "a thread that is gone");
        assert!(!signal_pending(std::process::id()), "this test has nothing pending");
    }
}
