//! The metadata client library: leader discovery, redirects, timeouts and safe retries.
//!
//! Every command carries this client's random id and a per-client sequence number; a retried
//! command reuses its number, and the state machine answers a duplicate with the result it
//! stored the first time. So a create that timed out and is retried is applied once and never
//! reports a false `EEXIST`.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use elea_common::ids::DEFAULT_GROUP;
use elea_common::{Errno, GroupId, NodeId, SliceId, Timespec, VolumeId};
use elea_fsm::{Change, Command, GroupRecord, Op, OpResult, Query, Reply, VolumeInfo};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::proto::meta_client::MetaClient as RawClient;
use crate::proto::{self, change_membership_request::Kind};
use crate::raft::core::validate_addr;
use crate::service::{LEADER_ADDR_KEY, MAX_REQUEST, MAX_RESPONSE};

/// Client tuning.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub group: GroupId,
    /// Limit for one attempt.
    pub attempt_timeout: Duration,
    /// Limit for a call including its retries.
    pub deadline: Duration,
    pub connect_timeout: Duration,
    /// While a request is in flight, an HTTP/2 ping every `keepalive_interval`; a ping not
    /// answered within `keepalive_timeout` ends the connection and fails what is in flight
    /// (retried elsewhere). A node that vanished without a reset (its site cut off, its host
    /// gone) so costs about the two, not the attempt timeout.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Coalesce concurrent requests into batch RPCs (at most this many batches in flight;
    /// 0 = one RPC per request).
    pub batch_inflight: usize,
    /// Mutual TLS to the metadata nodes (`Tls::connector(&[Role::Meta])`), in a cluster with
    /// certificates.
    pub tls: Option<elea_auth::tls::Connector>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            group: DEFAULT_GROUP,
            attempt_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            keepalive_timeout: Duration::from_secs(2),
            batch_inflight: 4,
            tls: None,
        }
    }
}

/// A failed call.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The operation itself failed (the namespace said no).
    #[error("{0}")]
    Fs(Errno),
    /// No node could complete the call before the deadline.
    #[error("metadata service unavailable: {0}")]
    Unavailable(String),
    /// The request was refused as malformed or not allowed; retrying will not help.
    #[error("rejected: {0}")]
    Rejected(String),
    /// A reply could not be understood.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The errno a file system front end reports for this error.
    pub fn errno(&self) -> Errno {
        match self {
            Self::Fs(e) => *e,
            Self::Unavailable(_) => Errno::ETIMEDOUT,
            Self::Rejected(_) => Errno::EINVAL,
            Self::Protocol(_) => Errno::EIO,
        }
    }
}

impl From<Errno> for ClientError {
    fn from(e: Errno) -> Self {
        Self::Fs(e)
    }
}

struct Inner {
    cfg: ClientConfig,
    addrs: Vec<String>,
    leader: Mutex<Option<String>>,
    /// Nodes that did not answer within the attempt timeout, and when. A hung node (stopped,
    /// or cut off) is still named leader by the others until they elect another (about a
    /// second): their redirects to it are ignored until it answers again or `SUSPECT_FOR` has
    /// passed, so one hung leader costs one attempt timeout, not one per redirect.
    suspects: Mutex<HashMap<String, Instant>>,
    conns: Mutex<HashMap<String, RawClient<Channel>>>,
    client_id: u64,
    next_seq: AtomicU64,
    inflight: Mutex<BTreeSet<u64>>,
    writes: OnceLock<mpsc::UnboundedSender<WriteJob>>,
    reads: OnceLock<mpsc::UnboundedSender<ReadJob>>,
    /// The clients of the other groups, shared by the control group's client and them.
    directory: Arc<Directory>,
    /// A control group client that sends requests about other groups' volumes to them
    /// (see `crate::route`); off for every other client.
    routing: bool,
}

impl Inner {
    fn new(cfg: ClientConfig, addrs: Vec<String>, directory: Arc<Directory>, routing: bool) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            addrs,
            leader: Mutex::new(None),
            suspects: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            client_id: random_u64(),
            next_seq: AtomicU64::new(1),
            inflight: Mutex::new(BTreeSet::new()),
            writes: OnceLock::new(),
            reads: OnceLock::new(),
            directory,
            routing,
        })
    }
}

/// Which group each volume lives in, and a client per group, shared by a control group
/// client and the clients it made for other groups.
#[derive(Default)]
struct Directory {
    /// The control group's list of volumes in groups of their own, and when it was read.
    records: Mutex<(Arc<Vec<GroupRecord>>, Option<Instant>)>,
    /// One client per group (weak: a group's client lives as long as someone uses it).
    clients: Mutex<HashMap<GroupId, std::sync::Weak<Inner>>>,
}

/// How often the list of volume groups is read again for a volume not in it.
const DIRECTORY_REFRESH: Duration = Duration::from_millis(200);

type Answer = oneshot::Sender<Result<OpResult, ClientError>>;

struct WriteJob {
    seq: u64,
    op: Op,
    reply: Answer,
}

struct ReadJob {
    query: Vec<u8>,
    reply: Answer,
}

trait HasReply {
    fn reply(self, r: Result<OpResult, ClientError>);
}

impl HasReply for WriteJob {
    fn reply(self, r: Result<OpResult, ClientError>) {
        let _ = self.reply.send(r);
    }
}

impl HasReply for ReadJob {
    fn reply(self, r: Result<OpResult, ClientError>) {
        let _ = self.reply.send(r);
    }
}

/// Sends one batch of jobs and answers each of them.
type SendBatch<T> = fn(MetaClient, T) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Most requests one batch RPC carries.
const BATCH_MAX: usize = 1024;
/// Most request bytes one batch RPC carries (far below the message size limit).
const BATCH_BYTES: usize = 1 << 20;

/// Splits encoded items into runs of at most [`BATCH_BYTES`] (a single larger item goes alone).
fn chunk_by_bytes(items: &[Vec<u8>]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, it) in items.iter().enumerate() {
        if i > start && bytes + it.len() > BATCH_BYTES {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += it.len();
    }
    if start < items.len() {
        out.push(start..items.len());
    }
    out
}

/// Takes whatever is queued behind `first` (up to [`BATCH_MAX`]).
fn drain<T>(first: T, rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    let mut jobs = vec![first];
    while jobs.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(j) => jobs.push(j),
            Err(_) => break,
        }
    }
    jobs
}

/// The batching loop: a batch leaves as soon as a sending slot is free, so an idle client
/// sends every request at once and a busy one sends fewer, larger RPCs. The batches in flight
/// run inside this task rather than a task each: a spawned task per batch cost a hand-off to
/// another runtime thread per batch, both ways.
async fn batch_loop<T: Send + 'static>(
    inner: Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<T>,
    slots: usize,
    send: SendBatch<Vec<T>>,
) {
    let slots = slots.max(1);
    let mut inflight = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = inflight.next(), if !inflight.is_empty() => {}
            job = rx.recv(), if inflight.len() < slots => {
                let Some(first) = job else { break };
                let jobs = drain(first, &mut rx);
                let Some(inner) = inner.upgrade() else { return };
                inflight.push(send(MetaClient { inner }, jobs));
            }
        }
    }
    // Every handle is gone: finish what was sent.
    while inflight.next().await.is_some() {}
}

/// A request number that is outstanding until dropped (also when the caller gives up), so
/// `acked_below` never passes a request that may still be retried, and never stays pinned by
/// one that was abandoned.
struct SeqGuard<'a> {
    inner: &'a Inner,
    seq: u64,
}

impl Drop for SeqGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut f) = self.inner.inflight.lock() {
            f.remove(&self.seq);
        }
    }
}

/// A handle to the metadata service; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct MetaClient {
    inner: Arc<Inner>,
}

/// Splits and checks `HOST:PORT,HOST:PORT`.
pub fn parse_addrs(s: &str) -> Result<Vec<String>, ClientError> {
    let addrs: Vec<String> =
        s.split(',').map(str::trim).filter(|a| !a.is_empty()).map(String::from).collect();
    if addrs.is_empty() {
        return Err(ClientError::Rejected("no metadata address given".into()));
    }
    for a in &addrs {
        validate_addr(a).map_err(|e| ClientError::Rejected(e.to_string()))?;
    }
    Ok(addrs)
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// How long a node that timed out is passed over (see `Inner::suspects`).
const SUSPECT_FOR: Duration = Duration::from_secs(3);

/// The leader address a forwarded answer carries.
fn served_by<T>(r: &tonic::Response<T>) -> Option<String> {
    r.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()).map(String::from)
}

enum Attempt<T> {
    /// The answer, and the leader's address when a follower forwarded the request there.
    Done(T, Option<String>),
    /// Try again, at this address if given.
    Retry(Option<String>, String),
    Fail(ClientError),
}

impl MetaClient {
    /// A client for the nodes at `addrs`. Connections are made lazily.
    pub fn connect(addrs: &[String], cfg: ClientConfig) -> Result<Self, ClientError> {
        if addrs.is_empty() {
            return Err(ClientError::Rejected("no metadata address given".into()));
        }
        for a in addrs {
            validate_addr(a).map_err(|e| ClientError::Rejected(e.to_string()))?;
        }
        Ok(Self { inner: Inner::new(cfg, addrs.to_vec(), Arc::default(), true) })
    }

    /// Whether this client sends requests about other groups' volumes to them.
    pub(crate) fn routing(&self) -> bool {
        self.inner.routing && self.inner.cfg.group == DEFAULT_GROUP
    }

    /// A new client of `group` sharing this one's addresses, settings and directory.
    fn sibling(&self, group: GroupId, routing: bool) -> Arc<Inner> {
        let records = self.inner.directory.records.lock().unwrap_or_else(|p| p.into_inner()).0.clone();
        let mut addrs: Vec<String> = records
            .iter()
            .find(|r| r.group == group)
            .map(|r| r.members().into_iter().map(|(_, a, _)| a).collect())
            .unwrap_or_default();
        for a in &self.inner.addrs {
            if !addrs.contains(a) {
                addrs.push(a.clone());
            }
        }
        let cfg = ClientConfig { group, ..self.inner.cfg.clone() };
        Inner::new(cfg, addrs, self.inner.directory.clone(), routing)
    }

    /// The Raft group this client sends to.
    pub fn group(&self) -> GroupId {
        self.inner.cfg.group
    }

    /// The client of group `group` (this one for its own group): the same addresses and
    /// settings, its own leader and request numbers. A group's members are tried first when
    /// the control group's record of it is known.
    pub fn for_group(&self, group: GroupId) -> MetaClient {
        if group == self.inner.cfg.group {
            return self.clone();
        }
        let dir = &self.inner.directory;
        let mut clients = dir.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(inner) = clients.get(&group).and_then(std::sync::Weak::upgrade) {
            return MetaClient { inner };
        }
        let inner = self.sibling(group, false);
        clients.retain(|_, w| w.strong_count() > 0);
        clients.insert(group, Arc::downgrade(&inner));
        MetaClient { inner }
    }

    /// The control group's list of volumes in groups of their own: as last read, or read
    /// again when `fresh` and it was not read in the last moments.
    pub async fn volume_group_list(&self, fresh: bool) -> Result<Arc<Vec<GroupRecord>>, ClientError> {
        let dir = &self.inner.directory;
        {
            let r = dir.records.lock().unwrap_or_else(|p| p.into_inner());
            let recent = r.1.is_some_and(|t| t.elapsed() < DIRECTORY_REFRESH);
            if r.1.is_some() && (!fresh || recent) {
                return Ok(r.0.clone());
            }
        }
        let control = self.for_group(DEFAULT_GROUP);
        let list = match control.query_here(Query::Groups).await {
            Ok(Reply::Groups(g)) => Arc::new(g),
            Ok(other) => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
            // The control group cannot answer (its site is down, say): the list as last read
            // still routes the volumes it names.
            Err(e) => {
                let r = dir.records.lock().unwrap_or_else(|p| p.into_inner());
                return if r.1.is_some() { Ok(r.0.clone()) } else { Err(e) };
            }
        };
        *dir.records.lock().unwrap_or_else(|p| p.into_inner()) = (list.clone(), Some(Instant::now()));
        Ok(list)
    }

    /// The client of the group volume `vol` lives in.
    pub async fn for_volume(&self, vol: VolumeId) -> Result<MetaClient, ClientError> {
        let find = |l: &[GroupRecord]| l.iter().find(|r| r.vol == vol).map(|r| r.group);
        let list = self.volume_group_list(false).await?;
        let group = match find(&list) {
            Some(g) => g,
            None => find(&self.volume_group_list(true).await?).unwrap_or(DEFAULT_GROUP),
        };
        Ok(self.for_group(group))
    }

    /// The client of the group that records slice `id` (see [`elea_fsm::group_of_slice`]).
    pub fn for_slice(&self, id: SliceId) -> MetaClient {
        self.for_group(elea_fsm::group_of_slice(id))
    }

    /// The control group's client and one for each volume group, as last listed.
    pub async fn all_groups(&self) -> Result<Vec<MetaClient>, ClientError> {
        Ok(self.clients_of(&self.volume_group_list(true).await?))
    }

    /// The control group's client and one for each group of `list`.
    fn clients_of(&self, list: &[GroupRecord]) -> Vec<MetaClient> {
        std::iter::once(DEFAULT_GROUP)
            .chain(list.iter().map(|r| r.group))
            .map(|g| self.for_group(g))
            .collect()
    }

    /// [`MetaClient::all_groups`] as last listed, without asking the control group (empty
    /// of volume groups before the first list).
    pub fn all_groups_cached(&self) -> Vec<MetaClient> {
        let list = self.inner.directory.records.lock().unwrap_or_else(|p| p.into_inner()).0.clone();
        self.clients_of(&list)
    }

    /// Volume `vol`, asked of its own group only (a control group client's volume list
    /// would ask every group, and fail while any of them cannot answer).
    pub async fn volume_info(&self, vol: VolumeId) -> Result<VolumeInfo, ClientError> {
        let c = self.for_volume(vol).await?;
        match c.query_here(Query::ListVolumes).await? {
            Reply::Volumes(v) => v.into_iter().find(|v| v.id == vol).ok_or(ClientError::Fs(Errno::ENODEV)),
            other => Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    /// Volume `name` and a client of its group that sends everything there (for a volume of
    /// the control group, one that does not route: a gateway of such a volume needs no other
    /// group, and must not wait for one that cannot answer).
    pub async fn volume_client(&self, name: &str) -> Result<(MetaClient, VolumeInfo), ClientError> {
        let list = self.volume_group_list(true).await?;
        let c = match list.iter().find(|r| r.name == name) {
            Some(r) => self.for_group(r.group),
            None => MetaClient { inner: self.sibling(DEFAULT_GROUP, false) },
        };
        let v = crate::api::MetaApi::volume(&c, name).await?;
        Ok((c, v))
    }

    fn conn(&self, addr: &str) -> Result<RawClient<Channel>, ClientError> {
        let mut conns = self.inner.conns.lock().map_err(|_| ClientError::Protocol("poisoned".into()))?;
        if let Some(c) = conns.get(addr) {
            return Ok(c.clone());
        }
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| ClientError::Rejected(e.to_string()))?
            .connect_timeout(self.inner.cfg.connect_timeout)
            .http2_keep_alive_interval(self.inner.cfg.keepalive_interval)
            .keep_alive_timeout(self.inner.cfg.keepalive_timeout)
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        let channel = match &self.inner.cfg.tls {
            Some(tls) => ep.connect_with_connector_lazy(tls.clone()),
            None => ep.connect_lazy(),
        };
        let c = RawClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE)
            .max_encoding_message_size(MAX_REQUEST * 2);
        conns.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// A node of this process among this client's addresses, when it is the leader as far as
    /// this client knows (or it knows no leader).
    fn local_node(&self) -> Option<(crate::raft::node::NodeHandle, String)> {
        let hint = self.leader_hint();
        let group = self.inner.cfg.group;
        let local = |a: &String| crate::local::node_at(a, group).map(|n| (n, a.clone()));
        match hint {
            Some(h) => local(&h),
            None => self.inner.addrs.iter().find_map(local),
        }
    }

    /// The address this client sends its next request to: the leader, as far as it knows.
    pub fn leader_addr(&self) -> Option<String> {
        self.leader_hint()
    }

    fn leader_hint(&self) -> Option<String> {
        self.inner.leader.lock().ok()?.clone()
    }

    fn set_leader(&self, addr: Option<String>) {
        if let Ok(mut l) = self.inner.leader.lock() {
            *l = addr;
        }
    }

    /// Classifies a failed attempt at `addr`.
    fn on_status<T>(&self, addr: &str, s: tonic::Status) -> Attempt<T> {
        use tonic::Code;
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown | Code::Aborted => {
                let hint = s.metadata().get(LEADER_ADDR_KEY).and_then(|v| v.to_str().ok()).map(String::from);
                if hint.is_none() {
                    self.set_leader(None);
                }
                Attempt::Retry(hint, format!("{addr}: {}", s.message()))
            }
            Code::NotFound if s.metadata().get(crate::service::NO_GROUP_KEY).is_some() => {
                // This node does not run the group (not a member, or not started it yet).
                self.set_leader(None);
                Attempt::Retry(None, format!("{addr}: {}", s.message()))
            }
            Code::FailedPrecondition => {
                // This node is not (or no longer) a member: try another.
                self.set_leader(None);
                Attempt::Retry(None, format!("{addr}: {}", s.message()))
            }
            _ => Attempt::Fail(ClientError::Rejected(format!("{addr}: {}", s.message()))),
        }
    }

    fn suspect(&self, addr: &str, timed_out: bool) {
        if let Ok(mut s) = self.inner.suspects.lock() {
            if timed_out {
                s.insert(addr.to_string(), Instant::now());
            } else if !s.is_empty() {
                s.remove(addr);
            }
        }
    }

    fn is_suspect(&self, addr: &str) -> bool {
        self.inner
            .suspects
            .lock()
            .ok()
            .and_then(|s| s.get(addr).map(|t| t.elapsed() < SUSPECT_FOR))
            .unwrap_or(false)
    }

    /// Runs `f` against the leader (or whichever node is likely to be it), following redirects
    /// and retrying with backoff until the deadline.
    async fn with_retries<T, F, Fut>(&self, mut f: F) -> Result<T, ClientError>
    where
        F: FnMut(RawClient<Channel>, String) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let deadline = tokio::time::Instant::now() + self.inner.cfg.deadline;
        let n = self.inner.addrs.len();
        let mut rotate = (self.inner.client_id as usize) % n;
        let mut backoff = Duration::from_millis(20);
        let mut next: Option<String> = self.leader_hint();
        let mut redirects = 0;
        let mut last_error;
        loop {
            let addr = match next.take() {
                Some(a) => a,
                None => {
                    // The next node in turn, passing over suspects unless all are.
                    let mut a = None;
                    for _ in 0..n {
                        rotate = (rotate + 1) % n;
                        if !self.is_suspect(&self.inner.addrs[rotate]) {
                            a = Some(self.inner.addrs[rotate].clone());
                            break;
                        }
                    }
                    a.unwrap_or_else(|| self.inner.addrs[rotate].clone())
                }
            };
            let conn = self.conn(&addr)?;
            let began = tokio::time::Instant::now();
            let attempt = tokio::time::timeout(self.inner.cfg.attempt_timeout, f(conn, addr.clone())).await;
            match attempt {
                Ok(Attempt::Done(v, leader)) => {
                    self.suspect(&addr, false);
                    let leader = leader.filter(|l| validate_addr(l).is_ok()).unwrap_or(addr);
                    self.set_leader(Some(leader));
                    return Ok(v);
                }
                Ok(Attempt::Fail(e)) => return Err(e),
                Ok(Attempt::Retry(hint, why)) => {
                    last_error = why;
                    // A failure without a hint that took as long as a keepalive's timeout is
                    // most likely the keepalive ending the link to a node that stopped
                    // answering: a suspect, like one that timed out.
                    let hung = hint.is_none() && began.elapsed() >= self.inner.cfg.keepalive_timeout;
                    // Follow a redirect at once, but not for ever: two nodes that name each
                    // other (a stale view on both) fall through to the backoff and deadline.
                    self.suspect(&addr, hung);
                    if let Some(h) = hint
                        && h != addr
                        && validate_addr(&h).is_ok()
                        && !self.is_suspect(&h)
                        && redirects < 3
                    {
                        redirects += 1;
                        self.set_leader(Some(h.clone()));
                        next = Some(h);
                        continue;
                    }
                    redirects = 0;
                }
                Err(_) => {
                    self.set_leader(None);
                    self.suspect(&addr, true);
                    last_error = format!("{addr}: no answer within {:?}", self.inner.cfg.attempt_timeout);
                }
            }
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(ClientError::Unavailable(last_error));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Applies a state-changing op (linearizable, exactly once).
    pub async fn op(&self, op: Op) -> Result<Reply, ClientError> {
        match self.route_op(&op).await? {
            crate::route::Route::Here => self.op_here(op).await,
            crate::route::Route::To(g) if g == self.group() => self.op_here(op).await,
            crate::route::Route::To(g) => self.for_group(g).op_here(op).await,
            crate::route::Route::Split(parts) => {
                for (g, op) in parts {
                    match self.for_group(g).op_here(op).await? {
                        Reply::Ok => {}
                        other => return Err(ClientError::Protocol(format!("unexpected reply {other:?}"))),
                    }
                }
                Ok(Reply::Ok)
            }
        }
    }

    /// [`MetaClient::op`] applied by this client's group, whatever it is about.
    pub(crate) async fn op_here(&self, op: Op) -> Result<Reply, ClientError> {
        // Allocate and register under one lock: otherwise a later request could report
        // `acked_below` past this one before it is registered.
        let guard = {
            let mut f = self.inner.inflight.lock().map_err(|_| ClientError::Protocol("poisoned".into()))?;
            let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
            f.insert(seq);
            SeqGuard { inner: &self.inner, seq }
        };
        let seq = guard.seq;
        if let Some((node, addr)) = self.local_node() {
            let acked_below = self.inner.inflight.lock().ok().and_then(|f| f.first().copied()).unwrap_or(seq);
            let cmd = Command {
                client: self.inner.client_id,
                seq,
                acked_below,
                time: Timespec::default(),
                op: op.clone(),
            };
            if let Ok(Ok((result, _))) =
                tokio::time::timeout(self.inner.cfg.attempt_timeout, node.write(cmd)).await
            {
                self.set_leader(Some(addr));
                drop(guard);
                return result.map_err(ClientError::Fs);
            }
            // Not the leader (or stuck): the usual way finds the leader; retrying the same
            // sequence number is safe.
        }
        let result = if self.inner.cfg.batch_inflight > 0 {
            let (tx, rx) = oneshot::channel();
            let queued = self.write_queue().send(WriteJob { seq, op: op.clone(), reply: tx }).is_ok();
            match rx.await {
                Ok(r) if queued => r,
                _ => self.op_with_seq(seq, op).await,
            }
        } else {
            self.op_with_seq(seq, op).await
        };
        drop(guard);
        result?.map_err(ClientError::Fs)
    }

    fn write_queue(&self) -> &mpsc::UnboundedSender<WriteJob> {
        self.inner.writes.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(batch_loop(weak, rx, self.inner.cfg.batch_inflight, |c, jobs| {
                Box::pin(async move { c.send_writes(jobs).await })
            }));
            tx
        })
    }

    fn read_queue(&self) -> &mpsc::UnboundedSender<ReadJob> {
        self.inner.reads.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(batch_loop(weak, rx, self.inner.cfg.batch_inflight, |c, jobs| {
                Box::pin(async move { c.send_reads(jobs).await })
            }));
            tx
        })
    }

    async fn send_writes(&self, jobs: Vec<WriteJob>) {
        if jobs.len() == 1 {
            for j in jobs {
                let r = self.op_with_seq(j.seq, j.op).await;
                let _ = j.reply.send(r);
            }
            return;
        }
        let client = self.inner.client_id;
        let acked_below = self.inner.inflight.lock().ok().and_then(|f| f.first().copied()).unwrap_or(0);
        let commands: Vec<Vec<u8>> = jobs
            .iter()
            .map(|j| {
                let cmd =
                    Command { client, seq: j.seq, acked_below, time: Timespec::default(), op: j.op.clone() };
                postcard::to_allocvec(&cmd).unwrap_or_default()
            })
            .collect();
        let mut jobs: Vec<Option<WriteJob>> = jobs.into_iter().map(Some).collect();
        for range in chunk_by_bytes(&commands) {
            let chunk: Vec<WriteJob> = jobs[range.clone()].iter_mut().filter_map(Option::take).collect();
            let items = self.write_batch_rpc(commands[range].to_vec()).await;
            self.answer(chunk, items, |me, j| {
                Box::pin(async move {
                    let r = me.op_with_seq(j.seq, j.op).await;
                    let _ = j.reply.send(r);
                })
            })
            .await;
        }
    }

    async fn write_batch_rpc(&self, commands: Vec<Vec<u8>>) -> Result<Vec<proto::BatchItem>, ClientError> {
        let group = self.inner.cfg.group;
        self.with_retries(|mut c, addr| {
            let commands = commands.clone();
            async move {
                match c.write_batch(proto::WriteBatchRequest { group_id: group, commands, hops: 0 }).await {
                    Ok(r) => {
                        let leader = served_by(&r);
                        Attempt::Done(r.into_inner().items, leader)
                    }
                    Err(s) => self.on_status(&addr, s),
                }
            }
        })
        .await
    }

    /// Answers each job of a batch from its item; an item that failed (or a batch the server
    /// refused as a whole, e.g. too large) is retried alone by `retry`.
    async fn answer<J: HasReply + Send + 'static>(
        &self,
        jobs: Vec<J>,
        items: Result<Vec<proto::BatchItem>, ClientError>,
        retry: SendBatch<J>,
    ) {
        match items {
            Ok(items) if items.len() == jobs.len() => {
                for (j, item) in jobs.into_iter().zip(items) {
                    if item.error.is_empty() {
                        let r = postcard::from_bytes::<OpResult>(&item.result)
                            .map_err(|e| ClientError::Protocol(e.to_string()));
                        j.reply(r);
                    } else {
                        tokio::spawn(retry(self.clone(), j));
                    }
                }
            }
            Ok(items) => {
                let e = ClientError::Protocol(format!("{} answers to {} requests", items.len(), jobs.len()));
                for j in jobs {
                    j.reply(Err(e.clone()));
                }
            }
            Err(ClientError::Rejected(_)) => {
                // The batch as a whole was refused (size limits): each request on its own.
                for j in jobs {
                    tokio::spawn(retry(self.clone(), j));
                }
            }
            Err(e) => {
                for j in jobs {
                    j.reply(Err(e.clone()));
                }
            }
        }
    }

    async fn send_reads(&self, jobs: Vec<ReadJob>) {
        let queries: Vec<Vec<u8>> = jobs.iter().map(|j| j.query.clone()).collect();
        let mut jobs: Vec<Option<ReadJob>> = jobs.into_iter().map(Some).collect();
        for range in chunk_by_bytes(&queries) {
            let chunk: Vec<ReadJob> = jobs[range.clone()].iter_mut().filter_map(Option::take).collect();
            let items = self.read_batch_rpc(queries[range].to_vec()).await;
            self.answer(chunk, items, |me, j| {
                Box::pin(async move {
                    let r = me.read_one(j.query).await;
                    let _ = j.reply.send(r);
                })
            })
            .await;
        }
    }

    async fn read_batch_rpc(&self, queries: Vec<Vec<u8>>) -> Result<Vec<proto::BatchItem>, ClientError> {
        let group = self.inner.cfg.group;
        self.with_retries(|mut c, addr| {
            let queries = queries.clone();
            async move {
                match c.read_batch(proto::ReadBatchRequest { group_id: group, queries, hops: 0 }).await {
                    Ok(r) => {
                        let leader = served_by(&r);
                        Attempt::Done(r.into_inner().items, leader)
                    }
                    Err(s) => self.on_status(&addr, s),
                }
            }
        })
        .await
    }

    async fn op_with_seq(&self, seq: u64, op: Op) -> Result<OpResult, ClientError> {
        let group = self.inner.cfg.group;
        let client = self.inner.client_id;
        self.with_retries(|mut c, addr| {
            let acked_below = self.inner.inflight.lock().ok().and_then(|f| f.first().copied()).unwrap_or(seq);
            let cmd = Command { client, seq, acked_below, time: Timespec::default(), op: op.clone() };
            async move {
                let command = match postcard::to_allocvec(&cmd) {
                    Ok(b) => b,
                    Err(e) => return Attempt::Fail(ClientError::Rejected(e.to_string())),
                };
                match c.write(proto::WriteRequest { group_id: group, command, hops: 0 }).await {
                    Ok(r) => {
                        match (served_by(&r), postcard::from_bytes::<OpResult>(&r.into_inner().result)) {
                            (leader, Ok(res)) => Attempt::Done(res, leader),
                            (_, Err(e)) => Attempt::Fail(ClientError::Protocol(e.to_string())),
                        }
                    }
                    Err(s) => self.on_status(&addr, s),
                }
            }
        })
        .await
    }

    /// Answers a query from the latest committed state (linearizable).
    pub async fn query(&self, q: Query) -> Result<Reply, ClientError> {
        match self.route_query(&q).await? {
            Some(r) => Ok(r),
            None => self.query_here(q).await,
        }
    }

    /// [`MetaClient::query`] answered by this client's group, whatever it is about.
    pub(crate) async fn query_here(&self, q: Query) -> Result<Reply, ClientError> {
        if let Some((node, addr)) = self.local_node()
            && let Ok(Ok(result)) =
                tokio::time::timeout(self.inner.cfg.attempt_timeout, node.read(q.clone())).await
        {
            self.set_leader(Some(addr));
            return result.map_err(ClientError::Fs);
        }
        let query = postcard::to_allocvec(&q).map_err(|e| ClientError::Rejected(e.to_string()))?;
        let res = if self.inner.cfg.batch_inflight > 0 {
            let (tx, rx) = oneshot::channel();
            let queued = self.read_queue().send(ReadJob { query: query.clone(), reply: tx }).is_ok();
            match rx.await {
                Ok(r) if queued => r,
                _ => self.read_one(query).await,
            }
        } else {
            self.read_one(query).await
        };
        res?.map_err(ClientError::Fs)
    }

    async fn read_one(&self, query: Vec<u8>) -> Result<OpResult, ClientError> {
        let group = self.inner.cfg.group;
        self.with_retries(|mut c, addr| {
            let query = query.clone();
            async move {
                match c.read(proto::ReadRequest { group_id: group, query, hops: 0 }).await {
                    Ok(r) => {
                        match (served_by(&r), postcard::from_bytes::<OpResult>(&r.into_inner().result)) {
                            (leader, Ok(res)) => Attempt::Done(res, leader),
                            (_, Err(e)) => Attempt::Fail(ClientError::Protocol(e.to_string())),
                        }
                    }
                    Err(s) => self.on_status(&addr, s),
                }
            }
        })
        .await
    }

    /// One node's status (no retries: an unreachable node is reported as such).
    pub async fn status_of(&self, addr: &str) -> Result<proto::StatusReply, ClientError> {
        let mut c = self.conn(addr)?;
        let mut req = tonic::Request::new(proto::StatusRequest { group_id: self.inner.cfg.group });
        req.set_timeout(Duration::from_secs(2));
        match tokio::time::timeout(Duration::from_secs(3), c.status(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(ClientError::Unavailable(format!("{addr}: {}", s.message()))),
            Err(_) => Err(ClientError::Unavailable(format!("{addr}: no answer"))),
        }
    }

    /// Adds a voter or learner, or removes a node; returns the new member list.
    pub async fn change_membership(
        &self,
        kind: Kind,
        node_id: NodeId,
        addr: &str,
    ) -> Result<Vec<proto::Member>, ClientError> {
        let group = self.inner.cfg.group;
        self.with_retries(|mut c, at| {
            let req = proto::ChangeMembershipRequest {
                group_id: group,
                kind: kind as i32,
                node_id,
                addr: addr.to_string(),
                hops: 0,
            };
            async move {
                match c.change_membership(req).await {
                    Ok(r) => {
                        let leader = served_by(&r);
                        Attempt::Done(r.into_inner().members, leader)
                    }
                    Err(s) => self.on_status(&at, s),
                }
            }
        })
        .await
    }

    /// Asks the leader to transfer leadership to `to` (returns once the request is accepted).
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ClientError> {
        let group = self.inner.cfg.group;
        self.with_retries(|mut c, at| async move {
            match c.transfer_leader(proto::TransferLeaderRequest { group_id: group, to, hops: 0 }).await {
                Ok(r) => Attempt::Done((), served_by(&r)),
                Err(s) => self.on_status(&at, s),
            }
        })
        .await
    }

    /// Streams a volume's changes from one node (the first that answers). Each item is the
    /// volume's change sequence and its changes, or `None` for "reset: drop all caches".
    ///
    /// When a node of this process is among the client's addresses (and is the leader as far
    /// as the client knows), the stream comes straight from that node's change hub: the same
    /// items as its gRPC watch, without encoding them, a loopback TCP hop and decoding them.
    pub async fn watch(&self, vol: VolumeId, from_seq: u64) -> Result<WatchStream, ClientError> {
        if let Some((node, _)) = self.local_node() {
            return Ok(local_watch(&node.hub, vol, from_seq));
        }
        let group = self.inner.cfg.group;
        let stream = self
            .with_retries(|mut c, addr| async move {
                match c.watch(proto::WatchRequest { group_id: group, volume_id: vol, from_seq }).await {
                    Ok(r) => Attempt::Done(r.into_inner(), None),
                    Err(s) => self.on_status(&addr, s),
                }
            })
            .await?;
        Ok(Box::pin(stream.map(|item| {
            match item {
                Ok(ev) if ev.reset => Ok(WatchItem::Reset),
                Ok(ev) => postcard::from_bytes::<Vec<Change>>(&ev.changes)
                    .map(|changes| WatchItem::Changes { seq: ev.seq, changes, client: ev.client })
                    .map_err(|e| ClientError::Protocol(e.to_string())),
                Err(s) => Err(ClientError::Unavailable(s.message().to_string())),
            }
        })))
    }
}

impl crate::api::MetaApi for MetaClient {
    fn op(&self, op: Op) -> impl Future<Output = Result<Reply, ClientError>> + Send {
        MetaClient::op(self, op)
    }

    fn query(&self, q: Query) -> impl Future<Output = Result<Reply, ClientError>> + Send {
        MetaClient::query(self, q)
    }

    fn watch(
        &self,
        vol: VolumeId,
        from_seq: u64,
    ) -> impl Future<Output = Result<WatchStream, ClientError>> + Send {
        MetaClient::watch(self, vol, from_seq)
    }

    fn client_id(&self) -> u64 {
        self.inner.client_id
    }
}

/// A volume's change stream (see [`MetaClient::watch`]).
pub type WatchStream =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<WatchItem, ClientError>> + Send + 'static>>;

/// A watch served by the change hub of a node in this process, item for item what its gRPC
/// watch sends: a reset first when `from_seq` is older than the hub's history, the missed
/// changes after `from_seq`, then every new change of `vol` (a reset when the stream fell
/// behind or the node installed a snapshot). Ends when the node stops.
pub(crate) fn local_watch(hub: &crate::watch::WatchHub, vol: VolumeId, from_seq: u64) -> WatchStream {
    use crate::watch::HubEvent;
    use tokio_stream::wrappers::BroadcastStream;
    use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

    let sub = hub.subscribe(vol, from_seq);
    let mut head: Vec<Result<WatchItem, ClientError>> = Vec::with_capacity(sub.backlog.len() + 1);
    if sub.reset {
        head.push(Ok(WatchItem::Reset));
    }
    head.extend(sub.backlog.iter().map(|set| {
        Ok(WatchItem::Changes { seq: set.seq, changes: set.changes.clone(), client: set.client })
    }));
    let live = BroadcastStream::new(sub.rx).filter_map(move |ev| match ev {
        Ok(HubEvent::Changes(set)) if set.vol == vol => {
            Some(Ok(WatchItem::Changes { seq: set.seq, changes: set.changes.clone(), client: set.client }))
        }
        Ok(HubEvent::Changes(_)) => None,
        Ok(HubEvent::Reset) | Err(BroadcastStreamRecvError::Lagged(_)) => Some(Ok(WatchItem::Reset)),
    });
    Box::pin(tokio_stream::iter(head).chain(live))
}

/// One item of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    Changes {
        seq: u64,
        changes: Vec<Change>,
        /// The client whose command made them (0: the service, or unknown).
        client: u64,
    },
    /// Changes were missed: drop every cached inode and entry of the volume.
    Reset,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::WatchHub;
    use elea_fsm::{Change, ChangeSet};

    fn set(vol: u64, seq: u64, ino: u64) -> ChangeSet {
        ChangeSet { vol, seq, changes: vec![Change::Inode(ino)], client: 7 }
    }

    fn changes(seq: u64, ino: u64) -> WatchItem {
        WatchItem::Changes { seq, changes: vec![Change::Inode(ino)], client: 7 }
    }

    async fn next(s: &mut WatchStream) -> Option<WatchItem> {
        tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
            .await
            .expect("watch item in time")
            .map(|r| r.expect("no error"))
    }

    #[tokio::test]
    async fn local_watch_resumes_then_follows_its_volume_only() {
        let hub = WatchHub::new();
        hub.publish(vec![set(1, 1, 10), set(2, 1, 20), set(1, 2, 11)]);
        let mut s = local_watch(&hub, 1, 1);
        assert_eq!(next(&mut s).await, Some(changes(2, 11)), "backlog after from_seq");
        hub.publish(vec![set(2, 2, 21), set(1, 3, 12)]);
        assert_eq!(next(&mut s).await, Some(changes(3, 12)), "live, other volume filtered out");
        hub.reset();
        assert_eq!(next(&mut s).await, Some(WatchItem::Reset), "snapshot install resets");
        drop(hub);
        assert_eq!(next(&mut s).await, None, "ends when the node stops");
    }

    #[tokio::test]
    async fn local_watch_from_before_history_starts_with_reset() {
        let hub = WatchHub::new();
        hub.publish(vec![set(1, 5, 10), set(1, 6, 11)]);
        let mut s = local_watch(&hub, 1, 2);
        assert_eq!(next(&mut s).await, Some(WatchItem::Reset));
        hub.publish(vec![set(1, 7, 12)]);
        assert_eq!(next(&mut s).await, Some(changes(7, 12)));
        let mut fresh = local_watch(&hub, 1, 0);
        hub.publish(vec![set(1, 8, 13)]);
        assert_eq!(next(&mut fresh).await, Some(changes(8, 13)), "from 0: live only, no reset");
    }
}
