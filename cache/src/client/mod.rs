//! The client half: what a gateway embeds to reach a site's cache nodes.
//!
//! - [`blocks`]: the block service client, a pool of connections to cache nodes, with
//!   chunked put and get and end-to-end checksums; a node of this process is called
//!   directly through [`crate::wire::BlockService`].
//! - [`data`]: the data client (write slices, read byte ranges of files).
//! - [`datapath`]: the [`datapath::DataPath`] seam a VFS drives, and an in-memory one.

pub mod blocks;
pub mod data;
pub mod datapath;

pub use blocks::{BlockClientConfig, BlockClients};
