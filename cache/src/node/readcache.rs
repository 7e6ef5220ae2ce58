//! The read cache: clean (tiered or fetched) blocks in foyer's hybrid memory + disk cache.
//!
//! Evictable by design, unlike staging. Each value carries a crc32c per [`SEGMENT`] bytes of
//! the block (the staged file's segments), and a hit verifies the segments it returns: a
//! range read checks only what it touches. A damaged entry is dropped and counted as a miss,
//! never served; so is an entry in an older layout.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use foyer::{
    BlockEngineConfig, DeviceBuilder as _, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy,
};

use crate::error::CacheError;
use crate::node::staging::{BlockId, SEGMENT, segment_crcs};

/// Largest value the disk tier holds; blocks are at most 4 MiB.
const DISK_BLOCK: usize = 16 << 20;

/// See the module docs.
pub struct ReadCache {
    cache: HybridCache<u64, Vec<u8>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Ends every value: value = bytes, a crc32c per segment, the length (u32 LE), this.
const ENTRY_MAGIC: [u8; 4] = *b"ERC2";
const SEGMENT_SHIFT: u8 = SEGMENT.trailing_zeros() as u8;

/// The bytes of a cache value and its checksum table, when its layout is sound.
fn parse(v: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = v.len().checked_sub(8)?;
    if v[n + 4..] != ENTRY_MAGIC {
        return None;
    }
    let len = u32::from_le_bytes([v[n], v[n + 1], v[n + 2], v[n + 3]]) as usize;
    let table = 4 * len.div_ceil(SEGMENT);
    if len.checked_add(table)? != n {
        return None;
    }
    Some((&v[..len], &v[len..n]))
}

/// Bytes `[off, off + len)` of a value's block, when the segments they touch verify.
fn verified_range(data: &[u8], table: &[u8], off: usize, len: usize) -> Option<Vec<u8>> {
    let (first, last) = (off / SEGMENT, (off + len - 1) / SEGMENT);
    let start = first * SEGMENT;
    let end = ((last + 1) * SEGMENT).min(data.len());
    let crcs = segment_crcs(&data[start..end], SEGMENT_SHIFT);
    let want = table[4 * first..4 * (last + 1)].chunks_exact(4);
    if !crcs.iter().zip(want).all(|(c, w)| c.to_le_bytes() == w) {
        return None;
    }
    Some(data[off..off + len].to_vec())
}

fn key(id: BlockId) -> u64 {
    // Slices are at most 16 blocks (64 MiB chunks of 4 MiB blocks); callers check index < 16.
    (id.0 << 4) | u64::from(id.1 & 0xf)
}

impl ReadCache {
    /// A cache of `mem` bytes in memory and `disk` bytes under `dir` (0 = memory only).
    pub async fn open(dir: &Path, mem: u64, disk: u64) -> Result<Self, CacheError> {
        let builder = HybridCacheBuilder::new()
            .with_name("elea-read-cache")
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .memory(usize::try_from(mem).unwrap_or(usize::MAX).max(1))
            .with_weighter(|_k: &u64, v: &Vec<u8>| v.len())
            .storage();
        let cache = if disk == 0 {
            builder.build().await
        } else {
            if disk < 4 * DISK_BLOCK as u64 {
                return Err(CacheError::BadRequest(format!(
                    "--cache-disk must be 0 or at least {} MiB",
                    (4 * DISK_BLOCK) >> 20
                )));
            }
            std::fs::create_dir_all(dir).map_err(|e| CacheError::io("creating", dir, e))?;
            let device = FsDeviceBuilder::new(dir)
                .with_capacity(usize::try_from(disk).unwrap_or(usize::MAX))
                .build()
                .map_err(|e| CacheError::Internal(format!("read cache device: {e}")))?;
            builder
                .with_engine_config(BlockEngineConfig::new(device).with_block_size(DISK_BLOCK))
                .build()
                .await
        };
        let cache = cache.map_err(|e| CacheError::Internal(format!("read cache: {e}")))?;
        Ok(Self { cache, hits: AtomicU64::new(0), misses: AtomicU64::new(0) })
    }

    /// A verified cached copy of the block, if any.
    pub async fn get(&self, id: BlockId) -> Option<Vec<u8>> {
        self.get_range(id, None).await.map(|(_, d)| d)
    }

    /// The block's length and bytes `[off, off + len)` of it (`None`: all of it), verified
    /// against the checksums of the segments they touch; `None` on a miss, or when the range
    /// is empty or outside the cached block.
    pub async fn get_range(&self, id: BlockId, range: Option<(u32, u32)>) -> Option<(u32, Vec<u8>)> {
        let found = match self.cache.get(&key(id)).await {
            Ok(Some(e)) => match parse(e.value()) {
                Some((data, table)) => {
                    let (off, len) = range.map_or((0, data.len()), |(o, l)| (o as usize, l as usize));
                    if len == 0 || off.saturating_add(len) > data.len() {
                        None
                    } else if let Some(d) = verified_range(data, table, off, len) {
                        Some((data.len() as u32, d))
                    } else {
                        tracing::error!(?id, "read cache entry is corrupt: dropping it");
                        self.cache.remove(&key(id));
                        None
                    }
                }
                None => {
                    tracing::warn!(?id, "read cache entry has an unknown layout: dropping it");
                    self.cache.remove(&key(id));
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(?id, error = %e, "read cache lookup failed");
                None
            }
        };
        let c = if found.is_some() { &self.hits } else { &self.misses };
        c.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Caches a verified block.
    pub fn insert(&self, id: BlockId, data: &[u8]) {
        let crcs = segment_crcs(data, SEGMENT_SHIFT);
        let mut v = Vec::with_capacity(data.len() + 4 * crcs.len() + 8);
        v.extend_from_slice(data);
        for c in crcs {
            v.extend_from_slice(&c.to_le_bytes());
        }
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(&ENTRY_MAGIC);
        self.cache.insert(key(id), v);
    }

    pub fn contains(&self, id: BlockId) -> bool {
        self.cache.contains(&key(id))
    }

    pub fn remove(&self, id: BlockId) {
        self.cache.remove(&key(id));
    }

    /// Drops every entry (for cold-read benchmarks and tests).
    pub async fn clear(&self) -> Result<(), CacheError> {
        self.cache.clear().await.map_err(|e| CacheError::Internal(format!("clearing the read cache: {e}")))
    }

    /// (hits, misses) so far.
    pub fn counters(&self) -> (u64, u64) {
        (self.hits.load(Ordering::Relaxed), self.misses.load(Ordering::Relaxed))
    }

    pub async fn close(&self) {
        if let Err(e) = self.cache.close().await {
            tracing::warn!(error = %e, "closing the read cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn range_hits_verify_what_they_return() {
        let c = ReadCache::open(Path::new("unused"), 64 << 20, 0).await.unwrap();
        let b = block(4 << 20);
        c.insert((1, 0), &b);
        let n = b.len() as u32;
        let s = SEGMENT as u32;
        for (off, len) in [(0, 4096), (s - 1, 2), (3 * s + 5, 2 * s), (n - 10, 10), (0, n)] {
            let (l, d) = c.get_range((1, 0), Some((off, len))).await.unwrap();
            assert_eq!((l, d.as_slice()), (n, &b[off as usize..(off + len) as usize]));
        }
        assert_eq!(c.get((1, 0)).await.unwrap(), b);
        // Empty and out-of-block ranges miss instead of panicking.
        for (off, len) in [(0, 0), (n, 1), (n - 1, 2), (u32::MAX, u32::MAX)] {
            assert!(c.get_range((1, 0), Some((off, len))).await.is_none());
        }
        // A short block ending inside a segment.
        let short = block(SEGMENT + 17);
        c.insert((2, 1), &short);
        let (l, d) = c.get_range((2, 1), Some((SEGMENT as u32, 17))).await.unwrap();
        assert_eq!((l, d.as_slice()), (short.len() as u32, &short[SEGMENT..]));
    }

    #[tokio::test]
    async fn damaged_and_old_layout_entries_are_dropped() {
        let c = ReadCache::open(Path::new("unused"), 64 << 20, 0).await.unwrap();
        let b = block(1 << 20);
        c.insert((3, 0), &b);
        // Damage segment 2 in place: ranges touching it miss and drop the entry.
        let mut v = c.cache.get(&key((3, 0))).await.unwrap().unwrap().value().clone();
        v[2 * SEGMENT + 9] ^= 1;
        c.cache.insert(key((3, 0)), v);
        assert!(c.get_range((3, 0), Some((0, 100))).await.is_some());
        assert!(c.get_range((3, 0), Some((2 * SEGMENT as u32, 100))).await.is_none());
        assert!(!c.contains((3, 0)));
        // The old layout (bytes and one crc32c) is not served.
        let mut old = b.clone();
        old.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
        c.cache.insert(key((4, 0)), old);
        assert!(c.get((4, 0)).await.is_none());
        assert!(!c.contains((4, 0)));
    }
}
