//! Cache nodes running in this process (`elea up` runs one next to its gateway). A block
//! client asked to reach one of their addresses calls the node directly instead of through
//! gRPC over loopback: the same checks, staging and replies (errors are classified exactly
//! as if they had crossed the wire), without the HTTP/2 framing, two copies, two checksum
//! passes and the socket round trip each block costs otherwise.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::node::Node;

static NODES: Mutex<Option<HashMap<String, Arc<Node>>>> = Mutex::new(None);
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Keeps a node reachable under its advertised address until dropped.
pub(crate) struct Registration(String);

/// Makes `node` reachable in-process at its advertised address (while it serves gRPC there).
pub(crate) fn register(node: &Arc<Node>) -> Registration {
    let addr = node.cfg.advertise.clone();
    let mut m = NODES.lock().unwrap_or_else(PoisonError::into_inner);
    let map = m.get_or_insert_with(HashMap::new);
    map.insert(addr.clone(), node.clone());
    COUNT.store(map.len(), Ordering::Release);
    Registration(addr)
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut m = NODES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(map) = m.as_mut() {
            map.remove(&self.0);
            COUNT.store(map.len(), Ordering::Release);
        }
    }
}

/// The node of this process serving at `addr`, if any.
pub(crate) fn node_at(addr: &str) -> Option<Arc<Node>> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    NODES.lock().unwrap_or_else(PoisonError::into_inner).as_ref()?.get(addr).cloned()
}
