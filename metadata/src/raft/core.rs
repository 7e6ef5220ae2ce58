//! The Raft core of one group: a raft-rs `RawNode`, the state machine it drives, and the
//! bookkeeping that turns applied entries into replies. Synchronous and deterministic: it never
//! reads a clock, sleeps or does network I/O. A driver feeds it inputs (proposals, reads, peer
//! messages, ticks, the current time and a monotonic clock) and takes its outputs (messages to send, replies, change
//! sets). The node thread ([`super::node`]) is one driver; the simulated network in the tests is
//! another.
//!
//! Ready handling follows raft-rs' documented order: send messages, install a snapshot, apply
//! committed entries, persist entries and hard state (one durable write for everything in the
//! Ready: group commit), send persisted messages, advance, then the light ready.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use elea_common::{GroupId, NodeId, Timespec};
use elea_fsm::{ChangeSet, Command, OpResult, Query, StateMachine};
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{ProgressState, RawNode, ReadOnlyOption, StateRole};
use serde::{Deserialize, Serialize};

use super::storage::{DiskJob, GroupStorage, StoreError};

/// Tuning of one group.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub node_id: NodeId,
    pub group: GroupId,
    /// Ticks without a leader before an election (randomized up to 2x by raft-rs). With
    /// check-quorum a follower ignores votes for this long after hearing from a leader, so a
    /// failover can take two timeouts: 6 ticks of 100 ms keeps even that near 2.4 s.
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Bounds of the randomized election timeout, `[min, max)` ticks; 0 = raft-rs' defaults
    /// (`election_tick` and `2 * election_tick`). raft-rs draws the timeout from `thread_rng`,
    /// so a deterministic driver (the simulation tests) sets `max = min + 1` and randomizes
    /// `min` itself from its seed.
    pub min_election_tick: usize,
    pub max_election_tick: usize,
    /// Take a snapshot after this many applied entries.
    pub snapshot_every: u64,
    /// Or once the entries applied since the last one hold this many bytes (small writes
    /// carry their data inside their commands, so entries can be large).
    pub snapshot_bytes: u64,
    /// Entries kept before the snapshot point, for followers that lag slightly.
    pub compact_margin: u64,
    /// Largest append message (bytes).
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    /// Hand disk writes to the driver ([`GroupCore::take_writes`]) instead of doing them
    /// inline: the driver's writer thread makes them durable while this core keeps going.
    pub async_writes: bool,
    /// How long, in units of the driver's monotonic clock ([`GroupCore::set_clock`]), a
    /// leader may answer reads locally after a quorum acknowledged a heartbeat round it
    /// started; 0 = every read takes a ReadIndex round. Must stay below `election_tick - 2`
    /// ticks (see [`GroupCore::read`]); [`CoreConfig::lease_for_tick`] picks a safe value.
    pub read_lease: u64,
    /// A leader does not send an append of its own just to tell followers a new commit
    /// index: the next append carries it. The driver asks [`GroupCore::commit_unannounced`]
    /// and, when no append followed soon enough, calls [`GroupCore::announce_commit`].
    /// Under load this saves two messages and their answers per commit round; followers
    /// apply (and announce on their watch streams) that much later.
    pub defer_commit_broadcast: bool,
}

impl CoreConfig {
    pub fn new(node_id: NodeId, group: GroupId) -> Self {
        Self {
            node_id,
            group,
            election_tick: 6,
            heartbeat_tick: 2,
            min_election_tick: 0,
            max_election_tick: 0,
            snapshot_every: 20_000,
            snapshot_bytes: 256 << 20,
            compact_margin: 2_000,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            async_writes: false,
            read_lease: 0,
            defer_commit_broadcast: false,
        }
    }

    /// A read lease for a clock counting `tick` units per tick: 80% of `election_tick - 2`
    /// ticks, leaving a fifth for clock-rate differences between nodes. A follower refuses
    /// votes (and does not campaign) until it has counted `election_tick` ticks since it last
    /// heard from the leader; at worst that is `election_tick - 2` tick periods: the driver
    /// fires an overdue tick (up to one period late) right after the message that reset the
    /// count, and the next ticks follow on the old schedule.
    pub fn lease_for_tick(&self, tick: u64) -> u64 {
        (self.election_tick.saturating_sub(2) as u64).saturating_mul(tick).saturating_mul(4) / 5
    }
}

/// A cluster member as the group knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub addr: String,
    pub learner: bool,
}

/// Why a request did not complete. Every variant is safe to retry elsewhere or later except
/// `Invalid` and `Removed`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("leadership changed before the request completed; retry")]
    Dropped,
    #[error("busy: {0}")]
    Busy(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("this node is not a member of the cluster")]
    Removed,
    #[error("storage failure: {0}")]
    Store(String),
}

/// A membership change request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberChange {
    AddVoter,
    AddLearner,
    Remove,
}

/// What the core produced; the driver routes each to whoever waits for it.
#[derive(Debug)]
pub enum Event {
    /// A proposed command was applied at `index` (or failed).
    Write {
        token: u64,
        result: Result<(OpResult, u64), CoreError>,
    },
    Read {
        token: u64,
        result: Result<OpResult, CoreError>,
    },
    Conf {
        token: u64,
        result: Result<Vec<Member>, CoreError>,
    },
    /// Applied changes, in order, for watchers.
    Changes(Vec<ChangeSet>),
    /// State was replaced by a snapshot: watchers must drop everything they cached.
    Reset,
}

/// Work for the writer thread, in order.
// Items are moved from the core to the writer once each, never kept in bulk: boxing the large
// variant would only add an allocation per write.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Write {
    /// Make this durable.
    Disk(DiskJob),
    /// Once everything before is durable: send `msgs` and report Ready `number` persisted
    /// ([`GroupCore::on_persisted`]).
    Persisted { number: u64, msgs: Vec<Message> },
}

/// What `status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct CoreStatus {
    pub node_id: NodeId,
    pub group: GroupId,
    pub role: &'static str,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub leader: Option<NodeId>,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub members: Vec<Member>,
}

/// Snapshot data: the member address book and the state machine.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    members: Vec<Member>,
    state: Vec<u8>,
}

enum PendingKind {
    Write,
    Conf,
}

struct Pending {
    term: u64,
    token: u64,
    kind: PendingKind,
}

/// A ReadIndex request in flight: when (driver clock) and in which term it started, and the
/// reads it covers (none for a round that only renews the lease).
struct ReadRound {
    started: u64,
    term: u64,
    reads: Vec<(u64, Query)>,
}

/// One Raft group on this node.
pub struct GroupCore {
    cfg: CoreConfig,
    raw: RawNode<GroupStorage>,
    /// The applied state. Shared so that a driver can answer reads inside a read lease on
    /// its callers' threads ([`GroupCore::local_read_until`]); only this core writes it.
    sm: Arc<RwLock<StateMachine>>,
    members: BTreeMap<NodeId, Member>,
    applied: u64,
    /// Proposals waiting for their entry to apply, by log index.
    pending: BTreeMap<u64, Pending>,
    /// Reads not yet covered by a ReadIndex request.
    read_queue: Vec<(u64, Query)>,
    /// Reads covered by an in-flight ReadIndex request, by its context, with the clock and
    /// term when the request started (a quorum's answer renews the read lease from then).
    reads_inflight: BTreeMap<u64, ReadRound>,
    /// Reads whose read index is known, waiting for apply to reach it.
    reads_waiting: VecDeque<(u64, Vec<(u64, Query)>)>,
    next_read_ctx: u64,
    outbox: Vec<Message>,
    events: Vec<Event>,
    role: StateRole,
    leader: Option<NodeId>,
    removed: bool,
    /// Bumped whenever the member book changes.
    members_epoch: u64,
    /// Disk work for the driver (async writes only).
    writes: Vec<Write>,
    /// Index of the latest snapshot taken or installed.
    snapshot_index: u64,
    /// Take a snapshot at the next opportunity (a member was added).
    snapshot_wanted: bool,
    /// Bytes of the entries applied since the latest snapshot.
    applied_bytes: u64,
    /// The driver's monotonic clock ([`GroupCore::set_clock`]).
    clock: u64,
    /// Reads may be answered locally while `clock < lease_until` in term `lease_term`.
    lease_until: u64,
    lease_term: u64,
    /// A term in which this node started (or was asked to start) a leader transfer: no lease
    /// in it (the transferee campaigns past its peers' vote refusal).
    transfer_term: u64,
    /// Ticks since this node last heard from a leader, or since it started.
    quiet_ticks: usize,
    /// Reads were answered outside the core since the last lease renewal.
    local_reads_seen: bool,
    /// The highest commit index sent to each peer in an append (or announced to all).
    commit_sent: HashMap<NodeId, u64>,
    /// A snapshot received from a peer, decoded while it was vetted ([`GroupCore::vet`]), so
    /// that installing it does not decode it again: (index, term, state, members).
    vetted_snapshot: Option<(u64, u64, StateMachine, Vec<Member>)>,
    /// Peer messages [`GroupCore::vet`] refused.
    refused: u64,
}

/// Terms from peers at or above this are refused: no honest cluster gets near it, and a
/// term raft-rs would add one to must not overflow.
const MAX_TERM: u64 = 1 << 62;

fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

fn store_err(e: StoreError) -> CoreError {
    CoreError::Store(e.to_string())
}

fn encode_members(members: &BTreeMap<NodeId, Member>) -> Vec<u8> {
    postcard::to_allocvec(&members.values().cloned().collect::<Vec<_>>()).unwrap_or_default()
}

fn decode_members(bytes: &[u8]) -> Result<BTreeMap<NodeId, Member>, CoreError> {
    let list: Vec<Member> =
        postcard::from_bytes(bytes).map_err(|e| CoreError::Store(format!("member list: {e}")))?;
    Ok(list.into_iter().map(|m| (m.id, m)).collect())
}

impl GroupCore {
    /// Bootstraps a new cluster on a fresh storage: `initial` lists every initial voter.
    pub fn bootstrap(storage: &mut GroupStorage, initial: &[Member]) -> Result<(), CoreError> {
        Self::bootstrap_with(storage, initial, &StateMachine::new())
    }

    /// [`GroupCore::bootstrap`] with a first state other than the empty one (a volume's own
    /// group starts with its volume) and members that may be learners. Every first member
    /// must bootstrap with the same `initial` and `state`.
    pub fn bootstrap_with(
        storage: &mut GroupStorage,
        initial: &[Member],
        state: &StateMachine,
    ) -> Result<(), CoreError> {
        let members: BTreeMap<NodeId, Member> = initial.iter().map(|m| (m.id, m.clone())).collect();
        let data = SnapshotData { members: members.values().cloned().collect(), state: state.snapshot() };
        let data = postcard::to_allocvec(&data).map_err(|e| CoreError::Invalid(e.to_string()))?;
        let voters = members.values().filter(|m| !m.learner).map(|m| m.id).collect();
        let learners = members.values().filter(|m| m.learner).map(|m| m.id).collect();
        storage.bootstrap(voters, learners, &encode_members(&members), data).map_err(store_err)
    }

    /// Opens the group from its storage: restores the latest snapshot; raft-rs then replays
    /// the committed entries after it.
    pub fn open(cfg: CoreConfig, storage: GroupStorage) -> Result<Self, CoreError> {
        let snap = storage.latest_snapshot().clone();
        let snap_index = snap.get_metadata().index;
        let (sm, mut members) = if snap_index > 0 {
            let data: SnapshotData = postcard::from_bytes(&snap.data)
                .map_err(|e| CoreError::Store(format!("snapshot data: {e}")))?;
            let sm = StateMachine::restore(&data.state).map_err(|e| CoreError::Store(e.to_string()))?;
            (sm, data.members.into_iter().map(|m| (m.id, m)).collect())
        } else {
            (StateMachine::new(), BTreeMap::new())
        };
        if let Some(blob) = storage.members_blob().map_err(store_err)? {
            // The stored book is at least as new as the snapshot's (written with each conf change).
            members = decode_members(&blob)?;
        }
        let raft_cfg = raft::Config {
            id: cfg.node_id,
            election_tick: cfg.election_tick,
            heartbeat_tick: cfg.heartbeat_tick,
            min_election_tick: cfg.min_election_tick,
            max_election_tick: cfg.max_election_tick,
            applied: snap_index,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            skip_bcast_commit: cfg.defer_commit_broadcast,
            ..Default::default()
        };
        raft_cfg.validate().map_err(|e| CoreError::Invalid(e.to_string()))?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_cfg, storage, &logger).map_err(|e| CoreError::Store(e.to_string()))?;
        Ok(Self {
            cfg,
            raw,
            sm: Arc::new(RwLock::new(sm)),
            members,
            applied: snap_index,
            pending: BTreeMap::new(),
            read_queue: Vec::new(),
            reads_inflight: BTreeMap::new(),
            reads_waiting: VecDeque::new(),
            next_read_ctx: 1,
            outbox: Vec::new(),
            events: Vec::new(),
            role: StateRole::Follower,
            leader: None,
            removed: false,
            members_epoch: 0,
            writes: Vec::new(),
            snapshot_index: snap_index,
            snapshot_wanted: false,
            applied_bytes: 0,
            clock: 0,
            lease_until: 0,
            lease_term: 0,
            transfer_term: 0,
            quiet_ticks: 0,
            local_reads_seen: false,
            commit_sent: HashMap::new(),
            vetted_snapshot: None,
            refused: 0,
        })
    }

    pub fn node_id(&self) -> NodeId {
        self.cfg.node_id
    }

    /// Another handle to this group's storage (for the writer thread).
    pub fn storage(&self) -> GroupStorage {
        self.raw.store().clone()
    }

    /// Whether disk writes go to the driver (see [`CoreConfig::async_writes`]).
    pub fn async_writes(&self) -> bool {
        self.cfg.async_writes
    }

    /// Whether raft-rs considers this node the leader right now (not as of the last Ready:
    /// a message stepped in the same batch may have deposed it).
    /// The current term.
    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader && !self.removed
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Whether this node is the group's only voter (its own log write is all a commit waits for).
    pub fn sole_voter(&self) -> bool {
        self.raw.raft.prs().is_singleton() && self.raw.raft.prs().conf().voters().contains(self.raw.raft.id)
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// Changes whenever the member book changes (to refresh copies of it).
    pub fn members_epoch(&self) -> u64 {
        self.members_epoch
    }

    /// The applied state (for tests and read-only diagnostics; clients use `read`).
    pub fn state(&self) -> RwLockReadGuard<'_, StateMachine> {
        self.sm.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> RwLockWriteGuard<'_, StateMachine> {
        self.sm.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Another handle to the applied state, for reads answered outside the core within
    /// [`Self::local_read_until`].
    pub fn shared_state(&self) -> Arc<RwLock<StateMachine>> {
        self.sm.clone()
    }

    /// Until when (driver clock, exclusive) a read may be answered from the applied state
    /// without the core: 0 when it may not.
    ///
    /// That holds while this node is a leader inside its read lease (see [`Self::read`]) and
    /// has applied everything it knows committed. A write is acknowledged only once applied
    /// here, and within the lease no other leader can acknowledge anything, so the applied
    /// state then holds every operation acknowledged before the read. It also holds every
    /// change a follower may already have announced on its watch stream: a follower learns
    /// of a commit only from this node's messages, sent after this value is published, so
    /// an entry committed but not yet applied here (the leader's own log write still under
    /// way while two followers acknowledged it) ends local reads until it is applied. A
    /// reader must hold the state's read lock when it compares the clock with this instant:
    /// an operation applied later was acknowledged later.
    ///
    /// The driver must publish this value before it sends the messages of the same step: a
    /// leader transfer ends the lease at once, before the transferee is told to campaign.
    pub fn local_read_until(&self) -> u64 {
        if !self.is_leader() || !self.in_lease() || self.applied < self.raw.raft.raft_log.committed {
            return 0;
        }
        self.lease_until
    }

    /// Tells the core that reads were answered outside it ([`Self::local_read_until`]): it
    /// renews the read lease as it does for its own steady reads.
    pub fn note_local_reads(&mut self) {
        self.local_reads_seen = true;
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    fn not_leader(&self) -> CoreError {
        if self.removed { CoreError::Removed } else { CoreError::NotLeader { leader: self.leader } }
    }

    /// Proposes a command; its `time` is set to `now`. The reply is an [`Event::Write`].
    pub fn propose(&mut self, token: u64, mut cmd: Command, now: Timespec) {
        if !self.is_leader() {
            let e = self.not_leader();
            self.events.push(Event::Write { token, result: Err(e) });
            return;
        }
        cmd.time = now;
        let data = match postcard::to_allocvec(&cmd) {
            Ok(d) => d,
            Err(e) => {
                self.events.push(Event::Write { token, result: Err(CoreError::Invalid(e.to_string())) });
                return;
            }
        };
        let before = self.raw.raft.raft_log.last_index();
        match self.raw.propose(vec![], data) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                let term = self.raw.raft.term;
                if index == before {
                    // raft-rs forwarded or dropped it without appending here.
                    self.events.push(Event::Write { token, result: Err(CoreError::Dropped) });
                } else if let Some(old) =
                    self.pending.insert(index, Pending { term, token, kind: PendingKind::Write })
                {
                    self.fail_pending(old, CoreError::Dropped);
                }
            }
            Err(e) => {
                let err = match e {
                    raft::Error::ProposalDropped => CoreError::Dropped,
                    other => CoreError::Busy(other.to_string()),
                };
                self.events.push(Event::Write { token, result: Err(err) });
            }
        }
    }

    /// The driver's monotonic clock, in the unit of [`CoreConfig::read_lease`]. Call before
    /// feeding inputs; it must never go back and must keep running while the process is
    /// stopped (CLOCK_MONOTONIC does, a tick counter does not).
    pub fn set_clock(&mut self, now: u64) {
        self.clock = self.clock.max(now);
    }

    /// Queues a linearizable read. The reply is an [`Event::Read`].
    ///
    /// Within a read lease the read is answered at the current commit index, without a
    /// heartbeat round. The lease is safe because a quorum acknowledged a heartbeat sent after
    /// the lease's start, and each of those followers then refuses to vote, or to campaign, for
    /// `election_tick` of its own ticks (raft-rs' check-quorum rule, extended by [`Self::step`]
    /// to a follower that restarted since), which is at least `election_tick - 1` tick periods:
    /// no other leader can be elected before the lease ends. A leader transfer bypasses that
    /// refusal, so a term in which one was started has no lease.
    pub fn read(&mut self, token: u64, query: Query) {
        if !self.is_leader() {
            let e = self.not_leader();
            self.events.push(Event::Read { token, result: Err(e) });
            return;
        }
        if self.in_lease() {
            let index = self.raw.raft.raft_log.committed;
            match self.reads_waiting.back_mut() {
                Some((i, batch)) if *i == index => batch.push((token, query)),
                _ => self.reads_waiting.push_back((index, vec![(token, query)])),
            }
            return;
        }
        self.read_queue.push((token, query));
    }

    fn in_lease(&self) -> bool {
        let raft = &self.raw.raft;
        self.clock < self.lease_until
            && raft.term == self.lease_term
            && raft.term != self.transfer_term
            && raft.lead_transferee.is_none()
            && raft.commit_to_current_term()
    }

    /// Proposes a membership change. The reply is an [`Event::Conf`].
    pub fn change_membership(&mut self, token: u64, change: MemberChange, id: NodeId, addr: String) {
        let result = self.try_change_membership(token, change, id, addr);
        if let Err(e) = result {
            self.events.push(Event::Conf { token, result: Err(e) });
        }
    }

    fn try_change_membership(
        &mut self,
        token: u64,
        change: MemberChange,
        id: NodeId,
        addr: String,
    ) -> Result<(), CoreError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if id == 0 {
            return Err(CoreError::Invalid("node id 0 is reserved".into()));
        }
        let conf = self.raw.raft.prs().conf().to_conf_state();
        let is_voter = conf.voters.contains(&id);
        let is_learner = conf.learners.contains(&id);
        // Asking again for what already holds (same role and address) succeeds, so a client
        // that retries after its first attempt committed is not told it failed.
        let same_addr = self.members.get(&id).is_some_and(|m| m.addr == addr);
        if same_addr
            && ((change == MemberChange::AddVoter && is_voter)
                || (change == MemberChange::AddLearner && is_learner))
        {
            let members = self.members.values().cloned().collect();
            self.events.push(Event::Conf { token, result: Ok(members) });
            return Ok(());
        }
        let change_type = match change {
            MemberChange::AddVoter => {
                if is_voter {
                    return Err(CoreError::Invalid(format!(
                        "node {id} is already a voter at another address"
                    )));
                }
                ConfChangeType::AddNode
            }
            MemberChange::AddLearner => {
                // A voter becomes a learner (a volume moving to another site keeps a copy
                // in its old one); the last voter cannot.
                if is_learner {
                    return Err(CoreError::Invalid(format!(
                        "node {id} is already a learner at another address"
                    )));
                }
                if is_voter && conf.voters.len() == 1 {
                    return Err(CoreError::Invalid("cannot make the last voter a learner".into()));
                }
                ConfChangeType::AddLearnerNode
            }
            MemberChange::Remove => {
                if !is_voter && !is_learner {
                    return Err(CoreError::Invalid(format!("node {id} is not a member")));
                }
                if is_voter && conf.voters.len() == 1 {
                    return Err(CoreError::Invalid("cannot remove the last voter".into()));
                }
                ConfChangeType::RemoveNode
            }
        };
        if change != MemberChange::Remove {
            validate_addr(&addr)?;
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(change_type);
        cc.node_id = id;
        let member = Member { id, addr, learner: change == MemberChange::AddLearner };
        cc.context = postcard::to_allocvec(&member).map_err(|e| CoreError::Invalid(e.to_string()))?.into();
        let before = self.raw.raft.raft_log.last_index();
        self.raw.propose_conf_change(vec![], cc).map_err(|e| CoreError::Busy(e.to_string()))?;
        let index = self.raw.raft.raft_log.last_index();
        if index == before {
            return Err(CoreError::Busy("proposal was dropped".into()));
        }
        let term = self.raw.raft.term;
        if let Some(old) = self.pending.insert(index, Pending { term, token, kind: PendingKind::Conf }) {
            self.fail_pending(old, CoreError::Dropped);
        }
        Ok(())
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), CoreError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if !self.raw.raft.prs().conf().to_conf_state().voters.contains(&to) {
            return Err(CoreError::Invalid(format!("node {to} is not a voter")));
        }
        // A leader in transfer takes no proposals until the target takes over or an election
        // timeout passes: to a node it has not heard from lately, that is only a stall.
        if to != self.cfg.node_id && !self.raw.raft.prs().get(to).is_some_and(|p| p.recent_active) {
            return Err(CoreError::Busy(format!("node {to} has not answered lately; leadership stays")));
        }
        self.transfer_term = self.raw.raft.term;
        self.raw.transfer_leader(to);
        Ok(())
    }

    /// Feeds a message from a peer. A message that fails [`GroupCore::vet`] is dropped with
    /// a warning: nothing a peer sends can make this node crash.
    pub fn step(&mut self, msg: Message) {
        if let Err(why) = self.vet(&msg) {
            self.refused += 1;
            tracing::warn!(
                from = msg.from,
                to = msg.to,
                kind = ?msg.get_msg_type(),
                term = msg.term,
                "dropping a raft message: {why}"
            );
            return;
        }
        if msg.get_msg_type() == MessageType::MsgTimeoutNow && self.snapshot_unpersisted() {
            // A leader transfer would campaign now (see `snapshot_unpersisted`); the leader
            // gives the transfer up after an election timeout.
            tracing::debug!("ignoring a leader transfer while a snapshot is not yet durable");
            return;
        }
        let term = self.raw.raft.term;
        match msg.get_msg_type() {
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
                if msg.term >= term =>
            {
                self.quiet_ticks = 0;
            }
            // raft-rs refuses such votes for an election timeout after hearing from a leader,
            // but not after a restart (it has not heard from one yet): refuse them for as long
            // after starting too, so a leader's read lease survives a follower's restart.
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                if msg.term > term
                    && msg.context.as_ref() != raft::CAMPAIGN_TRANSFER
                    && self.quiet_ticks < self.cfg.election_tick
                    && self.raw.raft.state != StateRole::Leader =>
            {
                tracing::debug!(from = msg.from, "ignoring a vote request: heard from a leader recently");
                return;
            }
            _ => {}
        }
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(error = %e, "raft step");
        }
    }

    /// How many peer messages were refused (see [`GroupCore::step`]).
    pub fn refused_messages(&self) -> u64 {
        self.refused
    }

    /// The term of the entry at `index` in this node's log (none if compacted or past its end).
    pub fn log_term(&self, index: u64) -> Option<u64> {
        let log = &self.raw.raft.raft_log;
        if index > log.last_index() {
            return None;
        }
        log.term(index).ok()
    }

    /// Checks a message from a peer before raft-rs sees it. raft-rs trusts its peers: some
    /// messages no honest peer sends make it panic (a heartbeat whose commit index is past the
    /// end of this node's log, an append that contradicts an entry this node knows committed),
    /// and a snapshot whose data this core cannot decode would stop the group once raft-rs
    /// had accepted it. This refuses them, and whatever is addressed to another node, claims
    /// to come from this one or from no node, is of a kind only this node makes, or carries
    /// an absurd term. A received snapshot is decoded here once and kept for its install.
    fn vet(&mut self, m: &Message) -> Result<(), String> {
        let me = self.cfg.node_id;
        if m.to != me {
            return Err(format!("addressed to node {}", m.to));
        }
        if m.from == me || m.from == raft::INVALID_ID {
            return Err(format!("claims to come from node {}", m.from));
        }
        // Proposals and leader transfers are made on the leader only (see `propose` and
        // `transfer_leader`): no peer forwards one.
        if raft::raw_node::is_local_msg(m.get_msg_type())
            || matches!(m.get_msg_type(), MessageType::MsgPropose | MessageType::MsgTransferLeader)
        {
            return Err("a kind of message only this node makes".into());
        }
        if m.term >= MAX_TERM {
            return Err(format!("term {} is absurd", m.term));
        }
        // A peer forwards a read without a term (raft-rs asserts that when it forwards one
        // again); everything else a peer sends carries its term, and raft-rs takes a message
        // without one for its own: a term-0 heartbeat would set a candidate's term to 0.
        match (m.get_msg_type(), m.term) {
            (MessageType::MsgReadIndex, 0) if m.entries.len() == 1 => {}
            (MessageType::MsgReadIndex, 0) => return Err("a read without exactly one context".into()),
            (MessageType::MsgReadIndex, _) => return Err("a forwarded read with a term".into()),
            (_, 0) => return Err("no term".into()),
            _ => {}
        }
        let log = &self.raw.raft.raft_log;
        let last = log.last_index();
        match m.get_msg_type() {
            MessageType::MsgHeartbeat if m.commit > last => {
                Err(format!("commit index {} is past the end of this log ({last})", m.commit))
            }
            MessageType::MsgAppend => {
                let mut prev = (m.index, m.log_term);
                for e in &m.entries {
                    if e.index != prev.0.saturating_add(1) || e.term < prev.1 || e.term > m.term {
                        return Err(format!(
                            "entry {}/{} does not follow {}/{} in an append of term {}",
                            e.index, e.term, prev.0, prev.1, m.term
                        ));
                    }
                    prev = (e.index, e.term);
                }
                // A rejected append makes raft-rs look back from the append's index for an
                // entry no newer than its log term, and it panics if that search reaches
                // compacted entries. An honest leader's entry there is no older than this
                // node's last committed one, so the search stops before it.
                if m.index >= log.committed && log.term(log.committed).is_ok_and(|t| m.log_term < t) {
                    return Err(format!(
                        "previous entry {}/{} is older than this node's committed entry {}",
                        m.index, m.log_term, log.committed
                    ));
                }
                // raft-rs appends after a matching (index, log term) and panics if that
                // rewrites an entry it knows committed.
                if log.term(m.index).is_ok_and(|t| t == m.log_term) {
                    for e in m.entries.iter().take_while(|e| e.index <= log.committed) {
                        if log.term(e.index) != Ok(e.term) {
                            return Err(format!("rewrites committed entry {} (term {})", e.index, e.term));
                        }
                    }
                }
                Ok(())
            }
            MessageType::MsgAppendResponse if !m.reject && m.index > last => {
                Err(format!("acknowledges index {} past the end of this log ({last})", m.index))
            }
            MessageType::MsgTimeoutNow
                if m.from != self.raw.raft.leader_id || m.term != self.raw.raft.term =>
            {
                Err("a leader transfer from a node that is not this term's leader".into())
            }
            MessageType::MsgSnapshot => {
                let snap = m.get_snapshot();
                let meta = snap.get_metadata();
                if meta.term > m.term || meta.index == 0 {
                    return Err(format!(
                        "snapshot {}/{} in a message of term {}",
                        meta.index, meta.term, m.term
                    ));
                }
                if meta.index < log.committed {
                    // raft-rs ignores it; nothing to decode.
                    return Ok(());
                }
                let data: SnapshotData =
                    postcard::from_bytes(&snap.data).map_err(|e| format!("undecodable snapshot: {e}"))?;
                let sm = StateMachine::restore(&data.state)
                    .map_err(|e| format!("undecodable snapshot state: {e}"))?;
                self.vetted_snapshot = Some((meta.index, meta.term, sm, data.members));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    pub fn tick(&mut self) {
        // No election clock while an installed snapshot is not durable (see
        // `snapshot_unpersisted`): this only delays a campaign by the write's latency.
        if !self.snapshot_unpersisted() {
            self.quiet_ticks = self.quiet_ticks.saturating_add(1);
            self.raw.tick();
        }
    }

    /// Async writes: a snapshot installed from the leader is not yet durable. raft-rs moves its
    /// applied index to the snapshot only once it is persisted, while the storage already starts
    /// after it; a campaign in between reads the entries from raft-rs' applied index on (to look
    /// for pending conf changes), finds them compacted, and panics. (Only a follower installs a
    /// snapshot, so holding its election clock holds nothing else.) Never true in sync mode:
    /// the snapshot is persisted and applied within the same Ready.
    fn snapshot_unpersisted(&self) -> bool {
        self.cfg.async_writes && self.raw.raft.raft_log.applied < self.snapshot_index
    }

    pub fn report_unreachable(&mut self, id: NodeId) {
        self.raw.report_unreachable(id);
    }

    pub fn report_snapshot(&mut self, id: NodeId, ok: bool) {
        let status = if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure };
        self.raw.report_snapshot(id, status);
    }

    pub fn take_messages(&mut self) -> Vec<Message> {
        if self.cfg.defer_commit_broadcast && self.is_leader() {
            for m in &self.outbox {
                if m.get_msg_type() == MessageType::MsgAppend {
                    let sent = self.commit_sent.entry(m.to).or_default();
                    *sent = (*sent).max(m.commit);
                }
            }
        }
        std::mem::take(&mut self.outbox)
    }

    /// With [`CoreConfig::defer_commit_broadcast`]: this leader committed entries that a
    /// follower it replicates to has not been told about yet.
    pub fn commit_unannounced(&self) -> bool {
        if !self.cfg.defer_commit_broadcast || !self.is_leader() {
            return false;
        }
        let committed = self.raw.raft.raft_log.committed;
        let me = self.cfg.node_id;
        self.raw.raft.prs().iter().any(|(id, pr)| {
            *id != me
                && pr.state == ProgressState::Replicate
                && self.commit_sent.get(id).copied().unwrap_or(0) < committed
        })
    }

    /// Sends every follower an append (empty if it is up to date) carrying the commit index;
    /// [`GroupCore::process`] then hands the messages out. A follower that cannot take one
    /// now (too many appends in flight, or probing) learns it with its next append or
    /// heartbeat, so it counts as told.
    pub fn announce_commit(&mut self) {
        if !self.is_leader() {
            return;
        }
        self.raw.raft.bcast_append();
        let committed = self.raw.raft.raft_log.committed;
        let me = self.cfg.node_id;
        for id in self.raw.raft.prs().iter().map(|(id, _)| *id).filter(|id| *id != me) {
            let sent = self.commit_sent.entry(id).or_default();
            *sent = (*sent).max(committed);
        }
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Disk work to hand to the writer, in order (async writes only).
    pub fn take_writes(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    /// The writer made everything up to Ready `number` durable.
    pub fn on_persisted(&mut self, number: u64) {
        self.raw.on_persist_ready(number);
        self.advance_apply_persisted();
    }

    /// Tells raft-rs how far we applied, but never past what is durable here: an installed
    /// snapshot counts as applied at once, yet raft-rs only accepts it once it is persisted.
    fn advance_apply_persisted(&mut self) {
        let log = &self.raw.raft.raft_log;
        let to = self.applied.min(log.persisted).min(log.committed);
        if to > log.applied {
            self.raw.advance_apply_to(to);
        }
    }

    /// Runs or queues the disk half of a storage change.
    fn disk(&mut self, job: DiskJob) -> Result<(), CoreError> {
        if self.cfg.async_writes {
            self.writes.push(Write::Disk(job));
            Ok(())
        } else {
            self.raw.store().write(vec![job]).map_err(store_err)
        }
    }

    pub fn status(&self) -> CoreStatus {
        let store = self.raw.store();
        CoreStatus {
            node_id: self.cfg.node_id,
            group: self.cfg.group,
            role: if self.removed { "removed" } else { role_name(self.role) },
            term: self.raw.raft.term,
            commit: self.raw.raft.raft_log.committed,
            applied: self.applied,
            leader: self.leader,
            first_index: raft::Storage::first_index(store).unwrap_or(0),
            last_index: self.raw.raft.raft_log.last_index(),
            snapshot_index: store.snapshot_index(),
            members: self.members.values().cloned().collect(),
        }
    }

    /// Processes everything raft-rs has ready. Call after any input.
    pub fn process(&mut self) -> Result<(), CoreError> {
        self.start_reads();
        while self.raw.has_ready() {
            self.handle_ready()?;
            // The Ready may have committed the new leader's first entry: queued reads can go.
            self.start_reads();
        }
        self.serve_reads();
        self.maybe_snapshot()?;
        Ok(())
    }

    /// Starts a ReadIndex round for the queued reads. Not before the leader has committed an
    /// entry of its term: raft-rs silently drops such a request, and its reads would never be
    /// answered.
    ///
    /// With a read lease, also renews it once half of it has passed while reads keep coming
    /// (a round with no reads of its own), so a steady read load never waits for a round.
    fn start_reads(&mut self) {
        if !self.is_leader() || !self.raw.raft.commit_to_current_term() {
            return;
        }
        if self.read_queue.is_empty() {
            let half_gone = self.lease_until.saturating_sub(self.clock) < self.cfg.read_lease / 2;
            let renew = self.cfg.read_lease > 0
                && self.in_lease()
                && half_gone
                && (!self.reads_waiting.is_empty() || self.local_reads_seen)
                && self.reads_inflight.is_empty();
            if !renew {
                return;
            }
        }
        self.local_reads_seen = false;
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        let batch = std::mem::take(&mut self.read_queue);
        self.reads_inflight
            .insert(ctx, ReadRound { started: self.clock, term: self.raw.raft.term, reads: batch });
        // The context names this node too: a leader ignores a request whose context it already
        // has pending, and a forwarded one from another node must never collide with ours.
        let mut rctx = self.cfg.node_id.to_be_bytes().to_vec();
        rctx.extend_from_slice(&ctx.to_be_bytes());
        self.raw.read_index(rctx);
    }

    fn handle_ready(&mut self) -> Result<(), CoreError> {
        let mut rd = self.raw.ready();
        if let Some(ss) = rd.ss() {
            self.on_soft_state(ss.raft_state, ss.leader_id);
        }
        self.outbox.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            let snap = rd.snapshot().clone();
            self.install_snapshot(snap)?;
        }
        for rs in rd.take_read_states() {
            self.on_read_state(rs.index, &rs.request_ctx);
        }
        let committed = rd.take_committed_entries();
        self.apply_entries(committed)?;
        let hs = rd.hs().cloned();
        let job = self.raw.store().stage_append(rd.entries(), hs.as_ref()).map_err(store_err)?;
        if self.cfg.async_writes {
            // Entries are readable from storage now (raft-rs requires that before
            // advance_append_async); the writer makes them durable, then sends the messages
            // that must wait for durability and reports the Ready persisted.
            if let Some(job) = job {
                self.writes.push(Write::Disk(job));
            }
            let msgs = rd.take_persisted_messages();
            self.writes.push(Write::Persisted { number: rd.number(), msgs });
            self.raw.advance_append_async(rd);
            self.advance_apply_persisted();
            return Ok(());
        }
        if let Some(job) = job {
            self.raw.store().write(vec![job]).map_err(store_err)?;
        }
        self.outbox.extend(rd.take_persisted_messages());
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit);
        }
        self.outbox.extend(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();
        Ok(())
    }

    fn on_soft_state(&mut self, role: StateRole, leader: u64) {
        let was_leader = self.role == StateRole::Leader;
        self.role = role;
        self.leader = (leader != 0).then_some(leader);
        if was_leader && role != StateRole::Leader {
            // Proposals may or may not commit under the next leader; clients retry (safely:
            // commands are de-duplicated by request id).
            for (_, p) in std::mem::take(&mut self.pending) {
                self.fail_pending(p, CoreError::Dropped);
            }
            let mut reads: Vec<(u64, Query)> = std::mem::take(&mut self.read_queue);
            for (_, round) in std::mem::take(&mut self.reads_inflight) {
                reads.extend(round.reads);
            }
            for (_, batch) in std::mem::take(&mut self.reads_waiting) {
                reads.extend(batch);
            }
            for (token, _) in reads {
                self.events.push(Event::Read { token, result: Err(CoreError::Dropped) });
            }
        }
    }

    fn fail_pending(&mut self, p: Pending, e: CoreError) {
        let ev = match p.kind {
            PendingKind::Write => Event::Write { token: p.token, result: Err(e) },
            PendingKind::Conf => Event::Conf { token: p.token, result: Err(e) },
        };
        self.events.push(ev);
    }

    fn on_read_state(&mut self, index: u64, ctx: &[u8]) {
        let Ok(bytes) = <[u8; 16]>::try_from(ctx) else { return };
        let (node, counter) = bytes.split_at(8);
        let (Ok(node), Ok(counter)) = (<[u8; 8]>::try_from(node), <[u8; 8]>::try_from(counter)) else {
            return;
        };
        if u64::from_be_bytes(node) != self.cfg.node_id {
            return;
        }
        if let Some(ReadRound { started, term, reads: batch }) =
            self.reads_inflight.remove(&u64::from_be_bytes(counter))
        {
            // A quorum acknowledged a heartbeat sent after `started`, in `term`.
            if self.cfg.read_lease > 0 && term == self.raw.raft.term && term != self.transfer_term {
                let until = started.saturating_add(self.cfg.read_lease);
                if self.lease_term != term || until > self.lease_until {
                    self.lease_term = term;
                    self.lease_until = until;
                }
            }
            if !batch.is_empty() {
                self.reads_waiting.push_back((index, batch));
            }
        }
    }

    fn serve_reads(&mut self) {
        while let Some((index, _)) = self.reads_waiting.front() {
            if *index > self.applied {
                break;
            }
            let Some((_, batch)) = self.reads_waiting.pop_front() else { break };
            for (token, q) in batch {
                let result = self.state().query(&q);
                self.events.push(Event::Read { token, result: Ok(result) });
            }
        }
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), CoreError> {
        let index = snap.get_metadata().index;
        let term = snap.get_metadata().term;
        let (sm, members) = match self.vetted_snapshot.take() {
            Some((i, t, sm, members)) if (i, t) == (index, term) => (sm, members),
            _ => {
                let data: SnapshotData = postcard::from_bytes(&snap.data)
                    .map_err(|e| CoreError::Store(format!("received snapshot data: {e}")))?;
                let sm = StateMachine::restore(&data.state).map_err(|e| CoreError::Store(e.to_string()))?;
                (sm, data.members)
            }
        };
        let members: BTreeMap<NodeId, Member> = members.into_iter().map(|m| (m.id, m)).collect();
        let job =
            self.raw.store().stage_install_snapshot(snap, &encode_members(&members)).map_err(store_err)?;
        self.disk(job)?;
        self.snapshot_index = index;
        self.applied_bytes = 0;
        *self.state_mut() = sm;
        self.members = members;
        self.members_epoch += 1;
        self.applied = index;
        self.events.push(Event::Reset);
        tracing::info!(index, "installed snapshot");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), CoreError> {
        let mut changes = Vec::new();
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            match e.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&e, &mut changes),
                EntryType::EntryConfChange => self.apply_conf_change(&e)?,
                EntryType::EntryConfChangeV2 => {
                    tracing::warn!(index = e.index, "ignoring unsupported ConfChangeV2 entry");
                }
            }
            self.applied = e.index;
            self.applied_bytes += e.data.len() as u64;
        }
        if !changes.is_empty() {
            self.events.push(Event::Changes(changes));
        }
        Ok(())
    }

    fn apply_normal(&mut self, e: &Entry, changes: &mut Vec<ChangeSet>) {
        let pending = self.pending.remove(&e.index);
        if e.data.is_empty() {
            // A new leader's empty entry, or a conf change raft-rs refused (another pending).
            if let Some(p) = pending {
                let err = CoreError::Busy("another membership change is in progress".into());
                self.fail_pending(p, err);
            }
            return;
        }
        let result = match postcard::from_bytes::<Command>(&e.data) {
            Ok(cmd) => {
                let (result, mut cs) = self.state_mut().apply(&cmd);
                changes.append(&mut cs);
                Ok((result, e.index))
            }
            Err(err) => Err(CoreError::Invalid(format!("undecodable log entry {}: {err}", e.index))),
        };
        if let Some(p) = pending {
            if p.term == e.term {
                self.events.push(Event::Write { token: p.token, result });
            } else {
                self.fail_pending(p, CoreError::Dropped);
            }
        }
    }

    fn apply_conf_change(&mut self, e: &Entry) -> Result<(), CoreError> {
        let pending = self.pending.remove(&e.index);
        let cc = match ConfChange::parse_from_bytes(&e.data) {
            Ok(cc) => cc,
            Err(err) => {
                tracing::error!(index = e.index, error = %err, "undecodable conf change");
                if let Some(p) = pending {
                    self.fail_pending(p, CoreError::Invalid(err.to_string()));
                }
                return Ok(());
            }
        };
        let cs: ConfState = match self.raw.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(err) => {
                if let Some(p) = pending {
                    self.fail_pending(p, CoreError::Invalid(err.to_string()));
                }
                return Ok(());
            }
        };
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                if let Ok(m) = postcard::from_bytes::<Member>(&cc.context) {
                    self.members.insert(cc.node_id, Member { id: cc.node_id, ..m });
                }
                // A new node starts from a snapshot, and raft-rs on it ignores one whose
                // configuration does not include it: take a fresh one right away.
                self.snapshot_wanted = true;
                // A leader made a learner steps down, as a removed one does (raft-rs would
                // let it go on leading).
                if cc.get_change_type() == ConfChangeType::AddLearnerNode
                    && cc.node_id == self.cfg.node_id
                    && self.raw.raft.state == StateRole::Leader
                {
                    let term = self.raw.raft.term;
                    self.raw.raft.become_follower(term, raft::INVALID_ID);
                }
            }
            ConfChangeType::RemoveNode => {
                self.members.remove(&cc.node_id);
                if cc.node_id == self.cfg.node_id {
                    self.removed = true;
                    // raft-rs lets a removed leader go on leading, and then panics when it
                    // persists its next entry (its own progress is gone). Step down (same
                    // term, no leader): the remaining voters elect a new one.
                    if self.raw.raft.state == StateRole::Leader {
                        let term = self.raw.raft.term;
                        self.raw.raft.become_follower(term, raft::INVALID_ID);
                    }
                }
            }
        }
        for m in self.members.values_mut() {
            m.learner = cs.learners.contains(&m.id);
        }
        self.members_epoch += 1;
        let blob = encode_members(&self.members);
        let job = self.raw.store().stage_conf_state(cs, &blob);
        self.disk(job)?;
        if let Some(p) = pending {
            let members = self.members.values().cloned().collect();
            if p.term == e.term {
                self.events.push(Event::Conf { token: p.token, result: Ok(members) });
            } else {
                self.fail_pending(p, CoreError::Dropped);
            }
        }
        Ok(())
    }

    fn maybe_snapshot(&mut self) -> Result<(), CoreError> {
        if !self.snapshot_wanted
            && self.applied < self.snapshot_index + self.cfg.snapshot_every
            && self.applied_bytes < self.cfg.snapshot_bytes
        {
            return Ok(());
        }
        self.snapshot_wanted = false;
        self.snapshot_now()
    }

    /// Takes a snapshot of the applied state now and compacts the log behind it.
    pub fn snapshot_now(&mut self) -> Result<(), CoreError> {
        let data = SnapshotData {
            members: self.members.values().cloned().collect(),
            state: self.state().snapshot(),
        };
        let data = postcard::to_allocvec(&data).map_err(|e| CoreError::Store(e.to_string()))?;
        let index = self.applied;
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let compact_below = (index + 1).saturating_sub(self.cfg.compact_margin);
        let job = self.raw.store().stage_save_snapshot(index, cs, data, compact_below).map_err(store_err)?;
        self.disk(job)?;
        self.snapshot_index = index;
        self.applied_bytes = 0;
        tracing::info!(index, compact_below, "snapshot taken, log compacted");
        Ok(())
    }
}

/// Checks a `HOST:PORT` address.
pub fn validate_addr(addr: &str) -> Result<(), CoreError> {
    let ok = addr.len() <= 256
        && addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if ok { Ok(()) } else { Err(CoreError::Invalid(format!("bad address {addr:?} (want HOST:PORT)"))) }
}

/// Decodes a protobuf-2 raft message from a peer.
pub fn decode_message(bytes: &[u8]) -> Result<Message, CoreError> {
    Message::parse_from_bytes(bytes).map_err(|e| CoreError::Invalid(format!("raft message: {e}")))
}

/// Encodes a raft message for the wire.
pub fn encode_message(m: &Message) -> Result<Vec<u8>, CoreError> {
    m.write_to_bytes().map_err(|e| CoreError::Invalid(format!("raft message: {e}")))
}

/// True for messages that carry a snapshot (their delivery is reported back to raft-rs).
pub fn is_snapshot(m: &Message) -> bool {
    m.get_msg_type() == MessageType::MsgSnapshot
}
