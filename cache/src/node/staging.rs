//! The staging store: durable, never-evicted copies of blocks that are not yet tiered.
//!
//! Blocks of at most [`StagingOptions::log_max`] bytes (by default [`LOG_MAX`]) are records
//! of the staging log ([`super::stagelog`], under `staging/log/`): appended to preallocated
//! segments, made durable in groups, one `fdatasync` for every put waiting. That is what
//! makes a small `fsync` of a client cheap. Larger blocks are files:
//!
//! One file per block, `staging/HH/SLICE_INDEX` (`HH` = low byte of the slice id, so no
//! directory grows huge). A file is a fixed header (magic, version, segment size, volume,
//! slice, index, length, crc32c of the bytes, creation time), then (version 2) a table of
//! crc32c checksums, one per [`SEGMENT`] bytes of the block, then the bytes. The table lets
//! a range read verify only the segments it touches instead of the whole block. Version-1
//! files (no table) are still read: a range read of one reads and verifies the whole block.
//!
//! A block is written to a temporary file, fsynced, renamed into place and the directory
//! fsynced before `put` returns, so after a crash a block is either wholly there or absent.
//! The file is written with `O_DIRECT` from a reused, aligned buffer where the file system
//! allows it: the bytes go to the device without a copy into the page cache, which on the
//! machines Elea is benchmarked on costs more CPU than everything else a put does, and a
//! buffered write followed by an fsync reaches a fifth of the device's write rate
//! (docs/BENCHMARKS.md). Elsewhere (tmpfs, say) it is an ordinary buffered write.
//! On open, leftover temporary files are removed and every block is verified (the whole
//! checksum and every segment's): a torn or corrupt file is discarded (and counted), never
//! served. Reads verify again: a whole read every segment, a range read the segments it
//! touches; no byte leaves this module unverified.
//!
//! A copy found torn, corrupt or missing (at open, on a read, or by [`Staging::scrub`]) is
//! forgotten here and queued as lost: the node takes the queue ([`Staging::take_lost`]) and
//! tells metadata it no longer holds those blocks, so re-replication restores their copies.
//!
//! The store has a byte capacity. `put` waits (backpressure) while the block does not fit; it
//! never drops data. Space comes back when blocks are tiered or deleted.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use super::stagelog::{self, Found, Loc, Log};
use crate::error::CacheError;

/// Blocks of at most this many bytes are staged in the log by default.
pub const LOG_MAX: u32 = 1 << 20;

/// How a staging store keeps its blocks.
#[derive(Debug, Clone, Copy)]
pub struct StagingOptions {
    /// Blocks of at most this many bytes go to the staging log; larger ones (and all, when
    /// zero) to files of their own.
    pub log_max: u32,
    /// Size of a staging log segment.
    pub seg_size: u64,
}

impl Default for StagingOptions {
    fn default() -> Self {
        Self { log_max: LOG_MAX, seg_size: stagelog::SEG_SIZE }
    }
}

const MAGIC: [u8; 4] = *b"ELST";
/// Version written; version 1 (no segment table) is still read.
const VERSION: u8 = 2;
/// magic 4, version 1, segment shift 1 (0 in version 1), pad 2, vol 8, slice 8, index 4,
/// len 4, crc 4, pad 4, created ms 8.
pub const HEADER_LEN: usize = 48;
/// log2 of [`SEGMENT`].
const SEGMENT_SHIFT: u8 = 16;
/// Bytes covered by one checksum of a version-2 file's segment table.
pub const SEGMENT: usize = 1 << SEGMENT_SHIFT;

/// Space reserved for a put, given back if the put is dropped before it is settled
/// (`std::mem::forget` it once settled).
struct Reserved<'a> {
    staging: &'a Staging,
    len: u64,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.staging.unreserve(self.len);
    }
}

/// The staging log's directory under the staging directory.
const LOG_DIR: &str = "log";

/// While block writes keep failing, at most one error line per this period.
const WRITE_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// A block's identity: (slice id, block index).
pub type BlockId = (u64, u32);

/// What the store knows about one staged block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedMeta {
    pub vol: u64,
    pub len: u32,
    pub crc: u32,
    /// Milliseconds since the Unix epoch when it was staged here.
    pub created_ms: u64,
    /// log2 of the segment size of the file's checksum table; 0 for a version-1 file.
    pub seg_shift: u8,
}

impl StagedMeta {
    /// Checksums in the file's segment table.
    fn segments(&self) -> usize {
        if self.seg_shift == 0 { 0 } else { (self.len as usize).div_ceil(1 << self.seg_shift) }
    }

    /// Where the block's bytes start in its file.
    pub fn data_offset(&self) -> usize {
        HEADER_LEN + 4 * self.segments()
    }

    /// Size of the block's file.
    pub fn file_len(&self) -> u64 {
        (self.data_offset() + self.len as usize) as u64
    }
}

/// The crc32c of each `1 << shift` bytes of `data`.
pub fn segment_crcs(data: &[u8], shift: u8) -> Vec<u32> {
    data.chunks(1 << shift).map(crc32c::crc32c).collect()
}

/// The crc32c of `len` bytes whose segments of `1 << shift` bytes have the checksums `segs`
/// (what [`segment_crcs`] returns): the whole checksum without a second pass over the bytes.
pub fn combined_crc(segs: &[u32], len: usize, shift: u8) -> u32 {
    let seg = 1usize << shift;
    let mut left = len;
    let mut acc = 0;
    for (i, c) in segs.iter().enumerate() {
        let n = seg.min(left);
        acc = if i == 0 { *c } else { crc32c::crc32c_combine(acc, *c, n) };
        left -= n;
    }
    acc
}

/// Where the bytes of a block staged now (version 2) of `len` bytes start in its file.
pub fn data_offset(len: u32) -> usize {
    HEADER_LEN + 4 * (len as usize).div_ceil(SEGMENT)
}

/// Counters for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StagingStats {
    pub blocks: u64,
    pub bytes: u64,
    pub capacity: u64,
    pub oldest_ms: Option<u64>,
    /// Torn, corrupt or missing files found (at open, on read or by a scrub) and discarded.
    pub discarded: u64,
    /// Puts whose file could not be written (a full or failing disk); each was refused.
    pub write_errors: u64,
    /// Whether the last block write failed (the disk is full or failing now).
    pub writes_failing: bool,
}

struct Inner {
    blocks: HashMap<BlockId, StagedMeta>,
    /// Where the blocks kept in the log are (the others are files).
    logged: HashMap<BlockId, Loc>,
    /// Bytes of staged blocks plus bytes reserved by puts in progress.
    used: u64,
    discarded: u64,
    /// Blocks discarded or found missing that metadata has not been told about yet.
    lost: Vec<BlockId>,
    write_errors: u64,
    /// Since when block writes have been failing (none succeeded since), and when that was
    /// last logged at error level.
    failing: Option<(Instant, Instant)>,
}

/// See the module docs.
pub struct Staging {
    dir: PathBuf,
    capacity: u64,
    log: Arc<Log>,
    log_max: u32,
    inner: Mutex<Inner>,
    space: Notify,
    /// Signalled when a block is added to the lost queue.
    lost: Notify,
    /// Whether block files are written with `O_DIRECT` (cleared for good the first time the
    /// file system refuses it).
    direct: AtomicBool,
    /// Aligned buffers for direct writes, kept for reuse (fresh memory costs page faults).
    bufs: Mutex<Vec<Vec<u8>>>,
}

/// Alignment of direct writes (offset, length and memory).
const DIRECT_ALIGN: usize = 4096;
/// Direct-write buffers kept for reuse.
const KEPT_BUFFERS: usize = 8;
/// Size of a direct-write buffer: a whole block's file (its header and checksum table take
/// less than one page), padded to a page, plus a page of room to align it.
const DIRECT_BUF: usize = elea_common::ids::BLOCK_SIZE as usize + 2 * DIRECT_ALIGN;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn encode_header(id: BlockId, m: &StagedMeta) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = if m.seg_shift == 0 { 1 } else { VERSION };
    h[5] = m.seg_shift;
    h[8..16].copy_from_slice(&m.vol.to_le_bytes());
    h[16..24].copy_from_slice(&id.0.to_le_bytes());
    h[24..28].copy_from_slice(&id.1.to_le_bytes());
    h[28..32].copy_from_slice(&m.len.to_le_bytes());
    h[32..36].copy_from_slice(&m.crc.to_le_bytes());
    h[40..48].copy_from_slice(&m.created_ms.to_le_bytes());
    h
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn decode_header(h: &[u8]) -> Option<(BlockId, StagedMeta)> {
    if h.len() < HEADER_LEN || h[0..4] != MAGIC {
        return None;
    }
    let seg_shift = match (h[4], h[5]) {
        (1, 0) => 0,
        (2, s @ 12..=22) => s,
        _ => return None,
    };
    let id = (u64_at(h, 16), u32_at(h, 24));
    let m = StagedMeta {
        vol: u64_at(h, 8),
        len: u32_at(h, 28),
        crc: u32_at(h, 32),
        created_ms: u64_at(h, 40),
        seg_shift,
    };
    Some((id, m))
}

fn file_name(id: BlockId) -> String {
    format!("{:016x}_{}", id.0, id.1)
}

fn parse_name(name: &str) -> Option<BlockId> {
    let (s, i) = name.split_once('_')?;
    if s.len() != 16 {
        return None;
    }
    Some((u64::from_str_radix(s, 16).ok()?, i.parse().ok()?))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the header of an open staged file and checks it names `want` and matches the
/// file's size. `Ok(None)`: torn or corrupt.
fn read_header(f: &File, want: Option<BlockId>) -> std::io::Result<Option<(BlockId, StagedMeta)>> {
    let size = f.metadata()?.len();
    if size < HEADER_LEN as u64 {
        return Ok(None);
    }
    let mut head = [0u8; HEADER_LEN];
    f.read_exact_at(&mut head, 0)?;
    let Some((id, m)) = decode_header(&head) else { return Ok(None) };
    if want.is_some_and(|w| w != id) || size != m.file_len() {
        return Ok(None);
    }
    Ok(Some((id, m)))
}

/// Reads a segment table at `table_at`: checksums `first..first + n`.
fn read_table(f: &File, table_at: u64, first: usize, n: usize) -> std::io::Result<Vec<u32>> {
    let mut raw = vec![0u8; 4 * n];
    f.read_exact_at(&mut raw, table_at + 4 * first as u64)?;
    Ok(raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Where a staged block's bytes are: the block `m` describes, its segment table at `table_at`
/// and its bytes at `data_at` of `f` (a block file, or a segment of the staging log).
struct Placed<'a> {
    f: &'a File,
    m: StagedMeta,
    table_at: u64,
    data_at: u64,
}

impl Placed<'_> {
    /// Reads and verifies the whole block. `Ok(None)`: corrupt. A block with a segment table
    /// is verified segment by segment (the segments cover every byte); with `whole` also
    /// against the block's checksum (at open, to catch a table that disagrees with it).
    fn read_all(&self, whole: bool) -> std::io::Result<Option<Vec<u8>>> {
        let m = &self.m;
        // Read straight into a buffer of the right size: one copy from the page cache.
        let mut data = vec![0u8; m.len as usize];
        self.f.read_exact_at(&mut data, self.data_at)?;
        if m.seg_shift == 0 {
            return Ok((crc32c::crc32c(&data) == m.crc).then_some(data));
        }
        // One pass: the segments' checksums, and the whole one combined from them.
        let segs = segment_crcs(&data, m.seg_shift);
        if whole && combined_crc(&segs, data.len(), m.seg_shift) != m.crc {
            return Ok(None);
        }
        if read_table(self.f, self.table_at, 0, m.segments())? != segs {
            return Ok(None);
        }
        Ok(Some(data))
    }

    /// Reads bytes `[off, off + len)`, verifying the segments they touch (no table: the
    /// whole block). `Ok(None)`: corrupt.
    fn read_range(&self, off: u32, len: u32) -> std::io::Result<Option<Vec<u8>>> {
        let m = &self.m;
        let (off, len) = (off as usize, len as usize);
        if len == 0 || off + len > m.len as usize {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "range outside the block"));
        }
        if m.seg_shift == 0 {
            return Ok(self.read_all(false)?.map(|d| d[off..off + len].to_vec()));
        }
        let seg = 1usize << m.seg_shift;
        let (first, last) = (off / seg, (off + len - 1) / seg);
        let start = first * seg;
        let end = ((last + 1) * seg).min(m.len as usize);
        let mut data = vec![0u8; end - start];
        self.f.read_exact_at(&mut data, self.data_at + start as u64)?;
        if read_table(self.f, self.table_at, first, last - first + 1)? != segment_crcs(&data, m.seg_shift) {
            return Ok(None);
        }
        data.copy_within(off - start..off - start + len, 0);
        data.truncate(len);
        Ok(Some(data))
    }
}

/// Reads and verifies a whole staged file. `Ok(None)`: torn or corrupt. `whole`: see
/// [`Placed::read_all`].
fn read_verified(
    path: &Path,
    want: Option<BlockId>,
    whole: bool,
) -> std::io::Result<Option<(BlockId, StagedMeta, Vec<u8>)>> {
    let f = File::open(path)?;
    let Some((id, m)) = read_header(&f, want)? else { return Ok(None) };
    let p = Placed { f: &f, m, table_at: HEADER_LEN as u64, data_at: m.data_offset() as u64 };
    Ok(p.read_all(whole)?.map(|d| (id, m, d)))
}

/// Where a read finds a staged block.
enum Source {
    File(PathBuf),
    /// A record of the staging log: its segment's file and nonce, and where it is.
    Log {
        file: Arc<File>,
        nonce: u64,
        loc: Loc,
        meta: StagedMeta,
    },
}

impl Source {
    /// Runs `read` on the block's bytes once its file's header (or its record's) names `id`.
    /// `Ok(None)`: torn, corrupt, or (in the log) no longer this block's record.
    fn with<T>(
        &self,
        id: BlockId,
        read: impl FnOnce(&Placed<'_>) -> std::io::Result<Option<T>>,
    ) -> std::io::Result<Option<T>> {
        match self {
            Source::File(path) => {
                let f = File::open(path)?;
                let Some((_, m)) = read_header(&f, Some(id))? else { return Ok(None) };
                read(&Placed { f: &f, m, table_at: HEADER_LEN as u64, data_at: m.data_offset() as u64 })
            }
            Source::Log { file, nonce, loc, meta } => {
                if !stagelog::check_record(file, *nonce, loc.off, id, meta)? {
                    return Ok(None);
                }
                let table_at = loc.off + stagelog::REC_HEADER as u64;
                let data_at = table_at + 4 * meta.segments() as u64;
                read(&Placed { f: file, m: *meta, table_at, data_at })
            }
        }
    }

    fn describe(&self, dir: &Path) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Log { loc, .. } => format!("{}/log segment {} at {}", dir.display(), loc.seg, loc.off),
        }
    }
}

impl Staging {
    /// Opens (creating) the store under `dir` with the default options, removing temporary
    /// files and discarding torn or corrupt blocks.
    pub fn open(dir: &Path, capacity: u64) -> Result<Arc<Self>, CacheError> {
        Self::open_with(dir, capacity, StagingOptions::default())
    }

    /// [`Staging::open`] with `opts`.
    pub fn open_with(dir: &Path, capacity: u64, opts: StagingOptions) -> Result<Arc<Self>, CacheError> {
        let dir = dir.to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| CacheError::io("creating the staging directory", &dir, e))?;
        let mut blocks = HashMap::new();
        let mut used = 0u64;
        let mut discarded = 0u64;
        let mut lost = Vec::new();
        let subdirs = fs::read_dir(&dir).map_err(|e| CacheError::io("listing staging", &dir, e))?;
        for sub in subdirs {
            let sub = sub.map_err(|e| CacheError::io("listing staging", &dir, e))?.path();
            if !sub.is_dir() || sub.file_name().is_some_and(|n| n == LOG_DIR) {
                continue;
            }
            let files = fs::read_dir(&sub).map_err(|e| CacheError::io("listing staging", &sub, e))?;
            for f in files {
                let path = f.map_err(|e| CacheError::io("listing staging", &sub, e))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
                let Some(id) = parse_name(&name) else {
                    // Temporary files of puts a crash interrupted, and anything unknown.
                    fs::remove_file(&path)
                        .map_err(|e| CacheError::io("removing a temporary file", &path, e))?;
                    continue;
                };
                match read_verified(&path, Some(id), true) {
                    Ok(Some((id, m, _))) => {
                        used += u64::from(m.len);
                        blocks.insert(id, m);
                    }
                    Ok(None) => {
                        tracing::warn!(path = %path.display(), "discarding a torn or corrupt staged block");
                        discarded += 1;
                        lost.push(id);
                        fs::remove_file(&path)
                            .map_err(|e| CacheError::io("removing a torn block", &path, e))?;
                    }
                    Err(e) => return Err(CacheError::io("reading a staged block", &path, e)),
                }
            }
            sync_dir(&sub).map_err(|e| CacheError::io("syncing", &sub, e))?;
        }
        let log_dir = dir.join(LOG_DIR);
        let (log, found) = Log::open(&log_dir, opts.seg_size)
            .map_err(|e| CacheError::io("opening the staging log", &log_dir, e))?;
        let mut logged: HashMap<BlockId, Loc> = HashMap::new();
        let mut damaged = Vec::new();
        for f in found {
            match f {
                Found::Block(id, m, loc) => {
                    if blocks.contains_key(&id) && !logged.contains_key(&id) {
                        // Also staged as a file (the same bytes): the file is kept.
                        log.release(loc, &m);
                        continue;
                    }
                    // A later record of the same block (put again) replaces an earlier one.
                    if let Some(old) = logged.insert(id, loc)
                        && let Some(om) = blocks.get(&id)
                    {
                        log.release(old, om);
                        used -= u64::from(om.len);
                    }
                    used += u64::from(m.len);
                    blocks.insert(id, m);
                }
                Found::Damaged(id) => damaged.push(id),
            }
        }
        for id in damaged {
            tracing::warn!(dir = %log_dir.display(), block = ?id, "discarding a damaged record of the staging log");
            discarded += 1;
            if !blocks.contains_key(&id) && !lost.contains(&id) {
                lost.push(id);
            }
        }
        let (segments, _, _) = log.usage();
        tracing::info!(dir = %dir.display(), blocks = blocks.len(), logged = logged.len(), segments, bytes = used, discarded, "staging opened");
        Ok(Arc::new(Self {
            dir,
            capacity,
            log,
            log_max: opts.log_max,
            inner: Mutex::new(Inner {
                blocks,
                logged,
                used,
                discarded,
                lost,
                write_errors: 0,
                failing: None,
            }),
            space: Notify::new(),
            lost: Notify::new(),
            direct: AtomicBool::new(true),
            bufs: Mutex::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts
        // and removes), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path_of(&self, id: BlockId) -> (PathBuf, PathBuf) {
        let sub = self.dir.join(format!("{:02x}", id.0 & 0xff));
        let p = sub.join(file_name(id));
        (sub, p)
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the block is staged here.
    pub fn contains(&self, id: BlockId) -> bool {
        self.lock().blocks.contains_key(&id)
    }

    pub fn meta(&self, id: BlockId) -> Option<StagedMeta> {
        self.lock().blocks.get(&id).copied()
    }

    /// Fraction of the capacity in use (0.0..=1.0+).
    pub fn fill(&self) -> f64 {
        if self.capacity == 0 {
            return 1.0;
        }
        self.lock().used as f64 / self.capacity as f64
    }

    /// Every staged block.
    pub fn list(&self) -> Vec<(BlockId, StagedMeta)> {
        self.lock().blocks.iter().map(|(k, v)| (*k, *v)).collect()
    }

    /// Takes the blocks found lost (discarded as torn or corrupt, or missing) since the last
    /// call. They are no longer staged here; metadata should stop listing this node for them.
    pub fn take_lost(&self) -> Vec<BlockId> {
        std::mem::take(&mut self.lock().lost)
    }

    /// Waits until a block is queued as lost (returns at once if one was queued since the
    /// last wait).
    pub async fn lost_queued(&self) {
        self.lost.notified().await;
    }

    /// Forgets a block whose file is gone or damaged (its space comes back) and counts it.
    fn forget_damaged(&self, g: &mut Inner, id: BlockId) {
        if let Some(m) = g.blocks.remove(&id) {
            g.used = g.used.saturating_sub(u64::from(m.len));
            if let Some(loc) = g.logged.remove(&id) {
                self.log.release(loc, &m);
            }
            self.space.notify_waiters();
        }
        g.discarded += 1;
    }

    /// Queues a block for [`Staging::take_lost`].
    fn queue_lost(&self, g: &mut Inner, id: BlockId) {
        if !g.lost.contains(&id) {
            g.lost.push(id);
        }
        self.lost.notify_one();
    }

    pub fn stats(&self) -> StagingStats {
        let g = self.lock();
        StagingStats {
            blocks: g.blocks.len() as u64,
            bytes: g.blocks.values().map(|m| u64::from(m.len)).sum(),
            capacity: self.capacity,
            oldest_ms: g.blocks.values().map(|m| m.created_ms).min(),
            discarded: g.discarded,
            write_errors: g.write_errors,
            writes_failing: g.failing.is_some(),
        }
    }

    /// Counts a block write that failed (the put is refused; the writer goes to another
    /// node). A full or failing disk fails every put: the first failure of a run is logged
    /// as an error, then at most one line per [`WRITE_ERROR_LOG_EVERY`], so the node says
    /// clearly why it refuses writes without flooding its log.
    fn write_failed(&self, e: &CacheError) {
        let now = Instant::now();
        let log = {
            let mut g = self.lock();
            g.write_errors += 1;
            match &mut g.failing {
                None => {
                    g.failing = Some((now, now));
                    Some(Duration::ZERO)
                }
                Some((since, logged)) if now.duration_since(*logged) >= WRITE_ERROR_LOG_EVERY => {
                    *logged = now;
                    Some(now.duration_since(*since))
                }
                Some(_) => None,
            }
        };
        match log {
            Some(failing_for) => tracing::error!(
                dir = %self.dir.display(),
                error = %e,
                ?failing_for,
                "staging cannot write blocks (disk full or failing): puts are refused until writes succeed again"
            ),
            None => tracing::debug!(error = %e, "staging a block failed"),
        }
    }

    /// A block write succeeded: ends a run of failures (logged).
    fn write_succeeded(&self) {
        let ended = {
            let mut g = self.lock();
            g.failing.take().map(|(since, _)| (since.elapsed(), g.write_errors))
        };
        if let Some((after, total)) = ended {
            tracing::info!(dir = %self.dir.display(), ?after, write_errors = total, "staging writes succeed again");
        }
    }

    /// Reserves `len` bytes, waiting while they do not fit (backpressure). A block larger
    /// than the whole store is refused.
    async fn reserve(&self, len: u64) -> Result<(), CacheError> {
        if len > self.capacity {
            return Err(CacheError::TooLarge { len, capacity: self.capacity });
        }
        let mut warned = false;
        loop {
            let wait = self.space.notified();
            {
                let mut g = self.lock();
                if g.used + len <= self.capacity {
                    g.used += len;
                    return Ok(());
                }
            }
            if !warned {
                tracing::warn!(len, capacity = self.capacity, "staging full: writers wait for tiering");
                warned = true;
            }
            // Re-check now and then even without a wake-up (space freed by another path).
            let _ = tokio::time::timeout(Duration::from_millis(500), wait).await;
        }
    }

    fn unreserve(&self, len: u64) {
        let mut g = self.lock();
        g.used = g.used.saturating_sub(len);
        drop(g);
        self.space.notify_waiters();
    }

    /// Stores a block durably. `crc` must be the crc32c of `data` (checked). Putting a block
    /// that is already staged with the same checksum is a no-op.
    pub async fn put(
        self: &Arc<Self>,
        vol: u64,
        id: BlockId,
        data: bytes::Bytes,
        crc: u32,
    ) -> Result<(), CacheError> {
        let len = u32::try_from(data.len())
            .map_err(|_| CacheError::TooLarge { len: data.len() as u64, capacity: self.capacity })?;
        // The segment table's checksums, computed once: they also give the whole checksum.
        let segs = segment_crcs(&data, SEGMENT_SHIFT);
        if combined_crc(&segs, data.len(), SEGMENT_SHIFT) != crc {
            return Err(CacheError::Checksum(format!(
                "block {id:?}: the bytes received do not match their checksum"
            )));
        }
        {
            let mut g = self.lock();
            if let Some(m) = g.blocks.get_mut(&id) {
                return if m.crc == crc && m.len == len {
                    // Put again (re-replication to a node that still had it): it is wanted
                    // here now, so reconcile's grace starts over.
                    m.created_ms = now_ms();
                    Ok(())
                } else {
                    Err(CacheError::Conflict(format!("block {id:?} is already staged with other contents")))
                };
            }
        }
        self.reserve(u64::from(len)).await?;
        let meta = StagedMeta { vol, len, crc, created_ms: now_ms(), seg_shift: SEGMENT_SHIFT };
        if len <= self.log_max {
            // In the caller's task: a caller that gives up (a deadline, a dropped connection)
            // leaves no record in use (see `Log::append`) and no space reserved (`Reserved`).
            let reserved = Reserved { staging: self, len: u64::from(len) };
            let res = self.log.append(id, meta, segs, data).await;
            std::mem::forget(reserved);
            return match res {
                Ok(loc) => {
                    self.write_succeeded();
                    let mut g = self.lock();
                    let g = &mut *g;
                    match g.blocks.entry(id) {
                        std::collections::hash_map::Entry::Occupied(_) => {
                            // A concurrent put of the same block won; give back our
                            // reservation and our record.
                            g.used = g.used.saturating_sub(u64::from(len));
                            self.log.release(loc, &meta);
                        }
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(meta);
                            g.logged.insert(id, loc);
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    let e = CacheError::io("appending to the staging log", &self.dir, e);
                    self.write_failed(&e);
                    self.unreserve(u64::from(len));
                    Err(e)
                }
            };
        }
        // A file's write and its bookkeeping run in their own task: a caller that gives up
        // cannot leave a file on disk the map does not know, or space reserved for ever.
        let this = self.clone();
        let task = tokio::spawn(async move {
            let w = this.clone();
            let res = tokio::task::spawn_blocking(move || w.write_file(id, &meta, &data, &segs))
                .await
                .map_err(|e| CacheError::Internal(format!("staging writer: {e}")))
                .and_then(|r| r);
            match res {
                Ok(()) => {
                    this.write_succeeded();
                    let mut g = this.lock();
                    if g.blocks.insert(id, meta).is_some() {
                        // A concurrent put of the same block won (the same file, renamed
                        // over); give back our reservation.
                        g.used = g.used.saturating_sub(u64::from(len));
                    }
                    Ok(())
                }
                Err(e) => {
                    this.write_failed(&e);
                    this.unreserve(u64::from(len));
                    Err(e)
                }
            }
        });
        task.await.map_err(|e| CacheError::Internal(format!("staging writer: {e}")))?
    }

    fn write_file(
        &self,
        id: BlockId,
        meta: &StagedMeta,
        data: &[u8],
        segs: &[u32],
    ) -> Result<(), CacheError> {
        let (sub, path) = self.path_of(id);
        fs::create_dir_all(&sub).map_err(|e| CacheError::io("creating", &sub, e))?;
        let tmp = sub.join(format!(".{}.tmp.{}", file_name(id), crate::random_u64()));
        let mut head = Vec::with_capacity(meta.data_offset());
        head.extend_from_slice(&encode_header(id, meta));
        if meta.seg_shift != 0 {
            for c in segs {
                head.extend_from_slice(&c.to_le_bytes());
            }
        }
        let write = || -> std::io::Result<()> {
            if !(self.direct.load(Ordering::Relaxed) && self.write_direct(&tmp, &head, data)?) {
                let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
                f.write_all(&head)?;
                f.write_all(data)?;
                f.sync_all()?;
            }
            fs::rename(&tmp, &path)?;
            sync_dir(&sub)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            CacheError::io("writing a staged block", &path, e)
        })
    }

    /// Writes `head` then `data` to the new file `tmp` with `O_DIRECT` and syncs it. False
    /// (and no file left) when the file system does not take direct writes: the caller
    /// writes it the ordinary way, as it will from now on.
    fn write_direct(&self, tmp: &Path, head: &[u8], data: &[u8]) -> std::io::Result<bool> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let refused = |e: &std::io::Error| e.raw_os_error() == Some(libc::EINVAL);
        let f = match OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(tmp) {
            Ok(f) => f,
            Err(e) if refused(&e) => {
                // Linux creates the file before it finds the file system cannot do direct
                // I/O: remove it, or the ordinary write (create_new) finds it there.
                match fs::remove_file(tmp) {
                    Ok(()) => {}
                    Err(r) if r.kind() == std::io::ErrorKind::NotFound => {}
                    Err(r) => return Err(r),
                }
                self.no_direct(&e);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let len = head.len() + data.len();
        let padded = len.next_multiple_of(DIRECT_ALIGN);
        let mut buf = self.take_buf(padded + DIRECT_ALIGN);
        let at = buf.as_ptr().align_offset(DIRECT_ALIGN);
        let page = &mut buf[at..at + padded];
        page[..head.len()].copy_from_slice(head);
        page[head.len()..len].copy_from_slice(data);
        page[len..].fill(0);
        let written = f.write_all_at(page, 0);
        self.give_buf(buf);
        match written {
            Ok(()) => {}
            Err(e) if refused(&e) => {
                drop(f);
                fs::remove_file(tmp)?;
                self.no_direct(&e);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        // The padding past the block's end goes again (a file is exactly its block).
        f.set_len(len as u64)?;
        f.sync_all()?;
        Ok(true)
    }

    fn no_direct(&self, e: &std::io::Error) {
        if self.direct.swap(false, Ordering::Relaxed) {
            tracing::info!(dir = %self.dir.display(), error = %e, "direct writes refused here; staging writes go through the page cache");
        }
    }

    /// A buffer of at least `len` bytes. New ones are made large enough for any block, so
    /// every kept buffer serves every later write.
    fn take_buf(&self, len: usize) -> Vec<u8> {
        let mut bufs = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        match bufs.iter().position(|b| b.len() >= len) {
            Some(i) => bufs.swap_remove(i),
            None => vec![0u8; len.max(DIRECT_BUF)],
        }
    }

    fn give_buf(&self, buf: Vec<u8>) {
        let mut bufs = self.bufs.lock().unwrap_or_else(|p| p.into_inner());
        if bufs.len() < KEPT_BUFFERS {
            bufs.push(buf);
        }
    }

    /// Reads a staged block, verifying it. `Ok(None)` when it is not staged here. A corrupt
    /// file is discarded and reported as an error (the caller reads another copy).
    pub async fn get(self: &Arc<Self>, id: BlockId) -> Result<Option<(StagedMeta, Vec<u8>)>, CacheError> {
        self.read_with(id, move |p| Ok(p.read_all(false)?.map(|d| (p.m, d)))).await
    }

    /// Reads bytes `[off, off + len)` of a staged block of `block_len` bytes, verifying only
    /// the segments they touch. `Ok(None)` when it is not staged here; a conflict when it is
    /// staged with another length; a bad request when the range is empty or outside the
    /// block. A corrupt segment makes the whole copy discarded and reported as an error, as
    /// with [`Staging::get`].
    pub async fn get_range(
        self: &Arc<Self>,
        id: BlockId,
        block_len: u32,
        off: u32,
        len: u32,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(m) = self.meta(id) else { return Ok(None) };
        if m.len != block_len {
            return Err(CacheError::Conflict(format!(
                "block {id:?} has {} bytes here, not {block_len}",
                m.len
            )));
        }
        if len == 0 || u64::from(off) + u64::from(len) > u64::from(block_len) {
            return Err(CacheError::BadRequest(format!(
                "range of {len} bytes at {off} is outside block {id:?} of {block_len} bytes"
            )));
        }
        self.read_with(id, move |p| p.read_range(off, len)).await
    }

    /// Where the block is read from now, if it is staged here.
    fn source(&self, id: BlockId) -> Option<Source> {
        let g = self.lock();
        let meta = *g.blocks.get(&id)?;
        match g.logged.get(&id) {
            None => Some(Source::File(self.path_of(id).1)),
            Some(loc) => {
                let (file, nonce) = self.log.segment(loc.seg)?;
                Some(Source::Log { file, nonce, loc: *loc, meta })
            }
        }
    }

    /// Runs a verifying reader on a staged block (its file or its log record), off the async
    /// threads, and deals with what it finds: a corrupt copy is discarded and queued as lost,
    /// a missing one forgotten.
    async fn read_with<T: Send + 'static>(
        self: &Arc<Self>,
        id: BlockId,
        read: impl Fn(&Placed<'_>) -> std::io::Result<Option<T>> + Send + Sync + 'static,
    ) -> Result<Option<T>, CacheError> {
        let read = Arc::new(read);
        // A log record can move (compaction) between the lookup and the read: then read it
        // where it is now.
        for _ in 0..3 {
            let Some(src) = self.source(id) else { return Ok(None) };
            let r = {
                let (src, read) = (Arc::new(src), read.clone());
                let s = src.clone();
                let r = tokio::task::spawn_blocking(move || s.with(id, |p| read(p)))
                    .await
                    .map_err(|e| CacheError::Internal(format!("staging reader: {e}")))?;
                (src, r)
            };
            let (src, r) = r;
            let what = src.describe(&self.dir);
            match r {
                Ok(Some(v)) => return Ok(Some(v)),
                Ok(None) => {
                    if let Source::Log { loc, .. } = &*src {
                        // Not (or no longer) this block's record: corrupt only if the map
                        // still says it is.
                        let g = self.lock();
                        if g.logged.get(&id) != Some(loc) {
                            continue;
                        }
                    }
                    tracing::error!(copy = %what, "staged block is corrupt: discarding it");
                    self.remove(id).await?;
                    let mut g = self.lock();
                    g.discarded += 1;
                    self.queue_lost(&mut g, id);
                    return Err(CacheError::Checksum(format!("staged block {id:?} is corrupt")));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let Source::File(path) = &*src else {
                        return Err(CacheError::io("reading a staged block", Path::new(&what), e));
                    };
                    // Known here but the file is gone (removed behind the store's back, or a
                    // concurrent remove). Checked again under the lock: a remove that raced
                    // this read has already forgotten it, and no put can recreate the file
                    // while the block is still known.
                    let mut g = self.lock();
                    if g.blocks.contains_key(&id)
                        && !g.logged.contains_key(&id)
                        && matches!(fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
                    {
                        tracing::error!(path = %path.display(), "staged block is missing: forgetting it");
                        self.forget_damaged(&mut g, id);
                        self.queue_lost(&mut g, id);
                    }
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                    return Err(CacheError::BadRequest(format!("block {id:?}: {e}")));
                }
                Err(e) => return Err(CacheError::io("reading a staged block", Path::new(&what), e)),
            }
        }
        Err(CacheError::Internal(format!("staged block {id:?} kept moving while it was read")))
    }

    /// Checks that each of `ids` (blocks metadata says are staged here) still has its file,
    /// of the right size. Returns the ones that do not: unknown here, missing on disk, or of
    /// the wrong size (that file is removed). Known ones are forgotten and counted as
    /// discarded; the caller reports them all (they are not queued). The bytes are not read:
    /// reads and tiering verify them.
    ///
    /// Fails without judging any block when the staging directory itself is gone (an
    /// unmounted disk must not look like every copy lost). Any other error on one block
    /// skips that block.
    pub async fn scrub(self: &Arc<Self>, ids: Vec<BlockId>) -> Result<Vec<BlockId>, CacheError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.scrub_blocking(&ids))
            .await
            .map_err(|e| CacheError::Internal(format!("staging scrub: {e}")))?
    }

    fn scrub_blocking(&self, ids: &[BlockId]) -> Result<Vec<BlockId>, CacheError> {
        match fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(CacheError::Internal(format!("{} is not a directory", self.dir.display()))),
            Err(e) => return Err(CacheError::io("checking the staging directory", &self.dir, e)),
        }
        let mut lost = Vec::new();
        for &id in ids {
            let (_, path) = self.path_of(id);
            // Under the lock: a put inserts a block only after its file (or record) is in
            // place, and a remove deletes the file before forgetting the block, so "known
            // here, no file" seen under the lock is a lost copy, not a race.
            let mut g = self.lock();
            let Some(m) = g.blocks.get(&id).copied() else {
                lost.push(id);
                continue;
            };
            if let Some(loc) = g.logged.get(&id).copied() {
                // A record: its segment must still be there, of its size.
                let seg = self.log.path(loc.seg);
                match fs::metadata(&seg) {
                    Ok(f) if f.len() >= loc.off + stagelog::record_len(m.len, m.segments()) => {}
                    Ok(_) | Err(_) if self.log.segment(loc.seg).is_none() => {}
                    Ok(f) => {
                        tracing::error!(path = %seg.display(), size = f.len(), "staging log segment is cut short: forgetting its block");
                        self.forget_damaged(&mut g, id);
                        lost.push(id);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        tracing::error!(path = %seg.display(), "staging log segment is missing: forgetting its block");
                        self.forget_damaged(&mut g, id);
                        lost.push(id);
                    }
                    Err(e) => {
                        tracing::warn!(path = %seg.display(), error = %e, "checking a staging log segment")
                    }
                }
                continue;
            }
            match fs::metadata(&path) {
                Ok(f) if f.len() == m.file_len() => {}
                Ok(f) => {
                    tracing::error!(path = %path.display(), size = f.len(), "staged block has the wrong size: discarding it");
                    if let Err(e) = fs::remove_file(&path) {
                        tracing::warn!(path = %path.display(), error = %e, "removing a damaged staged block");
                        continue;
                    }
                    self.forget_damaged(&mut g, id);
                    lost.push(id);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::error!(path = %path.display(), "staged block is missing: forgetting it");
                    self.forget_damaged(&mut g, id);
                    lost.push(id);
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "checking a staged block"),
            }
        }
        Ok(lost)
    }

    /// Removes a staged block (no-op when absent) and frees its space. A log record is only
    /// forgotten (see [`super::stagelog`]); a file is deleted.
    pub async fn remove(self: &Arc<Self>, id: BlockId) -> Result<(), CacheError> {
        {
            let mut g = self.lock();
            if let Some(loc) = g.logged.remove(&id) {
                if let Some(m) = g.blocks.remove(&id) {
                    g.used = g.used.saturating_sub(u64::from(m.len));
                    self.log.release(loc, &m);
                }
                drop(g);
                self.space.notify_waiters();
                return Ok(());
            }
        }
        let (sub, path) = self.path_of(id);
        let r = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            match fs::remove_file(&path) {
                Ok(()) => sync_dir(&sub),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
        .map_err(|e| CacheError::Internal(format!("staging remover: {e}")))?;
        r.map_err(|e| CacheError::io("removing a staged block", &self.dir, e))?;
        let mut g = self.lock();
        // A put of the same block into the log may have come in between: that record stays.
        if g.logged.contains_key(&id) {
            return Ok(());
        }
        let removed = g.blocks.remove(&id);
        drop(g);
        if let Some(m) = removed {
            self.unreserve(u64::from(m.len));
        }
        Ok(())
    }

    /// Compacts the staging log: the live records of sparse old segments are appended again
    /// and those segments freed. Returns the records moved.
    pub async fn compact(self: &Arc<Self>) -> Result<usize, CacheError> {
        let victims = self.log.sparse();
        let (in_use, _, _) = self.log.usage();
        // A few sparse segments are not worth the copying.
        if victims.is_empty() || in_use < 4 {
            return Ok(0);
        }
        let mut moved = 0;
        for seg in victims {
            let ids: Vec<(BlockId, Loc)> =
                self.lock().logged.iter().filter(|(_, l)| l.seg == seg).map(|(id, l)| (*id, *l)).collect();
            for (id, old) in ids {
                let Some((m, data)) = self.get(id).await? else { continue };
                let segs = segment_crcs(&data, m.seg_shift);
                let new = self
                    .log
                    .append(id, m, segs, bytes::Bytes::from(data))
                    .await
                    .map_err(|e| CacheError::io("compacting the staging log", &self.dir, e))?;
                let mut g = self.lock();
                if g.logged.get(&id) == Some(&old) {
                    g.logged.insert(id, new);
                    self.log.release(old, &m);
                    moved += 1;
                } else {
                    // Removed (or moved) meanwhile: the new record is not needed.
                    self.log.release(new, &m);
                }
            }
        }
        if moved > 0 {
            let (segments, free, live) = self.log.usage();
            tracing::info!(moved, segments, free, live_bytes = live, "compacted the staging log");
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that keeps every block as a file (for the tests of the file format).
    fn files(dir: &Path, capacity: u64) -> Arc<Staging> {
        Staging::open_with(dir, capacity, StagingOptions { log_max: 0, ..StagingOptions::default() }).unwrap()
    }

    fn block(n: usize, seed: u8) -> bytes::Bytes {
        (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>().into()
    }

    #[test]
    fn combined_segment_checksums_equal_the_whole_checksum() {
        for n in [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT + 17, 4 << 20] {
            let b = block(n, 7);
            let segs = segment_crcs(&b, SEGMENT_SHIFT);
            assert_eq!(combined_crc(&segs, n, SEGMENT_SHIFT), crc32c::crc32c(&b), "{n} bytes");
        }
    }

    #[tokio::test]
    async fn put_get_remove_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let s = Staging::open(d.path(), 1 << 20).unwrap();
        let b = block(1000, 1);
        let crc = crc32c::crc32c(&b);
        assert!(matches!(s.put(1, (5, 0), b.clone(), crc ^ 1).await, Err(CacheError::Checksum(_))));
        s.put(1, (5, 0), b.clone(), crc).await.unwrap();
        s.put(1, (5, 0), b.clone(), crc).await.unwrap();
        assert!(matches!(
            s.put(1, (5, 0), block(1000, 2), crc32c::crc32c(&block(1000, 2))).await,
            Err(CacheError::Conflict(_))
        ));
        s.put(1, (0x1ff, 3), block(10, 3), crc32c::crc32c(&block(10, 3))).await.unwrap();
        assert_eq!(s.get((5, 0)).await.unwrap().unwrap().1, b.to_vec());
        assert_eq!(s.stats().bytes, 1010);
        drop(s);
        let s = Staging::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.stats().blocks, 2);
        assert_eq!(s.get((0x1ff, 3)).await.unwrap().unwrap().1, block(10, 3).to_vec());
        s.remove((5, 0)).await.unwrap();
        s.remove((5, 0)).await.unwrap();
        assert!(s.get((5, 0)).await.unwrap().is_none());
        assert_eq!(s.stats().bytes, 10);
    }

    /// Direct and buffered writes make the same files, and each reads the other's.
    #[tokio::test]
    async fn direct_and_buffered_files_are_alike() {
        let d = tempfile::tempdir().unwrap();
        let s = files(d.path(), 16 << 20);
        let sizes = [1, 4095, 4096, 4097, 300_000, 4 << 20];
        for (i, n) in sizes.iter().enumerate() {
            let direct = i % 2 == 0;
            s.direct.store(direct, Ordering::Relaxed);
            let b = block(*n, i as u8);
            s.put(1, (9, i as u32), b.clone(), crc32c::crc32c(&b)).await.unwrap();
            let (_, path) = s.path_of((9, i as u32));
            let m = s.meta((9, i as u32)).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), m.file_len(), "{n} bytes, direct {direct}");
        }
        drop(s);
        let s = files(d.path(), 16 << 20);
        assert_eq!(s.stats().discarded, 0);
        for (i, n) in sizes.iter().enumerate() {
            assert_eq!(s.get((9, i as u32)).await.unwrap().unwrap().1, block(*n, i as u8).to_vec());
        }
    }

    #[tokio::test]
    async fn torn_and_corrupt_files_are_discarded() {
        let d = tempfile::tempdir().unwrap();
        let s = files(d.path(), 1 << 20);
        for i in 0..3u32 {
            let b = block(4096, i as u8);
            s.put(1, (7, i), b.clone(), crc32c::crc32c(&b)).await.unwrap();
        }
        drop(s);
        let sub = d.path().join("07");
        // A torn write (truncated), a flipped byte, and a leftover temporary file.
        let p0 = sub.join(file_name((7, 0)));
        let len = fs::metadata(&p0).unwrap().len();
        OpenOptions::new().write(true).open(&p0).unwrap().set_len(len - 100).unwrap();
        let p1 = sub.join(file_name((7, 1)));
        let mut bytes = fs::read(&p1).unwrap();
        bytes[data_offset(4096) + 7] ^= 0x40;
        fs::write(&p1, &bytes).unwrap();
        fs::write(sub.join(".x.tmp.1"), b"partial").unwrap();
        let s = files(d.path(), 1 << 20);
        assert_eq!(s.stats().blocks, 1);
        assert_eq!(s.stats().discarded, 2);
        assert!(!sub.join(".x.tmp.1").exists());
        // Both are queued as lost, once.
        let mut lost = s.take_lost();
        lost.sort_unstable();
        assert_eq!(lost, vec![(7, 0), (7, 1)]);
        assert!(s.take_lost().is_empty());
        // Corruption after open is caught on read, and queued.
        let p2 = sub.join(file_name((7, 2)));
        let mut bytes = fs::read(&p2).unwrap();
        bytes[data_offset(4096)] ^= 1;
        fs::write(&p2, &bytes).unwrap();
        assert!(matches!(s.get((7, 2)).await, Err(CacheError::Checksum(_))));
        assert!(!s.contains((7, 2)));
        tokio::time::timeout(Duration::from_secs(5), s.lost_queued()).await.unwrap();
        assert_eq!(s.take_lost(), vec![(7, 2)]);
        assert_eq!(s.stats().bytes, 0);
        // A block put again after being lost is staged normally.
        let b = block(4096, 2);
        s.put(1, (7, 2), b.clone(), crc32c::crc32c(&b)).await.unwrap();
        assert_eq!(s.get((7, 2)).await.unwrap().unwrap().1, b.to_vec());
    }

    #[tokio::test]
    async fn missing_files_are_found_and_forgotten() {
        let d = tempfile::tempdir().unwrap();
        let s = files(d.path(), 1 << 20);
        for i in 0..4u32 {
            let b = block(1000, i as u8);
            s.put(1, (9, i), b.clone(), crc32c::crc32c(&b)).await.unwrap();
        }
        let sub = d.path().join("09");
        // Removed behind the store's back, and cut short.
        fs::remove_file(sub.join(file_name((9, 0)))).unwrap();
        let p1 = sub.join(file_name((9, 1)));
        OpenOptions::new().write(true).open(&p1).unwrap().set_len(100).unwrap();
        let ids = vec![(9, 0), (9, 1), (9, 2), (8, 0)];
        assert_eq!(s.scrub(ids.clone()).await.unwrap(), vec![(9, 0), (9, 1), (8, 0)]);
        assert!(!s.contains((9, 0)) && !s.contains((9, 1)) && s.contains((9, 2)) && s.contains((9, 3)));
        assert!(!p1.exists());
        assert_eq!((s.stats().blocks, s.stats().bytes, s.stats().discarded), (2, 2000, 2));
        // The scrub's findings are its caller's to report; nothing is queued.
        assert!(s.take_lost().is_empty());
        assert_eq!(s.scrub(ids).await.unwrap(), vec![(9, 0), (9, 1), (8, 0)]);
        // A read that finds the file gone forgets the block and queues it.
        fs::remove_file(sub.join(file_name((9, 3)))).unwrap();
        assert!(s.get((9, 3)).await.unwrap().is_none());
        assert!(!s.contains((9, 3)));
        assert_eq!(s.take_lost(), vec![(9, 3)]);
        // Without the staging directory nothing is judged.
        fs::remove_dir_all(d.path()).unwrap();
        assert!(s.scrub(vec![(9, 2)]).await.is_err());
        assert!(s.contains((9, 2)));
    }

    const BLOCK: usize = 4 << 20;

    #[tokio::test]
    async fn range_reads_return_exactly_the_bytes_asked_for() {
        let d = tempfile::tempdir().unwrap();
        let s = Staging::open(d.path(), 64 << 20).unwrap();
        // A full block and a short last block (ends inside a segment).
        let full = block(BLOCK, 1);
        let short = block(3 * SEGMENT + 1000, 2);
        s.put(1, (3, 0), full.clone(), crc32c::crc32c(&full)).await.unwrap();
        s.put(1, (3, 1), short.clone(), crc32c::crc32c(&short)).await.unwrap();
        let n = BLOCK as u32;
        let seg = SEGMENT as u32;
        let cases = [
            (0, 4096),              // inside the first segment
            (seg - 10, 20),         // across a segment boundary
            (5 * seg + 7, 3 * seg), // across several, unaligned
            (n - 4096, 4096),       // at the end of the block
            (n - 1, 1),             // the last byte
            (0, n),                 // the whole block
        ];
        for (off, len) in cases {
            let got = s.get_range((3, 0), n, off, len).await.unwrap().unwrap();
            assert_eq!(got, full[off as usize..(off + len) as usize], "range {off}+{len}");
        }
        let sn = short.len() as u32;
        let got = s.get_range((3, 1), sn, sn - 1500, 1500).await.unwrap().unwrap();
        assert_eq!(got, short[short.len() - 1500..]);
        assert_eq!(s.get_range((3, 1), sn, 0, sn).await.unwrap().unwrap(), short.to_vec());
        // Bad ranges and lengths are refused without touching the copy.
        for (off, len) in [(0, 0), (n - 1, 2), (n, 1), (1, u32::MAX), (u32::MAX, 1)] {
            assert!(
                matches!(s.get_range((3, 0), n, off, len).await, Err(CacheError::BadRequest(_))),
                "range {off}+{len}"
            );
        }
        assert!(matches!(s.get_range((3, 0), n - 1, 0, 10).await, Err(CacheError::Conflict(_))));
        assert!(s.get_range((4, 0), n, 0, 10).await.unwrap().is_none());
        assert!(s.contains((3, 0)) && s.take_lost().is_empty());
    }

    #[tokio::test]
    async fn a_corrupt_segment_fails_only_the_ranges_that_touch_it() {
        let d = tempfile::tempdir().unwrap();
        let s = Staging::open(d.path(), 64 << 20).unwrap();
        let b = block(BLOCK, 5);
        s.put(1, (6, 0), b.clone(), crc32c::crc32c(&b)).await.unwrap();
        // Flip one byte of segment 10.
        let p = d.path().join("06").join(file_name((6, 0)));
        let mut bytes = fs::read(&p).unwrap();
        let at = 10 * SEGMENT + 123;
        bytes[data_offset(BLOCK as u32) + at] ^= 0x10;
        fs::write(&p, &bytes).unwrap();
        let n = BLOCK as u32;
        // Ranges elsewhere still read (their segments verify).
        for (off, len) in [(0u32, 4096u32), (9 * SEGMENT as u32, SEGMENT as u32), (11 * SEGMENT as u32, 100)]
        {
            let got = s.get_range((6, 0), n, off, len).await.unwrap().unwrap();
            assert_eq!(got, b[off as usize..(off + len) as usize]);
        }
        // The range covering the flipped byte is refused, and the copy is discarded and
        // queued as lost (re-replication restores it from another copy).
        assert!(matches!(s.get_range((6, 0), n, at as u32 - 5, 10).await, Err(CacheError::Checksum(_))));
        assert!(!s.contains((6, 0)));
        assert_eq!(s.take_lost(), vec![(6, 0)]);
        // A whole read of a copy with a corrupt segment table is refused too.
        s.put(1, (6, 1), b.clone(), crc32c::crc32c(&b)).await.unwrap();
        let p = d.path().join("06").join(file_name((6, 1)));
        let mut bytes = fs::read(&p).unwrap();
        bytes[HEADER_LEN + 4 * 3] ^= 1;
        fs::write(&p, &bytes).unwrap();
        assert!(matches!(s.get((6, 1)).await, Err(CacheError::Checksum(_))));
    }

    /// Writes a block in the version-1 format (header and bytes, no segment table).
    fn write_v1(dir: &Path, id: BlockId, data: &[u8]) {
        let m = StagedMeta {
            vol: 1,
            len: data.len() as u32,
            crc: crc32c::crc32c(data),
            created_ms: now_ms(),
            seg_shift: 0,
        };
        let sub = dir.join(format!("{:02x}", id.0 & 0xff));
        fs::create_dir_all(&sub).unwrap();
        let mut f = encode_header(id, &m).to_vec();
        assert_eq!(f[4], 1);
        f.extend_from_slice(data);
        fs::write(sub.join(file_name(id)), f).unwrap();
    }

    #[tokio::test]
    async fn version_1_files_are_still_read() {
        let d = tempfile::tempdir().unwrap();
        let b = block(BLOCK, 7);
        write_v1(d.path(), (8, 0), &b);
        let bad = block(5000, 8);
        write_v1(d.path(), (8, 1), &bad);
        let s = Staging::open(d.path(), 64 << 20).unwrap();
        assert_eq!(s.stats().blocks, 2);
        assert_eq!(s.meta((8, 0)).unwrap().seg_shift, 0);
        assert_eq!(s.get((8, 0)).await.unwrap().unwrap().1, b.to_vec());
        let n = BLOCK as u32;
        for (off, len) in [(0u32, 4096u32), (n - 4096, 4096), (12345, 200_000), (0, n)] {
            let got = s.get_range((8, 0), n, off, len).await.unwrap().unwrap();
            assert_eq!(got, b[off as usize..(off + len) as usize]);
        }
        assert_eq!(s.scrub(vec![(8, 0), (8, 1)]).await.unwrap(), Vec::<BlockId>::new());
        // A corrupt version-1 file fails any range read (it has one checksum).
        drop(s);
        let p = d.path().join("08").join(file_name((8, 1)));
        let mut f = fs::read(&p).unwrap();
        f[HEADER_LEN + 4000] ^= 1;
        fs::write(&p, f).unwrap();
        let s = Staging::open(d.path(), 64 << 20).unwrap();
        assert!(!s.contains((8, 1)));
        // Corrupted after open: caught by a range far from the damage.
        let p = d.path().join("08").join(file_name((8, 0)));
        let mut f = fs::read(&p).unwrap();
        f[HEADER_LEN + BLOCK - 1] ^= 1;
        fs::write(&p, f).unwrap();
        assert!(matches!(s.get_range((8, 0), n, 0, 10).await, Err(CacheError::Checksum(_))));
    }

    #[tokio::test]
    async fn a_failing_disk_refuses_puts_returns_their_space_and_recovers() {
        let d = tempfile::tempdir().unwrap();
        let s = files(d.path(), 1 << 20);
        // A regular file where slice 7's directory goes: every write of slice 7 fails, as on
        // a full disk.
        fs::write(d.path().join("07"), b"in the way").unwrap();
        let b = block(1000, 1);
        let crc = crc32c::crc32c(&b);
        for i in 0..3 {
            assert!(matches!(s.put(1, (7, i), b.clone(), crc).await, Err(CacheError::Io { .. })));
        }
        let st = s.stats();
        assert_eq!((st.write_errors, st.writes_failing, st.blocks), (3, true, 0));
        assert_eq!(s.fill(), 0.0, "a refused put keeps no space reserved");
        assert!(!s.contains((7, 0)));
        // Room again: puts succeed, the run of failures ends, the count stays.
        fs::remove_file(d.path().join("07")).unwrap();
        s.put(1, (7, 0), b.clone(), crc).await.unwrap();
        let st = s.stats();
        assert_eq!((st.write_errors, st.writes_failing, st.blocks, st.bytes), (3, false, 1, 1000));
        assert_eq!(s.get((7, 0)).await.unwrap().unwrap().1, b.to_vec());
    }

    #[tokio::test]
    async fn full_store_applies_backpressure() {
        let d = tempfile::tempdir().unwrap();
        let s = Staging::open(d.path(), 3000).unwrap();
        let b = block(2000, 1);
        let crc = crc32c::crc32c(&b);
        assert!(matches!(
            s.put(1, (1, 0), block(4000, 1), crc32c::crc32c(&block(4000, 1))).await,
            Err(CacheError::TooLarge { .. })
        ));
        s.put(1, (1, 0), b.clone(), crc).await.unwrap();
        let s2 = s.clone();
        let b2 = b.clone();
        let waiting = tokio::spawn(async move { s2.put(1, (2, 0), b2, crc).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "a put that does not fit must wait");
        s.remove((1, 0)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap();
        assert!(s.contains((2, 0)));
    }

    /// A store whose log has the smallest segments (four 4 KiB pages), so a few small
    /// blocks fill one.
    fn tiny_log(dir: &Path, capacity: u64) -> Arc<Staging> {
        Staging::open_with(dir, capacity, StagingOptions { log_max: LOG_MAX, seg_size: 16 << 10 }).unwrap()
    }

    fn loc_of(s: &Staging, id: BlockId) -> Loc {
        s.lock().logged[&id]
    }

    #[tokio::test]
    async fn small_blocks_are_log_records_that_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let s = tiny_log(d.path(), 1 << 30);
        // Concurrent puts share groups; several segments fill.
        let puts = (0..40u32).map(|i| {
            let s = s.clone();
            async move {
                let b = block(100 + 250 * i as usize, i as u8);
                s.put(1, (u64::from(i % 3), i), b.clone(), crc32c::crc32c(&b)).await
            }
        });
        for r in futures::future::join_all(puts).await {
            r.unwrap();
        }
        let big = block(LOG_MAX as usize + 1, 9);
        s.put(1, (9, 0), big.clone(), crc32c::crc32c(&big)).await.unwrap();
        assert_eq!(s.lock().logged.len(), 40, "every small block is a record, the large one a file");
        assert!(s.path_of((9, 0)).1.exists());
        assert!(!d.path().join("00").exists(), "no file for a small block");
        let (segments, _, _) = s.log.usage();
        assert!(segments > 3, "segments roll: {segments}");
        drop(s);
        let s = tiny_log(d.path(), 1 << 30);
        assert_eq!((s.stats().blocks, s.stats().discarded), (41, 0));
        for i in 0..40u32 {
            let b = block(100 + 250 * i as usize, i as u8);
            let id = (u64::from(i % 3), i);
            assert_eq!(s.get(id).await.unwrap().unwrap().1, b.to_vec(), "block {i}");
            let n = b.len() as u32;
            assert_eq!(
                s.get_range(id, n, n / 3, n / 2).await.unwrap().unwrap(),
                b[n as usize / 3..][..n as usize / 2]
            );
        }
        assert_eq!(s.get((9, 0)).await.unwrap().unwrap().1, big.to_vec());
        // Removed records free their segments for reuse (a few kept, the rest deleted).
        for i in 0..40u32 {
            s.remove((u64::from(i % 3), i)).await.unwrap();
        }
        assert_eq!(s.stats().bytes, big.len() as u64);
        let (segments, free, live) = s.log.usage();
        assert_eq!(live, 0);
        assert!(segments <= 2 && free <= 2, "in use {segments}, free {free}");
        let on_disk = fs::read_dir(d.path().join(LOG_DIR)).unwrap().count();
        assert!(on_disk <= 4, "{on_disk} segment files left");
        // Puts go on in reused segments; the old records in them never come back.
        let b = block(3000, 77);
        s.put(1, (5, 5), b.clone(), crc32c::crc32c(&b)).await.unwrap();
        drop(s);
        let s = tiny_log(d.path(), 1 << 30);
        assert_eq!(s.get((5, 5)).await.unwrap().unwrap().1, b.to_vec());
        assert!(s.stats().blocks <= 42);
        for (id, m) in s.list() {
            // Anything that came back is a removed block with its own bytes (reconcile
            // drops it later), never something else.
            let d = s.get(id).await.unwrap().unwrap().1;
            assert_eq!(crc32c::crc32c(&d), m.crc);
        }
    }

    #[tokio::test]
    async fn damaged_and_torn_records_are_discarded_and_reported() {
        let d = tempfile::tempdir().unwrap();
        let s = Staging::open(d.path(), 1 << 30).unwrap();
        let bs: Vec<_> = (0..4u32).map(|i| block(5000 + i as usize, i as u8)).collect();
        for (i, b) in bs.iter().enumerate() {
            s.put(1, (4, i as u32), b.clone(), crc32c::crc32c(b)).await.unwrap();
        }
        let locs: Vec<Loc> = (0..4).map(|i| loc_of(&s, (4, i))).collect();
        let seg = s.log.path(locs[0].seg);
        let (file, nonce) = s.log.segment(locs[0].seg).unwrap();
        drop(s);
        let data_at = |l: &Loc| l.off + stagelog::REC_HEADER as u64 + 4;
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        // Block 1: a flipped byte. Block 2: its bytes torn off (zeros, as after a crash before
        // the sync). Block 3: a flipped header byte (the record no longer exists).
        let mut one = [0u8; 1];
        file.read_exact_at(&mut one, data_at(&locs[1]) + 10).unwrap();
        f.write_all_at(&[one[0] ^ 0x20], data_at(&locs[1]) + 10).unwrap();
        f.write_all_at(&[0u8; 4096], data_at(&locs[2]) + 500).unwrap();
        file.read_exact_at(&mut one, locs[3].off + 20).unwrap();
        f.write_all_at(&[one[0] ^ 1], locs[3].off + 20).unwrap();
        // A record of another use of the segment (another nonce) past the last one.
        let stale = stagelog::encode_record_header(
            nonce ^ 1,
            (4, 9),
            &StagedMeta { vol: 1, len: 10, crc: 0, created_ms: 0, seg_shift: 16 },
        );
        f.write_all_at(&stale, locs[3].off + 3 * stagelog::ALIGN).unwrap();
        let s = Staging::open(d.path(), 1 << 30).unwrap();
        assert_eq!(s.get((4, 0)).await.unwrap().unwrap().1, bs[0].to_vec());
        assert!(!s.contains((4, 1)) && !s.contains((4, 2)) && !s.contains((4, 3)) && !s.contains((4, 9)));
        assert_eq!(s.stats().discarded, 2);
        let mut lost = s.take_lost();
        lost.sort_unstable();
        // Block 3 is not seen at all: the scrub reports it when metadata lists it here.
        assert_eq!(lost, vec![(4, 1), (4, 2)]);
        assert_eq!(s.scrub(vec![(4, 0), (4, 3)]).await.unwrap(), vec![(4, 3)]);
        // Damage after open is caught on read, discarded and queued.
        let l0 = loc_of(&s, (4, 0));
        file.read_exact_at(&mut one, data_at(&l0) + 4999).unwrap();
        f.write_all_at(&[one[0] ^ 4], data_at(&l0) + 4999).unwrap();
        assert!(matches!(s.get_range((4, 0), 5000, 4990, 10).await, Err(CacheError::Checksum(_))));
        assert!(!s.contains((4, 0)));
        assert_eq!(s.take_lost(), vec![(4, 0)]);
    }

    #[tokio::test]
    async fn compaction_moves_the_live_records_of_sparse_segments() {
        let d = tempfile::tempdir().unwrap();
        let s = tiny_log(d.path(), 1 << 30);
        // Three 4 KiB-page records per segment; keep one of every three (a quarter of each).
        for i in 0..30u32 {
            let b = block(2000, i as u8);
            s.put(1, (6, i), b.clone(), crc32c::crc32c(&b)).await.unwrap();
        }
        for i in (0..30u32).filter(|i| i % 3 != 0) {
            s.remove((6, i)).await.unwrap();
        }
        let (before, _, live) = s.log.usage();
        assert_eq!(live, 10 * 4096);
        let moved = s.compact().await.unwrap();
        assert!(moved >= 8, "moved {moved}");
        let (after, _, live) = s.log.usage();
        assert_eq!(live, 10 * 4096);
        assert!(after < before, "segments in use {before} -> {after}");
        for i in (0..30u32).filter(|i| i % 3 == 0) {
            assert_eq!(s.get((6, i)).await.unwrap().unwrap().1, block(2000, i as u8).to_vec());
        }
        drop(s);
        let s = tiny_log(d.path(), 1 << 30);
        for i in (0..30u32).filter(|i| i % 3 == 0) {
            assert_eq!(s.get((6, i)).await.unwrap().unwrap().1, block(2000, i as u8).to_vec());
        }
    }

    /// A put dropped while its record is being written (a caller that gave up) leaves
    /// neither space reserved nor a record in use.
    #[tokio::test]
    async fn a_put_given_up_leaves_nothing_behind() {
        use futures::FutureExt as _;
        let d = tempfile::tempdir().unwrap();
        let s = tiny_log(d.path(), 1 << 20);
        for i in 0..20u32 {
            let b = block(3000, i as u8);
            // One poll: the record goes to the writer, then the put is dropped.
            let done = s.put(1, (2, i), b, crc32c::crc32c(&block(3000, i as u8))).now_or_never();
            assert!(done.is_none(), "a put cannot finish without the writer");
        }
        // The writer releases what the dropped puts held once it is done with their records:
        // wait for that (a loaded machine may take a while), then check nothing is left.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while s.log.usage().2 != 0 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!((s.fill(), s.stats().blocks), (0.0, 0));
        assert_eq!(s.log.usage().2, 0, "no record is in use");
        // The store works on.
        let b = block(3000, 99);
        s.put(1, (3, 0), b.clone(), crc32c::crc32c(&b)).await.unwrap();
        assert_eq!(s.get((3, 0)).await.unwrap().unwrap().1, b.to_vec());
    }

    mod model {
        use std::collections::HashMap;

        use proptest::prelude::*;

        use super::*;

        #[derive(Debug, Clone)]
        enum Op {
            Put {
                id: u32,
                len: usize,
                seed: u8,
            },
            Remove(u32),
            Read(u32),
            Compact,
            /// Close and open again: closing writes nothing (every put was synced when it
            /// returned), so this is what a restart after a crash finds.
            Reopen,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0u32..24, 1usize..9000, any::<u8>()).prop_map(|(id, len, seed)| Op::Put { id, len, seed }),
                3 => (0u32..24).prop_map(Op::Remove),
                2 => (0u32..24).prop_map(Op::Read),
                1 => Just(Op::Compact),
                2 => Just(Op::Reopen),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

            /// Staging against a map: every acknowledged put reads back exactly across
            /// reopens, crashes and compactions; a removed block may come back after a
            /// restart, but only with its own bytes.
            #[test]
            fn staging_matches_a_map(ops in proptest::collection::vec(op(), 1..60)) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(async {
                    let d = tempfile::tempdir().unwrap();
                    let mut s = tiny_log(d.path(), 1 << 30);
                    let mut live: HashMap<u32, bytes::Bytes> = HashMap::new();
                    let mut removed: HashMap<u32, bytes::Bytes> = HashMap::new();
                    let id = |i: u32| (u64::from(i) + 1, 0u32);
                    for op in ops {
                        match op {
                            Op::Put { id: i, len, seed } => {
                                // Slices are immutable: a block id always has the same bytes.
                                let b = live.get(&i).or(removed.get(&i)).cloned().unwrap_or_else(|| block(len, seed));
                                s.put(1, id(i), b.clone(), crc32c::crc32c(&b)).await.unwrap();
                                removed.remove(&i);
                                live.insert(i, b);
                            }
                            Op::Remove(i) => {
                                s.remove(id(i)).await.unwrap();
                                if let Some(b) = live.remove(&i) {
                                    removed.insert(i, b);
                                }
                            }
                            Op::Read(i) => {
                                let got = s.get(id(i)).await.unwrap().map(|(_, d)| d);
                                prop_assert_eq!(got, live.get(&i).map(|b| b.to_vec()));
                            }
                            Op::Compact => {
                                s.compact().await.unwrap();
                            }
                            Op::Reopen => {
                                drop(s);
                                s = tiny_log(d.path(), 1 << 30);
                                prop_assert_eq!(s.stats().discarded, 0);
                                for (id_, _) in s.list() {
                                    let i = (id_.0 - 1) as u32;
                                    if let std::collections::hash_map::Entry::Vacant(e) = live.entry(i) {
                                        let back = removed.remove(&i);
                                        prop_assert!(back.is_some(), "block {} appeared from nowhere", i);
                                        e.insert(back.unwrap_or_default());
                                    }
                                }
                                for (i, b) in &live {
                                    let got = s.get(id(*i)).await.unwrap().map(|(_, d)| d);
                                    prop_assert_eq!(got, Some(b.to_vec()), "block {}", i);
                                }
                            }
                        }
                    }
                    Ok(())
                })?;
            }
        }
    }
}
