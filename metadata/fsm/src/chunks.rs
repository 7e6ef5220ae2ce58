//! File data layout: per-chunk slice lists, writes (newest wins), truncation, fallocate, and
//! the slice reference counts that decide when a slice's data becomes garbage.
//!
//! Invariant: the pieces of one chunk's list never overlap. A new piece trims or drops every
//! older piece it covers, so the list stays bounded and "newest wins" holds exactly.
//!
//! Reference counts are per piece: every piece in a list holds one reference to its slice, so
//! whatever splits, moves or drops pieces adds and drops exactly one reference per piece it
//! creates or removes. A slice whose count reaches zero is queued for garbage collection.

use std::collections::BTreeMap;

use elea_common::ids::CHUNK_SIZE;
use elea_common::{Errno, Ino, Timespec, VolumeId};

use crate::changes::Changes;
use crate::state::{Chunks, SliceTable, State};
use crate::types::{OpResult, Reply, Slice, fallocate_flags, limits};

type R<T> = Result<T, Errno>;

/// `st_blocks` of regular file `ino` of `size` bytes: the bytes below `size` that pieces of
/// written slices cover, counted once where pieces overlap, rounded up to whole file system
/// blocks, in 512-byte units.
///
/// Computed from the chunk lists on every call rather than kept in the inode, so no write,
/// truncation or fallocate path has to keep a second count in step with the lists. The cost
/// is one pass over the file's pieces.
pub(crate) fn allocated_blocks(chunks: &Chunks, ino: Ino, size: u64) -> u64 {
    let mut bytes = 0u64;
    for ((_, c), list) in chunks.range((ino, 0)..(ino, size.div_ceil(CHUNK_SIZE))) {
        // The range ends at the chunk holding `size`, so `base < size`.
        let base = c.saturating_mul(CHUNK_SIZE);
        let limit = size.saturating_sub(base).min(CHUNK_SIZE);
        // No write, truncation or fallocate leaves two pieces of a list overlapping (each
        // trims what it covers, see `write_piece`), so their union is their sum: one pass,
        // no sort. This runs for every attribute reply, and a file written in small random
        // pieces has thousands per chunk.
        bytes += list
            .iter()
            .filter(|p| p.id != 0)
            .map(|p| {
                let s = u64::from(p.offset);
                (s + u64::from(p.len)).min(limit).saturating_sub(s)
            })
            .sum::<u64>();
    }
    bytes.div_ceil(limits::FS_BLOCK_SIZE) * (limits::FS_BLOCK_SIZE / 512)
}

/// Add `new` to a chunk's list: older pieces it overlaps are trimmed, split or dropped.
///
/// In place: a file written in small random pieces has thousands per chunk, and this runs
/// for every write committed to it. The pieces it keeps move down over the ones it drops (no
/// new list), and a write that overlaps nothing only appends.
pub(crate) fn write_piece(list: &mut Vec<Slice>, new: Slice, table: &mut SliceTable) {
    let ns = u64::from(new.offset);
    let ne = ns + u64::from(new.len);
    let overlaps = |p: &Slice| {
        let ps = u64::from(p.offset);
        ps < ne && ps + u64::from(p.len) > ns
    };
    if let Some(first) = list.iter().position(overlaps) {
        // Kept pieces are written at `w`, in their order; a piece split in two (`new` lies
        // strictly inside it, so it is the only one `new` overlaps) gets its right part
        // inserted after its left part once the pass is done.
        let mut w = first;
        let mut split: Option<(usize, Slice)> = None;
        for r in first..list.len() {
            let p = list[r];
            let ps = u64::from(p.offset);
            let pe = ps + u64::from(p.len);
            if pe <= ns || ps >= ne {
                list[w] = p;
                w += 1;
                continue;
            }
            let left = (ps < ns).then(|| Slice { len: (ns - ps) as u32, ..p });
            let right = (pe > ne).then(|| {
                let skip = (ne - ps) as u32;
                Slice {
                    offset: ne as u32,
                    len: (pe - ne) as u32,
                    slice_offset: p.slice_offset.saturating_add(skip),
                    ..p
                }
            });
            match (left, right) {
                (None, None) => table.drop_ref(p.id),
                (Some(l), None) => {
                    list[w] = l;
                    w += 1;
                }
                (None, Some(rp)) => {
                    list[w] = rp;
                    w += 1;
                }
                (Some(l), Some(rp)) => {
                    list[w] = l;
                    w += 1;
                    split = Some((w, rp));
                    table.add_ref(p.id);
                }
            }
        }
        list.truncate(w);
        if let Some((at, rp)) = split {
            list.insert(at, rp);
        }
    }
    table.add_ref(new.id);
    list.push(new);
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
        let checked = self.check_pieces(vol, ino, chunk, pieces)?;
        let id = pieces[0].id;
        if self.is_inline(id) && !self.slices.refs.contains_key(&id) {
            // An inline slice whose last piece went: its bytes are about to go, so it takes
            // no new pieces. (A live one may: a copy of a range shares its slices.)
            return Err(Errno::EINVAL);
        }
        self.check_staged(vol, &pieces[0], staged)?;
        self.record_loc(vol, &pieces[0], staged, now);
        self.apply_pieces(vol, ino, chunk, pieces, checked, now, ch)
    }

    /// Checks a write of `pieces` of one slice into chunk `chunk` of regular file `ino`:
    /// one slice id (not a hole), each piece inside the chunk and the slice, sorted and
    /// disjoint, at most [`limits::PIECES_MAX`], the file no larger than the limit. Returns
    /// the file's size before and after.
    pub(crate) fn check_pieces(
        &self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        pieces: &[Slice],
    ) -> R<(u64, u64)> {
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
                || !self.groups.owns_slice(p.id)
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
        Ok((old_size, old_size.max(end)))
    }

    /// Applies pieces [`State::check_pieces`] passed (`sizes`: what it returned).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_pieces(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        pieces: &[Slice],
        (old_size, new_size): (u64, u64),
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let State { volumes, slices, .. } = self;
        let v = volumes.get_mut(&vol).ok_or(Errno::ENODEV)?;
        let list = v.chunks.entry((ino, chunk)).or_default();
        match pieces {
            [one] => write_piece(list, *one, slices),
            many => write_pieces(list, many, slices),
        }
        v.account_size(old_size, new_size);
        let i = v.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        i.size = new_size;
        i.mtime = now;
        i.ctime = now;
        ch.inode(vol, ino);
        Ok(Reply::Attr(v.attr(ino)?))
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
        use fallocate_flags::{
            FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
            FALLOC_FL_ZERO_RANGE,
        };
        self.vol(vol)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let shift = mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE);
        if shift != 0 {
            // The shifting modes take no other flag, each other included (fallocate(2)).
            if mode != FALLOC_FL_COLLAPSE_RANGE && mode != FALLOC_FL_INSERT_RANGE {
                return Err(Errno::EINVAL);
            }
            return self.shift_range(vol, ino, offset, len, mode == FALLOC_FL_COLLAPSE_RANGE, now, ch);
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
        self.set_data_size(vol, ino, old_size, new_size, now, ch)
    }

    /// `FALLOC_FL_COLLAPSE_RANGE` (`collapse`) or `FALLOC_FL_INSERT_RANGE`, with ext4's checks:
    /// block-aligned offset and length, a collapsed range that ends before the end of the file,
    /// an insertion point inside the file.
    #[allow(clippy::too_many_arguments)]
    fn shift_range(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        len: u64,
        collapse: bool,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let old_size = self.regular(vol, ino, Errno::ENODEV)?;
        let end = offset.checked_add(len).filter(|e| *e <= limits::FILE_SIZE_MAX).ok_or(Errno::EFBIG)?;
        if !offset.is_multiple_of(limits::FS_BLOCK_SIZE) || !len.is_multiple_of(limits::FS_BLOCK_SIZE) {
            return Err(Errno::EINVAL);
        }
        let new_size = if collapse {
            if end >= old_size {
                return Err(Errno::EINVAL);
            }
            old_size - len
        } else {
            let grown =
                old_size.checked_add(len).filter(|s| *s <= limits::FILE_SIZE_MAX).ok_or(Errno::EFBIG)?;
            if offset >= old_size {
                return Err(Errno::EINVAL);
            }
            grown
        };
        self.shift_chunks(vol, ino, offset, len, old_size, collapse);
        self.set_data_size(vol, ino, old_size, new_size, now, ch)
    }

    /// The end of a data-changing fallocate: the new size, mtime and ctime, the change event.
    fn set_data_size(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        old_size: u64,
        new_size: u64,
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let v = self.vol_mut(vol)?;
        v.account_size(old_size, new_size);
        let i = v.inodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        i.size = new_size;
        i.mtime = now;
        i.ctime = now;
        ch.inode(vol, ino);
        Ok(Reply::Attr(v.attr(ino)?))
    }

    /// Move the data of `ino` for a collapse (remove `[offset, offset + len)`, everything after
    /// it moves down by `len`) or an insert (everything at or after `offset` moves up by
    /// `len`). Every chunk list from the one holding `offset` to the end is rebuilt: a piece
    /// keeps its slice and the offset into it, and is split where a chunk boundary now falls
    /// inside it. Within a rebuilt list the pieces keep their relative order (oldest first), so
    /// newest-wins reads are unchanged. Data at or past `size` (the old size) is dropped.
    fn shift_chunks(&mut self, vol: VolumeId, ino: Ino, offset: u64, len: u64, size: u64, collapse: bool) {
        let State { volumes, slices, .. } = self;
        let Some(v) = volumes.get_mut(&vol) else {
            return;
        };
        let first = offset / CHUNK_SIZE;
        let keys: Vec<u64> = v.chunks.range((ino, first)..=(ino, u64::MAX)).map(|(k, _)| k.1).collect();
        let old: Vec<(u64, Vec<Slice>)> =
            keys.into_iter().filter_map(|c| v.chunks.remove(&(ino, c)).map(|l| (c, l))).collect();
        let mut new: BTreeMap<u64, Vec<Slice>> = BTreeMap::new();
        for (c, list) in &old {
            let base = c.saturating_mul(CHUNK_SIZE);
            for p in list {
                let ps = base.saturating_add(u64::from(p.offset));
                let pe = ps.saturating_add(u64::from(p.len)).min(size);
                // The part before `offset` stays where it is.
                let stay_end = pe.min(offset);
                if ps < stay_end {
                    place(&mut new, p, 0, stay_end - ps, ps);
                }
                // The part after the collapsed range, or at and after the insertion point,
                // moves. It ends before `size`, so it lands before the new size.
                let from = if collapse { ps.max(offset + len) } else { ps.max(offset) };
                if from < pe {
                    let to = if collapse { from - len } else { from + len };
                    place(&mut new, p, from - ps, pe - from, to);
                }
            }
        }
        // References for the new pieces first, so a slice that only moves is never queued.
        for p in new.values().flatten() {
            slices.add_ref(p.id);
        }
        for p in old.iter().flat_map(|(_, l)| l) {
            slices.drop_ref(p.id);
        }
        for (c, list) in new {
            v.chunks.insert((ino, c), list);
        }
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

/// Add the part of piece `p` that starts `skip` bytes into it and is `len` bytes long to the
/// new lists, at file offset `to`, split at chunk boundaries.
fn place(new: &mut BTreeMap<u64, Vec<Slice>>, p: &Slice, skip: u64, len: u64, to: u64) {
    let mut done = 0u64;
    while done < len {
        let at = to + done;
        let in_chunk = at % CHUNK_SIZE;
        let n = (CHUNK_SIZE - in_chunk).min(len - done);
        // Parts of a piece are no longer than the piece, whose offset and length are u32.
        let piece = Slice {
            offset: in_chunk as u32,
            len: n as u32,
            slice_offset: p.slice_offset.saturating_add((skip + done) as u32),
            ..*p
        };
        new.entry(at / CHUNK_SIZE).or_default().push(piece);
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(id: u64, offset: u32, len: u32) -> Slice {
        Slice { id, offset, len, slice_len: len, slice_offset: 0 }
    }

    /// Lists as writes leave them: pieces in write order (not sorted), never overlapping.
    #[test]
    fn allocated_blocks_count_the_pieces_below_the_size() {
        let mut chunks = Chunks::new();
        chunks.insert((7, 0), vec![piece(2, 4096, 8192), piece(1, 0, 4096), piece(0, 20000, 100)]);
        chunks.insert((7, 2), vec![piece(3, 105, 10), piece(3, 100, 5)]);
        chunks.insert((8, 0), vec![piece(4, 0, 1 << 20)]);
        // [0, 12288) in chunk 0 (the id-0 piece is a hole), [100, 115) in chunk 2.
        assert_eq!(allocated_blocks(&chunks, 7, 3 * CHUNK_SIZE), (3 + 1) * 8);
        assert_eq!(allocated_blocks(&chunks, 7, 2 * CHUNK_SIZE + 101), (3 + 1) * 8);
        assert_eq!(allocated_blocks(&chunks, 7, 2 * CHUNK_SIZE + 100), 3 * 8);
        assert_eq!(allocated_blocks(&chunks, 7, 4097), 2 * 8);
        assert_eq!(allocated_blocks(&chunks, 7, 0), 0);
        assert_eq!(allocated_blocks(&chunks, 9, u64::MAX), 0);
    }
}
