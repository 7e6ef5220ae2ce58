//! Raft groups: durable storage, the deterministic core, the driver thread and the transport.

pub mod clock;
pub mod core;
pub(crate) mod inbox;
pub mod link;
pub mod logfile;
pub mod node;
pub mod storage;
pub mod transport;
