//! The gateway's failure paths, on the in-memory metadata service and data path (faults
//! injected where the real ones fail):
//! - every descriptor on the writing gateway sees its buffered writes (size and bytes) before
//!   any flush;
//! - a flush whose commit fails for a transient reason keeps what it staged and commits it
//!   again without uploading it again; one that can never succeed drops its bytes; the
//!   count of buffered bytes stays exact;
//! - a blocked `F_SETLKW` request whose caller is interrupted answers `EINTR` within one
//!   wait slice, the waiter never ends up holding the lock afterwards, and a close clears
//!   what its owner waited for.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{MemCluster, MemGw};
use elea_cache::CacheError;
use elea_common::ids::ROOT_INO;
use elea_common::{Errno, Ino};
use elea_fsm::{LockKind, Op};
use elea_gateway::{Creds, VfsConfig};
use elea_metadata::MetaApi as _;
use elea_metadata::client::ClientError;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn two_gateways() -> (MemCluster, MemGw, MemGw) {
    let mem = MemCluster::new();
    let vol = mem.volume().await;
    let a = mem.gateway(vol, "a").await;
    let b = mem.gateway(vol, "b").await;
    (mem, a, b)
}

async fn read_all(g: &MemGw, fh: u64) -> Vec<u8> {
    g.read(fh, 0, 1 << 20).await.expect("read").to_vec()
}

/// Fails every commit of file data with `e` (a clone each time) until cleared.
fn fail_commits(mem: &MemCluster, e: ClientError) {
    mem.meta.set_fault(Some(Arc::new(move |op: &Op| {
        matches!(op, Op::WriteSlicePieces { .. } | Op::WriteSlice { .. }).then(|| e.clone())
    })));
}

#[test]
fn a_second_descriptor_sees_buffered_writes() {
    runtime().block_on(async {
        let (_mem, a, b) = two_gateways().await;
        let root = Creds::root();
        let (w, f) = a.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        let block: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 + 1).collect();
        assert_eq!(a.write(w, 0, &block).await, Ok(8192));
        // What the kernel asks before a second open and a pread: the lookup must report the
        // buffered size (the kernel clips reads to it), and so must the open.
        assert_eq!(a.lookup(&root, ROOT_INO, b"f").await.map(|x| x.size), Ok(8192));
        let (r, attr) = a.open(&root, f.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(attr.size, 8192);
        assert_eq!(read_all(&a, r).await, block, "a second descriptor reads the buffered bytes");
        // An append through another descriptor lands after them.
        let (app, _) = a.open(&root, f.ino, libc::O_WRONLY | libc::O_APPEND).await.unwrap();
        assert_eq!(a.write(app, 0, b"tail").await, Ok(4));
        assert_eq!(a.lookup(&root, ROOT_INO, b"f").await.map(|x| x.size), Ok(8196));
        let (listing, _) = {
            let d = a.opendir(&root, ROOT_INO).await.unwrap();
            let l = a.readdir(d, 0, true).await.unwrap();
            a.releasedir(d).await.unwrap();
            l
        };
        let e = listing.iter().find(|e| e.name == b"f").unwrap();
        assert_eq!(e.attr.as_ref().map(|x| x.size), Some(8196), "readdir-plus too");
        // The other gateway sees only what is committed (the read flushed the first block;
        // the append is still buffered).
        assert_eq!(b.lookup(&root, ROOT_INO, b"f").await.map(|x| x.size), Ok(8192));
        for fh in [w, r, app] {
            a.release(fh).await.unwrap();
        }
        let (rb, _) = b.open(&root, f.ino, libc::O_RDONLY).await.unwrap();
        let mut want = block.clone();
        want.extend_from_slice(b"tail");
        assert_eq!(read_all(&b, rb).await, want);
    });
}

#[test]
fn a_failed_commit_is_retried_without_uploading_again() {
    runtime().block_on(async {
        let (mem, a, _b) = two_gateways().await;
        let root = Creds::root();
        let (fh, f) = a.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        a.write(fh, 0, &[7u8; 5000]).await.unwrap();
        a.write(fh, 1000, &[8u8; 1000]).await.unwrap();
        assert_eq!(a.dirty_bytes(), 5000, "overlapping writes count once");
        fail_commits(&mem, ClientError::Unavailable("no leader".into()));
        assert_eq!(a.fsync(fh).await, Err(Errno::ETIMEDOUT));
        let staged = mem.data.staged_bytes();
        assert_eq!(staged, 5000);
        assert_eq!(a.fsync(fh).await, Err(Errno::ETIMEDOUT));
        assert_eq!(a.fsync(fh).await, Err(Errno::ETIMEDOUT));
        assert_eq!(mem.data.staged_bytes(), staged, "retries commit the staged slice, they upload nothing");
        assert_eq!(a.dirty_bytes(), 5000);
        // Newer bytes buffered meanwhile go on top once the commit goes through.
        a.write(fh, 4990, &[9u8; 20]).await.unwrap();
        assert_eq!(a.dirty_bytes(), 5020);
        mem.meta.set_fault(None);
        a.fsync(fh).await.expect("fsync once metadata is back");
        assert_eq!(a.dirty_bytes(), 0);
        assert_eq!(mem.data.staged_bytes(), staged + 20);
        let mut want = vec![7u8; 5000];
        want[1000..2000].fill(8);
        want.resize(5010, 0);
        want[4990..5010].fill(9);
        let (r, _) = a.open(&root, f.ino, libc::O_RDONLY).await.unwrap();
        assert_eq!(read_all(&a, r).await, want);
        a.release(r).await.unwrap();
        a.release(fh).await.unwrap();
    });
}

#[test]
fn a_commit_that_can_never_succeed_drops_its_bytes() {
    runtime().block_on(async {
        let mem = MemCluster::new();
        let vol = mem.volume().await;
        // Background flushes on: the gateway must stop retrying on its own.
        let cfg = VfsConfig { flush_delay: Duration::from_millis(40), ..VfsConfig::default() };
        let a = mem.gateway_with(vol, "a", cfg).await;
        let root = Creds::root();
        let (fh, _) = a.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        a.write(fh, 0, &[1u8; 3000]).await.unwrap();
        fail_commits(&mem, ClientError::Fs(Errno::ENOENT));
        assert_eq!(a.fsync(fh).await, Err(Errno::ENOENT));
        assert_eq!(a.dirty_bytes(), 0, "the bytes are dropped, and no longer counted");
        let staged = mem.data.staged_bytes();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(mem.data.staged_bytes(), staged, "nothing is uploaded again in the background");
        assert_eq!(a.fsync(fh).await, Ok(()), "nothing is left to flush");
        mem.meta.set_fault(None);
        a.release(fh).await.unwrap();
    });
}

#[test]
fn a_staging_failure_backs_off_in_the_background() {
    runtime().block_on(async {
        let mem = MemCluster::new();
        let vol = mem.volume().await;
        let cfg = VfsConfig { flush_delay: Duration::from_millis(40), ..VfsConfig::default() };
        let a = mem.gateway_with(vol, "a", cfg).await;
        let root = Creds::root();
        let (fh, f) = a.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        a.write(fh, 0, &[3u8; 100]).await.unwrap();
        let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = tries.clone();
        mem.data.set_fault(Some(Arc::new(move || {
            t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(CacheError::NoNodes("site restarting".into()))
        })));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let n = tries.load(std::sync::atomic::Ordering::Relaxed);
        // Every 10 ms without a backoff; 250 ms, 500 ms, 1 s with it.
        assert!((1..=4).contains(&n), "{n} background attempts in 1.5 s");
        assert_eq!(a.dirty_bytes(), 100);
        mem.data.set_fault(None);
        a.fsync(fh).await.expect("fsync once staging works");
        assert_eq!(a.getattr(f.ino).await.map(|x| x.size), Ok(100));
        a.release(fh).await.unwrap();
    });
}

async fn lock_holder(g: &MemGw, ino: Ino, owner: u64) -> Option<u64> {
    let (fh, _) = g.open(&Creds::root(), ino, libc::O_RDONLY).await.unwrap();
    let l = g.getlk(fh, owner, LockKind::Write, 0, u64::MAX).await.unwrap();
    g.release(fh).await.unwrap();
    l.map(|l| l.owner)
}

#[test]
fn a_waiting_lock_answers_eintr_and_never_takes_the_lock_later() {
    runtime().block_on(async {
        let (_mem, a, b) = two_gateways().await;
        let root = Creds::root();
        let (ha, f) = a.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        let (hb, _) = b.open(&root, f.ino, libc::O_RDWR).await.unwrap();
        a.setlk(ha, 1, 100, LockKind::Write, 0, u64::MAX, false, false).await.unwrap();
        // A waiter whose caller was not interrupted waits on.
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.setlk(hb, 6, 600, LockKind::Write, 0, u64::MAX, true, false).await }
        });
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert!(!waiting.is_finished(), "an uninterrupted waiter keeps waiting");
        waiting.abort();
        b.release_locks(hb, 6).await.unwrap();
        // B's owner 2 waits and its caller is interrupted (a signal, a kill): the request
        // answers EINTR within a slice instead of waiting for the lock.
        let t = Instant::now();
        let wait = b.setlk(hb, 2, 200, LockKind::Write, 0, u64::MAX, true, true);
        let answer = tokio::time::timeout(Duration::from_secs(5), wait).await;
        assert_eq!(answer.expect("an interrupted lock request answers within its slice"), Err(Errno::EINTR));
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(150) && waited < Duration::from_secs(3), "{waited:?}");
        // The waiter was killed: its close clears what it waited for.
        b.release_locks(hb, 2).await.unwrap();
        // The holder lets go: nobody holds the lock afterwards (the dead waiter did not get it).
        a.setlk(ha, 1, 100, LockKind::Unlock, 0, u64::MAX, false, false).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(lock_holder(&a, f.ino, 3).await, None);
        // A live waiter that asks again gets it once it is free.
        a.setlk(ha, 1, 100, LockKind::Write, 0, u64::MAX, false, false).await.unwrap();
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.setlk(hb, 4, 400, LockKind::Write, 0, u64::MAX, true, false).await }
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        a.setlk(ha, 1, 100, LockKind::Unlock, 0, u64::MAX, false, false).await.unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), waiter).await.unwrap().unwrap(), Ok(()));
        assert_eq!(lock_holder(&a, f.ino, 5).await, Some(4));
        b.release_locks(hb, 4).await.unwrap();
        assert_eq!(lock_holder(&a, f.ino, 5).await, None);
        a.release(ha).await.unwrap();
        b.release(hb).await.unwrap();
    });
}

/// `create` with `O_TRUNC` of an existing file whose buffered writes cannot be flushed fails
/// and leaves nothing open behind: once the writer closes and the name is gone, the file is
/// freed.
#[test]
fn a_failed_o_trunc_create_leaves_no_open_reference() {
    runtime().block_on(async {
        let (mem, a, _b) = two_gateways().await;
        let root = Creds::root();
        let (fh, _) = a.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        a.write(fh, 0, b"buffered").await.unwrap();
        fail_commits(&mem, ClientError::Unavailable("no leader".into()));
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC;
        assert_eq!(
            a.create(&root, ROOT_INO, b"f", 0o644, 0o022, flags).await.map(|_| ()),
            Err(Errno::ETIMEDOUT)
        );
        mem.meta.set_fault(None);
        a.release(fh).await.unwrap();
        a.unlink(&root, ROOT_INO, b"f").await.unwrap();
        a.release_closed().await;
        assert_eq!(a.statfs().await.map(|s| s.used_inodes), Ok(1), "only the root is left");
    });
}

/// A gateway cut off from metadata for longer than its session's lease loses its locks (the
/// state machine expires the session and another mount may take them). When it gets through
/// again it opens a new session, and every descriptor through which it held a lock answers
/// `EIO` from then on (read, write, flush, sync, lock), so the application learns it no longer
/// holds the lock instead of writing on unlocked; closing it works, and a new descriptor works
/// and locks again. A descriptor that held no lock carries on.
#[test]
fn a_lapsed_session_fences_the_descriptors_that_held_its_locks() {
    runtime().block_on(async {
        let mem = MemCluster::new();
        let vol = mem.volume().await;
        let cfg = VfsConfig { session_ttl: Duration::from_millis(400), ..VfsConfig::default() };
        let a = mem.gateway_with(vol, "a", cfg).await;
        let b = mem.gateway(vol, "b").await;
        let root = Creds::root();
        let (locked, f) = a.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.unwrap();
        let (flocked, _) = a.open(&root, f.ino, libc::O_RDWR).await.unwrap();
        let (plain, _) = a.open(&root, f.ino, libc::O_RDWR).await.unwrap();
        a.setlk(locked, 1, 100, LockKind::Write, 0, 99, false, false).await.unwrap();
        let none = || false;
        a.0.flock(flocked, 2, LockKind::Read, false, &none).await.unwrap();
        assert_eq!(a.write(locked, 0, b"under the lock").await, Ok(14));
        a.flush(locked).await.unwrap();
        // Cut off: heartbeats fail until the lease is long gone and the session expired.
        mem.meta.set_fault(Some(Arc::new(|op: &Op| {
            matches!(op, Op::Heartbeat { .. }).then(|| ClientError::Unavailable("cut off".into()))
        })));
        tokio::time::sleep(Duration::from_millis(900)).await;
        mem.meta.op(Op::ExpireSessions).await.unwrap();
        // Another mount takes the lock meanwhile.
        let (hb, _) = b.open(&root, f.ino, libc::O_RDWR).await.unwrap();
        b.setlk(hb, 9, 900, LockKind::Write, 0, 99, false, false).await.unwrap();
        mem.meta.set_fault(None);
        // The next heartbeat finds the session gone and opens a new one.
        tokio::time::sleep(Duration::from_millis(400)).await;
        for fh in [locked, flocked] {
            assert_eq!(a.read(fh, 0, 10).await.map(|_| ()), Err(Errno::EIO));
            assert_eq!(a.write(fh, 0, b"x").await, Err(Errno::EIO));
            assert_eq!(a.flush(fh).await, Err(Errno::EIO));
            assert_eq!(a.fsync(fh).await, Err(Errno::EIO));
            assert_eq!(a.setlk(fh, 1, 100, LockKind::Write, 0, 99, false, false).await, Err(Errno::EIO));
            assert_eq!(a.getlk(fh, 1, LockKind::Write, 0, 99).await.map(|_| ()), Err(Errno::EIO));
        }
        // A descriptor that held no lock goes on, and sees the lock is another mount's.
        assert_eq!(a.read(plain, 0, 14).await.map(|b| b.to_vec()), Ok(b"under the lock".to_vec()));
        let holder = a.getlk(plain, 1, LockKind::Write, 0, 99).await.unwrap();
        assert_eq!(holder.map(|l| l.owner), Some(9));
        // Closing the fenced descriptors works; a new one locks again once the lock is free.
        a.release(locked).await.unwrap();
        a.release(flocked).await.unwrap();
        b.setlk(hb, 9, 900, LockKind::Unlock, 0, u64::MAX, false, false).await.unwrap();
        let (again, _) = a.open(&root, f.ino, libc::O_RDWR).await.unwrap();
        a.setlk(again, 1, 100, LockKind::Write, 0, 99, false, false).await.unwrap();
        assert_eq!(a.write(again, 0, b"relocked").await, Ok(8));
        a.flush(again).await.unwrap();
        for fh in [again, plain] {
            a.release(fh).await.unwrap();
        }
        b.release(hb).await.unwrap();
    });
}
