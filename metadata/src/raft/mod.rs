//! Raft groups: durable storage, the deterministic core, the driver thread and the transport.

pub mod core;
pub mod logfile;
pub mod node;
pub mod storage;
pub mod transport;
