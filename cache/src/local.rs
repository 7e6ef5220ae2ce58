//! Cache nodes running in this process (`elea up` runs one next to its gateway). A block
//! client asked to reach one of their addresses calls the node directly instead of through
//! gRPC over loopback: the same checks, staging and replies (errors are classified exactly
//! as if they had crossed the wire), without the HTTP/2 framing, two copies, two checksum
//! passes and the socket round trip each block costs otherwise.

use std::sync::Arc;

use elea_common::local::{Registration, Registry};

use crate::node::Node;

static NODES: Registry<Arc<Node>> = Registry::new();

/// Makes `node` reachable in-process at its advertised address until the guard is dropped.
pub(crate) fn register(node: &Arc<Node>) -> Registration<Arc<Node>> {
    NODES.register(&node.cfg.advertise, node.clone())
}

/// The node of this process serving at `addr`, if any.
pub(crate) fn node_at(addr: &str) -> Option<Arc<Node>> {
    NODES.get(addr)
}
