//! Fan-out of applied changes to watch streams, with a short per-volume history so a gateway
//! that reconnects can resume from the sequence it last saw instead of dropping its caches.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use elea_common::VolumeId;
use elea_fsm::ChangeSet;
use tokio::sync::broadcast;

/// Change sets kept per volume for resuming streams.
const HISTORY: usize = 4096;

/// One event on the hub.
#[derive(Debug, Clone)]
pub enum HubEvent {
    Changes(Arc<ChangeSet>),
    /// State was replaced wholesale (snapshot install): drop every cache.
    Reset,
}

pub struct WatchHub {
    tx: broadcast::Sender<HubEvent>,
    recent: Mutex<HashMap<VolumeId, VecDeque<Arc<ChangeSet>>>>,
}

/// What a new subscriber gets: changes after its `from_seq`, whether it missed some, and the
/// live feed (starting right after the backlog: nothing lost, nothing twice).
pub struct Subscription {
    pub backlog: Vec<Arc<ChangeSet>>,
    pub reset: bool,
    pub rx: broadcast::Receiver<HubEvent>,
}

impl Default for WatchHub {
    fn default() -> Self {
        Self::new()
    }
}

impl WatchHub {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(16384);
        Self { tx, recent: Mutex::new(HashMap::new()) }
    }

    pub fn publish(&self, sets: Vec<ChangeSet>) {
        let Ok(mut recent) = self.recent.lock() else { return };
        for set in sets {
            let set = Arc::new(set);
            let q = recent.entry(set.vol).or_default();
            if q.len() == HISTORY {
                q.pop_front();
            }
            q.push_back(set.clone());
            let _ = self.tx.send(HubEvent::Changes(set));
        }
    }

    pub fn reset(&self) {
        let Ok(mut recent) = self.recent.lock() else { return };
        recent.clear();
        let _ = self.tx.send(HubEvent::Reset);
    }

    pub fn subscribe(&self, vol: VolumeId, from_seq: u64) -> Subscription {
        let recent = match self.recent.lock() {
            Ok(r) => r,
            Err(p) => p.into_inner(),
        };
        let rx = self.tx.subscribe();
        if from_seq == 0 {
            return Subscription { backlog: Vec::new(), reset: false, rx };
        }
        let q = recent.get(&vol);
        let oldest = q.and_then(|q| q.front()).map(|s| s.seq);
        let newest = q.and_then(|q| q.back()).map(|s| s.seq);
        // Resumable only when the history reaches back to right after from_seq.
        let covered = oldest.is_some_and(|o| o <= from_seq + 1) || newest.is_some_and(|n| n == from_seq);
        if !covered {
            return Subscription { backlog: Vec::new(), reset: true, rx };
        }
        let backlog = q.map(|q| q.iter().filter(|s| s.seq > from_seq).cloned().collect()).unwrap_or_default();
        Subscription { backlog, reset: false, rx }
    }
}
