//! Small types shared by every Elea crate: ids, layout math, POSIX error numbers and time
//! stamps.
//!
//! This crate has no I/O and few dependencies so that every layer can use it.

pub mod errno;
pub mod ids;
pub mod layout;
pub mod local;
pub mod pattern;
pub mod time;

pub use errno::Errno;
pub use ids::{
    BLOCK_SIZE, CHUNK_SIZE, DEFAULT_GROUP, GroupId, Ino, NodeId, ROOT_INO, SessionId, SliceId, VolumeId,
};
pub use time::Timespec;
