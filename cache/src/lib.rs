//! The cache node of one site, and the data client gateways embed: two halves that share
//! only the block protocol.
//!
//! - [`node`]: the server, the `elea cache` process. Block service (tonic), registration and
//!   heartbeats with the metadata service; [`node::staging`]: durable, never-evicted copies of
//!   blocks not yet tiered (crash-safe files, checksums, backpressure); [`node::readcache`]:
//!   foyer hybrid memory + disk cache of clean blocks; and the background workers (tiering,
//!   re-replication, GC, reconcile).
//! - [`client`]: what a gateway embeds. [`client::blocks`]: the block service client (a
//!   connection pool); [`client::data`]: the data client (write slices, read byte ranges),
//!   one implementation of [`client::datapath::DataPath`], the seam a VFS drives.
//! - Shared by both: [`wire`] (the protocol's framing constants and [`wire::BlockService`],
//!   the in-process form of a node's put and get), [`proto`] (the messages), [`placement`]
//!   (rendezvous hashing of blocks over a site's live cache nodes), [`volumes`] (volume
//!   policies and their object stores) and [`error`].
//!
//! The node uses the block client to reach its peers; the client reaches a node of its own
//! process only through [`wire::BlockService`]. Nothing else crosses between the halves.

pub mod client;
pub mod error;
mod local;
pub mod node;
pub mod placement;
pub mod volumes;
pub mod wire;

pub use client::data::{DataClient, DataConfig};
pub use client::datapath::{ChunkLists, ChunkSource, DataPath, MemData, MetaChunks, Staged};
pub use error::CacheError;
pub use node::{CacheNodeConfig, ServeError, serve};

pub mod proto {
    tonic::include_proto!("elea.block.v1");
}

/// A boxed future, for the object-safe traits ([`ChunkSource`], [`wire::BlockService`]).
pub type BoxFut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

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
