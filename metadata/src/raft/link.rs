//! The wire format of peer links: Raft messages from one metadata node to another over a plain
//! TCP connection, on the same port as the gRPC service.
//!
//! A link carries messages one way. The connecting node writes [`MAGIC`] (its first byte,
//! NUL, is one no HTTP/2 client sends first, which is how the listener tells a link from a
//! gRPC connection) and a [`Hello`] naming the Raft group, itself, its address and the node it
//! wants. The receiver answers one status byte, and a reason when it refuses, and from then on
//! only reads frames: a little-endian `u32` length, then one raft-rs message in protobuf-2.
//!
//! In a cluster with certificates the link is a TLS session (ALPN [`LINK_ALPN`]) carrying the
//! same bytes: the listener's handshake tells it from a gRPC connection, and the receiver
//! accepts a hello only from a `meta` certificate whose name is the sender's node id. The
//! session's records are read and written by the same threads that handle plain links: the
//! receiver through [`read_plain`] on its non-blocking socket, the sender through
//! [`OutConn`].

pub use elea_auth::tls::LINK_ALPN;

use std::io::{self, Read, Write};
use std::net::TcpStream;

use elea_auth::rustls;
use elea_common::{GroupId, NodeId};
use protobuf::Message as _;
use raft::prelude::Message;

/// First bytes of every link.
pub const MAGIC: [u8; 8] = *b"\0elea-r1";
/// Largest frame either side accepts. Appends are cut at 1 MiB by raft-rs, but one entry
/// (up to twice the largest client request) always goes whole; snapshots never use links.
pub const MAX_FRAME: usize = 64 << 20;
const MAX_ADDR: usize = 256;
/// The receiver's answer to a hello it accepts.
pub const ACCEPTED: u8 = 0;
/// The receiver's answer to a hello it refuses, followed by a `u16` length and a reason.
pub const REFUSED: u8 = 1;

/// What went wrong on a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("refused by the peer: {0}")]
    Refused(String),
}

/// Who opens a link, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub group: GroupId,
    pub from: NodeId,
    pub to: NodeId,
    /// Where the sender listens, so that a receiver learns a joining node's address.
    pub from_addr: String,
}

impl Hello {
    /// The magic followed by the hello.
    pub fn encode(&self) -> Vec<u8> {
        let addr = &self.from_addr.as_bytes()[..self.from_addr.len().min(MAX_ADDR)];
        let mut b = Vec::with_capacity(MAGIC.len() + 26 + addr.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.group.to_le_bytes());
        b.extend_from_slice(&self.from.to_le_bytes());
        b.extend_from_slice(&self.to.to_le_bytes());
        b.extend_from_slice(&u16::try_from(addr.len()).unwrap_or(0).to_le_bytes());
        b.extend_from_slice(addr);
        b
    }

    /// Reads the magic and a hello.
    pub fn read(r: &mut impl Read) -> Result<Self, LinkError> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(LinkError::Protocol("not an Elea peer link (bad magic)".into()));
        }
        let mut fixed = [0u8; 26];
        r.read_exact(&mut fixed)?;
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&fixed[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let len = usize::from(u16::from_le_bytes([fixed[24], fixed[25]]));
        if len > MAX_ADDR {
            return Err(LinkError::Protocol(format!("sender address of {len} bytes")));
        }
        let mut addr = vec![0u8; len];
        r.read_exact(&mut addr)?;
        let from_addr =
            String::from_utf8(addr).map_err(|_| LinkError::Protocol("sender address is not UTF-8".into()))?;
        Ok(Self { group: u64_at(0), from: u64_at(8), to: u64_at(16), from_addr })
    }
}

/// Writes a refusal with its reason.
pub fn refuse(w: &mut impl Write, why: &str) -> io::Result<()> {
    let why = &why.as_bytes()[..why.len().min(1024)];
    let mut b = vec![REFUSED];
    b.extend_from_slice(&u16::try_from(why.len()).unwrap_or(0).to_le_bytes());
    b.extend_from_slice(why);
    w.write_all(&b)
}

/// Reads the receiver's answer to a hello.
pub fn read_answer(r: &mut impl Read) -> Result<(), LinkError> {
    let mut status = [0u8; 1];
    r.read_exact(&mut status)?;
    match status[0] {
        ACCEPTED => Ok(()),
        REFUSED => {
            let mut len = [0u8; 2];
            r.read_exact(&mut len)?;
            let mut why = vec![0u8; usize::from(u16::from_le_bytes(len))];
            r.read_exact(&mut why)?;
            Err(LinkError::Refused(String::from_utf8_lossy(&why).into_owned()))
        }
        s => Err(LinkError::Protocol(format!("unknown answer {s}"))),
    }
}

/// A link a peer opened to this node, whose hello was accepted: the socket, and its TLS
/// session in a cluster with certificates.
pub struct InStream {
    pub sock: TcpStream,
    pub tls: Option<Box<rustls::ServerConnection>>,
}

/// Reads what the session has decrypted into `buf`, reading and decrypting more from `sock`
/// when it has nothing: as a socket read, `Ok(0)` at the end of the stream and `WouldBlock`
/// when nothing more has arrived. A record that does not decrypt is an error.
pub fn read_plain(
    session: &mut rustls::ServerConnection,
    sock: &mut impl Read,
    buf: &mut [u8],
) -> io::Result<usize> {
    loop {
        match session.reader().read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if session.read_tls(sock)? == 0 {
            return Ok(0);
        }
        session.process_new_packets().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
}

/// The sending end of a link: its socket, and its TLS session in a cluster with
/// certificates. Written without blocking by the sending threads while the socket takes the
/// bytes, and blocking by the link's own thread.
pub struct OutConn {
    pub sock: TcpStream,
    pub tls: Option<Box<rustls::ClientConnection>>,
}

impl OutConn {
    /// Writes what the (non-blocking) socket takes now and returns how much of `data` it
    /// took. With TLS all of `data` is taken (encrypted into the session); what the socket
    /// did not take waits in the session ([`OutConn::pending`]).
    pub fn write_now(&mut self, data: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else { return (&self.sock).write(data) };
        tls.writer().write_all(data)?;
        while tls.wants_write() {
            match tls.write_tls(&mut &self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(data.len())
    }

    /// Encrypted bytes that wait for the socket.
    pub fn pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes `data` and whatever waits, blocking (up to the socket's write timeout).
    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else { return (&self.sock).write_all(data) };
        tls.writer().write_all(data)?;
        while tls.wants_write() {
            tls.write_tls(&mut &self.sock)?;
        }
        Ok(())
    }
}

/// Appends one frame holding `m` to `buf`.
pub fn push_frame(buf: &mut Vec<u8>, m: &Message) -> Result<(), LinkError> {
    let at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    if let Err(e) = m.write_to_vec(buf) {
        buf.truncate(at);
        return Err(LinkError::Protocol(format!("cannot encode a raft message: {e}")));
    }
    let len = buf.len() - at - 4;
    if len > MAX_FRAME {
        buf.truncate(at);
        return Err(LinkError::Protocol(format!("a raft message of {len} bytes is over the limit")));
    }
    buf[at..at + 4].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    Ok(())
}

/// Decodes the whole frames at the start of `buf` into `out`; returns the bytes they took.
/// A length over [`MAX_FRAME`] is an error as soon as its four bytes are there.
pub fn take_frames(buf: &[u8], out: &mut Vec<Message>) -> Result<usize, LinkError> {
    let mut at = 0;
    while let Some(head) = buf.get(at..at + 4) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_FRAME {
            return Err(LinkError::Protocol(format!("a frame of {len} bytes is over the limit")));
        }
        let Some(body) = buf.get(at + 4..at + 4 + len) else { break };
        out.push(super::core::decode_message(body).map_err(|e| LinkError::Protocol(e.to_string()))?);
        at += 4 + len;
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::{Entry, MessageType};

    fn msg(i: u64, data: usize) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 2;
        m.to = 1;
        m.index = i;
        let e = Entry { index: i + 1, data: vec![7u8; data].into(), ..Default::default() };
        m.entries = vec![e].into();
        m
    }

    #[test]
    fn hello_round_trips_and_bad_ones_are_refused() {
        let h = Hello { group: 1, from: 3, to: 2, from_addr: "10.0.0.3:7000".into() };
        let b = h.encode();
        assert_eq!(Hello::read(&mut &b[..]).unwrap(), h);
        let mut bad = b.clone();
        bad[3] = b'X';
        assert!(matches!(Hello::read(&mut &bad[..]), Err(LinkError::Protocol(_))));
        let mut long = b[..MAGIC.len() + 24].to_vec();
        long.extend_from_slice(&1000u16.to_le_bytes());
        assert!(matches!(Hello::read(&mut &long[..]), Err(LinkError::Protocol(_))));
        assert!(matches!(Hello::read(&mut &b[..b.len() - 1]), Err(LinkError::Io(_))));
    }

    #[test]
    fn answers_round_trip() {
        assert!(read_answer(&mut &[ACCEPTED][..]).is_ok());
        let mut b = Vec::new();
        refuse(&mut b, "wrong node").unwrap();
        match read_answer(&mut &b[..]) {
            Err(LinkError::Refused(why)) => assert_eq!(why, "wrong node"),
            r => panic!("{r:?}"),
        }
        assert!(matches!(read_answer(&mut &[9u8][..]), Err(LinkError::Protocol(_))));
    }

    #[test]
    fn frames_round_trip_and_bad_ones_are_errors() {
        let mut b = Vec::new();
        let mut ends = Vec::new();
        for i in 0..3 {
            push_frame(&mut b, &msg(i, 100 * i as usize)).unwrap();
            ends.push(b.len());
        }
        let first = ends[0];
        let mut out = Vec::new();
        assert_eq!(take_frames(&b[..first - 1], &mut out).unwrap(), 0);
        assert_eq!(take_frames(&b[..b.len() - 1], &mut out).unwrap(), ends[1]);
        out.clear();
        assert_eq!(take_frames(&b, &mut out).unwrap(), b.len());
        assert_eq!(out, (0..3).map(|i| msg(i, 100 * i as usize)).collect::<Vec<_>>());
        // Cut inside a frame: what is whole is taken, the rest waits.
        out.clear();
        assert_eq!(take_frames(&b[..ends[1] + 3], &mut out).unwrap(), ends[1]);
        assert_eq!(out.len(), 2);
        // Oversized length: refused as soon as the length is there.
        let huge = u32::try_from(MAX_FRAME + 1).unwrap().to_le_bytes();
        assert!(matches!(take_frames(&huge, &mut out), Err(LinkError::Protocol(_))));
        // Garbage inside a frame.
        let mut g = 5u32.to_le_bytes().to_vec();
        g.extend_from_slice(&[0xff; 5]);
        assert!(matches!(take_frames(&g, &mut out), Err(LinkError::Protocol(_))));
    }
}
