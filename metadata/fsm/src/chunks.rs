//! File data layout: per-chunk slice lists, writes (newest wins), truncation, fallocate, and
//! the slice reference counts that decide when a slice's data becomes garbage.
//!
//! Invariant: the pieces of one chunk's list never overlap. A new piece trims or drops every
//! older piece it covers, so the list stays bounded and "newest wins" holds exactly.

use elea_common::ids::CHUNK_SIZE;
use elea_common::{Errno, Ino, Timespec, VolumeId};

use crate::changes::Changes;
use crate::state::{SliceTable, State};
use crate::types::{OpResult, Reply, Slice, fallocate_flags, limits};

type R<T> = Result<T, Errno>;

/// Add `new` to a chunk's list: older pieces it overlaps are trimmed, split or dropped.
pub(crate) fn write_piece(list: &mut Vec<Slice>, new: Slice, table: &mut SliceTable) {
    let ns = u64::from(new.offset);
    let ne = ns + u64::from(new.len);
    let mut out = Vec::with_capacity(list.len() + 2);
    for p in list.drain(..) {
        let ps = u64::from(p.offset);
        let pe = ps + u64::from(p.len);
        if pe <= ns || ps >= ne {
            out.push(p);
            continue;
        }
        let mut kept = 0u32;
        if ps < ns {
            // Left part survives.
            out.push(Slice { len: (ns - ps) as u32, ..p });
            kept += 1;
        }
        if pe > ne {
            // Right part survives.
            let skip = (ne - ps) as u32;
            out.push(Slice {
                offset: ne as u32,
                len: (pe - ne) as u32,
                slice_offset: p.slice_offset.saturating_add(skip),
                ..p
            });
            kept += 1;
        }
        match kept {
            0 => table.drop_ref(p.id),
            2 => table.add_ref(p.id),
            _ => {}
        }
    }
    table.add_ref(new.id);
    out.push(new);
    *list = out;
}

/// Add many new pieces at once: `new` is sorted by offset and its pieces do not overlap. The
/// same result as [`write_piece`] for each in turn, in one pass over the list: O((n + k) log k)
/// rather than O(n k) for n old and k new pieces.
pub(crate) fn write_pieces(list: &mut Vec<Slice>, new: &[Slice], table: &mut SliceTable) {
    let mut out = Vec::with_capacity(list.len() + new.len());
    for p in list.drain(..) {
        let ps = u64::from(p.offset);
        let pe = ps + u64::from(p.len);
        // The first new piece that ends after `ps`.
        let mut i = new.partition_point(|n| u64::from(n.offset) + u64::from(n.len) <= ps);
        let mut at = ps;
        let mut kept = 0u32;
        while at < pe {
            let Some(n) = new.get(i).filter(|n| u64::from(n.offset) < pe) else {
                break;
            };
            let ns = u64::from(n.offset);
            if ns > at {
                out.push(Slice {
                    offset: at as u32,
                    len: (ns - at) as u32,
                    slice_offset: p.slice_offset.saturating_add((at - ps) as u32),
                    ..p
                });
                kept += 1;
            }
            at = at.max(ns + u64::from(n.len));
            i += 1;
        }
        if at < pe {
            out.push(Slice {
                offset: at as u32,
                len: (pe - at) as u32,
                slice_offset: p.slice_offset.saturating_add((at - ps) as u32),
                ..p
            });
            kept += 1;
        }
        match kept {
            0 => table.drop_ref(p.id),
            k => {
                for _ in 1..k {
                    table.add_ref(p.id);
                }
            }
        }
    }
    for n in new {
        table.add_ref(n.id);
        out.push(*n);
    }
    *list = out;
}

/// Keep only bytes `[0, cut)` of a chunk's list.
fn cut_pieces(list: &mut Vec<Slice>, cut: u64, table: &mut SliceTable) {
    let mut out = Vec::with_capacity(list.len());
    for p in list.drain(..) {
        let ps = u64::from(p.offset);
        let pe = ps + u64::from(p.len);
        if ps >= cut {
            table.drop_ref(p.id);
        } else if pe > cut {
            out.push(Slice { len: (cut - ps) as u32, ..p });
        } else {
            out.push(p);
        }
    }
    *list = out;
}

impl State {
    /// Drop the data of `ino` beyond `size` (chunks wholly past it; pieces past it in the
    /// boundary chunk), so that growing the file later reads zeros there.
    pub(crate) fn truncate_chunks(&mut self, vol: VolumeId, ino: Ino, size: u64) {
        let State { volumes, slices, .. } = self;
        let Some(v) = volumes.get_mut(&vol) else {
            return;
        };
        let first_gone = size.div_ceil(CHUNK_SIZE);
        let gone: Vec<(Ino, u64)> =
            v.chunks.range((ino, first_gone)..=(ino, u64::MAX)).map(|(k, _)| *k).collect();
        for k in gone {
            if let Some(list) = v.chunks.remove(&k) {
                for p in list {
                    slices.drop_ref(p.id);
                }
            }
        }
        let cut = size % CHUNK_SIZE;
        if cut != 0 {
            let key = (ino, size / CHUNK_SIZE);
            if let Some(list) = v.chunks.get_mut(&key) {
                cut_pieces(list, cut, slices);
                if list.is_empty() {
                    v.chunks.remove(&key);
                }
            }
        }
    }

    /// Drop every chunk of `ino` (the inode is being freed).
    pub(crate) fn drop_all_chunks(&mut self, vol: VolumeId, ino: Ino) {
        self.truncate_chunks(vol, ino, 0);
    }

    /// Check that `ino` is a regular file; `EISDIR` for directories, `other` for the rest.
    fn regular(&self, vol: VolumeId, ino: Ino, other: Errno) -> R<u64> {
        let i = self.vol(vol)?.inode(ino)?;
        if i.is_dir() {
            return Err(Errno::EISDIR);
        }
        if !i.is_reg() {
            return Err(other);
        }
        Ok(i.size)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_slice(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        slice: &Slice,
        staged: &[Vec<u64>],
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        self.write_slice_pieces(vol, ino, chunk, std::slice::from_ref(slice), staged, now, ch)
    }

    /// [`crate::Op::WriteSlicePieces`] (and `WriteSlice`, one piece): every piece is checked
    /// before any is applied.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_slice_pieces(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        pieces: &[Slice],
        staged: &[Vec<u64>],
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let old_size = self.regular(vol, ino, Errno::EINVAL)?;
        let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else {
            return Err(Errno::EINVAL);
        };
        if pieces.len() > limits::PIECES_MAX {
            return Err(Errno::EINVAL);
        }
        let mut prev_end = 0u64;
        for (i, p) in pieces.iter().enumerate() {
            let off = u64::from(p.offset);
            let len = u64::from(p.len);
            let bad = p.id == 0
                || p.id != first.id
                || p.slice_len != first.slice_len
                || len == 0
                || off + len > CHUNK_SIZE
                || u64::from(p.slice_offset) + len > u64::from(p.slice_len)
                || (i > 0 && off < prev_end);
            if bad {
                return Err(Errno::EINVAL);
            }
            prev_end = off + len;
        }
        let end = chunk
            .checked_mul(CHUNK_SIZE)
            .and_then(|b| b.checked_add(u64::from(last.offset) + u64::from(last.len)))
            .filter(|e| *e <= limits::FILE_SIZE_MAX)
            .ok_or(Errno::EFBIG)?;
        self.check_staged(vol, first, staged)?;
        self.record_loc(vol, first, staged, now);
        let State { volumes, slices, .. } = self;
        let v = volumes.get_mut(&vol).ok_or(Errno::ENODEV)?;
        let list = v.chunks.entry((ino, chunk)).or_default();
        match pieces {
            [one] => write_piece(list, *one, slices),
            many => write_pieces(list, many, slices),
        }
        let new_size = old_size.max(end);
        v.account_size(old_size, new_size);
        let i = v.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        i.size = new_size;
        i.mtime = now;
        i.ctime = now;
        ch.inode(vol, ino);
        Ok(Reply::Attr(i.attr(ino)))
    }

    pub(crate) fn read_chunk(&self, vol: VolumeId, ino: Ino, chunk: u64) -> OpResult {
        let v = self.vol(vol)?;
        if !v.inode(ino)?.is_reg() {
            return Err(Errno::EINVAL);
        }
        Ok(Reply::Slices(v.chunks.get(&(ino, chunk)).cloned().unwrap_or_default()))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fallocate(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        len: u64,
        mode: u32,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        use fallocate_flags::{FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
        self.vol(vol)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE) != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        let punch = mode & FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & FALLOC_FL_ZERO_RANGE != 0;
        let keep = mode & FALLOC_FL_KEEP_SIZE != 0;
        if punch && (!keep || zero) {
            return Err(Errno::EOPNOTSUPP);
        }
        let old_size = self.regular(vol, ino, Errno::ENODEV)?;
        let end = offset.checked_add(len).filter(|e| *e <= limits::FILE_SIZE_MAX).ok_or(Errno::EFBIG)?;
        let new_size = if keep || punch { old_size } else { old_size.max(end) };
        if punch || zero {
            // Holes over the range, clipped to the size the file will have. Chunks holding no
            // data already read as zeros, so only existing chunk lists get hole pieces.
            let hole_end = end.min(new_size);
            if offset < hole_end {
                self.punch(vol, ino, offset, hole_end);
            }
        }
        let v = self.vol_mut(vol)?;
        v.account_size(old_size, new_size);
        let i = v.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        i.size = new_size;
        i.mtime = now;
        i.ctime = now;
        ch.inode(vol, ino);
        Ok(Reply::Attr(i.attr(ino)))
    }

    /// Record hole pieces over `[start, end)` in every existing chunk list of the range.
    fn punch(&mut self, vol: VolumeId, ino: Ino, start: u64, end: u64) {
        let State { volumes, slices, .. } = self;
        let Some(v) = volumes.get_mut(&vol) else {
            return;
        };
        let first = start / CHUNK_SIZE;
        let last = (end - 1) / CHUNK_SIZE;
        let keys: Vec<(Ino, u64)> = v.chunks.range((ino, first)..=(ino, last)).map(|(k, _)| *k).collect();
        for key in keys {
            let base = key.1 * CHUNK_SIZE;
            let s = start.max(base) - base;
            let e = end.min(base + CHUNK_SIZE) - base;
            if let Some(list) = v.chunks.get_mut(&key) {
                let len = (e - s) as u32;
                let hole = Slice { id: 0, offset: s as u32, len, slice_len: len, slice_offset: 0 };
                write_piece(list, hole, slices);
            }
        }
    }
}
