//! An in-memory metadata service: the real state machine ([`elea_fsm::StateMachine`]) behind
//! a lock, with no Raft, no disk and no sockets. Commands apply in call order with the
//! wall clock as their time, and their changes feed a watch hub, so a gateway on it behaves
//! as on a one-voter cluster in this process, only faster. For tests: the VFS model test runs
//! on it, and [`MemMeta::set_fault`] makes chosen ops fail.

use std::sync::{Arc, Mutex, MutexGuard};

use elea_common::{Timespec, VolumeId};
use elea_fsm::{Command, Op, Query, Reply, StateMachine};

use crate::api::MetaApi;
use crate::client::{ClientError, WatchStream, local_watch};
use crate::watch::WatchHub;

/// Decides, before an op is applied, whether it fails instead (and with what).
pub type Fault = Arc<dyn Fn(&Op) -> Option<ClientError> + Send + Sync>;

struct Inner {
    sm: Mutex<StateMachine>,
    hub: WatchHub,
    fault: Mutex<Option<Fault>>,
}

/// See the module docs. Cheap to clone; clones share one state.
#[derive(Clone)]
pub struct MemMeta {
    inner: Arc<Inner>,
}

impl Default for MemMeta {
    fn default() -> Self {
        Self::new()
    }
}

impl MemMeta {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                sm: Mutex::new(StateMachine::new()),
                hub: WatchHub::new(),
                fault: Mutex::new(None),
            }),
        }
    }

    fn sm(&self) -> MutexGuard<'_, StateMachine> {
        self.inner.sm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, every op for which `f` returns an error fails with it, unapplied
    /// (`None` clears the fault).
    pub fn set_fault(&self, f: Option<Fault>) {
        *self.inner.fault.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    /// The state machine's snapshot (for comparing states in tests).
    pub fn snapshot(&self) -> Vec<u8> {
        self.sm().snapshot()
    }

    fn apply(&self, op: Op) -> Result<Reply, ClientError> {
        let fault = self.inner.fault.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(e) = fault.and_then(|f| f(&op)) {
            return Err(e);
        }
        // Client 0: no exactly-once bookkeeping (nothing here is ever retried).
        let cmd = Command { client: 0, seq: 0, acked_below: 0, time: Timespec::now(), op };
        let mut sm = self.sm();
        let (res, sets) = sm.apply(&cmd);
        // Published under the state's lock, so the stream's order is the apply order.
        self.inner.hub.publish(sets);
        res.map_err(ClientError::Fs)
    }
}

impl MetaApi for MemMeta {
    fn op(&self, op: Op) -> impl Future<Output = Result<Reply, ClientError>> + Send {
        let r = self.apply(op);
        async move { r }
    }

    fn query(&self, q: Query) -> impl Future<Output = Result<Reply, ClientError>> + Send {
        let r = self.sm().query(&q).map_err(ClientError::Fs);
        async move { r }
    }

    fn watch(
        &self,
        vol: VolumeId,
        from_seq: u64,
    ) -> impl Future<Output = Result<WatchStream, ClientError>> + Send {
        let s = local_watch(&self.inner.hub, vol, from_seq);
        async move { Ok(s) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::WatchItem;
    use elea_common::Errno;
    use elea_common::ids::ROOT_INO;
    use elea_fsm::{Change, VolumeConfig};
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn applies_ops_answers_queries_and_streams_changes() {
        let m = MemMeta::new();
        let vol = m.create_volume("v", VolumeConfig::default()).await.unwrap().id;
        let mut w = m.watch(vol, 0).await.unwrap();
        let a = m.mkdir(vol, ROOT_INO, b"d", 0o755, 1000, 1000).await.unwrap();
        assert_eq!((a.uid, a.gid), (1000, 1000));
        assert_eq!(m.lookup(vol, ROOT_INO, b"d").await.unwrap().ino, a.ino);
        assert_eq!(m.mkdir(vol, ROOT_INO, b"d", 0o755, 0, 0).await.unwrap_err().errno(), Errno::EEXIST);
        let item = w.next().await.unwrap().unwrap();
        let WatchItem::Changes { changes, .. } = item else { panic!("{item:?}") };
        assert!(changes.contains(&Change::Entry { parent: ROOT_INO, name: b"d".to_vec() }), "{changes:?}");
    }

    #[tokio::test]
    async fn a_fault_fails_the_op_unapplied() {
        let m = MemMeta::new();
        let vol = m.create_volume("v", VolumeConfig::default()).await.unwrap().id;
        m.set_fault(Some(Arc::new(|op: &Op| {
            matches!(op, Op::Mkdir { .. }).then(|| ClientError::Unavailable("cut off".into()))
        })));
        let before = m.snapshot();
        assert!(matches!(m.mkdir(vol, ROOT_INO, b"d", 0o755, 0, 0).await, Err(ClientError::Unavailable(_))));
        assert_eq!(m.snapshot(), before);
        m.set_fault(None);
        m.mkdir(vol, ROOT_INO, b"d", 0o755, 0, 0).await.unwrap();
    }
}
