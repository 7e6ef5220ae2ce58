//! Open files and directories: open, create, read, close, `fallocate`, `copy_file_range`,
//! readdir.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use elea_cache::DataPath;
use elea_common::layout::{chunk_pieces, chunks_touched};
use elea_common::{Errno, Ino};
use elea_fsm::{Attr, DirEntry, FileType, SetAttr, Slice, fallocate_flags, mode};
use elea_metadata::{MetaApi, NewNode};

use super::inode::{CachedChunks, InodeState};
use super::{HandleKind, Vfs, is_dir, lock};
use crate::error::{VfsError, VfsResult};
use crate::perm::{self, Creds, MAY_READ};

/// Most entries one readdir call asks metadata for.
const READDIR_BATCH: u32 = 512;

impl<M: MetaApi, D: DataPath> Vfs<M, D> {
    /// Opens an existing inode; returns a handle. `O_TRUNC` truncates a regular file.
    pub async fn open(&self, c: &Creds, ino: Ino, flags: i32) -> VfsResult<(u64, Attr)> {
        let a = self.attr_of(ino).await?;
        if is_dir(&a) && (flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0) {
            return Err(Errno::EISDIR.into());
        }
        perm::check(c, &a, perm::open_mask(flags))?;
        let regular = a.file_type() == Some(FileType::Regular);
        if regular && !self.reuse_released(ino) {
            self.inner.meta.open(self.inner.vol, ino, self.session()).await?;
        }
        let fh = self.new_handle(ino, flags, HandleKind::File, regular);
        self.opened(c, fh, a, flags).await
    }

    /// Finishes opening handle `fh` of an existing file with attributes `a`: drops what this
    /// node cached about it (close-to-open) and applies `O_TRUNC` (which, for a caller
    /// without CAP_FSETID, drops set-id bits as Linux does). On failure the handle is closed
    /// again, its open reference included.
    async fn opened(&self, c: &Creds, fh: u64, a: Attr, flags: i32) -> VfsResult<(u64, Attr)> {
        let r = async {
            let h = self.handle(fh)?;
            h.node.invalidate();
            if a.file_type() != Some(FileType::Regular) || flags & libc::O_TRUNC == 0 {
                return Ok(self.local_attr(a));
            }
            // This node's buffered writes came first: flush them, then cut them away.
            self.flush_node(&h.node).await?;
            let clear_suid = !c.is_root() && a.mode & (mode::S_ISUID | mode::S_ISGID) != 0;
            let set = SetAttr { size: Some(0), clear_suid, ..SetAttr::default() };
            let a = self.inner.meta.setattr(self.inner.vol, h.ino, set).await?;
            h.node.invalidate();
            Ok(a)
        }
        .await;
        match r {
            Ok(a) => Ok((fh, a)),
            Err(e) => {
                let _ = self.release(fh).await;
                Err(e)
            }
        }
    }

    /// Creates and opens a regular file (`open` with `O_CREAT`): an existing one is opened
    /// unless `O_EXCL` is set.
    pub async fn create(
        &self,
        c: &Creds,
        parent: Ino,
        name: &[u8],
        mode_: u32,
        umask: u32,
        flags: i32,
    ) -> VfsResult<(u64, Attr)> {
        let n = NewNode {
            parent,
            name,
            mode: mode::S_IFREG | (mode_ & !umask & mode::PERM_MASK),
            uid: c.uid,
            gid: c.gid,
            rdev: 0,
            exclusive: flags & libc::O_EXCL != 0,
            open: Some(self.session()),
        };
        let (a, created) = self.inner.meta.mknod_as(self.inner.vol, &c.caller(), n).await?;
        let fh = self.new_handle(a.ino, flags, HandleKind::File, true);
        if created {
            return Ok((fh, a));
        }
        if let Err(e) = perm::check(c, &a, perm::open_mask(flags)) {
            let _ = self.release(fh).await;
            return Err(e.into());
        }
        self.opened(c, fh, a, flags).await
    }

    /// Reads up to `len` bytes at `offset` (short at end of file).
    pub async fn read(&self, fh: u64, offset: u64, len: u32) -> VfsResult<Bytes> {
        let h = self.live_handle(fh)?;
        if matches!(h.kind, HandleKind::Dir) {
            return Err(Errno::EISDIR.into());
        }
        if h.flags & libc::O_ACCMODE == libc::O_WRONLY {
            return Err(Errno::EBADF.into());
        }
        let n = &h.node;
        // Read-your-writes: this node's buffered writes are flushed first.
        self.flush_node(n).await?;
        match self.read_cached(n, offset, len).await {
            Err(e) if e == Errno::EIO || e == Errno::ENOENT => {
                // A cached slice list may be older than a deletion the watch has not
                // delivered yet: read once more from fresh metadata.
                n.invalidate();
                self.read_cached(n, offset, len).await
            }
            r => r,
        }
    }

    async fn read_cached(&self, n: &Arc<InodeState>, offset: u64, len: u32) -> VfsResult<Bytes> {
        let (epoch, attr) = {
            let c = n.cache();
            (c.epoch, c.attr.clone())
        };
        let attr = match attr {
            Some(a) => a,
            None => {
                let a = self.attr_of(n.ino).await?;
                let mut c = n.cache();
                if c.epoch == epoch {
                    c.attr = Some(a.clone());
                }
                a
            }
        };
        if offset >= attr.size || len == 0 {
            return Ok(Bytes::new());
        }
        let end = attr.size.min(offset + u64::from(len));
        let src = Arc::new(CachedChunks {
            meta: self.inner.meta.clone(),
            vol: self.inner.vol,
            node: n.clone(),
            epoch,
        });
        let out = self.inner.data.read(self.inner.vol, n.ino, offset, end, attr.size, src).await?;
        Ok(Bytes::from(out))
    }

    /// Closes a handle (after a final flush); the last close anywhere of an unlinked file
    /// frees it.
    pub async fn release(&self, fh: u64) -> VfsResult<()> {
        let h = lock(&self.inner.handles).remove(&fh).ok_or(VfsError::from(Errno::EBADF))?;
        let mut res = Ok(());
        if matches!(h.kind, HandleKind::File) {
            res = self.flush_node(&h.node).await;
        }
        if h.node.opens.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut m = lock(&self.inner.inodes);
            if h.node.opens.load(Ordering::Acquire) == 0 && !h.node.has_dirty.load(Ordering::Acquire) {
                m.remove(&h.ino);
            }
        }
        if h.meta_ref {
            *lock(&self.inner.releases).entry((self.session(), h.ino)).or_default() += 1;
            self.inner.release_wake.notify_one();
        }
        res
    }

    /// `fallocate(2)` with the modes Linux file systems commonly support: allocate (extend
    /// the size unless `FALLOC_FL_KEEP_SIZE`), punch a hole, zero a range, collapse or
    /// insert a range.
    pub async fn fallocate(&self, fh: u64, offset: u64, len: u64, mode_: u32) -> VfsResult<()> {
        let h = self.live_handle(fh)?;
        if h.flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Errno::EBADF.into());
        }
        self.flush_node(&h.node).await?;
        let r = self.inner.meta.fallocate(self.inner.vol, h.ino, offset, len, mode_).await;
        h.node.invalidate();
        Ok(r?)
    }

    /// Copies `len` bytes by sharing the source's slices (no data is copied): the
    /// destination's chunk lists get pieces that point at the same slices. Returns the bytes
    /// copied (short at the source's end of file).
    pub async fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> VfsResult<u64> {
        let (hi, ho) = (self.handle(fh_in)?, self.handle(fh_out)?);
        if hi.flags & libc::O_ACCMODE == libc::O_WRONLY || ho.flags & libc::O_ACCMODE == libc::O_RDONLY {
            return Err(Errno::EBADF.into());
        }
        if ho.flags & libc::O_APPEND != 0 {
            return Err(Errno::EBADF.into());
        }
        if hi.ino == ho.ino && off_in < off_out.saturating_add(len) && off_out < off_in.saturating_add(len) {
            return Err(Errno::EINVAL.into());
        }
        self.flush_node(&hi.node).await?;
        self.flush_node(&ho.node).await?;
        let (meta, vol) = (&self.inner.meta, self.inner.vol);
        let size = self.attr_of(hi.ino).await?.size;
        if off_in >= size || len == 0 {
            return Ok(0);
        }
        let end = size.min(off_in.saturating_add(len));
        if off_out.checked_add(end - off_in).is_none_or(|e| e > elea_fsm::limits::FILE_SIZE_MAX) {
            return Err(Errno::EFBIG.into());
        }
        // Pieces of the source range: (source offset, length, slice or None for zeros).
        let mut pieces: Vec<(u64, u64, Option<Slice>)> = Vec::new();
        for chunk in chunks_touched(off_in, end) {
            let base = chunk * elea_common::CHUNK_SIZE;
            let mut sorted = meta.read_chunk(vol, hi.ino, chunk).await?;
            let (lo, hi_end) = (off_in.max(base), end.min(base + elea_common::CHUNK_SIZE));
            let mut at = lo;
            sorted.sort_by_key(|s| s.offset);
            for s in sorted {
                let ps = base + u64::from(s.offset);
                let pe = ps + u64::from(s.len);
                let (a, b) = (ps.max(lo), pe.min(hi_end));
                if a >= b {
                    continue;
                }
                if a > at {
                    pieces.push((at, a - at, None));
                }
                let piece = (s.id != 0).then(|| Slice {
                    slice_offset: s.slice_offset + (a - ps) as u32,
                    len: (b - a) as u32,
                    ..s
                });
                pieces.push((a, b - a, piece));
                at = b;
            }
            if at < hi_end {
                pieces.push((at, hi_end - at, None));
            }
        }
        for (src, plen, piece) in pieces {
            let dst = off_out + (src - off_in);
            match piece {
                None => {
                    meta.fallocate(vol, ho.ino, dst, plen, fallocate_flags::FALLOC_FL_ZERO_RANGE).await?;
                }
                Some(s) => {
                    // Split where the destination crosses a chunk boundary.
                    for p in chunk_pieces(dst, plen) {
                        let slice = Slice {
                            offset: p.in_chunk,
                            len: p.len as u32,
                            slice_offset: s.slice_offset + p.at as u32,
                            ..s
                        };
                        meta.write_slice(vol, ho.ino, p.chunk, slice, Vec::new()).await?;
                    }
                }
            }
        }
        ho.node.invalidate();
        Ok(end - off_in)
    }

    pub async fn opendir(&self, c: &Creds, ino: Ino) -> VfsResult<u64> {
        let a = self.attr_of(ino).await?;
        if !is_dir(&a) {
            return Err(Errno::ENOTDIR.into());
        }
        perm::check(c, &a, MAY_READ)?;
        Ok(self.new_handle(ino, libc::O_RDONLY, HandleKind::Dir, false))
    }

    /// Entries after `cookie` (0: from the start, with "." and ".."); each entry's cookie
    /// resumes right after it. With `plus`, entries carry attributes.
    pub async fn readdir(&self, fh: u64, cookie: u64, plus: bool) -> VfsResult<(Vec<DirEntry>, bool)> {
        let h = self.handle(fh)?;
        if !matches!(h.kind, HandleKind::Dir) {
            return Err(Errno::ENOTDIR.into());
        }
        let (mut entries, eof) =
            self.inner.meta.readdir(self.inner.vol, h.ino, cookie, READDIR_BATCH, plus).await?;
        for e in &mut entries {
            if let Some(a) = e.attr.take() {
                e.attr = Some(self.local_attr(a));
            }
        }
        Ok((entries, eof))
    }

    pub async fn releasedir(&self, fh: u64) -> VfsResult<()> {
        self.release(fh).await
    }
}
