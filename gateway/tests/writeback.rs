//! Write-behind: a buffer that passes its limit is flushed in the background while the
//! writer goes on. These tests run a gateway with a tiny buffer limit, so nearly every write
//! starts a background flush while the one before may still be in flight, and check:
//! - the inode's flushes commit in the order their bytes were written (newer bytes over
//!   older ones that are still in flight), and the writer reads its own writes;
//! - an `O_APPEND` write lands after bytes still in flight;
//! - a background flush that fails drops nothing: `fsync` reports the error, a later flush
//!   commits the bytes, and a write that would buffer more fails without buffering.

mod common;

use elea_metadata::MetaApi as _;
use std::time::Duration;

use common::{Gw, TestCluster};
use elea_common::ids::ROOT_INO;
use elea_common::{Errno, Ino};
use elea_gateway::{Creds, VfsConfig};

/// Buffer limit of the writing gateway: most writes pass it.
const LIMIT: usize = 40 << 10;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime")
}

fn small_buffer() -> VfsConfig {
    VfsConfig { dirty_limit: LIMIT, flush_delay: Duration::from_secs(3600), ..VfsConfig::default() }
}

/// xorshift64*: a deterministic generator, so a failure names the seed that shows it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Bytes that differ from write to write (and from zeros).
fn payload(len: usize, seed: u64, step: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (((i as u64).wrapping_mul(31) ^ seed.wrapping_mul(7) ^ step.wrapping_mul(13)) % 251 + 1) as u8
        })
        .collect()
}

fn write_at(v: &mut Vec<u8>, off: usize, d: &[u8]) {
    if v.len() < off + d.len() {
        v.resize(off + d.len(), 0);
    }
    v[off..off + d.len()].copy_from_slice(d);
}

async fn read_range(v: &Gw, fh: u64, off: u64, len: u32) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < len as usize {
        let got = v.read(fh, off + out.len() as u64, len - out.len() as u32).await.expect("read");
        if got.is_empty() {
            break;
        }
        out.extend_from_slice(&got);
    }
    out
}

async fn contents(v: &Gw, ino: Ino) -> Vec<u8> {
    let (fh, a) = v.open(&Creds::root(), ino, libc::O_RDONLY).await.expect("open");
    let d = read_range(v, fh, 0, a.size as u32).await;
    v.release(fh).await.expect("release");
    d
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}"),
        None => format!("lengths {} and {}", a.len(), b.len()),
    }
}

/// Random overlapping writes, appends through a second handle, reads and size checks on a
/// gateway whose buffer limit most writes pass; at the end another gateway reads exactly
/// what a local file would hold.
#[test]
fn background_flushes_commit_in_write_order() {
    runtime().block_on(async {
        let cluster = TestCluster::start(1).await;
        let vol = cluster.volume().await;
        let w = cluster.gateway_with(vol, "writer", small_buffer()).await;
        let r = cluster.gateway(vol, "reader").await;
        let root = Creds::root();
        for seed in 1..=8u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let name = format!("f{seed}");
            let (fh, f) =
                w.create(&root, ROOT_INO, name.as_bytes(), 0o644, 0o022, libc::O_RDWR).await.expect("create");
            let (app, _) = w.open(&root, f.ino, libc::O_WRONLY | libc::O_APPEND).await.expect("open append");
            let mut model: Vec<u8> = Vec::new();
            for step in 0..120u64 {
                let what = rng.below(20);
                let ctx = || format!("seed {seed}, step {step}");
                match what {
                    // Writes: mostly where the last one ended, some anywhere (overwriting
                    // bytes that may still be in flight), some past the end (holes).
                    0..=12 => {
                        let len = 1 + rng.below(3 * LIMIT as u64 / 2) as usize;
                        let off = match rng.below(4) {
                            0 | 1 => model.len(),
                            2 => rng.below(model.len() as u64 + 1) as usize,
                            _ => model.len() + rng.below(8 << 10) as usize,
                        };
                        let data = payload(len, seed, step);
                        let n = w
                            .write(fh, off as u64, &data)
                            .await
                            .unwrap_or_else(|e| panic!("{}: write {e:?}", ctx()));
                        assert_eq!(n as usize, len, "{}", ctx());
                        write_at(&mut model, off, &data);
                    }
                    13 | 14 => {
                        let len = 1 + rng.below(LIMIT as u64) as usize;
                        let data = payload(len, seed, step);
                        w.write(app, 0, &data).await.unwrap_or_else(|e| panic!("{}: append {e:?}", ctx()));
                        model.extend_from_slice(&data);
                    }
                    15 | 16 => {
                        let off = rng.below(model.len() as u64 + 1);
                        let len = 1 + rng.below(2 * LIMIT as u64) as u32;
                        let got = read_range(&w, fh, off, len).await;
                        let end = model.len().min(off as usize + len as usize);
                        let want = &model[(off as usize).min(end)..end];
                        assert!(
                            got == want,
                            "{}: read at {off} differs: {}",
                            ctx(),
                            first_difference(&got, want)
                        );
                    }
                    17 => {
                        let a = w.getattr(f.ino).await.expect("getattr");
                        assert_eq!(a.size, model.len() as u64, "{}: size", ctx());
                    }
                    18 => w.fsync(fh).await.unwrap_or_else(|e| panic!("{}: fsync {e:?}", ctx())),
                    _ => tokio::task::yield_now().await,
                }
            }
            w.release(app).await.expect("release");
            w.release(fh).await.expect("release");
            let got = contents(&r, f.ino).await;
            assert!(
                got == model,
                "seed {seed}: the other gateway reads other bytes: {}",
                first_difference(&got, &model)
            );
        }
        w.shutdown().await.expect("shutdown");
        r.shutdown().await.expect("shutdown");
    });
}

/// A volume that wants two copies on a cluster with one cache node: every flush fails (once
/// its wait for a second node runs out) until a second node joins. Nothing acknowledged is
/// dropped meanwhile. (Flushes small enough to commit inline would not need the nodes: this
/// gateway stages every flush.)
#[test]
fn a_failed_background_flush_keeps_its_bytes() {
    runtime().block_on(async {
        let mut cluster = TestCluster::start(1).await;
        cluster.inline_max = 0;
        let vol = cluster.volume_with_replicas(2).await;
        let w = cluster.gateway_with(vol, "writer", small_buffer()).await;
        let root = Creds::root();
        let (fh, f) = w.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.expect("create");
        let first = payload(LIMIT, 1, 1);
        // Passes the limit: its flush starts in the background (and fails there).
        assert_eq!(w.write(fh, 0, &first).await, Ok(LIMIT as u32));
        // More than the buffer holds: the failed flush is retried first, fails again, and
        // this write buffers nothing.
        let refused = payload(LIMIT, 2, 2);
        assert_eq!(w.write(fh, LIMIT as u64, &refused).await, Err(Errno::EIO));
        // fsync reports the failure too.
        assert_eq!(w.fsync(fh).await, Err(Errno::EIO));
        // A small write still buffers.
        let small = payload(100, 3, 3);
        assert_eq!(w.write(fh, 10, &small).await, Ok(100));

        cluster.add_node(2).await;
        w.fsync(fh).await.expect("fsync once two nodes hold copies");
        let mut want = first.clone();
        write_at(&mut want, 10, &small);
        let r = cluster.gateway(vol, "reader").await;
        let got = contents(&r, f.ino).await;
        assert!(got == want, "{}", first_difference(&got, &want));
        w.release(fh).await.expect("release");
        w.shutdown().await.expect("shutdown");
        r.shutdown().await.expect("shutdown");
    });
}

/// A write whose site has too few cache nodes waits for them (a site restarting) instead of
/// failing at once, and succeeds once they come.
#[test]
fn writes_wait_for_cache_nodes_to_come() {
    runtime().block_on(async {
        let mut cluster = TestCluster::start(1).await;
        cluster.node_wait = Duration::from_secs(60);
        let vol = cluster.volume_with_replicas(2).await;
        let w = cluster.gateway(vol, "writer").await;
        let root = Creds::root();
        let (fh, f) = w.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.expect("create");
        let data = payload(100_000, 4, 4);
        assert_eq!(w.write(fh, 0, &data).await, Ok(100_000));
        let fsync = tokio::spawn({
            let w = w.clone();
            async move { w.fsync(fh).await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!fsync.is_finished(), "the fsync waits for a second cache node");
        cluster.add_node(2).await;
        let done = tokio::time::timeout(Duration::from_secs(20), fsync).await;
        assert_eq!(done.expect("the fsync ends once the node is there").expect("task"), Ok(()));
        let r = cluster.gateway(vol, "reader").await;
        assert!(contents(&r, f.ino).await == data);
        w.release(fh).await.expect("release");
        w.shutdown().await.expect("shutdown");
        r.shutdown().await.expect("shutdown");
    });
}

/// A small flush travels inside its metadata commit: its fsync needs no cache node, so it
/// succeeds while the site has fewer nodes than the volume's copies, and its bytes read back
/// everywhere. Once the nodes are there the spill worker gives it its copies.
#[test]
fn a_small_fsync_commits_inline_without_enough_cache_nodes() {
    runtime().block_on(async {
        let mut cluster = TestCluster::start(1).await;
        let vol = cluster.volume_with_replicas(2).await;
        let w = cluster.gateway(vol, "writer").await;
        let root = Creds::root();
        let (fh, f) = w.create(&root, ROOT_INO, b"f", 0o644, 0o022, libc::O_RDWR).await.expect("create");
        let data = payload(3000, 5, 5);
        assert_eq!(w.write(fh, 0, &data).await, Ok(3000));
        let t = std::time::Instant::now();
        w.fsync(fh).await.expect("fsync with one cache node of two");
        assert!(t.elapsed() < Duration::from_secs(2), "the fsync did not wait for a second node");
        let r = cluster.gateway(vol, "reader").await;
        assert!(contents(&r, f.ino).await == data);
        let slice = cluster.meta().read_chunk(vol, f.ino, 0).await.expect("chunk")[0].id;
        let meta = cluster.meta().clone();
        let held = || async {
            let d = meta.slice_data(&[slice]).await.expect("slice data");
            d[0].inline.is_none() && d[0].loc.as_ref().is_some_and(|l| l.blocks[0].nodes.len() == 2)
        };
        assert!(!held().await, "two copies need two nodes");
        cluster.add_node(2).await;
        let until = std::time::Instant::now() + Duration::from_secs(30);
        while !held().await {
            assert!(std::time::Instant::now() < until, "the slice was not spilled to two nodes");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let fresh = cluster.gateway(vol, "fresh").await;
        assert!(contents(&fresh, f.ino).await == data);
        w.release(fh).await.expect("release");
        for g in [w, r, fresh] {
            g.shutdown().await.expect("shutdown");
        }
    });
}
