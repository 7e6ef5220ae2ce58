//! Cache nodes running in this process (`elea up` runs one next to its gateway). A block
//! client asked to reach one of their addresses calls the node directly instead of through
//! gRPC over loopback: the same checks, staging and replies (errors are classified exactly
//! as if they had crossed the wire), without the HTTP/2 framing, two copies, two checksum
//! passes and the socket round trip each block costs otherwise.
//!
//! Nodes register as a [`BlockService`], so the block client never names the node type.

use std::sync::Arc;

use elea_common::local::{Registration, Registry};

use crate::wire::BlockService;

static NODES: Registry<Arc<dyn BlockService>> = Registry::new();

/// Makes `node` reachable in-process at `addr` (its advertised address) until the guard is
/// dropped.
pub(crate) fn register(addr: &str, node: Arc<dyn BlockService>) -> Registration<Arc<dyn BlockService>> {
    NODES.register(addr, node)
}

/// The block service of this process serving at `addr`, if any.
pub(crate) fn node_at(addr: &str) -> Option<Arc<dyn BlockService>> {
    NODES.get(addr)
}
