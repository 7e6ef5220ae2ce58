//! Buffered writes of one inode, and what a failed flush left behind. Pure data structures:
//! no I/O.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use elea_cache::Staged;

/// Buffered writes of one inode: disjoint extents by offset.
#[derive(Default, Clone)]
pub(super) struct Dirty {
    pub extents: BTreeMap<u64, Vec<u8>>,
    /// Bytes the extents hold.
    pub bytes: usize,
    /// When the oldest buffered write came.
    pub since: Option<Instant>,
}

impl Dirty {
    pub fn of(extents: BTreeMap<u64, Vec<u8>>) -> Self {
        let bytes = extents.values().map(Vec::len).sum();
        Self { extents, bytes, since: None }
    }

    /// Takes every buffered extent out, with the bytes they count for.
    pub fn take(&mut self) -> (BTreeMap<u64, Vec<u8>>, usize) {
        self.since = None;
        (std::mem::take(&mut self.extents), std::mem::take(&mut self.bytes))
    }

    /// The end of the last buffered byte (0 when empty).
    pub fn end(&self) -> u64 {
        self.extents.iter().next_back().map_or(0, |(s, v)| s + v.len() as u64)
    }

    /// Adds a write; overlapping or adjacent extents merge (newest bytes win).
    pub fn add(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        self.since.get_or_insert_with(Instant::now);
        // The common sequential case: extend the extent that ends where this write starts.
        if let Some((&s, v)) = self.extents.range_mut(..=off).next_back()
            && s + v.len() as u64 == off
            && self.extents.range(off + 1..end).next().is_none()
        {
            if let Some(v) = self.extents.get_mut(&s) {
                v.extend_from_slice(data);
                self.bytes += data.len();
            }
            return;
        }
        let mut touched: Vec<u64> = Vec::new();
        if let Some((&s, v)) = self.extents.range(..=off).next_back()
            && s + v.len() as u64 >= off
        {
            touched.push(s);
        }
        touched.extend(self.extents.range(off + 1..=end).map(|(s, _)| *s));
        touched.dedup();
        if touched.is_empty() {
            self.extents.insert(off, data.to_vec());
            self.bytes += data.len();
            return;
        }
        let start = touched[0].min(off);
        let mut stop = end;
        let mut olds = Vec::new();
        for s in &touched {
            if let Some(v) = self.extents.remove(s) {
                stop = stop.max(s + v.len() as u64);
                self.bytes -= v.len();
                olds.push((*s, v));
            }
        }
        let mut buf = vec![0u8; (stop - start) as usize];
        for (s, v) in olds {
            let at = (s - start) as usize;
            buf[at..at + v.len()].copy_from_slice(&v);
        }
        let at = (off - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.bytes += buf.len();
        self.extents.insert(start, buf);
    }
}

/// What flushes of an inode that failed left behind, oldest first: a flush whose bytes are
/// stored but whose commit failed (`staged`), then bytes not stored yet (`buf`). The next
/// flush commits `staged` as it is (no second upload), then stores and commits `buf` with
/// its own bytes on top.
#[derive(Default)]
pub(super) struct Unflushed {
    pub staged: Option<(Staged, usize)>,
    pub buf: Dirty,
    /// Bytes held here (staged and buffered), as counted in the node's buffered total.
    pub counted: usize,
    /// Failed attempts in a row, and when the background flush may try again.
    pub failures: u32,
    pub retry_at: Option<Instant>,
}

/// First wait after a failed flush before the background retries it; doubled per failure.
const RETRY_FIRST: Duration = Duration::from_millis(250);
/// Longest wait between background retries of a failed flush.
pub(super) const RETRY_MAX: Duration = Duration::from_secs(30);

impl Unflushed {
    /// Whether anything waits for a retry.
    pub fn pending(&self) -> bool {
        self.staged.is_some() || !self.buf.extents.is_empty()
    }

    /// The end of the last byte held here (0 when nothing is).
    pub fn end(&self) -> u64 {
        self.staged.as_ref().map_or(0, |(s, _)| s.end()).max(self.buf.end())
    }

    /// Bytes held here now.
    pub fn held(&self) -> usize {
        self.staged.as_ref().map_or(0, |(_, n)| *n) + self.buf.bytes
    }

    /// Records one more failure and schedules the next background try.
    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
        let wait = RETRY_FIRST.saturating_mul(1 << self.failures.min(8).saturating_sub(1)).min(RETRY_MAX);
        self.retry_at = Some(Instant::now() + wait);
    }

    /// Whether the background flush should retry now.
    pub fn due(&self) -> bool {
        self.pending() && self.retry_at.is_none_or(|t| Instant::now() >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(d: &Dirty) -> Vec<(u64, Vec<u8>)> {
        d.extents.iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    #[test]
    fn dirty_extents_merge_and_newest_wins() {
        let mut d = Dirty::default();
        d.add(0, b"aaaa");
        d.add(4, b"bb");
        assert_eq!(flat(&d), vec![(0, b"aaaabb".to_vec())]);
        d.add(10, b"cc");
        assert_eq!(d.extents.len(), 2);
        d.add(2, b"XXXXXXXXX");
        assert_eq!(flat(&d), vec![(0, b"aaXXXXXXXXXc".to_vec())]);
        assert_eq!(d.bytes, 12);
        d.add(20, b"z");
        d.add(19, b"yy");
        assert_eq!(flat(&d)[1], (19, b"yy".to_vec()));
        assert_eq!(d.bytes, 14);
        assert_eq!(d.end(), 21);
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        let mut u = Unflushed::default();
        u.buf.add(0, b"x");
        assert!(u.due(), "never tried: due at once");
        let mut last = Duration::ZERO;
        for _ in 0..12 {
            u.failed();
            let wait = u.retry_at.unwrap().saturating_duration_since(Instant::now());
            assert!(wait <= RETRY_MAX);
            assert!(wait + Duration::from_millis(5) >= last, "waits do not shrink");
            last = wait;
        }
        assert!(last > Duration::from_secs(20), "capped near RETRY_MAX, got {last:?}");
        assert!(!u.due());
    }
}
