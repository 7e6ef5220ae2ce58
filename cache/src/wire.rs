//! The block protocol as both halves of the crate see it: the framing constants the cache
//! node's server and the block client must agree on, and [`BlockService`], the calls a block
//! client makes on a cache node of its own process instead of going through gRPC.
//!
//! The messages themselves are in [`crate::proto`] (`proto/block.proto`).

use bytes::Bytes;
use elea_common::ids::BLOCK_SIZE;

use crate::BoxFut;
use crate::error::CacheError;
use crate::proto::{BlockRef, GetRequest};

/// Bytes per streamed message.
pub const CHUNK: usize = 1 << 20;
/// Largest gRPC message of the block service (a chunk plus headers).
pub const MAX_MESSAGE: usize = 2 * CHUNK;
/// HTTP/2 flow-control window of one block transfer (each way): a whole block, so a put or
/// a get never stops to wait for a window update.
pub const BLOCK_WINDOW: u32 = 2 * BLOCK_SIZE as u32;
/// Largest HTTP/2 frame a peer may send us (the protocol's default is 16 KiB).
pub const FRAME: u32 = 1 << 20;

/// A cache node's `Put` and `Get`, called in-process. The same checks, staging and replies
/// as over gRPC; the caller classifies an error as if it had crossed the wire.
pub trait BlockService: Send + Sync + 'static {
    /// Stages a block; succeeds once it is durable. `crc` is the block's crc32c, checked
    /// against the bytes before anything is stored.
    fn put(&self, block: BlockRef, data: Bytes, crc: u32) -> BoxFut<'_, Result<(), CacheError>>;

    /// Reads a block, or the range of it the request names. Every byte returned was verified
    /// against a checksum on the way.
    fn get<'a>(&'a self, req: &'a GetRequest) -> BoxFut<'a, Result<Vec<u8>, CacheError>>;
}
