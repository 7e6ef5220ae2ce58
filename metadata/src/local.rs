//! Metadata nodes running in this process (`elea up` runs one next to its gateway and cache
//! node). A client whose addresses include one of them sends its requests straight to the
//! node's thread instead of through gRPC over loopback: the same commands, deduplication and
//! replies, without serializing, two TCP hops and the thread wake-ups they cost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::raft::node::NodeHandle;

static NODES: Mutex<Option<HashMap<String, NodeHandle>>> = Mutex::new(None);
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Keeps a node registered under its advertised address until dropped.
pub(crate) struct Registration(String);

pub(crate) fn register(addr: &str, node: NodeHandle) -> Registration {
    let mut m = NODES.lock().unwrap_or_else(PoisonError::into_inner);
    let map = m.get_or_insert_with(HashMap::new);
    map.insert(addr.to_string(), node);
    COUNT.store(map.len(), Ordering::Release);
    Registration(addr.to_string())
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

/// The node of this process listening at `addr`, if any.
pub(crate) fn node_at(addr: &str) -> Option<NodeHandle> {
    if COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    NODES.lock().unwrap_or_else(PoisonError::into_inner).as_ref()?.get(addr).cloned()
}
