//! A WAN link between sites for the test bed: a userspace TCP relay that adds a fixed one-way
//! delay and caps the bandwidth in each direction, and that can be cut.
//!
//! This kernel has no netem (tc's delay discipline is a module it does not ship), so the
//! delay is added here, above TCP: every chunk read from one side is written to the other no
//! earlier than the link could have carried it. A chunk leaves when the link is free (after
//! the chunks before it), takes `len / rate` to go out, and arrives `delay` later, which is a
//! link with a propagation delay and a serialization rate. What this does not model: loss,
//! reordering, and the delay's effect on TCP's own windows (each side's TCP sees a fast local
//! peer, the relay; the relay's bounded queue passes backpressure on).
//!
//! While a link is cut nothing crosses it in either direction, and new connections are
//! accepted but carry nothing (a silent partition: callers time out, as across a failed WAN
//! link); what was sent meanwhile crosses once it is healed. Connection setup itself is not
//! delayed (the caller's connect completes against the relay at once): only data is, so a
//! new connection's first answer costs one round trip, not two.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Most bytes one read takes from a socket (one chunk on the link).
const CHUNK: usize = 64 << 10;
/// Chunks queued per direction and connection before the relay stops reading from the
/// sender (so a capped link pushes back on it instead of buffering without bound).
const QUEUE: usize = 64;

/// What a link adds to the traffic that crosses it, each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkConfig {
    /// One-way delay: a round trip across the link takes twice this more.
    pub delay: Duration,
    /// Bytes per second each way; `None` for no cap.
    pub rate: Option<u64>,
}

impl LinkConfig {
    /// A link with this round-trip time and cap.
    pub fn rtt(rtt: Duration, rate: Option<u64>) -> Self {
        Self { delay: rtt / 2, rate }
    }
}

/// Bytes a relay has carried, each way, since it started.
#[derive(Debug, Default)]
pub struct Carried {
    /// From the connecting side to the target.
    pub forward: AtomicU64,
    /// From the target back.
    pub back: AtomicU64,
}

/// A running relay: connections to [`Relay::addr`] are carried to the target across the
/// link. Stops (closing every connection it carries) when dropped.
pub struct Relay {
    addr: SocketAddr,
    cut: watch::Sender<bool>,
    carried: Arc<Carried>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on `listen` (port 0 for any) and carries each connection to `to`.
    pub async fn start(listen: SocketAddr, to: SocketAddr, cfg: LinkConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = watch::channel(false);
        let carried = Arc::new(Carried::default());
        let c = carried.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let cut = cut_rx.clone();
                let c = c.clone();
                conns.spawn(async move {
                    // No connection is made across a cut link until it heals.
                    let mut waiting = cut.clone();
                    if waiting.wait_for(|cut| !*cut).await.is_err() {
                        return;
                    }
                    // A target that cannot be reached ends the connection, as the WAN would.
                    if let Ok(target) = TcpStream::connect(to).await {
                        carry(client, target, cfg, cut, c).await;
                    }
                });
                // Forget the connections that ended.
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, cut, carried, task })
    }

    /// The address that stands for the target on this side of the link.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the link (`true`) or heals it.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// Bytes carried so far: (to the target, back from it).
    pub fn carried(&self) -> (u64, u64) {
        (self.carried.forward.load(Ordering::Relaxed), self.carried.back.load(Ordering::Relaxed))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The accept loop owns the connections' tasks: aborting it drops (and closes) them.
        self.task.abort();
    }
}

/// Carries one connection both ways until both sides have closed (a side that closes its
/// half is passed on as a half close, after what it sent).
async fn carry(
    client: TcpStream,
    target: TcpStream,
    cfg: LinkConfig,
    cut: watch::Receiver<bool>,
    c: Arc<Carried>,
) {
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (tr, tw) = target.into_split();
    tokio::join!(direction(cr, tw, cfg, cut.clone(), c.clone(), true), direction(tr, cw, cfg, cut, c, false));
}

/// One direction of a connection: a reader that stamps each chunk with its arrival, and a
/// writer that delivers it when the link would have.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    cfg: LinkConfig,
    mut cut: watch::Receiver<bool>,
    c: Arc<Carried>,
    forward: bool,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(QUEUE);
    let reader = async move {
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send((Instant::now(), buf.freeze())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut link_free = Instant::now();
        while let Some((arrived, data)) = rx.recv().await {
            // Nothing crosses a cut link; the chunk waits for it to heal.
            while *cut.borrow_and_update() {
                if cut.changed().await.is_err() {
                    return;
                }
            }
            let departs = arrived.max(link_free);
            let sending = match cfg.rate {
                Some(r) if r > 0 => Duration::from_secs_f64(data.len() as f64 / r as f64),
                _ => Duration::ZERO,
            };
            link_free = departs + sending;
            tokio::time::sleep_until(link_free + cfg.delay).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
            let n = data.len() as u64;
            if forward { &c.forward } else { &c.back }.fetch_add(n, Ordering::Relaxed);
        }
        // The sender closed its side: so does the link, once everything before crossed.
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
