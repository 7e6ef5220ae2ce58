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
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Most bytes one read takes from a socket (one chunk on the link).
const CHUNK: usize = 64 << 10;
/// Bytes queued per direction and connection before the relay stops reading from the sender
/// (so a capped link pushes back on it instead of buffering without bound). Enough for the
/// bytes in flight over any delay and cap the tests use (100 ms at 100 MiB/s is 10 MiB): a
/// smaller queue would cap a connection's throughput at queue / delay below the link's cap.
const QUEUE_BYTES: usize = 16 << 20;

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

/// A link between two sides: its delay and cap, whether it is cut, when each direction is
/// free again and what crossed it. Relays that share a link share its bandwidth: several
/// connections across one WAN link queue behind each other, as on a real one.
pub struct Link {
    cfg: LinkConfig,
    cut: watch::Sender<bool>,
    /// When each direction (0: from side A to side B, 1: back) has sent what was queued.
    free: [std::sync::Mutex<Instant>; 2],
    carried: [AtomicU64; 2],
    delay: Arc<DelayLine>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.delay.stop();
    }
}

impl Link {
    pub fn new(cfg: LinkConfig) -> Arc<Self> {
        let now = Instant::now();
        let delay = Arc::new(DelayLine::default());
        let d = delay.clone();
        std::thread::Builder::new()
            .name("wan-delay".into())
            .spawn(move || d.run())
            .expect("a thread for the link's delay line");
        Arc::new(Self {
            cfg,
            cut: watch::channel(false).0,
            free: [std::sync::Mutex::new(now), std::sync::Mutex::new(now)],
            carried: [AtomicU64::new(0), AtomicU64::new(0)],
            delay,
        })
    }

    /// Cuts the link (`true`) or heals it.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    /// Bytes carried so far: (side A to side B, back).
    pub fn carried(&self) -> (u64, u64) {
        (self.carried[0].load(Ordering::Relaxed), self.carried[1].load(Ordering::Relaxed))
    }

    /// When a chunk of `len` bytes that arrived at `arrived`, going direction `dir`, leaves
    /// the far end: after what was queued before it in that direction, its own sending time,
    /// and the delay.
    fn schedule(&self, dir: usize, arrived: Instant, len: usize) -> Instant {
        let sending = match self.cfg.rate {
            Some(r) if r > 0 => Duration::from_secs_f64(len as f64 / r as f64),
            _ => Duration::ZERO,
        };
        let mut free = self.free[dir].lock().unwrap_or_else(|p| p.into_inner());
        let departs = arrived.max(*free);
        *free = departs + sending;
        *free + self.cfg.delay
    }
}

/// Chunks of one connection that arrived within this of each other cross the link together
/// (the first of them up to this much late): a busy link's small messages then cost one
/// wake-up per burst, not one each.
const COALESCE: Duration = Duration::from_millis(1);
/// Most bytes one burst carries.
const BURST_MAX: usize = 4 * CHUNK;

/// Wakes each waiter at its instant (within the OS's sleep precision, tens of microseconds);
/// never earlier. tokio's timer rounds every deadline up to the next millisecond, which on a
/// link would add up to a millisecond each way, more than a metadata call costs here; so the
/// link keeps its own clock thread.
#[derive(Default)]
struct DelayLine {
    inner: std::sync::Mutex<DelayQueue>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct DelayQueue {
    due: std::collections::BinaryHeap<std::cmp::Reverse<(std::time::Instant, u64)>>,
    waiters: std::collections::HashMap<u64, tokio::sync::oneshot::Sender<()>>,
    next: u64,
    stopped: bool,
}

impl DelayLine {
    /// Returns at `at` (at once when it has passed).
    async fn until(&self, at: Instant) {
        let at = at.into_std();
        if at <= std::time::Instant::now() {
            return;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let earliest = {
            let mut q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if q.stopped {
                return;
            }
            let id = q.next;
            q.next += 1;
            let earliest = q.due.peek().is_none_or(|std::cmp::Reverse((first, _))| at < *first);
            q.due.push(std::cmp::Reverse((at, id)));
            q.waiters.insert(id, tx);
            earliest
        };
        // The clock thread sleeps until the earliest instant it knows: it needs waking only
        // for an earlier one.
        if earliest {
            self.wake.notify_one();
        }
        let _ = rx.await;
    }

    fn stop(&self) {
        let mut q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        q.stopped = true;
        q.waiters.clear();
        drop(q);
        self.wake.notify_one();
    }

    /// The clock thread: wakes the waiters whose instant came, sleeps until the next one.
    fn run(&self) {
        let mut q = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        while !q.stopped {
            let now = std::time::Instant::now();
            while let Some(std::cmp::Reverse((at, id))) = q.due.peek().copied()
                && at <= now
            {
                q.due.pop();
                if let Some(w) = q.waiters.remove(&id) {
                    let _ = w.send(());
                }
            }
            q = match q.due.peek() {
                Some(std::cmp::Reverse((at, _))) => {
                    let wait = at.saturating_duration_since(now);
                    self.wake.wait_timeout(q, wait).unwrap_or_else(|p| p.into_inner()).0
                }
                None => self.wake.wait(q).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// A running relay: connections to [`Relay::addr`] are carried to the target across the
/// link. Stops (closing every connection it carries) when dropped.
pub struct Relay {
    addr: SocketAddr,
    link: Arc<Link>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Listens on `listen` (port 0 for any) and carries each connection to `to` over a link
    /// of its own.
    pub async fn start(listen: SocketAddr, to: SocketAddr, cfg: LinkConfig) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(listen)?;
        Self::start_on(listener, to, Link::new(cfg), 0)
    }

    /// Carries each connection made to `listener` (bound already, perhaps in another network
    /// namespace) to `to`, over `link` in direction `dir` (0: the link's side A is the
    /// connecting side; 1: side B is).
    pub fn start_on(
        listener: std::net::TcpListener,
        to: SocketAddr,
        link: Arc<Link>,
        dir: usize,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let l = link.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else { continue };
                let link = l.clone();
                conns.spawn(async move {
                    // No connection is made across a cut link until it heals.
                    let mut waiting = link.cut.subscribe();
                    if waiting.wait_for(|cut| !*cut).await.is_err() {
                        return;
                    }
                    // A target that cannot be reached ends the connection, as the WAN would.
                    if let Ok(target) = TcpStream::connect(to).await {
                        carry(client, target, link, dir).await;
                    }
                });
                // Forget the connections that ended.
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, link, task })
    }

    /// The address that stands for the target on this side of the link.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the relay's link (`true`) or heals it.
    pub fn set_cut(&self, cut: bool) {
        self.link.set_cut(cut);
    }

    /// Bytes its link carried so far: (to the target, back from it) for a relay with a link
    /// of its own.
    pub fn carried(&self) -> (u64, u64) {
        self.link.carried()
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
async fn carry(client: TcpStream, target: TcpStream, link: Arc<Link>, dir: usize) {
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (tr, tw) = target.into_split();
    tokio::join!(direction(cr, tw, link.clone(), dir), direction(tr, cw, link, 1 - dir));
}

/// One direction of a connection: a reader that stamps each chunk with its arrival, and a
/// writer that delivers it when the link would have.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: Arc<Link>, dir: usize) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Bytes, OwnedSemaphorePermit)>();
    let queue = Arc::new(Semaphore::new(QUEUE_BYTES));
    let mut cut = link.cut.subscribe();
    let reader = async move {
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK);
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    // Room in the queue first: the chunk reaches the link when it is queued.
                    let Ok(room) = queue.clone().acquire_many_owned(n as u32).await else { return };
                    if tx.send((Instant::now(), buf.freeze(), room)).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        let mut next: Option<(Instant, Bytes, OwnedSemaphorePermit)> = None;
        loop {
            let first = match next.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => break,
                },
            };
            // The chunks already waiting that arrived within COALESCE of this one go with it
            // (released with the last of them): on a busy link, one wake-up for many small
            // messages instead of one each.
            let (start, mut arrived) = (first.0, first.0);
            let mut len = first.1.len();
            let mut burst = vec![(first.1, first.2)];
            while len < BURST_MAX {
                match rx.try_recv() {
                    Ok((at, d, room)) if at.duration_since(start) <= COALESCE => {
                        arrived = at;
                        len += d.len();
                        burst.push((d, room));
                    }
                    Ok(later) => {
                        next = Some(later);
                        break;
                    }
                    Err(_) => break,
                }
            }
            // Nothing crosses a cut link; the chunks wait for it to heal.
            while *cut.borrow_and_update() {
                if cut.changed().await.is_err() {
                    return;
                }
            }
            link.delay.until(link.schedule(dir, arrived, len)).await;
            for (d, _room) in &burst {
                if to.write_all(d).await.is_err() {
                    return;
                }
            }
            link.carried[dir].fetch_add(len as u64, Ordering::Relaxed);
        }
        // The sender closed its side: so does the link, once everything before crossed.
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
