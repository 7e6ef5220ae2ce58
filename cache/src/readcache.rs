//! The read cache: clean (tiered or fetched) blocks in foyer's hybrid memory + disk cache.
//!
//! Evictable by design, unlike staging. Each value carries the crc32c of its bytes, checked
//! on every hit: a damaged entry is dropped and counted as a miss, never served.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use foyer::{
    BlockEngineConfig, DeviceBuilder as _, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy,
};

use crate::error::CacheError;
use crate::staging::BlockId;

/// Largest value the disk tier holds; blocks are at most 4 MiB.
const DISK_BLOCK: usize = 16 << 20;

/// See the module docs.
pub struct ReadCache {
    cache: HybridCache<u64, Vec<u8>>,
    hits: AtomicU64,
    misses: AtomicU64,
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
        let found = match self.cache.get(&key(id)).await {
            Ok(Some(e)) => {
                let v = e.value();
                let n = v.len().checked_sub(4)?;
                let mut crc = [0u8; 4];
                crc.copy_from_slice(&v[n..]);
                if crc32c::crc32c(&v[..n]) == u32::from_le_bytes(crc) {
                    Some(v[..n].to_vec())
                } else {
                    tracing::error!(?id, "read cache entry is corrupt: dropping it");
                    self.cache.remove(&key(id));
                    None
                }
            }
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

    pub fn insert(&self, id: BlockId, data: &[u8]) {
        let mut v = Vec::with_capacity(data.len() + 4);
        v.extend_from_slice(data);
        v.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
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
