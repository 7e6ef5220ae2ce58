//! Layout math: how a file's bytes map onto chunks and a slice's bytes onto blocks. Every
//! crate that cuts byte ranges (the state machine, the data client, the VFS) uses these, so
//! the arithmetic exists once.
//!
//! A file is cut into chunks of [`CHUNK_SIZE`] bytes, each with its own slice list; a slice's
//! bytes are stored as blocks of [`BLOCK_SIZE`] bytes (the last one shorter).

use std::ops::Range;

use crate::ids::{BLOCK_SIZE, CHUNK_SIZE};

/// Number of blocks holding a slice of `len` bytes.
pub fn blocks_of(len: u32) -> usize {
    u64::from(len).div_ceil(BLOCK_SIZE) as usize
}

/// Length of block `index` of a slice of `len` bytes (0 past its end).
pub fn block_len(len: u32, index: u32) -> u32 {
    let start = u64::from(index) * BLOCK_SIZE;
    (u64::from(len).saturating_sub(start)).min(BLOCK_SIZE) as u32
}

/// The chunks that bytes `[offset, end)` of a file touch.
pub fn chunks_touched(offset: u64, end: u64) -> Range<u64> {
    if end <= offset {
        return offset / CHUNK_SIZE..offset / CHUNK_SIZE;
    }
    offset / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE)
}

/// One piece of a byte range cut at chunk boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPiece {
    pub chunk: u64,
    /// Where the piece starts within its chunk.
    pub in_chunk: u32,
    /// Where the piece starts within the range.
    pub at: u64,
    pub len: u64,
}

/// Cuts `len` bytes starting at file offset `offset` at chunk boundaries, in order.
pub fn chunk_pieces(offset: u64, len: u64) -> impl Iterator<Item = ChunkPiece> {
    let mut at = 0u64;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at;
        let in_chunk = pos % CHUNK_SIZE;
        let n = (CHUNK_SIZE - in_chunk).min(len - at);
        let p = ChunkPiece { chunk: pos / CHUNK_SIZE, in_chunk: in_chunk as u32, at, len: n };
        at += n;
        Some(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_their_lengths() {
        assert_eq!(blocks_of(0), 0);
        assert_eq!(blocks_of(1), 1);
        assert_eq!(blocks_of(BLOCK_SIZE as u32), 1);
        assert_eq!(blocks_of(BLOCK_SIZE as u32 + 1), 2);
        assert_eq!(block_len(BLOCK_SIZE as u32 + 5, 0), BLOCK_SIZE as u32);
        assert_eq!(block_len(BLOCK_SIZE as u32 + 5, 1), 5);
        assert_eq!(block_len(10, 3), 0);
    }

    #[test]
    fn ranges_cut_at_chunk_boundaries() {
        assert_eq!(chunk_pieces(5, 0).count(), 0);
        let one: Vec<_> = chunk_pieces(10, 20).collect();
        assert_eq!(one, vec![ChunkPiece { chunk: 0, in_chunk: 10, at: 0, len: 20 }]);
        let start = CHUNK_SIZE - 3;
        let cut: Vec<_> = chunk_pieces(start, 2 * CHUNK_SIZE + 10).collect();
        assert_eq!(
            cut,
            vec![
                ChunkPiece { chunk: 0, in_chunk: (CHUNK_SIZE - 3) as u32, at: 0, len: 3 },
                ChunkPiece { chunk: 1, in_chunk: 0, at: 3, len: CHUNK_SIZE },
                ChunkPiece { chunk: 2, in_chunk: 0, at: 3 + CHUNK_SIZE, len: CHUNK_SIZE },
                ChunkPiece { chunk: 3, in_chunk: 0, at: 3 + 2 * CHUNK_SIZE, len: 7 },
            ]
        );
        assert_eq!(cut.iter().map(|p| p.len).sum::<u64>(), 2 * CHUNK_SIZE + 10);
        assert_eq!(chunks_touched(start, start + 2 * CHUNK_SIZE + 10), 0..4);
        assert_eq!(chunks_touched(CHUNK_SIZE, 2 * CHUNK_SIZE), 1..2);
        assert_eq!(chunks_touched(7, 7), 0..0);
    }
}
