//! Background workers of a cache node. Each is a struct that owns its state and implements
//! [`Worker`]: one round of work, run every period (or earlier when it is woken), backing off
//! while the metadata service or an object store fails, stopping with the node; [`run`]
//! records every round on the node's [`WorkerBoard`], which `elea status` shows.
//!
//! - [`Tiering`]: uploads the staged blocks this node is primary for (the first live node
//!   in the block's replica list) once they are older than the volume's `tier-after`, when
//!   staging is above its high watermark, or on request; records them tiered in one
//!   metadata proposal per batch; only then frees every staged copy.
//! - [`Repair`] (re-replication): for a block with fewer live copies than its volume's
//!   replica count, the first live holder copies it to the next node in placement order and
//!   records the new replica.
//! - [`Gc`]: on the lowest-numbered live node only, deletes the blocks of slices deleted
//!   longer than the delay ago (staged copies and objects), then forgets the slices.
//!   Incremental: it pages through the metadata list of deleted slices, never a bucket. A
//!   slice whose object delete fails is retried after a delay that doubles per failure, up
//!   to five minutes, instead of every round.
//! - [`Spill`]: stages the inline slices (small writes committed with their bytes in
//!   metadata) this node is first for in placement order on the volume's replica count of
//!   nodes of its site, and records them there in one proposal per page, so their bytes
//!   leave metadata within moments.
//! - [`Reconcile`]: drops staged copies metadata no longer lists here (tiered, replaced,
//!   deleted, or never committed), each after a grace period. Then it scrubs: every block
//!   metadata lists here, committed longer than the same grace ago, must have its staged
//!   file (of the right size); for one that does not, this node leaves the block's holder
//!   list (`DropReplica`) so repair restores the missing copy.
//! - [`Migrate`]: copies the objects of the migrations this node is first for (by job id,
//!   among the live nodes of the job's site) from the source store to the target, verified,
//!   paced to the job's rate limit; records each batch with the cursor it reached; ends each
//!   pass by asking metadata to finish (nothing left in the source alone detaches it); deletes
//!   a detached source's objects once the job's delay is over, when it asked for that.
//! - [`StoreProbe`]: every volume's object stores must take a write, a read and a delete
//!   from this node, at start and every few minutes; a failing one shows on the board.
//! - [`LostCopies`]: a copy staging discards as torn or corrupt (at open or on a read) is
//!   reported the same way as soon as it is found (best effort: the scrub catches a report
//!   that fails).

mod gc;
mod migrate;
mod reconcile;
mod repair;
mod spill;
mod stores;
mod tiering;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elea_fsm::StagedBlock;
use elea_metadata::MetaApi as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::CacheError;
use crate::node::LIST_GROUPS_WAIT;
use crate::node::staging::BlockId;
use crate::node::{Node, sleep_or_stop};
use crate::proto::{BlockRef, GetRequest};

pub(crate) use gc::Gc;
pub(crate) use migrate::Migrate;
pub(crate) use reconcile::{LostCopies, Reconcile};
pub(crate) use repair::Repair;
pub(crate) use spill::Spill;
pub(crate) use stores::StoreProbe;
pub(crate) use tiering::Tiering;

/// Longest wait between failed rounds.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A background worker: what one round does, how often, and what wakes it early.
pub(crate) trait Worker: Send + 'static {
    /// Its name on the board and in logs.
    const NAME: &'static str;

    /// The time between rounds while they succeed.
    fn period(&self) -> Duration;

    /// One round; returns how many items it handled.
    fn round(&mut self) -> impl Future<Output = Result<usize, CacheError>> + Send;

    /// Resolves when the next round should start before its period is over (never, unless
    /// the worker says otherwise).
    fn woken(&self) -> impl Future<Output = ()> + Send + 'static {
        std::future::pending()
    }
}

/// Starts every worker.
pub(crate) fn spawn_all(node: &Arc<Node>, stop: &watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(run(Tiering::new(node.clone()), node.clone(), stop.clone())),
        tokio::spawn(run(Repair::new(node.clone()), node.clone(), stop.clone())),
        tokio::spawn(run(Spill::new(node.clone()), node.clone(), stop.clone())),
        tokio::spawn(run(Gc::new(node.clone()), node.clone(), stop.clone())),
        tokio::spawn(run(Reconcile::new(node.clone()), node.clone(), stop.clone())),
        tokio::spawn(run(LostCopies::new(node.clone()), node.clone(), stop.clone())),
        tokio::spawn(run(StoreProbe::new(node.clone()), node.clone(), stop.clone())),
        tokio::spawn(run(Migrate::new(node.clone()), node.clone(), stop.clone())),
    ]
}

/// What a worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPhase {
    /// Waiting for its next round.
    Idle,
    /// In a round.
    Busy,
    /// Waiting longer than its period after failed rounds.
    Backoff,
}

impl WorkerPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Backoff => "backoff",
        }
    }
}

/// A worker's state as `elea status` shows it.
#[derive(Debug, Clone)]
pub struct WorkerStatus {
    pub phase: WorkerPhase,
    pub rounds: u64,
    /// Items the last successful round handled.
    pub last_items: u64,
    pub consecutive_errors: u64,
    pub last_error: Option<(String, Instant)>,
}

impl WorkerStatus {
    fn new() -> Self {
        Self { phase: WorkerPhase::Idle, rounds: 0, last_items: 0, consecutive_errors: 0, last_error: None }
    }
}

/// Every worker's status, by name (what the block service's `Workers` call reports).
#[derive(Debug, Default)]
pub struct WorkerBoard(Mutex<BTreeMap<&'static str, WorkerStatus>>);

impl WorkerBoard {
    fn update(&self, name: &'static str, f: impl FnOnce(&mut WorkerStatus)) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(name).or_insert_with(WorkerStatus::new));
    }

    /// A copy of every worker's status, by name.
    pub fn snapshot(&self) -> Vec<(&'static str, WorkerStatus)> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (*k, v.clone())).collect()
    }
}

/// Runs `w` until the node stops: a round every period, doubling the wait after each failed
/// round up to [`MAX_BACKOFF`], an early round when the worker is woken; every round's
/// outcome recorded on the node's board.
async fn run<W: Worker>(mut w: W, node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let board = &node.workers;
    let period = w.period();
    let mut wait = period;
    board.update(W::NAME, |_| {});
    loop {
        board.update(W::NAME, |s| s.phase = WorkerPhase::Busy);
        match w.round().await {
            Ok(n) => {
                if n > 0 {
                    tracing::debug!(worker = W::NAME, items = n, "round done");
                }
                wait = period;
                board.update(W::NAME, |s| {
                    s.phase = WorkerPhase::Idle;
                    s.rounds += 1;
                    s.last_items = n as u64;
                    s.consecutive_errors = 0;
                });
            }
            Err(e) => {
                wait = wait.saturating_mul(2).min(MAX_BACKOFF);
                tracing::warn!(worker = W::NAME, error = %e, retry_in = ?wait, "round failed");
                board.update(W::NAME, |s| {
                    s.phase = WorkerPhase::Backoff;
                    s.rounds += 1;
                    s.consecutive_errors += 1;
                    s.last_error = Some((e.to_string(), Instant::now()));
                });
            }
        }
        tokio::select! {
            stopping = sleep_or_stop(&mut stop, wait) => if stopping { return },
            () = w.woken() => {}
        }
    }
}

fn ms_of(t: elea_common::Timespec) -> u64 {
    u64::try_from(t.sec).unwrap_or(0) * 1000 + u64::from(t.nsec) / 1_000_000
}

/// What the workers ask of the node they run on.
impl Node {
    fn alive_set(&self) -> HashSet<u64> {
        self.registry().into_iter().filter(|n| n.alive).map(|n| n.id).collect()
    }

    /// The metadata client of every Raft group: the control group's and each volume group's,
    /// as last listed when the control group does not answer within [`LIST_GROUPS_WAIT`] or
    /// fails (its site lost): the volume groups must go on hearing from this node, and its
    /// workers go on with them.
    pub(crate) async fn group_clients(&self) -> Vec<elea_metadata::client::MetaClient> {
        match tokio::time::timeout(LIST_GROUPS_WAIT, self.meta.all_groups()).await {
            Ok(Ok(g)) => g,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "listing the volume groups");
                self.meta.all_groups_cached()
            }
            Err(_) => self.meta.all_groups_cached(),
        }
    }

    /// The staged blocks of every group that answers (one that does not is logged and left
    /// for the next round: its blocks are not acted upon, nothing else waits for it); an
    /// error only when none answers.
    async fn staged_blocks_all(&self) -> Result<Vec<StagedBlock>, CacheError> {
        let mut out = Vec::new();
        let mut first_err = None;
        let mut answered = false;
        for meta in self.group_clients().await {
            match meta.staged_blocks().await {
                Ok(b) => {
                    answered = true;
                    out.extend(b);
                }
                Err(e) => {
                    tracing::warn!(group = meta.group(), error = %e, "listing a group's staged blocks");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if !answered => Err(e.into()),
            _ => Ok(out),
        }
    }

    /// A staged block's bytes: from here, or from another holder.
    async fn staged_bytes(&self, b: &StagedBlock) -> Result<Vec<u8>, CacheError> {
        if let Ok(Some((_, d))) = self.staging.get((b.slice, b.index)).await {
            return Ok(d);
        }
        let peers: Vec<String> =
            b.nodes.iter().filter(|n| **n != self.cfg.node_id).filter_map(|n| self.addr_of(*n)).collect();
        let req = GetRequest {
            block: Some(BlockRef { vol: b.vol, slice: b.slice, index: b.index }),
            len: b.len,
            tiered_stores: vec![],
            peers,
            cache: false,
            range: None,
        };
        self.read_block(&req).await
    }

    /// Tells metadata this node no longer holds these blocks' staged copies, one proposal
    /// each; a failure is logged and left to the next scrub. Returns how many were recorded.
    async fn report_lost(&self, ids: &[BlockId]) -> usize {
        let me = self.cfg.node_id;
        let mut n = 0;
        for &(slice, index) in ids {
            match self.meta.drop_replica(slice, index, me).await {
                Ok(()) => {
                    tracing::warn!(slice, index, "lost a staged copy: removed this node from its holders");
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(slice, index, error = %e, "reporting a lost staged copy failed; the scrub retries")
                }
            }
        }
        n
    }
}
