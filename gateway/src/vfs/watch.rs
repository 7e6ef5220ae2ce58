//! Changes made anywhere: the volume's change stream drops what this node cached, wakes lock
//! waiters, and reaches the front end as invalidations.

use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;

use elea_cache::DataPath;
use elea_common::Ino;
use elea_metadata::MetaApi;
use elea_metadata::client::WatchItem;
use futures::StreamExt as _;

use super::{Inner, lock};

/// A cache a front end must drop because the namespace changed (anywhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inval {
    /// Attributes or data of this inode.
    Inode(Ino),
    /// Attributes of this inode only: a change this node made itself, whose data the
    /// kernel's page cache already holds (the writes went through it), so its cached pages
    /// stay.
    Attrs(Ino),
    /// The name `name` in directory `parent`.
    Entry(Ino, Vec<u8>),
    /// Everything (changes were missed).
    All,
}

/// Runs [`watch_loop`] on a thread of its own with a single-threaded runtime. A change set
/// then wakes that one thread (the node's thread wakes it directly when the metadata node is
/// in this process) instead of a worker of the shared runtime, which in turn wakes a second
/// worker to look for more work: measured through an `elea up` mount, one context switch
/// and up to 40 microseconds of CPU per create fewer (docs/BENCHMARKS.md). Falls back to a
/// task of the shared runtime if the thread cannot be started.
pub(super) fn spawn<M: MetaApi, D: DataPath>(weak: Weak<Inner<M, D>>, from_seq: u64) {
    let fallback = weak.clone();
    let started = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            std::thread::Builder::new()
                .name("elea-watch".into())
                .spawn(move || rt.block_on(watch_loop(weak, from_seq)))
                .map_err(|e| e.to_string())
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the watch thread; following changes on the runtime");
        tokio::spawn(watch_loop(fallback, from_seq));
    }
}

/// Follows the volume's change stream: drops cached inodes, wakes lock waiters and passes
/// every change on to the front end. Reconnects (resuming at the last sequence) when the
/// stream breaks.
async fn watch_loop<M: MetaApi, D: DataPath>(weak: Weak<Inner<M, D>>, mut seq: u64) {
    loop {
        let (meta, vol) = match weak.upgrade() {
            Some(i) if !i.stopped.load(Ordering::Acquire) => (i.meta.clone(), i.vol),
            _ => return,
        };
        let stream = match meta.watch(vol, seq).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "watch: cannot subscribe; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        futures::pin_mut!(stream);
        loop {
            let item = {
                let Some(i) = weak.upgrade() else { return };
                tokio::select! {
                    it = stream.next() => it,
                    () = i.stop.notified() => return,
                }
            };
            let Some(i) = weak.upgrade() else { return };
            match item {
                Some(Ok(WatchItem::Changes { seq: s, changes, client })) => {
                    seq = s;
                    let sink = lock(&i.sink).clone();
                    // This node's own changes went through the kernel, which updated its
                    // caches as it sent them: its cached pages and entries are right, only
                    // the attributes (times, the size as committed) need fetching again.
                    let own = client != 0 && client == i.meta.client_id();
                    for ch in changes {
                        match ch {
                            elea_fsm::Change::Inode(ino) => {
                                let node = lock(&i.inodes).get(&ino).cloned();
                                if let Some(n) = node {
                                    n.invalidate();
                                    n.changed.notify_waiters();
                                }
                                if let Some(f) = &sink {
                                    f(if own { Inval::Attrs(ino) } else { Inval::Inode(ino) });
                                }
                            }
                            elea_fsm::Change::Entry { parent, name } => {
                                if let Some(f) = &sink
                                    && !own
                                {
                                    f(Inval::Entry(parent, name));
                                }
                            }
                        }
                    }
                }
                Some(Ok(WatchItem::Reset)) => {
                    let nodes: Vec<_> = lock(&i.inodes).values().cloned().collect();
                    for n in nodes {
                        n.invalidate();
                        n.changed.notify_waiters();
                    }
                    if let Some(f) = lock(&i.sink).clone() {
                        f(Inval::All);
                    }
                    if let Ok(v) = i.meta.volume_by_id(vol).await {
                        seq = v.change_seq;
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "watch stream broke; resubscribing");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
