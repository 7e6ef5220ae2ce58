//! An fsync-heavy workload for crash tests: on every mount, several writers each append small
//! records of varying size to a file of their own, `fsync` after every record, and note which
//! records were acknowledged (the `fsync` returned) and which one was in flight when they
//! stopped. [`FsyncAppends::check`] then reads every file through every mount: it must hold
//! exactly the writer's records from the first, every acknowledged one, and at most the one
//! in flight after them; nothing torn, nothing else. A file written before the workload and
//! never touched again must be unchanged.
//!
//! A writer stops at its first failed call (the mount died under it): what it knows then is
//! exact, acknowledged records and possibly one in flight. [`FsyncAppends::resume`] starts
//! the writers again from what [`FsyncAppends::check`] found, on the same files.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The bytes of record `seq` (from 1) of file `file`: a line naming both, then bytes that
/// depend on both, 40 to 4,000 bytes in all.
pub fn record(file: usize, seq: u64) -> Vec<u8> {
    let mut x =
        (file as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let len = 40 + (next() % 3960) as usize;
    let mut b = format!("file {file} record {seq} len {len}\n").into_bytes();
    while b.len() < len {
        b.push(b'a' + (next() % 26) as u8);
    }
    b.truncate(len);
    b
}

/// Where a writer stands: records acknowledged, and whether the next one was in flight.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub acked: u64,
    pub in_flight: bool,
}

/// What a check found in one file, per file: records present.
#[derive(Debug)]
pub struct Checked {
    /// Records found in each file.
    pub records: Vec<u64>,
    /// Acknowledged records in all files.
    pub acked: u64,
    /// Files where the record in flight when the writer stopped is there.
    pub in_flight_present: usize,
    /// Everything wrong (must be empty).
    pub violations: Vec<String>,
}

/// See the module docs.
pub struct FsyncAppends {
    files: Vec<PathBuf>,
    /// Per file, the mount index it is written through (file `i` lives in `dir` of that
    /// mount; every mount sees every file).
    mounts: Vec<PathBuf>,
    progress: Arc<Mutex<Vec<Progress>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    untouched: (PathBuf, Vec<u8>),
}

const DIR: &str = "fsync-appends";

impl FsyncAppends {
    /// Starts `per_mount` writers on each of `mounts`.
    pub fn start(mounts: &[PathBuf], per_mount: usize) -> Self {
        let dir = mounts[0].join(DIR);
        std::fs::create_dir_all(&dir).expect("workload directory");
        let untouched = (dir.join("untouched"), record(usize::MAX >> 1, 7).repeat(3));
        let mut f = std::fs::File::create(&untouched.0).expect("untouched file");
        f.write_all(&untouched.1).and_then(|()| f.sync_all()).expect("untouched file");
        let n = mounts.len() * per_mount;
        let files: Vec<PathBuf> = (0..n).map(|i| PathBuf::from(DIR).join(format!("f{i}"))).collect();
        for f in &files {
            std::fs::File::create(mounts[0].join(f)).and_then(|f| f.sync_all()).expect("workload file");
        }
        let mut w = Self {
            files,
            mounts: mounts.to_vec(),
            progress: Arc::new(Mutex::new(vec![Progress::default(); n])),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            untouched,
        };
        w.spawn();
        w
    }

    fn spawn(&mut self) {
        self.stop.store(false, Ordering::SeqCst);
        for (i, rel) in self.files.iter().enumerate() {
            let path = self.mounts[i % self.mounts.len()].join(rel);
            let (stop, progress) = (self.stop.clone(), self.progress.clone());
            self.threads.push(std::thread::spawn(move || writer(i, &path, &stop, &progress)));
        }
    }

    /// Records acknowledged so far, in all files.
    pub fn acked(&self) -> u64 {
        self.progress.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|p| p.acked).sum()
    }

    /// Stops the writers (those still running end after their current record).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Reads every file through every mount and checks it against what its writer knows (see
    /// the module docs). The writers must be stopped. What is found becomes what the writers
    /// know: a record in flight that is there counts as written from now on.
    pub fn check(&mut self) -> Checked {
        let mut progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Checked { records: Vec::new(), acked: 0, in_flight_present: 0, violations: Vec::new() };
        for (i, rel) in self.files.iter().enumerate() {
            let p = progress[i];
            out.acked += p.acked;
            let mut found: Option<u64> = None;
            for m in &self.mounts {
                let got = match std::fs::read(m.join(rel)) {
                    Ok(b) => b,
                    Err(e) => {
                        out.violations.push(format!(
                            "{}: reading {} failed: {e}",
                            m.display(),
                            rel.display()
                        ));
                        continue;
                    }
                };
                let mut want = Vec::new();
                let mut n = 0;
                while want.len() < got.len() && n <= p.acked + 1 {
                    n += 1;
                    want.extend_from_slice(&record(i, n));
                }
                let whole = got.len() == want.len() && got == want;
                let allowed = n >= p.acked && (n == p.acked || (p.in_flight && n == p.acked + 1));
                if !whole || !allowed {
                    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
                    out.violations.push(format!(
                        "{} through {}: {} bytes, {} records' worth; acknowledged {}, in flight {}; first differing byte {:?}",
                        rel.display(),
                        m.display(),
                        got.len(),
                        n,
                        p.acked,
                        p.in_flight,
                        first_bad
                    ));
                    continue;
                }
                if found.is_some_and(|f| f != n) {
                    out.violations
                        .push(format!("{}: the mounts disagree ({found:?} and {n} records)", rel.display()));
                }
                found = Some(n);
            }
            let n = found.unwrap_or(p.acked);
            if n > p.acked {
                out.in_flight_present += 1;
            }
            progress[i] = Progress { acked: n, in_flight: false };
            out.records.push(n);
        }
        for m in &self.mounts {
            let path = m.join(DIR).join("untouched");
            match std::fs::read(&path) {
                Ok(b) if b == self.untouched.1 => {}
                Ok(b) => out.violations.push(format!(
                    "{}: an untouched file changed ({} bytes)",
                    path.display(),
                    b.len()
                )),
                Err(e) => out.violations.push(format!("{}: {e}", path.display())),
            }
        }
        out
    }

    /// Starts the writers again after a [`FsyncAppends::check`], on the mounts `mounts` (the
    /// same ones, restarted).
    pub fn resume(&mut self, mounts: &[PathBuf]) {
        self.mounts = mounts.to_vec();
        self.spawn();
    }
}

impl Drop for FsyncAppends {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Appends records to `path` with an `fsync` after each, until told to stop or a call fails.
fn writer(i: usize, path: &Path, stop: &AtomicBool, progress: &Mutex<Vec<Progress>>) {
    let set = |p: Progress| progress.lock().unwrap_or_else(|e| e.into_inner())[i] = p;
    let acked = progress.lock().unwrap_or_else(|e| e.into_inner())[i].acked;
    let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) else { return };
    let mut seq = acked;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        set(Progress { acked: seq - 1, in_flight: true });
        if f.write_all(&record(i, seq)).and_then(|()| f.sync_all()).is_err() {
            // The mount is gone: the record may or may not be there.
            return;
        }
        set(Progress { acked: seq, in_flight: false });
        // Not a busy loop on a mount that answers at once: real writers do other work.
        std::thread::sleep(Duration::from_micros(200));
    }
}
