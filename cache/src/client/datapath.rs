//! The data path a VFS drives: store a flush's bytes, commit them to metadata, read byte
//! ranges of files. [`DataPath`] is the seam; [`crate::DataClient`] is the real one (cache
//! nodes, object stores) and [`MemData`] an in-memory one for tests.
//!
//! A flush is two steps so that a failed commit never uploads the same bytes again:
//! [`DataPath::stage`] stores the bytes as new slices (durable on the volume's cache nodes),
//! and [`DataPath::commit`] records them in the file's chunk lists. A [`Staged`] flush whose
//! commit failed for a transient reason is committed again as it is.
//!
//! Reads take a [`ChunkSource`]: whoever owns the file's cached slice lists (the VFS) hands
//! it in, and the data path asks it for the ranges it reads and for the ranges it fetches
//! ahead of a sequential reader. Read-ahead is the data path's own business.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use elea_common::ids::CHUNK_SIZE;
use elea_common::layout::{chunk_pieces, chunks_touched};
use elea_common::{Ino, SliceId, VolumeId};
use elea_fsm::{Attr, Slice};
use elea_metadata::MetaApi;

use crate::BoxFut;
use crate::error::CacheError;

/// Slice lists of the chunks a range touches, each with its chunk index, oldest piece first.
pub type ChunkLists = Vec<(u64, Arc<Vec<Slice>>)>;

/// Where a read finds a file's slice lists.
pub trait ChunkSource: Send + Sync + 'static {
    /// The slice lists of every chunk that bytes `[from, to)` touch, in chunk order.
    fn chunks(&self, from: u64, to: u64) -> BoxFut<'_, Result<ChunkLists, CacheError>>;
}

/// A file's slice lists read from metadata every time (for tools without a cache of them).
pub struct MetaChunks<M> {
    pub meta: M,
    pub vol: VolumeId,
    pub ino: Ino,
}

impl<M: MetaApi> ChunkSource for MetaChunks<M> {
    fn chunks(&self, from: u64, to: u64) -> BoxFut<'_, Result<ChunkLists, CacheError>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for chunk in chunks_touched(from, to) {
                out.push((chunk, Arc::new(self.meta.read_chunk(self.vol, self.ino, chunk).await?)));
            }
            Ok(out)
        })
    }
}

/// One chunk's share of a flush: a new slice holding the chunk's pieces back to back.
#[derive(Debug, Clone)]
struct StagedChunk {
    chunk: u64,
    pieces: Vec<Slice>,
    /// The cache nodes holding each block of the slice.
    holders: Vec<Vec<u64>>,
    /// The slice's bytes when they travel in the commit instead ([`Op::WriteInline`]).
    ///
    /// [`Op::WriteInline`]: elea_fsm::Op::WriteInline
    inline: Option<Bytes>,
    committed: bool,
}

/// A flush's bytes, stored as slices but not (all) committed yet.
#[derive(Debug, Clone, Default)]
pub struct Staged {
    chunks: Vec<StagedChunk>,
    /// The newest attributes a chunk's commit returned, until a commit of the rest returns
    /// them.
    newest: Option<Attr>,
}

impl Staged {
    /// Whether every chunk is committed (or there was nothing to commit).
    pub fn is_committed(&self) -> bool {
        self.chunks.iter().all(|c| c.committed)
    }

    /// The end (file offset) of the last staged byte.
    pub fn end(&self) -> u64 {
        self.chunks
            .iter()
            .filter_map(|c| {
                c.pieces.last().map(|p| c.chunk * CHUNK_SIZE + u64::from(p.offset) + u64::from(p.len))
            })
            .max()
            .unwrap_or(0)
    }
}

/// One chunk's pieces of a flush: `(offset in chunk, bytes)`, in order.
pub type ChunkGroup = (u64, Vec<(u32, Bytes)>);

/// Cuts sorted, disjoint extents (`(file offset, bytes)`) into per-chunk groups of pieces
/// (`(offset in chunk, bytes)`), at most [`elea_fsm::limits::PIECES_MAX`] per group (a
/// chunk with more pieces gets several groups, in order).
pub fn group_by_chunk(extents: &[(u64, Bytes)]) -> Result<Vec<ChunkGroup>, CacheError> {
    let mut groups: Vec<ChunkGroup> = Vec::new();
    let mut last_end = 0u64;
    for (offset, data) in extents {
        if *offset < last_end {
            return Err(CacheError::Internal("extents overlap or are unsorted".into()));
        }
        last_end = offset + data.len() as u64;
        for p in chunk_pieces(*offset, data.len() as u64) {
            let piece = (p.in_chunk, data.slice(p.at as usize..(p.at + p.len) as usize));
            match groups.last_mut() {
                Some((c, g)) if *c == p.chunk && g.len() < elea_fsm::limits::PIECES_MAX => g.push(piece),
                _ => groups.push((p.chunk, vec![piece])),
            }
        }
    }
    Ok(groups)
}

/// Packs one chunk's pieces back to back into the bytes of slice `id`; returns the pieces as
/// the chunk list records them and the slice's bytes.
pub fn pack(id: SliceId, pieces: &[(u32, Bytes)]) -> (Vec<Slice>, Bytes) {
    if let [(in_chunk, b)] = pieces {
        // One piece (a sequential writer's flush): its bytes are the slice, no copy.
        let len = b.len() as u32;
        return (vec![Slice { id, offset: *in_chunk, len, slice_len: len, slice_offset: 0 }], b.clone());
    }
    let total: usize = pieces.iter().map(|(_, b)| b.len()).sum();
    let mut buf = BytesMut::with_capacity(total);
    let mut list = Vec::with_capacity(pieces.len());
    for (in_chunk, b) in pieces {
        list.push(Slice {
            id,
            offset: *in_chunk,
            len: b.len() as u32,
            slice_len: total as u32,
            slice_offset: buf.len() as u32,
        });
        buf.extend_from_slice(b);
    }
    (list, buf.freeze())
}

impl Staged {
    pub(crate) fn push(&mut self, chunk: u64, pieces: Vec<Slice>, holders: Vec<Vec<u64>>) {
        self.chunks.push(StagedChunk { chunk, pieces, holders, inline: None, committed: false });
    }

    /// A chunk whose slice (`bytes`) is committed inline: nothing is stored before the commit.
    pub(crate) fn push_inline(&mut self, chunk: u64, pieces: Vec<Slice>, bytes: Bytes) {
        self.chunks.push(StagedChunk {
            chunk,
            pieces,
            holders: Vec::new(),
            inline: Some(bytes),
            committed: false,
        });
    }

    /// The first chunk not committed yet, when it is inline: its slice id and bytes.
    pub(crate) fn next_inline(&self) -> Option<(u64, Bytes)> {
        let c = self.chunks.iter().find(|c| !c.committed)?;
        Some((c.pieces.first()?.id, c.inline.clone()?))
    }

    /// The first chunk not committed yet is stored on cache nodes after all (`holders`, per
    /// block): it is committed as a staged slice.
    pub(crate) fn staged_instead(&mut self, holders: Vec<Vec<u64>>) {
        if let Some(c) = self.chunks.iter_mut().find(|c| !c.committed) {
            c.holders = holders;
            c.inline = None;
        }
    }

    /// Commits every chunk not committed yet, in order, through `meta`; returns the newest
    /// attributes any chunk's commit returned since the last call that succeeded (`None`
    /// when nothing was left to commit). A chunk that commits stays committed when a later
    /// one fails.
    pub(crate) async fn commit_with<M: MetaApi>(
        &mut self,
        meta: &M,
        vol: VolumeId,
        ino: Ino,
    ) -> Result<Option<Attr>, CacheError> {
        for c in self.chunks.iter_mut().filter(|c| !c.committed) {
            let a = match &c.inline {
                Some(b) => meta.write_inline(vol, ino, c.chunk, c.pieces.clone(), b.to_vec()).await?,
                None => {
                    meta.write_slice_pieces(vol, ino, c.chunk, c.pieces.clone(), c.holders.clone()).await?
                }
            };
            c.committed = true;
            if self.newest.as_ref().is_none_or(|n| (a.size, a.ctime) >= (n.size, n.ctime)) {
                self.newest = Some(a);
            }
        }
        Ok(self.newest.take())
    }
}

/// See the module docs.
pub trait DataPath: Send + Sync + 'static {
    /// Stores sorted, disjoint extents of a file (`(offset, bytes)`) as new slices, one per
    /// chunk touched, each durable on the volume's replica count of cache nodes when this
    /// returns. Nothing is visible until [`DataPath::commit`].
    fn stage(
        &self,
        vol: VolumeId,
        extents: &[(u64, Bytes)],
    ) -> impl Future<Output = Result<Staged, CacheError>> + Send;

    /// Records what `staged` holds in the file's chunk lists, chunk by chunk (each chunk's
    /// commit is atomic; a failure leaves the chunks before it committed and `staged` says
    /// which). Returns the file's attributes after the last commit (`None`: nothing left).
    fn commit(
        &self,
        vol: VolumeId,
        ino: Ino,
        staged: &mut Staged,
    ) -> impl Future<Output = Result<Option<Attr>, CacheError>> + Send;

    /// Reads bytes `[offset, end)` of a file of `size` bytes (the caller clips `end` to the
    /// size); ranges no slice covers read as zeros. May fetch ahead of a sequential reader,
    /// asking `src` for the slice lists of what it fetches.
    fn read(
        &self,
        vol: VolumeId,
        ino: Ino,
        offset: u64,
        end: u64,
        size: u64,
        src: Arc<dyn ChunkSource>,
    ) -> impl Future<Output = Result<Vec<u8>, CacheError>> + Send;
}

/// The pieces of slices that hold bytes `[offset, end)` of a file, from its chunks' slice
/// lists, in list order (oldest first: where two overlap, the later one's bytes win).
pub(crate) fn wants(offset: u64, end: u64, chunks: &[(u64, Arc<Vec<Slice>>)]) -> Vec<Want> {
    let mut wants = Vec::new();
    for (chunk, slices) in chunks {
        let base = chunk * CHUNK_SIZE;
        for p in slices.iter().filter(|p| p.id != 0) {
            let ps = base + u64::from(p.offset);
            let pe = ps + u64::from(p.len);
            let (a, b) = (ps.max(offset), pe.min(end));
            if a >= b {
                continue;
            }
            wants.push(Want {
                slice: p.id,
                slice_len: p.slice_len,
                slice_off: u64::from(p.slice_offset) + (a - ps),
                len: (b - a) as usize,
                out_off: (a - offset) as usize,
            });
        }
    }
    wants
}

/// One piece of a read: bytes of a slice that land at `out_off` in the caller's buffer.
pub(crate) struct Want {
    pub slice: u64,
    pub slice_len: u32,
    pub slice_off: u64,
    pub len: usize,
    pub out_off: usize,
}

/// Makes a stage fail (for tests of the callers' failure paths).
pub type StageFault = Arc<dyn Fn() -> Option<CacheError> + Send + Sync>;

struct MemInner<M> {
    meta: M,
    slices: Mutex<HashMap<SliceId, Bytes>>,
    fault: Mutex<Option<StageFault>>,
    staged_bytes: std::sync::atomic::AtomicU64,
}

/// An in-memory data path: slices live in a map, commits go to `M`. Behaves like the real
/// one (same packing, same commit steps, same read planning) without cache nodes.
pub struct MemData<M> {
    inner: Arc<MemInner<M>>,
}

impl<M> Clone for MemData<M> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<M: MetaApi> MemData<M> {
    pub fn new(meta: M) -> Self {
        Self {
            inner: Arc::new(MemInner {
                meta,
                slices: Mutex::default(),
                fault: Mutex::default(),
                staged_bytes: Default::default(),
            }),
        }
    }

    /// From now on every stage asks `f` whether it fails, and with what (`None` clears it).
    pub fn set_fault(&self, f: Option<StageFault>) {
        *self.inner.fault.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// Bytes staged so far, committed or not (each upload counts: a retried commit that
    /// uploaded again would show here).
    pub fn staged_bytes(&self) -> u64 {
        self.inner.staged_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl<M: MetaApi> DataPath for MemData<M> {
    async fn stage(&self, _vol: VolumeId, extents: &[(u64, Bytes)]) -> Result<Staged, CacheError> {
        let fault = self.inner.fault.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(e) = fault.and_then(|f| f()) {
            return Err(e);
        }
        let mut staged = Staged::default();
        for (chunk, pieces) in group_by_chunk(extents)? {
            let id = self.inner.meta.alloc_slices(1).await?;
            let (list, bytes) = pack(id, &pieces);
            self.inner.staged_bytes.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.inner.slices.lock().unwrap_or_else(|p| p.into_inner()).insert(id, bytes);
            staged.push(chunk, list, Vec::new());
        }
        Ok(staged)
    }

    async fn commit(&self, vol: VolumeId, ino: Ino, staged: &mut Staged) -> Result<Option<Attr>, CacheError> {
        staged.commit_with(&self.inner.meta, vol, ino).await
    }

    async fn read(
        &self,
        _vol: VolumeId,
        _ino: Ino,
        offset: u64,
        end: u64,
        _size: u64,
        src: Arc<dyn ChunkSource>,
    ) -> Result<Vec<u8>, CacheError> {
        if end <= offset {
            return Ok(Vec::new());
        }
        let chunks = src.chunks(offset, end).await?;
        let mut out = vec![0u8; (end - offset) as usize];
        let slices = self.inner.slices.lock().unwrap_or_else(|p| p.into_inner());
        for w in wants(offset, end, &chunks) {
            let d = slices
                .get(&w.slice)
                .ok_or_else(|| CacheError::NotFound(format!("slice {} is not stored", w.slice)))?;
            let from = w.slice_off as usize;
            let bytes = d.get(from..from + w.len).ok_or_else(|| {
                CacheError::Checksum(format!("slice {} is shorter than its metadata says", w.slice))
            })?;
            out[w.out_off..w.out_off + w.len].copy_from_slice(bytes);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elea_common::ids::ROOT_INO;
    use elea_fsm::VolumeConfig;
    use elea_metadata::mem::MemMeta;

    #[test]
    fn extents_group_by_chunk_and_pack_back_to_back() {
        let a = Bytes::from_static(b"abc");
        let b = Bytes::from(vec![7u8; 10]);
        let at = CHUNK_SIZE - 4;
        let groups = group_by_chunk(&[(5, a.clone()), (at, b.clone())]).unwrap();
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, 0);
        assert_eq!(groups[0].1.len(), 2, "the extent's first 4 bytes join chunk 0");
        assert_eq!(groups[1], (1, vec![(0, b.slice(4..))]));
        let (list, bytes) = pack(9, &groups[0].1);
        assert_eq!(bytes.len(), 7);
        assert_eq!(list[1].slice_offset, 3);
        assert_eq!(list[1].offset, (CHUNK_SIZE - 4) as u32);
        assert!(list.iter().all(|p| p.slice_len == 7 && p.id == 9));
        assert!(group_by_chunk(&[(10, a.clone()), (11, a)]).is_err(), "overlapping extents");
    }

    #[tokio::test]
    async fn mem_data_stages_commits_and_reads_back() {
        let meta = MemMeta::new();
        let vol = meta.create_volume("v", VolumeConfig::default()).await.unwrap().id;
        let ino = meta.create(vol, ROOT_INO, b"f", 0o644).await.unwrap().ino;
        let d = MemData::new(meta.clone());
        let mut s = d.stage(vol, &[(2, Bytes::from_static(b"hello"))]).await.unwrap();
        assert!(!s.is_committed());
        let a = d.commit(vol, ino, &mut s).await.unwrap().unwrap();
        assert_eq!(a.size, 7);
        assert!(s.is_committed());
        assert_eq!(d.commit(vol, ino, &mut s).await.unwrap(), None, "nothing left to commit");
        let src = Arc::new(MetaChunks { meta, vol, ino });
        assert_eq!(d.read(vol, ino, 0, 7, 7, src).await.unwrap(), b"\0\0hello");
    }
}
