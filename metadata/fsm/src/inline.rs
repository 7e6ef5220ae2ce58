//! Inline slices: small writes whose bytes travel inside the metadata commit.
//!
//! A small flush (a database's log write before its fsync, a small file's whole content) is
//! one durable round trip this way: the Raft log holds the bytes once a majority has them,
//! which is at least as strong as `R` staged copies plus the commit that records them. The
//! state keeps the bytes until a cache node's spill worker has staged them like any other
//! slice and recorded where ([`crate::Op::SpillInline`]); from then on the slice is an
//! ordinary one. An inline slice's location lists one block with no holder and no store, so
//! the data path's workers (tiering, repair) leave it alone until it is spilled.
//!
//! The bytes held are bounded ([`limits::INLINE_TOTAL_MAX`]): past it a write is refused
//! with `EAGAIN` and the writer stages its slice instead. Forgetting a slice (garbage
//! collection, after the usual delay) drops its bytes.

use std::collections::BTreeMap;
use std::ops::Bound;

use elea_common::{Errno, Ino, SliceId, Timespec, VolumeId};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::changes::Changes;
use crate::state::State;
use crate::types::{BlockLoc, InlineSlice, OpResult, Reply, Slice, SliceData, SliceLoc, limits};

/// The bytes of inline slices, by slice id, and their total.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "BTreeMap<SliceId, ByteBuf>")]
pub(crate) struct InlineTable {
    data: BTreeMap<SliceId, ByteBuf>,
    #[serde(skip)]
    bytes: u64,
}

impl From<BTreeMap<SliceId, ByteBuf>> for InlineTable {
    fn from(data: BTreeMap<SliceId, ByteBuf>) -> Self {
        let bytes = data.values().map(|d| d.len() as u64).sum();
        Self { data, bytes }
    }
}

impl InlineTable {
    pub(crate) fn get(&self, id: SliceId) -> Option<&[u8]> {
        self.data.get(&id).map(|d| d.as_slice())
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    fn insert(&mut self, id: SliceId, data: &[u8]) {
        self.bytes += data.len() as u64;
        if let Some(old) = self.data.insert(id, ByteBuf::from(data.to_vec())) {
            self.bytes -= old.len() as u64;
        }
    }

    pub(crate) fn remove(&mut self, id: SliceId) {
        if let Some(old) = self.data.remove(&id) {
            self.bytes -= old.len() as u64;
        }
    }
}

impl State {
    /// [`crate::Op::WriteInline`]: the checks of a staged write, plus: `data` is the whole
    /// slice, no longer than [`limits::INLINE_MAX`], under a slice id never used before.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_inline(
        &mut self,
        vol: VolumeId,
        ino: Ino,
        chunk: u64,
        pieces: &[Slice],
        data: &[u8],
        now: Timespec,
        ch: &mut Changes,
    ) -> OpResult {
        let checked = self.check_pieces(vol, ino, chunk, pieces)?;
        let s = pieces[0];
        if data.len() != s.slice_len as usize || s.slice_len == 0 || s.slice_len > limits::INLINE_MAX {
            return Err(Errno::EINVAL);
        }
        let t = &self.slices;
        if t.locs.contains_key(&s.id) || t.refs.contains_key(&s.id) || t.to_delete.contains_key(&s.id) {
            return Err(Errno::EINVAL);
        }
        if self.inline.bytes() + data.len() as u64 > limits::INLINE_TOTAL_MAX {
            return Err(Errno::EAGAIN);
        }
        self.slices.locs.insert(
            s.id,
            SliceLoc {
                vol,
                len: s.slice_len,
                created: now,
                deleted: None,
                blocks: vec![BlockLoc { nodes: Vec::new(), tiered: None }],
            },
        );
        self.inline.insert(s.id, data);
        self.apply_pieces(vol, ino, chunk, pieces, checked, now, ch)
    }

    /// [`crate::Op::SpillInline`]: every node list is checked before anything changes.
    pub(crate) fn spill_inline(&mut self, slices: &[(SliceId, Vec<u64>)]) -> OpResult {
        if slices.is_empty() || slices.len() > limits::BATCH_MAX {
            return Err(Errno::EINVAL);
        }
        for (_, nodes) in slices {
            if nodes.is_empty() || nodes.len() > usize::from(limits::REPLICAS_MAX) {
                return Err(Errno::EINVAL);
            }
            for (i, n) in nodes.iter().enumerate() {
                if !self.cache_nodes.contains_key(n) || nodes[..i].contains(n) {
                    return Err(Errno::EINVAL);
                }
            }
        }
        for (id, nodes) in slices {
            if self.inline.get(*id).is_none() {
                continue;
            }
            if let Some(b) = self.slices.locs.get_mut(id).and_then(|l| l.blocks.first_mut()) {
                b.nodes = nodes.clone();
            }
            self.inline.remove(*id);
        }
        Ok(Reply::Ok)
    }

    /// Whether `slice` is inline (its block has no copy anywhere but in this state).
    pub(crate) fn is_inline(&self, slice: SliceId) -> bool {
        self.inline.get(slice).is_some()
    }

    pub(crate) fn slice_data(&self, ids: &[SliceId]) -> OpResult {
        if ids.is_empty() || ids.len() > limits::BATCH_MAX {
            return Err(Errno::EINVAL);
        }
        Ok(Reply::SliceData(
            ids.iter()
                .map(|id| SliceData {
                    id: *id,
                    loc: self.slices.locs.get(id).cloned(),
                    inline: self.inline.get(*id).map(<[u8]>::to_vec),
                })
                .collect(),
        ))
    }

    pub(crate) fn inline_slices(&self, after: SliceId, limit: u32) -> OpResult {
        let limit = (limit as usize).clamp(1, limits::BATCH_MAX);
        let budget = limits::INLINE_TOTAL_MAX / 16;
        let (mut out, mut bytes) = (Vec::new(), 0u64);
        for (id, d) in self.inline.data.range((Bound::Excluded(after), Bound::Unbounded)) {
            let Some(l) = self.slices.locs.get(id).filter(|l| l.deleted.is_none()) else { continue };
            if out.len() == limit || (bytes > 0 && bytes + d.len() as u64 > budget) {
                return Ok(Reply::Inline { slices: out, more: true });
            }
            bytes += d.len() as u64;
            out.push(InlineSlice { vol: l.vol, slice: *id, created: l.created, data: d.to_vec() });
        }
        Ok(Reply::Inline { slices: out, more: false })
    }
}
