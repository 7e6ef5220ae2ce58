//! A registry of servers running in this process, by the address they advertise, so that a
//! client of the same process can call one directly instead of over loopback (`elea up` runs
//! a metadata node, a cache node and a gateway in one process). Each server kind keeps its own
//! registry in a `static`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// Servers of one kind in this process, by advertised address.
pub struct Registry<T: 'static> {
    map: Mutex<Option<HashMap<String, T>>>,
    /// Entries in `map`: lookups in a process that registered nothing take no lock.
    count: AtomicUsize,
}

impl<T: Clone + 'static> Registry<T> {
    pub const fn new() -> Self {
        Self { map: Mutex::new(None), count: AtomicUsize::new(0) }
    }

    /// Makes `server` reachable at `addr` until the returned guard is dropped.
    pub fn register(&'static self, addr: &str, server: T) -> Registration<T> {
        let mut m = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let map = m.get_or_insert_with(HashMap::new);
        map.insert(addr.to_string(), server);
        self.count.store(map.len(), Ordering::Release);
        Registration { registry: self, addr: addr.to_string() }
    }

    /// The server of this process at `addr`, if any.
    pub fn get(&self, addr: &str) -> Option<T> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        self.map.lock().unwrap_or_else(PoisonError::into_inner).as_ref()?.get(addr).cloned()
    }

    fn remove(&self, addr: &str) {
        let mut m = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(map) = m.as_mut() {
            map.remove(addr);
            self.count.store(map.len(), Ordering::Release);
        }
    }
}

impl<T: Clone + 'static> Default for Registry<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps a server registered until dropped.
pub struct Registration<T: Clone + 'static> {
    registry: &'static Registry<T>,
    addr: String,
}

impl<T: Clone + 'static> Drop for Registration<T> {
    fn drop(&mut self) {
        self.registry.remove(&self.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static R: Registry<u32> = Registry::new();

    #[test]
    fn registered_until_the_guard_drops() {
        assert_eq!(R.get("a:1"), None);
        let g = R.register("a:1", 7);
        let h = R.register("b:2", 8);
        assert_eq!(R.get("a:1"), Some(7));
        drop(g);
        assert_eq!(R.get("a:1"), None);
        assert_eq!(R.get("b:2"), Some(8));
        drop(h);
        assert_eq!(R.get("b:2"), None);
    }
}
