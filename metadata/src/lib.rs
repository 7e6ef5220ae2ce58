//! Elea's metadata service: Raft groups (raft-rs) replicating the pure namespace state machine
//! ([`elea_fsm`]), durable storage (raft-engine), the gRPC service (tonic) and the client library.
//!
//! Layers, from the bottom: [`raft::storage`] (durable log), [`raft::core`] (deterministic
//! Raft + state machine, no I/O besides storage), [`raft::node`] (the thread that drives a
//! core), [`raft::transport`] (peer messages), [`service`] (gRPC), [`server`] (start-up),
//! [`client`] (what gateways and the CLI use), [`watch`] (change fan-out), [`authz`] (who may
//! ask what, with certificates), `route` (a control group client's requests sent to the
//! groups of the volumes and slices they are about). [`api`] is the
//! typed API every caller uses, implemented by the client and by [`mem`] (the state machine
//! in memory, for tests).

pub mod api;
pub mod authz;
pub mod client;
mod local;
pub mod mem;
pub mod raft;
mod route;
pub mod server;
pub mod service;
pub mod watch;

/// Generated gRPC types.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("elea.meta.v1");
}

pub use api::{LockReq, MetaApi, NewNode};
pub use elea_fsm as fsm;
