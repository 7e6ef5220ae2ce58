//! What wakes a group thread: its request channel, and the peer links other nodes opened to
//! it, which the thread reads itself (no reader thread between the socket and the group).
//!
//! The thread waits in one `poll(2)` (mio) on the links and on an eventfd that senders on the
//! channel signal, but only while the thread is parked: a busy thread costs senders nothing
//! beyond the channel.

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::time::{Duration, Instant};

use elea_common::NodeId;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use raft::prelude::Message;

use super::link::{self, InStream, LinkError};
use super::node::NodeMsg;

const WAKER: Token = Token(0);
/// Links peers may have open to one group at once; past it, the one idle longest is closed.
pub const MAX_LINKS: usize = 64;
/// Bytes all links of a group may hold beyond their initial buffers (for frames larger than
/// those); a link that needs more is closed.
const MAX_BUFFERED: usize = 256 << 20;
/// Bytes read from one link per wake-up before the others get their turn.
const READ_CHUNK: usize = 1 << 20;
/// A link's read buffer to start with.
const INITIAL_BUFFER: usize = 128 << 10;

/// The sending side: cheap to clone.
#[derive(Clone)]
pub struct Mailbox {
    tx: mpsc::Sender<NodeMsg>,
    parked: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl Mailbox {
    /// Fails only when the group thread has ended.
    pub fn send(&self, msg: NodeMsg) -> Result<(), Closed> {
        self.tx.send(msg).map_err(|_| Closed)?;
        if self.parked.swap(false, Ordering::SeqCst) {
            // A failed wake leaves the message for the thread's next tick.
            let _ = self.waker.wake();
        }
        Ok(())
    }
}

struct InLink {
    stream: TcpStream,
    /// The link's TLS session, in a cluster with certificates.
    tls: Option<Box<elea_auth::rustls::ServerConnection>>,
    from: NodeId,
    /// Bytes read and not yet decoded: `buf[..filled]`.
    buf: Vec<u8>,
    filled: usize,
    /// Read to the end of what the socket had (edge-triggered: no event comes until more
    /// arrives). False when the thread stopped at `READ_CHUNK` and must come back.
    drained: bool,
    last_read: Instant,
}

/// The group thread's side.
pub struct Inbox {
    me: NodeId,
    rx: mpsc::Receiver<NodeMsg>,
    parked: Arc<AtomicBool>,
    poll: Poll,
    events: Events,
    links: HashMap<Token, InLink>,
    next_token: usize,
}

/// The channel closed: the group thread, or every sender, is gone.
#[derive(Debug)]
pub struct Closed;

pub fn new(me: NodeId) -> io::Result<(Mailbox, Inbox)> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (tx, rx) = mpsc::channel();
    let parked = Arc::new(AtomicBool::new(false));
    Ok((
        Mailbox { tx, parked: parked.clone(), waker },
        Inbox {
            me,
            rx,
            parked,
            poll,
            events: Events::with_capacity(64),
            links: HashMap::new(),
            next_token: 1,
        },
    ))
}

impl Inbox {
    /// Waits up to `timeout` for something to do, then appends to `out` what is there: channel
    /// messages (at most `max`) and, as one `NodeMsg::Raft`, what the links brought.
    pub fn wait(&mut self, timeout: Duration, out: &mut Vec<NodeMsg>, max: usize) -> Result<(), Closed> {
        let busy = self.links.values().any(|l| !l.drained);
        if !busy && self.take(out, max)? == 0 {
            self.parked.store(true, Ordering::SeqCst);
            // A message sent before `parked` was set finds no waker: look once more.
            if self.take(out, max)? == 0
                && let Err(e) = self.poll.poll(&mut self.events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(error = %e, "waiting for raft messages failed");
                std::thread::sleep(timeout.min(Duration::from_millis(10)));
            }
            self.parked.store(false, Ordering::SeqCst);
        } else {
            // Links that have more: see what else arrived, without waiting.
            let _ = self.poll.poll(&mut self.events, Some(Duration::ZERO));
        }
        for ev in self.events.iter() {
            if let Some(l) = self.links.get_mut(&ev.token()) {
                l.drained = false;
            }
        }
        self.events.clear();
        self.read_links(out);
        self.take(out, max.saturating_sub(out.len()))?;
        Ok(())
    }

    fn take(&mut self, out: &mut Vec<NodeMsg>, max: usize) -> Result<usize, Closed> {
        let mut n = 0;
        while n < max {
            match self.rx.try_recv() {
                Ok(NodeMsg::Many(ms)) => {
                    n += ms.len();
                    out.extend(ms);
                }
                Ok(m) => {
                    n += 1;
                    out.push(m);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(Closed),
            }
        }
        Ok(n)
    }

    /// Takes over a link whose hello was accepted.
    pub fn adopt(&mut self, stream: InStream, from: NodeId) {
        let InStream { sock: stream, tls } = stream;
        // A peer opens a new link when its old one failed: the old one is done with. Past
        // the limit, the link idle longest goes.
        let stale = self.links.iter().find(|(_, l)| l.from == from).map(|(t, _)| *t).or_else(|| {
            (self.links.len() >= MAX_LINKS)
                .then(|| self.links.iter().min_by_key(|(_, l)| l.last_read).map(|(t, _)| *t))
                .flatten()
        });
        if let Some(t) = stale {
            tracing::debug!(from, "closing a peer link for a newer one");
            self.close(t);
        }
        if let Err(e) = stream.set_nonblocking(true) {
            tracing::warn!(from, error = %e, "cannot take over a peer link");
            return;
        }
        let mut stream = TcpStream::from_std(stream);
        let token = Token(self.next_token);
        self.next_token += 1;
        if let Err(e) = self.poll.registry().register(&mut stream, token, Interest::READABLE) {
            tracing::warn!(from, error = %e, "cannot take over a peer link");
            return;
        }
        // Whatever arrived before registration is read on the first pass.
        let link = InLink {
            stream,
            tls,
            from,
            buf: vec![0; INITIAL_BUFFER],
            filled: 0,
            drained: false,
            last_read: Instant::now(),
        };
        self.links.insert(token, link);
    }

    fn close(&mut self, token: Token) {
        if let Some(mut l) = self.links.remove(&token) {
            let _ = self.poll.registry().deregister(&mut l.stream);
        }
    }

    fn read_links(&mut self, out: &mut Vec<NodeMsg>) {
        let mut msgs = Vec::new();
        let mut closed = Vec::new();
        let mut budget = MAX_BUFFERED
            .saturating_sub(self.links.values().map(|l| l.buf.len().saturating_sub(INITIAL_BUFFER)).sum());
        for (token, l) in self.links.iter_mut().filter(|(_, l)| !l.drained) {
            match read_link(l, self.me, &mut msgs, &mut budget) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(from = l.from, "raft link from a peer ended");
                    closed.push(*token);
                }
                Err(LinkError::Io(e)) => {
                    tracing::debug!(from = l.from, error = %e, "raft link from a peer ended");
                    closed.push(*token);
                }
                Err(e) => {
                    tracing::warn!(from = l.from, error = %e, "raft link from a peer closed");
                    closed.push(*token);
                }
            }
        }
        for t in closed {
            self.close(t);
        }
        if !msgs.is_empty() {
            out.push(NodeMsg::Raft(msgs));
        }
    }
}

/// Reads what one link has (up to `READ_CHUNK`) and decodes its whole frames. `Ok(false)`
/// when the peer closed it. A message that claims another sender or recipient than the
/// link's is an error, and nothing of that read is delivered.
fn read_link(
    l: &mut InLink,
    me: NodeId,
    msgs: &mut Vec<Message>,
    budget: &mut usize,
) -> Result<bool, LinkError> {
    let mut read = 0;
    let mut open = true;
    while read < READ_CHUNK {
        if l.filled == l.buf.len() {
            // A frame larger than the buffer (up to `link::MAX_FRAME`, checked when decoding).
            let more = l.buf.len().max(INITIAL_BUFFER);
            if more > *budget {
                return Err(LinkError::Protocol("peer links hold too many bytes; closing this one".into()));
            }
            *budget -= more;
            l.buf.resize(l.buf.len() + more, 0);
        }
        let got = match l.tls.as_deref_mut() {
            Some(session) => link::read_plain(session, &mut l.stream, &mut l.buf[l.filled..]),
            None => l.stream.read(&mut l.buf[l.filled..]),
        };
        match got {
            Ok(0) => {
                open = false;
                l.drained = true;
                break;
            }
            Ok(n) => {
                l.filled += n;
                read += n;
                l.last_read = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                l.drained = true;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        // Decode as we go, so a buffer holding only whole frames never grows.
        if l.filled == l.buf.len() {
            take(l, me, msgs)?;
        }
    }
    take(l, me, msgs)?;
    if l.filled == 0 && l.buf.len() > 8 * INITIAL_BUFFER {
        l.buf = vec![0; INITIAL_BUFFER];
    }
    if !open && l.filled > 0 {
        return Err(LinkError::Protocol("the link ended inside a frame".into()));
    }
    Ok(open)
}

/// Decodes the whole frames in a link's buffer and keeps the rest. A message that claims
/// another sender or recipient than the link's is an error, and no message decoded in this
/// call is delivered (earlier ones from the same link may have been).
fn take(l: &mut InLink, me: NodeId, msgs: &mut Vec<Message>) -> Result<(), LinkError> {
    let start = msgs.len();
    let used = link::take_frames(&l.buf[..l.filled], msgs)?;
    if let Some(m) = msgs[start..].iter().find(|m| m.from != l.from || m.to != me) {
        let e =
            format!("a message from {} to {} on the link from node {} to node {me}", m.from, m.to, l.from);
        msgs.truncate(start);
        return Err(LinkError::Protocol(e));
    }
    if used > 0 {
        l.buf.copy_within(used..l.filled, 0);
        l.filled -= used;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::net::{TcpListener, TcpStream as StdStream};

    use raft::prelude::{Entry, MessageType};

    use super::*;

    fn msg(from: NodeId, to: NodeId, i: u64, data: usize) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = from;
        m.to = to;
        m.index = i;
        m.entries =
            vec![Entry { index: i + 1, data: vec![i as u8; data].into(), ..Default::default() }].into();
        m
    }

    /// A connected pair: the end the test writes, and the end the inbox adopts.
    fn pair() -> (StdStream, StdStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = StdStream::connect(l.local_addr().unwrap()).unwrap();
        let (r, _) = l.accept().unwrap();
        (w, r)
    }

    /// Waits until the inbox has handed over `n` raft messages, or closed every link.
    fn collect(inbox: &mut Inbox, n: usize) -> Vec<Message> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < n && !inbox.links.is_empty() && Instant::now() < deadline {
            let mut out = Vec::new();
            assert!(inbox.wait(Duration::from_millis(50), &mut out, 100).is_ok());
            for m in out {
                if let NodeMsg::Raft(ms) = m {
                    got.extend(ms);
                }
            }
        }
        got
    }

    #[test]
    fn links_are_read_in_order_across_partial_and_large_frames() {
        let (_mailbox, mut inbox) = new(1).unwrap();
        let (mut w, r) = pair();
        inbox.adopt(InStream { sock: r, tls: None }, 2);
        let sent: Vec<Message> =
            (0..40).map(|i| msg(2, 1, i, if i % 10 == 3 { 600 << 10 } else { 50 })).collect();
        let mut bytes = Vec::new();
        for m in &sent {
            link::push_frame(&mut bytes, m).unwrap();
        }
        // Written in odd pieces, so frames and lengths are split across reads.
        let writer = std::thread::spawn(move || {
            for piece in bytes.chunks(7919) {
                w.write_all(piece).unwrap();
            }
            w
        });
        let got = collect(&mut inbox, sent.len());
        let _w = writer.join().unwrap();
        assert_eq!(got, sent);
        assert_eq!(inbox.links.len(), 1);
    }

    #[test]
    fn a_link_that_lies_about_its_sender_is_closed_and_delivers_nothing() {
        let (_mailbox, mut inbox) = new(1).unwrap();
        let (mut w, r) = pair();
        inbox.adopt(InStream { sock: r, tls: None }, 2);
        let mut bytes = Vec::new();
        link::push_frame(&mut bytes, &msg(2, 1, 0, 10)).unwrap();
        link::push_frame(&mut bytes, &msg(3, 1, 1, 10)).unwrap();
        w.write_all(&bytes).unwrap();
        let got = collect(&mut inbox, 1);
        assert!(got.is_empty(), "{got:?}");
        assert!(inbox.links.is_empty());
        // The peer sees the link closed.
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(std::io::Read::read(&mut w, &mut b), Ok(0) | Err(_)));
    }

    #[test]
    fn a_link_that_ends_inside_a_frame_is_closed() {
        let (_mailbox, mut inbox) = new(1).unwrap();
        let (mut w, r) = pair();
        inbox.adopt(InStream { sock: r, tls: None }, 2);
        let mut bytes = Vec::new();
        link::push_frame(&mut bytes, &msg(2, 1, 0, 10)).unwrap();
        link::push_frame(&mut bytes, &msg(2, 1, 1, 10)).unwrap();
        w.write_all(&bytes[..bytes.len() - 2]).unwrap();
        drop(w);
        let got = collect(&mut inbox, 2);
        assert_eq!(got, vec![msg(2, 1, 0, 10)]);
        assert!(inbox.links.is_empty());
    }

    #[test]
    fn a_newer_link_from_the_same_peer_replaces_the_older() {
        let (_mailbox, mut inbox) = new(1).unwrap();
        let (mut old_w, old_r) = pair();
        inbox.adopt(InStream { sock: old_r, tls: None }, 2);
        let (mut w, r) = pair();
        inbox.adopt(InStream { sock: r, tls: None }, 2);
        assert_eq!(inbox.links.len(), 1);
        // The older one is closed: its peer sees the end.
        old_w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 1];
        assert!(matches!(std::io::Read::read(&mut old_w, &mut b), Ok(0) | Err(_)));
        let mut bytes = Vec::new();
        link::push_frame(&mut bytes, &msg(2, 1, 5, 10)).unwrap();
        w.write_all(&bytes).unwrap();
        assert_eq!(collect(&mut inbox, 1), vec![msg(2, 1, 5, 10)]);
        // Another peer's link is kept alongside.
        let (_w3, r3) = pair();
        inbox.adopt(InStream { sock: r3, tls: None }, 3);
        assert_eq!(inbox.links.len(), 2);
    }

    #[test]
    fn a_send_wakes_a_parked_thread() {
        let (mailbox, mut inbox) = new(1).unwrap();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            mailbox.send(NodeMsg::Unreachable(7)).unwrap();
            mailbox
        });
        let start = Instant::now();
        let mut out = Vec::new();
        while out.is_empty() && start.elapsed() < Duration::from_secs(60) {
            inbox.wait(Duration::from_secs(60), &mut out, 10).unwrap_or_else(|_| panic!("closed"));
        }
        // Woken by the send, not by the 60 s timeout.
        assert!(start.elapsed() < Duration::from_secs(30));
        assert!(matches!(out.as_slice(), [NodeMsg::Unreachable(7)]));
        let mailbox = sender.join().unwrap();
        drop(mailbox);
        assert!(inbox.wait(Duration::from_millis(1), &mut Vec::new(), 10).is_err());
    }
}
