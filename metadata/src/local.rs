//! Metadata nodes running in this process (`elea up` runs one next to its gateway and cache
//! node). A client whose addresses include one of them sends its requests straight to the
//! node's thread instead of through gRPC over loopback: the same commands, deduplication and
//! replies, without serializing, two TCP hops and the thread wake-ups they cost.

use elea_common::GroupId;
use elea_common::ids::DEFAULT_GROUP;
use elea_common::local::{Registration, Registry};

use crate::raft::node::NodeHandle;

static NODES: Registry<NodeHandle> = Registry::new();

fn key(addr: &str, group: GroupId) -> String {
    if group == DEFAULT_GROUP { addr.to_string() } else { format!("{addr}#{group}") }
}

/// Makes group `group` of the node at `addr` reachable in-process until the guard is dropped.
pub(crate) fn register(addr: &str, group: GroupId, node: NodeHandle) -> Registration<NodeHandle> {
    NODES.register(&key(addr, group), node)
}

/// Group `group` of the node of this process listening at `addr`, if any.
pub(crate) fn node_at(addr: &str, group: GroupId) -> Option<NodeHandle> {
    NODES.get(&key(addr, group))
}
