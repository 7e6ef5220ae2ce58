//! Peer transport: sends this node's Raft messages to other nodes over gRPC.
//!
//! One tokio task per peer keeps per-peer order, batches whatever is queued into one RPC, and
//! reports failures back to raft-rs (unreachable peers, failed snapshots) so it backs off.
//! Addresses come from the replicated member book, or for a node that is not yet in our book
//! (a joining node talking to us first) from the address it sent with its own messages.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use elea_common::{GroupId, NodeId};
use raft::prelude::Message;
use tokio::sync::mpsc;

use super::core::{encode_message, is_snapshot};
use super::node::{NodeHandle, NodeMsg};
use crate::proto::RaftBatch;
use crate::proto::raft_peer_client::RaftPeerClient;

/// Largest Raft RPC (snapshots travel in one message).
pub const MAX_RAFT_MESSAGE: usize = 1 << 30;

struct Inner {
    id: NodeId,
    addr: String,
    group: GroupId,
    peers: Mutex<HashMap<NodeId, mpsc::UnboundedSender<Message>>>,
    learned: RwLock<HashMap<NodeId, String>>,
    node: OnceLock<NodeHandle>,
    rt: tokio::runtime::Handle,
}

/// Cloneable; see the module docs.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl Transport {
    /// Must be created inside a tokio runtime (the peer tasks run on it).
    pub fn new(id: NodeId, addr: String, group: GroupId) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                addr,
                group,
                peers: Mutex::new(HashMap::new()),
                learned: RwLock::new(HashMap::new()),
                node: OnceLock::new(),
                rt: tokio::runtime::Handle::current(),
            }),
        }
    }

    pub(crate) fn attach(&self, node: NodeHandle) {
        let _ = self.inner.node.set(node);
    }

    /// Remembers where a peer that messaged us listens.
    pub fn learn(&self, id: NodeId, addr: &str) {
        if id == self.inner.id || super::core::validate_addr(addr).is_err() {
            return;
        }
        if let Ok(mut l) = self.inner.learned.write()
            && l.get(&id).map(String::as_str) != Some(addr)
        {
            l.insert(id, addr.to_string());
        }
    }

    /// Queues messages for their peers. Never blocks.
    pub fn send(&self, msgs: Vec<Message>) {
        let Ok(mut peers) = self.inner.peers.lock() else { return };
        for m in msgs {
            let to = m.to;
            if to == self.inner.id || to == 0 {
                continue;
            }
            let tx = peers.entry(to).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                self.inner.rt.spawn(peer_loop(self.inner.clone(), to, rx));
                tx
            });
            if tx.send(m).is_err() {
                peers.remove(&to);
            }
        }
    }
}

fn addr_of(inner: &Inner, id: NodeId) -> Option<String> {
    inner.node.get().and_then(|n| n.addr_of(id)).or_else(|| inner.learned.read().ok()?.get(&id).cloned())
}

type PeerClient = RaftPeerClient<tonic::transport::Channel>;

/// An open stream to one peer; sending fails once the stream has ended.
struct PeerStream {
    addr: String,
    tx: mpsc::Sender<RaftBatch>,
}

async fn peer_loop(inner: Arc<Inner>, to: NodeId, mut rx: mpsc::UnboundedReceiver<Message>) {
    let mut client: Option<(String, PeerClient)> = None;
    let mut stream: Option<PeerStream> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let node = inner.node.get();
        let report = |snapshot: bool| {
            if let Some(n) = node {
                n.report(NodeMsg::Unreachable(to));
                if snapshot {
                    n.report(NodeMsg::SnapshotDone(to, false));
                }
            }
        };
        let has_snapshot = batch.iter().any(is_snapshot);
        let Some(addr) = addr_of(&inner, to) else {
            report(has_snapshot);
            continue;
        };
        if client.as_ref().is_none_or(|(a, _)| *a != addr) {
            client = connect(&addr).map(|c| (addr.clone(), c));
            stream = None;
        }
        let Some((_, c)) = client.as_mut() else { continue };
        let messages: Vec<Vec<u8>> = batch.iter().filter_map(|m| encode_message(m).ok()).collect();
        let req =
            RaftBatch { group_id: inner.group, from: inner.id, from_addr: inner.addr.clone(), to, messages };
        if has_snapshot {
            // Snapshots go alone and are acknowledged, so raft-rs learns whether they arrived.
            let mut request = tonic::Request::new(req);
            request.set_timeout(Duration::from_secs(120));
            let ok = c.send(request).await.is_ok();
            if let Some(n) = node {
                n.report(NodeMsg::SnapshotDone(to, ok));
            }
            if !ok {
                report(false);
            }
            continue;
        }
        if stream.as_ref().is_none_or(|s| s.addr != addr || s.tx.is_closed()) {
            stream = Some(open_stream(c.clone(), addr.clone(), to));
        }
        // Never wait on a peer: if its stream is backed up (or dead), drop the batch and tell
        // raft-rs, which resends what matters.
        let sent = match &stream {
            Some(s) => s.tx.try_send(req).is_ok(),
            None => false,
        };
        if !sent {
            tracing::debug!(peer = to, %addr, "raft stream closed");
            stream = None;
            client = None;
            // Drop what queued up meanwhile: raft-rs resends what matters.
            while rx.try_recv().is_ok() {}
            report(false);
        }
    }
}

/// Starts a streaming RPC to a peer; the stream ends (and `tx` closes) when the RPC fails.
fn open_stream(mut c: PeerClient, addr: String, to: NodeId) -> PeerStream {
    let (tx, rx) = mpsc::channel::<RaftBatch>(256);
    tokio::spawn(async move {
        let outbound = tokio_stream::wrappers::ReceiverStream::new(rx);
        if let Err(status) = c.stream(outbound).await {
            tracing::debug!(peer = to, error = %status.message(), "raft stream ended");
        }
    });
    PeerStream { addr, tx }
}

fn connect(addr: &str) -> Option<RaftPeerClient<tonic::transport::Channel>> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        // Detect a peer that silently stopped answering (no RST, e.g. a partition).
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    Some(
        RaftPeerClient::new(ep.connect_lazy())
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE),
    )
}
