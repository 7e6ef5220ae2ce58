//! The node driver: one OS thread per Raft group owns its [`GroupCore`] and runs the Ready
//! loop. Requests arrive on a channel; proposals that arrive while the thread is busy (for
//! example in an fsync) are taken together and share the next durable write.
//!
//! A dedicated thread rather than a tokio task: the loop blocks in fsync, and on a two-core
//! machine a blocked runtime worker would stall the gRPC service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use elea_common::{NodeId, Timespec};
use elea_fsm::{Command, Op, OpResult, Query, StateMachine};
use raft::prelude::Message;
use tokio::sync::oneshot;

use super::core::{CoreError, CoreStatus, Event, GroupCore, Member, MemberChange, Write};
use super::inbox::{self, Inbox, Mailbox};
use super::storage::{GroupStorage, StoreError};
use super::transport::Transport;
use crate::watch::WatchHub;

/// Driver settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// One Raft tick.
    pub tick: Duration,
    /// How often the leader expires sessions whose lease ended.
    pub expire_every: Duration,
    /// How long a leader waits for an append to carry a new commit index to its followers
    /// before it sends one for that alone (see `CoreConfig::defer_commit_broadcast`, which
    /// the service sets unless this is zero). Bounds how much later than the leader a
    /// follower applies an entry, and so how much later a watch served by a follower
    /// announces it.
    pub announce_commit_after: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_millis(100),
            expire_every: Duration::from_secs(1),
            announce_commit_after: Duration::from_millis(2),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, CoreError>>;

/// A request to the group thread.
pub enum NodeMsg {
    Write(Command, Reply<(OpResult, u64)>),
    Read(Query, Reply<OpResult>),
    Conf(MemberChange, NodeId, String, Reply<Vec<Member>>),
    TransferLeader(NodeId, Reply<()>),
    Status(oneshot::Sender<CoreStatus>),
    /// Messages from a peer.
    Raft(Vec<Message>),
    /// A link a peer opened to us, its hello accepted: the group thread reads it from now on.
    Link(super::link::InStream, NodeId),
    Unreachable(NodeId),
    SnapshotDone(NodeId, bool),
    /// Several requests delivered with one channel operation.
    Many(Vec<NodeMsg>),
    /// The writer made everything up to this Ready durable.
    Persisted(u64),
    /// The writer could not write: the group must stop.
    WriterFailed(String),
    Stop,
}

/// An answer still to come from the group thread.
pub struct Waiting<T>(oneshot::Receiver<Result<T, CoreError>>);

impl<T> Future for Waiting<T> {
    type Output = Result<T, CoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(CoreError::Store("the raft group has stopped".into()))))
    }
}

/// Reads answered on the caller's thread: while the group thread has published a read lease
/// ([`GroupCore::local_read_until`]), a read takes the applied state's read lock and answers
/// from it, with no hand-off to the group thread and back.
struct LocalReads {
    /// The group thread's clock counts nanoseconds since this instant.
    base: Instant,
    /// Lease end on that clock (exclusive); 0 = no lease.
    until: AtomicU64,
    /// A read was answered here since the group thread last looked (it renews the lease).
    used: AtomicBool,
    state: Arc<RwLock<StateMachine>>,
}

impl LocalReads {
    fn clock(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn try_read(&self, q: &Query) -> Option<OpResult> {
        if self.until.load(Ordering::Acquire) == 0 {
            return None;
        }
        // A poisoned lock: an apply panicked half-way; the group thread answers (or fails).
        let state = self.state.read().ok()?;
        // Checked with the state held: nothing applied after this instant is in it.
        if self.clock() >= self.until.load(Ordering::Acquire) {
            return None;
        }
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        Some(state.query(q))
    }
}

/// A cheap, cloneable handle to a running group.
#[derive(Clone)]
pub struct NodeHandle {
    tx: Mailbox,
    local: Arc<LocalReads>,
    /// Member id -> address, refreshed by the thread after every membership change.
    members: Arc<RwLock<HashMap<NodeId, String>>>,
    pub hub: Arc<WatchHub>,
}

impl NodeHandle {
    fn send(&self, msg: NodeMsg) -> Result<(), CoreError> {
        self.tx.send(msg).map_err(|_| CoreError::Store("the raft group has stopped".into()))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> NodeMsg) -> Result<T, CoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| CoreError::Store("the raft group has stopped".into()))?
    }

    pub async fn write(&self, cmd: Command) -> Result<(OpResult, u64), CoreError> {
        self.call(|r| NodeMsg::Write(cmd, r)).await
    }

    /// A linearizable read: answered here within the leader's read lease, otherwise by the
    /// group thread.
    pub async fn read(&self, q: Query) -> Result<OpResult, CoreError> {
        if let Some(r) = self.local.try_read(&q) {
            return Ok(r);
        }
        self.call(|r| NodeMsg::Read(q, r)).await
    }

    /// Answers `q` from this replica's applied state as it is, with no check that it is
    /// current (a follower's may lag): for what only has to be eventually seen, such as the
    /// groups a node must host.
    pub fn query_applied(&self, q: &Query) -> Option<OpResult> {
        Some(self.local.state.read().ok()?.query(q))
    }

    /// Submits many commands in one message; each answer arrives on its own receiver.
    pub fn write_many(&self, cmds: Vec<Command>) -> Vec<Waiting<(OpResult, u64)>> {
        let mut msgs = Vec::with_capacity(cmds.len());
        let waits = cmds
            .into_iter()
            .map(|c| {
                let (tx, rx) = oneshot::channel();
                msgs.push(NodeMsg::Write(c, tx));
                Waiting(rx)
            })
            .collect();
        let _ = self.send(NodeMsg::Many(msgs));
        waits
    }

    /// Submits many queries in one message (they share one ReadIndex round), or answers them
    /// here within the leader's read lease.
    pub fn read_many(&self, qs: Vec<Query>) -> Vec<Waiting<OpResult>> {
        let mut msgs = Vec::with_capacity(qs.len());
        let waits = qs
            .into_iter()
            .map(|q| {
                let (tx, rx) = oneshot::channel();
                match self.local.try_read(&q) {
                    Some(r) => {
                        let _ = tx.send(Ok(r));
                    }
                    None => msgs.push(NodeMsg::Read(q, tx)),
                }
                Waiting(rx)
            })
            .collect();
        if !msgs.is_empty() {
            let _ = self.send(NodeMsg::Many(msgs));
        }
        waits
    }

    pub async fn change_membership(
        &self,
        change: MemberChange,
        id: NodeId,
        addr: String,
    ) -> Result<Vec<Member>, CoreError> {
        self.call(|r| NodeMsg::Conf(change, id, addr, r)).await
    }

    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), CoreError> {
        self.call(|r| NodeMsg::TransferLeader(to, r)).await
    }

    pub async fn status(&self) -> Result<CoreStatus, CoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(NodeMsg::Status(tx))?;
        rx.await.map_err(|_| CoreError::Store("the raft group has stopped".into()))
    }

    pub fn deliver(&self, msgs: Vec<Message>) -> Result<(), CoreError> {
        self.send(NodeMsg::Raft(msgs))
    }

    pub fn report(&self, msg: NodeMsg) {
        let _ = self.tx.send(msg);
    }

    pub fn addr_of(&self, id: NodeId) -> Option<String> {
        self.members.read().ok()?.get(&id).cloned()
    }

    /// Whether the member book lists `id` at `addr`; `None` when it does not list `id`.
    pub fn addr_is(&self, id: NodeId, addr: &str) -> Option<bool> {
        self.members.read().ok()?.get(&id).map(|a| a == addr)
    }

    pub fn stop(&self) {
        let _ = self.tx.send(NodeMsg::Stop);
    }
}

enum Waiter {
    Write(Reply<(OpResult, u64)>),
    Read(Reply<OpResult>),
    Conf(Reply<Vec<Member>>),
}

/// Starts the group thread. The returned receiver resolves when the thread has ended, for
/// whatever reason (a stop request or a fatal storage error).
pub fn spawn(
    core: GroupCore,
    cfg: NodeConfig,
    transport: Transport,
) -> std::io::Result<(NodeHandle, std::thread::JoinHandle<()>, oneshot::Receiver<()>)> {
    let (ended_tx, ended_rx) = oneshot::channel();
    let (tx, rx) = inbox::new(core.node_id())?;
    let members = Arc::new(RwLock::new(HashMap::new()));
    let hub = Arc::new(WatchHub::new());
    let local = Arc::new(LocalReads {
        base: Instant::now(),
        until: AtomicU64::new(0),
        used: AtomicBool::new(false),
        state: core.shared_state(),
    });
    let handle = NodeHandle { tx, local: local.clone(), members: members.clone(), hub: hub.clone() };
    transport.attach(handle.clone());
    let writer = core.async_writes().then(|| {
        let (wtx, wrx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let (store, node_tx, t, q) = (core.storage(), handle.tx.clone(), transport.clone(), queued.clone());
        let name = format!("raft-writer-{}", core.node_id());
        let join =
            std::thread::Builder::new().name(name).spawn(move || write_loop(store, wrx, node_tx, t, &q))?;
        Ok::<_, std::io::Error>((Writer { tx: wtx, queued, store: core.storage() }, join))
    });
    let writer = writer.transpose()?;
    let name = format!("raft-{}", core.node_id());
    let join = std::thread::Builder::new().name(name).spawn(move || {
        let (w, wjoin) = writer.map_or((None, None), |(w, j)| (Some(w), Some(j)));
        run(core, cfg, rx, transport, Published { members, hub, local: &local }, w);
        local.until.store(0, Ordering::Release);
        // The writer finishes what it was given (dropping its channel ends its loop).
        if let Some(j) = wjoin {
            let _ = j.join();
        }
        let _ = ended_tx.send(());
    })?;
    Ok((handle, join, ended_rx))
}

/// The writer thread: makes the core's disk work durable in order, taking everything queued
/// into one log batch (one fsync), then sends the messages that had to wait for it and
/// tells the group thread how far it got.
fn write_loop(
    store: GroupStorage,
    rx: mpsc::Receiver<Vec<Write>>,
    node: Mailbox,
    transport: Transport,
    queued: &AtomicUsize,
) {
    while let Ok(mut items) = rx.recv() {
        let mut taken = 1;
        while let Ok(more) = rx.try_recv() {
            items.extend(more);
            taken += 1;
        }
        match persist(&store, &transport, items) {
            Ok(number) => {
                if let Some(n) = number {
                    let _ = node.send(NodeMsg::Persisted(n));
                }
            }
            Err(e) => {
                let _ = node.send(NodeMsg::WriterFailed(e.to_string()));
                return;
            }
        }
        // Only after `Persisted` is on its way: the group thread writes on its own only when
        // nothing is queued here (see `run`).
        queued.fetch_sub(taken, Ordering::AcqRel);
    }
}

/// Makes `items` durable in one log batch, then sends the messages that waited for it.
/// Returns the last Ready number they complete.
fn persist(
    store: &GroupStorage,
    transport: &Transport,
    items: Vec<Write>,
) -> Result<Option<u64>, StoreError> {
    let mut jobs = Vec::new();
    let mut msgs = Vec::new();
    let mut number = None;
    for item in items {
        match item {
            Write::Disk(job) => jobs.push(job),
            Write::Persisted { number: n, msgs: m } => {
                msgs.extend(m);
                number = Some(n);
            }
        }
    }
    store.write(jobs)?;
    if !msgs.is_empty() {
        transport.send(msgs);
    }
    Ok(number)
}

/// The group thread's side of the writer thread.
struct Writer {
    tx: mpsc::Sender<Vec<Write>>,
    /// Batches sent and not yet fully done by the writer (including its `Persisted` report).
    queued: Arc<AtomicUsize>,
    store: GroupStorage,
}

/// What the group thread keeps up to date for the group's handles.
struct Published<'a> {
    members: Arc<RwLock<HashMap<NodeId, String>>>,
    hub: Arc<WatchHub>,
    local: &'a LocalReads,
}

fn run(
    mut core: GroupCore,
    cfg: NodeConfig,
    mut inbox: Inbox,
    transport: Transport,
    out: Published<'_>,
    writer: Option<Writer>,
) {
    let Published { members, hub, local } = out;
    let mut waiters: HashMap<u64, Waiter> = HashMap::new();
    let mut next_token: u64 = 1;
    let mut next_tick = Instant::now() + cfg.tick;
    let mut next_expire = Instant::now() + cfg.expire_every;
    let mut book_epoch = u64::MAX;
    let mut clock = super::clock::LeaderClock::default();
    // When to send followers a commit index no append has carried yet.
    let mut announce_at: Option<Instant> = None;
    loop {
        let wake = announce_at.map_or(next_tick, |a| a.min(next_tick));
        let timeout = wake.saturating_duration_since(Instant::now());
        let mut batch: Vec<NodeMsg> = Vec::new();
        if inbox.wait(timeout, &mut batch, 8192).is_err() {
            return;
        }
        let (wall, mono) = (Timespec::now(), Instant::now());
        // Read after taking the batch: every request in it arrived before this instant, which
        // is what the read lease is checked against.
        core.set_clock(local.clock());
        if local.used.swap(false, Ordering::Relaxed) {
            core.note_local_reads();
        }
        for msg in batch {
            match msg {
                NodeMsg::Write(cmd, reply) => {
                    let t = next_token;
                    next_token += 1;
                    waiters.insert(t, Waiter::Write(reply));
                    let now = stamp(&mut core, &mut clock, wall, mono);
                    core.propose(t, cmd, now);
                }
                NodeMsg::Read(q, reply) => {
                    let t = next_token;
                    next_token += 1;
                    waiters.insert(t, Waiter::Read(reply));
                    core.read(t, q);
                }
                NodeMsg::Conf(change, id, addr, reply) => {
                    let t = next_token;
                    next_token += 1;
                    waiters.insert(t, Waiter::Conf(reply));
                    core.change_membership(t, change, id, addr);
                }
                NodeMsg::TransferLeader(to, reply) => {
                    let _ = reply.send(core.transfer_leader(to));
                }
                NodeMsg::Status(reply) => {
                    let _ = reply.send(core.status());
                }
                NodeMsg::Raft(msgs) => {
                    for m in msgs {
                        core.step(m);
                    }
                }
                NodeMsg::Link(stream, from) => inbox.adopt(stream, from),
                NodeMsg::Unreachable(id) => core.report_unreachable(id),
                NodeMsg::SnapshotDone(id, ok) => core.report_snapshot(id, ok),
                NodeMsg::Many(_) => {}
                NodeMsg::Persisted(n) => core.on_persisted(n),
                NodeMsg::WriterFailed(e) => {
                    tracing::error!(error = %e, "raft log write failed; stopping");
                    for (_, w) in waiters.drain() {
                        fail(w, CoreError::Store(e.clone()));
                    }
                    return;
                }
                NodeMsg::Stop => {
                    tracing::info!("raft group stopping");
                    return;
                }
            }
        }
        if Instant::now() >= next_tick {
            core.tick();
            next_tick += cfg.tick;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + cfg.tick;
            }
        }
        if announce_at.is_some_and(|a| Instant::now() >= a) {
            announce_at = None;
            core.announce_commit();
        }
        if core.is_leader() && Instant::now() >= next_expire {
            next_expire = Instant::now() + cfg.expire_every;
            let now = stamp(&mut core, &mut clock, wall, mono);
            let cmd = Command { client: 0, seq: 0, acked_below: 0, time: now, op: Op::ExpireSessions };
            core.propose(0, cmd, now);
        }
        // Process, send, answer; then make the step's log writes durable. While the writer has
        // nothing queued, a node whose own write is the only one its commits wait for (the sole
        // voter) or that only acknowledges (a follower) writes here, saving two thread hand-offs
        // per commit, and processes again to apply and answer what the write committed. A
        // leader of several voters leaves the fsync to the writer, so that acknowledgements
        // from the followers, which can commit without it, are handled meanwhile.
        loop {
            if let Err(e) = core.process() {
                // A storage failure: stop rather than acknowledge anything not durable.
                tracing::error!(error = %e, "raft group failed; stopping");
                local.until.store(0, Ordering::Release);
                for (_, w) in waiters.drain() {
                    fail(w, e.clone());
                }
                return;
            }
            // Before this step's messages leave: a leader transfer among them ends the lease.
            local.until.store(core.local_read_until(), Ordering::Release);
            let msgs = core.take_messages();
            if !msgs.is_empty() {
                transport.send(msgs);
            }
            deliver(&mut core, &mut waiters, &hub);
            let writes = core.take_writes();
            let Some(w) = writer.as_ref().filter(|_| !writes.is_empty()) else { break };
            if w.queued.load(Ordering::Acquire) == 0 && (core.sole_voter() || !core.is_leader()) {
                match persist(&w.store, &transport, writes) {
                    Ok(Some(n)) => core.on_persisted(n),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "raft log write failed; stopping");
                        local.until.store(0, Ordering::Release);
                        for (_, w) in waiters.drain() {
                            fail(w, CoreError::Store(e.to_string()));
                        }
                        return;
                    }
                }
                continue;
            }
            w.queued.fetch_add(1, Ordering::AcqRel);
            if w.tx.send(writes).is_err() {
                tracing::error!("raft writer stopped; stopping");
                local.until.store(0, Ordering::Release);
                return;
            }
            break;
        }
        // Under load the next proposal's append carries the commit index well before this.
        if !core.commit_unannounced() {
            announce_at = None;
        } else if announce_at.is_none() {
            announce_at = Some(Instant::now() + cfg.announce_commit_after);
        }
        // Refresh the shared address book when membership changed.
        if core.members_epoch() != book_epoch {
            book_epoch = core.members_epoch();
            if let Ok(mut book) = members.write() {
                book.clear();
                book.extend(core.members().map(|m| (m.id, m.addr.clone())));
            }
        }
    }
}

/// Hands the core's events to their waiters and the watch hub.
fn deliver(core: &mut GroupCore, waiters: &mut HashMap<u64, Waiter>, hub: &WatchHub) {
    for ev in core.take_events() {
        match ev {
            Event::Write { token, result } => {
                if let Some(Waiter::Write(r)) = waiters.remove(&token) {
                    let _ = r.send(result);
                }
            }
            Event::Read { token, result } => {
                if let Some(Waiter::Read(r)) = waiters.remove(&token) {
                    let _ = r.send(result);
                }
            }
            Event::Conf { token, result } => {
                if let Some(Waiter::Conf(r)) = waiters.remove(&token) {
                    let _ = r.send(result);
                }
            }
            Event::Changes(sets) => hub.publish(sets),
            Event::Reset => hub.reset(),
        }
    }
}

fn fail(w: Waiter, e: CoreError) {
    match w {
        Waiter::Write(r) => {
            let _ = r.send(Err(e));
        }
        Waiter::Read(r) => {
            let _ = r.send(Err(e));
        }
        Waiter::Conf(r) => {
            let _ = r.send(Err(e));
        }
    }
}

/// The time of a command this node proposes now: the leader's bounded clock (see
/// [`super::clock`]). The first command of each term of leadership is preceded by the grace
/// period every new leader gives the sessions (`Op::ExtendSessions`).
fn stamp(
    core: &mut GroupCore,
    clock: &mut super::clock::LeaderClock,
    wall: Timespec,
    mono: Instant,
) -> Timespec {
    if !core.is_leader() {
        return wall;
    }
    if clock.term() != core.term() {
        let state_clock = core.state().clock();
        clock.start_term(core.term(), state_clock, wall, mono);
        let now = clock.stamp(wall, mono);
        let cmd = Command { client: 0, seq: 0, acked_below: 0, time: now, op: Op::ExtendSessions };
        core.propose(0, cmd, now);
        tracing::info!(term = core.term(), "leading: sessions get a grace period to renew");
    }
    clock.stamp(wall, mono)
}
