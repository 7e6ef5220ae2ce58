//! Starting a metadata node: open its storage, bootstrap or rejoin, start the group thread and
//! serve gRPC on an already-bound listener until a shutdown future resolves.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use elea_auth::Role;
use elea_auth::tls::{Tls, TlsConn};
use elea_common::ids::DEFAULT_GROUP;
use elea_common::{GroupId, NodeId};
use tokio::net::{TcpListener, TcpStream};

use crate::proto::meta_server::MetaServer;
use crate::proto::raft_peer_server::RaftPeerServer;
use crate::raft::core::{CoreConfig, GroupCore, Member, validate_addr};
use crate::raft::link::MAGIC;
use crate::raft::node::{self, NodeConfig, NodeHandle};
use crate::raft::storage::{GroupStorage, LogStore, LogStoreConfig};
use crate::raft::transport::{LinkRouter, MAX_RAFT_MESSAGE, Transport};
use crate::service::{Groups, Hosted, MAX_REQUEST, MAX_RESPONSE, MetaService};
use elea_common::local::Registration;

/// How often an idle gRPC connection is pinged, and how long the answer may take.
const KEEPALIVE: Duration = Duration::from_secs(20);

/// How long open connections may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The site of a node that names none.
pub const DEFAULT_SITE: &str = "local";

/// Everything `elea meta` needs.
#[derive(Debug, Clone)]
pub struct MetaNodeConfig {
    pub node_id: NodeId,
    /// The address peers and clients reach this node at (`HOST:PORT`).
    pub advertise: String,
    pub data_dir: PathBuf,
    /// Initial voters of a new cluster (must include this node). Ignored when the data dir
    /// already holds state.
    pub initial_cluster: Vec<Member>,
    /// Addresses of an existing cluster this (new, empty) node joins after `cluster add`.
    pub join: Vec<String>,
    pub group: GroupId,
    /// The site (environment) this node runs in; recorded in the site map when it starts.
    pub site: String,
    pub snapshot_every: u64,
    pub compact_margin: u64,
    pub node: NodeConfig,
    /// Mutual TLS on every connection (clients, peer links, snapshots), with this node's
    /// `meta` certificate; `None` serves plaintext.
    pub tls: Option<Tls>,
}

impl MetaNodeConfig {
    pub fn new(node_id: NodeId, advertise: String, data_dir: PathBuf) -> Self {
        let core = CoreConfig::new(node_id, DEFAULT_GROUP);
        Self {
            node_id,
            advertise,
            data_dir,
            initial_cluster: Vec::new(),
            join: Vec::new(),
            group: DEFAULT_GROUP,
            site: DEFAULT_SITE.to_string(),
            snapshot_every: core.snapshot_every,
            compact_margin: core.compact_margin,
            node: NodeConfig::default(),
            tls: None,
        }
    }
}

/// A start-up failure: bad configuration or unusable storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Parses `1=HOST:PORT,2=HOST:PORT`.
pub fn parse_initial_cluster(s: &str) -> Result<Vec<Member>, ServeError> {
    let mut out: Vec<Member> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) =
            part.split_once('=').ok_or_else(|| ServeError::Config(format!("{part:?}: want ID=HOST:PORT")))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| ServeError::Config(format!("{part:?}: node id must be a positive integer")))?;
        if id == 0 {
            return Err(ServeError::Config("node id 0 is reserved".into()));
        }
        validate_addr(addr).map_err(|e| ServeError::Config(e.to_string()))?;
        if out.iter().any(|m| m.id == id) {
            return Err(ServeError::Config(format!("node id {id} appears twice")));
        }
        out.push(Member { id, addr: addr.to_string(), learner: false });
    }
    if out.is_empty() {
        return Err(ServeError::Config("the initial cluster is empty".into()));
    }
    Ok(out)
}

/// Runs a metadata node until `shutdown` resolves.
pub async fn serve(
    cfg: MetaNodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if cfg.node_id == 0 {
        return Err(ServeError::Config("node id 0 is reserved".into()));
    }
    validate_addr(&cfg.advertise).map_err(|e| ServeError::Config(e.to_string()))?;
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| ServeError::Storage(format!("{}: {e}", cfg.data_dir.display())))?;
    let old_format = cfg.data_dir.join("raft.redb");
    if old_format.exists() {
        // Not converted: an earlier version kept the Raft log in one redb file.
        return Err(ServeError::Storage(format!(
            "{} holds Raft state in the format of an earlier version (redb), which this version \
             does not read; run the earlier version, or remove this node from the cluster and \
             join it again with an empty data dir (it catches up from a snapshot)",
            old_format.display()
        )));
    }
    let store = LogStore::open(&cfg.data_dir.join("raft"), &LogStoreConfig::default())
        .map_err(|e| ServeError::Storage(e.to_string()))?;
    let mut storage =
        GroupStorage::open(store.clone(), cfg.group).map_err(|e| ServeError::Storage(e.to_string()))?;
    if let Some(tls) = &cfg.tls {
        let me = tls.identity();
        if me.role != Role::Meta || me.name != cfg.node_id.to_string() {
            return Err(ServeError::Config(format!(
                "the certificate is for {me}; node {} needs a meta certificate named {} \
                 (`elea certs issue --role meta --name {}`)",
                cfg.node_id, cfg.node_id, cfg.node_id
            )));
        }
    }
    let host = Arc::new(Host {
        cfg: cfg.clone(),
        store,
        router: Arc::new(LinkRouter::default()),
        groups: Arc::new(Groups::default()),
        running: std::sync::Mutex::new(Vec::new()),
    });
    let transport = host.transport(cfg.group)?;
    if storage.is_fresh() {
        if !cfg.join.is_empty() {
            tracing::info!(join = ?cfg.join, "empty data dir: joining an existing cluster");
            learn_from_cluster(&cfg, &transport).await?;
        } else if cfg.initial_cluster.is_empty() {
            return Err(ServeError::Config("empty data dir: give --initial-cluster or --join".into()));
        } else {
            match cfg.initial_cluster.iter().find(|m| m.id == cfg.node_id) {
                Some(me) if me.addr == cfg.advertise => {}
                Some(me) => {
                    return Err(ServeError::Config(format!(
                        "--initial-cluster lists node {} at {} but it listens at {}",
                        cfg.node_id, me.addr, cfg.advertise
                    )));
                }
                None => {
                    return Err(ServeError::Config(format!(
                        "--initial-cluster does not include this node ({})",
                        cfg.node_id
                    )));
                }
            }
            GroupCore::bootstrap(&mut storage, &cfg.initial_cluster)
                .map_err(|e| ServeError::Storage(e.to_string()))?;
            tracing::info!(voters = cfg.initial_cluster.len(), "bootstrapped a new cluster");
        }
    } else {
        tracing::info!(dir = %cfg.data_dir.display(), "rejoining with existing state");
    }
    let (handle, mut ended) = host.start(cfg.group, storage, transport)?;
    let svc = Arc::new(
        MetaService::new(host.groups.clone(), cfg.node_id, cfg.advertise.clone(), cfg.tls.as_ref())
            .map_err(|e| ServeError::Config(e.to_string()))?,
    );
    let volume_groups = tokio::spawn(host_volume_groups(host.clone(), handle.clone()));
    let registration =
        tokio::spawn(register_site(svc.clone(), cfg.node_id, cfg.site.clone(), cfg.advertise.clone()));
    // Peers keep long-lived streams open, so a graceful shutdown would wait for ever: after
    // the signal, open connections get SHUTDOWN_GRACE to finish, then the server is dropped.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let groups = host.groups.clone();
    tokio::spawn(async move {
        shutdown.await;
        // Every group this node leads hands over at once.
        let handing =
            groups.all().into_iter().map(|(_, h)| async move { hand_over_leadership(&h.node).await });
        futures::future::join_all(handing).await;
        let _ = stop_tx.send(true);
    });
    let mut graceful = stop_rx.clone();
    let mut forced = stop_rx;
    let peers = svc.clone();
    let router = tonic::transport::Server::builder()
        // A client that stops answering pings (gone without closing) is dropped.
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .add_service(
            MetaServer::from_arc(svc.clone())
                .max_decoding_message_size(MAX_REQUEST * 2)
                .max_encoding_message_size(MAX_RESPONSE),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            RaftPeerServer::from_arc(svc)
                .max_decoding_message_size(MAX_RAFT_MESSAGE)
                .max_encoding_message_size(MAX_RAFT_MESSAGE),
            // Before the body (up to MAX_RAFT_MESSAGE) is read: only meta nodes send Raft.
            move |req: tonic::Request<()>| peers.check_peer(&req).map(|()| req),
        ));
    let stop = async move {
        let _ = graceful.wait_for(|stop| *stop).await;
    };
    // One port for both: gRPC connections go to tonic, peer links to the transport.
    let (server, accept): (std::pin::Pin<Box<dyn Future<Output = _> + Send>>, _) = match cfg.tls.clone() {
        None => {
            let (conn_tx, conn_rx) = tokio::sync::mpsc::channel::<std::io::Result<TcpStream>>(64);
            let accept = tokio::spawn(accept_loop(listener, host.router.clone(), conn_tx));
            let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
            (Box::pin(router.serve_with_incoming_shutdown(incoming, stop)), accept)
        }
        Some(tls) => {
            let (conn_tx, conn_rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(64);
            let accept = tokio::spawn(accept_tls_loop(listener, tls, host.router.clone(), conn_tx));
            let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
            (Box::pin(router.serve_with_incoming_shutdown(incoming, stop)), accept)
        }
    };
    let result = tokio::select! {
        r = server => r.map_err(ServeError::from),
        _ = async move {
            let _ = forced.wait_for(|stop| *stop).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::info!("closing connections still open after {SHUTDOWN_GRACE:?}");
            Ok(())
        }
        // The group died (storage failure): stop serving rather than linger as a node that
        // answers but can do nothing; clients fail over to the others.
        _ = &mut ended => Err(ServeError::Storage("the raft group stopped after a fatal error (see the log)".into())),
    };
    accept.abort();
    registration.abort();
    volume_groups.abort();
    let running = std::mem::take(&mut *host.running.lock().unwrap_or_else(|p| p.into_inner()));
    for r in &running {
        r.transport.shutdown();
        r.handle.stop();
    }
    let _ = tokio::task::spawn_blocking(move || {
        for r in running {
            let _ = r.join.join();
        }
    })
    .await;
    result
}

/// How long a new connection may take to send its first byte before it is handed to gRPC.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections and tells peer links (whose first byte is NUL, which no HTTP/2 client
/// sends) from gRPC connections. Ends when the gRPC server stops taking connections.
async fn accept_loop(
    listener: TcpListener,
    router: Arc<LinkRouter>,
    grpc: tokio::sync::mpsc::Sender<std::io::Result<TcpStream>>,
) {
    while !grpc.is_closed() {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, for example: keep serving the connections we have.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (router, grpc) = (router.clone(), grpc.clone());
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(SNIFF_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(0) | Err(_)) => {}
                Ok(Ok(_)) if first[0] == MAGIC[0] => match stream.into_std() {
                    Ok(sock) => router.accept_link(crate::raft::link::InStream { sock, tls: None }, None),
                    Err(e) => tracing::warn!(error = %e, "cannot take over a peer link"),
                },
                _ => {
                    let _ = grpc.send(Ok(stream)).await;
                }
            }
        });
    }
}

/// Handshakes a node runs at once; more connections wait in the listen queue.
const MAX_HANDSHAKES: usize = 256;

/// With TLS: accepts connections, completes each handshake (a client without a certificate
/// of this cluster is refused before it sends a byte of a request), and tells peer links from
/// gRPC connections by the protocol the client asked for (ALPN).
async fn accept_tls_loop(
    listener: TcpListener,
    tls: Tls,
    router: Arc<LinkRouter>,
    grpc: tokio::sync::mpsc::Sender<std::io::Result<TlsConn>>,
) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    while !grpc.is_closed() {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let slot = tls.connection_slot().await;
        let (stream, addr) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tls, router, grpc) = (tls.clone(), router.clone(), grpc.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some(conn) = tls.accept(stream, addr, slot).await else { return };
            if !conn.is_link() {
                let _ = grpc.send(Ok(conn)).await;
                return;
            }
            let (tcp, session, peer) = conn.into_parts();
            match tcp.into_std() {
                Ok(sock) => router.accept_link(
                    crate::raft::link::InStream { sock, tls: Some(Box::new(session)) },
                    Some(peer.identity),
                ),
                Err(e) => tracing::warn!(error = %e, "cannot take over a peer link"),
            }
        });
    }
}

/// A joining node asks the cluster for its member book (so it can answer the leader) and
/// checks that it was added first.
async fn learn_from_cluster(cfg: &MetaNodeConfig, transport: &Transport) -> Result<(), ServeError> {
    let tls = match &cfg.tls {
        Some(t) => Some(t.connector(&[Role::Meta]).map_err(|e| ServeError::Config(e.to_string()))?),
        None => None,
    };
    let client = crate::client::MetaClient::connect(
        &cfg.join,
        crate::client::ClientConfig { tls, ..Default::default() },
    )
    .map_err(|e| ServeError::Config(e.to_string()))?;
    let start = tokio::time::Instant::now();
    loop {
        let mut answered = None;
        for addr in &cfg.join {
            let Ok(s) = client.status_of(addr).await else { continue };
            if s.members.iter().any(|m| m.node_id == cfg.node_id) {
                for m in &s.members {
                    transport.learn(m.node_id, &m.addr);
                }
                return Ok(());
            }
            answered = Some(addr.clone());
        }
        // A follower may not have applied the addition yet: ask again for a few seconds.
        let waited = start.elapsed();
        match answered {
            Some(addr) if waited > Duration::from_secs(5) => {
                return Err(ServeError::Config(format!(
                    "node {} is not a member of the cluster at {addr}; add it first with \
                     `elea cluster add --node-id {} --addr {}`",
                    cfg.node_id, cfg.node_id, cfg.advertise
                )));
            }
            None if waited > Duration::from_secs(30) => {
                return Err(ServeError::Config(format!("no node of {:?} answered", cfg.join)));
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A leader that is asked to stop first hands its leadership to another voter (up to
/// `HAND_OVER_WAIT`), so clients do not wait out an election timeout: a rolling restart then
/// costs them a redirect, not seconds.
async fn hand_over_leadership(node: &NodeHandle) {
    let Ok(st) = node.status().await else { return };
    if st.role != "leader" {
        return;
    }
    let me = st.node_id;
    let Some(to) = st.members.iter().find(|m| m.id != me && !m.learner).map(|m| m.id) else {
        return;
    };
    if let Err(e) = node.transfer_leader(to).await {
        tracing::info!(to, error = %e, "stopping: could not hand leadership over");
        return;
    }
    let deadline = tokio::time::Instant::now() + HAND_OVER_WAIT;
    while tokio::time::Instant::now() < deadline {
        if node.status().await.is_ok_and(|s| s.role != "leader") {
            tracing::info!(to, "stopping: handed leadership over");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(to, "stopping: leadership did not move in time; stopping anyway");
}

const HAND_OVER_WAIT: Duration = Duration::from_secs(2);

/// Records this node's site and address in the site map, retrying until the cluster has a
/// leader that takes it (a node that is not a member yet, or a cluster still electing, gets
/// there later). Once per start: the record only changes when the node is restarted with
/// another site or address.
async fn register_site(svc: std::sync::Arc<MetaService>, id: NodeId, site: String, addr: String) {
    let mut wait = Duration::from_millis(200);
    loop {
        let op = elea_fsm::Op::RegisterMetaNode { id, site: site.clone(), addr: addr.clone() };
        match svc.propose(op).await {
            Ok(Ok(_)) => {
                tracing::info!(site = %site, "recorded this node's site");
                return;
            }
            // Refused for good (a bad site name is refused at start; this is a full table).
            Ok(Err(e)) => {
                tracing::error!(site = %site, "the cluster refused this node's site: {e}");
                return;
            }
            Err(e) => tracing::debug!("recording this node's site: {}; retrying", e.message()),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// The Raft groups this node runs.
struct Host {
    cfg: MetaNodeConfig,
    store: Arc<LogStore>,
    router: Arc<LinkRouter>,
    groups: Arc<Groups>,
    running: std::sync::Mutex<Vec<Running>>,
}

/// A group's threads, stopped when the node stops.
struct Running {
    handle: NodeHandle,
    transport: Transport,
    join: std::thread::JoinHandle<()>,
    _local: Registration<NodeHandle>,
}

impl Host {
    fn transport(&self, group: GroupId) -> Result<Transport, ServeError> {
        let (id, addr) = (self.cfg.node_id, self.cfg.advertise.clone());
        match &self.cfg.tls {
            Some(tls) => {
                Transport::with_tls(id, addr, group, tls).map_err(|e| ServeError::Config(e.to_string()))
            }
            None => Ok(Transport::new(id, addr, group)),
        }
    }

    /// Starts group `group` from its storage: its thread, its links, its place in the service.
    /// The receiver resolves when the group's thread ends.
    fn start(
        &self,
        group: GroupId,
        storage: GroupStorage,
        transport: Transport,
    ) -> Result<(NodeHandle, tokio::sync::oneshot::Receiver<()>), ServeError> {
        let cfg = &self.cfg;
        let mut core_cfg = CoreConfig::new(cfg.node_id, group);
        core_cfg.snapshot_every = cfg.snapshot_every;
        core_cfg.compact_margin = cfg.compact_margin;
        core_cfg.async_writes = true;
        core_cfg.defer_commit_broadcast = !cfg.node.announce_commit_after.is_zero();
        core_cfg.read_lease =
            core_cfg.lease_for_tick(u64::try_from(cfg.node.tick.as_nanos()).unwrap_or(u64::MAX));
        let core = GroupCore::open(core_cfg, storage).map_err(|e| ServeError::Storage(e.to_string()))?;
        let (handle, join, ended) = node::spawn(core, cfg.node.clone(), transport.clone())
            .map_err(|e| ServeError::Storage(format!("cannot start raft group {group}: {e}")))?;
        self.router.add(transport.clone());
        self.groups.insert(group, Hosted { node: handle.clone(), transport: transport.clone() });
        let local = crate::local::register(&cfg.advertise, group, handle.clone());
        if let Ok(mut r) = self.running.lock() {
            r.push(Running { handle: handle.clone(), transport, join, _local: local });
        }
        Ok((handle, ended))
    }

    /// Starts the group of volume record `rec`, from its storage when this node ran it
    /// before; else, for a first member, from the record (the first state every first member
    /// starts from), and for a member added later, empty (its leader sends it a snapshot).
    fn start_volume_group(&self, rec: &elea_fsm::GroupRecord) -> Result<(), ServeError> {
        let mut storage = GroupStorage::open(self.store.clone(), rec.group)
            .map_err(|e| ServeError::Storage(e.to_string()))?;
        let transport = self.transport(rec.group)?;
        if storage.is_fresh() && rec.is_first_member(self.cfg.node_id) {
            let members: Vec<Member> = rec
                .voters
                .iter()
                .map(|(id, addr)| Member { id: *id, addr: addr.clone(), learner: false })
                .chain(rec.learners.iter().map(|(id, addr)| Member {
                    id: *id,
                    addr: addr.clone(),
                    learner: true,
                }))
                .collect();
            let state = elea_fsm::StateMachine::for_group(rec).map_err(|e| {
                ServeError::Config(format!("group {} of volume {}: {e}", rec.group, rec.name))
            })?;
            GroupCore::bootstrap_with(&mut storage, &members, &state)
                .map_err(|e| ServeError::Storage(e.to_string()))?;
        } else if storage.is_fresh() {
            // Added later: the members' addresses let it answer the leader before the
            // leader's snapshot brings the member book.
            for (id, addr, _) in rec.members() {
                if id != self.cfg.node_id {
                    transport.learn(id, &addr);
                }
            }
        }
        self.start(rec.group, storage, transport)?;
        tracing::info!(group = rec.group, volume = %rec.name, home = %rec.home, "serving the volume's raft group");
        Ok(())
    }

    /// Stops running group `group` (this node left it). Its storage stays until the data
    /// directory is cleaned; joining the group again starts from it.
    fn stop_group(&self, group: GroupId) {
        self.groups.remove(group);
        self.router.remove(group);
        let stopped = {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            let i = running.iter().position(|r| r.transport.group() == group);
            i.map(|i| running.swap_remove(i))
        };
        if let Some(r) = stopped {
            r.transport.shutdown();
            r.handle.stop();
            std::thread::spawn(move || {
                let _ = r.join.join();
            });
            tracing::info!(group, "left the volume's raft group: stopped it");
        }
    }
}

/// How often a node looks for volume groups it should run.
const GROUPS_EVERY: Duration = Duration::from_millis(200);

/// Starts the group of every volume the control group places on this node, as the node
/// learns of it from its replica of the control group (at start, the groups it ran before);
/// and hands the leadership of a volume's group it leads from outside the volume's home site
/// to a voter in that site (a group with voters in several sites, `--spread-voters`, elects
/// whichever voter times out first), so the home site's calls cost one local round trip to
/// the leader and the leader's one to a quorum, not a WAN round trip more.
async fn host_volume_groups(host: Arc<Host>, control: NodeHandle) {
    let me = host.cfg.node_id;
    let mut failed: std::collections::HashSet<GroupId> = std::collections::HashSet::new();
    let mut handed: std::collections::HashMap<GroupId, tokio::time::Instant> =
        std::collections::HashMap::new();
    loop {
        if let Some(Ok(elea_fsm::Reply::Groups(recs))) = control.query_applied(&elea_fsm::Query::Groups) {
            for rec in recs.iter().filter(|r| r.has_member(me) && !host.groups.contains(r.group)) {
                if let Err(e) = host.start_volume_group(rec)
                    && failed.insert(rec.group)
                {
                    tracing::error!(group = rec.group, volume = %rec.name, "cannot run the volume's raft group: {e}");
                }
            }
            for rec in recs.iter().filter(|r| !r.has_member(me) && host.groups.contains(r.group)) {
                host.stop_group(rec.group);
            }
            let sites = match control.query_applied(&elea_fsm::Query::Sites) {
                Some(Ok(elea_fsm::Reply::Sites(m))) => m,
                _ => elea_fsm::SiteMap::default(),
            };
            for rec in recs.iter().filter(|r| r.home != host.cfg.site) {
                let recent = handed.get(&rec.group).is_some_and(|t| t.elapsed() < HAND_HOME_EVERY);
                let Some(h) = host.groups.get(rec.group).filter(|_| !recent) else { continue };
                let Ok(st) = h.node.status().await else { continue };
                if st.role != "leader" {
                    continue;
                }
                let home = |id: u64| sites.meta_site(id) == Some(rec.home.as_str());
                let Some(to) =
                    st.members.iter().find(|m| !m.learner && m.id != me && home(m.id)).map(|m| m.id)
                else {
                    continue;
                };
                handed.insert(rec.group, tokio::time::Instant::now());
                match h.node.transfer_leader(to).await {
                    Ok(()) => {
                        tracing::info!(group = rec.group, to, home = %rec.home, "handing the volume's group to its home site")
                    }
                    Err(e) => {
                        tracing::debug!(group = rec.group, to, error = %e, "could not hand the group to its home site")
                    }
                }
            }
        }
        tokio::time::sleep(GROUPS_EVERY).await;
    }
}

/// How often a leader outside a volume's home site tries to hand the group over.
const HAND_HOME_EVERY: Duration = Duration::from_secs(5);
