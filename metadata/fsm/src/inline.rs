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
//! The bytes of live inline slices are bounded ([`limits::INLINE_TOTAL_MAX`]): past it a
//! write is refused with `EAGAIN` and the writer stages its slice instead. When the last piece
//! of an inline slice goes (overwritten, truncated, its file deleted: a database rewrites the
//! same log page at every commit), its bytes stay readable for a short while only
//! ([`INLINE_DEAD_MS`], at most [`INLINE_DEAD_MAX`] bytes of them, oldest dropped first), for
//! readers that resolved a chunk list just before the change; they do not count against the
//! bound.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use elea_common::{Errno, Ino, SliceId, Timespec, VolumeId};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::changes::Changes;
use crate::data::millis_between;
use crate::state::State;
use crate::types::{BlockLoc, InlineSlice, OpResult, Reply, Slice, SliceData, SliceLoc, StoreSet, limits};

/// How long the bytes of an inline slice no piece references any more stay readable.
pub const INLINE_DEAD_MS: u64 = 5_000;
/// Most bytes of such slices kept.
pub const INLINE_DEAD_MAX: u64 = 16 << 20;

/// The table as snapshots hold it.
#[derive(Deserialize)]
struct Stored {
    live: BTreeMap<SliceId, ByteBuf>,
    dead: BTreeMap<SliceId, (Timespec, ByteBuf)>,
}

/// The bytes of inline slices, live (referenced) and dead (no piece left), with their totals
/// and the dead ones in the order they died.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "Stored")]
pub(crate) struct InlineTable {
    live: BTreeMap<SliceId, ByteBuf>,
    dead: BTreeMap<SliceId, (Timespec, ByteBuf)>,
    #[serde(skip)]
    live_bytes: u64,
    #[serde(skip)]
    dead_bytes: u64,
    #[serde(skip)]
    dead_order: BTreeSet<(Timespec, SliceId)>,
}

impl From<Stored> for InlineTable {
    fn from(s: Stored) -> Self {
        Self {
            live_bytes: s.live.values().map(|d| d.len() as u64).sum(),
            dead_bytes: s.dead.values().map(|(_, d)| d.len() as u64).sum(),
            dead_order: s.dead.iter().map(|(id, (t, _))| (*t, *id)).collect(),
            live: s.live,
            dead: s.dead,
        }
    }
}

impl InlineTable {
    /// The bytes of an inline slice, live or dead.
    pub(crate) fn get(&self, id: SliceId) -> Option<&[u8]> {
        self.live.get(&id).or_else(|| self.dead.get(&id).map(|(_, d)| d)).map(|d| d.as_slice())
    }

    pub(crate) fn is_live(&self, id: SliceId) -> bool {
        self.live.contains_key(&id)
    }

    fn insert(&mut self, id: SliceId, data: &[u8]) {
        self.live_bytes += data.len() as u64;
        if let Some(old) = self.live.insert(id, ByteBuf::from(data.to_vec())) {
            self.live_bytes -= old.len() as u64;
        }
    }

    /// Drops a slice's bytes, live or dead.
    pub(crate) fn remove(&mut self, id: SliceId) {
        if let Some(old) = self.live.remove(&id) {
            self.live_bytes -= old.len() as u64;
        }
        if let Some((t, old)) = self.dead.remove(&id) {
            self.dead_bytes -= old.len() as u64;
            self.dead_order.remove(&(t, id));
        }
    }

    /// A live slice lost its last piece at `now`.
    fn kill(&mut self, id: SliceId, now: Timespec) {
        if let Some(d) = self.live.remove(&id) {
            self.live_bytes -= d.len() as u64;
            self.dead_bytes += d.len() as u64;
            self.dead_order.insert((now, id));
            self.dead.insert(id, (now, d));
        }
    }

    /// Drops the dead slices' bytes that are older than [`INLINE_DEAD_MS`] at `now`, and the
    /// oldest ones while they hold more than [`INLINE_DEAD_MAX`].
    fn expire(&mut self, now: Timespec) {
        while let Some(&(t, id)) = self.dead_order.first() {
            if self.dead_bytes <= INLINE_DEAD_MAX && millis_between(t, now) < INLINE_DEAD_MS {
                break;
            }
            self.remove(id);
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
        let known =
            t.locs.contains_key(&s.id) || t.refs.contains_key(&s.id) || t.to_delete.contains_key(&s.id);
        if known || self.inline.get(s.id).is_some() {
            return Err(Errno::EINVAL);
        }
        if self.inline.live_bytes + data.len() as u64 > limits::INLINE_TOTAL_MAX {
            return Err(Errno::EAGAIN);
        }
        self.slices.locs.insert(
            s.id,
            SliceLoc {
                vol,
                len: s.slice_len,
                created: now,
                deleted: None,
                blocks: vec![BlockLoc { nodes: Vec::new(), tiered: StoreSet::EMPTY }],
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
            if !self.inline.is_live(*id) {
                continue;
            }
            if let Some(b) = self.slices.locs.get_mut(id).and_then(|l| l.blocks.first_mut()) {
                b.nodes = nodes.clone();
            }
            self.inline.remove(*id);
        }
        Ok(Reply::Ok)
    }

    /// Whether `slice` is inline (its block has no copy anywhere but in this state, or had
    /// none when its last piece went).
    pub(crate) fn is_inline(&self, slice: SliceId) -> bool {
        self.inline.get(slice).is_some()
    }

    /// After each command: the inline slices that lost their last piece in it become dead
    /// (still referenced again in the same command: they stay live), and dead ones expire.
    pub(crate) fn settle_inline(&mut self, now: Timespec) {
        for id in std::mem::take(&mut self.slices.zeroed) {
            if !self.slices.refs.contains_key(&id) {
                self.inline.kill(id, now);
            }
        }
        self.inline.expire(now);
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
        for (id, d) in self.inline.live.range((Bound::Excluded(after), Bound::Unbounded)) {
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
