//! Metadata nodes running in this process (`elea up` runs one next to its gateway and cache
//! node). A client whose addresses include one of them sends its requests straight to the
//! node's thread instead of through gRPC over loopback: the same commands, deduplication and
//! replies, without serializing, two TCP hops and the thread wake-ups they cost.

use elea_common::local::{Registration, Registry};

use crate::raft::node::NodeHandle;

static NODES: Registry<NodeHandle> = Registry::new();

/// Makes `node` reachable in-process at `addr` until the guard is dropped.
pub(crate) fn register(addr: &str, node: NodeHandle) -> Registration<NodeHandle> {
    NODES.register(addr, node)
}

/// The node of this process listening at `addr`, if any.
pub(crate) fn node_at(addr: &str) -> Option<NodeHandle> {
    NODES.get(addr)
}
