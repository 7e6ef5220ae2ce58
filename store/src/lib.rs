//! Object store layer: store URLs, the block codec and the object key layout.
//!
//! - [`codec`]: the self-checking on-object block format (header, CRC32C, optional zstd).
//! - [`key`]: where a block lives in the store ([`BlockKey::path`]).
//! - [`store`]: one object store opened from a URL ([`Store::open`]), over opendal.
//! - `testing` (feature `test-server`): an in-process S3 server for tests.

pub mod codec;
pub mod key;
mod location;
pub mod store;
#[cfg(feature = "test-server")]
pub mod testing;

pub use codec::{
    CodecError, Compression, HEADER_LEN, ParseCompressionError, check_encoded, decode_block, encode_block,
};
pub use key::BlockKey;
pub use store::{OWNER_OBJECT, Store, StoreConfig, StoreError};
