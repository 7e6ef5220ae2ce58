//! The staging log: where staging keeps small blocks. Records are appended to preallocated
//! segment files and made durable in groups: every put waiting while one `fdatasync` runs
//! shares the next one.
//!
//! A block written as its own file costs a new file, its `fsync`, a rename and the
//! directory's `fsync`: two journal commits of the file system under the node, about 200 µs
//! each on the disks Elea is benchmarked on, for every small write a client makes durable
//! (docs/BENCHMARKS.md, "Small I/O"). A record appended here costs a write into blocks that
//! already hold data (segments are filled with zeros when made, not `fallocate`d, as the Raft
//! log is, see `metadata/src/raft/logfile.rs`), so its `fdatasync` writes the data and no file
//! system metadata, and concurrent puts share it.
//!
//! Layout of `log/NNNNNNNN.seg` (a segment, [`SEG_SIZE`] bytes by default):
//! - bytes 0..4096: the segment header: magic `ELSG`, version, sequence number (segments are
//!   replayed in this order), a random nonce, the segment's size, crc32c of the header;
//! - then records, each starting on a 4 KiB boundary: a [`REC_HEADER`]-byte header (magic
//!   `ELRC`, version, segment shift, the segment's nonce, volume, slice, block index, length,
//!   crc32c of the bytes, creation time, crc32c of the header), a crc32c per segment of the
//!   block (as in block files), the bytes, zeros to the next 4 KiB boundary.
//!
//! Replay reads every segment whole and accepts a record only when its header checksum,
//! nonce and every segment checksum of its bytes verify. A torn tail (a group whose
//! `fdatasync` never returned, so none of it was acknowledged) fails those checks and is
//! skipped; a record whose header verifies but whose bytes do not is reported damaged (its
//! block is lost here). The nonce keeps a record of an earlier use of a recycled segment, or
//! bytes that merely look like a record, from ever being taken for one of this use.
//!
//! Removing a block only forgets its record: nothing is written. A segment whose records are
//! all forgotten is kept for reuse (a new header, a new nonce: its old records no longer
//! verify) or deleted. After a crash, blocks removed since their segment was last reused can
//! come back; they are old, and the reconcile worker drops copies metadata no longer lists
//! here after its grace period, as it does for any stale copy. Sparse old segments are
//! compacted: their live records are appended again and the segment freed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

use super::staging::{BlockId, StagedMeta, u32_at, u64_at};

const SEG_MAGIC: [u8; 4] = *b"ELSG";
const REC_MAGIC: [u8; 4] = *b"ELRC";
const VERSION: u8 = 1;
/// Records start on multiples of this; the segment header takes the first one.
pub const ALIGN: u64 = 4096;
/// Bytes of a record's header.
pub const REC_HEADER: usize = 64;
/// Default size of a segment file.
pub const SEG_SIZE: u64 = 16 << 20;
/// Most bytes one group writes before its `fdatasync`.
const MAX_GROUP: usize = 8 << 20;
/// Free segments kept for reuse; more are deleted.
const KEEP_FREE: usize = 2;
/// Bytes of zeros written per call while making a segment.
const ZEROS: usize = 256 << 10;

/// Where a record lies: segment file number and byte offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Loc {
    pub seg: u32,
    pub off: u64,
}

/// Bytes a record of a block of `len` bytes with `segs` segment checksums takes.
pub fn record_len(len: u32, segs: usize) -> u64 {
    (REC_HEADER as u64 + 4 * segs as u64 + u64::from(len)).next_multiple_of(ALIGN)
}

pub fn encode_record_header(nonce: u64, id: BlockId, m: &StagedMeta) -> [u8; REC_HEADER] {
    let mut h = [0u8; REC_HEADER];
    h[0..4].copy_from_slice(&REC_MAGIC);
    h[4] = VERSION;
    h[5] = m.seg_shift;
    h[8..16].copy_from_slice(&nonce.to_le_bytes());
    h[16..24].copy_from_slice(&m.vol.to_le_bytes());
    h[24..32].copy_from_slice(&id.0.to_le_bytes());
    h[32..36].copy_from_slice(&id.1.to_le_bytes());
    h[36..40].copy_from_slice(&m.len.to_le_bytes());
    h[40..44].copy_from_slice(&m.crc.to_le_bytes());
    h[48..56].copy_from_slice(&m.created_ms.to_le_bytes());
    let c = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&c.to_le_bytes());
    h
}

/// A record header that verifies and carries `nonce`.
pub fn decode_record_header(h: &[u8], nonce: u64) -> Option<(BlockId, StagedMeta)> {
    if h.len() < REC_HEADER || h[0..4] != REC_MAGIC || h[4] != VERSION {
        return None;
    }
    if crc32c::crc32c(&h[..60]) != u32_at(h, 60) || u64_at(h, 8) != nonce {
        return None;
    }
    let seg_shift = h[5];
    if !(12..=22).contains(&seg_shift) {
        return None;
    }
    let id = (u64_at(h, 24), u32_at(h, 32));
    let m = StagedMeta {
        vol: u64_at(h, 16),
        len: u32_at(h, 36),
        crc: u32_at(h, 40),
        created_ms: u64_at(h, 48),
        seg_shift,
    };
    Some((id, m))
}

fn encode_seg_header(seq: u64, nonce: u64, size: u64) -> Vec<u8> {
    let mut h = vec![0u8; ALIGN as usize];
    h[0..4].copy_from_slice(&SEG_MAGIC);
    h[4] = VERSION;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&nonce.to_le_bytes());
    h[24..32].copy_from_slice(&size.to_le_bytes());
    let c = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&c.to_le_bytes());
    h
}

/// (sequence, nonce, size) of a segment header that verifies.
fn decode_seg_header(h: &[u8]) -> Option<(u64, u64, u64)> {
    if h.len() < 64 || h[0..4] != SEG_MAGIC || h[4] != VERSION || crc32c::crc32c(&h[..60]) != u32_at(h, 60) {
        return None;
    }
    Some((u64_at(h, 8), u64_at(h, 16), u64_at(h, 24)))
}

fn seg_name(num: u32) -> String {
    format!("{num:08x}.seg")
}

fn parse_seg_name(name: &str) -> Option<u32> {
    let n = name.strip_suffix(".seg")?;
    if n.len() != 8 {
        return None;
    }
    u32::from_str_radix(n, 16).ok()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What replay found in one segment, in log order.
pub enum Found {
    /// A record that verifies.
    Block(BlockId, StagedMeta, Loc),
    /// A record whose header verifies but whose bytes do not: the block is lost here.
    Damaged(BlockId),
}

/// One segment the log knows.
struct Seg {
    file: Arc<File>,
    nonce: u64,
    /// Records placed in it and not released.
    live: u64,
    /// Bytes of those records.
    live_bytes: u64,
    /// No longer written to (every segment but the one the writer appends to).
    sealed: bool,
}

struct Segs {
    by_num: HashMap<u32, Seg>,
    /// Segments holding no live record, ready for reuse (file, number).
    free: Vec<(Arc<File>, u32)>,
    next_num: u32,
    next_seq: u64,
}

/// The segment the writer appends to.
struct Active {
    file: Arc<File>,
    num: u32,
    nonce: u64,
    /// Where the next record goes.
    pos: u64,
}

struct Shared {
    dir: PathBuf,
    seg_size: u64,
    segs: Mutex<Segs>,
    /// A segment made ahead of need, and its maker's wake-up.
    spare: Mutex<Option<Active>>,
    spare_cv: Condvar,
    stop: Mutex<bool>,
}

/// A record to append, and where to say how it went.
struct Req {
    id: BlockId,
    meta: StagedMeta,
    segs: Vec<u32>,
    data: Bytes,
    reply: tokio::sync::oneshot::Sender<std::io::Result<Loc>>,
}

/// See the module docs.
pub struct Log {
    shared: Arc<Shared>,
    tx: Mutex<Option<Sender<Req>>>,
    /// The writer's and the segment maker's threads, joined on drop: nothing of a closed log
    /// touches its directory afterwards (it may be opened again at once).
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Log {
    fn drop(&mut self) {
        // The writer ends when its queue closes (after the group it is writing), the maker
        // when told to stop (within one write of zeros).
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        *self.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.spare_cv.notify_all();
        for t in std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner())) {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn stopping(&self) -> bool {
        *self.stop.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn segs(&self) -> MutexGuard<'_, Segs> {
        self.segs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, num: u32) -> PathBuf {
        self.dir.join(seg_name(num))
    }

    /// Makes a segment ready for appending: a free one reused (a new header and nonce), or a
    /// new file filled with zeros. It is registered (unsealed) before it is returned.
    fn make_segment(&self) -> std::io::Result<Active> {
        let reuse = {
            let mut g = self.segs();
            let seq = g.next_seq;
            g.next_seq += 1;
            match g.free.pop() {
                Some((f, num)) => (Some((f, num)), seq, 0),
                None => {
                    let num = g.next_num;
                    g.next_num += 1;
                    (None, seq, num)
                }
            }
        };
        let nonce = crate::random_u64();
        let (file, num) = match reuse {
            (Some((f, num)), seq, _) => {
                f.write_all_at(&encode_seg_header(seq, nonce, self.seg_size), 0)?;
                f.sync_data()?;
                (f, num)
            }
            (None, seq, num) => {
                let path = self.path(num);
                let tmp = self.dir.join(format!(".{}.tmp", seg_name(num)));
                let made = (|| -> std::io::Result<File> {
                    let f =
                        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?;
                    let zeros = vec![0u8; ZEROS];
                    let mut at = 0u64;
                    while at < self.seg_size {
                        if self.stopping() {
                            return Err(std::io::Error::other("the staging log is closing"));
                        }
                        let n = (self.seg_size - at).min(ZEROS as u64) as usize;
                        f.write_all_at(&zeros[..n], at)?;
                        at += n as u64;
                    }
                    f.write_all_at(&encode_seg_header(seq, nonce, self.seg_size), 0)?;
                    f.sync_all()?;
                    fs::rename(&tmp, &path)?;
                    sync_dir(&self.dir)?;
                    Ok(f)
                })();
                match made {
                    Ok(f) => (Arc::new(f), num),
                    Err(e) => {
                        let _ = fs::remove_file(&tmp);
                        return Err(e);
                    }
                }
            }
        };
        let mut g = self.segs();
        g.by_num.insert(num, Seg { file: file.clone(), nonce, live: 0, live_bytes: 0, sealed: false });
        Ok(Active { file, num, nonce, pos: ALIGN })
    }

    /// The next segment to append to: the spare when one is ready, else a new one made now.
    fn take_segment(&self) -> std::io::Result<Active> {
        let spare = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.spare_cv.notify_all();
        match spare {
            Some(a) => Ok(a),
            None => self.make_segment(),
        }
    }

    /// The writer no longer appends to segment `num`; frees it at once if nothing in it lives.
    fn seal(&self, num: u32) {
        let mut g = self.segs();
        if let Some(s) = g.by_num.get_mut(&num) {
            s.sealed = true;
        }
        self.free_if_dead(&mut g, num);
    }

    /// Moves a sealed segment without live records to the free list (or deletes it when
    /// enough are kept).
    fn free_if_dead(&self, g: &mut Segs, num: u32) {
        let dead = g.by_num.get(&num).is_some_and(|s| s.sealed && s.live == 0);
        if !dead {
            return;
        }
        let Some(s) = g.by_num.remove(&num) else { return };
        let reusable = s.file.metadata().is_ok_and(|m| m.len() == self.seg_size);
        if reusable && g.free.len() < KEEP_FREE {
            g.free.push((s.file, num));
        } else {
            let path = self.path(num);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "removing an unused staging log segment");
            }
        }
    }
}

/// Appends groups of records: takes every request queued, writes them back to back, one
/// `fdatasync` per segment touched, then answers them all.
fn writer(shared: Arc<Shared>, rx: Receiver<Req>) {
    let mut active: Option<Active> = None;
    let mut buf: Vec<u8> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        let mut bytes = group[0].data.len();
        while bytes < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => {
                    bytes += r.data.len();
                    group.push(r);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let mut placed: Vec<(Req, Loc)> = Vec::with_capacity(group.len());
        let res = append_group(&shared, &mut active, &mut buf, group, &mut placed);
        match res {
            Ok(()) => {
                for (r, loc) in placed {
                    let len = record_len(r.meta.len, r.segs.len());
                    if r.reply.send(Ok(loc)).is_err() {
                        // Its put gave up waiting: nothing will ever index the record.
                        let mut g = shared.segs();
                        release_in(&mut g, loc, len);
                        shared.free_if_dead(&mut g, loc.seg);
                    }
                }
            }
            Err((e, unplaced)) => {
                // Nothing of this group is acknowledged; what reached a segment is released
                // (it may replay after a crash as a stale copy, see the module docs). The
                // segment is not appended to again: after a failed sync its pages cannot be
                // trusted.
                {
                    let mut g = shared.segs();
                    for (r, loc) in &placed {
                        release_in(&mut g, *loc, record_len(r.meta.len, r.segs.len()));
                    }
                }
                for (_, loc) in &placed {
                    let mut g = shared.segs();
                    shared.free_if_dead(&mut g, loc.seg);
                }
                if let Some(a) = active.take() {
                    shared.seal(a.num);
                }
                let kind = e.kind();
                let msg = e.to_string();
                for r in placed.into_iter().map(|(r, _)| r).chain(unplaced) {
                    let _ = r.reply.send(Err(std::io::Error::new(kind, msg.clone())));
                }
            }
        }
    }
}

type GroupError = (std::io::Error, Vec<Req>);

/// Writes `group` (placing each record in `placed`) and syncs; on failure returns the error
/// and the requests not placed yet.
fn append_group(
    shared: &Shared,
    active: &mut Option<Active>,
    buf: &mut Vec<u8>,
    group: Vec<Req>,
    placed: &mut Vec<(Req, Loc)>,
) -> Result<(), GroupError> {
    let mut to_sync: Vec<Arc<File>> = Vec::new();
    buf.clear();
    let mut it = group.into_iter();
    while let Some(r) = it.next() {
        let len = record_len(r.meta.len, r.segs.len());
        let fits = active.as_ref().is_some_and(|a| a.pos + buf.len() as u64 + len <= shared.seg_size);
        if !fits {
            // Write what this segment takes, then go on in a new one.
            if let Some(a) = active.as_mut() {
                if let Err(e) = flush_buf(a, buf) {
                    return Err((e, std::iter::once(r).chain(it).collect()));
                }
                to_sync.push(a.file.clone());
            }
            if let Some(a) = active.take() {
                shared.seal(a.num);
            }
            match shared.take_segment() {
                Ok(a) => *active = Some(a),
                Err(e) => return Err((e, std::iter::once(r).chain(it).collect())),
            }
        }
        let Some(a) = active.as_mut() else { continue };
        let loc = Loc { seg: a.num, off: a.pos + buf.len() as u64 };
        let start = buf.len();
        buf.extend_from_slice(&encode_record_header(a.nonce, r.id, &r.meta));
        for c in &r.segs {
            buf.extend_from_slice(&c.to_le_bytes());
        }
        buf.extend_from_slice(&r.data);
        buf.resize(start + len as usize, 0);
        {
            let mut g = shared.segs();
            if let Some(s) = g.by_num.get_mut(&a.num) {
                s.live += 1;
                s.live_bytes += len;
            }
        }
        placed.push((r, loc));
    }
    if let Some(a) = active.as_mut() {
        if let Err(e) = flush_buf(a, buf) {
            return Err((e, Vec::new()));
        }
        to_sync.push(a.file.clone());
    }
    to_sync.dedup_by(|x, y| Arc::ptr_eq(x, y));
    for f in &to_sync {
        if let Err(e) = f.sync_data() {
            return Err((e, Vec::new()));
        }
    }
    Ok(())
}

fn flush_buf(a: &mut Active, buf: &mut Vec<u8>) -> std::io::Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    a.file.write_all_at(buf, a.pos)?;
    a.pos += buf.len() as u64;
    buf.clear();
    Ok(())
}

fn release_in(g: &mut Segs, loc: Loc, len: u64) {
    if let Some(s) = g.by_num.get_mut(&loc.seg) {
        s.live = s.live.saturating_sub(1);
        s.live_bytes = s.live_bytes.saturating_sub(len);
    }
}

/// Keeps one segment made ahead of the writer's need.
fn maker(shared: Arc<Shared>) {
    loop {
        {
            let mut stop = shared.stop.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if *stop {
                    return;
                }
                if shared.spare.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
                    break;
                }
                stop = shared
                    .spare_cv
                    .wait_timeout(stop, Duration::from_secs(1))
                    .map_or_else(|p| p.into_inner().0, |r| r.0);
            }
        }
        match shared.make_segment() {
            Ok(a) => *shared.spare.lock().unwrap_or_else(|p| p.into_inner()) = Some(a),
            Err(_) if shared.stopping() => return,
            Err(e) => {
                tracing::warn!(dir = %shared.dir.display(), error = %e, "making a staging log segment ahead of need failed");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

impl Log {
    /// Opens (creating) the log under `dir` and replays it: what every segment holds, in log
    /// order. Leftover temporary files are removed; segments whose header does not verify are
    /// kept for reuse.
    pub fn open(dir: &Path, seg_size: u64) -> std::io::Result<(Arc<Self>, Vec<Found>)> {
        fs::create_dir_all(dir)?;
        let seg_size = seg_size.max(4 * ALIGN).next_multiple_of(ALIGN);
        let mut segs = Segs { by_num: HashMap::new(), free: Vec::new(), next_num: 0, next_seq: 0 };
        let mut valid: Vec<(u64, u32, u64, Arc<File>)> = Vec::new();
        for e in fs::read_dir(dir)? {
            let path = e?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let Some(num) = parse_seg_name(&name) else {
                fs::remove_file(&path)?;
                continue;
            };
            segs.next_num = segs.next_num.max(num + 1);
            let f = Arc::new(OpenOptions::new().read(true).write(true).open(&path)?);
            let mut head = vec![0u8; ALIGN as usize];
            let header = match f.read_exact_at(&mut head, 0) {
                Ok(()) => decode_seg_header(&head),
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
                Err(e) => return Err(e),
            };
            match header {
                Some((seq, nonce, size)) if size == f.metadata()?.len() => {
                    segs.next_seq = segs.next_seq.max(seq + 1);
                    valid.push((seq, num, nonce, f));
                }
                _ if f.metadata()?.len() == seg_size => segs.free.push((f, num)),
                _ => {
                    // Torn while being made: not a segment of this size.
                    fs::remove_file(&path)?;
                }
            }
        }
        valid.sort_unstable_by_key(|v| v.0);
        let mut found = Vec::new();
        for (_, num, nonce, f) in valid {
            let before = found.len();
            replay(&f, num, nonce, &mut found)?;
            let (live, live_bytes) = found[before..].iter().fold((0, 0), |(n, b), x| match x {
                Found::Block(_, m, _) => (n + 1, b + record_len(m.len, m.segments_count())),
                Found::Damaged(_) => (n, b),
            });
            segs.by_num.insert(num, Seg { file: f, nonce, live, live_bytes, sealed: true });
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            seg_size,
            segs: Mutex::new(segs),
            spare: Mutex::new(None),
            spare_cv: Condvar::new(),
            stop: Mutex::new(false),
        });
        // Replayed segments without a live record are free now.
        {
            let mut g = shared.segs();
            let nums: Vec<u32> = g.by_num.keys().copied().collect();
            for n in nums {
                shared.free_if_dead(&mut g, n);
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let w = shared.clone();
        let wt = std::thread::Builder::new().name("staging-log".into()).spawn(move || writer(w, rx))?;
        let m = shared.clone();
        let mt = std::thread::Builder::new().name("staging-log-make".into()).spawn(move || maker(m))?;
        Ok((Arc::new(Self { shared, tx: Mutex::new(Some(tx)), threads: Mutex::new(vec![wt, mt]) }), found))
    }

    /// Appends a block's record and makes it durable. `segs` are the crc32c of each
    /// `1 << meta.seg_shift` bytes of `data`. The record counts as live until
    /// [`Log::release`]d. A caller that stops waiting (its future dropped) leaves nothing
    /// behind: a record written for it is released, whether its answer came before or after.
    pub async fn append(
        &self,
        id: BlockId,
        meta: StagedMeta,
        segs: Vec<u32>,
        data: Bytes,
    ) -> std::io::Result<Loc> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let rec_len = record_len(meta.len, segs.len());
        let sent = {
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            tx.as_ref().map(|t| t.send(Req { id, meta, segs, data, reply }).is_ok())
        };
        if sent != Some(true) {
            return Err(std::io::Error::other("the staging log is closed"));
        }
        let mut waiting = Waiting { log: self, rx: Some(rx), rec_len };
        let r = match waiting.rx.as_mut() {
            Some(rx) => rx.await,
            None => return Err(std::io::Error::other("the staging log writer stopped")),
        };
        waiting.rx = None;
        r.unwrap_or_else(|_| Err(std::io::Error::other("the staging log writer stopped")))
    }

    fn release_len(&self, loc: Loc, len: u64) {
        let mut g = self.shared.segs();
        release_in(&mut g, loc, len);
        self.shared.free_if_dead(&mut g, loc.seg);
    }

    /// Forgets a record (its block was removed here); a sealed segment left without live
    /// records is freed.
    pub fn release(&self, loc: Loc, meta: &StagedMeta) {
        let mut g = self.shared.segs();
        release_in(&mut g, loc, record_len(meta.len, meta.segments_count()));
        self.shared.free_if_dead(&mut g, loc.seg);
    }

    /// The open file and nonce of segment `num`, when it is in use.
    pub fn segment(&self, num: u32) -> Option<(Arc<File>, u64)> {
        self.shared.segs().by_num.get(&num).map(|s| (s.file.clone(), s.nonce))
    }

    /// The path of segment `num` (for checks that it is still there).
    pub fn path(&self, num: u32) -> PathBuf {
        self.shared.path(num)
    }

    /// Sealed segments whose live records fill at most a quarter of them, fewest live
    /// bytes first: worth compacting.
    pub fn sparse(&self) -> Vec<u32> {
        let g = self.shared.segs();
        let mut v: Vec<(u64, u32)> = g
            .by_num
            .iter()
            .filter(|(_, s)| s.sealed && s.live > 0 && s.live_bytes * 4 <= self.shared.seg_size)
            .map(|(n, s)| (s.live_bytes, *n))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, n)| n).collect()
    }

    /// (segments in use, free segments kept, live bytes of records): what the log takes on disk
    /// is (in use + free) × segment size.
    pub fn usage(&self) -> (usize, usize, u64) {
        let g = self.shared.segs();
        (g.by_num.len(), g.free.len(), g.by_num.values().map(|s| s.live_bytes).sum())
    }

    pub fn seg_size(&self) -> u64 {
        self.shared.seg_size
    }
}

/// An append whose caller may stop waiting: dropped before its answer was taken, it closes
/// the answer channel (a later answer then finds nobody, and the writer releases the record)
/// and releases a record whose answer had already come.
struct Waiting<'a> {
    log: &'a Log,
    rx: Option<tokio::sync::oneshot::Receiver<std::io::Result<Loc>>>,
    rec_len: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(Ok(loc)) = rx.try_recv() {
                self.log.release_len(loc, self.rec_len);
            }
        }
    }
}

impl StagedMeta {
    /// Checksums in the block's segment table.
    pub fn segments_count(&self) -> usize {
        if self.seg_shift == 0 { 0 } else { (self.len as usize).div_ceil(1 << self.seg_shift) }
    }
}

/// Reads segment `num` whole and appends what it holds to `found`.
fn replay(f: &File, num: u32, nonce: u64, found: &mut Vec<Found>) -> std::io::Result<()> {
    let size = f.metadata()?.len();
    let mut all = vec![0u8; size as usize];
    f.read_exact_at(&mut all, 0)?;
    let mut pos = ALIGN as usize;
    while pos + REC_HEADER <= all.len() {
        let Some((id, m)) = decode_record_header(&all[pos..pos + REC_HEADER], nonce) else {
            pos += ALIGN as usize;
            continue;
        };
        let n = m.segments_count();
        let len = record_len(m.len, n) as usize;
        if pos + len > all.len() {
            pos += ALIGN as usize;
            continue;
        }
        let table = &all[pos + REC_HEADER..pos + REC_HEADER + 4 * n];
        let data = &all[pos + REC_HEADER + 4 * n..pos + REC_HEADER + 4 * n + m.len as usize];
        let segs = super::staging::segment_crcs(data, m.seg_shift);
        let table_ok = table
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .eq(segs.iter().copied());
        let whole_ok = super::staging::combined_crc(&segs, data.len(), m.seg_shift) == m.crc;
        if table_ok && whole_ok {
            found.push(Found::Block(id, m, Loc { seg: num, off: pos as u64 }));
        } else {
            found.push(Found::Damaged(id));
        }
        pos += len;
    }
    Ok(())
}

/// Reads and checks the header of the record at `loc` in `f` (segment nonce `nonce`): it must
/// name `want` with the metadata `m`. `Ok(false)`: it does not (the record was overwritten or
/// is damaged).
pub fn check_record(f: &File, nonce: u64, off: u64, want: BlockId, m: &StagedMeta) -> std::io::Result<bool> {
    let mut h = [0u8; REC_HEADER];
    f.read_exact_at(&mut h, off)?;
    Ok(decode_record_header(&h, nonce).is_some_and(|(id, hm)| {
        id == want && hm.len == m.len && hm.crc == m.crc && hm.seg_shift == m.seg_shift
    }))
}
