//! Peer transport: this node's Raft messages to the other nodes, over peer links (see
//! [`super::link`]) for everything but snapshots, which go as a gRPC call each so raft-rs
//! learns whether they arrived.
//!
//! Sending never blocks the caller (the group thread or the log writer): a message to a peer
//! whose link is connected and idle is written to the socket at once, without a thread
//! hand-off; when the socket is full, or the link is not connected, the bytes wait for the
//! link's own thread, which connects and writes them in order. A link that fails drops what
//! waited and tells raft-rs the peer is unreachable, so it resends what matters.
//!
//! The links peers open to us are read by the group thread itself (see [`super::inbox`]),
//! once a short-lived thread has checked their hello.
//!
//! Addresses come from the replicated member book, or for a node that is not yet in our book
//! (a joining node talking to us first) from the address it sent when it opened its link.
//!
//! In a cluster with certificates links and snapshots go over mutual TLS, and a link is
//! accepted only from the node its certificate names.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use elea_auth::tls::{Connector, Tls};
use elea_auth::{AuthError, Identity, Role, rustls};
use elea_common::{GroupId, NodeId};
use raft::prelude::Message;

use super::core::{encode_message, is_snapshot};
use super::link::{self, Hello, InStream, LinkError, OutConn};
use super::node::{NodeHandle, NodeMsg};
use crate::proto::RaftBatch;
use crate::proto::raft_peer_client::RaftPeerClient;

/// Largest Raft RPC (snapshots travel in one message).
pub const MAX_RAFT_MESSAGE: usize = 1 << 30;
/// How long connecting, and the peer's answer to our hello, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A link whose written bytes go unacknowledged (or whose socket stays full) this long is
/// taken for dead: a peer that stopped answering without closing, such as across a partition.
const STALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes a link may hold for a peer that does not keep up before it drops them.
const MAX_BACKLOG: usize = 256 << 20;
/// Links peers may be opening to this node at once (hellos not yet checked).
const MAX_HANDSHAKES: usize = 64;
/// Addresses learned from hellos of nodes that are not (yet) in the member book.
const MAX_LEARNED: usize = 16;
/// How long a link's thread waits after a failed connection before it tries again.
const RETRY_AFTER: Duration = Duration::from_millis(100);

struct Inner {
    id: NodeId,
    addr: String,
    group: GroupId,
    links: Mutex<HashMap<NodeId, Arc<Link>>>,
    learned: RwLock<HashMap<NodeId, String>>,
    node: OnceLock<NodeHandle>,
    rt: tokio::runtime::Handle,
    closed: AtomicBool,
    /// Mutual TLS, in a cluster with certificates.
    tls: Option<Secure>,
}

/// What a node with certificates needs to open links and send snapshots.
struct Secure {
    links: Arc<rustls::ClientConfig>,
    grpc: Connector,
}

/// Cloneable; see the module docs.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

impl Transport {
    /// Must be created inside a tokio runtime (snapshots are sent from it).
    pub fn new(id: NodeId, addr: String, group: GroupId) -> Self {
        Self::with(id, addr, group, None)
    }

    /// A transport whose links and snapshots use mutual TLS with `tls`'s certificate.
    pub fn with_tls(id: NodeId, addr: String, group: GroupId, tls: &Tls) -> Result<Self, AuthError> {
        let secure = Secure { links: tls.link_client_config()?, grpc: tls.connector(&[Role::Meta])? };
        Ok(Self::with(id, addr, group, Some(secure)))
    }

    fn with(id: NodeId, addr: String, group: GroupId, tls: Option<Secure>) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                addr,
                group,
                links: Mutex::new(HashMap::new()),
                learned: RwLock::new(HashMap::new()),
                node: OnceLock::new(),
                rt: tokio::runtime::Handle::current(),
                closed: AtomicBool::new(false),
                tls,
            }),
        }
    }

    /// The group this transport carries.
    pub fn group(&self) -> GroupId {
        self.inner.group
    }

    pub(crate) fn attach(&self, node: NodeHandle) {
        let _ = self.inner.node.set(node);
    }

    /// Remembers where a peer that messaged us listens.
    pub fn learn(&self, id: NodeId, addr: &str) {
        learn(&self.inner, id, addr);
    }

    /// Sends messages to their peers. Never blocks on a peer.
    pub fn send(&self, msgs: Vec<Message>) {
        if self.inner.closed.load(Ordering::Relaxed) {
            return;
        }
        // Frames per peer, in order.
        let mut out: Vec<(NodeId, Vec<u8>)> = Vec::new();
        for m in msgs {
            let to = m.to;
            if to == self.inner.id || to == 0 {
                continue;
            }
            if is_snapshot(&m) {
                send_snapshot(&self.inner, m);
                continue;
            }
            let i = match out.iter().position(|(t, _)| *t == to) {
                Some(i) => i,
                None => {
                    out.push((to, Vec::with_capacity(512)));
                    out.len() - 1
                }
            };
            if let Err(e) = link::push_frame(&mut out[i].1, &m) {
                tracing::warn!(peer = to, error = %e, "raft message not sent");
            }
        }
        for (to, frames) in out {
            if frames.is_empty() {
                continue;
            }
            match self.link(to) {
                Some(link) => link.send(&self.inner, frames),
                None => report(&self.inner, NodeMsg::Unreachable(to)),
            }
        }
    }

    /// The link to `to`, started on first use. Only for a node whose address is known (a
    /// member, or one of the few learned from hellos), so a peer naming made-up senders
    /// cannot make this node start a thread for each.
    fn link(&self, to: NodeId) -> Option<Arc<Link>> {
        let mut links = self.inner.links.lock().ok()?;
        if let Some(l) = links.get(&to) {
            return Some(l.clone());
        }
        if self.inner.closed.load(Ordering::Relaxed) || addr_of(&self.inner, to).is_none() {
            return None;
        }
        let l = Arc::new(Link { to, state: Mutex::new(LinkState::default()), wake: Condvar::new() });
        let (inner, thread_link) = (self.inner.clone(), l.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("raft-link-{to}"))
            .spawn(move || thread_link.run(&inner));
        if let Err(e) = spawned {
            tracing::error!(peer = to, error = %e, "cannot start a raft link thread");
            return None;
        }
        links.insert(to, l.clone());
        Some(l)
    }

    /// Closes the links to peers and drops later sends. (The group thread closes the links
    /// from peers when it stops.)
    pub fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        if let Ok(links) = self.inner.links.lock() {
            for l in links.values() {
                if let Ok(mut st) = l.state.lock() {
                    st.closed = true;
                    if let Some((c, _)) = st.conn.take() {
                        let _ = c.sock.shutdown(Shutdown::Both);
                    }
                }
                l.wake.notify_all();
            }
        }
    }
}

/// Remembers a peer's address from its hello. At most `MAX_LEARNED` nodes: members are in the
/// member book anyway, and this only bridges a joining node's first messages.
fn learn(inner: &Inner, id: NodeId, addr: &str) {
    if id == inner.id || super::core::validate_addr(addr).is_err() {
        return;
    }
    let known = inner.learned.read().is_ok_and(|l| l.get(&id).map(String::as_str) == Some(addr));
    if !known
        && let Ok(mut l) = inner.learned.write()
        && (l.len() < MAX_LEARNED || l.contains_key(&id))
    {
        l.insert(id, addr.to_string());
    }
}

fn addr_of(inner: &Inner, id: NodeId) -> Option<String> {
    inner.node.get().and_then(|n| n.addr_of(id)).or_else(|| inner.learned.read().ok()?.get(&id).cloned())
}

fn addr_is(inner: &Inner, id: NodeId, addr: &str) -> bool {
    match inner.node.get().and_then(|n| n.addr_is(id, addr)) {
        Some(same) => same,
        None => inner.learned.read().is_ok_and(|l| l.get(&id).is_some_and(|a| a == addr)),
    }
}

fn report(inner: &Inner, msg: NodeMsg) {
    if let Some(n) = inner.node.get() {
        n.report(msg);
    }
}

/// A link to one peer.
struct Link {
    to: NodeId,
    state: Mutex<LinkState>,
    wake: Condvar,
}

#[derive(Default)]
struct LinkState {
    /// The connection and the address it goes to. Senders write to it directly only while the
    /// link's thread is not `flushing` and nothing waits in `backlog`.
    conn: Option<(OutConn, String)>,
    /// Frames waiting for the link's thread, in order.
    backlog: Vec<u8>,
    /// `backlog` starts with the rest of a frame partly written to `conn`, or (with TLS) the
    /// connection's session holds encrypted bytes the socket did not take: they can only go
    /// to that connection, and the link's thread must write them.
    mid_frame: bool,
    /// The link's thread owns the connection (connecting, or writing what it took).
    flushing: bool,
    closed: bool,
    /// The last failure logged, so a peer that stays down is logged once.
    last_error: Option<String>,
}

impl Link {
    fn send(&self, inner: &Inner, frames: Vec<u8>) {
        let Ok(mut st) = self.state.lock() else { return };
        if st.closed {
            return;
        }
        if !st.flushing
            && st.backlog.is_empty()
            && let Some((c, _)) = st.conn.as_mut().filter(|c| addr_is(inner, self.to, &c.1))
        {
            match c.write_now(&frames).map(|n| (n, c.pending())) {
                Ok((n, false)) if n == frames.len() => return,
                Ok((n, true)) if n == frames.len() => {
                    st.mid_frame = true;
                    self.wake.notify_one();
                    return;
                }
                Ok((n, _)) => {
                    st.backlog.extend_from_slice(&frames[n..]);
                    st.mid_frame = n > 0;
                    self.wake.notify_one();
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    st.conn = None;
                    drop(st);
                    self.failed(inner, &e.to_string());
                    return;
                }
            }
        }
        if st.backlog.len() + frames.len() > MAX_BACKLOG {
            // The peer does not keep up: drop what waits (raft-rs resends what matters).
            st.backlog.clear();
            if std::mem::take(&mut st.mid_frame) {
                st.conn = None;
            }
            drop(st);
            report(inner, NodeMsg::Unreachable(self.to));
            return;
        }
        if st.backlog.is_empty() {
            st.backlog = frames;
        } else {
            st.backlog.extend_from_slice(&frames);
        }
        self.wake.notify_one();
    }

    fn failed(&self, inner: &Inner, why: &str) {
        if let Ok(mut st) = self.state.lock()
            && st.last_error.as_deref() != Some(why)
        {
            tracing::info!(peer = self.to, error = why, "raft link to a peer failed");
            st.last_error = Some(why.to_string());
        }
        report(inner, NodeMsg::Unreachable(self.to));
    }

    /// The link's thread: connects when needed and writes what waits, blocking up to
    /// `STALL_TIMEOUT` on a full socket.
    fn run(&self, inner: &Inner) {
        loop {
            let (data, mid_frame, conn) = {
                let Ok(mut st) = self.state.lock() else { return };
                while !st.closed && st.backlog.is_empty() && !st.mid_frame {
                    st = match self.wake.wait(st) {
                        Ok(s) => s,
                        Err(_) => return,
                    };
                }
                if st.closed {
                    return;
                }
                st.flushing = true;
                (std::mem::take(&mut st.backlog), std::mem::take(&mut st.mid_frame), st.conn.take())
            };
            let result = self.flush(inner, data, mid_frame, conn);
            let Ok(mut st) = self.state.lock() else { return };
            st.flushing = false;
            match result {
                Ok(c) => {
                    if st.closed {
                        let _ = c.0.sock.shutdown(Shutdown::Both);
                    } else if c.0.sock.set_nonblocking(true).is_ok() {
                        st.conn = Some(c);
                        st.last_error = None;
                    }
                }
                Err(e) => {
                    // What queued meanwhile is whole frames; it goes on a new connection, after
                    // a pause so that a peer that is down costs a connection attempt per
                    // `RETRY_AFTER` rather than per message.
                    drop(st);
                    self.failed(inner, &e.to_string());
                    std::thread::sleep(RETRY_AFTER);
                }
            }
        }
    }

    fn flush(
        &self,
        inner: &Inner,
        data: Vec<u8>,
        mid_frame: bool,
        conn: Option<(OutConn, String)>,
    ) -> Result<(OutConn, String), LinkError> {
        let addr = addr_of(inner, self.to)
            .ok_or_else(|| LinkError::Protocol(format!("no address known for node {}", self.to)))?;
        let (mut c, data) = match conn {
            Some((c, a)) if a == addr => (c, &data[..]),
            _ if mid_frame => {
                // The rest of a frame cannot start a new connection.
                return Err(LinkError::Protocol("connection replaced in the middle of a frame".into()));
            }
            _ => (self.connect(inner, &addr)?, &data[..]),
        };
        c.sock.set_nonblocking(false)?;
        c.write_all(data)?;
        Ok((c, addr))
    }

    fn connect(&self, inner: &Inner, addr: &str) -> Result<OutConn, LinkError> {
        let sa = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| LinkError::Protocol(format!("{addr} resolves to no address")))?;
        let c = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT)?;
        c.set_nodelay(true)?;
        let sock = socket2::SockRef::from(&c);
        sock.set_tcp_user_timeout(Some(STALL_TIMEOUT))?;
        c.set_write_timeout(Some(STALL_TIMEOUT))?;
        c.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let hello = Hello { group: inner.group, from: inner.id, to: self.to, from_addr: inner.addr.clone() };
        let Some(secure) = &inner.tls else {
            (&c).write_all(&hello.encode())?;
            link::read_answer(&mut &c)?;
            return Ok(OutConn { sock: c, tls: None });
        };
        // Host names are not checked (the certificate's role and cluster are).
        let name = rustls::pki_types::ServerName::try_from("elea")
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        let mut session = rustls::ClientConnection::new(secure.links.clone(), name)
            .map_err(|e| LinkError::Protocol(format!("TLS: {e}")))?;
        // Frames wait in the link's backlog, bounded there; the session takes what it is given.
        session.set_buffer_limit(None);
        while session.is_handshaking() {
            session.complete_io(&mut &c).map_err(|e| LinkError::Protocol(format!("TLS handshake: {e}")))?;
        }
        let mut conn = OutConn { sock: c, tls: Some(Box::new(session)) };
        conn.write_all(&hello.encode())?;
        let Some(session) = conn.tls.as_deref_mut() else { unreachable!("set above") };
        link::read_answer(&mut rustls::Stream::new(session, &mut &conn.sock))?;
        Ok(conn)
    }
}

/// Reads the hello of a link a peer opened to us.
fn read_hello(stream: &mut InStream) -> Result<Hello, LinkError> {
    let sock = &stream.sock;
    sock.set_nonblocking(false)?;
    sock.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    // Unbuffered (nothing past the hello may be read here: the group thread reads the rest;
    // a TLS session keeps what it decrypted beyond it), and one deadline for the whole hello,
    // not one per read: a peer trickling a byte at a time would otherwise hold a handshake
    // slot for minutes.
    let mut deadline = Deadline { stream: sock, until: Instant::now() + CONNECT_TIMEOUT };
    match stream.tls.as_deref_mut() {
        Some(session) => Hello::read(&mut rustls::Stream::new(session, &mut deadline)),
        None => Hello::read(&mut deadline),
    }
}

/// Refuses a link with the reason.
fn refuse(stream: &mut InStream, hello: &Hello, why: String) -> LinkError {
    let mut b = Vec::new();
    let _ = link::refuse(&mut b, &why);
    let _ = answer(stream, &b);
    LinkError::Protocol(format!("refused a link from node {}: {why}", hello.from))
}

/// Checks the hello of a link a peer opened to us for group `inner` and answers it; returns
/// the sender.
fn admit(
    inner: &Inner,
    stream: &mut InStream,
    hello: &Hello,
    identity: Option<&Identity>,
) -> Result<NodeId, LinkError> {
    let certified = match (&inner.tls, identity) {
        (None, _) => None,
        (Some(_), Some(id)) if id.role == Role::Meta && id.name == hello.from.to_string() => None,
        (Some(_), Some(id)) => Some(format!("{id} may not send as node {}", hello.from)),
        (Some(_), None) => Some("a link without a certificate".to_string()),
    };
    let refusal = if let Some(why) = certified {
        Some(why)
    } else if hello.to != inner.id {
        Some(format!("this is node {}, not node {}", inner.id, hello.to))
    } else if hello.from == 0 || hello.from == inner.id {
        Some(format!("a link from node {} makes no sense", hello.from))
    } else if let Err(e) = super::core::validate_addr(&hello.from_addr) {
        Some(e.to_string())
    } else if inner.node.get().is_none() {
        Some("this node is starting".into())
    } else {
        None
    };
    if let Some(why) = refusal {
        return Err(refuse(stream, hello, why));
    }
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(1))
        .with_retries(5);
    socket2::SockRef::from(&stream.sock).set_tcp_keepalive(&keepalive)?;
    stream.sock.set_read_timeout(None)?;
    answer(stream, &[link::ACCEPTED])?;
    learn(inner, hello.from, &hello.from_addr);
    Ok(hello.from)
}

/// The Raft groups this node serves: a link a peer opens goes to the group its hello names.
#[derive(Default)]
pub struct LinkRouter {
    groups: RwLock<HashMap<GroupId, Transport>>,
    /// Hellos of links peers opened to us being checked.
    handshakes: AtomicUsize,
}

impl LinkRouter {
    pub fn add(&self, t: Transport) {
        if let Ok(mut g) = self.groups.write() {
            g.insert(t.inner.group, t);
        }
    }

    pub fn remove(&self, group: GroupId) {
        if let Ok(mut g) = self.groups.write() {
            g.remove(&group);
        }
    }

    fn get(&self, group: GroupId) -> Option<Transport> {
        self.groups.read().ok()?.get(&group).cloned()
    }

    /// Takes a link a peer opened to us (the listener saw its first byte, or the ALPN of its
    /// TLS handshake, whose certificate names `identity`): a short-lived thread checks the
    /// hello and hands the link to the thread of the group it names, which reads it.
    pub fn accept_link(self: &Arc<Self>, mut stream: InStream, identity: Option<Arc<Identity>>) {
        if self.handshakes.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("too many peer links being opened at once; closing one");
            return;
        }
        let router = self.clone();
        let spawned = std::thread::Builder::new().name("raft-link-hello".into()).spawn(move || {
            let peer = stream.sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
            let admitted = read_hello(&mut stream).and_then(|hello| match router.get(hello.group) {
                Some(t) if !t.inner.closed.load(Ordering::Relaxed) => {
                    admit(&t.inner, &mut stream, &hello, identity.as_deref()).map(|from| (t, from))
                }
                _ => Err(refuse(
                    &mut stream,
                    &hello,
                    format!("this node serves no raft group {}", hello.group),
                )),
            });
            match admitted {
                Ok((t, from)) => {
                    if let Some(n) = t.inner.node.get() {
                        n.report(NodeMsg::Link(stream, from));
                    }
                }
                Err(LinkError::Io(e)) => tracing::debug!(%peer, error = %e, "raft link from a peer failed"),
                Err(e) => tracing::warn!(%peer, error = %e, "raft link from a peer refused"),
            }
            router.handshakes.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a thread for a raft link");
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Writes the answer to a hello (blocking, up to the socket's write timeout).
fn answer(stream: &mut InStream, bytes: &[u8]) -> io::Result<()> {
    match stream.tls.as_deref_mut() {
        Some(session) => {
            session.writer().write_all(bytes)?;
            while session.wants_write() {
                session.write_tls(&mut &stream.sock)?;
            }
            Ok(())
        }
        None => (&stream.sock).write_all(bytes),
    }
}

/// Reads from a socket until a deadline.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl io::Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

type PeerClient = RaftPeerClient<tonic::transport::Channel>;

/// Sends a snapshot as one acknowledged gRPC call, and tells raft-rs how it went.
fn send_snapshot(inner: &Arc<Inner>, m: Message) {
    let to = m.to;
    let Some(addr) = addr_of(inner, to) else {
        report(inner, NodeMsg::Unreachable(to));
        report(inner, NodeMsg::SnapshotDone(to, false));
        return;
    };
    let inner2 = inner.clone();
    inner.rt.spawn(async move {
        let inner = inner2;
        let ok = match (connect_grpc(&addr, inner.tls.as_ref().map(|s| &s.grpc)), encode_message(&m)) {
            (Some(mut c), Ok(bytes)) => {
                let req = RaftBatch {
                    group_id: inner.group,
                    from: inner.id,
                    from_addr: inner.addr.clone(),
                    to,
                    messages: vec![bytes],
                };
                let mut request = tonic::Request::new(req);
                request.set_timeout(Duration::from_secs(120));
                match c.send(request).await {
                    Ok(_) => true,
                    Err(status) => {
                        tracing::info!(peer = to, error = %status.message(), "snapshot not delivered");
                        false
                    }
                }
            }
            _ => false,
        };
        report(&inner, NodeMsg::SnapshotDone(to, ok));
        if !ok {
            report(&inner, NodeMsg::Unreachable(to));
        }
    });
}

fn connect_grpc(addr: &str, tls: Option<&Connector>) -> Option<PeerClient> {
    let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let channel = match tls {
        Some(c) => ep.connect_with_connector_lazy(c.clone()),
        None => ep.connect_lazy(),
    };
    Some(
        RaftPeerClient::new(channel)
            .max_decoding_message_size(MAX_RAFT_MESSAGE)
            .max_encoding_message_size(MAX_RAFT_MESSAGE),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use raft::prelude::{Entry, MessageType};

    use super::*;

    fn msg(i: u64, data: usize) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.index = i;
        m.entries =
            vec![Entry { index: i + 1, data: vec![i as u8; data].into(), ..Default::default() }].into();
        m
    }

    /// Far more than the sockets buffer, sent while the peer does not read: the sending
    /// thread's writes come up short, the rest waits for the link's thread, and the peer
    /// still gets every frame whole and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_peer_that_reads_late_gets_every_frame_in_order() {
        const N: u64 = 300;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = Transport::new(1, "127.0.0.1:1".into(), 7);
        t.learn(2, &addr);
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let hello = Hello::read(&mut s).unwrap();
            assert_eq!((hello.group, hello.from, hello.to), (7, 1, 2));
            s.write_all(&[link::ACCEPTED]).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            // Not reading yet: the sender fills the socket buffers meanwhile.
            std::thread::sleep(Duration::from_millis(500));
            let (mut buf, mut got) = (Vec::new(), Vec::new());
            let mut chunk = vec![0u8; 1 << 16];
            while (got.len() as u64) < N {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "link closed after {} frames", got.len());
                buf.extend_from_slice(&chunk[..n]);
                let used = link::take_frames(&buf, &mut got).unwrap();
                buf.drain(..used);
            }
            assert!(buf.is_empty());
            got
        });
        // The first message opens the link (on the link's thread); the rest, once it is up,
        // go out on the sending thread until the socket is full.
        t.send(vec![msg(0, 10)]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        for i in 1..N {
            t.send(vec![msg(i, 64 << 10)]);
        }
        let got = tokio::task::spawn_blocking(move || peer.join().unwrap()).await.unwrap();
        let want: Vec<Message> = (0..N).map(|i| msg(i, if i == 0 { 10 } else { 64 << 10 })).collect();
        assert!(got == want, "frames arrived out of order or damaged");
        t.shutdown();
    }
}
