//! Identifier types. They are plain integers so they encode compactly on the wire and in keys.

/// A Raft group. Every RPC and every storage key carries one, so volumes can later live in
/// groups of their own; today a cluster runs [`DEFAULT_GROUP`] only.
pub type GroupId = u64;
/// A metadata node (a Raft peer). Never 0.
pub type NodeId = u64;
/// A volume (one file system). Never 0.
pub type VolumeId = u64;
/// An inode number, unique within a volume. The root directory is [`ROOT_INO`].
pub type Ino = u64;
/// A slice id, unique within the cluster. 0 means "a hole" (reads as zeros).
pub type SliceId = u64;
/// A client session (a gateway's lease).
pub type SessionId = u64;

/// The Raft group every volume lives in until volumes get groups of their own.
pub const DEFAULT_GROUP: GroupId = 1;
/// The root directory of every volume.
pub const ROOT_INO: Ino = 1;
/// Size of a chunk: file data is split into chunks, each with its own slice list.
pub const CHUNK_SIZE: u64 = 64 << 20;
/// Largest block a slice's bytes are stored in.
pub const BLOCK_SIZE: u64 = 4 << 20;
