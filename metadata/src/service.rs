//! The gRPC service: decodes requests, hands them to the group thread, encodes replies, and
//! converts [`CoreError`] to `tonic::Status` in one place. Followers forward writes, reads and
//! admin calls to the leader (one hop at most); every "not the leader" status carries the
//! leader's id and address in the `elea-leader-id` / `elea-leader-addr` metadata so clients
//! go straight there next time.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elea_auth::tls::{Connector, Peer, Tls};
use elea_auth::{Identity, Role};
use elea_common::ids::DEFAULT_GROUP;
use elea_common::{GroupId, NodeId, VolumeId};
use elea_fsm::{Command, OpResult, Query, Reply};
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::authz::{self, Need};
use crate::proto::meta_client::MetaClient as RawMetaClient;
use crate::proto::{self, change_membership_request::Kind};
use crate::raft::core::{CoreError, CoreStatus, Member, MemberChange, decode_message};
use crate::raft::node::NodeHandle;
use crate::raft::transport::Transport;
use crate::watch::HubEvent;

/// Largest encoded command or query accepted.
pub const MAX_REQUEST: usize = 2 << 20;
/// Largest reply (a batch of reads can carry many large values).
pub const MAX_RESPONSE: usize = 64 << 20;
/// How long a request may wait for the group (commit and apply).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a read or write forwarded to the leader: well under a client's attempt
/// timeout, so a leader this node cannot reach (a cut link, a hung process) costs the client
/// one short wait before it tries another node, not its whole attempt.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

pub const LEADER_ID_KEY: &str = "elea-leader-id";
pub const LEADER_ADDR_KEY: &str = "elea-leader-addr";
/// On a `NOT_FOUND` status: the group the node does not serve (a client of a volume's group
/// tries the group's other members).
pub const NO_GROUP_KEY: &str = "elea-no-group";

/// A Raft group this node serves.
#[derive(Clone)]
pub struct Hosted {
    pub node: NodeHandle,
    pub transport: Transport,
}

/// The Raft groups this node serves, by id: the control group, and the groups of the volumes
/// it is a member of.
#[derive(Default)]
pub struct Groups {
    map: std::sync::RwLock<HashMap<GroupId, Hosted>>,
}

impl Groups {
    pub fn insert(&self, group: GroupId, h: Hosted) {
        if let Ok(mut m) = self.map.write() {
            m.insert(group, h);
        }
    }

    pub fn remove(&self, group: GroupId) -> Option<Hosted> {
        self.map.write().ok()?.remove(&group)
    }

    pub fn get(&self, group: GroupId) -> Option<Hosted> {
        self.map.read().ok()?.get(&group).cloned()
    }

    pub fn contains(&self, group: GroupId) -> bool {
        self.map.read().is_ok_and(|m| m.contains_key(&group))
    }

    /// Every group, by id.
    pub fn all(&self) -> Vec<(GroupId, Hosted)> {
        let mut v: Vec<_> =
            self.map.read().map(|m| m.iter().map(|(g, h)| (*g, h.clone())).collect()).unwrap_or_default();
        v.sort_by_key(|(g, _)| *g);
        v
    }
}

pub struct MetaService {
    groups: Arc<Groups>,
    id: NodeId,
    addr: String,
    forward: Mutex<HashMap<String, RawMetaClient<Channel>>>,
    /// With certificates: how this node reaches the leader, and who may ask what.
    tls: Option<Connector>,
    /// Volume names by id, for checking gateways (volumes are never renamed), and when the
    /// list was last read.
    volume_names: tokio::sync::Mutex<(HashMap<VolumeId, String>, Option<Instant>)>,
    refused: AtomicU64,
}

/// The volume list is read again for an unknown id at most this often.
const VOLUME_NAMES_REFRESH: Duration = Duration::from_millis(200);

impl MetaService {
    pub fn new(
        groups: Arc<Groups>,
        id: NodeId,
        addr: String,
        tls: Option<&Tls>,
    ) -> Result<Self, elea_auth::AuthError> {
        Ok(Self {
            groups,
            id,
            addr,
            forward: Mutex::new(HashMap::new()),
            tls: tls.map(|t| t.connector(&[Role::Meta])).transpose()?,
            volume_names: tokio::sync::Mutex::new((HashMap::new(), None)),
            refused: AtomicU64::new(0),
        })
    }

    /// Requests refused for want of a certificate or of the right role or volume.
    pub fn refused_calls(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn refuse(&self, why: String) -> Status {
        self.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("refused a metadata request: {why}");
        Status::permission_denied(why)
    }

    /// The caller's identity with certificates (`None` without).
    fn caller<T>(&self, req: &Request<T>) -> Result<Option<Arc<Identity>>, Status> {
        if self.tls.is_none() {
            return Ok(None);
        }
        match req.extensions().get::<Peer>() {
            Some(p) => Ok(Some(p.identity.clone())),
            None => Err(self.refuse("no client certificate".into())),
        }
    }

    /// Checks that the caller may make a request that needs `need`.
    async fn authorize(&self, who: Option<&Identity>, need: &Need, h: &Hosted) -> Result<(), Status> {
        let Some(who) = who else { return Ok(()) };
        let name = match need {
            Need::Volume(vol) if who.role == Role::Gateway => self.volume_name(*vol, h).await?,
            _ => None,
        };
        authz::allows(who, need, |_| name).map_err(|why| self.refuse(why))
    }

    /// The name of volume `vol`, from the list kept here or, for an id not in it, a fresh one
    /// from group `h` (volume ids are unique across groups).
    async fn volume_name(&self, vol: VolumeId, h: &Hosted) -> Result<Option<String>, Status> {
        let mut names = self.volume_names.lock().await;
        if let Some(n) = names.0.get(&vol) {
            return Ok(Some(n.clone()));
        }
        if names.1.is_some_and(|t| t.elapsed() < VOLUME_NAMES_REFRESH) {
            return Ok(None);
        }
        let list = self.list_volumes(h).await?;
        names.1 = Some(Instant::now());
        for v in list {
            names.0.insert(v.id, v.name);
        }
        Ok(names.0.get(&vol).cloned())
    }

    /// Every volume of group `h`, read here or (on a follower) from the leader.
    async fn list_volumes(&self, h: &Hosted) -> Result<Vec<elea_fsm::VolumeInfo>, Status> {
        let result = match h.node.read(Query::ListVolumes).await {
            Ok(r) => r,
            Err(e) => {
                let Some(mut f) = self.forward_target(&e, 0, &h.node) else {
                    return Err(self.to_status(e, &h.node));
                };
                let query = postcard::to_allocvec(&Query::ListVolumes)
                    .map_err(|e| Status::internal(e.to_string()))?;
                let req = proto::ReadRequest { group_id: h.transport.group(), query, hops: 1 };
                let r = tokio::time::timeout(FORWARD_TIMEOUT, f.client.read(req)).await;
                let reply = self.forwarded(&f, r)?.into_inner();
                postcard::from_bytes::<OpResult>(&reply.result)
                    .map_err(|e| Status::internal(format!("the leader's volume list: {e}")))?
            }
        };
        match result {
            Ok(Reply::Volumes(v)) => Ok(v),
            other => Err(Status::internal(format!("unexpected answer to a volume list: {other:?}"))),
        }
    }

    /// Applies `op` on this node's own behalf (no caller to check): here when this node
    /// leads, else at the leader.
    pub async fn propose(&self, op: elea_fsm::Op) -> Result<OpResult, Status> {
        let h = self.hosted(DEFAULT_GROUP)?;
        let cmd = Command { client: 0, seq: 0, acked_below: 0, time: Default::default(), op };
        match tokio::time::timeout(APPLY_TIMEOUT, h.node.write(cmd.clone())).await {
            Ok(Ok((result, _))) => Ok(result),
            Ok(Err(e)) => {
                let Some(mut f) = self.forward_target(&e, 0, &h.node) else {
                    return Err(self.to_status(e, &h.node));
                };
                let command = postcard::to_allocvec(&cmd).map_err(|e| Status::internal(e.to_string()))?;
                let req = proto::WriteRequest { group_id: DEFAULT_GROUP, command, hops: 1 };
                let r = tokio::time::timeout(FORWARD_TIMEOUT, f.client.write(req)).await;
                let reply = self.forwarded(&f, r)?.into_inner();
                postcard::from_bytes::<OpResult>(&reply.result)
                    .map_err(|e| Status::internal(format!("the leader's answer: {e}")))
            }
            Err(_) => Err(Status::deadline_exceeded("the command was not applied in time")),
        }
    }

    /// A gateway sees only its own volumes in a volume list, and only its own volumes'
    /// slices (locations and inline bytes) in a slice data reply.
    async fn filter_reply(&self, who: Option<&Identity>, q: &Query, result: Vec<u8>, h: &Hosted) -> Vec<u8> {
        let Some(who) = who.filter(|w| w.role == Role::Gateway) else {
            return result;
        };
        let reply = match (q, postcard::from_bytes::<OpResult>(&result)) {
            (Query::ListVolumes, Ok(Ok(Reply::Volumes(mut v)))) => {
                v.retain(|v| who.may_use_volume(&v.name));
                Reply::Volumes(v)
            }
            (Query::SliceData { .. }, Ok(Ok(Reply::SliceData(mut d)))) => {
                for s in &mut d {
                    let Some(vol) = s.loc.as_ref().map(|l| l.vol) else { continue };
                    let allowed =
                        matches!(self.volume_name(vol, h).await, Ok(Some(n)) if who.may_use_volume(&n));
                    if !allowed {
                        s.loc = None;
                        s.inline = None;
                    }
                }
                Reply::SliceData(d)
            }
            _ => return result,
        };
        postcard::to_allocvec(&OpResult::Ok(reply)).unwrap_or_default()
    }

    /// Only meta nodes send Raft messages (checked before a message's body is read).
    pub fn check_peer<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match self.caller(req)? {
            Some(id) if id.role != Role::Meta => Err(self.refuse(format!("{id} may not send raft messages"))),
            _ => Ok(()),
        }
    }

    /// The group a request names (0: the control group), or `NOT_FOUND` for one this node
    /// does not serve.
    fn hosted(&self, group: GroupId) -> Result<Hosted, Status> {
        let group = if group == 0 { DEFAULT_GROUP } else { group };
        self.groups.get(group).ok_or_else(|| {
            let mut s = Status::not_found(format!("node {} serves no raft group {group}", self.id));
            s.metadata_mut().insert(NO_GROUP_KEY, tonic::metadata::MetadataValue::from(group));
            s
        })
    }

    fn to_status(&self, e: CoreError, node: &NodeHandle) -> Status {
        match e {
            CoreError::NotLeader { leader: Some(l) } => {
                let addr = node.addr_of(l).unwrap_or_default();
                let mut s = Status::unavailable(format!(
                    "node {} is not the leader; the leader is node {l} at {addr}",
                    self.id
                ));
                if let Ok(v) = l.to_string().parse() {
                    s.metadata_mut().insert(LEADER_ID_KEY, v);
                }
                if let Ok(v) = addr.parse() {
                    s.metadata_mut().insert(LEADER_ADDR_KEY, v);
                }
                s
            }
            CoreError::NotLeader { leader: None } => Status::unavailable("no leader is elected yet; retry"),
            CoreError::Dropped => {
                Status::unavailable("leadership changed before the request completed; retry")
            }
            CoreError::Busy(m) => Status::unavailable(m),
            CoreError::Invalid(m) => Status::invalid_argument(m),
            CoreError::Removed => {
                Status::failed_precondition(format!("node {} is not a member of the cluster", self.id))
            }
            CoreError::Store(m) => Status::internal(m),
        }
    }

    /// The leader to forward to, when this node knows it and is not it.
    fn forward_target(&self, e: &CoreError, hops: u32, node: &NodeHandle) -> Option<Forward> {
        let CoreError::NotLeader { leader: Some(l) } = e else { return None };
        if hops > 0 || *l == self.id {
            return None;
        }
        let addr = node.addr_of(*l)?;
        let mut map = self.forward.lock().ok()?;
        if let Some(c) = map.get(&addr) {
            return Some(Forward { client: c.clone(), leader: addr });
        }
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true);
        let channel = match &self.tls {
            Some(tls) => ep.connect_with_connector_lazy(tls.clone()),
            None => ep.connect_lazy(),
        };
        let c = RawMetaClient::new(channel)
            .max_decoding_message_size(MAX_RESPONSE)
            .max_encoding_message_size(MAX_REQUEST * 2);
        map.insert(addr.clone(), c.clone());
        Some(Forward { client: c, leader: addr })
    }
}

/// A request forwarded to the leader. Its answer names the leader (`LEADER_ADDR_KEY`), so the
/// client sends the next request there instead of paying the extra hop every time.
struct Forward {
    client: RawMetaClient<Channel>,
    leader: String,
}

impl MetaService {
    /// The answer to a forwarded request, tagged with the leader's address. When the leader
    /// did not answer in time its connection is dropped (the next forward connects afresh)
    /// and the client is told to retry elsewhere.
    fn forwarded<T>(
        &self,
        f: &Forward,
        r: Result<Result<Response<T>, Status>, tokio::time::error::Elapsed>,
    ) -> Result<Response<T>, Status> {
        let Ok(r) = r else {
            if let Ok(mut map) = self.forward.lock() {
                map.remove(&f.leader);
            }
            return Err(Status::unavailable(format!(
                "node {} forwarded the request to the leader at {}, which did not answer in time; retry",
                self.id, f.leader
            )));
        };
        r.map(|mut resp| {
            if let Ok(v) = f.leader.parse() {
                resp.metadata_mut().insert(LEADER_ADDR_KEY, v);
            }
            resp
        })
    }
}

/// Most items one batch may carry.
pub const MAX_BATCH: usize = 4096;

fn check_batch(items: &[Vec<u8>]) -> Result<(), Status> {
    if items.len() > MAX_BATCH {
        return Err(Status::invalid_argument(format!("batch of {} items exceeds {MAX_BATCH}", items.len())));
    }
    if let Some(big) = items.iter().find(|b| b.len() > MAX_REQUEST) {
        return Err(Status::invalid_argument(format!("item of {} bytes exceeds {MAX_REQUEST}", big.len())));
    }
    Ok(())
}

fn ok_item(result: &elea_fsm::OpResult) -> Result<proto::BatchItem, Status> {
    let result = postcard::to_allocvec(result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(proto::BatchItem { result, error: String::new() })
}

fn err_item(error: String) -> proto::BatchItem {
    proto::BatchItem { result: Vec::new(), error }
}

fn members_to_proto(ms: Vec<Member>) -> Vec<proto::Member> {
    ms.into_iter().map(|m| proto::Member { node_id: m.id, addr: m.addr, learner: m.learner }).collect()
}

fn status_reply(s: CoreStatus, addr: &str) -> proto::StatusReply {
    proto::StatusReply {
        node_id: s.node_id,
        addr: addr.to_string(),
        group_id: s.group,
        role: s.role.to_string(),
        term: s.term,
        commit_index: s.commit,
        applied_index: s.applied,
        leader_id: s.leader.unwrap_or(0),
        members: members_to_proto(s.members),
        first_index: s.first_index,
        last_index: s.last_index,
        snapshot_index: s.snapshot_index,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl proto::meta_server::Meta for MetaService {
    async fn write(&self, req: Request<proto::WriteRequest>) -> Result<Response<proto::WriteReply>, Status> {
        let who = self.caller(&req)?;
        let req = req.into_inner();
        let h = self.hosted(req.group_id)?;
        if req.command.len() > MAX_REQUEST {
            return Err(Status::invalid_argument(format!(
                "command of {} bytes exceeds {MAX_REQUEST}",
                req.command.len()
            )));
        }
        let cmd: Command = postcard::from_bytes(&req.command)
            .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
        self.authorize(who.as_deref(), &Need::of_op(&cmd.op), &h).await?;
        match tokio::time::timeout(APPLY_TIMEOUT, h.node.write(cmd)).await {
            Ok(Ok((result, index))) => {
                let result = postcard::to_allocvec(&result).map_err(|e| Status::internal(e.to_string()))?;
                Ok(Response::new(proto::WriteReply { result, index }))
            }
            Ok(Err(e)) => match self.forward_target(&e, req.hops, &h.node) {
                Some(mut f) => {
                    let r = tokio::time::timeout(
                        FORWARD_TIMEOUT,
                        f.client.write(proto::WriteRequest { hops: req.hops + 1, ..req }),
                    )
                    .await;
                    self.forwarded(&f, r)
                }
                None => Err(self.to_status(e, &h.node)),
            },
            Err(_) => Err(Status::deadline_exceeded("the command was not applied in time; retry")),
        }
    }

    async fn read(&self, req: Request<proto::ReadRequest>) -> Result<Response<proto::ReadReply>, Status> {
        let who = self.caller(&req)?;
        let req = req.into_inner();
        let h = self.hosted(req.group_id)?;
        if req.query.len() > MAX_REQUEST {
            return Err(Status::invalid_argument("query too large"));
        }
        let q: Query = postcard::from_bytes(&req.query)
            .map_err(|e| Status::invalid_argument(format!("malformed query: {e}")))?;
        self.authorize(who.as_deref(), &Need::of_query(&q), &h).await?;
        let listing = matches!(q, Query::ListVolumes | Query::SliceData { .. }).then(|| q.clone());
        match tokio::time::timeout(APPLY_TIMEOUT, h.node.read(q)).await {
            Ok(Ok(result)) => {
                let result = postcard::to_allocvec(&result).map_err(|e| Status::internal(e.to_string()))?;
                let result = match &listing {
                    Some(q) => self.filter_reply(who.as_deref(), q, result, &h).await,
                    None => result,
                };
                Ok(Response::new(proto::ReadReply { result }))
            }
            Ok(Err(e)) => match self.forward_target(&e, req.hops, &h.node) {
                Some(mut f) => {
                    let r = tokio::time::timeout(
                        FORWARD_TIMEOUT,
                        f.client.read(proto::ReadRequest { hops: req.hops + 1, ..req }),
                    )
                    .await;
                    let mut resp = self.forwarded(&f, r)?;
                    if let Some(q) = &listing {
                        let r = std::mem::take(&mut resp.get_mut().result);
                        resp.get_mut().result = self.filter_reply(who.as_deref(), q, r, &h).await;
                    }
                    Ok(resp)
                }
                None => Err(self.to_status(e, &h.node)),
            },
            Err(_) => Err(Status::deadline_exceeded("the read did not complete in time; retry")),
        }
    }

    async fn write_batch(
        &self,
        req: Request<proto::WriteBatchRequest>,
    ) -> Result<Response<proto::BatchReply>, Status> {
        let who = self.caller(&req)?;
        let req = req.into_inner();
        let h = self.hosted(req.group_id)?;
        check_batch(&req.commands)?;
        let mut cmds = Vec::with_capacity(req.commands.len());
        for b in &req.commands {
            let cmd: Command = postcard::from_bytes(b)
                .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
            self.authorize(who.as_deref(), &Need::of_op(&cmd.op), &h).await?;
            cmds.push(cmd);
        }
        let waits = h.node.write_many(cmds);
        let mut items = Vec::with_capacity(waits.len());
        let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
        for w in waits {
            match tokio::time::timeout_at(deadline, w).await {
                Ok(Ok((result, _))) => items.push(ok_item(&result)?),
                Ok(Err(e)) if items.is_empty() && matches!(e, CoreError::NotLeader { .. }) => {
                    // The whole batch went to a follower: forward it, or redirect the client.
                    return match self.forward_target(&e, req.hops, &h.node) {
                        Some(mut f) => {
                            let r = tokio::time::timeout(
                                FORWARD_TIMEOUT,
                                f.client.write_batch(proto::WriteBatchRequest { hops: req.hops + 1, ..req }),
                            )
                            .await;
                            self.forwarded(&f, r)
                        }
                        None => Err(self.to_status(e, &h.node)),
                    };
                }
                Ok(Err(e)) => items.push(err_item(e.to_string())),
                Err(_) => items.push(err_item("not applied in time".into())),
            }
        }
        Ok(Response::new(proto::BatchReply { items }))
    }

    async fn read_batch(
        &self,
        req: Request<proto::ReadBatchRequest>,
    ) -> Result<Response<proto::BatchReply>, Status> {
        let who = self.caller(&req)?;
        let req = req.into_inner();
        let h = self.hosted(req.group_id)?;
        check_batch(&req.queries)?;
        let mut qs = Vec::with_capacity(req.queries.len());
        for b in &req.queries {
            let q: Query = postcard::from_bytes(b)
                .map_err(|e| Status::invalid_argument(format!("malformed query: {e}")))?;
            self.authorize(who.as_deref(), &Need::of_query(&q), &h).await?;
            qs.push(q);
        }
        // A gateway's volume lists and slice data are filtered (see `filter_reply`).
        let listings: Vec<Option<Query>> = qs
            .iter()
            .map(|q| matches!(q, Query::ListVolumes | Query::SliceData { .. }).then(|| q.clone()))
            .collect();
        let waits = h.node.read_many(qs);
        let mut items = Vec::with_capacity(waits.len());
        let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
        for (i, w) in waits.into_iter().enumerate() {
            match tokio::time::timeout_at(deadline, w).await {
                Ok(Ok(result)) => {
                    let mut item = ok_item(&result)?;
                    if let Some(q) = &listings[i] {
                        item.result = self.filter_reply(who.as_deref(), q, item.result, &h).await;
                    }
                    items.push(item);
                }
                Ok(Err(e)) if items.is_empty() && matches!(e, CoreError::NotLeader { .. }) => {
                    return match self.forward_target(&e, req.hops, &h.node) {
                        Some(mut f) => {
                            let r = tokio::time::timeout(
                                FORWARD_TIMEOUT,
                                f.client.read_batch(proto::ReadBatchRequest { hops: req.hops + 1, ..req }),
                            )
                            .await;
                            let mut resp = self.forwarded(&f, r)?;
                            for (item, listing) in resp.get_mut().items.iter_mut().zip(&listings) {
                                if let Some(q) = listing {
                                    let r = std::mem::take(&mut item.result);
                                    item.result = self.filter_reply(who.as_deref(), q, r, &h).await;
                                }
                            }
                            Ok(resp)
                        }
                        None => Err(self.to_status(e, &h.node)),
                    };
                }
                Ok(Err(e)) => items.push(err_item(e.to_string())),
                Err(_) => items.push(err_item("not answered in time".into())),
            }
        }
        Ok(Response::new(proto::BatchReply { items }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<proto::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let who = self.caller(&req)?;
        let req = req.into_inner();
        let h = self.hosted(req.group_id)?;
        let vol = req.volume_id;
        self.authorize(who.as_deref(), &Need::Volume(vol), &h).await?;
        let sub = h.node.hub.subscribe(vol, req.from_seq);
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            let event = |set: &elea_fsm::ChangeSet| proto::WatchEvent {
                volume_id: set.vol,
                seq: set.seq,
                changes: postcard::to_allocvec(&set.changes).unwrap_or_default(),
                reset: false,
                client: set.client,
            };
            let reset =
                proto::WatchEvent { volume_id: vol, seq: 0, changes: Vec::new(), reset: true, client: 0 };
            if sub.reset && tx.send(Ok(reset.clone())).await.is_err() {
                return;
            }
            for set in &sub.backlog {
                if tx.send(Ok(event(set))).await.is_err() {
                    return;
                }
            }
            let mut rx = sub.rx;
            loop {
                let next = tokio::select! {
                    // The client went away: end now, even on a quiet volume.
                    () = tx.closed() => return,
                    next = rx.recv() => next,
                };
                let ev = match next {
                    Ok(HubEvent::Changes(set)) if set.vol == vol => event(&set),
                    Ok(HubEvent::Changes(_)) => continue,
                    Ok(HubEvent::Reset) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        reset.clone()
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn status(
        &self,
        req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        let who = self.caller(&req)?;
        let h = self.hosted(req.get_ref().group_id)?;
        self.authorize(who.as_deref(), &Need::Any, &h).await?;
        let s = h.node.status().await.map_err(|e| self.to_status(e, &h.node))?;
        Ok(Response::new(status_reply(s, &self.addr)))
    }

    async fn change_membership(
        &self,
        req: Request<proto::ChangeMembershipRequest>,
    ) -> Result<Response<proto::ChangeMembershipReply>, Status> {
        let who = self.caller(&req)?;
        let h = self.hosted(req.get_ref().group_id)?;
        self.authorize(who.as_deref(), &Need::Admin, &h).await?;
        let req = req.into_inner();
        let change = match Kind::try_from(req.kind) {
            Ok(Kind::AddVoter) => MemberChange::AddVoter,
            Ok(Kind::AddLearner) => MemberChange::AddLearner,
            Ok(Kind::Remove) => MemberChange::Remove,
            Err(_) => {
                return Err(Status::invalid_argument(format!("unknown membership change kind {}", req.kind)));
            }
        };
        match tokio::time::timeout(
            APPLY_TIMEOUT,
            h.node.change_membership(change, req.node_id, req.addr.clone()),
        )
        .await
        {
            Ok(Ok(members)) => {
                Ok(Response::new(proto::ChangeMembershipReply { members: members_to_proto(members) }))
            }
            Ok(Err(e)) => match self.forward_target(&e, req.hops, &h.node) {
                Some(mut f) => {
                    let r = tokio::time::timeout(
                        APPLY_TIMEOUT,
                        f.client
                            .change_membership(proto::ChangeMembershipRequest { hops: req.hops + 1, ..req }),
                    )
                    .await;
                    self.forwarded(&f, r)
                }
                None => Err(self.to_status(e, &h.node)),
            },
            Err(_) => Err(Status::deadline_exceeded("the membership change was not applied in time")),
        }
    }

    async fn transfer_leader(
        &self,
        req: Request<proto::TransferLeaderRequest>,
    ) -> Result<Response<proto::TransferLeaderReply>, Status> {
        let who = self.caller(&req)?;
        let h = self.hosted(req.get_ref().group_id)?;
        self.authorize(who.as_deref(), &Need::Admin, &h).await?;
        let req = req.into_inner();
        match h.node.transfer_leader(req.to).await {
            Ok(()) => Ok(Response::new(proto::TransferLeaderReply {})),
            Err(e) => match self.forward_target(&e, req.hops, &h.node) {
                Some(mut f) => {
                    let r = tokio::time::timeout(
                        APPLY_TIMEOUT,
                        f.client.transfer_leader(proto::TransferLeaderRequest { hops: req.hops + 1, ..req }),
                    )
                    .await;
                    self.forwarded(&f, r)
                }
                None => Err(self.to_status(e, &h.node)),
            },
        }
    }
}

#[tonic::async_trait]
impl proto::raft_peer_server::RaftPeer for MetaService {
    async fn send(&self, req: Request<proto::RaftBatch>) -> Result<Response<proto::RaftAck>, Status> {
        if let Some(id) = self.caller(&req)?
            && (id.role != Role::Meta || id.name != req.get_ref().from.to_string())
        {
            return Err(self.refuse(format!("{id} may not send as node {}", req.get_ref().from)));
        }
        self.deliver_batch(req.into_inner())?;
        Ok(Response::new(proto::RaftAck {}))
    }
}

impl MetaService {
    /// Checks a peer's batch and hands its messages to the group. A bad batch is refused
    /// whole (nothing of it is delivered).
    fn deliver_batch(&self, req: proto::RaftBatch) -> Result<(), Status> {
        let h = self.hosted(req.group_id)?;
        if req.to != self.id {
            return Err(Status::failed_precondition(format!(
                "raft message for node {} reached node {}",
                req.to, self.id
            )));
        }
        let mut msgs = Vec::with_capacity(req.messages.len());
        for b in &req.messages {
            let m = decode_message(b).map_err(|e| Status::invalid_argument(e.to_string()))?;
            if m.from != req.from {
                return Err(Status::invalid_argument("raft message sender does not match the batch"));
            }
            msgs.push(m);
        }
        h.transport.learn(req.from, &req.from_addr);
        h.node.deliver(msgs).map_err(|e| self.to_status(e, &h.node))
    }
}
