//! The cache node of one site, and the data client gateways embed.
//!
//! - [`staging`]: durable, never-evicted copies of blocks not yet tiered (crash-safe files,
//!   checksums, backpressure).
//! - [`readcache`]: foyer hybrid memory + disk cache of clean blocks.
//! - [`node`]: the `elea cache` process: block service (tonic), registration and heartbeats
//!   with the metadata service; [`workers`]: tiering, re-replication, GC, reconcile.
//! - [`placement`]: rendezvous hashing of blocks over a site's live cache nodes.
//! - [`client`]: the block service client; [`data`]: the data client (write slices, read
//!   byte ranges), one implementation of [`datapath::DataPath`], the seam a VFS drives.

pub mod client;
pub mod data;
pub mod datapath;
pub mod error;
mod local;
pub mod node;
pub mod placement;
pub mod readcache;
pub mod staging;
pub mod volumes;
mod workers;

pub use data::{DataClient, DataConfig};
pub use datapath::{ChunkLists, ChunkSource, DataPath, MemData, MetaChunks, Staged};
pub use error::CacheError;
pub use node::{CacheNodeConfig, ServeError, serve};

pub mod proto {
    tonic::include_proto!("elea.block.v1");
}

/// A random 64-bit number (for incarnations and temporary names), from the standard
/// library's per-process random hasher keys and the clock.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
